"""encode() speaks sentence-transformers: precision, calibration, single image -> 1-D, truncate_dim, aliases.

Every quantised code is checked against a plain float64 re-derivation of sentence-transformers'
``quantize_embeddings`` rule written element by element here (no numpy packbits, no vectorised clip).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.fixtures_models import tiny_encoder
from visreg_hub.inference import encode
from visreg_hub.inference.quantize import quantize_embeddings


@pytest.fixture(scope="module")
def model():
    return tiny_encoder(seed=5)


@pytest.fixture(scope="module")
def floats(model, photo_paths):
    return encode(model, photo_paths, convert_to_numpy=True)  # (4, 32) float32, normalised


def reference_int_codes(values, low, high, signed):
    """Element by element, in float32 scalars (sentence-transformers 6's rule): step = (max - min) / 255
    (1 for an empty range), level = floor((x - min) / step) clipped to [0, 255]; int8 = level - 128."""
    out = np.zeros(values.shape, dtype=np.int64)
    for i in range(values.shape[0]):
        for d in range(values.shape[1]):
            start = np.float32(low[d])
            step = np.float32((np.float32(high[d]) - start) / np.float32(255))
            step = np.float32(1) if step == 0 else step
            level = min(max(math.floor(np.float32((np.float32(values[i, d]) - start) / step)), 0), 255)
            out[i, d] = level - 128 if signed else level
    return out


def reference_bits(values):
    """Row by row: bit j of byte b is 1 when value 8b + j (MSB first) is > 0; missing values count as 0."""
    rows = []
    for row in values:
        data = []
        for start in range(0, len(row), 8):
            byte = 0
            for j in range(8):
                index = start + j
                byte |= (1 << (7 - j)) if index < len(row) and row[index] > 0 else 0
            data.append(byte)
        rows.append(data)
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("precision", ["uint8", "int8"])
def test_int_precisions_use_the_batch_range_without_calibration(model, photo_paths, floats, precision):
    codes = encode(model, photo_paths, precision=precision)
    assert codes.dtype == getattr(torch, precision) and codes.shape == (4, 32)
    expected = reference_int_codes(floats, floats.min(0), floats.max(0), signed=precision == "int8")
    np.testing.assert_array_equal(codes.numpy().astype(np.int64), expected)
    # closed form: each dimension's batch minimum is the lowest code and its maximum the highest (or one
    # below it: (max - min) / ((max - min) / 255) can round to 254.999..., floored as in s-t)
    lowest, highest = (-128, 127) if precision == "int8" else (0, 255)
    assert (codes.numpy().min(0) == lowest).all() and (codes.numpy().max(0) >= highest - 1).all()


def test_calibration_embeddings_fix_the_ranges_and_clip_outside_them(model, photo_paths, floats):
    calibration = floats[:3]  # the 4th photo can fall outside this range: clipped, never wrapped
    one = encode(model, photo_paths[3], precision="uint8", calibration_embeddings=calibration)
    assert one.shape == (32,)  # a single image in, a 1-D vector out
    expected = reference_int_codes(floats[3:], calibration.min(0), calibration.max(0), signed=False)[0]
    np.testing.assert_array_equal(one.numpy().astype(np.int64), expected)
    outside = (floats[3] > calibration.max(0)) | (floats[3] < calibration.min(0))
    assert outside.any()  # the clipping path is exercised
    # the same image in a batch with others gets the same codes when the ranges come from calibration
    batch = encode(model, photo_paths, precision="uint8", calibration_embeddings=calibration)
    np.testing.assert_array_equal(batch[3], one)


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_binary_precisions_pack_sign_bits(model, photo_paths, floats, precision):
    packed = encode(model, photo_paths, precision=precision, convert_to_numpy=True)
    assert isinstance(packed, np.ndarray) and packed.shape == (4, 4)  # 32 bits -> 4 bytes per image
    expected = reference_bits(floats) - (128 if precision == "binary" else 0)
    assert packed.dtype == (np.int8 if precision == "binary" else np.uint8)
    np.testing.assert_array_equal(packed.astype(np.int64), expected)
    odd = quantize_embeddings(floats[:, :13], "ubinary")  # 13 bits -> 2 bytes, zero-padded
    np.testing.assert_array_equal(odd.astype(np.int64), reference_bits(floats[:, :13]))


def test_truncate_dim_cuts_before_normalising(model, photo_paths):
    raw = encode(model, photo_paths, normalize=False)
    cut = encode(model, photo_paths, truncate_dim=8)
    torch.testing.assert_close(cut, torch.nn.functional.normalize(raw[:, :8], dim=-1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"truncate_dim must be an integer in \[1, 32\]"):
        encode(model, photo_paths, truncate_dim=33)


def test_sentence_transformers_argument_names(model, photo_paths, floats):
    raw = encode(model, photo_paths, normalize_embeddings=False)
    torch.testing.assert_close(raw, encode(model, photo_paths, normalize=False))
    assert not torch.allclose(raw.norm(dim=1), torch.ones(4), atol=1e-3)
    tensor = encode(model, photo_paths, convert_to_numpy=True, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor)  # convert_to_tensor wins, as in sentence-transformers
    single = encode(model, photo_paths[0], convert_to_numpy=True)
    assert single.shape == (32,) and np.allclose(single, floats[0], atol=1e-6)
    assert encode(model, [photo_paths[0]]).shape == (1, 32)  # a list of one stays 2-D
    assert encode(model, photo_paths[0].parent).shape == (4, 32)  # a folder is many images
    skipped = encode(model, photo_paths[0], on_error="skip")
    assert skipped.embeddings.shape == (1, 32) and skipped.failures == []
    with pytest.raises(ValueError, match="normalize and normalize_embeddings disagree"):
        encode(model, photo_paths, normalize=True, normalize_embeddings=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        encode(model, photo_paths, precision="int4")
    with pytest.raises(ValueError, match=r"calibration_embeddings must be a non-empty \(M, 32\)"):
        encode(model, photo_paths, precision="int8", calibration_embeddings=floats[:, :5])


@pytest.mark.parametrize(("precision", "dtype"), [("int8", np.int8), ("uint8", np.uint8)])
def test_int_precisions_of_no_embeddings_keep_the_failures(model, photo_paths, precision, dtype):
    """An empty call, or one where every image failed, used to raise about calibration_embeddings (never
    passed) and lose the failure list."""
    empty = encode(model, [], precision=precision, convert_to_numpy=True)
    assert empty.shape == (0, model.embedding_dim()) and empty.dtype == dtype
    result = encode(model, [b"xx", b"yy"], precision=precision, on_error="skip", convert_to_numpy=True)
    assert result.embeddings.shape == (0, model.embedding_dim()) and result.embeddings.dtype == dtype
    assert [failure.index for failure in result.failures] == [0, 1]


def test_calibration_embeddings_must_be_finite_floats(floats):
    bad = floats.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="calibration_embeddings contain NaN"):
        quantize_embeddings(floats, "int8", calibration_embeddings=bad)
    with pytest.raises(ValueError, match="calibration_embeddings must be floating point"):
        quantize_embeddings(floats, "int8", calibration_embeddings=floats.astype(np.int64))


def test_numpy_integers_are_integers_and_bad_caps_are_named(model, photo_paths):
    """sentence-transformers accepts numpy integers for batch_size / truncate_dim; a max_pixels of the
    wrong type failed every image as 'corrupt image data' (probe 2)."""
    plain = encode(model, photo_paths, batch_size=2, truncate_dim=8, convert_to_numpy=True)
    numpy_ints = encode(
        model, photo_paths, batch_size=np.int64(2), truncate_dim=np.int32(8), convert_to_numpy=True
    )
    np.testing.assert_array_equal(numpy_ints, plain)
    for bad in ("1e6", 0, -1, 2.5):
        with pytest.raises(ValueError, match="max_pixels must be a positive integer"):
            encode(model, photo_paths, max_pixels=bad)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        encode(model, photo_paths, batch_size=True)


def test_a_dict_is_not_a_list_of_images(model, photo_paths):
    result = encode(model, {"a": str(photo_paths[0])}, on_error="skip")
    assert result.embeddings.shape[0] == 0 and "a dict is not a list of images" in result.failures[0].reason


def test_int8_codes_of_one_embedding_without_calibration_warn_at_the_callers_line():
    """One vector has an empty range, so every code is the lowest: documented, and now also said."""
    import warnings

    one = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        codes = quantize_embeddings(one, "int8")
        quantize_embeddings(np.vstack([one, -one]), "int8")  # two vectors: a range, no warning
    assert (codes == -128).all()
    assert [(w.category, w.filename) for w in caught] == [(UserWarning, __file__)]
    assert "calibration_embeddings" in str(caught[0].message)


def test_similarity_and_dimension_speak_sentence_transformers(model, floats, photo_paths):
    """``model.similarity(a, b)`` is the cosine matrix (checked against float64 sums written out here) for
    numpy or tensors, 1-D or 2-D, normalised or not; ``get_sentence_embedding_dimension()`` is E."""
    from visreg_hub.errors import UserInputError

    assert model.get_sentence_embedding_dimension() == floats.shape[1] == model.embedding_dim()
    raw = encode(model, photo_paths, normalize=False, convert_to_numpy=True).astype(np.float64)
    expected = np.zeros((len(raw), len(raw)))
    for i in range(len(raw)):
        for j in range(len(raw)):
            dot = sum(float(x) * float(y) for x, y in zip(raw[i], raw[j], strict=True))
            expected[i, j] = dot / math.sqrt(float((raw[i] ** 2).sum()) * float((raw[j] ** 2).sum()))
    for a, b in ((floats, floats), (torch.from_numpy(raw), raw), (raw.astype(np.float32), floats)):
        scores = model.similarity(a, b)
        assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and scores.shape == (4, 4)
        np.testing.assert_allclose(scores.numpy(), expected, atol=1e-5)
    assert model.similarity(floats[0], floats).shape == (1, 4)  # one vector is one row
    with pytest.raises(UserInputError, match="different lengths"):
        model.similarity(floats, floats[:, :8])
    with pytest.raises(UserInputError, match="float embeddings"):
        model.similarity(encode(model, photo_paths, precision="int8"), floats)
