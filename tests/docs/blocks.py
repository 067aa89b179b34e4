"""Extract the code blocks of the project's Markdown files and the ``docs-test`` markers above them.

See :mod:`tests.docs.test_docs` for the convention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Every Markdown file a user reads for instructions; each of their code blocks is run by test_docs.py.
DOC_FILES = (
    "README.md",
    "training/README.md",
    "demo/README.md",
    "benchmarks/README.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
)
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
# Info strings of blocks that are not code to run (output, layouts, file contents).
NOT_CODE = {"text", "yaml", "json", "markdown", "toml", "console-output"}
MODES = ("run", "skip", "slow", "server", "slow-server")

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_MARKER = re.compile(r"<!--\s*docs-test:\s*([\w-]+)\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    """One fenced code block.

    Attributes:
        doc: file path relative to the repository root.
        line: 1-based line of the opening fence.
        lang: the info string's first word (``python``, ``bash``, ``text``...), "" when absent.
        code: the block's text, dedented by the fence's indentation.
        mode: ``run`` (default), ``skip``, ``slow``, ``server`` or ``slow-server`` (from the marker
            above the fence).
        reason: the marker's text (required for ``skip``).
    """

    doc: str
    line: int
    lang: str
    code: str
    mode: str = "run"
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in RUNNABLE


def extract(doc: str) -> list[Block]:
    """The fenced blocks of ``doc`` (relative to the repository root), in order."""
    lines = (REPO / doc).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, lang = match.groups()
        start = index
        body = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else lines[index])
            index += 1
        index += 1  # closing fence
        mode, reason = "run", ""
        previous = start - 1
        while previous >= 0 and not lines[previous].strip():
            previous -= 1
        marker = _MARKER.search(lines[previous]) if previous >= 0 else None
        if marker:
            mode, reason = marker.group(1), marker.group(2)
        blocks.append(Block(doc, start + 1, lang.lower(), "\n".join(body) + "\n", mode, reason))
    return blocks


def all_blocks() -> list[Block]:
    return [block for doc in DOC_FILES for block in extract(doc)]
