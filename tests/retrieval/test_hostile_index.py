"""Corrupt or hostile index folders (checksums recomputed, so only the structure checks stand between
the file and FAISS) raise CheckpointError with a clear message: never a FAISS C++ error, a huge
allocation, AttributeError, TypeError, RecursionError, or an index that returns -1 ids.

Hypothesis fuzzes manifests, metadata lines and index.faiss bytes: a few seconds by default, longer
under ``slow``.
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from visreg_hub.errors import CheckpointError, VisregHubError
from visreg_hub.filehash import sha256_file
from visreg_hub.retrieval import EmbeddingIndex

pytest.importorskip("faiss")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KINDS = {
    "flat": {},
    "ivf": {"nlist": 4},
    "ivfsq8": {"nlist": 4},
    "ivfpq": {"nlist": 4, "pq_m": 4},
    "hnsw": {"m": 4},
}
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One small saved index per kind (IVF-PQ with 300 vectors: 256 are needed to train its codes)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    made = {}
    for kind, args in KINDS.items():
        index = EmbeddingIndex(8, kind=kind, **args)
        ids = index.add(vectors, metadata=[{"row": i} for i in range(300)])
        index.remove(ids[:3])
        made[kind] = index.save(tmp_path_factory.mktemp(kind) / "idx")
    return made


def copy_with(folder, tmp_path, *, manifest=None, files: dict | None = None):
    """A copy of ``folder`` with replaced file bytes and/or manifest, checksums recomputed."""
    target = tmp_path / "copy"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    for name, data in (files or {}).items():
        (target / name).write_bytes(data)
    document = json.loads((folder / "manifest.json").read_text()) if manifest is None else manifest
    if isinstance(document, dict) and isinstance(document.get("files"), dict):
        document["files"] = {  # fuzzed names that are no file keep their value
            name: sha256_file(target / name) if (target / name).is_file() else value
            for name, value in document["files"].items()
        }
    (target / "manifest.json").write_text(json.dumps(document) if not isinstance(document, str) else document)
    return target


def load_or_project_error(folder):
    """Load and search; the only acceptable failure is a VisregHubError (CheckpointError)."""
    try:
        index = EmbeddingIndex.load(folder)
    except (VisregHubError, FileNotFoundError) as exc:
        assert str(exc).strip(), "errors must say what is wrong"
        return None
    result = index.search(np.ones((2, 8), np.float32), k=5)
    assert (result.ids >= 0).all() and len(np.unique(result.ids[0])) == result.ids.shape[1]
    return index


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_huge_length_field_is_refused_before_any_allocation(folders, tmp_path, kind):
    """The probe's ~7 GB allocation: a vector length patched to 2**33 elements in a 10 KB file."""
    data = bytearray((folders[kind] / "index.faiss").read_bytes())
    manifest = json.loads((folders[kind] / "manifest.json").read_text())
    # patch the last vector length of the file: the id map (flat/HNSW) or the list sizes region (IVF)
    count = manifest["ntotal"]
    position = len(data) - 8 * count - 8 if kind in ("flat", "hnsw") else data.find(b"full") + 4
    assert struct.unpack_from("<Q", data, position)[0] == (count if kind in ("flat", "hnsw") else 4)
    data[position : position + 8] = struct.pack("<Q", 2**33)
    folder = copy_with(folders[kind], tmp_path, files={"index.faiss": bytes(data)})
    with pytest.raises(CheckpointError, match=r"index\.faiss is not a valid index for its manifest"):
        EmbeddingIndex.load(folder)


@pytest.mark.parametrize("kind", list(KINDS))
def test_random_bytes_as_index_file(folders, tmp_path, kind):
    noise = np.random.default_rng(1).bytes((folders[kind] / "index.faiss").stat().st_size)
    folder = copy_with(folders[kind], tmp_path, files={"index.faiss": noise})
    with pytest.raises(CheckpointError, match="not a valid index"):
        EmbeddingIndex.load(folder)


def test_index_of_another_kind_or_dim_is_refused(folders, tmp_path):
    ivf_bytes = (folders["ivf"] / "index.faiss").read_bytes()
    with pytest.raises(CheckpointError, match=r"'IwFl'.*kind 'flat' needs 'IxM2'"):
        EmbeddingIndex.load(copy_with(folders["flat"], tmp_path, files={"index.faiss": ivf_bytes}))
    manifest = json.loads((folders["hnsw"] / "manifest.json").read_text())
    with pytest.raises(CheckpointError, match=r"dim 8.*manifest says 9"):
        EmbeddingIndex.load(copy_with(folders["hnsw"], tmp_path, manifest={**manifest, "dim": 9}))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", ["flat"], "kind must be one of"),
        ("kind", "pq", "kind must be one of"),
        ("metric", 1, "metric must be"),
        ("dim", "8", r"dim must be an integer"),
        ("dim", True, r"dim must be an integer"),
        ("count", -1, "count must be an integer"),
        ("count", 10**30, "count must be an integer"),
        ("count", 10**12, r"count 1000000000000 is more than the index's ntotal"),  # named ntotal before
        ("params", [], "params must be an object"),
        ("params", {"nlist": "4"}, r"params\.nlist must be an integer"),
        ("normalized", "yes", "normalized must be true or false"),
        ("model_name", {"a": 1}, "model_name must be a string"),
        ("pooling", "zzz", "pooling must be one of"),  # refused at load, not at the first search
        ("build", 3, "build must be an object"),
        ("files", {"index.faiss": "00"}, "must list the sha256"),
        ("next_id", 0, "next_id"),
    ],
)
def test_wrong_manifest_types_name_the_field(folders, tmp_path, field, value, message):
    manifest = json.loads((folders["ivf"] / "manifest.json").read_text())
    folder = copy_with(folders["ivf"], tmp_path, manifest={**manifest, field: value})
    with pytest.raises(CheckpointError, match=message):
        EmbeddingIndex.load(folder)


def test_wrong_param_types(folders, tmp_path):
    manifest = json.loads((folders["ivf"] / "manifest.json").read_text())
    cases = [
        ({"nlist": "4"}, r"params\.nlist must be an integer"),
        ({"ef_search": 2.5}, r"params\.ef_search"),
        ({"nprobe": -3}, r"params\.nprobe"),
    ]
    for params, message in cases:
        folder = copy_with(
            folders["ivf"], tmp_path, manifest={**manifest, "params": {**manifest["params"], **params}}
        )
        with pytest.raises(CheckpointError, match=message):
            EmbeddingIndex.load(folder)


def test_deeply_nested_json_is_a_checkpoint_error(folders, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(CheckpointError, match="too deeply nested"):
        EmbeddingIndex.load(copy_with(folders["flat"], tmp_path, manifest=deep))
    lines = (folders["flat"] / "metadata.jsonl").read_text().splitlines()
    lines[5] = '{"a": ' + deep + "}"
    folder = copy_with(
        folders["flat"], tmp_path, files={"metadata.jsonl": ("\n".join(lines) + "\n").encode()}
    )
    with pytest.raises(CheckpointError, match="line 6 is not valid"):
        EmbeddingIndex.load(folder)


@pytest.mark.parametrize(("line", "message"), [("[1, 2]", "must be a JSON object or null"), ("7", "got int")])
def test_non_dict_metadata(folders, tmp_path, line, message):
    lines = (folders["hnsw"] / "metadata.jsonl").read_text().splitlines()
    lines[0] = line
    folder = copy_with(
        folders["hnsw"], tmp_path, files={"metadata.jsonl": ("\n".join(lines) + "\n").encode()}
    )
    with pytest.raises(CheckpointError, match=message):
        EmbeddingIndex.load(folder)


def test_an_oversized_metadata_line_is_refused_before_it_is_read_whole(folders, tmp_path):
    """A 1 GB line compresses to about 1 MB in a download and cost 4.6 GB of memory to load; a line over
    the per-item cap is refused after reading only the cap (measured here with tracemalloc)."""
    import tracemalloc

    from visreg_hub.retrieval.limits import MAX_METADATA_BYTES

    lines = (folders["flat"] / "metadata.jsonl").read_text().splitlines()
    lines[4] = json.dumps({"path": "A" * (8 * MAX_METADATA_BYTES)})
    data = ("\n".join(lines) + "\n").encode()
    folder = copy_with(folders["flat"], tmp_path, files={"metadata.jsonl": data})
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"line 5 is over 1,048,576 bytes"):
            EmbeddingIndex.load(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_METADATA_BYTES  # the 8 MiB line was never held whole


def test_metadata_over_the_per_item_cap_is_refused_when_added(tmp_path):
    """What load refuses, add refuses first: an index that saves is an index that loads."""
    from visreg_hub.errors import UserInputError
    from visreg_hub.retrieval.limits import MAX_METADATA_BYTES

    index = EmbeddingIndex(8)
    vectors = np.ones((2, 8), np.float32)
    just_fits = {"p": "é" * ((MAX_METADATA_BYTES - 8) // 6)}  # stored as \u00e9: 6 bytes per character
    with pytest.raises(UserInputError, match=r"metadata\[1\] is .* bytes of JSON, over the 1,048,576"):
        index.add(vectors, metadata=[just_fits, {"p": "x" * MAX_METADATA_BYTES}])
    index.add(vectors, metadata=[just_fits, None])
    assert EmbeddingIndex.load(index.save(tmp_path / "idx")).get_metadata([0])[0] == just_fits


@pytest.mark.parametrize("name", ["manifest.json", "index.faiss", "ids.npy", "metadata.jsonl"])
def test_index_files_that_lead_out_of_the_folder_are_refused_unread(folders, tmp_path, name):
    """A link to /etc/passwd printed the target's sha256 in the checksum error (a way to confirm a guess
    about a file's contents), and links to files elsewhere loaded; FIFOs read as 'missing'."""
    import os

    folder = copy_with(folders["flat"], tmp_path)
    outside = tmp_path / "secret.txt"
    outside.write_bytes((folder / name).read_bytes())  # even a faithful copy elsewhere is refused
    (folder / name).unlink()
    (folder / name).symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"is a symlink to a file outside the index folder") as caught:
        EmbeddingIndex.load(folder)
    assert sha256_file(outside)[:12] not in str(caught.value)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with pytest.raises(CheckpointError, match=r"is not a regular file"):
        EmbeddingIndex.load(folder)
    (folder / name).unlink()
    inside = folder / "data"
    inside.mkdir()
    (inside / name).write_bytes(outside.read_bytes())
    (folder / name).symlink_to(inside / name)  # a link that stays inside the folder is fine
    assert len(EmbeddingIndex.load(folder)) == 297


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ids: np.where(np.arange(ids.size) == 0, -1, ids), "negative id -1"),
        (lambda ids: np.where(np.arange(ids.size) == 1, ids[0], ids), "duplicate ids"),
        (lambda ids: ids + 10**6, "does not hold|not above the largest id"),
        (lambda ids: ids.astype(np.int32), "expected little-endian int64"),
    ],
)
def test_bad_ids_are_refused(folders, tmp_path, kind, edit, message):
    ids = np.load(folders[kind] / "ids.npy", allow_pickle=False)
    folder = copy_with(folders[kind], tmp_path, files={"ids.npy": _npy(edit(ids))})
    with pytest.raises(CheckpointError, match=message):
        EmbeddingIndex.load(folder)


def test_hnsw_link_out_of_range_is_refused(folders, tmp_path):
    """A graph link pointing past the index would make FAISS read out of bounds."""
    import faiss

    data = bytearray((folders["hnsw"] / "index.faiss").read_bytes())
    wrapper = faiss.read_index(str(folders["hnsw"] / "index.faiss"))  # kept alive while .index is used
    levels, n = faiss.downcast_index(wrapper.index).hnsw.assign_probas.size(), 300
    # IxM2 + header, IHNf + header, then the length-prefixed vectors of index_write.cpp's write_HNSW
    first_link = (
        2 * (4 + 33) + (8 + 8 * levels) + (8 + 4 * (levels + 1)) + (8 + 4 * n) + (8 + 8 * (n + 1)) + 8
    )
    assert struct.unpack_from("<i", data, first_link)[0] in range(-1, n)  # it is a link
    struct.pack_into("<i", data, first_link, 10**6)
    with pytest.raises(CheckpointError, match="HNSW links holds values outside"):
        EmbeddingIndex.load(copy_with(folders["hnsw"], tmp_path, files={"index.faiss": bytes(data)}))


# --------------------------------------------------------------------------------------- fuzzing
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
MANIFEST_FIELDS = ["dim", "metric", "kind", "factory", "count", "ntotal", "next_id", "model_name",
                   "pooling", "normalized", "normalize", "params", "build", "files", "format_version",
                   "format"]  # fmt: skip


def _fuzz_manifest(folders, tmp_path, kind, field, value):
    manifest = json.loads((folders[kind] / "manifest.json").read_text())
    if field in manifest and isinstance(manifest[field], dict) and isinstance(value, dict):
        value = {**manifest[field], **value}
    load_or_project_error(copy_with(folders[kind], tmp_path, manifest={**manifest, field: value}))


def _fuzz_bytes(folders, tmp_path, kind, edits, cut):
    data = bytearray((folders[kind] / "index.faiss").read_bytes())
    for offset, value in edits:
        data[offset % len(data)] = value
    if cut:
        data = data[: cut % len(data)]
    load_or_project_error(copy_with(folders[kind], tmp_path, files={"index.faiss": bytes(data)}))


def _fuzz_metadata(folders, tmp_path, kind, row, value):
    lines = (folders[kind] / "metadata.jsonl").read_text().splitlines()
    lines[row % len(lines)] = json.dumps(value)
    folder = copy_with(folders[kind], tmp_path, files={"metadata.jsonl": ("\n".join(lines) + "\n").encode()})
    index = load_or_project_error(folder)
    if index is not None:
        assert value is None or isinstance(value, dict)


kinds = st.sampled_from(list(KINDS))
byte_edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4)


@FAST
@given(kind=kinds, field=st.sampled_from(MANIFEST_FIELDS), value=json_values)
def test_fuzz_manifest_fields(folders, tmp_path, kind, field, value):
    _fuzz_manifest(folders, tmp_path, kind, field, value)


@FAST
@given(kind=kinds, edits=byte_edits, cut=st.none() | st.integers(0, 10**6))
def test_fuzz_index_file_bytes(folders, tmp_path, kind, edits, cut):
    _fuzz_bytes(folders, tmp_path, kind, edits, cut)


@FAST
@given(kind=kinds, row=st.integers(0, 400), value=json_values)
def test_fuzz_metadata_lines(folders, tmp_path, kind, row, value):
    _fuzz_metadata(folders, tmp_path, kind, row, value)


@pytest.mark.slow
@SLOW
@given(kind=kinds, field=st.sampled_from(MANIFEST_FIELDS), value=json_values)
def test_fuzz_manifest_fields_long(folders, tmp_path, kind, field, value):
    _fuzz_manifest(folders, tmp_path, kind, field, value)


@pytest.mark.slow
@SLOW
@given(kind=kinds, edits=byte_edits, cut=st.none() | st.integers(0, 10**6))
def test_fuzz_index_file_bytes_long(folders, tmp_path, kind, edits, cut):
    _fuzz_bytes(folders, tmp_path, kind, edits, cut)


def _tampered(folder, tmp_path, case):
    """A copy of a good index folder, changed as in probe 6 (F2), with every checksum fixed up."""
    manifest = json.loads((folder / "manifest.json").read_text())
    files = {}
    if case == "truncated_faiss":
        data = (folder / "index.faiss").read_bytes()
        files["index.faiss"] = data[: len(data) // 2]
    elif case == "dim":
        manifest["dim"] = 4
    elif case == "kind":
        manifest["kind"] = "hnsw"
    elif case == "ids_zeros":
        files["ids.npy"] = _npy(np.zeros(manifest["count"], np.int64))
    elif case == "metadata_line_dropped":
        lines = (folder / "metadata.jsonl").read_bytes().splitlines(keepends=True)
        files["metadata.jsonl"] = b"".join(lines[:-1])
    elif case == "next_id":
        manifest["next_id"] = 5
    return copy_with(folder, tmp_path, manifest=manifest, files=files)


@pytest.mark.parametrize(
    "case", ["truncated_faiss", "dim", "kind", "ids_zeros", "metadata_line_dropped", "next_id"]
)
def test_inspect_refuses_what_load_refuses_with_the_same_message(folders, tmp_path, capsys, case):
    """`index inspect` checked only the sha256s, so with them fixed up it printed "sha256 verified" and
    exited 0 for folders load() refuses (probe 6, F2); it now runs load's checks and fails the same way."""
    from visreg_hub.cli import main
    from visreg_hub.errors import one_line

    folder = _tampered(folders["flat"], tmp_path, case)
    with pytest.raises(CheckpointError) as refused:
        EmbeddingIndex.load(folder)
    capsys.readouterr()
    assert main(["index", "inspect", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert "verified" not in out
    assert err.strip() == f"visreg-hub: error: {one_line(refused.value)}"


def test_inspect_passes_a_good_folder_of_every_kind(folders, capsys):
    from visreg_hub.cli import main

    for folder in folders.values():
        assert main(["index", "inspect", str(folder), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert set(summary["files"].values()) == {"sha256 and contents verified"}


@pytest.mark.parametrize("name", ["ids.npy", "index.faiss", "metadata.jsonl", "manifest.json"])
def test_a_missing_file_of_an_index_folder_is_a_library_error_and_a_file_not_found(tmp_path, name):
    """Probe 20: SECURITY.md promises that a damaged index folder fails only with a VisregHubError; a
    half-copied folder (a listed file missing) raised a bare FileNotFoundError. It is DataNotFoundError
    now, still a FileNotFoundError for code that caught that."""
    index = EmbeddingIndex(dim=4, metric="ip")
    index.add(np.eye(4, dtype=np.float32), metadata=[{"n": i} for i in range(4)])
    index.save(tmp_path / "ok")
    damaged = shutil.copytree(tmp_path / "ok", tmp_path / "damaged")
    (damaged / name).unlink()
    with pytest.raises(VisregHubError, match=r"missing|no manifest.json") as caught:
        EmbeddingIndex.load(damaged)
    assert isinstance(caught.value, FileNotFoundError)
