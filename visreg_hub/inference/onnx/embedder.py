""":class:`OnnxEmbedder`: ``encode()`` on an exported ``.onnx`` file with ONNX Runtime.

Same contract as :func:`visreg_hub.inference.encode` (inputs, batching, ``on_error``, return types): the
images are decoded and resized by the same code (:mod:`~visreg_hub.inference.images`,
:class:`~visreg_hub.inference.preprocess.Preprocessor`), then the graph replaces the PyTorch model.

On a GPU provider (CUDA, TensorRT) with a CUDA build of torch, each batch goes through IOBinding: uint8
pixels are copied to the GPU, normalised there by torch and bound to the session by pointer, and the
output is bound to a preallocated torch tensor, so ONNX Runtime makes no host copies. Elsewhere the
plain ``session.run`` is used.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from visreg_hub.errors import UserInputError
from visreg_hub.inference.backends import resolve_dtype
from visreg_hub.inference.images import DEFAULT_MAX_PIXELS
from visreg_hub.inference.onnx.graph import EMBEDDING
from visreg_hub.inference.onnx.runtime import (
    GPU_PROVIDERS,
    check_graph_signature,
    create_session,
    read_onnx_metadata,
)
from visreg_hub.inference.pipeline import EmbeddingPipeline, EncodeResult
from visreg_hub.inference.preprocess import Preprocessor

logger = logging.getLogger(__name__)


class _ResizeTo:
    """Decoded image -> (3, H, W) uint8 at the fixed input size of a graph with baked preprocessing.

    For a model that centre-crops (timm's ``crop_mode`` "center"), the graph resizes its input's shorter
    side and crops the centre, so the image first goes to the centred box of the graph's aspect ratio
    whose shorter side is the image's shorter side: the graph's crop then covers the same part of the
    photo as the PyTorch path (the box may reach past a non-square photo's edges where the graph's input
    is not square; that margin is black and lies outside the graph's crop). Squashing the whole photo
    instead gave cosine 0.992 on 2:1 photos. A "squash" model squashes, as timm does.
    """

    def __init__(self, size: tuple[int, int], interpolation: str, crop_mode: str = "center") -> None:
        self.size = size
        self.resample = Image.BILINEAR if interpolation == "bilinear" else Image.BICUBIC
        self.squash = crop_mode == "squash"

    @property
    def resize_side(self) -> int:
        """The longest side images are resized to (for draft decoding, as ``Preprocessor.resize_side``)."""
        return max(self.size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        height, width = self.size
        if image.size != (width, height):
            if self.squash:
                image = image.resize((width, height), self.resample)
            else:
                box = self._box(image)
                if box[0] >= 0 and box[1] >= 0 and box[2] <= image.width and box[3] <= image.height:
                    # why the box given to resize, in floats: cropping to whole pixels first moved the
                    # content by up to half a pixel (cosine 0.948 on a 256x79 drawing with thin lines)
                    image = image.resize((width, height), self.resample, box=box)
                else:  # the box reaches past the photo: crop() fills that margin with black
                    image = image.crop(tuple(round(v) for v in box)).resize((width, height), self.resample)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def _box(self, image: Image.Image) -> tuple[float, float, float, float]:
        """The centred (left, upper, right, lower) box of the graph's aspect, shorter side the image's."""
        (w, h), (height, width) = image.size, self.size
        side = min(w, h)
        box_w, box_h = (side, side * height / width) if width <= height else (side * width / height, side)
        left, upper = (w - box_w) / 2, (h - box_h) / 2
        return left, upper, left + box_w, upper + box_h


class OnnxEmbedder:
    """Embed images with an exported ``.onnx`` file; ``encode`` has the contract of ``model.encode``.

    Preprocessing comes from the file's metadata. For a plain graph, images are decoded, resized and
    cropped with PIL exactly as in the PyTorch path, then normalised; for a graph with baked
    preprocessing, they are resized with PIL to the graph's fixed input size and the graph does the rest.

    Args:
        path: ``.onnx`` file written by :func:`export_onnx`.
        providers: None for the best available in order TensorRT > CUDA > CPU, or names such as
            ``"cuda"``, ``["tensorrt", "cuda"]``, ``"CPUExecutionProvider"``.
        device_id: GPU index for the CUDA and TensorRT providers.
        intra_op_num_threads: CPU threads of the session (None: ``default_intra_op_threads()``: the CPUs
            this process may run on, or ONNX Runtime's default when that is all of them).
        allow_fallback: False raises when ONNX Runtime does not run on the first requested provider;
            True (default) logs a warning and records it in :attr:`fell_back`.

    Attributes:
        metadata: the file's :class:`~visreg_hub.inference.onnx.runtime.OnnxMetadata`.
        session: the ``onnxruntime.InferenceSession``.
        requested_providers: providers asked for, best first.
        active_provider: provider that runs the graph (``session.get_providers()[0]``).
        fell_back: ``active_provider`` is not the first requested provider.
        uses_io_binding: batches go through IOBinding on the GPU (CUDA/TensorRT provider and CUDA torch).
        transform: decoded PIL image -> (3, H, W) uint8 the graph's pipeline expects (resize + crop for a
            plain graph, resize to the fixed input size for baked preprocessing).
        input_shape: (C, H, W) of one transformed image.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: str | list[str] | None = None,
        device_id: int = 0,
        intra_op_num_threads: int | None = None,
        allow_fallback: bool = True,
    ) -> None:
        self.path = Path(path).expanduser()
        self.metadata = read_onnx_metadata(self.path)
        info = create_session(
            self.path, providers=providers, device_id=device_id, intra_op_num_threads=intra_op_num_threads,
            fp16=self.metadata.precision == "fp16", allow_fallback=allow_fallback,
        )  # fmt: skip
        self.session = info.session
        check_graph_signature(self.session, self.metadata, repr(str(self.path)))
        self.requested_providers = info.requested
        self.active_provider = info.active
        self.fell_back = info.fell_back
        self.device_id = device_id
        self.uses_io_binding = self.active_provider in GPU_PROVIDERS and torch.cuda.is_available()
        self._normalizer = Preprocessor(self.metadata.data_config)
        if self.metadata.has_preprocessing:
            height, width = self.metadata.image_size
            config = self.metadata.data_config
            crop_mode = config.get("crop_mode", "center")
            self.transform = _ResizeTo((height, width), config["interpolation"], crop_mode)
            self.input_shape = (3, height, width)
        else:
            self.transform = self._normalizer
            self.input_shape = self._normalizer.output_shape
        self._tempdir: str | None = None  # set by from_model; removed with the embedder

    @property
    def pooling(self) -> str:
        return self.metadata.pooling

    @property
    def embedding_dim(self) -> int:
        return self.metadata.embedding_dim

    @property
    def data_config(self) -> dict[str, Any]:
        return self.metadata.data_config

    def __repr__(self) -> str:
        return (
            f"OnnxEmbedder({str(self.path)!r}, model={self.metadata.model_name!r}, pooling={self.pooling!r}, "
            f"precision={self.metadata.precision!r}, active_provider={self.active_provider!r})"
        )

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        providers: str | list[str] | None = None,
        device_id: int = 0,
        **export_kwargs: Any,
    ) -> OnnxEmbedder:
        """Export ``model`` to a temporary file (validated) and open it; the file lives with the embedder.

        Args:
            model: a float32 :class:`~visreg_hub.models.VISRegEncoder`.
            providers, device_id: see :class:`OnnxEmbedder`; also used for the validation.
            **export_kwargs: passed to :func:`export_onnx` (``pooling``, ``fp16``, ``optimize``, ...).
        """
        tempdir = tempfile.mkdtemp(prefix="visreg-onnx-")
        from visreg_hub.inference.onnx.export import export_onnx

        try:
            path = Path(tempdir) / f"{model.config.name or 'model'}.onnx"
            export_onnx(model, path, validation_providers=providers, **export_kwargs)
            embedder = cls(path, providers=providers, device_id=device_id)
        except BaseException:
            shutil.rmtree(tempdir, ignore_errors=True)
            raise
        embedder._tempdir = tempdir
        weakref.finalize(embedder, shutil.rmtree, tempdir, True)
        return embedder

    # ------------------------------------------------------------------------------------ running
    def run(self, inputs: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        """Run the graph on an already prepared batch (plain ``session.run``).

        Args:
            inputs: ``pixel_values`` (B, C, H, W) float32 normalised, or for baked preprocessing uint8
                images in the graph's layout and fixed size (see ``metadata``).
            outputs: output names (None: all of ``metadata.outputs``).

        Returns:
            One array per output: ``embedding`` (B, E) float32 (not L2-normalised), ``patch_tokens``
            (B, h, w, D).
        """
        return self.session.run(list(outputs or self.metadata.outputs), {self.metadata.input_name: inputs})

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 from :attr:`transform` (CPU) -> (B, E) float32 on the CPU, not normalised."""
        if not self.metadata.dynamic_batch and len(pixels) > 1:  # exported with a batch of 1
            return torch.cat([self.embed_pixels(pixels[i : i + 1]) for i in range(len(pixels))])
        baked, nhwc = self.metadata.has_preprocessing, self.metadata.input_layout == "NHWC"
        if self.uses_io_binding:
            return self._embed_batch_cuda(pixels, baked, nhwc).cpu()
        if baked:
            feed = (pixels.permute(0, 2, 3, 1) if nhwc else pixels).contiguous().numpy()
        else:
            feed = self._normalizer.normalize(pixels).numpy()  # the same float32 ops as the torch path
        return torch.from_numpy(self.run(feed, [EMBEDDING])[0])

    def _embed_batch_cuda(self, pixels: torch.Tensor, baked: bool, nhwc: bool) -> torch.Tensor:
        """IOBinding: uint8 copied to the GPU, normalised there, bound by pointer; the output stays on it."""
        device = torch.device("cuda", self.device_id)
        images = pixels.to(device, non_blocking=True)  # the DataLoader pins batches in this mode
        if baked:
            images, element = (images.permute(0, 2, 3, 1) if nhwc else images).contiguous(), np.uint8
        else:
            images, element = self._normalizer.normalize(images).contiguous(), np.float32
        out = torch.empty((images.shape[0], self.embedding_dim), dtype=torch.float32, device=device)
        binding = self.session.io_binding()
        name = self.metadata.input_name
        binding.bind_input(name, "cuda", self.device_id, element, tuple(images.shape), images.data_ptr())
        binding.bind_output(EMBEDDING, "cuda", self.device_id, np.float32, tuple(out.shape), out.data_ptr())
        # why: ONNX Runtime runs on its own CUDA stream; the copy and normalisation on torch's must be done
        torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding)  # returns after ORT's stream is synchronised
        return out

    def _check_call(self, pooling: str | None, device: Any, dtype: Any) -> None:
        if pooling is not None and pooling != self.pooling:
            raise UserInputError(
                f"{self.path.name} was exported with pooling={self.pooling!r}, got pooling={pooling!r}; "
                f"re-export with export_onnx(model, path, pooling={pooling!r})"
            )
        if device is not None:
            wanted = torch.device(device)
            on_gpu = self.active_provider in GPU_PROVIDERS
            if (wanted.type == "cuda") != on_gpu or (on_gpu and wanted.index not in (None, self.device_id)):
                raise UserInputError(
                    f"device={str(device)!r} but this session runs on {self.active_provider} (device_id "
                    f"{self.device_id}); open OnnxEmbedder(path, providers=..., device_id=...) for it"
                )
        resolved = resolve_dtype(dtype)
        if resolved is not None:
            expected = torch.float16 if self.metadata.precision == "fp16" else torch.float32
            if resolved != expected:
                raise UserInputError(
                    f"dtype={dtype!r} but {self.path.name} is a {self.metadata.precision} graph; export with "
                    f"fp16={resolved == torch.float16} for that precision (bfloat16 graphs are not supported)"
                )

    def encode(
        self,
        images: Any,
        *,
        batch_size: int = 64,
        pooling: str | None = None,
        normalize: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        num_workers: int = 0,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        on_error: str = "raise",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        draft_decode: bool = False,
    ) -> torch.Tensor | np.ndarray | EncodeResult:
        """Embed images; arguments, return value and errors as :func:`visreg_hub.inference.encode`.

        ``pooling``, ``device`` and ``dtype`` are fixed by the file and the session: None accepts them,
        another value raises ValueError saying how to export or open the graph for it.

        Returns:
            (N, E) float32 embeddings in input order (a CPU tensor, or numpy with ``convert_to_numpy``);
            ``EncodeResult(embeddings, failures)`` with ``on_error="skip"``.
        """
        from visreg_hub.inference.onnx.backend import OnnxBackend

        self._check_call(pooling, device, dtype)
        pipeline = EmbeddingPipeline(
            OnnxBackend(self), normalize=normalize, max_pixels=max_pixels, draft_decode=draft_decode
        )
        result, failures = pipeline.run(
            images, batch_size=batch_size, num_workers=num_workers, on_error=on_error,
            show_progress_bar=show_progress_bar, desc="encode (onnx)",
        )  # fmt: skip
        embeddings = result.numpy() if convert_to_numpy else result
        return EncodeResult(embeddings, failures) if on_error == "skip" else embeddings
