"""Markdown rendering of a losses benchmark run, and the one writer of docs/benchmarks.md sections.

Each run writes one section delimited by HTML comments keyed by script and device type, so a CPU run and
a GPU run live side by side and re-running replaces only the matching section; sections written by other
benchmark scripts are left alone. Every benchmark script writes its section with :func:`write_section`.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import _measure
import numpy as np
import torch

DOC_HEADER = (
    "# Benchmarks\n\n"
    "Every section is written by the script it names, with the date, device, versions and exact command. "
    "Ratios compare implementations measured in the same run; a number without its peer in the same run "
    "is not a claim.\n"
)
MATMUL_OPS = ("mm", "bmm", "matmul", "addmm", "linear")


@dataclass
class Report:
    """Everything one run measured, ready to render."""

    date: str
    device: str
    device_type: str
    load_start: str
    load_end: str
    versions: list[str]
    command: str
    settings: list[str]
    cells: list
    partition: list[tuple]
    profiles: list[tuple]

    def render(self) -> str:
        parts = [
            f"## Losses: ours vs official VISReg vs lightly ({self.device_type})\n",
            f"- Date: {self.date}",
            f"- Device: {self.device}",
            f"- 1-min load average {self.load_start} at start, {self.load_end} at the end (a shared machine "
            "inflates absolute times; the implementations of a cell run back to back, so their ratios are "
            "less affected)",
            *(f"- {line}" for line in self.versions),
            f"- Command: `{self.command}`",
            *(f"- Setting {line}" for line in self.settings),
            "",
            "### Forward+backward time and peak memory",
            "",
            "Peak memory includes the inputs; on CPU it is the peak of bytes held by torch's CPU allocator "
            "during the step (torch.profiler memory events). Ratio = this implementation / official "
            "(below 1 is better).",
            "",
            self._cell_table(),
        ]
        if any(cell.value is not None for cell in self.cells):
            parts += ["", "### Agreement on the same inputs and the same random directions", "", _PARITY_NOTE]
            parts += ["", self._parity_table()]
            if any(cell.loss == "vicreg" and cell.impl != "ours" and cell.value for cell in self.cells):
                parts += ["", _VICREG_NOTE]
        if self.partition:
            parts += ["", '### `slice_mode="partition"`: per-rank cost vs ranks M', "", _PART_NOTE]
            parts += ["", self._partition_table()]
        for setting, dtype, ops in self.profiles:
            parts += ["", f"### Top operators of our VISReg fwd+bwd ({setting}, {dtype}, torch.profiler)", ""]
            parts += [_ops_table(ops), "", _ops_summary(ops)]
        return "\n".join(parts) + "\n"

    def _cell_table(self) -> str:
        official = {(c.loss, c.setting, c.dtype): c for c in self.cells if c.impl == "official"}
        rows = [
            "| loss | impl | setting | dtype | fwd+bwd ms: median (min), repeats | peak mem "
            "| ratio to official (time / mem) |",
            "|---|---|---|---|---|---|---|",
        ]
        for cell in self.cells:
            if cell.timing is None:
                rows.append(
                    f"| {cell.loss} | {cell.impl} | {cell.setting} | {cell.dtype} | {cell.skipped} | | |"
                )
                continue
            ref = official.get((cell.loss, cell.setting, cell.dtype))
            ratio = "n/a (no official cell)"
            if ref is not None and ref.timing is not None:
                time_ratio = cell.timing.median / ref.timing.median
                mem_ratio = (
                    f"{cell.peak_bytes / ref.peak_bytes:.2f}" if cell.peak_bytes and ref.peak_bytes else "n/a"
                )
                ratio = f"{time_ratio:.2f} / {mem_ratio}"
            vicreg = official.get(("vicreg", cell.setting, cell.dtype))
            if cell.loss == "barlow" and vicreg is not None and vicreg.timing is not None:
                ratio += f"; time vs official VICReg {cell.timing.median / vicreg.timing.median:.2f}"
            timing = f"{cell.timing.median:.2f} ({cell.timing.min:.2f}), n={len(cell.timing.times_ms)}"
            rows.append(
                f"| {cell.loss} | {cell.impl} | {cell.setting} | {cell.dtype} | {timing} | "
                f"{_measure.format_bytes(cell.peak_bytes)} | {ratio} |"
            )
        return "\n".join(rows)

    def _parity_table(self) -> str:
        rows = [
            "| loss | impl | setting | dtype | total loss | ours, float64 | value vs ours | grad vs ours | "
            "value vs float64 | grad vs float64 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for cell in self.cells:
            if cell.value is None:
                continue
            errors = [cell.rel_value, cell.rel_grad, cell.ref_value_err, cell.ref_grad_err]
            errors = " | ".join("-" if e is None else f"{e:.1e}" for e in errors)
            reference = "n/a" if cell.reference is None else f"{cell.reference:.6g}"
            rows.append(
                f"| {cell.loss} | {cell.impl} | {cell.setting} | {cell.dtype} | {cell.value:.6g} | "
                f"{reference} | {errors} |"
            )
        return "\n".join(rows)

    def _partition_table(self) -> str:
        rows = [
            "| setting | dtype | ranks M | slices per rank | slowest rank, CPU ms (median) | time vs M=1 | "
            "goal 1.3/M | wall ms | value vs M=1 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for setting, dtype, ranks, slices, cpu, relative, wall, spread in self.partition:
            rows.append(
                f"| {setting} | {dtype} | {ranks} | {slices} | {cpu:.1f} | {relative:.2f} | "
                f"{1.3 / ranks:.3f} | {wall:.1f} | {spread:.1e} |"
            )
        return "\n".join(rows)


_PARITY_NOTE = (
    "The official and lightly losses draw their directions with `torch.randn(D, K)` on every call; seeding "
    "the global generator before the call and drawing the same matrix reproduces them exactly, and ours "
    "gets that matrix through `directions=`. So every row below evaluates the same slices (VICReg has "
    "none). Errors are relative: |a - b| / |b| for values, ||a - b|| / ||b|| for the gradient with "
    "respect to all inputs; 'vs ours' is against ours in the same dtype, 'vs float64' against our formula "
    "in float64 on the float32 master inputs and directions (so a bf16 row includes the input rounding; "
    "the float64 gradient is skipped above the light setting's size)."
)
_VICREG_NOTE = (
    "VICReg rows differ by definition, not by numerics: ours is the VICReg paper's objective (25 x "
    "invariance averaged over global-global and global-local view pairs + 25 x variance hinge + 1 x "
    "covariance, statistics per view, unbiased variance + 1e-4 under the square root); the official "
    "repository's VICReg pools all V*N samples into one std (+1e-6) and one covariance and is mixed as "
    "0.9 x (25 x variance + covariance) + 0.1 x LeJEPA invariance. The timing rows still compare the same "
    "order of work (a D x D covariance over V*N samples). Barlow Twins: ours averages the cross-correlation "
    "loss over the global-global and global-local view pairs (30 pairs at V10 with 4 globals, 13 at V8 "
    "with 2); "
    "the official averages over the V - 1 consecutive pairs (i, i + 1), local-local pairs included, and "
    "normalises by the unbiased std + 1e-6."
)
_PART_NOTE = (
    "M real gloo processes (one torch thread each) hold contiguous blocks of the batch and run "
    '`VISRegLoss(slice_mode="partition")` forward + backward together (invariance, moments, shape). A '
    "rank's time is the CPU time of its computing thread (`time.thread_time`), so M processes on a "
    "machine with fewer cores still report what each rank costs; the wall time includes queueing for "
    "cores and gloo's transfers. The loss value of every M is compared with M = 1 (same directions)."
)


def _ops_table(ops: list[tuple[str, float, float]]) -> str:
    rows = ["| op | self ms | share of self time |", "|---|---|---|"]
    rows += [f"| `{name}` | {ms:.1f} | {share:.0%} |" for name, ms, share in ops]
    return "\n".join(rows)


def _ops_summary(ops: list[tuple[str, float, float]]) -> str:
    sort_share = sum(s for op, _, s in ops if "sort" in op)
    matmul_share = sum(s for op, _, s in ops if op.split("::")[-1] in MATMUL_OPS)
    return (
        f"Measured: sort ops take {sort_share:.0%} of the profiled self time and matmuls "
        f"{matmul_share:.0%} (among the top {len(ops)} ops)."
    )


def losses_source() -> str:
    """Which code of ours was measured: git commit, whether ``visreg_hub/losses`` differs from it, and a
    digest of its ``*.py`` files (so a number can be matched to code even before it is committed)."""
    package = Path(__file__).resolve().parents[1] / "visreg_hub" / "losses"
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        git = ["git", "-C", str(package)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        status = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True)
        state = f"git {commit.stdout.strip()}" + (" + uncommitted changes" if status.stdout.strip() else "")
    except OSError:
        state = "git n/a"
    return f"visreg_hub/losses: {state}, sha256 of its *.py {digest.hexdigest()[:12]}"


def versions(peers: dict, tf32: bool) -> list[str]:
    """Version lines for the section header."""
    official, lightly = peers["official"], peers["lightly"]
    lines = [
        f"torch {torch.__version__}, numpy {np.__version__}, visreg_hub {peers['ours'].version}"
        + (", TF32 matmuls on" if tf32 else ""),
        losses_source(),
        "official: HaiyuWu/visreg @ "
        + (official.version if official.missing_reason is None else official.missing_reason),
        "lightly: " + (lightly.version if lightly.missing_reason is None else lightly.missing_reason),
    ]
    if peers["ours"].missing_reason is not None:
        lines.append(f"ours: {peers['ours'].missing_reason}")
    return lines


def write_section(path: Path, key: str, text: str, script: str = "benchmarks/losses.py") -> None:
    """Insert or replace ``script``'s section ``key`` (the device type, optionally with a variant such as
    ``cpu-onnx-batch1``) in the markdown file at ``path``; every other section is left as it is."""
    marker = f"{script}:{key}"
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    current = path.read_text() if path.exists() else DOC_HEADER
    if start in current and end in current:
        head, rest = current.split(start, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        current = head + block + ("\n" + tail if tail else "")
    else:
        current = current.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(current)
