"""Backends chosen at load time: "auto" is ONNX Runtime on the CPU, exports are cached on disk and verified,
int8 graphs; each checked against the PyTorch model on real photos.

One tiny model is saved once; its fp32 and int8 exports are made once per module (a few seconds each) in a
cache folder of this module, and every test below reuses them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch

from tests.fixtures_models import tiny_encoder
from tests.inference import malformed
from visreg_hub.hub import from_pretrained
from visreg_hub.inference.backends import set_backend

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from visreg_hub.inference.onnx import backend as onnx_backend  # noqa: E402
from visreg_hub.inference.onnx import cache  # noqa: E402

# the dynamo export of one model runs once per session (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("export_each_graph_once")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_encoder(seed=7).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VISREG_HUB_CACHE", str(root))
        yield root / "onnx"


@pytest.fixture
def exports(monkeypatch):
    """Counts real exports: a cache hit must not call export_onnx."""
    calls = []
    original = onnx_backend.export_onnx

    def counting(model, path, **kwargs):
        calls.append(kwargs)
        return original(model, path, **kwargs)

    monkeypatch.setattr(onnx_backend, "export_onnx", counting)
    return calls


def reference(photo_paths, folder):
    """Independent path: timm's transform on PIL images, then the torch model."""
    model = from_pretrained(folder, backend="torch")
    transform = timm.data.create_transform(**model.data_config)
    batch = torch.stack([transform(malformed.photo_rgb(p)) for p in photo_paths])
    with torch.no_grad():
        return torch.nn.functional.normalize(model(batch), dim=-1)


def test_auto_is_onnx_on_the_cpu_and_says_so(folder, tmp_path, photo_paths, exports, monkeypatch, caplog):
    # a cache of its own: which of this module's tests ran before on this worker must not matter
    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path))
    cache_root = tmp_path / "onnx"
    with caplog.at_level(logging.INFO, logger="visreg_hub.inference.backends"):
        model = from_pretrained(folder, backend="auto")
    assert model.backend == "onnx" and "encode() uses the onnx backend" in caplog.text
    assert "backend='auto' on cpu" in caplog.text
    torch.testing.assert_close(model.encode(photo_paths), reference(photo_paths, folder), atol=1e-4, rtol=0)
    assert len(exports) == 1 and exports[0]["int8"] is False
    entries = [p for p in cache_root.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "model.onnx").is_file()
    record = json.loads((entries[0] / "entry.json").read_text())
    assert record["weights_sha256"] == cache.weights_digest(model)
    assert record["options"] == {"pooling": "cls", "precision": "fp32", "optimize": False}
    # a fresh load of the same weights (a new process would do the same) reuses the verified file
    again = from_pretrained(folder, backend="auto")
    torch.testing.assert_close(again.encode(photo_paths), model.encode(photo_paths), atol=0, rtol=0)
    assert len(exports) == 1
    # bfloat16 parameters cannot be exported: auto keeps them on torch
    assert from_pretrained(folder, backend="auto", dtype=torch.bfloat16).backend == "torch"


def test_file_objects_are_one_image_on_both_backends(folder, cache_root, photo_paths):
    """File objects are expanded before the backend runs: ONNX and torch treat them alike."""
    expected = reference(photo_paths[:2], folder)
    for backend in ("torch", "onnx"):
        model = from_pretrained(folder, backend=backend)
        assert model.backend == backend
        with open(photo_paths[0], "rb") as handle:
            single = model.encode(handle)
        assert single.shape == expected[0].shape
        torch.testing.assert_close(single, expected[0], atol=1e-4, rtol=0)
        with open(photo_paths[1], "rb") as handle:
            result = model.encode([io.BytesIO(photo_paths[0].read_bytes()), handle], on_error="skip")
        assert result.failures == []
        torch.testing.assert_close(result.embeddings, expected, atol=1e-4, rtol=0)


def test_environment_and_arguments_choose_the_backend(folder, monkeypatch):
    monkeypatch.setenv("VISREG_HUB_BACKEND", "onnx")
    assert from_pretrained(folder).backend == "onnx"
    monkeypatch.setenv("VISREG_HUB_BACKEND", "torch")
    assert from_pretrained(folder).backend == "torch"
    assert from_pretrained(folder, precision="int8").backend == "onnx"  # only ONNX takes a precision
    monkeypatch.setenv("VISREG_HUB_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="VISREG_HUB_BACKEND='tensorrt' is not one of"):
        from_pretrained(folder)
    with pytest.raises(ValueError, match="pass backend='onnx' with them"):
        from_pretrained(folder, backend="torch", precision="fp16")
    assert tiny_encoder().backend == "torch"  # a model built in code runs on torch


def small_export(calls: list):
    """An ``export`` callback for ``cached_export`` that writes a real, small ONNX file (y = x + 1)."""
    from onnx import TensorProto, helper

    def export(path):
        calls.append(path)
        value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
        graph = helper.make_graph(
            [helper.make_node("Add", ["x", "one"], ["y"])], "g", [value],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [one],
        )  # fmt: skip
        onnx.save(helper.make_model(graph), str(path))

    return export


OPTIONS = {"pooling": "cls", "precision": "fp32", "optimize": False}


def test_a_corrupt_or_incomplete_cache_entry_is_exported_again(tmp_path, caplog):
    """The cache's own rules on a small real ONNX file (the exports above show the integration)."""
    model = tiny_encoder(seed=8)
    calls = []
    export = small_export(calls)
    options = OPTIONS
    first = cache.cached_export(model, options, export, root=tmp_path)
    assert cache.cached_export(model, options, export, root=tmp_path) == first and len(calls) == 1
    record = json.loads((first.parent / "entry.json").read_text())
    assert record["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte: same size, another digest
    first.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.onnx.cache"):
        again = cache.cached_export(model, options, export, root=tmp_path)
    assert "does not match its recorded SHA-256" in caplog.text and len(calls) == 2
    assert again == first and hashlib.sha256(again.read_bytes()).hexdigest() == record["sha256"]
    (first.parent / "entry.json").unlink()  # a crash before the record was written: never trusted
    cache.cached_export(model, options, export, root=tmp_path)
    assert len(calls) == 3
    # other weights, or other options, are other entries; a staging folder left by a killed export is ignored
    (tmp_path / f".{first.parent.name}-leftover").mkdir()
    cache.cached_export(tiny_encoder(seed=9), options, export, root=tmp_path)
    cache.cached_export(model, {**options, "precision": "int8"}, export, root=tmp_path)
    cache.cached_export(model, options, export, root=tmp_path)
    assert len(calls) == 5
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 3


def test_only_this_users_cache_entries_are_run_and_others_are_left_alone(tmp_path):
    """A graph is a program, and a check run can be fooled (probe 12: a planted graph recognised the
    check's fixed inputs and passed). So an entry that another user owns or that others can write is never
    run, and never deleted; a cache dir where others can rename entries is refused as a whole."""
    import stat

    model, calls = tiny_encoder(seed=8), []
    first = cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path)
    entry = first.parent
    for path in (entry, first, entry / "entry.json"):
        mode = path.stat().st_mode
        path.chmod(mode | stat.S_IWOTH)
        with pytest.raises(cache.OnnxCacheError, match=r"is writable by others.*VISREG_HUB_CACHE"):
            cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path)
        path.chmod(mode | stat.S_IWGRP)  # group write: what umask 002 (user-private groups) gives every file
        assert cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path) == first
        path.chmod(mode)
        assert path.exists() and len(calls) == 1  # refused, not deleted, not exported over
    if os.getuid() == 0:  # only root can give a file away
        os.chown(first, 65534, -1)
        with pytest.raises(cache.OnnxCacheError, match=r"belongs to another user \(uid 65534\)"):
            cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path)
        os.chown(first, 0, -1)  # root's own (an administrator's read-only cache) is trusted
    assert cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path) == first
    tmp_path.chmod(0o777)  # anyone could swap this user's entries
    with pytest.raises(cache.OnnxCacheError, match=r"writable by others.*chmod \+t"):
        cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path)
    tmp_path.chmod(0o1777)  # sticky, as /tmp: others cannot rename or remove what is not theirs
    assert cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path) == first
    tmp_path.chmod(0o700)
    assert len(calls) == 1
    # probe 14: a root reached through a link, or below a folder others can write, let another user rename
    # the whole cache between the check and the next open
    shared = tmp_path / "shared"
    (shared / "mine").mkdir(parents=True)
    shared.chmod(0o777)
    (tmp_path / "link").symlink_to(shared / "mine", target_is_directory=True)
    for root in (shared / "mine", tmp_path / "link"):
        with pytest.raises(cache.OnnxCacheError, match=r"shared is writable by others"):
            cache.cached_export(model, OPTIONS, small_export(calls), root=root)
    shared.chmod(0o755)
    if os.getuid() == 0:
        os.chown(shared, 65534, -1)
        with pytest.raises(cache.OnnxCacheError, match=r"shared belongs to another user \(uid 65534\)"):
            cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path / "link")


def test_auto_embeds_on_torch_when_the_export_fails_its_check(tmp_path, monkeypatch, caplog, photo_paths):
    """Probe 19: under backend="auto" (the default, on a CPU) an export that failed its check raised
    OnnxValidationError from encode() of a model the torch backend embeds, and re-exported on every call.
    A NaN weight (a diverged checkpoint) makes a real failing check: auto embeds as torch does, warns once,
    exports once; backend="onnx" raises the check's report."""
    from visreg_hub.inference.onnx import OnnxValidationError

    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path))
    model = tiny_encoder(seed=3)
    with torch.no_grad():
        model.backbone.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    set_backend(model, "torch")
    expected = model.encode(photo_paths[:2])
    set_backend(model, "auto")
    with caplog.at_level(logging.WARNING):
        first = model.encode(photo_paths[:2])
        second = model.encode(photo_paths[:2])
    warnings = [r.getMessage() for r in caplog.records if "falls back to the torch backend" in r.getMessage()]
    assert len(warnings) == 1 and "NaN or inf" in warnings[0]
    for got in (first, second):
        assert torch.equal(torch.isnan(got), torch.isnan(expected))  # torch's own (NaN) embedding
    set_backend(model, "onnx")
    with pytest.raises(OnnxValidationError, match=r"nothing was cached.*NaN or inf"):
        model.encode(photo_paths[:2])


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"),
                         [(0o022, 0o755, 0o644), (0o002, 0o755, 0o644), (0o077, 0o700, 0o600)])  # fmt: skip
def test_entries_are_never_writable_by_others_and_readable_as_the_umask_allows(
    tmp_path, umask, folder_mode, file_mode
):
    """Probe 19: entries were 0700 folders whatever the umask, so a cache root filled (a container image
    built as root, run as another user) could be read by nobody else. Group write (umask 002) is never
    added: an entry writable by others is not trusted."""
    import stat

    previous = os.umask(umask)
    try:
        first = cache.cached_export(tiny_encoder(seed=8), OPTIONS, small_export([]), root=tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(first.parent.stat().st_mode) == folder_mode
    for written in (first, first.parent / "entry.json"):
        assert stat.S_IMODE(written.stat().st_mode) == file_mode


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="acting as another user needs root")
def test_another_user_reads_a_cache_root_filled_and_an_unreadable_entry_is_a_cache_error():
    """Probe 19: another user's encode() crashed with a raw PermissionError (not an OnnxCacheError, so
    backend="auto" did not fall back) on the 0700 entries of a cache root filled. Now they are readable; one
    made unreadable is an OnnxCacheError naming the fix. The other user is a forked child (uid 65534)."""
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="visreg-shared-cache-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        first = cache.cached_export(tiny_encoder(seed=8), OPTIONS, small_export([]), root=shared)

        def as_nobody() -> str:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: never returns into pytest
                os.close(read)
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    outcome = f"ok {cache._cached(first.parent)}"
                except cache.OnnxCacheError as exc:
                    outcome = f"OnnxCacheError {exc}"
                except BaseException as exc:  # reported to the parent, which asserts
                    outcome = f"{type(exc).__name__} {exc}"
                os.write(write, outcome.encode())
                os._exit(0)
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                outcome = pipe.read().decode()
            os.waitpid(pid, 0)
            return outcome

        assert as_nobody() == f"ok {first}"
        first.parent.chmod(0o700)  # as entries were written before
        outcome = as_nobody()
        assert outcome.startswith("OnnxCacheError") and "cannot be read by this user" in outcome
        assert "chmod -R a+rX" in outcome and first.exists()  # named the fix, deleted nothing
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_process_that_cannot_check_an_entry_keeps_it(folder, photo_paths, tmp_path, monkeypatch):
    """Without onnxruntime the check raised MissingExtraError, the valid entry was deleted as "failing
    its check" and a whole export ran before the same error (probe 12); now the load itself says what is
    missing, and an entry this process cannot check stays for the processes that can."""
    import importlib.util

    from visreg_hub.errors import MissingExtraError

    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path / "cache"))
    from_pretrained(folder, backend="onnx").encode(photo_paths[:1])
    (entry,) = [p for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith(".")]

    def no_runtime(*_args, **_kwargs):
        raise MissingExtraError("'onnxruntime' is required for this feature but is not installed")

    monkeypatch.setattr(onnx_backend, "validate_onnx", no_runtime)
    with pytest.raises(MissingExtraError, match="onnxruntime"):
        from_pretrained(folder, backend="onnx").encode(photo_paths[:1])
    assert (entry / "model.onnx").is_file() and (entry / "entry.json").is_file()

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime"
                        else find_spec(name, *a))  # fmt: skip
    for options in ({"backend": "onnx"}, {"precision": "int8"}):
        with pytest.raises(MissingExtraError, match=r"backend 'onnx' needs onnxruntime.*backend='torch'"):
            from_pretrained(folder, **options)
    assert from_pretrained(folder).backend == "torch"  # auto: torch, as without the packages


def _plant_graph(source: Path, entry: Path) -> None:
    """Put ``source``'s graph into cache ``entry`` and record its digest: a swap the digest cannot see."""
    shutil.copyfile(source / "model.onnx", entry / "model.onnx")
    record = json.loads((entry / "entry.json").read_text())
    record["sha256"] = hashlib.sha256((entry / "model.onnx").read_bytes()).hexdigest()
    record["size"] = (entry / "model.onnx").stat().st_size
    (entry / "entry.json").write_text(json.dumps(record))


def test_a_cached_graph_of_another_precision_is_not_judged_by_its_own_metadata(
    folder, photo_paths, tmp_path, exports, monkeypatch, caplog
):
    """The check took its threshold from the graph's metadata: a graph saying "int8" was held to cosine
    0.98 under an fp32 key. It is judged by the precision its key asks for, and one of another precision
    is exported again."""
    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path / "cache"))
    from_pretrained(folder, backend="onnx").encode(photo_paths[:1])
    (fp32_entry,) = [p for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith(".")]
    from_pretrained(folder, backend="onnx", precision="int8").encode(photo_paths[:1])
    (int8_entry,) = [p for p in (tmp_path / "cache" / "onnx").iterdir()
                     if not p.name.startswith(".") and p != fp32_entry]  # fmt: skip
    _plant_graph(int8_entry, fp32_entry)
    calls = len(exports)
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.onnx.cache"):
        got = from_pretrained(folder, backend="onnx").encode(photo_paths)
    assert "precision: recorded 'int8', expected 'fp32'" in caplog.text and len(exports) == calls + 1
    torch.testing.assert_close(got, reference(photo_paths, folder), atol=1e-4, rtol=0)


def test_a_cached_graph_whose_metadata_is_not_this_models_is_exported_again(
    folder, photo_paths, tmp_path, exports, monkeypatch, caplog
):
    """Probe 19: the check ran the cached graph on random pixels, so metadata it never exercises (the
    preprocessing mean/std, another pooling's graph under this key) passed: vectors at cosine 0.5 to
    torch, or 128 values for a 256-d model, without a word. The metadata must be what this model makes."""
    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path / "cache"))
    expected = reference(photo_paths, folder)
    from_pretrained(folder, backend="onnx").encode(photo_paths[:1])
    (entry,) = [p for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith(".")]
    graph = onnx.load(str(entry / "model.onnx"))
    for prop in graph.metadata_props:
        if prop.key == "visreg_hub.data_config":
            config = json.loads(prop.value)
            config["mean"] = [1.0 - value for value in config["mean"]]
            prop.value = json.dumps(config)
    edited = tmp_path / "edited"
    edited.mkdir()
    onnx.save(graph, str(edited / "model.onnx"))
    _plant_graph(edited, entry)
    calls = len(exports)
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.onnx.cache"):
        got = from_pretrained(folder, backend="onnx").encode(photo_paths)
    assert "data_config: recorded" in caplog.text and len(exports) == calls + 1
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_cache_entry_that_is_a_file_or_a_dangling_symlink_is_exported_again(tmp_path, caplog):
    """rmtree leaves a file or a symlink in place, and the rename of the new entry onto it then failed on
    every call; such an entry must be removed and exported again like any other broken entry."""
    model, calls = tiny_encoder(seed=8), []
    entry = tmp_path / cache.cache_key(model, OPTIONS)[0]
    entry.write_text("x")
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.onnx.cache"):
        found = cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path)
    assert found == entry / "model.onnx" and found.is_file() and len(calls) == 1
    assert "is not a folder; exporting again" in caplog.text
    shutil.rmtree(entry)
    entry.symlink_to(tmp_path / "gone")  # dangling: entry.exists() is False, the rename still fails
    assert cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path) == found
    assert found.is_file() and not entry.is_symlink() and len(calls) == 2


def test_staging_folders_of_killed_exports_are_swept_when_exporting(tmp_path):
    """A killed export leaves ``.<key>-*`` with a whole graph in it; the next export deletes the ones
    untouched for hours, and nothing younger (a concurrent export) or not named like a staging folder."""
    stale, young, other = tmp_path / f".{'a' * 40}-old", tmp_path / f".{'b' * 40}-new", tmp_path / ".keep"
    for folder in (stale, young, other):
        (folder / ".model.onnx.tmp-1").mkdir(parents=True)
        (folder / ".model.onnx.tmp-1" / "model.onnx").write_bytes(b"half a graph")
    hours_ago = time.time() - cache.STALE_STAGING_SECONDS - 60
    for folder in (stale, other):
        for path in (folder / ".model.onnx.tmp-1" / "model.onnx", folder / ".model.onnx.tmp-1", folder):
            os.utime(path, (hours_ago, hours_ago))
    calls = []
    cache.cached_export(tiny_encoder(seed=8), OPTIONS, small_export(calls), root=tmp_path)
    assert len(calls) == 1 and not stale.exists() and young.is_dir() and other.is_dir()
    assert cache.cached_export(tiny_encoder(seed=8), OPTIONS, small_export(calls), root=tmp_path)
    assert young.is_dir() and len(calls) == 1  # a cache hit sweeps nothing


def test_an_unwritable_cache_falls_back_to_torch_for_auto_and_is_an_error_for_onnx(
    folder, photo_paths, tmp_path, monkeypatch, caplog
):
    """HOME=/nonexistent, a read-only home or VISREG_HUB_CACHE naming a file must not cost "auto" (the
    default, which the user never chose) its encode(): torch runs instead, with one warning that names the
    folder and both fixes. backend="onnx" was asked for by name, so there it is an error with the fixes."""
    not_a_folder = tmp_path / "cachefile"
    not_a_folder.write_text("a file, not a folder")
    monkeypatch.setenv("VISREG_HUB_CACHE", str(not_a_folder))
    model = from_pretrained(folder, backend="auto")
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.backends"):
        first = model.encode(photo_paths)
        second = model.encode(photo_paths[:2])
    warnings = [  # (a server test run before may leave the logger at INFO: count warnings only)
        r.getMessage()
        for r in caplog.records
        if r.name == "visreg_hub.inference.backends" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1, warnings
    assert str(not_a_folder / "onnx") in warnings[0] and "VISREG_HUB_CACHE" in warnings[0]
    assert "backend='torch'" in warnings[0] and "falls back to the torch backend" in warnings[0]
    assert model.backend == "torch"
    torch.testing.assert_close(first, reference(photo_paths, folder), atol=1e-5, rtol=0)
    torch.testing.assert_close(second, first[:2], atol=1e-6, rtol=0)
    explicit = from_pretrained(folder, backend="onnx")
    fixes = r".*set VISREG_HUB_CACHE to a writable folder, or load the model with backend=.torch."
    with pytest.raises(cache.OnnxCacheError, match=r"cannot write the ONNX export cache .*cachefile" + fixes):
        explicit.encode(photo_paths)
    monkeypatch.delenv("VISREG_HUB_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "no" / "such" / "home"))
    monkeypatch.setattr(cache.Path, "mkdir", _refuse_mkdir)  # as a read-only file system would
    with pytest.raises(cache.OnnxCacheError, match=r"no/such/home/\.cache/visreg_hub/onnx"):
        explicit.encode(photo_paths)


def test_a_damaged_entry_that_cannot_be_removed_is_a_cache_error_before_any_export(
    folder, photo_paths, tmp_path, monkeypatch, caplog
):
    """Probe: a damaged entry in a folder this user could not delete from was exported over (seconds), then
    the rename into place raised a bare OSError on every encode(), also under backend='auto'. It is an
    OnnxCacheError before the export now: 'auto' falls back to torch with one warning, 'onnx' names it."""
    model = tiny_encoder(seed=8)
    calls = []
    path = cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path)
    path.write_bytes(path.read_bytes()[:10])  # damaged: its recorded SHA-256 no longer matches
    monkeypatch.setattr(cache, "_remove", lambda entry: None)  # as a read-only entry folder leaves it
    with pytest.raises(cache.OnnxCacheError, match=r"is damaged and cannot be removed .*VISREG_HUB_CACHE"):
        cache.cached_export(model, OPTIONS, small_export(calls), root=tmp_path)
    assert len(calls) == 1  # no second export was run for nothing
    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path / "shared"))
    first = from_pretrained(folder, backend="auto")
    assert first.encode(photo_paths[:1]).shape[0] > 0 and first.backend == "onnx"  # fills the cache
    (entry,) = [p for p in (tmp_path / "shared" / "onnx").iterdir() if not p.name.startswith(".")]
    (entry / "model.onnx").write_bytes(b"damaged")
    model = from_pretrained(folder, backend="auto")
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.backends"):
        embeddings = model.encode(photo_paths)
        model.encode(photo_paths[:1])
    warned = [r for r in caplog.records if r.name == "visreg_hub.inference.backends" and r.levelno >= 30]
    assert len(warned) == 1 and "cannot be removed" in warned[0].getMessage() and model.backend == "torch"
    torch.testing.assert_close(embeddings, reference(photo_paths, folder), atol=1e-5, rtol=0)
    with pytest.raises(cache.OnnxCacheError, match="cannot be removed"):
        from_pretrained(folder, backend="onnx").encode(photo_paths[:1])


def _refuse_mkdir(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(self))


def test_int8_backend_quantises_the_linear_layers(folder, tmp_path, photo_paths, exports, monkeypatch):
    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path))  # its own cache: exactly one export here
    model = from_pretrained(folder, backend="onnx", precision="int8")
    embeddings = model.encode(photo_paths)
    (call,) = exports
    assert call["int8"] is True
    (_, embedder), *_ = onnx_backend.LIVE_BACKENDS[model].values()
    assert embedder.metadata.precision == "int8" and embedder.metadata.quantization == "dynamic"
    ops = {node.op_type for node in onnx.load(str(embedder.path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "MatMul" in ops  # attention stays float
    expected = reference(photo_paths, folder).numpy().astype(np.float64)
    cosine = (embeddings.numpy().astype(np.float64) * expected).sum(-1)  # both are unit vectors
    assert cosine.min() >= 0.98 and not np.allclose(embeddings.numpy(), expected, atol=1e-5)


@pytest.mark.slow  # one more export and a static quantisation: ~50 s on the busy 2-core machine
def test_cli_int8_export_with_calibration_on_real_photos(folder, tmp_path, photo_paths, capsys):
    from visreg_hub.cli import main
    from visreg_hub.inference.onnx import OnnxEmbedder

    out = tmp_path / "tiny-int8.onnx"
    argv = ["export", "onnx", str(folder), str(out), "--int8", "--validation-batch-sizes", "1,3"]
    assert main([*argv, "--calibration-images", str(photo_paths[0].parent)]) == 0
    assert "int8" in capsys.readouterr().out
    embedder = OnnxEmbedder(out)
    assert embedder.metadata.precision == "int8"
    assert embedder.metadata.quantization == "static, 4 calibration images"
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ: ranges fixed by the calibration photos
    expected = reference(photo_paths, folder).numpy().astype(np.float64)
    cosine = (embedder.encode(photo_paths).numpy().astype(np.float64) * expected).sum(-1)
    assert cosine.min() >= 0.98


def test_concurrent_calls_on_a_training_model_all_run_in_eval_and_restore_train(photo_paths):
    """A server's threads, or validation in a thread beside training: the first call saves the training
    flags and the last restores them, so no forward runs in training mode and train() is kept."""
    import threading

    model = tiny_encoder(seed=2, img_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2), drop_path_rate=0.5)
    reference = model.encode(photo_paths, backend="torch", batch_size=1)  # eval: dropout off
    model.train()
    modes: list[bool] = []
    model.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
    results: list[torch.Tensor] = []
    barrier = threading.Barrier(4)

    def call() -> None:
        barrier.wait()
        results.append(model.encode(photo_paths * 3, backend="torch", batch_size=1))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(modes) == 4 * 3 * len(photo_paths) and not any(modes)
    assert model.training and all(module.training for module in model.modules())
    for result in results:  # drop-path 0.5 in training mode would change them
        torch.testing.assert_close(result, reference.repeat(3, 1))


def test_the_backend_deprecation_is_attributed_to_the_users_line(photo_paths):
    """Python shows a DeprecationWarning only when it points at the user's code, not at model.encode()."""
    import warnings

    model = tiny_encoder(seed=2, img_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.encode(photo_paths[0], backend="torch")
    deprecations = [w for w in caught if w.category is DeprecationWarning and "backend" in str(w.message)]
    assert len(deprecations) == 1 and deprecations[0].filename == __file__


def test_a_device_the_onnx_build_cannot_use_is_a_device_error_as_on_torch(folder, cache_root, photo_paths):
    """device='cuda' on an onnxruntime build without a GPU provider raises like the torch backend does
    (a script asking for the GPU must never run on the CPU unnoticed); malformed names are DeviceErrors."""
    import onnxruntime

    from visreg_hub.errors import DeviceError

    model = from_pretrained(str(folder), backend="onnx")
    gpu_providers = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
    if gpu_providers & set(onnxruntime.get_available_providers()):
        pytest.skip("this onnxruntime build has a GPU provider")
    with pytest.raises(DeviceError, match=r"no GPU provider.*backend='torch'"):
        model.encode(photo_paths[:1], device="cuda")
    for bad in ("bogus", "mps"):
        with pytest.raises(DeviceError, match="cpu"):
            model.encode(photo_paths[:1], device=bad)
    cpu = model.encode(photo_paths[:1], device="cpu", convert_to_numpy=True)
    np.testing.assert_allclose(cpu, reference(photo_paths[:1], folder), atol=1e-5)
    # the same at load time: provider="cuda" ran on the CPU with two warnings, each logged twice
    for provider in ("cuda", "tensorrt", ["tensorrt", "cuda"]):
        with pytest.raises(DeviceError, match=r"has none of .*provider='cpu'.*\['cuda', 'cpu'\]"):
            from_pretrained(str(folder), provider=provider)
    fallback = from_pretrained(str(folder), provider=["cuda", "cpu"])  # a fallback asked for by name
    np.testing.assert_allclose(fallback.encode(photo_paths[:1], convert_to_numpy=True), cpu, atol=1e-6)


def test_first_calls_from_several_threads_export_once_and_all_succeed(
    folder, photo_paths, tmp_path, exports, monkeypatch
):
    """A server's threads reach an empty cache together. torch.export keeps global tracing state, so
    concurrent exports failed in every thread and could leave fake tensors in the model for good."""
    import threading

    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path))
    model = from_pretrained(folder, backend="onnx")
    barrier, results, errors = threading.Barrier(4), [], []

    def call() -> None:
        barrier.wait()
        try:
            results.append(model.encode(photo_paths))
        except Exception as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == [] and len(results) == 4 and len(exports) == 1
    expected = reference(photo_paths, folder)
    for result in results:
        torch.testing.assert_close(result, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.encode(photo_paths), expected, atol=1e-4, rtol=0)  # the model is intact


_EXPORT_IN_A_PROCESS = """
import sys, time
from pathlib import Path
from tests.fixtures_models import tiny_encoder
from tests.inference.test_backends import OPTIONS, small_export
from visreg_hub.inference.onnx import cache


root, log = Path(sys.argv[1]), Path(sys.argv[2])
calls = []
write = small_export(calls)

def slow_export(path):
    with log.open("a") as handle:
        handle.write("export\\n")
    time.sleep(2.0)  # long enough for the other process to miss the cache too
    write(path)

print(cache.cached_export(tiny_encoder(seed=8), OPTIONS, slow_export, root=root))
"""


def test_processes_missing_the_same_graph_export_it_once(tmp_path):
    """The workers of a server (or ranks of a job) start together on an empty cache: one exports, the
    others wait for its entry instead of each running the whole export."""
    import subprocess
    import sys

    root, log = tmp_path / "cache", tmp_path / "exports.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, "-c", _EXPORT_IN_A_PROCESS, str(root), str(log)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=240)[0].strip() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    assert log.read_text().splitlines() == ["export"]
    assert len(set(outputs)) == 1 and Path(outputs[0]).is_file()
    assert cache._verified(Path(outputs[0]).parent) == Path(outputs[0])


def test_a_cached_graph_is_checked_against_the_model_before_it_is_trusted(
    folder, photo_paths, tmp_path, exports, monkeypatch, caplog
):
    """Probe 9: another valid graph put under the key, with entry.json's digest recomputed, gave wrong
    embeddings without a word; a linked entry ran a graph kept elsewhere; a FIFO entry.json hung encode()."""
    monkeypatch.setenv("VISREG_HUB_CACHE", str(tmp_path / "cache"))
    expected = reference(photo_paths, folder)
    from_pretrained(folder, backend="onnx").encode(photo_paths[:1])  # fills the cache
    (entry,) = [p for p in (tmp_path / "cache" / "onnx").iterdir() if not p.name.startswith(".")]
    other = tmp_path / "other"
    tiny_encoder(seed=8).save_pretrained(other)  # same architecture, other weights: a plausible graph
    from_pretrained(other, backend="onnx").encode(photo_paths[:1])
    (other_entry,) = [p for p in (tmp_path / "cache" / "onnx").iterdir()
                      if not p.name.startswith(".") and p != entry]  # fmt: skip
    _plant_graph(other_entry, entry)
    calls = len(exports)
    with caplog.at_level(logging.WARNING, logger="visreg_hub.inference.onnx.cache"):
        got = from_pretrained(folder, backend="onnx").encode(photo_paths)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert "fails its check against the model" in caplog.text and len(exports) == calls + 1

    shutil.rmtree(entry)  # the entry as a link to a folder elsewhere: not followed, exported again
    entry.symlink_to(other_entry, target_is_directory=True)
    torch.testing.assert_close(from_pretrained(folder, backend="onnx").encode(photo_paths), expected,
                               atol=1e-4, rtol=0)  # fmt: skip
    assert entry.is_dir() and not entry.is_symlink() and (other_entry / "model.onnx").is_file()
    (entry / "entry.json").unlink()
    os.mkfifo(entry / "entry.json")  # would block a plain read forever
    torch.testing.assert_close(from_pretrained(folder, backend="onnx").encode(photo_paths), expected,
                               atol=1e-4, rtol=0)  # fmt: skip
    assert (entry / "entry.json").is_file()
