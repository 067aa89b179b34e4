"""One served model: decode + preprocess an uploaded image, and a batch forward for the batcher.

Embeddings equal ``model.encode(images)`` (default pooling, L2-normalised): the same decoding
(:func:`~visreg_hub.inference.images.decode_image`), the same :class:`Preprocessor`, the same
normalisation and forward pass, batched by :class:`~visreg_hub.serving.batcher.DynamicBatcher`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from visreg_hub.devices import default_device
from visreg_hub.errors import ImageDecodeError
from visreg_hub.inference.images import ImageSource, decode_image
from visreg_hub.inference.pipeline import EmbeddingPipeline
from visreg_hub.inference.preprocess import draft_size, labelled
from visreg_hub.serving.config import ModelSpec

logger = logging.getLogger(__name__)


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
    loaded_at: float = field(default_factory=time.time)  # Unix time: /v1/models' "created"

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

    def decode(self, payload: bytes, label: str, *, max_pixels: int, draft: bool = False) -> torch.Tensor:
        """Encoded image bytes -> (C, H, W) uint8 model input (resized, cropped, not normalised).

        With ``draft``, JPEGs far larger than the model's input are decoded at a reduced scale
        (``draft_to`` of :func:`~visreg_hub.inference.images.decode_image`).

        Raises:
            ImageDecodeError: the message starts with ``label``.
        """
        draft_to = draft_size(self.transform) if draft else None
        image = decode_image(ImageSource(payload, label), max_pixels=max_pixels, draft_to=draft_to)
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

    device = default_device(device)
    start = time.perf_counter()
    options = {} if backend is None else {"backend": backend}  # None: from_pretrained's default
    model = from_pretrained(spec.source, device=device, **options)
    pipeline = _pipeline(model)
    seconds = time.perf_counter() - start
    logger.info(
        "loaded model %s (%s) in %.1f s: %s", spec.name, spec.source, seconds, pipeline.backend.describe()
    )
    return ModelRuntime(spec, model, pipeline, seconds)


def runtime_from_model(name: str, model: torch.nn.Module, source: str | None = None) -> ModelRuntime:
    """Wrap an already loaded model (tests share one model object with the server)."""
    return ModelRuntime(ModelSpec(name, source or name), model.eval(), _pipeline(model), 0.0)
