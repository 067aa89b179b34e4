"""Every code block of README.md, training/README.md, demo/README.md, benchmarks/README.md and docs/*.md runs.

Convention (also summarised in a comment at the top of README.md):

* Blocks fenced as ```` ```python ```` or ```` ```bash ```` (``sh``, ``shell``) are code and are run as
  written, in file order, in a scratch folder that links every top-level entry of the repository (so
  ``training/...``, ``demo/assets/...`` resolve and outputs such as ``runs/`` or ``emb.npy`` land in the
  scratch folder). Python blocks of one file share a namespace, like a notebook; bash blocks run with
  ``bash -euo pipefail``. ``python`` and ``visreg-hub`` are the test interpreter's; the Hub is offline
  (``HF_HUB_OFFLINE=1``) and ``HOME`` is the scratch folder.
* Other blocks must say what they are: ```` ```text ````, ```` ```yaml ````, ```` ```json ```` ... (never
  a bare fence), so nothing that looks like a command escapes the test.
* An HTML comment on the line above a fence changes how the block runs:

  - ``<!-- docs-test: skip REASON -->``: not run; REASON is required (needs a GPU, the network, hours,
    installs into the environment). Keep these few: ``test_skipped_blocks_are_few_and_justified``
    caps their number.
  - ``<!-- docs-test: slow -->``: run only with ``pytest -m slow`` (minutes of CPU). A block that uses
    a slow block's output must be slow too.
  - ``<!-- docs-test: server -->``: each command starts a long-running server; it must listen within
    4 minutes on a free port (``--port N`` is replaced by it, ``GRADIO_SERVER_PORT`` names it), then it
    is stopped. ``<!-- docs-test: slow-server -->``: the same, only with ``pytest -m slow``.

Put commands that need different treatment in separate blocks rather than marking a whole block skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.blocks import DOC_FILES, MODES, NOT_CODE, REPO, RUNNABLE, all_blocks, extract

MAX_SKIPPED = 15  # GPUs, network, installs, placeholders (13 today); prefer slow or a runnable rewrite
RUNNER = Path(__file__).with_name("runner.py")


def test_every_block_is_labelled_and_markers_are_valid():
    problems = []
    for block in all_blocks():
        if block.lang not in RUNNABLE and block.lang not in NOT_CODE:
            problems.append(
                f"{block.where}: fence language {block.lang!r} (use one of {sorted(RUNNABLE)} "
                f"or {sorted(NOT_CODE)})"
            )
        if block.mode not in MODES:
            problems.append(f"{block.where}: unknown docs-test mode {block.mode!r} (one of {MODES})")
        if block.mode != "run" and not block.runnable:
            problems.append(f"{block.where}: docs-test marker on a {block.lang!r} block that never runs")
        if block.mode == "skip" and len(block.reason) < 10:
            problems.append(f"{block.where}: docs-test skip needs a reason")
    assert not problems, "\n".join(problems)


def test_skipped_blocks_are_few_and_justified():
    skipped = [f"{b.where}: {b.reason}" for b in all_blocks() if b.mode == "skip"]
    print("\n".join(skipped))
    assert len(skipped) <= MAX_SKIPPED, "\n".join(skipped)


def _tracked_top_level() -> set[str] | None:
    """Top-level names git tracks in the checkout (None outside a git checkout)."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {
        name.split("/", 1)[0] for name in listed.stdout.decode("utf-8", "surrogateescape").split("\0") if name
    }


def _sandbox(tmp_path: Path) -> Path:
    """A folder that looks like the repository root: a link to each of its tracked top-level entries.

    why tracked only: a user who ran the README's commands in the checkout has their outputs there
    (``emb.npy``, ``gallery-index/``); linked in, the blocks found "already exists" and, through the
    link, overwrote the user's own files."""
    work = tmp_path / "work"
    work.mkdir()
    tracked = _tracked_top_level()
    for entry in REPO.iterdir():
        if entry.name in {".git", ".venv", "runs", "third_party"} or entry.name.startswith("."):
            continue
        if tracked is None or entry.name in tracked:
            (work / entry.name).symlink_to(entry)
    return work


def run_doc(doc: str, modes: set[str], tmp_path: Path, timeout: float) -> str:
    blocks = [b for b in extract(doc) if b.runnable and b.mode in modes]
    if not blocks:
        pytest.skip(f"{doc} has no blocks to run in modes {sorted(modes)}")
    work = _sandbox(tmp_path)
    spec = tmp_path / "blocks.json"
    spec.write_text(
        json.dumps([{"where": b.where, "lang": b.lang, "code": b.code, "mode": b.mode} for b in blocks])
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(REPO),
        "HOME": str(work),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, str(RUNNER), str(spec)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


@pytest.mark.parametrize("doc", DOC_FILES)
def test_doc_blocks_run(doc, tmp_path):
    run_doc(doc, {"run", "server"}, tmp_path, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOC_FILES)
def test_doc_blocks_run_including_slow(doc, tmp_path):
    run_doc(doc, {"run", "server", "slow", "slow-server"}, tmp_path, timeout=3600)


def test_the_sandbox_holds_the_tracked_entries_only(tmp_path):
    """A fresh-clone user ran the README's commands in the checkout, then `make test`: their emb.npy was
    linked into the sandbox ("already exists"), and gallery-index/ was overwritten through its link."""
    stray = REPO / f"docs-sandbox-stray-{os.getpid()}.npy"  # untracked, like a user's output
    stray.write_bytes(b"a user's file")
    try:
        work = _sandbox(tmp_path)
    finally:
        stray.unlink()
    names = {p.name for p in work.iterdir()}
    assert stray.name not in names and {"README.md", "visreg_hub", "docs", "demo"} <= names


def test_the_test_extra_holds_everything_the_demo_needs():
    """`make test` marks the demo's install done too (Makefile): so [dev] must hold every package of [demo],
    or `make demo` after `make test` would start without one (and offline it could not install it)."""
    import re
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def packages(extra: str) -> set[str]:
        found = set()
        for requirement in extras[extra]:
            if requirement.startswith("visreg_hub["):
                for inner in requirement[len("visreg_hub[") : -1].split(","):
                    found |= packages(inner.strip())
            else:
                found.add(re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower())
        return found

    assert packages("demo") <= packages("dev")
    assert "touch $@ $(VENV)/.installed-demo" in (REPO / "Makefile").read_text()
