"""Markdown tables of a method-comparison grid (``training/experiments/compare.py``), finished cells only.

    python training/experiments/summarize.py runs/compare-v2                         # print the tables
    python training/experiments/summarize.py runs/compare-v2 --update docs/results.md

``--update`` replaces the text between ``<!-- compare:begin -->`` and ``<!-- compare:end -->`` in the file.

What is reported:

* A status table: every cell that a compare.py run planned (the union of their ``--settings``,
  ``--methods`` and ``--seeds``, kept in grid.json) as done, failed, started (a training or evaluation
  that has not finished; never counted) or not started. Only cells with ``cell.json`` contribute numbers.
* Per setting, a row per method: the weights in force, the seeds that contributed (n of the grid's seeds;
  rows missing seeds are marked "incomplete"), mean +- sample std (ddof 1) over those seeds.
* Paired comparison of VISReg with each peer on the seeds both finished: the per-seed differences, their
  mean, and whether the mean difference is larger than the seed spread, defined as the larger of the two
  methods' std over those seeds, with every seed's difference of the same sign. One shared seed gives no
  spread, and the sentence says so.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.experiments.grid import REFERENCE_METHOD, Cell

BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
GROUPS = ("many", "medium", "few")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str

    def value(self, result: dict) -> float | None:
        """This metric from one cell's eval.json (None if the evaluation did not produce it)."""
        kind, _, group = self.key.partition(":")
        if kind == "lp":
            if not group:
                return result["linear"]["accuracy"]
            return result.get("groups", {}).get("linear probe", {}).get(group)
        k = kind.removeprefix("knn")
        if not group:
            return result["knn"].get(k)
        return result.get("groups", {}).get(f"kNN k={k}", {}).get(group)


BALANCED_METRICS = (Metric("lp", "linear probe"), Metric("knn20", "kNN k=20"), Metric("knn200", "kNN k=200"))
LT_METRICS = (
    Metric("lp", "LP all"),
    *(Metric(f"lp:{g}", f"LP {g}") for g in GROUPS),
    Metric("knn20", "kNN all"),
    *(Metric(f"knn20:{g}", f"kNN {g}") for g in GROUPS),
)
PAIRED = {"balanced": ("lp", "knn20"), "lt": ("lp", "lp:few", "knn20")}


# ------------------------------------------------------------------------------------------ reading
def cell_status(root: Path, cell: Cell) -> str:
    folder = root / cell.setting / cell.method / f"seed-{cell.seed}"
    if (folder / "cell.json").is_file():
        return "done"
    if (folder / "failed.json").is_file():
        stage = json.loads((folder / "failed.json").read_text(encoding="utf-8")).get("stage", "?")
        return f"failed ({stage})"
    return "started" if folder.is_dir() else "not started"


def collect(root: Path, grid: dict, seeds: list[int]) -> tuple[dict[Cell, str], dict[Cell, dict]]:
    """(status of every planned cell, eval.json of each done cell)."""
    status, results = {}, {}
    for setting in planned(grid, "settings"):
        for method in planned(grid, "methods"):
            for seed in seeds:
                cell = Cell(setting, method, seed)
                status[cell] = cell_status(root, cell)
                if status[cell] == "done":
                    folder = root / setting / method / f"seed-{seed}"
                    results[cell] = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
    return status, results


def seeds_on_disk(root: Path) -> list[int]:
    found = {int(m.group(1)) for p in root.glob("*/*/seed-*") if (m := re.fullmatch(r"seed-(\d+)", p.name))}
    return sorted(found)


def planned(grid: dict, what: str) -> list:
    """The settings / methods / seeds some compare.py run asked for (in grid order)."""
    asked = grid.get("planned", {}).get(what)
    if what == "seeds":
        return sorted(asked or [])
    return [k for k in grid[what] if asked is None or k in asked]


# ------------------------------------------------------------------------------------------ statistics
def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof 1; None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt(mean: float, std: float | None) -> str:
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def verdict(diffs: list[float], spread: float | None, peer: str) -> str:
    """One sentence: is VISReg's paired difference to ``peer`` larger than the seed spread?"""
    mean = sum(diffs) / len(diffs)
    if spread is None:
        return f"one shared seed: no seed spread to compare the difference with (VISReg {mean:+.2f})"
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if abs(mean) > spread and same_sign:
        side = "ahead of" if mean > 0 else "behind"
        return (
            f"VISReg is {side} {peer} by more than the seed spread "
            f"(|{mean:+.2f}| > {spread:.2f}, same sign on all {len(diffs)} seeds)"
        )
    reason = f"|{mean:+.2f}| <= {spread:.2f}" if abs(mean) <= spread else "the sign changes across seeds"
    return f"within the seed spread ({reason}): no difference shown between VISReg and {peer}"


# ------------------------------------------------------------------------------------------ tables
def weights_text(method: dict) -> str:
    kwargs = method["loss_kwargs"]
    parts = [f"{k.removesuffix('_weight')} {v:g}" for k, v in kwargs.items() if k.endswith("_weight")]
    if "num_slices" in kwargs:
        parts.append(f"K {kwargs['num_slices']}")
    return ", ".join(parts).replace("reg ", "λ ", 1) if parts else "defaults"


def method_table(grid, setting, metrics, seeds, results) -> list[str]:
    header = ["method", "weights", "seeds", *(m.label for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * len(metrics)]
    for key in planned(grid, "methods"):
        method = grid["methods"][key]
        done = [s for s in seeds if Cell(setting, key, s) in results]
        seeds_cell = f"{len(done)}/{len(seeds)}" + ("" if len(done) == len(seeds) else " (incomplete)")
        row = [method["label"], weights_text(method), seeds_cell]
        for metric in metrics:
            values = [metric.value(results[Cell(setting, key, s)]) for s in done]
            values = [v for v in values if v is not None]
            row.append(fmt(*mean_std(values)) if values else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def paired_table(grid, setting, metrics, seeds, results) -> list[str]:
    lines = [
        "| peer | metric | shared seeds | VISReg − peer per seed | mean | verdict |",
        "|---|---|---|---|---:|---|",
    ]
    for key in planned(grid, "methods"):
        method = grid["methods"][key]
        if key == REFERENCE_METHOD:
            continue
        for metric in metrics:
            shared = [
                s
                for s in seeds
                if Cell(setting, key, s) in results and Cell(setting, REFERENCE_METHOD, s) in results
            ]
            if not shared:
                lines.append(f"| {method['label']} | {metric.label} | none | – | – | not comparable yet |")
                continue
            ref = [metric.value(results[Cell(setting, REFERENCE_METHOD, s)]) for s in shared]
            peer = [metric.value(results[Cell(setting, key, s)]) for s in shared]
            diffs = [a - b for a, b in zip(ref, peer)]
            spreads = [mean_std(ref)[1], mean_std(peer)[1]]
            spread = None if spreads[0] is None else max(spreads)
            per_seed = ", ".join(f"{d:+.2f}" for d in diffs)
            mean = sum(diffs) / len(diffs)
            lines.append(
                f"| {method['label']} | {metric.label} | {', '.join(map(str, shared))} | {per_seed} | "
                f"{mean:+.2f} | {verdict(diffs, spread, method['label'])} |"
            )
    return lines


def status_table(grid, seeds, status) -> list[str]:
    lines = ["| setting | method | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines.append("|---|---|" + "---|" * len(seeds))
    for setting in planned(grid, "settings"):
        for key in planned(grid, "methods"):
            method = grid["methods"][key]
            cells = [status[Cell(setting, key, s)] for s in seeds]
            lines.append(f"| {setting} | {method['label']} | " + " | ".join(cells) + " |")
    return lines


def render(root: Path, seeds: list[int] | None = None) -> str:
    """The whole markdown block for the grid in ``root``."""
    grid = json.loads((root / "grid.json").read_text(encoding="utf-8"))
    seeds = sorted(set(seeds or planned(grid, "seeds")) | set(seeds_on_disk(root)))
    status, results = collect(root, grid, seeds)
    done = sum(v == "done" for v in status.values())
    out = [
        f"Grid `{root.name}`: {done} of {len(status)} cells done (seeds {', '.join(map(str, seeds))}); "
        f"budget {grid['steps']} steps at batch {grid['global_batch_size']} "
        f"({grid['epochs_of_balanced_set']:g} passes over the {grid['train_images']:,} balanced images) "
        "for every cell. Only finished cells (training and evaluation both done) enter the numbers; "
        "mean ± sample std over the seeds listed.",
        "",
    ]
    for setting in planned(grid, "settings"):
        spec = grid["settings"][setting]
        metrics = BALANCED_METRICS if setting == "balanced" else LT_METRICS
        paired = [m for m in metrics if m.key in PAIRED.get(setting, ("lp",))]
        out += [f"#### {spec['label'].capitalize()}", ""]
        out += method_table(grid, setting, metrics, seeds, results)
        out += ["", f"Paired comparison, {spec['label']} (same seeds):", ""]
        out += paired_table(grid, setting, paired, seeds, results)
        out.append("")
    out += ["#### Cell status", "", *status_table(grid, seeds, status)]
    return "\n".join(out) + "\n"


def update_file(path: Path, block: str) -> None:
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {path} has no {BEGIN} ... {END} markers; add them where the tables go")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{block}{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, nargs="?", default=Path("runs/compare-v2"))
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to expect beyond those the runs planned")
    parser.add_argument("--update", type=Path, help="markdown file whose compare markers get the tables")
    args = parser.parse_args(argv)
    if not (args.root / "grid.json").is_file():
        print(
            f"error: {args.root} has no grid.json; run training/experiments/compare.py first", file=sys.stderr
        )
        return 2
    block = render(args.root, args.seeds)
    if args.update:
        update_file(args.update, block)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
