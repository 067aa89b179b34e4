"""Resuming never unpickles, and a damaged latest checkpoint falls back to the newest intact one.

One real 4-step run writes checkpoints at steps 2 and 4. Each test copies that run folder, damages or
booby-traps it, and resumes. The trap is a pickle whose unpickling creates a marker file (the payload
is proved live by a positive control in a child process); it is planted under every file name a
checkpoint folder holds today or held when accelerate's ``save_state`` wrote it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

from tests.fuzzing import dumps, fuzz_tests, json_values
from tests.training.helpers import REPO, run_script, single_thread, tiny_config, train  # noqa: F401
from training import checkpoint as ckpt
from training.manifest import MANIFEST_FILE, write_manifest
from visreg_hub.errors import CheckpointError

COMMON = ["train.max_steps=4", "train.checkpoint_every=2", "eval.knn_every=0"]
OUR_FILES = [
    "model.safetensors", "probe.safetensors", "training_state.safetensors", "training_state.json",
    "rng_state_0.safetensors", "rng_state_0.json", "trainer_state.json", MANIFEST_FILE,
]  # fmt: skip
ACCELERATE_FILES = [
    "custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "custom_checkpoint_2.pkl",
    "custom_checkpoint_3.pkl",
    "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "scaler.pt", "sampler.bin", "dl_state_dict.bin",
    "pytorch_model.bin", "model.bin", "model_1.safetensors", "optimizer.pt", "state.pkl",
]  # fmt: skip


class _Trap:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff the pickle ran."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_bytes(marker, torch_format: bool) -> bytes:
    if torch_format:  # the zip container torch.save (and so accelerate) writes
        buffer = io.BytesIO()
        torch.save({"state": _Trap(marker)}, buffer)
        return buffer.getvalue()
    return pickle.dumps({"state": _Trap(marker)}, protocol=4)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(tiny_config(folder, *COMMON))
    finally:
        torch.set_num_threads(previous)
    return folder


@pytest.fixture()
def trainer(run_folder, tmp_path):
    """A fresh trainer of the same configuration, to restore checkpoints into."""
    from training.engine import Trainer

    return Trainer(tiny_config(tmp_path / "fresh", *COMMON))


def _copy(run_folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(run_folder, target)
    return target, target / "checkpoints" / "step-00000004"


def _resume(trainer, resume):
    """What the Trainer does on resume: verify, pick, load; returns (folder, notes)."""
    from training.state_io import load_training_state

    folder, names = ckpt.resolve_resume(trainer.checkpoint_root, resume)
    return folder, load_training_state(folder, trainer.parts, 0, names, trainer.plan.steps_by_epoch)


def test_the_planted_pickle_is_live(tmp_path):
    """Positive control: unpickling the traps (in a child process) does create the markers."""
    markers = [tmp_path / "control-pickle", tmp_path / "control-torch"]
    (tmp_path / "trap.pkl").write_bytes(_pickle_bytes(markers[0], torch_format=False))
    (tmp_path / "trap.bin").write_bytes(_pickle_bytes(markers[1], torch_format=True))
    code = "import pickle, sys, torch; pickle.loads(open(sys.argv[1], 'rb').read()); "
    code += "torch.load(sys.argv[2], weights_only=False)"
    args = [sys.executable, "-c", code, str(tmp_path / "trap.pkl"), str(tmp_path / "trap.bin")]
    subprocess.run(args, check=False, capture_output=True)
    assert all(marker.exists() for marker in markers)


def test_checkpoint_holds_no_pickle_and_a_manifest(run_folder):
    folder = run_folder / "checkpoints" / "step-00000004"
    names = {path.name for path in folder.iterdir()}
    assert names == set(OUR_FILES)
    for name in names:
        head = (folder / name).read_bytes()[:2]
        assert head != b"\x80\x04" and not head.startswith(b"PK"), name  # neither pickle nor torch zip
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == names - {MANIFEST_FILE}
    import hashlib

    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


@pytest.mark.parametrize("torch_format", [False, True], ids=["pickle", "torch.save"])
def test_foreign_pickles_next_to_an_intact_checkpoint_are_ignored(
    run_folder, tmp_path, trainer, torch_format
):
    """accelerate's file names (even listed in a rewritten manifest) are never read; resume still exact."""
    output, step4 = _copy(run_folder, tmp_path)
    marker = tmp_path / "PWNED"
    for name in ACCELERATE_FILES:
        (step4 / name).write_bytes(_pickle_bytes(marker, torch_format))
    write_manifest(step4)
    trainer.checkpoint_root = output / "checkpoints"
    folder, notes = _resume(trainer, "auto")
    assert folder == step4 and trainer.state.global_step == 4
    assert any("custom_checkpoint_0.pkl" in note and "never read" in note for note in notes)
    assert not marker.exists()
    from safetensors.torch import load_file

    expected = load_file(str(step4 / "model.safetensors"))
    assert all(torch.equal(expected[k], v) for k, v in trainer.parts.model.state_dict().items())


@pytest.mark.parametrize("name", OUR_FILES)
def test_pickle_in_place_of_a_checkpoint_file_never_runs(run_folder, tmp_path, trainer, name, caplog):
    """Replace one of our files by a pickle. Manifest untouched: the digest check skips step 4 with a
    warning naming the file, and step 2 is used. Manifest rewritten to match (a hostile folder): an
    explicit --resume of step 4 is refused with a CheckpointError (or, for files the loader never reads,
    resumes). The marker never appears."""
    output, step4 = _copy(run_folder, tmp_path)
    marker = tmp_path / "PWNED"
    (step4 / name).write_bytes(_pickle_bytes(marker, torch_format=name.endswith(".safetensors")))
    trainer.checkpoint_root = output / "checkpoints"
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        folder, _ = _resume(trainer, "auto")
    assert folder.name == "step-00000002" and trainer.state.global_step == 2
    assert any(
        name in record.getMessage() and "step-00000004" in record.getMessage() for record in caplog.records
    )

    if name != MANIFEST_FILE:
        write_manifest(step4)
        if name == "trainer_state.json":  # human-readable copy; the loader reads training_state.json
            folder, _ = _resume(trainer, str(step4))
            assert trainer.state.global_step == 4
        else:
            with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
                _resume(trainer, str(step4))
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage", ["truncate", "delete", "bitflip", "garbage_manifest", "no_manifest", "symlink"]
)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    run_folder, tmp_path, trainer, damage, caplog
):
    output, step4 = _copy(run_folder, tmp_path)
    target = step4 / "model.safetensors"
    data = target.read_bytes()
    expected_words = {
        "truncate": "bytes",
        "delete": "missing",
        "bitflip": "sha256",
        "garbage_manifest": "unreadable",
        "no_manifest": "missing",
        "symlink": "not a regular file",
    }[damage]
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        target.unlink()
    elif damage == "bitflip":  # one bit deep inside the tensor data: still valid safetensors
        flipped = bytearray(data)
        flipped[len(data) - 100] ^= 0x01
        target.write_bytes(bytes(flipped))
    elif damage == "garbage_manifest":
        (step4 / MANIFEST_FILE).write_bytes(b"\xff\xfe{" + b"[" * 100_000)
    elif damage == "no_manifest":
        (step4 / MANIFEST_FILE).unlink()
    else:
        target.unlink()
        target.symlink_to(run_folder / "checkpoints" / "step-00000004" / "model.safetensors")
    trainer.checkpoint_root = output / "checkpoints"
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        folder, _ = _resume(trainer, "auto")
    assert folder.name == "step-00000002" and trainer.state.global_step == 2
    warnings = [
        r.getMessage() for r in caplog.records if "skipping checkpoint step-00000004" in r.getMessage()
    ]
    assert len(warnings) == 1 and expected_words in warnings[0]
    with pytest.raises(CheckpointError, match=expected_words):  # an explicit step folder is refused
        _resume(trainer, str(step4))
    # the run folder and the checkpoints folder fall back like --resume auto
    assert _resume(trainer, str(output))[0].name == "step-00000002"


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(run_folder, tmp_path, trainer):
    output, _ = _copy(run_folder, tmp_path)
    for folder in ckpt.complete_checkpoints(output / "checkpoints"):
        (folder / "training_state.json").write_text("{}")
    trainer.checkpoint_root = output / "checkpoints"
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        _resume(trainer, "auto")


def test_pretrain_refuses_a_hostile_checkpoint_in_one_line(run_folder, tmp_path):
    """The real program: a pickle as the optimiser moments, manifest rewritten; exit 1, no traceback."""
    output, step4 = _copy(run_folder, tmp_path)
    shutil.rmtree(output / "checkpoints" / "step-00000002")
    marker = tmp_path / "PWNED"
    (step4 / "training_state.safetensors").write_bytes(_pickle_bytes(marker, torch_format=True))
    write_manifest(step4)
    args = ["--config", str(REPO / "training/configs/fmnist-fixture-cpu.yaml"),
            f"data.path={REPO / 'tests/fixtures/fmnist_train_500.npz'}", f"train.output_dir={output}",
            "train.progress_bar=false", "train.log_with=none", *COMMON, "--resume", "auto"]  # fmt: skip
    result = run_script(args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "training_state.safetensors is not a valid safetensors file" in result.stderr.splitlines()[-1]
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ fuzzing
@st.composite
def _manifests(draw) -> bytes:
    """A valid manifest with 0-2 hostile edits (path-like or dot names, wrong sizes/digests/types, other
    versions), or random JSON."""
    if draw(st.integers(0, 4)) == 0:
        return dumps(draw(json_values))
    record = {"format": "visreg-checkpoint-manifest", "version": 1,
              "files": {"a.bin": {"size": 4, "sha256": _SHA_A}}}  # fmt: skip
    hostile = ["../a.bin", "/etc/passwd", "sub/a.bin", ".a.bin", "x" * 200, "", MANIFEST_FILE, "b.json"]
    for _ in range(draw(st.integers(0, 2))):
        edit = draw(st.sampled_from(("name", "size", "sha", "version", "entry")))
        if edit == "name":
            record["files"][draw(st.sampled_from(hostile) | st.text(max_size=10))] = {
                "size": 4,
                "sha256": _SHA_A,
            }
        elif edit == "size":
            record["files"]["a.bin"]["size"] = draw(st.sampled_from([0, 3, 5, -1, 2**70, True, "4", None]))
        elif edit == "sha":
            record["files"]["a.bin"]["sha256"] = draw(st.sampled_from([_SHA_A.upper(), "0" * 64, "", 7]))
        elif edit == "version":
            record["version"] = draw(st.sampled_from([2, "1", True, None]))
        else:
            record["files"]["a.bin"] = {"size": 4, "sha256": _SHA_A, "extra": draw(json_values)}
    return dumps(record)


_SHA_A = "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"  # sha256(b"abcd")


def _manifest_property(raw: bytes) -> None:
    import hashlib

    from training.manifest import verify_manifest

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "a.bin").write_bytes(b"abcd")
        (folder / "b.json").write_text("{}")
        (folder / MANIFEST_FILE).write_bytes(raw)
        try:
            names = verify_manifest(folder)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            return
        for name in names:  # accepted: every listed file is a plain sibling with the recorded digest
            assert "/" not in name and not name.startswith(".")
            digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
            assert json.loads(raw)["files"][name]["sha256"] == digest


test_manifest_fuzz, test_manifest_fuzz_long = fuzz_tests(_manifests(), _manifest_property)


@pytest.fixture(scope="module")
def fuzz_target(run_folder, tmp_path_factory):
    """A trainer to restore into and a private copy of step 4 whose JSON files the fuzzer rewrites."""
    from training.engine import Trainer

    folder = tmp_path_factory.mktemp("fuzz") / "step-00000004"
    shutil.copytree(run_folder / "checkpoints" / "step-00000004", folder)
    trainer = Trainer(tiny_config(tmp_path_factory.mktemp("fresh"), *COMMON))
    return trainer, folder


def _mutate(value, draw, depth=0):
    """Replace one random leaf or key of a parsed JSON document by a random JSON value."""
    if isinstance(value, dict) and value and depth < 6:
        key = draw(st.sampled_from(sorted(value)))
        if draw(st.integers(0, 5)) == 0:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _mutate(value[key], draw, depth + 1)}
    if isinstance(value, list) and value and depth < 6:
        index = draw(st.integers(0, len(value) - 1))
        return [*value[:index], _mutate(value[index], draw, depth + 1), *value[index + 1 :]]
    return draw(json_values)


@pytest.mark.parametrize("name", ["training_state.json", "rng_state_0.json"])
def test_training_state_json_fuzz(fuzz_target, name):
    """Mutated training_state.json / rng_state_0.json: restored or refused with a CheckpointError."""
    from hypothesis import given

    from tests.fuzzing import FAST
    from training.state_io import load_training_state

    trainer, folder = fuzz_target
    original = json.loads((folder / name).read_text())

    @FAST
    @given(st.data())
    def check(data):
        (folder / name).write_bytes(dumps(_mutate(original, data.draw)))
        try:
            load_training_state(
                folder, trainer.parts, 0, {p.name for p in folder.iterdir()}, trainer.plan.steps_by_epoch
            )
        except CheckpointError as exc:
            assert "\n" not in str(exc)

    try:
        check()
    finally:
        (folder / name).write_text(json.dumps(original))


# ------------------------------------------------------------------ values that pass a type check
def _edit_state(step4, change_json=None, change_tensors=None) -> None:
    from safetensors.torch import load_file, save_file

    if change_json is not None:
        path = step4 / "training_state.json"
        record = json.loads(path.read_text())
        change_json(record)
        path.write_text(json.dumps(record))
    if change_tensors is not None:
        tensors = load_file(step4 / "training_state.safetensors")
        change_tensors(tensors)
        save_file(tensors, str(step4 / "training_state.safetensors"))
    write_manifest(step4)  # as an attacker can: the manifest is integrity, not authenticity


def _hyperparameters(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]


def _group(record, **change):
    record["optimizer"]["param_groups"][0].update(change)


HOSTILE_VALUES = {
    # silently changed training before (exit 0): gradient ascent, a schedule moved to step 10**30, ...
    "maximize": (lambda r: _group(r, maximize=True), None, None),
    "negative-eps": (lambda r: _group(r, eps=-1.0), None, None),
    "other-params": (lambda r: _group(r, params=list(reversed(r["optimizer"]["param_groups"][0]["params"]))),
                     None, "other parameters"),
    "last-epoch": (lambda r: r["scheduler"].update(last_epoch=10**30), None, "last_epoch"),
    # crashed mid-run with a raw error before
    "amsgrad": (lambda r: _group(r, amsgrad=True), None, None),
    "step-in-epoch": (lambda r: r["trainer"].update(step_in_epoch=10**6), None, "step_in_epoch"),
    "epoch": (lambda r: r["trainer"].update(epoch=2**70), None, "trainer.epoch"),
    "0-d-moment": (None, lambda t: t.update({"optimizer.1.exp_avg": torch.zeros(())}), "exp_avg has shape"),
    "missing-moment": (None, lambda t: t.pop("optimizer.1.exp_avg_sq"), "expected exactly"),
    "negative-second-moment": (None, lambda t: t["optimizer.1.exp_avg_sq"].fill_(-1.0), "negative"),
    "matrix-step": (None, lambda t: t.update({"optimizer.1.step": t["optimizer.1.exp_avg"].clone()}),
                    "step must be"),
    # accepted silently before (probe 2): a position the plan does not have, NaN "best", counters out of range
    "global-step": (lambda r: (r["trainer"].update(global_step=11), r["scheduler"].update(last_epoch=11)),
                    None, "inconsistent with this run's data and batch: if train.global_batch_size"),
    "global-step-0": (lambda r: (r["trainer"].update(global_step=0), r["scheduler"].update(last_epoch=0)),
                      None, "global_step is 0"),
    "nan-best": (lambda r: r["trainer"].update(best_metric=float("nan")), None,
                 "best_metric should be a finite"),
    "negative-alarms": (lambda r: r["monitor"].update(collapse_alarms=-5), None,
                        "alarm counters must be >= 0"),
    "huge-counter": (lambda r: r["monitor"].update(consecutive_alarms=10**400), None, "below 2\\*\\*53"),
    "huge-step-count": (lambda r: r["scheduler"].update(_step_count=10**30), None, "below 2\\*\\*53"),
    # probe 6 (F3): raised a bare "step must be a non-negative integer" after the optimiser had loaded
    "loss-step": (lambda r: r["loss"].update(step=-100), None, "training_state.json: loss.step must be"),
    "loss-seed": (lambda r: r["loss"].update(seed=-5), None, "training_state.json: loss.seed must be"),
    # probe 6 (F4): a step count ahead of the run switched off AdamW's bias correction, silently
    "adam-step-ahead": (None, lambda t: t.update({"optimizer.1.step": torch.tensor(1e20)}),
                        "steps but the run only 4"),
    # probe 20: a step moved to the JSON scalars as a 400-digit integer crashed with OverflowError, so
    # --resume auto did not fall back to the previous checkpoint
    "huge-scalar-step": (lambda r: r["optimizer"].update(scalars={"1": {"step": 10**400}}),
                         lambda t: t.pop("optimizer.1.step"), "optimizer.scalars.1.step should be a finite"),
    # a changed setting, not a damaged file: the messages name the setting (probe 4)
    "probe-group": (lambda r: r["optimizer"]["param_groups"].append(dict(r["optimizer"]["param_groups"][1])),
                    None, "resume with the train.online_probe setting"),
}  # fmt: skip


def test_nan_weights_and_a_symlinked_manifest_are_refused(run_folder, tmp_path, trainer):
    """NaN weights used to load and then read as "training diverged ... lower optim.lr"; a manifest.json
    symlinked elsewhere was followed (the files it lists are lstat-checked, it was not)."""
    from safetensors.torch import load_file, save_file

    output, step4 = _copy(run_folder, tmp_path)
    shutil.rmtree(output / "checkpoints" / "step-00000002")
    weights = load_file(step4 / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(step4 / "model.safetensors"))
    write_manifest(step4)
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        _resume(trainer, step4)
    outside = tmp_path / "elsewhere.json"
    (step4 / "manifest.json").rename(outside)
    (step4 / "manifest.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a symlink"):
        _resume(trainer, step4)
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("case", sorted(HOSTILE_VALUES))
def test_well_typed_but_hostile_values_are_refused_or_overridden(run_folder, tmp_path, trainer, case):
    """Each edit keeps every type and key a shallow check looks at. Either it is refused before any
    live object changes, or (for hyperparameters) this run's configuration wins: the restored
    optimiser groups are exactly the fresh trainer's, whatever the file says."""
    change_json, change_tensors, message = HOSTILE_VALUES[case]
    output, step4 = _copy(run_folder, tmp_path)
    shutil.rmtree(output / "checkpoints" / "step-00000002")
    _edit_state(step4, change_json, change_tensors)
    fresh = [
        {k: v for k, v in g.items() if k not in ("params", "lr")} for g in trainer.optimizer.param_groups
    ]
    if message is not None:
        with pytest.raises(CheckpointError, match=message):
            _resume(trainer, step4)
        assert trainer.state.global_step == 0  # nothing restored
        assert not trainer.optimizer.state_dict()["state"]  # not even the optimiser
        return
    _resume(trainer, step4)
    restored = [
        {k: v for k, v in g.items() if k not in ("params", "lr")} for g in trainer.optimizer.param_groups
    ]
    assert restored == fresh and trainer.state.global_step == 4


def test_a_new_learning_rate_on_resume_takes_effect(run_folder, tmp_path):
    """The checkpoint holds moments and position; the lr is this run's: each group's lr after the
    resume is the new base lr times the schedule factor at step 4 (recomputed independently)."""
    from training.build import lr_factor
    from training.engine import Trainer

    output, _ = _copy(run_folder, tmp_path)
    new = Trainer(tiny_config(output, *COMMON, "optim.lr=1e-5"))
    _resume(new, "auto")
    plan = new.plan
    factor = lr_factor(4, plan.warmup_steps, plan.total_steps, new.config.optim.min_lr_ratio)
    backbone = [g for g in new.optimizer.param_groups if g["initial_lr"] == 1e-5]
    assert len(backbone) >= 1  # the probe's group keeps its own optim.probe_lr
    for group in new.optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * factor, rel=1e-12)
    assert new.scheduler.get_last_lr() == [g["lr"] for g in new.optimizer.param_groups]
    assert new.state.global_step == 4


def test_resuming_with_another_loss_names_the_key(run_folder, tmp_path):
    from training.engine import Trainer

    output, _ = _copy(run_folder, tmp_path)
    other = Trainer(tiny_config(output, *COMMON, "loss.name=vicreg"))
    with pytest.raises(CheckpointError, match=r"sliced loss .*resume with the loss.name that wrote it"):
        _resume(other, "auto")


def test_a_refused_resume_leaves_the_runs_config_logs_and_a_new_folder_as_they_were(run_folder, tmp_path):
    """Probe 13: the refusal came after config.yaml had been rewritten with the refused settings (an export
    then used them: another normalisation, wrong embeddings) and a tensorboard run added; a refused
    branch into a new folder left that folder behind, and the corrected retry was refused as "another run"."""
    from training.engine import Trainer

    output, step = _copy(run_folder, tmp_path)
    before = {p.relative_to(output): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}
    refused = tiny_config(output, *COMMON, "loss.name=vicreg", "data.mean=[0.9]", "data.std=[0.1]")
    with pytest.raises(CheckpointError, match=r"was written with loss.name="):
        Trainer(refused, resume="auto")
    after = {p.relative_to(output): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}
    assert after == before  # config.yaml, tensorboard/ and metrics.jsonl untouched
    branch = tmp_path / "branch"
    with pytest.raises(CheckpointError):
        Trainer(tiny_config(branch, *COMMON, "loss.name=vicreg"), resume=str(step))
    assert not branch.exists()
    Trainer(tiny_config(branch, *COMMON), resume=str(step))  # the corrected retry
    assert (branch / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("change", "named"),
    [("loss.name=sigreg", "loss.name='visreg' (now 'sigreg')"), ("data.mean=[0.5]", "data.mean=[0.286]")],
)
def test_a_resume_or_branch_cannot_change_the_objective_or_normalisation(run_folder, tmp_path, change, named):
    """Probe 15: VISReg -> SIGReg (both sliced: the loss state fits) and another data.mean were accepted, and
    the export's card then named the new objective and normalisation for the whole run; a branch into a
    new folder was not even compared (the comparison read the output folder's config.yaml)."""
    from training.engine import Trainer

    output, step = _copy(run_folder, tmp_path)
    for target, resume in ((output, "auto"), (tmp_path / "branch", str(step))):
        with pytest.raises(CheckpointError, match=re.escape(named)):
            Trainer(tiny_config(target, *COMMON, change), resume=resume)


def test_a_resume_past_the_runs_end_is_refused_and_other_changes_are_listed(run_folder, tmp_path, caplog):
    """Probe 15: a step-4 checkpoint resumed with train.max_steps=3 was accepted silently (its export said
    4 steps of a 3-step run); a branch with another lr said nothing at all."""
    from training.engine import Trainer

    output, step = _copy(run_folder, tmp_path)
    (output / "config.yaml").write_text("a: &a [x, x]\nb: &b [*a, *a]\n" + "[: not yaml")  # never read
    with pytest.raises(CheckpointError, match=r"at step 4, past this run's 3 steps; raise train.max_steps"):
        Trainer(tiny_config(output, "train.max_steps=3", "train.checkpoint_every=2", "eval.knn_every=0"),
                resume="auto")  # fmt: skip
    with caplog.at_level("WARNING", logger="training.checks"):
        Trainer(tiny_config(tmp_path / "branch", *COMMON, "optim.lr=0.5"), resume=str(step))
    assert "resuming with changed settings" in caplog.text and "optim.lr: " in caplog.text
    assert "-> 0.5" in caplog.text and "output_dir" not in caplog.text


def test_a_checkpoint_written_before_settings_were_recorded_is_checked_against_its_runs_config(
    run_folder, tmp_path, caplog
):
    """Review 16: checkpoints of the previous version hold no "config": their resume checked nothing (the
    old code at least warned from config.yaml). Now the run folder's config.yaml stands in, read without
    YAML aliases (an alias bomb there is a warning, not gigabytes)."""
    from training.engine import Trainer
    from training.manifest import write_manifest

    output, step = _copy(run_folder, tmp_path)
    state = json.loads((step / "trainer_state.json").read_text())
    del state["config"]
    (step / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(step)  # as the previous version wrote it: consistent, just without the settings
    # config.yaml holds the LAST settings written into the run folder (0.1.0 rewrote it on every resume,
    # and let loss.name change), so it is a warning naming the file, never a refusal (review 17)
    with caplog.at_level("WARNING", logger="training"):
        Trainer(tiny_config(output, *COMMON, "loss.name=sigreg"), resume="auto")
    assert "config.yaml (the run's last settings" in caplog.text
    assert "loss.name='visreg' (now 'sigreg')" in caplog.text
    caplog.clear()
    for damaged in ("a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n", "when: 2026-13-45\n"):
        (output / "config.yaml").write_text(damaged)  # an alias bomb; a date PyYAML refuses (ValueError)
        with caplog.at_level("WARNING", logger="training"):
            Trainer(tiny_config(output, *COMMON, "loss.name=sigreg"), resume="auto")  # not checked: warned
        assert "cannot be read" in caplog.text and "records no settings" in caplog.text


def test_a_planted_step_symlink_is_never_resumed(run_folder, tmp_path, trainer, caplog):
    """A step-* link in a run's checkpoints folder (to another run's newer checkpoint), also named by the
    `latest` pointer, is skipped with a warning: resume auto takes the run's own newest folder. The same
    folder named explicitly with --resume PATH is what the user asked for and still loads."""
    output, _ = _copy(run_folder, tmp_path)
    other, _ = _copy(run_folder, tmp_path / "other")
    checkpoints = output / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000004")
    planted = checkpoints / "step-00000009"
    planted.symlink_to(other / "checkpoints" / "step-00000004", target_is_directory=True)
    ckpt.write_pointer(checkpoints, "latest", planted.name)
    trainer.checkpoint_root = checkpoints
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        folder, _ = _resume(trainer, "auto")
    assert folder == checkpoints / "step-00000002" and trainer.state.global_step == 2
    # once, though a resume lists the checkpoints several times (it was logged four times: probe)
    assert sum("step-00000009: a symlink" in r.getMessage() for r in caplog.records) == 1
    assert [p.name for p in ckpt.complete_checkpoints(checkpoints)] == ["step-00000002"]
    assert ckpt.read_pointer(checkpoints, "latest") is None
    ckpt.prune(checkpoints, keep_last=1)  # pruning neither follows nor deletes the link's target
    assert (other / "checkpoints" / "step-00000004" / "trainer_state.json").is_file()
    assert _resume(trainer, str(planted))[0] == planted and trainer.state.global_step == 4


def test_a_malformed_torch_generator_state_names_the_safetensors_file(run_folder, tmp_path, trainer):
    """Probe 6 (F5): a 10-byte torch CPU state was blamed on rng_state_0.json."""
    from safetensors.torch import save_file

    output, step4 = _copy(run_folder, tmp_path)
    shutil.rmtree(output / "checkpoints" / "step-00000002")
    save_file({"cpu": torch.zeros(10, dtype=torch.uint8)}, str(step4 / "rng_state_0.safetensors"))
    write_manifest(step4)
    with pytest.raises(CheckpointError, match=r"rng_state_0\.safetensors: the torch CPU generator state"):
        _resume(trainer, step4)


def test_only_symlinked_step_folders_are_an_error_not_a_fresh_start(run_folder, tmp_path, trainer):
    """Probe 6 (F2): with every step folder a link, --resume auto started from scratch (exit 0) and a
    leftover .tmp-old-* link was logged as removed but kept. Now: refused like a corrupt checkpoint (and
    not taken for "nothing to resume" by the pre-flight check); stale links are unlinked, targets kept."""
    from training.checks import check_previous_run

    output, _ = _copy(run_folder, tmp_path)
    other, _ = _copy(run_folder, tmp_path / "other")
    checkpoints = output / "checkpoints"
    for name in ("step-00000002", "step-00000004"):
        shutil.rmtree(checkpoints / name)
        (checkpoints / name).symlink_to(other / "checkpoints" / name, target_is_directory=True)
    trainer.checkpoint_root = checkpoints
    message = r"no intact checkpoint .*step-00000002, step-00000004: symlinks"
    with pytest.raises(CheckpointError, match=message):
        _resume(trainer, "auto")
    assert check_previous_run(tiny_config(output, *COMMON), "auto", overwrite=False) == []
    assert trainer.state.global_step == 0
    stale = checkpoints / ".tmp-old-step-00000004"
    (checkpoints / "step-00000004").rename(stale)
    dangling = checkpoints / ".tmp-step-00000006"
    dangling.symlink_to(tmp_path / "nowhere")
    ckpt.remove_stale_temporaries(checkpoints)
    assert not os.path.lexists(stale) and not os.path.lexists(dangling)
    assert (other / "checkpoints" / "step-00000004" / "trainer_state.json").is_file()  # target untouched


def test_a_pickle_renamed_to_safetensors_in_a_checkpoint_is_named_as_one(tmp_path):
    """The training reader said only 'header too large'; the library's reader already named pickles."""
    from training.state_checks import read_tensors
    from visreg_hub.errors import CheckpointError

    planted = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, planted)  # written only: nothing here is ever loaded with torch.load
    with pytest.raises(CheckpointError, match=r"looks like a pickle renamed to \.safetensors"):
        read_tensors(planted)
    garbage = tmp_path / "other.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError) as caught:
        read_tensors(garbage)
    assert "looks like a pickle" not in str(caught.value)


def test_resume_errors_name_a_fix_and_never_show_empty_reasons(run_folder, tmp_path, trainer):
    """Probe 8 (F6): a garbage training_state.safetensors showed safetensors' own words without a fix, and a
    run whose only checkpoint pointer led out of the folder said 'no intact checkpoint ... ()'."""
    output, step4 = _copy(run_folder, tmp_path)
    shutil.rmtree(output / "checkpoints" / "step-00000002")
    header = b'{"x":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,4]}}'
    (step4 / "training_state.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    write_manifest(step4)
    fix = r"not a valid safetensors file .*: resume from another checkpoint"
    with pytest.raises(CheckpointError, match=fix):
        _resume(trainer, step4)
    shutil.rmtree(step4)
    checkpoints = output / "checkpoints"
    (checkpoints / "latest").write_text("../../elsewhere\n")
    trainer.checkpoint_root = checkpoints
    with pytest.raises(CheckpointError, match="no intact checkpoint") as caught:
        _resume(trainer, str(output))
    assert "()" not in str(caught.value)


def test_resume_of_a_missing_path_or_a_pointer_file_says_what_to_pass(run_folder, tmp_path):
    """Probe 10: a typo'd path read "not a complete checkpoint folder", and the `latest` pointer file got
    advice to use --resume auto, which is wrong when resuming into another folder."""
    root = tmp_path / "fresh" / "checkpoints"
    with pytest.raises(CheckpointError, match="no such file or folder; pass a run folder"):
        ckpt.resolve_resume(root, str(tmp_path / "no-such-run"))
    pointer = run_folder / "checkpoints" / "latest"
    advice = rf"is a checkpoint pointer file; pass its run folder \({re.escape(str(run_folder))}\)"
    with pytest.raises(CheckpointError, match=advice):
        ckpt.resolve_resume(root, str(pointer))
    folder, _ = ckpt.resolve_resume(root, str(run_folder))  # the advice works
    assert folder.name.startswith("step-")
