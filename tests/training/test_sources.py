"""training.sources: labels from real package layouts, the .pat reader, atomic unpack, the committed split."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import sources

FIXTURE_ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "sources"


@pytest.fixture()
def root(monkeypatch):
    monkeypatch.setenv(sources.SOURCES_ENV, str(FIXTURE_ROOT))
    return FIXTURE_ROOT


def test_root_env_and_default(monkeypatch, tmp_path):
    monkeypatch.delenv(sources.SOURCES_ENV, raising=False)
    assert sources.sources_root() == Path.home() / ".cache" / "visreg_hub" / "sources"
    monkeypatch.setenv(sources.SOURCES_ENV, str(tmp_path))
    assert sources.sources_root() == tmp_path
    assert sources.sources_root("/x") == Path("/x")


@pytest.mark.parametrize(
    ("name", "label"),
    [("mountain12-sfiera.jpg", "mountain"), ("beach0.jpg", "beach"), ("canyon01.jpg", "canyon"),
     ("earthrise.jpg", "earthrise"), ("snow10-sfiera.jpg", "snow"), ("bwerner3.jpg", None),
     ("myrabella0.jpg", None), ("notes.txt", None)],
)  # fmt: skip
def test_endless_sky_label(name, label):
    assert sources.endless_sky_label(name) == label


def test_listings_on_real_package_layouts(root):
    sky = sources.list_source("endless_sky")
    assert {i.path.name: i.label for i in sky} == {
        "beach0.jpg": "beach", "beach1.jpg": "beach", "beach7-sfiera.jpg": "beach", "city0.jpg": "city",
        "city13-sfiera.jpg": "city", "bwerner0.jpg": None,
    }  # fmt: skip
    tux = sources.list_source("tuxpaint")
    assert sorted((i.path.name, i.label) for i in tux) == [
        ("hornet.png", "animals"),
        ("kangaroo-silo.png", "animals"),
        ("koala.png", "animals"),
    ]
    clip = sources.list_source("openclipart")
    assert sorted(i.label for i in clip) == ["animals", "food", "food"]  # the symlink in animals/ skipped
    assert any(p.is_symlink() for p in (root / "unpacked/openclipart-png").rglob("*.png"))
    assert all(i.path.is_file() and i.path.is_absolute() for i in sky + tux + clip)


def test_missing_package_names_the_fix(root):
    with pytest.raises(FileNotFoundError, match=r"prepare_sources\.py"):
        sources.list_source("stellarium")
    with pytest.raises(ValueError, match="unknown source"):
        sources.list_source("imagenet")


def test_gimp_pattern_reader_against_pixels_written_by_hand(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    name = b"test\x00"
    header = np.array([24 + len(name), 1, 7, 5, 3], ">u4").tobytes() + b"GPAT" + name
    path = tmp_path / "p.pat"
    path.write_bytes(header + pixels.tobytes())
    np.testing.assert_array_equal(sources.read_gimp_pattern(path), pixels)
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    path.write_bytes(np.array([24, 1, 4, 3, 1], ">u4").tobytes() + b"GPAT" + gray.tobytes())
    np.testing.assert_array_equal(sources.read_gimp_pattern(path), np.repeat(gray, 3, axis=2))
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="not a GIMP pattern"):
        sources.read_gimp_pattern(path)


def test_real_gimp_pattern_converts_with_folder_label(root, tmp_path, monkeypatch):
    # list_gimp_patterns caches PNGs under <root>/derived: work on a copy so the fixture stays read-only.
    import shutil

    shutil.copytree(root, tmp_path / "src")
    monkeypatch.setenv(sources.SOURCES_ENV, str(tmp_path / "src"))
    items = sources.list_source("gimp_patterns")
    assert [(i.path.name, i.label) for i in items] == [("granite1.png", "Stone")]
    image = np.asarray(Image.open(items[0].path))
    raw = (tmp_path / "src/unpacked/gimp-data/usr/share/gimp/2.0/patterns/Stone/granite1.pat").read_bytes()
    header_size, _, width, height, depth = np.frombuffer(raw[:20], ">u4")
    assert image.shape == (height, width, 3)
    expected = np.frombuffer(raw, np.uint8, offset=int(header_size)).reshape(height, width, depth)
    expected = np.repeat(expected[..., :1], 3, axis=2) if depth < 3 else expected[..., :3]
    np.testing.assert_array_equal(image, expected)


def _texture_pk3(path: Path, members: dict[str, Image.Image | str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            if isinstance(content, str):
                archive.writestr(name, content)
                continue
            handle = io.BytesIO()
            content.save(handle, format={"jpg": "JPEG", "tga": "TGA"}.get(name.rsplit(".", 1)[-1], "PNG"))
            archive.writestr(name, handle.getvalue())


def test_game_textures_keep_diffuse_surfaces_only(tmp_path, monkeypatch):
    """Normal/gloss/glow maps, tiny images, flat grey fills and files outside ``textures/<set>/`` are dropped;
    what stays is pixel-identical to the archive's (lossless members) and unlabelled."""
    rng = np.random.default_rng(0)

    def noise(side: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))

    plate, clouds, brick = noise(80), noise(64), noise(96)
    unpacked = tmp_path / "unpacked"
    _texture_pk3(unpacked / "nexuiz-textures/usr/share/games/nexuiz/data/textures.pk3", {
        "textures/metal/plate.tga": plate, "textures/metal/plate_norm.tga": noise(80),
        "textures/metal/plate_gloss.png": noise(80),
        "textures/metal/flat.png": Image.new("RGB", (80, 80), (128, 130, 127)),
        "textures/metal/tiny.png": noise(32), "textures/skies/clouds.png": clouds,
        "textures/top.png": noise(80),
        "textures/metal/notes.txt": "not an image", "textures/metal/broken.png": "not a png either",
    })  # fmt: skip
    _texture_pk3(unpacked / "openarena-081-textures/usr/share/games/openarena/baseoa/pak4-textures.pk3", {
        "textures/base_wall/brick.png": brick, "textures/base_wall/brick_glow.png": noise(96),
    })  # fmt: skip
    for package in sources.SOURCE_PACKAGES["game_textures"]:
        (unpacked / package / ".complete").write_text("{}")
    monkeypatch.setenv(sources.SOURCES_ENV, str(tmp_path))

    items = sources.list_source("game_textures")
    assert sorted(i.path.relative_to(tmp_path / "derived/game_textures").as_posix() for i in items) == [
        "base_wall/brick.png", "metal/plate.png", "skies/clouds.png"]  # fmt: skip
    assert {(i.label, i.source) for i in items} == {(None, "game_textures")}
    expected = {"plate.png": plate, "clouds.png": clouds, "brick.png": brick}
    for item in items:
        np.testing.assert_array_equal(np.asarray(Image.open(item.path)), np.asarray(expected[item.path.name]))
    # Extracted once: the cache answers without the archives.
    shutil.rmtree(unpacked / "nexuiz-textures/usr")
    assert [i.path for i in sources.list_source("game_textures")] == [i.path for i in items]


def test_opt_in_sources_stay_out_of_the_colour_model_defaults():
    """The bundled model's data is rebuilt from COLOUR_SOURCES; a source added later must not join it."""
    assert "game_textures" in sources.LISTINGS and "game_textures" not in sources.COLOUR_SOURCES
    assert set(sources.COLOUR_SOURCES) | {"game_textures"} == set(sources.LISTINGS)


def _make_deb(tmp_path: Path) -> Path:
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        "Package: tiny\nVersion: 1.0-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    (tree / "usr/share/tiny").mkdir(parents=True)
    (tree / "usr/share/tiny/hello.txt").write_text("hello")
    deb = tmp_path / "tiny_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True,
                   capture_output=True)  # fmt: skip
    return deb


def test_unpack_deb_and_wheel_atomic_and_idempotent(tmp_path):
    deb = _make_deb(tmp_path)
    target = tmp_path / "unpacked" / "tiny"
    (target.parent / "tiny.tmp").mkdir(parents=True)  # an interrupted earlier run
    (target.parent / "tiny.tmp" / "junk").write_text("x")
    sources.unpack(deb, "deb", target)
    assert (target / "usr/share/tiny/hello.txt").read_text() == "hello"
    assert not (target.parent / "tiny.tmp").exists() and not (target / "junk").exists()
    (target / "usr/share/tiny/hello.txt").write_text("kept")  # a second call must not unpack again
    sources.unpack(deb, "deb", target)
    assert (target / "usr/share/tiny/hello.txt").read_text() == "kept"

    wheel = tmp_path / "w-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/data/x.bin", b"\x01\x02")
    assert (sources.unpack(wheel, "wheel", tmp_path / "w") / "pkg/data/x.bin").read_bytes() == b"\x01\x02"


def test_fetch_reuses_downloads_without_network(tmp_path, monkeypatch):
    deb = _make_deb(tmp_path)
    root = tmp_path / "root"
    (root / "downloads").mkdir(parents=True)
    # The name apt-get download gives an epoch version: '1:0.18+dfsg-19' -> '1%3a0.18+dfsg-19'.
    package = sources.Package("tiny", "1:1.0-1", "deb", "test")
    deb.rename(root / "downloads" / "tiny_1%3a1.0-1_all.deb")
    monkeypatch.setitem(sources.PACKAGES, "tiny", package)

    def no_network(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess {args}")

    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(sources.packages.subprocess, "run",
                        lambda cmd, **kw: calls.append(cmd[0]) or (no_network(cmd) if cmd[0] != "dpkg" else
                                                                    real_run(cmd, **kw)))  # fmt: skip
    folders = sources.fetch(["tiny"], root)
    assert (folders["tiny"] / "usr/share/tiny/hello.txt").is_file() and calls == ["dpkg"]
    sources.fetch(["tiny"], root)  # complete: nothing runs
    assert calls == ["dpkg"]


def _items(source: str, counts: dict[str, int]) -> list[sources.Item]:
    root = Path("/r")
    return [sources.Item(root / source / label / f"{i}.png", label, source)
            for label, n in counts.items() for i in range(n)]  # fmt: skip


def test_split_is_seeded_stratified_and_disjoint():
    items = {"a": _items("a", {"x": 10, "y": 20, "tiny": 3}), "b": _items("b", {"z": 200})}
    split = sources.make_split(
        items, {"a": 0.3, "b": 0.5}, min_class_size=5, max_test_per_class=60, root="/r"
    )
    assert split == sources.make_split(items, {"a": 0.3, "b": 0.5}, 5, 60, root="/r")
    assert split != sources.make_split(items, {"a": 0.3, "b": 0.5}, 5, 60, seed=1, root="/r")
    a, b = split["sources"]["a"], split["sources"]["b"]
    assert a["classes"] == ["x", "y"] and a["dropped_classes"] == ["tiny"]
    assert sorted(a["test"].values()).count("x") == 3 and list(a["test"].values()).count("y") == 6
    assert len(b["test"]) == 60  # capped
    train, test = sources.partition(items["a"], split, root="/r")
    assert len(train) + len(test) == 33 and not {i.path for i in train} & {i.path for i in test}
    assert {i.label for i in train} == {"x", "y", None}  # the dropped class trains unlabelled
    assert all(a["test"][sources.relative_key(i, "/r")] == i.label for i in test)


def test_committed_split_matches_the_labelling_rules():
    split = sources.load_split()
    sky = split["sources"]["endless_sky"]
    assert len(sky["test"]) >= 40 and set(sky["test"].values()) <= set(sky["classes"])
    for key, label in sky["test"].items():
        assert (
            key.startswith("unpacked/endless-sky-data/")
            and sources.endless_sky_label(Path(key).name) == label
        )
    for key, label in split["sources"]["tuxpaint"]["test"].items():
        assert key.split("usr/share/tuxpaint/stamps/")[1].split("/")[0] == label
    for key, label in split["sources"]["openclipart"]["test"].items():
        assert key.split("usr/share/openclipart/png/")[1].split("/")[0] == label
    keys = [k for entry in split["sources"].values() for k in entry["test"]]
    assert len(keys) == len(set(keys))
    json.dumps(split)  # plain JSON types only
