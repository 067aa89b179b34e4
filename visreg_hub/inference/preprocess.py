"""Preprocessing derived from a checkpoint's data config, never hand-set per call.

:class:`Preprocessor` reproduces timm's evaluation transform
(``timm.data.create_transform(**data_config)``: resize, centre crop, ``ToTensor``, ``Normalize``) in two
halves so that the heavy half can run in DataLoader workers and the cheap half on the accelerator:

* :meth:`Preprocessor.__call__` (CPU, per image, in workers): resize with the configured interpolation
  and crop mode (``center``, ``squash``, ``border``) on the PIL image, returning a (C, H, W) ``uint8``
  tensor. uint8 batches are 4x smaller to pin and copy than float ones.
* :meth:`Preprocessor.normalize` (on the target device, per batch): ``x / 255``, then ``(x - mean) / std``
  in float32, the same operations in the same order as ``ToTensor`` + ``Normalize``, so results are
  bit-identical to timm's on the CPU.

:class:`ImageDataset` joins decoding (:mod:`visreg_hub.inference.images`) and the first half, catching
errors per item so that one bad image never loses its batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from visreg_hub.errors import ConfigError, ImageDecodeError
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS, ImageSource, decode_image
from visreg_hub.models.config import CROP_MODES
from visreg_hub.models.limits import MIN_CROP_PCT

DEFAULT_CROP_PCT = 0.875  # timm's default when a data config has no crop_pct
# Largest intermediate image of resize_crop (64 Mpx, 192 MB of RGB): max_pixels bounds the decoded image,
# but a 1 x 1,000,000 px strip (a 3 KB PNG) resized to a 64 px shorter side would be 64 x 64,000,000.
MAX_RESIZED_PIXELS = 2**26
# Draft decoding keeps a JPEG at least this many times the side the resize produces, so the resize filter
# still averages several source pixels per output pixel: Pillow's own Image.thumbnail default
# (reducing_gap=2.0). On 29 real 2-58 Mpx photos at 224 px it moves a preprocessed pixel by 0.35 grey
# levels on average (4: 0.07) for a 1.9x faster decode (4: 1.5x); docs/benchmarks.md has the numbers.
DRAFT_MARGIN = 2
_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "box": InterpolationMode.BOX,
    "hamming": InterpolationMode.HAMMING,
    "lanczos": InterpolationMode.LANCZOS,
}


class Preprocessor:
    """timm-equivalent evaluation transform for one data config (picklable, for DataLoader workers).

    Args:
        data_config: timm-style dict with ``input_size`` (C, H, W), ``mean``, ``std`` (length C),
            ``crop_pct`` (None: 0.875), ``interpolation`` and ``crop_mode`` (None: ``"center"``),
            e.g. ``model.data_config`` or ``timm.data.resolve_data_config({}, model=...)``.

    Raises:
        ConfigError: a key is missing or a value is invalid.
    """

    def __init__(self, data_config: Mapping[str, Any]) -> None:
        missing = [key for key in ("input_size", "mean", "std", "interpolation") if key not in data_config]
        if missing:
            raise ConfigError(f"data config is missing {missing}; got keys {sorted(data_config)}")
        input_size = tuple(data_config["input_size"])
        if len(input_size) != 3 or any(not isinstance(v, int) or v < 1 for v in input_size):
            got = data_config["input_size"]
            raise ConfigError(f"input_size must be (C, H, W) positive integers, got {got!r}")
        self.channels, self.height, self.width = input_size
        if self.channels not in (1, 3):
            raise ConfigError(
                f"input_size has {self.channels} channels; encode() prepares only 1 (grayscale) or 3 (RGB) "
                f"channel images: call the model on your own (N, {self.channels}, H, W) tensors instead"
            )
        self.mean = tuple(float(v) for v in data_config["mean"])
        self.std = tuple(float(v) for v in data_config["std"])
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"mean {self.mean} and std {self.std} need one value per channel ({self.channels})"
            )
        if any(not s > 0 for s in self.std):
            raise ConfigError(f"std values must be > 0, got {self.std}")
        crop_pct = data_config.get("crop_pct")
        self.crop_pct = DEFAULT_CROP_PCT if crop_pct is None else float(crop_pct)
        if not self.crop_pct >= MIN_CROP_PCT:  # also refuses NaN
            raise ConfigError(f"crop_pct must be >= {MIN_CROP_PCT}, got {crop_pct!r}")
        self.interpolation = data_config["interpolation"]
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"interpolation={self.interpolation!r} is not one of {sorted(_INTERPOLATIONS)}")
        self.crop_mode = data_config.get("crop_mode") or "center"
        if self.crop_mode not in CROP_MODES:
            raise ConfigError(f"crop_mode={self.crop_mode!r} is not one of {CROP_MODES}")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every preprocessed image."""
        return self.channels, self.height, self.width

    @property
    def resize_side(self) -> int:
        """The side the resize scales an image to before the crop (timm's ``floor(size / crop_pct)``,
        at least the output size); what :func:`draft_size` keeps a margin above."""
        return max(self.height, self.width, math.ceil(max(self.height, self.width) / self.crop_pct))

    def __repr__(self) -> str:
        return (
            f"Preprocessor(input_size={self.output_shape}, crop_pct={self.crop_pct}, "
            f"crop_mode={self.crop_mode!r}, interpolation={self.interpolation!r}, "
            f"mean={self.mean}, std={self.std})"
        )

    def resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize and crop to (H, W) exactly as timm's ``transforms_imagenet_eval`` does.

        Args:
            image: RGB (or L) PIL image of any size.

        Returns:
            A PIL image of size (W, H).

        Raises:
            ImageDecodeError: the resized image would exceed ``MAX_RESIZED_PIXELS`` (an extreme aspect
                ratio); the message does not name the image, callers prefix its label.
        """
        mode = _INTERPOLATIONS[self.interpolation]
        target = (self.height, self.width)
        # timm: scale = floor(target / crop_pct) per side
        scale = (math.floor(self.height / self.crop_pct), math.floor(self.width / self.crop_pct))
        if self.crop_mode == "squash":
            return TF.center_crop(TF.resize(image, list(scale), interpolation=mode), list(target))
        if self.crop_mode == "border":
            fill = [round(255 * v) for v in self.mean]
            resized = TF.resize(image, _keep_ratio_size(image, scale, longest=True), interpolation=mode)
            return _center_crop_or_pad(resized, target, fill)
        size = _keep_ratio_size(image, scale, longest=False)
        if size[0] * size[1] > MAX_RESIZED_PIXELS:
            width, height = image.size
            raise ImageDecodeError(
                f"image is {width}x{height}: resizing its shorter side for this model would make a "
                f"{size[1]:,}x{size[0]:,} intermediate image, above {MAX_RESIZED_PIXELS:,} pixels; crop "
                "it to a less extreme aspect ratio first"
            )
        if scale[0] == scale[1]:
            resized = TF.resize(image, scale[0], interpolation=mode)  # shortest edge -> scale
        else:
            resized = TF.resize(image, size, interpolation=mode)
        return TF.center_crop(resized, list(target))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Decoded RGB image -> resized, cropped (C, H, W) uint8 tensor (not yet normalised)."""
        if self.channels == 1:
            image = image.convert("L")  # ITU-R 601-2 luma; exact on gray images stored as RGB
        pixels = np.array(self.resize_crop(image), dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 pixels -> model input, the same float32 operations as ``ToTensor`` + ``Normalize``.

        Args:
            images: (B, C, H, W) or (C, H, W) uint8 tensor, on any device.
            dtype: dtype of the returned tensor (the arithmetic is float32 either way).

        Returns:
            Float tensor of the same shape and device.
        """
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        return images.to(torch.float32).div(255).sub(mean).div(std).to(dtype)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded image -> normalised (C, H, W) float32 tensor (what timm's transform returns)."""
        return self.normalize(self(image))


def labelled(label: str, exc: Exception) -> str:
    """An error message that starts with the item's label (decode errors do; preprocessing's don't)."""
    message = str(exc)
    return message if message.startswith(label) else f"{label}: {message}"


def _keep_ratio_size(image: Image.Image, target: tuple[int, int], longest: bool) -> list[int]:
    """timm ``ResizeKeepRatio`` size: fit the shortest (or longest) side, keep the aspect ratio."""
    width, height = image.size
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return [round(height / ratio), round(width / ratio)]


def _center_crop_or_pad(image: Image.Image, target: tuple[int, int], fill: list[int]) -> Image.Image:
    """Centre crop, padding with ``fill`` first where the image is smaller (timm ``CenterCropOrPad``)."""
    crop_h, crop_w = target
    width, height = image.size
    if crop_w > width or crop_h > height:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        padding = [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2]
        image = TF.pad(image, padding, fill=tuple(fill) if image.mode != "L" else fill[0])
        width, height = image.size
        if (width, height) == (crop_w, crop_h):
            return image
    top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)
    return TF.crop(image, top, left, crop_h, crop_w)


def draft_size(transform: Any) -> int:
    """The smallest side a JPEG may be draft-decoded to for ``transform`` (``DRAFT_MARGIN`` times the side
    its resize produces), so the resize filter still averages several source pixels per output pixel.

    Args:
        transform: a decoded-image transform with a ``resize_side`` (:class:`Preprocessor`, the ONNX
            backend's fixed-size resize).
    """
    return DRAFT_MARGIN * int(transform.resize_side)


class DecodedItem(NamedTuple):
    """What :class:`ImageDataset` returns for one index: pixels, or the reason there are none."""

    index: int
    pixels: torch.Tensor | None  # (C, H, W) uint8
    error: str | None


class ImageDataset(torch.utils.data.Dataset):
    """Decode + resize/crop per item, errors caught per item (for DataLoader workers).

    Args:
        sources: from :func:`visreg_hub.inference.inputs.expand_inputs`.
        preprocessor: the model's :class:`Preprocessor` (or another transform with its call signature).
        max_pixels: decompression-bomb cap passed to :func:`decode_image`.
        draft_decode: decode large JPEGs at a reduced scale (:func:`draft_size` of ``preprocessor``).
    """

    def __init__(
        self,
        sources: Sequence[ImageSource],
        preprocessor: Preprocessor,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        draft_decode: bool = False,
    ) -> None:
        self.sources = sources
        self.preprocessor = preprocessor
        self.max_pixels = max_pixels
        self.draft_to = draft_size(preprocessor) if draft_decode else None

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> DecodedItem:
        source = self.sources[index]
        try:
            image = decode_image(source, max_pixels=self.max_pixels, draft_to=self.draft_to)
            return DecodedItem(index, self.preprocessor(image), None)
        except ImageDecodeError as exc:
            return DecodedItem(index, None, labelled(source.label, exc))
        except Exception as exc:  # why: an unexpected library error on one item must not kill the batch
            return DecodedItem(index, None, f"{source.label}: {type(exc).__name__}: {exc}")


class Batch(NamedTuple):
    """A collated batch: the good items' pixels and indices, and the failed items' reasons."""

    indices: torch.Tensor  # (B,) int64 positions in the expanded input list
    pixels: torch.Tensor  # (B, C, H, W) uint8
    failures: list[tuple[int, str]]


class Collate:
    """Stack good items, list failed ones (picklable, for DataLoader workers).

    Args:
        output_shape: (C, H, W), to shape an all-failed batch as (0, C, H, W).
    """

    def __init__(self, output_shape: tuple[int, int, int]) -> None:
        self.output_shape = tuple(output_shape)

    def __call__(self, items: Sequence[DecodedItem]) -> Batch:
        good = [item for item in items if item.error is None]
        failures = [(item.index, item.error) for item in items if item.error is not None]
        indices = torch.tensor([item.index for item in good], dtype=torch.int64)
        if good:
            pixels = torch.stack([item.pixels for item in good])
        else:
            pixels = torch.empty((0, *self.output_shape), dtype=torch.uint8)
        return Batch(indices, pixels, failures)
