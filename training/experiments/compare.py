"""Run the method-comparison grid (methods x settings x seeds), resumably, cell by cell.

    nice -n 19 python training/experiments/compare.py --out runs/compare-v2 --jobs 2 \
        > runs/compare-v2.log 2>&1 &
    python training/experiments/summarize.py runs/compare-v2            # tables of what has finished

Every cell trains ``--config`` (default ``training/configs/fmnist-compare-cpu.yaml``) with the method's and
the setting's overrides for the same number of optimiser steps (``--epochs`` passes over the balanced
training set, the same step count in the long-tailed setting), then runs ``training/evaluate.py`` on the
final backbone. Cell folders: ``<out>/<setting>/<method>/seed-<s>/`` with ``train.log``, ``final/``,
``eval.log``, ``eval.json`` and, written last and atomically, ``cell.json``: a cell is finished exactly
when ``cell.json`` exists.

Restarting the command continues the grid: finished cells are skipped, an interrupted training resumes
from its latest checkpoint (``--resume auto``), a finished training whose evaluation was interrupted is
only evaluated. A cell whose training exits with an error (divergence, collapse stop) gets ``failed.json``
and is skipped on later runs unless ``--retry-failed``; the command exits 1 while any cell is failed.
A child stopped by SIGINT or SIGTERM is *interrupted*, not failed. Ctrl-C or SIGTERM of this command is
forwarded to its child processes, which are waited for before the grid is unlocked (exit 130 / 143).
``<out>/grid.json`` pins the budget and the config (the merged config of every method, ``extends:``
parents included); a later run with a different budget or config refuses to mix into the same folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.experiments.grid import METHODS, METHODS_BY_KEY, Cell, LongTail, cells, settings
from visreg_hub.errors import ConfigError

logger = logging.getLogger("training.experiments.compare")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = "training/configs/fmnist-compare-cpu.yaml"
# exit statuses of a child stopped by SIGINT / SIGTERM: 128 + n from a handler (pretrain.py's Ctrl-C
# path returns 130), -n from subprocess when the signal killed it. Such a cell is resumable, not failed.
INTERRUPTED_CODES = frozenset({128 + signal.SIGINT, -signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGTERM})
STOP_GRACE_S = 60.0  # how long a stopped child may take to exit before it is killed


class Interrupted(KeyboardInterrupt):
    """This process got SIGINT or SIGTERM (``signum``); a KeyboardInterrupt, so every cleanup path runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum: int, frame) -> None:
    """Signal handler: turn SIGTERM (and SIGINT) into :class:`Interrupted` in the main thread."""
    for other in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the children's wait short
        signal.signal(other, already_stopping)
    raise Interrupted(signum)


def already_stopping(signum: int, frame) -> None:
    """Signal handler while the children are being stopped: say so, and keep waiting for them."""
    print(f"{signal.Signals(signum).name} again: still waiting for the trainers to stop "
          f"(at most {STOP_GRACE_S:.0f} s)", file=sys.stderr)  # fmt: skip


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ runners
class SubprocessRunner:
    """Runs pretrain.py / evaluate.py as child processes (one crash or leak cannot take the grid down).

    Children run in their own session, so a terminal's Ctrl-C reaches only this process; :meth:`stop`
    forwards it (or SIGTERM) exactly once and waits, so no trainer outlives the grid lock.
    """

    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self._lock = threading.Lock()
        self._children: set[subprocess.Popen] = set()
        self._stopped: int | None = None  # the signal stop() forwarded; no child starts after it

    def __call__(self, script: str, argv: list[str], log: Path) -> int:
        env = {
            # one intra-op thread: these tiny models are overhead-bound, and two threads on two shared,
            # busy cores spin (measured: 6 steps took 3.8x the CPU time with 2 threads as with 1)
            **{var: "1" for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        with open(log, "a", encoding="utf-8") as out:
            out.write(f"\n$ {script} {' '.join(argv)}\n")
            out.flush()
            child = None
            try:
                with self._lock:
                    if self._stopped is not None:  # a worker thread reaching its next cell after a stop
                        return -self._stopped
                    child = subprocess.Popen(
                        [self.python, str(REPO / script), *argv], stdout=out, stderr=subprocess.STDOUT,
                        env=env, cwd=REPO, start_new_session=True,
                    )  # fmt: skip
                    self._children.add(child)
                return child.wait()
            except KeyboardInterrupt as exc:  # --jobs 1: the signal arrives in this very wait
                self.stop(getattr(exc, "signum", signal.SIGINT))
                raise
            finally:
                with self._lock:
                    self._children.discard(child)

    def stop(self, signum: int = signal.SIGINT, grace_s: float = STOP_GRACE_S) -> None:
        """Forward ``signum`` to every running child, start no new one, and wait for them to exit
        (SIGKILL after ``grace_s``): their cells stay resumable, and nothing writes after the unlock."""
        with self._lock:
            self._stopped = signum
            children = list(self._children)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)
        deadline = time.monotonic() + grace_s
        for child in children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("child %d ignored %s for %.0f s; killing it",
                               child.pid, signal.Signals(signum).name, grace_s)  # fmt: skip
                child.kill()
                child.wait()


class InProcessRunner:
    """Calls the scripts' ``main(argv)`` in this process (fast: no interpreter start; used by the tests)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, script: str, argv: list[str], log: Path) -> int:
        from training import evaluate, pretrain

        self.calls.append((script, argv))
        main = {"training/pretrain.py": pretrain.main, "training/evaluate.py": evaluate.main}[script]
        with (
            open(log, "a", encoding="utf-8") as out,
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(out),
        ):
            return main(argv)


# ------------------------------------------------------------------------------------------ the grid
def train_size(config) -> int:
    """Number of training images the config reads (after its validation hold-out)."""
    from training.evaluate import load_split

    _, labels = load_split(config.data.source, config.data.path, config.data.split)
    return len(labels) - config.data.val_size


def weight_defaults(loss_class: str) -> dict:
    """The loss constructor's default weights (``*_weight``), so the grid names every weight in force."""
    import inspect

    import visreg_hub.losses as losses

    params = inspect.signature(getattr(losses, loss_class).__init__).parameters
    return {k: p.default for k, p in params.items() if k.endswith("_weight") and p.default is not p.empty}


def grid_spec(args: argparse.Namespace) -> dict:
    """Everything that defines the grid's cells; written to ``<out>/grid.json`` on the first run."""
    from training.build import loss_settings
    from training.config import load_config

    config_path = REPO / args.config if not Path(args.config).is_absolute() else Path(args.config)
    base = load_config(str(config_path), list(args.set))
    # at least --epochs full passes over the balanced set (the last step may run into a further epoch)
    steps = args.steps or math.ceil(args.epochs * train_size(base) / base.train.global_batch_size)
    long_tail = LongTail(args.lt_max, args.lt_ratio, args.lt_seed)
    methods, merged = {}, {}
    for method in METHODS:
        config = load_config(str(config_path), [*args.set, *method.overrides])
        merged[method.key] = config.to_dict()
        loss_class, kwargs = loss_settings(config)
        kwargs = {**weight_defaults(loss_class), **kwargs}
        methods[method.key] = {"label": method.label, "overrides": list(method.overrides),
                               "loss_class": loss_class, "loss_kwargs": kwargs}  # fmt: skip
    eval_data = ["--data", base.data.source]
    if base.data.source != "fmnist":
        if not args.test_split:
            raise ConfigError(f"--test-split is required for data.source={base.data.source}")
        eval_data += ["--train", str(base.data.path), "--test", args.test_split]
    return {
        "config": str(args.config),
        "merged_config_sha256": merged_config_sha256(merged),
        "extra_overrides": list(args.set),
        "steps": steps,
        "global_batch_size": base.train.global_batch_size,
        "train_images": train_size(base),
        "epochs_of_balanced_set": round(steps * base.train.global_batch_size / train_size(base), 3),
        "eval_data": eval_data,
        "long_tail": asdict(long_tail),
        "settings": {k: asdict(s) for k, s in settings(long_tail).items()},
        "methods": methods,
    }


def merged_config_sha256(configs: dict[str, dict]) -> str:
    """Hash of each method's fully merged config (``extends:`` parents and overrides applied): an edit
    to a parent file changes it, while the bytes of the ``--config`` file alone would not."""
    text = json.dumps(configs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# keys a grid.json written before they existed lacks; such a grid stays usable and records them
# (``config_sha256``, the bytes of the --config file only, was replaced by ``merged_config_sha256``)
ADDED_KEYS = ("merged_config_sha256",)


def open_grid(out: Path, spec: dict, plan: dict, create: bool = True) -> dict:
    """Create ``grid.json`` or check that the existing one describes the same grid.

    ``plan`` ({"settings", "methods", "seeds": [...]}) is added to the grid's plan (the union over runs),
    which is what the summary expects to find; the rest of ``spec`` must not change.
    """
    path = out / "grid.json"
    spec = json.loads(json.dumps(spec))  # tuples -> lists, as they come back from grid.json
    saved = None
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in ADDED_KEYS if k not in saved]
        if missing:
            logger.warning(
                "%s predates %s; recording it now (config edits made before this run cannot be detected)",
                path,
                ", ".join(missing),
            )
        differing = sorted(k for k in spec if k not in missing and saved.get(k) != spec[k])
        if differing:
            raise ConfigError(
                f"{out} holds a grid with different {', '.join(differing)}; use a new --out folder "
                "or the settings of the existing grid"
            )
    grid = saved or {**spec, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    grid = {**grid, **{k: spec[k] for k in ADDED_KEYS if k not in grid}}
    before = grid.get("planned", {})
    grid["planned"] = {k: sorted(set(before.get(k, [])) | set(v)) for k, v in plan.items()}
    if create and grid != saved:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, grid)
    return grid


def cell_dir(out: Path, cell: Cell) -> Path:
    return out / cell.setting / cell.method / f"seed-{cell.seed}"


def run_cell(out: Path, grid: dict, cell: Cell, runner, retry_failed: bool = False) -> str:
    """Bring one cell to 'done' (or 'failed'); returns what happened: skipped / done / failed /
    skipped-failed / interrupted (a child stopped by a signal: the next run resumes the cell)."""
    folder = cell_dir(out, cell)
    if (folder / "cell.json").is_file():
        return "skipped"
    failed = folder / "failed.json"
    if failed.is_file():
        if not retry_failed:
            return "skipped-failed"
        failed.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    method, setting = grid["methods"][cell.method], grid["settings"][cell.setting]
    overrides = [
        *grid["extra_overrides"], *method["overrides"], *setting["train"],
        f"train.output_dir={folder}", f"train.max_steps={grid['steps']}", f"train.seed={cell.seed}",
    ]  # fmt: skip
    started = time.time()
    if not (folder / "train.done").is_file():
        argv = ["--config", str(REPO / grid["config"]), *overrides, "--resume", "auto"]
        code = runner("training/pretrain.py", argv, folder / "train.log")
        if code != 0:
            return stopped(failed, cell, "train", code, folder / "train.log")
        (folder / "train.done").write_text("ok\n", encoding="utf-8")
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # final/ holds the backbone
    argv = [str(folder / "final"), *grid["eval_data"], *setting["eval_args"], "--workers", "0",
            "--batch-size", "512", "--device", "cpu", "--out", str(folder / "eval.json")]  # fmt: skip
    code = runner("training/evaluate.py", argv, folder / "eval.log")
    if code != 0:
        return stopped(failed, cell, "eval", code, folder / "eval.log")
    write_json_atomic(folder / "cell.json", {
        "cell": asdict(cell), "overrides": overrides, "steps": grid["steps"], "code": code_version(),
        "eval": "eval.json", "seconds_this_run": round(time.time() - started, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })  # fmt: skip
    return "done"


def stopped(failed: Path, cell: Cell, stage: str, code: int, log: Path) -> str:
    """Outcome of a child that exited with ``code`` != 0: 'interrupted' for SIGINT / SIGTERM (no
    ``failed.json``: a restart must resume the cell, not skip it), else 'failed' with ``failed.json``."""
    if code in INTERRUPTED_CODES:
        logger.warning("%s: %s stopped by a signal (exit %d); a rerun resumes it", cell.name, stage, code)
        return "interrupted"
    write_json_atomic(failed, {"cell": asdict(cell), "stage": stage, "exit_code": code, "log": str(log)})
    return "failed"


def code_version() -> str:
    """The commit the cell ran with (provenance): $VISREG_CODE_COMMIT (set it when running from an
    exported copy of the code), else ``git rev-parse HEAD`` when this file's repository is a checkout."""
    if os.environ.get("VISREG_CODE_COMMIT"):
        return os.environ["VISREG_CODE_COMMIT"]
    try:
        top = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True)  # fmt: skip
    except OSError:
        return "unknown"
    lines = top.stdout.split()
    if top.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != REPO:
        return "unknown"  # not a checkout of its own (e.g. an exported copy inside another repository)
    return lines[1]


@contextlib.contextmanager
def grid_lock(out: Path):
    """One runner per grid folder (a second one would train the same cells twice)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another compare.py is running on {out}; wait for it or stop it") from None
        yield


def plan(args: argparse.Namespace) -> dict:
    return {"settings": args.settings, "methods": args.methods, "seeds": args.seeds}


def run_grid(args: argparse.Namespace, runner) -> dict[str, str]:
    """Run (or continue) the grid; returns {cell name: outcome}."""
    out = Path(args.out)
    if args.dry_run:  # reads only: no lock, no grid.json written
        grid = open_grid(out, grid_spec(args), plan(args), create=False)
        return {c.name: "done" if (cell_dir(out, c) / "cell.json").is_file() else "to run"
                for c in cells(args.settings, args.methods, args.seeds)}  # fmt: skip
    with grid_lock(out):
        grid = open_grid(out, grid_spec(args), plan(args))
        todo = cells(args.settings, args.methods, args.seeds)

        def one(item: tuple[int, Cell]) -> tuple[str, str]:
            index, cell = item
            started = time.perf_counter()
            outcome = run_cell(out, grid, cell, runner, args.retry_failed)
            logger.info("[%d/%d] %s: %s (%.0f s)", index, len(todo), cell.name, outcome,
                        time.perf_counter() - started)  # fmt: skip
            return cell.name, outcome

        if args.jobs == 1:
            return dict(map(one, enumerate(todo, 1)))
        # cells are child processes; threads only wait on them, in grid order
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(args.jobs)
        try:
            return dict(pool.map(one, enumerate(todo, 1)))
        except KeyboardInterrupt as exc:  # stop the children first: the pool waits for their threads
            stop = getattr(runner, "stop", None)
            if stop is not None:
                stop(getattr(exc, "signum", signal.SIGINT))
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare-v2", help="grid folder (resumes what is there)")
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every cell")
    parser.add_argument("--epochs", type=int, default=2, help="budget in passes over the balanced set")
    parser.add_argument("--steps", type=int, help="budget in optimiser steps (overrides --epochs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--methods", nargs="+", default=[m.key for m in METHODS], choices=list(METHODS_BY_KEY)
    )
    parser.add_argument("--settings", nargs="+", default=["balanced", "lt"], choices=["balanced", "lt"])
    parser.add_argument("--lt-max", type=int, default=LongTail.max_per_class)
    parser.add_argument("--lt-ratio", type=float, default=LongTail.ratio)
    parser.add_argument("--lt-seed", type=int, default=LongTail.seed)
    parser.add_argument("--test-split", help="test images for a non-fmnist config (folder, list or .npz)")
    parser.add_argument("--retry-failed", action="store_true")
    parser.add_argument(
        "--jobs", type=int, default=1, help="cells at once (each is a one-thread child process)"
    )
    parser.add_argument("--in-process", action="store_true", help="no child processes (tests, debugging)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and whether they are done")
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.epochs < 1 or args.jobs < 1:
        parser.error("--steps, --epochs and --jobs must be positive")
    if args.in_process and args.jobs > 1:
        parser.error("--in-process runs one cell at a time; drop --jobs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = InProcessRunner() if args.in_process else SubprocessRunner()
    previous = install_stop_handlers()
    try:
        outcomes = run_grid(args, runner)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the children are stopped, the lock released
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"error: interrupted by {signal.Signals(signum).name}; the running cells were stopped; "
              "rerun the same command to resume them", file=sys.stderr)  # fmt: skip
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    counts = {k: sum(v == k for v in outcomes.values()) for k in sorted(set(outcomes.values()))}
    print(json.dumps({"cells": len(outcomes), **counts}))
    return exit_status(counts)


def install_stop_handlers() -> dict:
    """SIGINT and SIGTERM raise :class:`Interrupted` (SIGTERM would otherwise kill this process and
    orphan its trainers); returns the previous handlers. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}


def exit_status(counts: dict[str, int]) -> int:
    """0 only when no cell is left failed or interrupted; says on stderr what to do about the rest."""
    failed = counts.get("failed", 0) + counts.get("skipped-failed", 0)
    if failed:
        print(f"error: {failed} cell(s) failed (see failed.json in each cell folder); fix the cause and "
              "rerun with --retry-failed to train them again", file=sys.stderr)  # fmt: skip
    if counts.get("interrupted"):
        print(f"error: {counts['interrupted']} cell(s) were stopped by a signal; rerun the same command "
              "to resume them", file=sys.stderr)  # fmt: skip
    return 1 if failed or counts.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
