"""The GPU suite's dry run: every section runs end to end at tiny sizes on the CPU, so the script cannot rot.

The numbers of a dry run mean nothing; what is checked is that every promised measurement is present,
was taken (or says exactly why not: no official checkout, no serve benchmark), and that the markdown and
JSON outputs agree.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_NOT_MEASURED = ("official code not found", "no official checkout", "no serve benchmark", "dry run")


def _suite():
    path = ROOT / "benchmarks" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("_gpu_suite_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_dry_run_measures_every_section(tmp_path):
    suite = _suite()
    # no official checkout here, so the peer rows must say so (CI has none either)
    out, no_checkout = str(tmp_path / "out"), str(tmp_path / "none")
    result = suite.main(["--dry-run", "--out", out, "--official-repo", no_checkout])
    saved = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert saved["rows"] == result["rows"] and saved["dry_run"] is True
    sections = {row["section"] for row in saved["rows"]}
    assert sections == {"loss", "train", "encode", "onnx", "serve"}
    for row in saved["rows"]:
        status = row["status"]
        assert status == "measured" or (
            status.startswith("not measured") and any(reason in status for reason in ALLOWED_NOT_MEASURED)
        ), row
        if row["ours"] is not None:
            assert math.isfinite(row["ours"]) and row["ours"] > 0, row
        if row["ratio"] is not None:  # a ratio is exactly the two measured rates' quotient
            assert row["peer"] > 0 and math.isfinite(row["ratio"]) and row["ratio"] > 0
    measured = {row["section"] for row in saved["rows"] if row["status"] == "measured"}
    assert {"encode", "onnx"} <= measured  # peers that need no checkout are always compared
    # ours was timed in the loss and train sections even without the official peer
    assert all(row["ours"] for row in saved["rows"] if row["section"] in ("loss", "train"))
    markdown = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert markdown.startswith("## GPU suite (dry run")
    assert markdown.count("\n| ") == len(saved["rows"]) + 1  # header + one table row per JSON row


def test_sections_runs_only_the_named_sections(tmp_path, capsys):
    suite = _suite()
    # the loss section: the cheapest (the onnx section exports a model, 18 s here, and the dry run of
    # every section above already covers it)
    result = suite.main(["--dry-run", "--out", str(tmp_path / "out"), "--sections", "loss"])
    assert {row["section"] for row in result["rows"]} == {"loss"}
    assert set(result["seconds"]) == {"loss", "total"}
    with pytest.raises(SystemExit):
        suite.main(["--dry-run", "--out", str(tmp_path / "bad"), "--sections", "onnx,speed"])
    assert "--sections: unknown ['speed']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything ran


def test_larger_loss_blocks_change_speed_only(tmp_path):
    """The GPU-only row times ours with 16x blocks: same loss and gradients, sizes restored afterwards."""
    from visreg_hub.losses import VISRegLoss, _numerics, sort_shape

    suite = _suite()
    before = (_numerics.TEMPORARY_ELEMENTS, sort_shape._CHUNK_ELEMENTS, sort_shape._SORT_BLOCK_ELEMENTS)
    torch.manual_seed(0)
    views = torch.randn(2, 96, 48, dtype=torch.float64, requires_grad=True)

    def loss_and_grad(tiny: bool):
        # blocks of a few rows, so that the 16x scale changes how the work is split
        with contextlib.ExitStack() as stack:
            if tiny:
                for module, name in [(_numerics, "TEMPORARY_ELEMENTS"), (sort_shape, "_CHUNK_ELEMENTS")]:
                    stack.enter_context(pytest.MonkeyPatch.context()).setattr(module, name, 96 * 48)
                stack.enter_context(pytest.MonkeyPatch.context()).setattr(
                    sort_shape, "_SORT_BLOCK_ELEMENTS", 96 * 4
                )
            torch.manual_seed(1)  # a fresh loss per call: the same random directions for both
            loss = VISRegLoss(num_slices=64, reg_weight=0.9)(views).total
            (grad,) = torch.autograd.grad(loss, views)
        return loss.detach(), grad

    small_loss, small_grad = loss_and_grad(tiny=True)
    with suite._loss_chunks(16):
        scaled = (_numerics.TEMPORARY_ELEMENTS, sort_shape._CHUNK_ELEMENTS, sort_shape._SORT_BLOCK_ELEMENTS)
        large_loss, large_grad = loss_and_grad(tiny=False)
    assert scaled == tuple(16 * value for value in before)
    assert before == (
        _numerics.TEMPORARY_ELEMENTS,
        sort_shape._CHUNK_ELEMENTS,
        sort_shape._SORT_BLOCK_ELEMENTS,
    )
    torch.testing.assert_close(large_loss, small_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(large_grad, small_grad, rtol=1e-10, atol=1e-12)
