"""Bad entries in a bulk job's inputs: each is one failure record, every other input keeps its own vector.

Covers folders and non-regular files named in a .txt list, non-UTF-8 names, symlink loops, dangling links,
unreadable folders, oversized tar members, split webdataset keys, and foreign part files in the output.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bulk.helpers import PHOTOS, failures, read_output, tiles, write_tar, write_tile_folder
from tests.fixtures_models import tiny_encoder
from visreg_hub.bulk import listing, output, run_embedding
from visreg_hub.bulk.listing import InputError, Item
from visreg_hub.bulk.runner import ShardEmbedder, ShardMismatchError
from visreg_hub.inference import encode

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def model():
    return tiny_encoder()


def _pipeline(model):
    from visreg_hub.inference.backends import backend_for
    from visreg_hub.inference.pipeline import EmbeddingPipeline

    return EmbeddingPipeline(backend_for(model), normalize=True)


def _by_reason(folder: Path) -> dict[str, str]:
    return {Path(f["path"]).name: f["reason"] for f in failures(folder)}


def test_folder_named_in_a_txt_list_is_a_failure_and_rows_keep_their_vectors(tmp_path, model):
    write_tile_folder(tmp_path / "twodir", 2, nested=False)
    write_tile_folder(tmp_path / "elevendir", 11, nested=False)  # a count that used to crash the shard
    files = write_tile_folder(tmp_path / "files", 3, nested=False)
    (tmp_path / "text.png").write_text("hello\n")
    lines = ["twodir", f"files/{files[0].name}", "text.png", "elevendir", f"files/{files[1].name}",
             f"files/{files[2].name}"]  # fmt: skip
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    summary = run_embedding(tmp_path / "list.txt", tmp_path / "out", model=model, shard_size=16)
    assert summary.complete and (summary.embedded, summary.failed) == (3, 3)
    rows, vectors, _ = read_output(tmp_path / "out")
    assert rows == [(str(p), None) for p in files]
    np.testing.assert_allclose(vectors, encode(model, files, convert_to_numpy=True), atol=1e-6)
    reasons = _by_reason(tmp_path / "out")
    assert set(reasons) == {"twodir", "elevendir", "text.png"}
    assert "is a directory; list its image files in the .txt, or pass the folder" in reasons["twodir"]


def test_a_file_that_became_a_folder_fails_alone_and_a_wrong_count_is_refused(tmp_path, model):
    files = write_tile_folder(tmp_path / "imgs", 2, nested=False)
    write_tile_folder(tmp_path / "grown", 3, nested=False)  # listed as a file, a folder by embedding time
    embedder = ShardEmbedder(_pipeline(model), batch_size=4, num_workers=0)
    items = [Item(path=str(files[0])), Item(path=str(tmp_path / "grown")), Item(path=str(files[1]))]
    rows, vectors, failed = embedder.embed(items)
    assert [r["path"] for r in rows] == [str(p) for p in files]
    np.testing.assert_allclose(vectors, encode(model, files, convert_to_numpy=True), atol=1e-6)
    assert [f["path"] for f in failed] == [str(tmp_path / "grown")]
    assert "is a directory" in failed[0]["reason"]

    class OneTooMany:  # a pipeline that returns more vectors than inputs: rows would shift
        output_shape = (32,)

        def run(self, payloads, **_):
            return torch.zeros(len(payloads) + 1, 32), []

    with pytest.raises(ShardMismatchError, match=r"2 inputs .* gave 3 embeddings and 0 failures"):
        ShardEmbedder(OneTooMany(), batch_size=4, num_workers=0).embed(items[::2])


def test_non_utf8_names_are_embedded_and_their_bytes_round_trip(tmp_path, model):
    folder = tmp_path / "imgs"
    files = write_tile_folder(folder, 3, nested=False)
    odd = folder / os.fsdecode(b"latin\xe9.png")  # not UTF-8: Python holds \xe9 as a surrogate escape
    files[1].rename(odd)
    (folder / os.fsdecode(b"bad\xe9.png")).write_bytes(b"junk, not a png")
    (tmp_path / "list.txt").write_bytes(b"imgs/" + os.fsencode(files[0].name) + b"\nimgs/latin\xe9.png\n")
    summary = run_embedding([folder, tmp_path / "list.txt"], tmp_path / "out", model=model, shard_size=2)
    assert summary.complete and (summary.embedded, summary.failed) == (5, 1)
    _, vectors, records = read_output(tmp_path / "out")
    exact = [os.fsdecode(r["path_bytes"]) if r["path_bytes"] is not None else r["path"] for r in records]
    assert exact == [str(odd), str(files[0]), str(files[2]), str(files[0]), str(odd)]  # listing order
    assert records[0]["path"] == str(folder) + "/latin\\xe9.png" and records[1]["path_bytes"] is None
    np.testing.assert_allclose(vectors, encode(model, exact, convert_to_numpy=True), atol=1e-6)
    (record,) = failures(tmp_path / "out")
    assert os.fsdecode(bytes.fromhex(record["path_bytes_hex"])) == str(folder / os.fsdecode(b"bad\xe9.png"))
    assert record["path"].endswith("bad\\xe9.png") and "\\xe9" in record["reason"]

    faiss = pytest.importorskip("faiss")  # noqa: F841  (the index carries the exact bytes too)
    from visreg_hub.retrieval import EmbeddingIndex
    from visreg_hub.retrieval.build import build_index

    build_index([tmp_path / "out"], tmp_path / "idx", num_queries=1)
    hit = EmbeddingIndex.load(tmp_path / "idx").search(vectors[0], k=1).metadata[0][0]
    assert os.fsdecode(bytes.fromhex(hit["path_bytes_hex"])) == str(odd)


def test_symlink_loops_dangling_links_fifos_and_unreadable_folders_are_failures(tmp_path, model, monkeypatch):
    files = write_tile_folder(tmp_path / "imgs", 4, nested=False)
    root = tmp_path / "imgs"
    (root / "loop1.jpg").symlink_to("loop2.jpg")
    (root / "loop2.jpg").symlink_to("loop1.jpg")
    (root / "dangling.png").symlink_to("gone.png")
    os.mkfifo(root / "pipe.png")
    write_tile_folder(root / "locked", 2, nested=False)
    real_scandir = os.scandir

    def scandir(path):  # as root, chmod 000 does not stop listing: refuse this folder instead
        if os.fspath(path) == str(root / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(listing.os, "scandir", scandir)
    summary = run_embedding(root, tmp_path / "out", model=model, shard_size=3)
    assert summary.complete and (summary.embedded, summary.failed) == (4, 5)
    rows, vectors, _ = read_output(tmp_path / "out")
    assert rows == [(str(p), None) for p in files]
    np.testing.assert_allclose(vectors, encode(model, files, convert_to_numpy=True), atol=1e-6)
    reasons = _by_reason(tmp_path / "out")
    assert set(reasons) == {"loop1.jpg", "loop2.jpg", "dangling.png", "pipe.png", "locked"}
    assert "Too many levels of symbolic links" in reasons["loop1.jpg"]
    assert "target does not exist" in reasons["dangling.png"]
    assert "not a regular file" in reasons["pipe.png"]
    assert "cannot list this folder (Permission denied)" in reasons["locked"]
    with pytest.raises(InputError, match=r"not a regular file or a folder"):
        run_embedding(root / "pipe.png", tmp_path / "out2", model=model)  # would block on open


def test_a_bulk_job_lists_a_folder_as_encode_does_however_deep(tmp_path):
    """Two walks had drifted: a bulk job listed a/x.jpg before a-b.jpg where encode(folder) listed it after,
    and its recursive walk hit Python's recursion limit on a deep tree (probe 15). The names are chosen so
    that sorting full path strings ('-' < '.' < '/') and walking folders in name order disagree."""
    from visreg_hub.inference.inputs import list_image_files

    root = tmp_path / "photos"
    chain = [root]
    for _ in range(1100):  # one level at a time: pathlib's own mkdir(parents=True) recurses
        chain.append(chain[-1] / "d")
        chain[-1].mkdir(parents=True)
    deep = chain[-1]
    try:
        for path in (root / "a" / "x.jpg", root / "a-b.jpg", root / "a.jpg", deep / "bottom.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not decoded here")
        bulk = [item.path for item in listing.iter_items([str(root)])]
        by_components = sorted(bulk, key=lambda path: Path(path).relative_to(root).parts)
        assert bulk == [str(p) for p in list_image_files(root)] == by_components
        assert bulk[:3] == [str(root / "a" / "x.jpg"), str(root / "a-b.jpg"), str(root / "a.jpg")]
        assert bulk[-1] == str(deep / "bottom.png")
    finally:  # bottom up: shutil.rmtree (pytest's cleanup of old tmp folders) recurses too
        (deep / "bottom.png").unlink(missing_ok=True)
        for folder in reversed(chain[1:]):
            folder.rmdir()


def _tar_sizes(path: Path) -> dict[str, int]:
    with tarfile.open(path) as tar:
        return {m.name: m.size for m in tar.getmembers()}


def test_tar_image_member_over_the_byte_cap_is_a_failure(tmp_path, model, monkeypatch):
    from PIL import Image

    images = list(tiles(4))
    images.insert(2, Image.open(PHOTOS[0]).convert("RGB"))  # a much larger member than the 20 px tiles
    keys = write_tar(tmp_path / "s.tar", images, side=False)
    sizes = _tar_sizes(tmp_path / "s.tar")
    cap = max(size for name, size in sizes.items() if name != f"{keys[2]}.jpg")
    assert sizes[f"{keys[2]}.jpg"] > cap
    monkeypatch.setattr(listing, "MAX_IMAGE_BYTES", cap)
    summary = run_embedding(tmp_path / "s.tar", tmp_path / "out", model=model, shard_size=8)
    assert (summary.embedded, summary.failed) == (4, 1)
    rows, vectors, _ = read_output(tmp_path / "out")
    assert [key for _, key in rows] == [k for i, k in enumerate(keys) if i != 2]
    with tarfile.open(tmp_path / "s.tar") as tar:
        raw = [tar.extractfile(f"{key}.jpg").read() for _, key in rows]
    np.testing.assert_allclose(vectors, encode(model, raw, convert_to_numpy=True), atol=1e-6)
    (record,) = failures(tmp_path / "out")
    assert record["key"] == keys[2] and f"over the cap of {cap} bytes per image" in record["reason"]

    class NoRead(io.BytesIO):  # the Ray engine's reader must refuse before reading
        def read(self, size=-1):
            raise AssertionError("read past the cap")

    item = listing.read_refs(Item(path="s.tar", key="k", refs={"image": (0, cap + 1)}), NoRead())
    assert item.payload is None and "MAX_IMAGE_BYTES" in item.error


def test_split_webdataset_key_names_the_consecutive_rule(tmp_path, model):
    members = []
    for name, image in (("a.jpg", 0), ("b.jpg", 1)):
        buffer = io.BytesIO()
        list(tiles(2))[image].save(buffer, format="JPEG")
        members.append((name, buffer.getvalue()))
    members.append(("a.cls", b"3"))
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    run_embedding(tmp_path / "s.tar", tmp_path / "out", model=model)
    (record,) = failures(tmp_path / "out")
    assert record["key"] == "a" and "all files of a key next to each other" in record["reason"]


def test_foreign_part_files_never_count_as_done_shards(tmp_path):
    for name in ("part-00000.parquet", "part-00001.parquet", "part-00099.parquet", "part-000001.parquet"):
        (tmp_path / name).write_bytes(b"")
    assert output.done_shards(tmp_path, 2) == {0, 1}
    assert output.done_shards(tmp_path) == {0, 1, 99}  # the canonical spelling only
    assert output.finalize(tmp_path, {"complete": False}, 3) is False
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards_done"] == [0, 1] and manifest["complete"] is False


def test_a_failure_record_of_a_killed_attempt_goes_when_the_retry_embeds_the_file(tmp_path, model):
    """A kill between a shard's failures file and its parquet file left the failure record; when the retry
    embedded the file (fixed meanwhile), it was both a row and a failure (probe 2)."""
    files = write_tile_folder(tmp_path / "in", 4, nested=False)
    broken = files[1].read_bytes()
    files[1].write_bytes(b"not an image yet")
    out = tmp_path / "out"
    # the killed attempt: shard 0's failures file is on disk, its parquet file is not
    run_embedding(tmp_path / "in", out, model=model, shard_size=2)
    (out / "part-00000.parquet").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(shards_done=[1], complete=False)
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "failures.jsonl").unlink()
    assert (out / ".failures" / "part-00000.jsonl").exists()
    files[1].write_bytes(broken)  # the user fixes the file, then resumes
    run_embedding(tmp_path / "in", out, model=model, shard_size=2)
    rows, _, _ = read_output(out)
    assert [path for path, _ in rows] == [str(f) for f in files]  # every input exactly once ...
    assert failures(out) == []  # ... and no stale failure record
    assert not (out / ".failures" / "part-00000.jsonl").exists()


def test_hard_linked_tar_members_are_read_and_symlinks_are_failures(tmp_path, model):
    """GNU tar stores a hard-linked file's second name as a link member; it was dropped without a trace."""
    images = list(tiles(3))
    folder = tmp_path / "src"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"k{i}.jpg", quality=90)
    os.link(folder / "k0.jpg", folder / "k3.jpg")  # a second name of k0
    (folder / "k3.cls").write_text("3")
    os.symlink("k1.jpg", folder / "k4.jpg")
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("k0.jpg", "k1.jpg", "k2.jpg", "k3.jpg", "k3.cls", "k4.jpg"):
            tar.add(folder / name, arcname=name)
    with tarfile.open(shard) as tar:
        assert tar.getmember("k3.jpg").islnk()
    out = run_embedding(shard, tmp_path / "out", model=model, shard_size=10).output_dir
    rows, vectors, records = read_output(out)
    assert [key for _, key in rows] == ["k0", "k1", "k2", "k3"] and records[3]["cls"] == "3"
    np.testing.assert_array_equal(vectors[3], vectors[0])  # the same bytes, read through the link
    [failure] = failures(out)
    assert failure["key"] == "k4" and "symbolic link inside the tar" in failure["reason"]


def test_a_txt_list_saved_with_a_byte_order_mark_keeps_its_first_entry(tmp_path, model):
    files = write_tile_folder(tmp_path / "in", 2, nested=False)
    listing_file = tmp_path / "list.txt"
    listing_file.write_text("\n".join(f.name for f in files) + "\n", encoding="utf-8-sig")  # Notepad's BOM
    (tmp_path / "list.txt").rename(tmp_path / "in" / "list.txt")
    out = run_embedding(tmp_path / "in" / "list.txt", tmp_path / "out", model=model).output_dir
    assert len(read_output(out)[0]) == 2 and failures(out) == []


def test_a_txt_list_keeps_spaces_that_are_part_of_a_file_name(tmp_path, model):
    """Probe 15: each line was stripped, so ' lead.png' (which a folder walk embeds) could not be listed
    and its failure record named a file that does not exist. Windows line endings still work."""
    files = write_tile_folder(tmp_path / "in", 2, nested=False)
    spaced = files[0].rename(files[0].with_name(" lead.png"))
    (tmp_path / "in" / "list.txt").write_bytes(f" lead.png\r\n  # a comment\n\n{files[1].name}\r\n".encode())
    out = run_embedding(tmp_path / "in" / "list.txt", tmp_path / "out", model=model).output_dir
    rows, _, _ = read_output(out)
    assert [path for path, _ in rows] == [str(spaced), str(files[1])] and failures(out) == []


@pytest.mark.parametrize(("env", "name"), [({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK"),
                                           ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE")])  # fmt: skip
def test_environment_ranks_are_checked(tmp_path, model, monkeypatch, env, name):
    from visreg_hub.errors import ConfigError

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    write_tile_folder(tmp_path / "in", 2, nested=False)
    with pytest.raises(ConfigError, match=f"environment variable {name} must be >="):
        run_embedding(tmp_path / "in", tmp_path / "out", model=model)


def test_a_tar_key_stored_twice_embeds_the_first_copy_and_fails_the_second(tmp_path, caplog):
    """``tar`` keeps the later of two members with one name; the listing takes the first, for the image and
    its side files alike (the Ray plans do too); the second image is a failed item of its own (it was only a
    warning, printed once per listing pass)."""
    from tests.bulk.helpers import tiles

    first, second = tiles(2)
    members = []
    for image, cls in ((first, b"1"), (second, b"2")):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        members += [("k.png", buffer.getvalue()), ("k.cls", cls)]
    shard = tmp_path / "dup.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, logger="visreg_hub.bulk.listing"):
        item, second_copy = list(listing.iter_items([str(shard)], read=lambda position: True))
    assert item.payload == members[0][1] and item.cls == "1" and item.error is None
    assert (second_copy.key, second_copy.member, second_copy.payload) == ("k", "k.png", None)
    assert second_copy.error == (
        f"{shard}#k: k.png is stored twice in the tar; the first copy is embedded, not this one (tar would "
        f"extract this one); remove the duplicate"
    )
    assert caplog.records == []


def test_a_resumed_runs_summary_says_what_the_whole_job_failed(tmp_path, model):
    """Probe 12: re-running a finished job printed "embedded 0, failed 0 ... complete" while
    failures.jsonl listed the job's failures; the counts are this run's, and the job's are added."""
    files = write_tile_folder(tmp_path / "in", 4, nested=False)
    files[1].write_bytes(b"not an image")
    first = run_embedding(tmp_path / "in", tmp_path / "out", model=model, shard_size=2)
    assert (first.embedded, first.failed, first.job_failed) == (3, 1, 1)
    again = run_embedding(tmp_path / "in", tmp_path / "out", model=model, shard_size=2)
    assert (again.embedded, again.failed, again.shards_skipped, again.job_failed) == (0, 0, 2, 1)
    line = again.line()
    assert line.startswith("this run: embedded 0, failed 0") and "1 image(s) of the job failed" in line
    assert len(failures(tmp_path / "out")) == 1
