"""One served model: decode + preprocess an uploaded image, and a batch forward for the batcher.

Embeddings equal ``model.encode(images)`` (default pooling, L2-normalised): the same decoding
(:func:`~visreg_hub.inference.images.decode_image`), the same :class:`Preprocessor`, the same
normalisation and forward pass, batched by :class:`~visreg_hub.serving.batcher.DynamicBatcher`.
"""

from __future__ import annotations

import io
import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from visreg_hub.inference.images import DEFAULT_FORMATS, ImageSource, decode_image
from visreg_hub.inference.preprocess import Preprocessor
from visreg_hub.serving.config import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class ModelRuntime:
    """A loaded model with what the server needs around it (the batcher is attached by the app)."""

    spec: ModelSpec
    model: torch.nn.Module
    preprocessor: Preprocessor
    device: torch.device
    load_seconds: float
    batcher: object = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embedding_dim(self) -> int:
        return int(self.model.embedding_dim())

    def decode(self, payload: bytes, label: str, *, max_pixels: int, draft: bool = False) -> torch.Tensor:
        """Encoded image bytes -> (C, H, W) uint8 model input (resized, cropped, not normalised).

        With ``draft``, JPEGs are decoded by libjpeg at 1/2, 1/4 or 1/8 scale when the model needs that
        few pixels (a 12 Mpx photo for a 224 px model costs ~0.2 Mpx instead of 12), and ``max_pixels``
        applies to the reduced size. Results then differ slightly from ``encode()``; the demo uses it.

        Raises:
            ImageDecodeError: the message starts with ``label``.
        """
        if draft:
            image = self._draft_decode(payload, label, max_pixels)
            if image is not None:
                return self.preprocessor(image)
        return self.preprocessor(decode_image(ImageSource(payload, label), max_pixels=max_pixels))

    def _draft_decode(self, payload: bytes, label: str, max_pixels: int) -> Image.Image | None:
        """Reduced-size JPEG decode, or None to use the normal path (not a JPEG, nothing to gain)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(payload), formats=DEFAULT_FORMATS)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
            return None  # the normal path reports it with the library's message
        if image.format != "JPEG":
            image.close()
            return None
        needed = max(self.preprocessor.height, self.preprocessor.width)
        # twice the resize target keeps the downsampling filter's input well above the output
        request = (2 * needed / self.preprocessor.crop_pct,) * 2
        image.draft("RGB", tuple(int(v) for v in request))
        return decode_image(ImageSource(image, label), max_pixels=max_pixels)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, C, H, W) uint8 -> (B, E) float32 L2-normalised embeddings, as ``encode()`` computes them."""
        dtype = next(self.model.parameters()).dtype
        inputs = self.preprocessor.normalize(pixels.to(self.device), dtype=dtype)
        embeddings = self.model(inputs).float()
        return torch.nn.functional.normalize(embeddings, dim=-1).cpu().numpy()


def load_runtime(spec: ModelSpec, device: str | None) -> ModelRuntime:
    """Load ``spec`` with ``from_pretrained`` (strict, safetensors only) onto ``device``, in eval mode."""
    from visreg_hub.hub import from_pretrained

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model = from_pretrained(spec.source, device=device).eval()
    seconds = time.perf_counter() - start
    logger.info("loaded model %s (%s) in %.1f s", spec.name, spec.source, seconds)
    return ModelRuntime(spec, model, Preprocessor(model.data_config), torch.device(device), seconds)


def runtime_from_model(name: str, model: torch.nn.Module, source: str | None = None) -> ModelRuntime:
    """Wrap an already loaded model (the demo and tests share one model object with the server)."""
    device = next(model.parameters()).device
    spec = ModelSpec(name, source or name)
    return ModelRuntime(spec, model.eval(), Preprocessor(model.data_config), device, 0.0)
