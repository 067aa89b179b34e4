"""One served model: decode + preprocess an uploaded image, and a batch forward for the batcher.

Embeddings equal ``model.encode(images)`` (default pooling, L2-normalised): the same decoding
(:func:`~visreg_hub.inference.images.decode_image`), the same :class:`Preprocessor`, the same
normalisation and forward pass, batched by :class:`~visreg_hub.serving.batcher.DynamicBatcher`.
"""

from __future__ import annotations

import io
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference.images import DEFAULT_FORMATS, ImageSource, decode_image
from visreg_hub.inference.pipeline import EmbeddingPipeline
from visreg_hub.inference.preprocess import Preprocessor, labelled
from visreg_hub.serving.config import ModelSpec

logger = logging.getLogger(__name__)

# A JPEG is draft-decoded only to a size at least this many times what the preprocessing resizes to, so
# the resize filter still sees several source pixels per output pixel.
DRAFT_MARGIN = 4


@dataclass
class ModelRuntime:
    """A loaded model and its embedding pipeline (the batcher is attached by the app).

    ``pipeline`` is the library's :class:`~visreg_hub.inference.pipeline.EmbeddingPipeline` on the
    backend the model was loaded with (torch or ONNX Runtime); the server decodes and transforms each
    image in its decode pool and calls the pipeline's batch entry point, ``embed_pixels``, per batch.
    """

    spec: ModelSpec
    model: torch.nn.Module
    pipeline: EmbeddingPipeline
    load_seconds: float
    batcher: object = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def backend(self):
        return self.pipeline.backend

    @property
    def transform(self):
        """Decoded RGB PIL image -> (C, H, W) uint8 tensor (resize and crop of the model's data config)."""
        return self.pipeline.backend.transform

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.pipeline.backend.input_shape)

    @property
    def embedding_dim(self) -> int:
        return int(self.pipeline.output_shape[-1])

    @property
    def needed_pixels(self) -> int:
        """The longest side the preprocessing resizes to (before its centre crop)."""
        crop_pct = Preprocessor(self.model.data_config).crop_pct
        return math.ceil(max(self.input_shape[1:]) / crop_pct)

    def decode(self, payload: bytes, label: str, *, max_pixels: int, draft: bool = False) -> torch.Tensor:
        """Encoded image bytes -> (C, H, W) uint8 model input (resized, cropped, not normalised).

        With ``draft``, large JPEGs are decoded at a reduced size (see :func:`decode_reduced`).

        Raises:
            ImageDecodeError: the message starts with ``label``.
        """
        if draft:
            image = decode_reduced(payload, label, max_pixels=max_pixels, needed=self.needed_pixels)
        else:
            image = decode_image(ImageSource(payload, label), max_pixels=max_pixels)
        try:
            return self.transform(image)
        except ImageDecodeError as exc:  # e.g. an aspect ratio preprocessing cannot resize
            raise ImageDecodeError(labelled(label, exc)) from exc

    def forward(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) uint8 -> (B, E) float32 L2-normalised embeddings, as ``encode()`` computes them."""
        return self.pipeline.embed_pixels(pixels).numpy()


def _pipeline(model: torch.nn.Module) -> EmbeddingPipeline:
    from visreg_hub.inference.backends import backend_for

    return EmbeddingPipeline(backend_for(model), normalize=True, max_pixels=None)


def load_runtime(spec: ModelSpec, device: str | None, backend: str | None = None) -> ModelRuntime:
    """Load ``spec`` with ``from_pretrained`` (strict, safetensors only) onto ``device`` for ``backend``."""
    from visreg_hub.hub import from_pretrained

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    options = {} if backend is None else {"backend": backend}  # None: from_pretrained's default
    model = from_pretrained(spec.source, device=device, **options)
    pipeline = _pipeline(model)
    seconds = time.perf_counter() - start
    logger.info(
        "loaded model %s (%s) in %.1f s: %s", spec.name, spec.source, seconds, pipeline.backend.describe()
    )
    return ModelRuntime(spec, model, pipeline, seconds)


def decode_reduced(payload: bytes | Path, label: str, *, max_pixels: int, needed: int) -> Image.Image:
    """Like :func:`decode_image`, but a JPEG whose shorter side is over ``2 * DRAFT_MARGIN * needed``
    px is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``), keeping both sides at
    least ``DRAFT_MARGIN * needed``.

    A 12 Mpx photo for a 224 px model then costs under 1 Mpx of memory instead of 12; smaller images
    and every other format decode exactly as in ``encode()``. ``max_pixels`` bounds the decoded size, so
    a large JPEG may pass where a PNG of the same size would not.

    Raises:
        ImageDecodeError: the message starts with ``label``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            stream = payload if isinstance(payload, Path) else io.BytesIO(payload)
            image = Image.open(stream, formats=DEFAULT_FORMATS)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        image = None  # the normal path reports it with the library's message
    if image is None or image.format != "JPEG" or min(image.size) < 2 * DRAFT_MARGIN * needed:
        if image is not None:
            image.close()
        return decode_image(ImageSource(payload, label), max_pixels=max_pixels)
    try:
        target = DRAFT_MARGIN * needed
        image.draft("RGB", (target, target))  # the largest reduction that keeps both sides >= target
        return decode_image(ImageSource(image, label), max_pixels=max_pixels)
    finally:
        image.close()


def runtime_from_model(name: str, model: torch.nn.Module, source: str | None = None) -> ModelRuntime:
    """Wrap an already loaded model (tests share one model object with the server)."""
    return ModelRuntime(ModelSpec(name, source or name), model.eval(), _pipeline(model), 0.0)
