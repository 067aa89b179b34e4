"""OOD suite: the probe numbers against an independent recomputation on the committed real miniature,
the label rules against closed forms and hand-built files, and the committed split's integrity."""

from __future__ import annotations

import gzip
import json
import struct
from collections import Counter

import numpy as np
import pytest

from tests.fixtures_models import tiny_encoder
from tests.training.helpers import REPO, single_thread  # noqa: F401
from training import evaluate, ood, ood_data, sources

MINI = REPO / "tests" / "fixtures" / "ood_mini"


@pytest.fixture(autouse=True)
def single_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def reference_probe(x_train, y_train, x_test, y_test, c):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(x_train), y_train)
    return 100.0 * (model.predict(scaler.transform(x_test)) == y_test).mean()


def test_suite_on_the_miniature_matches_an_independent_probe(tmp_path):
    folder = tmp_path / "model"
    model = tiny_encoder(seed=3)
    model.save_pretrained(folder)
    out = tmp_path / "ood.json"
    argv = ["--suite", "ood", str(folder), "--ood-manifest", str(MINI / "manifest.json"),
            "--ood-root", str(MINI), "--out", str(out)]  # fmt: skip
    assert evaluate.main(argv) == 0
    results = json.loads(out.read_text())
    manifest = json.loads((MINI / "manifest.json").read_text())
    assert set(results["datasets"]) == set(manifest["datasets"]) == set(ood_data.DATASETS)
    for name, entry in manifest["datasets"].items():
        got = results["datasets"][name]
        classes = {c: i for i, c in enumerate(entry["classes"])}
        split = {s: [r for r in entry["items"] if r[2] == s] for s in ("train", "test")}
        x = {s: model.encode([str(MINI / r[0]) for r in rows], normalize=False, convert_to_numpy=True)
             for s, rows in split.items()}  # fmt: skip
        y = {s: np.array([classes[r[1]] for r in rows]) for s, rows in split.items()}
        assert (got["num_train"], got["num_test"]) == (len(y["train"]), len(y["test"])) == (12, 6)
        expected = reference_probe(x["train"], y["train"], x["test"], y["test"], got["best_c"])
        assert got["accuracy"] == pytest.approx(expected)
        assert got["majority_class_accuracy"] == pytest.approx(100 / 3)  # balanced miniature
    assert results["average"] == pytest.approx(np.mean([r["accuracy"] for r in results["datasets"].values()]))
    assert "| medical | 3 | 12 / 6 |" in out.with_suffix(".md").read_text()

    # raw pixels through the same suite, one dataset; and the combined table holds both runs' averages
    pixels = ood.run_suite("pixels", MINI / "manifest.json", MINI, datasets=["satellite"])
    assert pixels["datasets"]["satellite"]["embedding_dim"] == 768
    table = ood.combined_table([results, pixels])
    assert f"| {results['average']:.1f} |" in table and "| – |" in table
    with pytest.raises(ood.ConfigError, match="unknown OOD dataset"):
        ood.run_suite("pixels", MINI / "manifest.json", MINI, datasets=["galaxy10"])


def test_timm_backend_reads_a_timm_folder(tmp_path):
    folder = tmp_path / "model"
    tiny_encoder(seed=1).save_pretrained(folder)  # the hub format doubles as a timm local-dir
    result = ood.run_suite(f"timm:local-dir:{folder}", MINI / "manifest.json", MINI, datasets=["textures"])
    assert result["label"].startswith("timm local-dir:")
    assert result["datasets"]["textures"]["num_test"] == 6


def qstring(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">I", 0xFFFFFFFF)
    data = text.encode("utf-16-be")
    return struct.pack(">I", len(data)) + data


def dso_record(kind: int, messier: int, ngc: int) -> bytes:
    """One catalogue record in Stellarium's Nebula::readDSO field order."""
    out = struct.pack(">I", 7) + struct.pack(">4d", 1.0, 0.5, 9.0, 8.5) + struct.pack(">I", kind)
    out += qstring("SA(s)b") + struct.pack(">2dI", 3.0, 1.0, 45) + struct.pack(">6d", *[0.0] * 6)
    numbers = dict.fromkeys(ood_data._NUMBERED, 0) | {"NGC": ngc, "M": messier}
    out += b"".join(struct.pack(">I", numbers[n]) for n in ood_data._NUMBERED)
    out += qstring(None) + struct.pack(">2I", 0, 0) + b"".join(qstring("") for _ in range(7))
    return out + struct.pack(">5I", 0, 0, 0, 0, 0)


def test_label_rules():
    catalogue = qstring("3.16") + qstring("standard") + dso_record(0, 31, 224) + dso_record(7, 13, 6205)
    records = ood_data.read_dso_catalog(catalogue)
    assert [(r["type"], r["M"], r["NGC"]) for r in records] == [(0, 31, 224), (7, 13, 6205)]
    assert ood_data.DSO_GROUPS[0] == "galaxy" and ood_data.DSO_GROUPS[7] == "globular cluster"

    # equirectangular 2700-row map: row 0 is 90 N; a tile's label is the zone of its centre row
    assert ood_data.tile_latitude(0) == pytest.approx(90 - 32 * 180 / 2700)
    assert ood_data.tile_latitude(1318) == pytest.approx(0.0, abs=0.1)
    zones = [ood_data.climate_zone(lat) for lat in (80, 45, 10, -10, -30, -70)]
    assert zones == [
        "north polar",
        "north temperate",
        "tropical",
        "tropical",
        "south temperate",
        "south polar",
    ]

    names = "1 Precentral_L 2001\n2 Precentral_R 2002\n29 Insula_L 3001\n91 Cerebelum_Crus1_L 9001\n"
    assert ood_data.aal_lobes(names) == {1: ("frontal", "L"), 2: ("frontal", "R"), 91: ("cerebellum", "L")}


def test_nifti_reader(tmp_path):
    volume = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 2, 3, 4, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 2, 8)
    struct.pack_into("<f", header, 108, 352.0)
    path = tmp_path / "v.nii.gz"
    path.write_bytes(gzip.compress(bytes(header) + volume.tobytes(order="F")))
    assert np.array_equal(ood_data.read_nifti(path), volume)


def test_split_is_seeded_stratified_and_capped(tmp_path):
    from PIL import Image

    items = []
    for label, count in (("a", 100), ("b", 20), ("c", 5)):
        for i in range(count):
            path = tmp_path / f"{label}{i}.png"
            Image.new("RGB", (4, 4)).save(path)
            items.append(ood_data.Labelled(path, label))
    rows = ood_data.split_items(items, seed=0)
    assert rows == ood_data.split_items(list(reversed(items)), seed=0)  # order-independent, seeded
    counts = Counter((item.label, split) for item, split in rows)
    assert counts == {("a", "train"): 56, ("a", "test"): 24, ("b", "train"): 14, ("b", "test"): 6}


def test_committed_manifest_is_a_clean_split():
    manifest = ood.load_manifest(ood_data.MANIFEST)
    for name, entry in manifest["datasets"].items():
        assert entry["label"] and entry["packages"]
        for package, info in entry["packages"].items():
            assert info["version"] == sources.PACKAGES[package].version
        paths = Counter(row[0] for row in entry["items"])
        assert max(paths.values()) == 1  # no image in both splits (or twice)
        per_class = Counter((row[1], row[2]) for row in entry["items"])
        for label in entry["classes"]:
            assert per_class[(label, "test")] >= 2 and per_class[(label, "train")] >= 5, (name, label)
    medical = manifest["datasets"]["medical"]["items"]
    assert {row[0].rsplit("/", 1)[1][0] + row[2] for row in medical} == {"Ltrain", "Rtest"}


def test_seen_in_training_counts_the_test_images_a_split_trains_on(monkeypatch):
    root = REPO / "tests" / "fixtures" / "sources"
    monkeypatch.setenv(sources.SOURCES_ENV, str(root))
    names = ["endless_sky", "tuxpaint", "openclipart"]
    items = {name: sources.list_source(name) for name in names}
    split = sources.make_split(items, 0.5, min_class_size=1, max_test_per_class=None, seed=3)
    keys = sources.training_keys(split, names=names)
    # independently: every listed file that the split does not hold out (the resolved path, as a key)
    held_out = {k for entry in split["sources"].values() for k in entry["test"]}
    listed = {p.resolve().relative_to(root.resolve()).as_posix() for its in items.values() for p in
              (i.path for i in its)}  # fmt: skip
    assert keys == listed - held_out and held_out and keys
    trained, unseen = sorted(keys)[:2], sorted(held_out)[:1]
    manifest = {"datasets": {
        "a": {"items": [[trained[0], "x", "test"], [trained[1], "y", "test"], [unseen[0], "x", "test"],
                        ["derived/other.png", "y", "test"], [trained[0], "x", "train"]]},
        "b": {"items": [[unseen[0], "x", "test"]]},
    }}  # fmt: skip
    seen = ood.seen_in_training(manifest, keys)
    assert seen == {"a": {"seen": 2, "test": 4}, "b": {"seen": 0, "test": 1}}
    table = ood.seen_table("m", seen)
    assert "| m | 50 % (2/4) | 0 % (0/1) |" in table
