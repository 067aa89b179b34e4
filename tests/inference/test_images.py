"""Robust decoding: every malformed or unusual input has one documented, asserted outcome."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from tests.inference import malformed
from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS, ImageSource, decode_image
from visreg_hub.inference.inputs import expand_inputs, is_single_image, list_image_files


@pytest.fixture
def photo(photo_paths):
    return malformed.photo_rgb(photo_paths[1])


def decode_file(tmp_path, name: str, data: bytes, **kwargs) -> Image.Image:
    path = malformed.write(tmp_path / name, data)
    return decode_image(ImageSource(path, str(path)), **kwargs)


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


# ----------------------------------------------------------------------------- failures (documented errors)
def test_truncated_jpeg_fails_naming_file(tmp_path, photo_paths):
    data = photo_paths[0].read_bytes()
    with pytest.raises(ImageDecodeError, match=r"half\.jpg: truncated or corrupt image data"):
        decode_file(tmp_path, "half.jpg", data[: len(data) // 2])
    # losing only the last bytes is still detected (forced .load(), no LOAD_TRUNCATED_IMAGES)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_file(tmp_path, "tail.jpg", data[:-10])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_fails_but_missing_iend_only_decodes(tmp_path, photo):
    data = malformed.png_bytes(photo)
    with pytest.raises(ImageDecodeError, match=r"half\.png: truncated or corrupt image data"):
        decode_file(tmp_path, "half.png", data[: len(data) // 2])
    # documented: every pixel row present, only the 12-byte IEND chunk lost -> decodes identically
    no_end = decode_file(tmp_path, "no_iend.png", data[:-12])
    np.testing.assert_array_equal(pixels(no_end), np.asarray(photo))


def test_zero_byte_file(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        decode_file(tmp_path, "empty.jpg", b"")


def test_text_file_with_image_extension(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"notes\.jpg: not an image in an accepted format \(JPEG, "):
        decode_file(tmp_path, "notes.jpg", b"this is a text file, not a JPEG\n" * 20)


def test_decompression_bomb_header_is_refused_by_pillow_limit(tmp_path):
    """Pillow's own guard fires first (before our cap could read the size); the message names only our
    cap and the image's pixel count, not Pillow's second limit."""
    with pytest.raises(ImageDecodeError) as caught:
        decode_file(tmp_path, "bomb.png", malformed.png_header_only(100_000, 100_000))
    message = str(caught.value)
    expected = (
        f"bomb.png: image is {100_000 * 100_000:,} pixels, above the cap "
        f"max_pixels={DEFAULT_MAX_PIXELS:,} (decompression-bomb guard); raise the cap only for files you "
        "trust"
    )
    assert expected in message
    assert "--max-pixels of visreg-hub embed" in message
    assert str(2 * Image.MAX_IMAGE_PIXELS) not in message and "exceeds limit" not in message


def test_pixel_cap_is_checked_from_header_before_decoding(tmp_path, photo_paths):
    # the file has no pixel data at all: a cap error (not "truncated") proves nothing was decoded
    message = r"2000x2000 = 4,000,000 pixels, above the cap max_pixels=1,000,000"
    with pytest.raises(ImageDecodeError, match=message):
        decode_file(tmp_path, "big.png", malformed.png_header_only(2000, 2000), max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="max_pixels=100"):
        decode_image(ImageSource(photo_paths[0], "p"), max_pixels=100)
    uncapped = decode_image(ImageSource(photo_paths[0], "p"), max_pixels=None)
    assert uncapped.size == Image.open(photo_paths[0]).size
    assert DEFAULT_MAX_PIXELS == 89_478_485  # Pillow's default warning threshold


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "missing.png"
    with pytest.raises(ImageDecodeError, match=r"missing\.png: file not found"):
        decode_image(ImageSource(missing, str(missing)))


def test_directory_without_images_becomes_a_failing_item(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    (sources,) = expand_inputs(str(folder))
    assert sources.label == str(folder)
    with pytest.raises(ImageDecodeError, match="directory contains no image files"):
        decode_image(sources)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(3, np.uint8), r"array of shape \(3,\) must be \(H, W\) or \(H, W, C\)"),
        (np.zeros((4, 4, 5), np.uint8), r"array of shape \(4, 4, 5\)"),
        (np.zeros((3, 8, 9), np.uint8), r"channels-first\? use array.transpose\(1, 2, 0\)"),
        (np.zeros((7, 28, 28), np.uint8), r"7 stacked grayscale images\? pass array\[\.\.\., None\]"),
        (np.zeros((0, 5, 3), np.uint8), "has no pixels"),
        (np.zeros((4, 4, 3), np.int64), "array dtype int64 is not supported"),
        (np.full((4, 4, 3), 2.0, np.float32), r"values span \[2, 2\] but raw pixels must be in \[0, 1\]"),
    ],
)
def test_bad_numpy_arrays(array, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(ImageSource(array, "item 7"))


def test_four_d_array_with_five_channels_is_one_failing_item():
    sources = expand_inputs([np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 4, 5), np.uint8)])
    assert [s.label for s in sources] == ["item 0[0]", "item 0[1]", "item 1"]
    message = r"item 1: 4-D input of shape \(2, 4, 4, 5\) must be a \(N, H, W, C\)"
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(sources[2])


@pytest.mark.parametrize(
    ("batch", "hint"),
    [(np.zeros((2, 3, 8, 8), np.uint8), r"channels-first\? use array.transpose\(0, 2, 3, 1\)"),
     (torch.zeros((2, 8, 8, 3), dtype=torch.uint8), r"channels-last\? use tensor.permute\(0, 3, 1, 2\)")],
)  # fmt: skip
def test_a_batch_in_the_other_layout_names_the_transpose(batch, hint):
    (source,) = expand_inputs([batch])
    with pytest.raises(ImageDecodeError, match=hint):
        decode_image(source)
    fixed = batch.transpose(0, 2, 3, 1) if isinstance(batch, np.ndarray) else batch.permute(0, 3, 1, 2)
    assert len(expand_inputs([fixed])) == 2  # the hint's fix is accepted: two images


def test_nan_in_float_array():
    array = np.full((4, 4, 3), 0.5, np.float32)
    array[1, 2, 0] = np.nan
    with pytest.raises(ImageDecodeError, match="item 3: float array contains NaN"):
        decode_image(ImageSource(array, "item 3"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_tensor_wrong_dtype(dtype):
    with pytest.raises(ImageDecodeError, match=f"item 2: tensor dtype {dtype} is not supported"):
        decode_image(ImageSource(torch.zeros(3, 4, 4, dtype=dtype), "item 2"))


def test_normalised_or_channels_last_tensor_is_refused():
    with pytest.raises(ImageDecodeError, match=r"model\(batch\) directly"):
        decode_image(ImageSource(torch.randn(3, 8, 8), "item 0"))
    with pytest.raises(ImageDecodeError, match=r"channels-last, use tensor.permute\(2, 0, 1\)"):
        decode_image(ImageSource(torch.rand(8, 8, 3), "item 0"))


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0000001), (-1e-7, 0.5), (0.25, 1.005)])
@pytest.mark.parametrize("kind", ["tensor", "array"])
def test_values_a_hair_outside_the_unit_range_print_exactly_and_say_clamp(kind, low, high):
    """1.0000001 used to print as 1, giving "values span [0, 1] but raw pixels must be in [0, 1]"."""
    values = np.full((3, 6, 5), 0.5, np.float32)
    values.flat[0], values.flat[-1] = low, high
    payload = torch.from_numpy(values) if kind == "tensor" else values.transpose(1, 2, 0)
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(ImageSource(payload, "item 4"))
    message = str(caught.value)
    span = re.search(r"values span \[(\S+), (\S+)\] but raw pixels must be in \[0, 1\]", message)
    assert span, message
    # the printed bounds read back as the exact float32 extremes (the independent reference)
    assert (np.float32(span[1]), np.float32(span[2])) == (values.min(), values.max())
    clamp = "tensor.clamp(0, 1)" if kind == "tensor" else "np.clip(array, 0, 1)"
    assert clamp in message and "divide 0-255 data by 255" not in message


def test_unsupported_input_type_is_a_failing_item():
    (source,) = expand_inputs([None])
    with pytest.raises(ImageDecodeError, match="item 0: unsupported input type NoneType"):
        decode_image(source)


# ------------------------------------------------------------------------- conversions (documented outcomes)
def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 40000], [65535, 128, 129, 30000]], dtype=np.uint16)
    decoded = pixels(decode_file(tmp_path, "deep.png", malformed.sixteen_bit_png(values)))
    expected = np.rint(values / 257.0).astype(np.uint8)  # 40000 -> 156 (clipping would give 255)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], expected)


def test_eight_bit_values_in_an_int32_image_are_read_as_pillow_reads_them(photo):
    """``L.convert("I")`` and ``L.convert("F")`` hold 8-bit values in a 32-bit container: read as is (they
    came out about 257x darker, or stretched to full contrast); an ``I`` image with values above 255 is
    16-bit data, scaled like I;16."""
    grey = photo.convert("L")
    for mode in ("I", "F"):
        wide = grey.convert(mode)
        assert wide.mode == mode and np.asarray(wide).max() > 1  # not the [0, 1] float convention
        np.testing.assert_array_equal(pixels(decode_image(wide)), np.asarray(grey.convert("RGB")))
        np.testing.assert_array_equal(pixels(decode_image(wide)), np.asarray(wide.convert("RGB")))
    # review: float data that merely overshoots 1 (linear/HDR) is not 8-bit levels: stretched, never black
    ramp = np.linspace(0.0, 0.9995, 64, dtype=np.float32).reshape(8, 8)
    for values in (ramp, ramp * 1.001):
        decoded = pixels(decode_image(Image.fromarray(values, mode="F")))[..., 0].astype(np.int64)
        assert decoded.max() == 255 and decoded.min() == 0 and abs(decoded.mean() - 127.5) < 1.0
    # review of that fix (p20): an 8-bit image handled as floats (resized) keeps fractions, yet it is levels
    low_contrast = grey.point(lambda v: 40 + v // 2).convert("F").resize((61, 47), Image.BILINEAR)
    assert not np.all(np.asarray(low_contrast) == np.rint(np.asarray(low_contrast)))
    difference = pixels(decode_image(low_contrast)).astype(int) - np.asarray(low_contrast.convert("RGB"))
    assert np.abs(difference).max() <= 1  # Pillow's rounding; the stretch was up to 119 levels off
    # review of probe 20: [0, 1] data with one highlight past 2.0 was read as levels (black, cosine 0.45)
    highlight = np.linspace(0.0, 0.9995, 1024, dtype=np.float32).reshape(32, 32)
    highlight[0, 0] = 2.01  # one pixel in 1,024
    decoded = pixels(decode_image(Image.fromarray(highlight, mode="F")))[..., 0].astype(np.int64)
    assert decoded[0, 0] == 255 and abs(decoded.mean() - 127.5) < 4.0
    deep = np.array([[0, 256, 1000, 65535]], dtype=np.int32)
    expected = np.rint(deep / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(pixels(decode_image(Image.fromarray(deep, mode="I")))[..., 0], expected)


def test_cmyk_jpeg_converts_to_matching_rgb(tmp_path, photo):
    buffer = io.BytesIO()
    photo.convert("CMYK").save(buffer, "JPEG", quality=95)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "CMYK"
    decoded = pixels(decode_file(tmp_path, "cmyk.jpg", buffer.getvalue()))
    error = np.abs(decoded.astype(int) - np.asarray(photo).astype(int))
    assert error.mean() < 2.0  # JPEG loss only; an inverted/naive CMYK decode is off by ~100


def test_palette_transparency_is_composited_on_white(tmp_path):
    decoded = pixels(decode_file(tmp_path, "pal.png", malformed.palette_png_with_transparency()))
    white, blue = [255, 255, 255], [0, 0, 255]
    assert decoded.tolist() == [[white, blue], [blue, white]]  # the transparent red index became white


def test_rgba_and_la_are_composited_on_white():
    rgba = np.array([[[255, 0, 0, 0], [0, 255, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    decoded = pixels(decode_image(Image.fromarray(rgba)))
    assert decoded[0, 0].tolist() == [255, 255, 255]
    assert decoded[0, 1].tolist() == [0, 255, 0]
    half = 255 * (1 - 128 / 255)  # black at alpha 128 over white
    np.testing.assert_allclose(decoded[0, 2], [half] * 3, atol=1)
    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8))
    assert la.mode == "LA"
    assert pixels(decode_image(la)).tolist() == [[[255, 255, 255], [50, 50, 50]]]


def test_animated_gif_uses_first_frame(tmp_path):
    decoded = pixels(decode_file(tmp_path, "anim.gif", malformed.animated_gif([(255, 0, 0), (0, 0, 255)])))
    assert decoded.shape == (6, 8, 3)
    assert (decoded == [255, 0, 0]).all()


def test_exif_orientation_6_is_applied(tmp_path, photo):
    data = malformed.jpeg_with_orientation(photo, 6)
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # stored pixels, orientation ignored
    decoded = pixels(decode_file(tmp_path, "rotated.jpg", data))
    assert decoded.shape == (raw.shape[1], raw.shape[0], 3)
    np.testing.assert_array_equal(decoded, np.rot90(raw, k=-1))  # orientation 6: rotate 90 degrees clockwise
    # an already opened PIL image gets the same treatment and is not modified itself
    user_image = Image.open(io.BytesIO(data))
    np.testing.assert_array_equal(pixels(decode_image(user_image)), decoded)
    assert user_image.size == (raw.shape[1], raw.shape[0])


def test_one_bit_image(tmp_path):
    bits = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    data = malformed.png_bytes(Image.fromarray(bits).convert("1"))
    decoded = pixels(decode_file(tmp_path, "bits.png", data))
    np.testing.assert_array_equal(decoded, np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2))


def test_float_tiff_unit_range_and_stretched(tmp_path):
    unit = np.array([[0.0, 0.25, 1.0], [0.5, 0.1, 0.9]], dtype=np.float32)
    decoded = pixels(decode_file(tmp_path, "unit.tif", malformed.float_tiff(unit)))
    np.testing.assert_array_equal(decoded[..., 0], np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    wide = np.array([[-5.0, 0.0, 10.0]], dtype=np.float32)  # no white point: min-max stretched
    stretched = pixels(decode_file(tmp_path, "wide.tif", malformed.float_tiff(wide)))
    assert stretched[..., 1].tolist() == [[0, 85, 255]]


def test_grayscale_becomes_three_equal_channels(photo):
    gray = photo.convert("L")
    decoded = pixels(decode_image(gray))
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], np.asarray(gray))


# ----------------------------------------------------------------------------- in-memory inputs
def test_arrays_and_tensors_match_the_pil_image(photo):
    reference = np.array(photo)
    as_float = reference.astype(np.float32) / 255.0
    chw = torch.from_numpy(reference).permute(2, 0, 1)
    for item in (reference, as_float, chw, chw.float() / 255.0, chw.to(torch.bfloat16) / 255.0):
        decoded = pixels(decode_image(item))
        if item.dtype == torch.bfloat16:  # 8 mantissa bits: off by at most 1 level
            assert np.abs(decoded.astype(int) - reference).max() <= 1
        else:
            np.testing.assert_array_equal(decoded, reference)
    uint16 = reference.astype(np.uint16) * 257  # 8-bit data widened to 16 bit scales back exactly
    np.testing.assert_array_equal(pixels(decode_image(uint16)), reference)
    big_endian = uint16.astype(">u2")  # as FITS and some TIFF readers give them
    np.testing.assert_array_equal(pixels(decode_image(big_endian)), reference)
    gray = reference[..., 0]
    np.testing.assert_array_equal(pixels(decode_image(gray))[..., 2], gray)
    np.testing.assert_array_equal(pixels(decode_image(torch.from_numpy(gray)[None]))[..., 1], gray)


# ----------------------------------------------------------------------------- input expansion
def test_folders_are_listed_recursively_sorted_and_filtered(tmp_path, photo_paths):
    data = photo_paths[0].read_bytes()
    names = ["b.jpg", "a/z.JPEG", "a/b/c.png", ".hidden/x.jpg", "._resource.jpg", "notes.txt", "a/y.webp"]
    for relative in names:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    found = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)]
    assert found == ["a/b/c.png", "a/y.webp", "a/z.JPEG", "b.jpg"]
    sources = expand_inputs([photo_paths[1], tmp_path, b"raw", torch.zeros(2, 3, 4, 4)])
    labels = [s.label for s in sources]
    assert labels[0] == str(photo_paths[1])
    assert labels[1:5] == [str(tmp_path / f) for f in found]
    assert labels[5:] == ["item 2 (bytes)", "item 3[0]", "item 3[1]"]
    with pytest.raises(NotADirectoryError, match="not a directory"):
        list_image_files(photo_paths[0])


def test_a_dangling_image_link_in_a_folder_is_reported_not_dropped(tmp_path, photo_paths):
    from tests.fixtures_models import tiny_encoder

    (tmp_path / "photo.jpg").write_bytes(photo_paths[0].read_bytes())
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")  # not an image name: not listed
    assert [p.name for p in list_image_files(tmp_path)] == ["gone.jpg", "photo.jpg"]
    model = tiny_encoder(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    result = model.encode(tmp_path, on_error="skip")
    assert result.embeddings.shape[0] == 1
    dangling = "gone.jpg: a symlink whose target does not exist"
    assert [(f.index, dangling in f.reason) for f in result.failures] == [(0, True)]


def test_formats_outside_the_allow_list_are_refused_before_parsing(tmp_path):
    """EPS would run Ghostscript: it must not reach Pillow's EPS plugin unless the caller opts in."""
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    assert Image.open(eps).format == "EPS"  # Pillow itself would identify and parse it
    with pytest.raises(ImageDecodeError, match=r"drawing\.eps: not an image in an accepted format"):
        decode_image(eps)
    png = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 20, 30)).save(png, format="PNG")
    with pytest.raises(ImageDecodeError, match="accepted format"):
        decode_image(png.getvalue(), formats=("JPEG",))
    assert decode_image(png.getvalue(), formats=("PNG",)).size == (4, 3)


def test_paths_given_directly_are_decoded_and_named_in_errors(tmp_path, photo_paths):
    as_text = decode_image(str(photo_paths[0]))
    assert as_text.size == decode_image(photo_paths[0]).size and as_text.mode == "RGB"
    with pytest.raises(ImageDecodeError, match=r"missing\.png: file not found"):
        decode_image(str(tmp_path / "missing.png"))


def test_an_empty_string_is_an_error_not_the_current_folder(tmp_path, monkeypatch):
    """Path("") is "."; encode("") used to embed every image under the working directory."""
    Image.new("RGB", (8, 8)).save(tmp_path / "here.png")
    monkeypatch.chdir(tmp_path)
    for value in ("", "   "):
        sources = expand_inputs([value, "here.png"])
        assert len(sources) == 2 and sources[0].error and "empty path" in sources[0].error
        assert sources[1].error is None


def test_premultiplied_la_decodes_like_la():
    """Pillow converts "La" only to "LA"; the alpha path must go through it (it raised before)."""
    la = Image.new("LA", (6, 4), (180, 128))
    got = np.asarray(decode_image(ImageSource(la.convert("La"), "x"), max_pixels=None))
    expected = np.asarray(decode_image(ImageSource(la, "x"), max_pixels=None))
    np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=1)


def test_listed_extensions_and_decoded_formats_agree(tmp_path, photo):
    """Every listed extension opens with an accepted format, every accepted format has a listed extension,
    and a folder's .ico/.dib files are found and decode like the same image as PNG (the demo refused ICO
    uploads and folders skipped them while bytes of the same file embedded)."""
    from visreg_hub.inference.images import DEFAULT_FORMATS, IMAGE_EXTENSIONS

    registered = Image.registered_extensions()
    assert {
        ext: registered.get(ext) for ext in IMAGE_EXTENSIONS if registered.get(ext) not in DEFAULT_FORMATS
    } == {}
    assert {registered[ext] for ext in IMAGE_EXTENSIONS} == set(DEFAULT_FORMATS)

    small = photo.resize((48, 32))
    for name, fmt in (("icon.ico", "ICO"), ("bitmap.dib", "DIB"), ("photo.jfif", "JPEG")):
        small.save(tmp_path / name, fmt, **({"sizes": [(48, 32)]} if fmt == "ICO" else {}))
    small.save(tmp_path / "reference.png", "PNG")
    found = {path.name for path in list_image_files(tmp_path)}
    assert found == {"icon.ico", "bitmap.dib", "photo.jfif", "reference.png"}
    reference = pixels(decode_image(ImageSource(tmp_path / "reference.png", "reference.png")))
    for name in ("icon.ico", "bitmap.dib"):  # lossless formats: the same pixels
        decoded = pixels(decode_image(ImageSource(tmp_path / name, name)))
        np.testing.assert_array_equal(decoded, reference)


def test_a_url_is_refused_with_its_own_message_not_as_a_missing_file():
    (source,) = expand_inputs(["https://example.com/a.jpg"])
    assert source.label == "https://example.com/a.jpg"  # not Path()'s "https:/example.com/a.jpg"
    assert "does not fetch URLs" in source.error and "file not found" not in source.error


def test_a_binary_file_object_is_one_image_not_one_per_line(tmp_path, photo):
    """BytesIO and open(..., "rb") are iterable line by line; each must be read as ONE encoded image
    (a PNG split on b"\\n" became dozens of "corrupt" items)."""
    png = malformed.png_bytes(photo)
    assert png.count(b"\n") > 1  # iterating it would have made several items
    path = malformed.write(tmp_path / "photo.png", png)
    expected = pixels(photo)  # PNG is lossless: Pillow's own decode of the source image
    assert is_single_image(io.BytesIO(png))
    with open(path, "rb") as handle:
        sources = expand_inputs([io.BytesIO(png), handle])
    assert [s.error for s in sources] == [None, None]
    assert sources[1].label == f"item 1 (file {path})"
    for source in sources:
        np.testing.assert_array_equal(pixels(decode_image(source)), expected)
    np.testing.assert_array_equal(pixels(decode_image(io.BytesIO(png))), expected)


def test_a_text_file_object_is_refused_saying_what_to_pass(tmp_path, photo_paths):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photo_paths[0]}\n{photo_paths[1]}\n")
    with open(listing) as handle:
        (source,) = expand_inputs(handle)
        assert handle.tell() == 0  # refused without reading (sys.stdin must not block)
    assert source.label == f"item 0 (file {listing})"
    assert "text-mode file object" in source.error and "open(path, 'rb')" in source.error
    assert "[line.strip() for line in f]" in source.error
    with pytest.raises(ImageDecodeError, match="text-mode file object"):
        decode_image(io.StringIO("a.png\n"))


def _ico_with_png_frame(png: bytes, declared: int = 16) -> bytes:
    """An ICO file whose directory declares ``declared`` px but whose one frame is ``png`` (any size)."""
    import struct

    directory = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(png), 6 + 16)
    return directory + entry + png


def test_an_ico_frame_larger_than_its_directory_says_is_capped_before_decoding(monkeypatch):
    """Probe 9: a 0.5 MB ICO declaring 16x16 held a 12000x12000 PNG, and Pillow's ICO plugin decodes the
    largest frame inside Image.open, so all 144 Mpx were decoded before the cap applied. Each frame's own
    header is now checked first: Pillow never gets to decode the frame."""
    from PIL import IcoImagePlugin

    decoded_frames = []
    original = IcoImagePlugin.IcoFile.getimage

    def counting(self, *args, **kwargs):
        decoded_frames.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IcoImagePlugin.IcoFile, "getimage", counting)
    big = io.BytesIO()
    Image.new("RGB", (3000, 3000), (40, 90, 200)).save(big, "PNG")  # 9 Mpx, a few KB compressed
    data = _ico_with_png_frame(big.getvalue())
    with pytest.raises(ImageDecodeError, match=r"3000x3000 = 9,000,000 pixels, above the cap"):
        decode_image(ImageSource(data, "icon.ico"), max_pixels=1_000_000)
    assert decoded_frames == []
    small = io.BytesIO()
    Image.new("RGB", (48, 48), (40, 90, 200)).save(small, "PNG")
    decoded = pixels(decode_image(ImageSource(_ico_with_png_frame(small.getvalue(), 48), "ok.ico")))
    assert decoded.shape == (48, 48, 3) and decoded[0, 0].tolist() == [40, 90, 200]
    assert len(decoded_frames) == 1  # a frame within the cap is decoded as before
