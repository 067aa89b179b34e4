"""docs/results.md's fixture row is recomputed here, so the published numbers cannot silently rot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training import model_table as mt
from visreg_hub import from_pretrained

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def _weighted_knn_float64(train_x, train_y, test_x, test_y, k=20, temperature=0.07) -> float:
    """Independent reference: DINO-weighted kNN in float64 numpy."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    b = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    similarity = b.astype(np.float64) @ a.astype(np.float64).T
    hits = 0
    for row, truth in zip(similarity, test_y):
        top = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(int(train_y.max()) + 1)
        np.add.at(votes, train_y[top], np.exp(row[top] / temperature))
        hits += int(np.argmax(votes) == truth)
    return 100.0 * hits / len(test_y)


def test_fixture_row_in_docs_matches_a_recomputation():
    row = mt.parse_fixture_row((REPO / "docs" / "results.md").read_text())
    recomputed = mt.fixture_row(from_pretrained(row["model"]), FIXTURES)
    assert (recomputed["n_train"], recomputed["n_test"]) == (row["n_train"], row["n_test"])
    # one test image is 0.5 points: allow a single flipped near-tie from float rounding, nothing more
    assert recomputed["model_knn"] == pytest.approx(row["model_knn"], abs=0.51)
    assert recomputed["raw_knn"] == pytest.approx(row["raw_knn"], abs=0.51)
    train, test = np.load(FIXTURES / "fmnist_train_500.npz"), np.load(FIXTURES / "fmnist_test_200.npz")
    raw = _weighted_knn_float64(mt.raw_pixel_features(train["images"]), train["labels"],
                                mt.raw_pixel_features(test["images"]), test["labels"])  # fmt: skip
    assert raw == pytest.approx(row["raw_knn"], abs=0.51)


def test_section_replacement_keeps_the_rest_of_the_document():
    doc = "# Results\n\nintro\n"
    once = mt.replace_section(doc, "model-table", "A")
    twice = mt.replace_section(once + "\n## later section\n", "model-table", "B")
    assert once.startswith(doc.rstrip()) and "A" in once
    assert "B" in twice and "A" not in twice.split("intro")[1] and twice.endswith("## later section\n")
    with pytest.raises(ValueError, match=r"model_table\.py"):
        mt.parse_fixture_row(doc)


def test_fmnist_rows_knn_on_the_default_pooling_and_probe_over_every_tap():
    """On the committed fixtures: kNN equals the float64 reference on ``encode()``'s default output; the
    linear probe offers every tap the depth allows and reports the one it chose, whose own probe (same
    split, same C grid) reproduces the row."""
    pytest.importorskip("sklearn")
    from visreg_hub.retrieval import linear_probe

    model = from_pretrained("vit-mini-p7-fmnist", backend="torch")  # no ONNX export per tap: faster here
    train, test = np.load(FIXTURES / "fmnist_train_500.npz"), np.load(FIXTURES / "fmnist_test_200.npz")
    pair = ((train["images"], train["labels"]), (test["images"], test["labels"]))
    cs = (0.1, 1.0)  # the table's grid minus its slow ends: the plumbing is under test here
    rows = mt.fmnist_rows({"ours": model}, *pair, ks=(20,), cs=cs)
    assert mt.feature_taps(model)[0] == model.config.pooling
    assert sorted(mt.feature_taps(model)) == sorted(["cls", "cls_last2", "cls_last4", "mean_patch"])

    ours, pixels = rows["ours"], rows["raw pixels (784-d)"]
    default = model.encode(list(train["images"]), normalize=False, convert_to_numpy=True)
    queries = model.encode(list(test["images"]), normalize=False, convert_to_numpy=True)
    assert ours["dim"] == default.shape[1]
    reference = _weighted_knn_float64(default, train["labels"], queries, test["labels"])
    assert ours["knn@20"] == pytest.approx(reference, abs=0.51)

    assert ours["linear_tap"] in mt.feature_taps(model) and pixels["linear_tap"] == "pixels"
    tap_train = model.encode(list(train["images"]), pooling=ours["linear_tap"], normalize=False,
                             convert_to_numpy=True)  # fmt: skip
    tap_test = model.encode(list(test["images"]), pooling=ours["linear_tap"], normalize=False,
                            convert_to_numpy=True)  # fmt: skip
    alone = linear_probe(tap_train, train["labels"], tap_test, test["labels"], cs=cs,
                         val_fraction=0.1, seed=0)  # fmt: skip
    assert ours["linear_dim"] == tap_train.shape[1] and ours["linear_c"] == alone.best_c
    assert ours["linear"] == pytest.approx(100 * alone.test_accuracy)


def test_recomputing_one_part_keeps_the_other_parts_dates(tmp_path, monkeypatch):
    """``--parts fixture`` stamped the whole table (fmnist numbers from another day and machine) with
    today's date and this machine; each part now keeps its own date, device and torch."""
    import datetime
    import importlib.util
    import json

    import torch

    spec = importlib.util.spec_from_file_location("model_table_script", REPO / "scripts" / "model_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    table, doc = tmp_path / "model_table.json", tmp_path / "results.md"
    old_meta = {"date": "2020-01-02", "torch": "0.1", "device": "CPU (x86_64, 2 threads)", "command": "x"}
    table.write_text(json.dumps({"meta": old_meta, "fmnist": {"rows": {}, "data": "Fashion-MNIST"},
                                 "fixture": {"model": "old"}}))  # fmt: skip
    doc.write_text("# Results\n")
    fixture = {"model": "vit-mini-p7-fmnist", "n_train": 500, "n_test": 200, "model_knn": 1.0, "raw_knn": 2.0}
    monkeypatch.setattr(script, "JSON_PATH", table)
    monkeypatch.setattr(script, "DOC_PATH", doc)
    monkeypatch.setattr(script, "run_fixture", lambda: fixture)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)

    script.main(["--parts", "fixture"])
    stamps = json.loads(table.read_text())["meta"]["parts"]
    assert stamps["fmnist"] == {k: old_meta[k] for k in ("date", "torch", "device")}  # not re-dated
    today = datetime.date.today().isoformat()
    assert stamps["fixture"]["date"] == today and stamps["fixture"]["device"].endswith(", 1 thread)")
    text = doc.read_text()
    assert "fmnist 2020-01-02 on CPU (x86_64, 2 threads), torch 0.1" in text
    assert f"fixture {today} on CPU (" in text and "1 threads" not in text

    script.main(["--parts", "fixture"])  # a second run keeps the per-part stamps it wrote
    assert json.loads(table.read_text())["meta"]["parts"]["fmnist"]["date"] == "2020-01-02"
