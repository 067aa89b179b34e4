"""Frozen-feature evaluation of any ``from_pretrained`` model: kNN, linear probe, few-shot, long-tail groups.

    python training/evaluate.py runs/fmnist-tiny-cpu/final --data fmnist
    python training/evaluate.py org/model --data folder --train /data/train --test /data/test --out eval.json
    python training/evaluate.py MODEL --data npz --train tests/fixtures/fmnist_train_500.npz \\
        --test tests/fixtures/fmnist_test_200.npz --few-shot 1 5 --seeds 3

Protocol:

* Images go through the model's own preprocessing and the library's embedding pipeline (``model.encode``,
  :mod:`visreg_hub.inference.pipeline`); features (``--pooling``, default the model's) are computed once
  for the train and test splits and reused by every evaluation below.
* kNN (DINO): cosine similarity, k in ``--knn-k`` (10, 20, 200), votes weighted by exp(sim / 0.07).
* Linear probe: standardised features, multinomial logistic regression; the inverse regularisation C is
  chosen on a stratified validation split carved from the training split (``--val-fraction``), then the
  probe is refit on the whole training split and scored once on the test split. The test split is never
  used for any choice. ``--probe-pooling TAP ...`` offers the probe several feature taps (e.g. ``cls
  cls_last4``, as DINO chooses how many blocks' CLS tokens to concatenate): tap and C are chosen together on
  the same validation split.
* Few-shot (``--few-shot N ...``): N training images per class, ``--seeds`` draws; C is chosen on a
  disjoint sample of max(N, 5) images per class from the rest of the training split (so a "1-shot" result
  has seen 6 labels per class: 1 to fit, 5 to choose C; the report says so). Mean and sample std over
  draws are reported.
* Long-tailed (``--long-tail-ratio R``): the training split is subsampled as in training
  (:func:`training.data.long_tail_indices`), the test split stays balanced, and accuracies are also
  reported per class group (many > 100 / medium / few < 20 training images, scaled for small sets).

Writes JSON (``--out``) and a markdown table (``--markdown``, default next to the JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import FMNIST_DIR, LongTailSection
from visreg_hub.argtypes import float_range, int_range
from visreg_hub.errors import ConfigError, ImageDecodeError, VisregHubError
from visreg_hub.models.config import POOLINGS
from visreg_hub.retrieval.metrics import PROBE_CS, PROBE_VAL_FRACTION, fit_quietly, probe_classifier, select_c
from visreg_hub.retrieval.metrics import linear_probe as retrieval_linear_probe

logger = logging.getLogger("training.evaluate")

DEFAULT_CS = PROBE_CS  # the library's linear_probe defaults: one protocol, one number


# ------------------------------------------------------------------------------------------ data
def load_split(kind: str, path: str | None, split: str) -> tuple[list | np.ndarray, np.ndarray]:
    """Labelled images of one split: (paths or uint8 arrays, int64 labels)."""
    from training.datasets import read_filelist, read_fmnist, read_npz, scan_folder

    if kind == "fmnist":
        return read_fmnist(path or FMNIST_DIR, split)
    if path is None:
        raise ConfigError(f"--{split} is required for --data {kind}")
    if not Path(path).exists():
        raise ConfigError(f"--{split} {path!r} does not exist")
    if kind == "npz":
        items, labels = read_npz(path)
    elif kind == "folder":
        items, labels, _ = scan_folder(path)
    else:
        items, labels, _ = read_filelist(path)
    if labels is None:
        raise ConfigError(f"{path} has no labels; evaluation needs labelled images")
    return items, labels


def extract_features(model, items, batch_size: int, workers: int, pooling: str | None) -> np.ndarray:
    """(N, E) float32 features (not L2-normalised) of ``items``, in order, through ``model.encode``.

    Args:
        model: a loaded :class:`~visreg_hub.models.VISRegEncoder` (its backend is the one it was loaded with).
        items: image paths, or uint8 images (N, H, W[, C]) as one array.
        batch_size, workers: images per forward pass, DataLoader decoding processes.
        pooling: feature tap (None: the model's default).
    """
    images = list(items) if isinstance(items, np.ndarray) else items  # one image per row, not one 3-D image
    return model.encode(
        images, batch_size=batch_size, num_workers=workers, pooling=pooling, normalize=False,
        convert_to_numpy=True, show_progress_bar=False,
    )  # fmt: skip


def embeddable(model, items, labels: np.ndarray, split: str, args: argparse.Namespace):
    """``(features, items, labels)`` of a split at ``args.pooling``: with ``args.on_error == "skip"`` the
    images that cannot be decoded are left out with their labels (logged), as training skips them;
    ``"raise"``: the first one fails the evaluation, naming it.

    Shape:
        features (N', E) float32, labels (N',) for the N' <= N images embedded.
    """
    if args.on_error == "raise":
        try:
            return extract_features(model, items, args.batch_size, args.workers, args.pooling), items, labels
        except ImageDecodeError as exc:  # the library's hint names its keyword; this is a command line
            library_hint = "pass on_error='skip' to embed the others"
            hint = str(exc).replace(library_hint, "pass --on-error skip to leave it out")
            raise ImageDecodeError(f"--{split}: {hint}") from None
    images = list(items) if isinstance(items, np.ndarray) else items
    result = model.encode(
        images, batch_size=args.batch_size, num_workers=args.workers, pooling=args.pooling, normalize=False,
        convert_to_numpy=True, show_progress_bar=False, on_error="skip",
    )  # fmt: skip
    if result.failures:
        failed = {failure.index for failure in result.failures}
        logger.warning("--%s: %d of %d images could not be decoded and are left out with their labels "
                       "(first: %s)", split, len(failed), len(labels), result.failures[0].reason)  # fmt: skip
        kept = np.asarray([i for i in range(len(labels)) if i not in failed], dtype=np.int64)
        items = items[kept] if isinstance(items, np.ndarray) else [items[i] for i in kept]
        labels = labels[kept]
    return result.embeddings, items, labels


# ------------------------------------------------------------------------------------------ probes
def linear_probe(train_x, train_y, test_x, test_y, val_fraction: float, seed: int, cs=DEFAULT_CS) -> dict:
    """Full-data probe (``visreg_hub.retrieval.linear_probe``: C, and the tap when ``train_x`` / ``test_x``
    are ``{tap: features}`` dicts, chosen on a validation split of train, refit, tested once) as the
    percentages of the result records; ``predictions`` is (Q,) for the per-group accuracies."""
    result = retrieval_linear_probe(
        train_x, train_y, test_x, test_y, cs=cs, val_fraction=val_fraction, seed=seed
    )
    record = {
        "accuracy": 100.0 * result.test_accuracy,
        "best_c": result.best_c,
        "val_accuracy": 100.0 * result.val_accuracy,
        "val_accuracies": {str(c): 100.0 * s for c, s in result.val_accuracies.items()},
        "predictions": result.predictions,
    }
    if result.tap is not None:
        record["tap"] = result.tap
        record["tap_val_accuracies"] = {tap: 100.0 * s for tap, s in result.tap_accuracies.items()}
    return record


def few_shot(train_x, train_y, test_x, test_y, shots: list[int], seeds: int, cs=DEFAULT_CS) -> dict:
    """N-per-class probes over ``seeds`` draws; C chosen on a disjoint sample of up to max(N, 5) per class
    (fewer where a class has fewer images left: the results record the smallest count used)."""
    classes = np.unique(train_y)
    results = {}
    for shot in shots:
        runs, fewest_held = [], max(shot, 5)
        for seed in range(seeds):
            rng = np.random.default_rng([seed, shot])
            chosen, held = [], []
            for cls in classes:
                members = rng.permutation(np.flatnonzero(train_y == cls))
                if len(members) < shot + 1:
                    raise ConfigError(
                        f"class {cls} has {len(members)} training images, too few for {shot}-shot"
                    )
                chosen.append(members[:shot])
                held.append(members[shot : shot + max(shot, 5)])
                fewest_held = min(fewest_held, len(held[-1]))
            chosen, held = np.concatenate(chosen), np.concatenate(held)
            best_c, _ = select_c(train_x[chosen], train_y[chosen], train_x[held], train_y[held], cs)
            model = fit_quietly(probe_classifier(best_c), train_x[chosen], train_y[chosen], f"{shot}-shot")
            runs.append(100.0 * float(model.score(test_x, test_y)))
        # the sample std over draws (ddof 1), as every table in docs/results.md reports spreads
        spread = float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0
        results[str(shot)] = {"mean": float(np.mean(runs)), "std": spread, "runs": runs,
                              "c_chosen_on_per_class": fewest_held}  # fmt: skip
    return results


def group_accuracy(predictions: np.ndarray, labels: np.ndarray, groups: dict[int, str]) -> dict[str, float]:
    """Accuracy (%) over test images of the classes in each group (many / medium / few)."""
    out = {}
    for group in ("many", "medium", "few"):
        mask = np.isin(labels, [c for c, g in groups.items() if g == group])
        if mask.any():
            out[group] = 100.0 * float((predictions[mask] == labels[mask]).mean())
    return out


# ------------------------------------------------------------------------------------------ report
def to_markdown(results: dict) -> str:
    """A markdown table of every number in ``results``."""
    lines = [
        f"## Frozen-feature evaluation of `{results['model']}`",
        "",
        "| evaluation | accuracy (%) |",
        "|---|---|",
    ]
    for k, acc in results["knn"].items():
        lines.append(f"| kNN k={k} T={results['knn_temperature']} | {acc:.2f} |")
    linear = results["linear"]
    chosen = f"{linear['tap']}, C={linear['best_c']:g}" if "tap" in linear else f"C={linear['best_c']:g}"
    lines.append(f"| linear probe ({chosen} chosen on validation) | {linear['accuracy']:.2f} |")
    for shot, row in results.get("few_shot", {}).items():
        most = max(int(shot), 5)
        held = row.get("c_chosen_on_per_class", most)
        count = f"{held} to {most}" if held < most else f"{held}"  # small classes leave fewer
        lines.append(
            f"| {shot}-shot linear ({len(row['runs'])} seeds; C chosen on {count} more labelled images per "
            f"class) | {row['mean']:.2f} ± {row['std']:.2f} (sample std) |"
        )
    for method, groups in results.get("groups", {}).items():
        for group, acc in groups.items():
            lines.append(f"| {method}, {group}-shot classes | {acc:.2f} |")
    lines += [
        "",
        f"Data: {results['data']}; {results['num_train']} train / {results['num_test']} test images.",
    ]
    lines.append(f"Command: `{results['command']}`")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "model",
        help="registry name, org/repo or a folder written by save_pretrained; with --suite ood also "
        "timm:NAME, untrained:NAME, pixels or efficientnet-lite0 (see training/ood.py)",
    )
    parser.add_argument(
        "--suite", choices=("standard", "ood"), default="standard",
        help="standard: the --data evaluation below; ood: linear probes on the offline OOD datasets",
    )  # fmt: skip
    parser.add_argument(
        "--ood-manifest", default=None, help="OOD split (default training/splits/ood-v1.json)"
    )
    parser.add_argument(
        "--ood-root", help="folder the manifest's paths are relative to (default: sources cache)"
    )
    parser.add_argument("--datasets", nargs="+", help="OOD datasets to run (default: all in the manifest)")
    parser.add_argument("--data", choices=("fmnist", "npz", "folder", "filelist"), default="fmnist")
    parser.add_argument("--train", help="training split (folder, file list or .npz); fmnist: the idx folder")
    parser.add_argument("--test", help="test split (folder, file list or .npz)")
    parser.add_argument("--pooling", choices=POOLINGS, help="feature tap (default: the model's)")
    parser.add_argument(
        "--probe-pooling", nargs="+", metavar="TAP", choices=POOLINGS,
        help="feature taps the linear probe chooses from on validation (default: --pooling only)",
    )  # fmt: skip
    parser.add_argument("--knn-k", type=int_range(1), nargs="+", default=[10, 20, 200])
    parser.add_argument("--temperature", type=float_range(0, low_open=True), default=0.07)
    parser.add_argument(
        "--val-fraction", type=float_range(0, 1, low_open=True, high_open=True), default=PROBE_VAL_FRACTION
    )
    parser.add_argument("--few-shot", type=int_range(1), nargs="*", default=[])
    parser.add_argument("--seeds", type=int_range(1), default=3)
    parser.add_argument(
        "--long-tail-ratio", type=float_range(1), help="subsample train long-tailed (n_max / n_min >= 1)"
    )
    parser.add_argument("--long-tail-profile", choices=("pareto", "exponential"), default="pareto")
    parser.add_argument(
        "--long-tail-max", type=int_range(1), help="images of the head class (default: smallest class)"
    )
    parser.add_argument("--long-tail-seed", type=int_range(0), default=0)
    parser.add_argument("--batch-size", type=int_range(1), default=256)
    parser.add_argument(
        "--on-error", choices=("raise", "skip"), default="raise",
        help="an image that cannot be decoded: stop, naming it (raise), or leave it and its label out (skip)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int_range(0), default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--markdown", type=Path, help="markdown table (default: --out with .md)")
    args = parser.parse_args(argv)
    table = args.markdown or (args.out.with_suffix(".md") if args.out is not None else None)
    if args.out is not None and table.resolve() == args.out.resolve():
        parser.error("--markdown must differ from --out (the table would overwrite the JSON results)")
    return args


def knn_ks_used(requested: list[int], bank_size: int) -> list[int]:
    """The kNN k values to run and report: each requested k clipped to the ``bank_size`` training
    images, once each. The results are labelled with the k actually used, never with a requested k
    that the bank cannot hold (a "k=200" column holding k=10 numbers would be read as k=200)."""
    used = list(dict.fromkeys(min(k, bank_size) for k in requested))
    clipped = [k for k in requested if k > bank_size]
    if clipped:
        logger.warning("kNN k=%s exceed the %d training images; reporting k=%d instead (pass --knn-k "
                       "at most %d to silence this)", ",".join(map(str, clipped)), bank_size, bank_size,
                       bank_size)  # fmt: skip
    return used


def evaluate(args: argparse.Namespace) -> dict:
    """Run every evaluation ``args`` asks for and return the results dict (see module docstring)."""
    from training.data import long_tail_indices
    from visreg_hub.devices import default_device
    from visreg_hub.hub import from_pretrained
    from visreg_hub.retrieval.metrics import knn_accuracy

    device = default_device(args.device)
    model = from_pretrained(args.model, device=device)
    started = time.perf_counter()
    train_items, train_y = load_split(args.data, args.train, "train")
    test_items, test_y = load_split(args.data, args.test, "test")
    groups = None
    if args.long_tail_ratio:
        spec = LongTailSection(
            enabled=True, profile=args.long_tail_profile, imbalance_ratio=args.long_tail_ratio,
            max_per_class=args.long_tail_max, seed=args.long_tail_seed,
        )  # fmt: skip
        kept, info = long_tail_indices(train_y, spec)
        train_items = (
            train_items[kept] if isinstance(train_items, np.ndarray) else [train_items[i] for i in kept]
        )
        train_y, groups = train_y[kept], info.groups
    train_x, train_items, train_y = embeddable(model, train_items, train_y, "train", args)
    test_x, test_items, test_y = embeddable(model, test_items, test_y, "test", args)
    logger.info(
        "features: train %s, test %s (%.1f s)", train_x.shape, test_x.shape, time.perf_counter() - started
    )

    results: dict = {
        "model": str(args.model),
        "data": args.data if args.data == "fmnist" else f"{args.data}: {args.train} / {args.test}",
        "num_train": len(train_y),
        "num_test": len(test_y),
        "embedding_dim": int(train_x.shape[1]),
        "pooling": args.pooling or model.config.pooling,
        "knn_temperature": args.temperature,
        "command": args.command,
    }
    knn_ks = knn_ks_used(args.knn_k, len(train_y))
    results["knn"] = {
        str(k): 100.0 * knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=args.temperature)
        for k in knn_ks
    }
    if knn_ks != list(dict.fromkeys(args.knn_k)):
        results["knn_k_requested"] = list(args.knn_k)  # provenance: the command asked for these
    if args.probe_pooling:
        knn_tap = args.pooling or model.config.pooling
        probe_train, probe_test = {}, {}
        for tap in dict.fromkeys(args.probe_pooling):  # each tap once, in the order given
            reuse = tap == knn_tap
            probe_train[tap] = train_x if reuse else extract_features(model, train_items, args.batch_size,
                                                                      args.workers, tap)  # fmt: skip
            probe_test[tap] = test_x if reuse else extract_features(model, test_items, args.batch_size,
                                                                    args.workers, tap)  # fmt: skip
        linear = linear_probe(probe_train, train_y, probe_test, test_y, args.val_fraction, seed=0)
    else:
        linear = linear_probe(train_x, train_y, test_x, test_y, args.val_fraction, seed=0)
    predictions = linear.pop("predictions")
    results["linear"] = linear
    if args.few_shot:
        results["few_shot"] = few_shot(train_x, train_y, test_x, test_y, args.few_shot, args.seeds)
    if groups is not None:
        from visreg_hub.retrieval.metrics import knn_predict

        knn_k = 20 if 20 in knn_ks else knn_ks[0]
        knn_predictions = knn_predict(train_x, train_y, test_x, k=knn_k, temperature=args.temperature)
        results["train_class_counts"] = {str(c): int((train_y == c).sum()) for c in np.unique(train_y)}
        results["groups"] = {
            "linear probe": group_accuracy(predictions, test_y, groups),
            f"kNN k={knn_k}": group_accuracy(knn_predictions, test_y, groups),
        }
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from training.publish import published_command

    args.command = published_command("training/evaluate.py", sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.suite == "ood":
            from training import ood, ood_data

            device = args.device or "cpu"
            results = ood.run_suite(args.model, args.ood_manifest or ood_data.MANIFEST, args.ood_root,
                                    args.datasets, batch_size=args.batch_size, device=device)  # fmt: skip
            results["command"] = args.command
            table = ood.to_markdown(results)
        else:
            results = evaluate(args)
            table = to_markdown(results)
    except (VisregHubError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (args.markdown or args.out.with_suffix(".md")).write_text(table, encoding="utf-8")
    elif args.markdown is not None:
        args.markdown.write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
