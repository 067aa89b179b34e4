"""Tar members that are not one plain image per key (a second image of a key, hard links, a truncated
shard), and folder entries that are not regular files: every image member or entry is a row or a failure."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.bulk.helpers import ROOT, failures, read_output, tiles
from tests.fixtures_models import tiny_encoder
from visreg_hub.bulk import listing, run_embedding
from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference import encode
from visreg_hub.inference.images import ImageSource, decode_image
from visreg_hub.inference.inputs import list_image_files

pytest.importorskip("pyarrow")

GALLERY_JPEGS = sorted((ROOT / "demo" / "assets" / "photo-gallery").glob("*/*.jpg"))


@pytest.fixture(scope="module")
def model():
    return tiny_encoder()


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(path: Path, members: list[tuple[str, bytes | str]]) -> None:
    """``(name, bytes)`` is a file member, ``(name, "->target")`` a hard link to ``target``."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.LNKTYPE, data.removeprefix("->")
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_every_image_member_of_a_key_is_a_row_or_a_failure(tmp_path, model, caplog, capfd):
    """The same name stored twice was embedded nowhere and reported only as a warning, once per listing
    pass; it is a failure record now. Another image field of a sample (``dup.seg.png`` beside
    ``dup.png``, a segmentation mask) is the sample's other data: not embedded, not a failure."""
    images = [_png(tile) for tile in tiles(6)]
    members = [("a.png", images[0]), ("dup.png", images[1]), ("dup.seg.png", images[2]), ("dup.cls", b"7"),
               ("b.png", images[3]), ("c.png", images[4]), ("c.png", images[5])]  # fmt: skip
    _write_shard(tmp_path / "s.tar", members)
    image_members = [name for name, _ in members if not name.endswith((".cls", ".seg.png"))]
    with caplog.at_level(logging.WARNING):
        # shard_size 2: the failed items shift the positions, which decide whose bytes are read
        summary = run_embedding(tmp_path / "s.tar", tmp_path / "out", model=model, shard_size=2)
    assert (summary.embedded, summary.failed) == (4, 1) and summary.embedded + summary.failed == len(
        image_members
    )
    rows, vectors, records = read_output(tmp_path / "out")
    assert [key for _, key in rows] == ["a", "dup", "b", "c"] and records[1]["cls"] == "7"
    firsts = [images[0], images[1], images[3], images[4]]  # the first image member of each key
    np.testing.assert_allclose(vectors, encode(model, firsts, convert_to_numpy=True), atol=1e-6)
    shard = tmp_path / "s.tar"
    assert [(record["key"], record["reason"]) for record in failures(tmp_path / "out")] == [
        ("c", f"{shard}#c: c.png is stored twice in the tar; the first copy is embedded, not this one (tar "
              "would extract this one); remove the duplicate"),
    ]  # fmt: skip
    assert not [record for record in caplog.records if record.name == "visreg_hub.bulk.listing"]
    assert "second image" not in capfd.readouterr().err
    names_pass = [(item.key, item.error) for item in listing.iter_items([str(shard)])]
    read_pass = [(item.key, item.error) for item in listing.iter_items([str(shard)], read=lambda i: True)]
    assert names_pass == read_pass and len(names_pass) == len(image_members)


def _gallery_shard(path: Path) -> dict[str, bytes]:
    """Members a.jpg, b.jpg, c.jpg (a hard link to a.jpg), d.jpg ... g.jpg of real photos; returns the
    bytes each name reads as."""
    photos = [p.read_bytes() for p in GALLERY_JPEGS[:6]]
    assert len(photos) == 6
    members = [("a.jpg", photos[0]), ("b.jpg", photos[1]), ("c.jpg", "->a.jpg")]
    members += [(f"{name}.jpg", data) for name, data in zip("defg", photos[2:], strict=True)]
    _write_shard(path, members)
    return {name: photos[0] if name == "c.jpg" else data for name, data in members}


def test_a_hard_link_in_a_truncated_shard_loses_only_the_damaged_tail(tmp_path, model):
    """``getmember`` on the link read the whole member table, hit the truncation, and every member after
    the link became one "<unreadable rest>" failure."""
    content = _gallery_shard(tmp_path / "whole.tar")
    with tarfile.open(tmp_path / "whole.tar") as tar:
        last = tar.getmember("g.jpg")
        assert tar.getmember("c.jpg").islnk()
    damaged = tmp_path / "damaged.tar"
    shutil.copyfile(tmp_path / "whole.tar", damaged)
    os.truncate(damaged, last.offset_data + last.size // 2)  # partway through g.jpg's data
    readable = []  # the members that tarfile itself still reads before it meets the truncation
    with tarfile.open(damaged) as tar, contextlib.suppress(tarfile.ReadError):
        for member in tar:
            readable.append(member.name)
    assert readable[:6] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"]

    for shard, keys in ((tmp_path / "whole.tar", list("abcdefg")), (damaged, list("abcdef"))):
        out = tmp_path / f"out-{shard.stem}"
        run_embedding(shard, out, model=model, shard_size=4)
        rows, vectors, _ = read_output(out)
        assert [key for _, key in rows] == keys
        expected = encode(model, [content[f"{key}.jpg"] for key in keys], convert_to_numpy=True)
        np.testing.assert_allclose(vectors, expected, atol=1e-6)
        np.testing.assert_array_equal(vectors[2], vectors[0])  # c.jpg reads a.jpg's bytes
    tail = failures(tmp_path / "out-damaged")
    assert tail and {record["key"] for record in tail} <= {"g", "<unreadable rest>"}
    assert not (tmp_path / "out-whole" / "failures.jsonl").exists() or failures(tmp_path / "out-whole") == []


def test_a_hard_link_to_a_later_or_missing_member_fails_alone(tmp_path, model):
    photos = [p.read_bytes() for p in GALLERY_JPEGS[:2]]
    members = [("a.jpg", photos[0]), ("ahead.jpg", "->z.jpg"), ("nowhere.jpg", "->missing.jpg"),
               ("z.jpg", photos[1])]  # fmt: skip
    _write_shard(tmp_path / "s.tar", members)
    out = run_embedding(tmp_path / "s.tar", tmp_path / "out", model=model).output_dir
    rows, vectors, _ = read_output(out)
    assert [key for _, key in rows] == ["a", "z"]
    np.testing.assert_allclose(vectors, encode(model, photos, convert_to_numpy=True), atol=1e-6)
    reasons = {record["key"]: record["reason"] for record in failures(out)}
    assert set(reasons) == {"ahead", "nowhere"}
    for key, target in (("ahead", "z.jpg"), ("nowhere", "missing.jpg")):
        assert reasons[key].startswith(f"{tmp_path / 's.tar'}#{key}: {key}.jpg is a hard link to {target!r}")
        assert "not a file stored earlier in the tar" in reasons[key] and "--hard-dereference" in reasons[key]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_a_bulk_folder_and_encode_folder_list_and_explain_the_same_entries(tmp_path):
    """``encode(folder)`` dropped a FIFO that the bulk listing reported; both now use one classifier."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (root / "photo.jpg").write_bytes(GALLERY_JPEGS[0].read_bytes())
    (root / "sub" / "inner.jpg").write_bytes(GALLERY_JPEGS[1].read_bytes())
    os.mkfifo(root / "fifo.jpg")
    (root / "loop1.jpg").symlink_to("loop2.jpg")
    (root / "loop2.jpg").symlink_to("loop1.jpg")
    (root / "sub" / "back").symlink_to(root)  # a cycle, if symlinked folders were followed
    bulk = {item.path: item.error for item in listing.iter_items([str(root)])}
    assert sorted(bulk) == sorted(str(path) for path in list_image_files(root))
    assert len(bulk) == 5
    for path, error in bulk.items():
        if error is None:
            continue
        assert "fifo" in path or "loop" in path
        # only the entry's status is read (a FIFO is never opened): the decoder gives the listing's reason
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(ImageSource(Path(path), path))
        assert str(caught.value) == error


@pytest.mark.parametrize("cut", ["at a header", "inside a header"])
def test_a_shard_cut_between_members_says_so(tmp_path, model, cut):
    """tarfile reads an archive cut at (or inside) a member header as a normal end: the members after the
    cut vanished without a word. The listing now checks for the end-of-archive block."""
    images = [_png(tile) for tile in tiles(5)]
    whole = tmp_path / "whole.tar"
    _write_shard(whole, [(f"k{i}.png", data) for i, data in enumerate(images)])
    with tarfile.open(whole) as tar:
        fourth = tar.getmember("k3.png").offset  # where the fourth member's header starts
    shard = tmp_path / "cut.tar"
    shard.write_bytes(whole.read_bytes()[: fourth + (0 if cut == "at a header" else 100)])
    summary = run_embedding(shard, tmp_path / "out", model=model, shard_size=10)
    rows, vectors, _ = read_output(tmp_path / "out")
    assert [key for _, key in rows] == ["k0", "k1", "k2"] and (summary.embedded, summary.failed) == (3, 1)
    np.testing.assert_allclose(vectors, encode(model, images[:3], convert_to_numpy=True), atol=1e-6)
    [record] = failures(tmp_path / "out")
    assert record["key"] == "<end of archive>"
    assert "ends without its end-of-archive marker" in record["reason"]
    complete = run_embedding(whole, tmp_path / "whole-out", model=model, shard_size=10)
    assert (complete.embedded, complete.failed) == (5, 0)  # an intact shard has its marker
