"""VISRegEncoder: a timm Vision Transformer with the feature taps used by VISReg.

Feature taps (all computed from the backbone without a head):

* ``cls``: the CLS token after the final LayerNorm, (B, D). This is what the projector sees during
  VISReg pre-training and the default embedding.
* ``cls_last2`` / ``cls_last4``: the CLS token of each of the last K blocks, each passed through the
  final LayerNorm, concatenated from the earliest to the last block, (B, K*D). The official online probe
  uses the last 2 blocks, the paper's linear probe the last 4.
* ``mean_patch``: the mean over patch tokens (CLS and register tokens excluded) after the final
  LayerNorm, (B, D).
* ``patch``: the patch tokens after the final LayerNorm as a spatial grid, (B, h, w, D), from
  :meth:`VISRegEncoder.patch_tokens`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import nn

from visreg_hub.errors import ConfigError, UserInputError
from visreg_hub.models.config import PATCH_POOLING, POOLING_BLOCKS, POOLINGS, ModelConfig
from visreg_hub.models.limits import DEFAULT_MAX_PIXELS, check_class_token

if TYPE_CHECKING:
    import numpy as np

    from visreg_hub.inference.pipeline import EncodeResult

logger = logging.getLogger(__name__)


class VISRegEncoder(nn.Module):
    """ViT backbone (timm ``VisionTransformer``, no head) plus VISReg feature taps.

    Args:
        config: architecture and data configuration.

    Attributes:
        config: the :class:`ModelConfig` it was built from.
        backbone: the timm VisionTransformer (``num_classes=0``); its ``state_dict`` uses timm key names,
            which is what ``model.safetensors`` stores.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"VISRegEncoder expects a ModelConfig, got {type(config).__name__}")
        self.config = config
        check_class_token(config.architecture)  # before timm, whose own check is a bare assert
        self.backbone = timm.create_model(
            config.architecture,
            pretrained=False,
            num_classes=0,  # no classifier head: the encoder returns features
            global_pool="token",
            drop_path_rate=config.drop_path_rate,
            # this model's preprocessing, not the stock architecture's (DINO's 224 px and its weights URL):
            # timm's resolve_model_data_config(model.backbone) then gives what encode() does
            pretrained_cfg=config.timm_pretrained_cfg(),
            **config.timm_kwargs(),
        )
        if getattr(self.backbone, "cls_token", None) is None:
            raise ConfigError(
                f"architecture {config.architecture!r} built a model without a CLS token; "
                "VISRegEncoder needs a ViT with class_token=True"
            )

    # ------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        """Token width D."""
        return self.config.embed_dim

    def embedding_dim(self, pooling: str | None = None) -> int:
        """Length of the vector :meth:`forward` returns for ``pooling`` (None: ``config.pooling``)."""
        pooling = self._resolve_pooling(pooling)
        return self.embed_dim * POOLING_BLOCKS.get(pooling, 1)

    def get_sentence_embedding_dimension(self) -> int:
        """sentence-transformers' name for :meth:`embedding_dim` of the default pooling."""
        return self.embedding_dim()

    @property
    def data_config(self) -> dict[str, Any]:
        """timm-style preprocessing settings (input_size, mean, std, crop_pct, interpolation, crop_mode)."""
        return self.config.data_config

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` of the backbone (this model's preprocessing), so that
        ``timm.data.resolve_model_data_config(model)`` works on the encoder as on a timm model."""
        return self.backbone.pretrained_cfg

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus register tokens at the start of every token sequence."""
        return self.backbone.num_prefix_tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory during training (delegates to timm)."""
        self.backbone.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ validation helpers
    def _resolve_pooling(self, pooling: str | None) -> str:
        pooling = self.config.pooling if pooling is None else pooling
        if pooling == PATCH_POOLING:
            raise UserInputError(
                "pooling='patch' returns a token grid, not a vector; for images use "
                "visreg_hub.inference.extract_patch_features(model, images) (encoder.patch_tokens(pixels) "
                "takes normalised pixel tensors)"
            )
        if pooling not in POOLINGS:
            raise UserInputError(f"unknown pooling {pooling!r}; use one of {POOLINGS} or patch_tokens()")
        needed = POOLING_BLOCKS.get(pooling, 1)
        if needed > self.config.depth:
            raise UserInputError(
                f"pooling={pooling!r} needs at least {needed} blocks, the model has {self.config.depth}"
            )
        return pooling

    def _check_images(self, images: torch.Tensor) -> tuple[int, int]:
        """Validate a (B, C, H, W) batch and return its token grid (h, w)."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"images must be a float tensor (B, C, H, W), got {type(images).__name__}; "
                "use encoder.encode(...) for paths, PIL images or arrays"
            )
        if images.ndim != 4:
            raise UserInputError(f"images must have shape (B, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != self.config.in_chans:
            raise UserInputError(
                f"images have {images.shape[1]} channels but the model expects "
                f"in_chans={self.config.in_chans}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point (normalised), got dtype {images.dtype}")
        height, width = images.shape[-2:]
        patch = self.config.patch_size
        if self.config.dynamic_img_size:
            if height % patch or width % patch:
                raise UserInputError(
                    f"image size {height}x{width} is not a multiple of patch_size={patch}; "
                    f"resize or crop to a multiple of {patch}"
                )
        elif (height, width) != (self.config.img_size, self.config.img_size):
            raise UserInputError(
                f"image size {height}x{width} differs from img_size={self.config.img_size} and the model "
                "was built with dynamic_img_size=False; resize the images or rebuild with "
                "dynamic_img_size=True"
            )
        return height // patch, width // patch

    # ------------------------------------------------------------------ features
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the final LayerNorm.

        Args:
            images: (B, C, H, W) normalised float images.

        Returns:
            (B, T, D) with T = 1 (CLS) + num_reg_tokens + h*w, in that order.
        """
        self._check_images(images)
        return self.backbone.forward_features(images)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens after the final LayerNorm as a spatial grid (the ``patch`` tap).

        Args:
            images: (B, C, H, W) normalised float images.

        Returns:
            (B, h, w, D) with h = H // patch_size, w = W // patch_size.
        """
        grid_h, grid_w = self._check_images(images)
        tokens = self.backbone.forward_features(images)[:, self.num_prefix_tokens :]
        return tokens.reshape(tokens.shape[0], grid_h, grid_w, tokens.shape[-1])

    def forward(self, images: torch.Tensor, pooling: str | None = None) -> torch.Tensor:
        """One embedding per image.

        Args:
            images: (B, C, H, W) normalised float images.
            pooling: feature tap, one of ``POOLINGS``; None uses ``config.pooling``.

        Returns:
            (B, E) with E = :meth:`embedding_dim` (D, or K*D for ``cls_lastK``).
        """
        pooling = self._resolve_pooling(pooling)
        if pooling in POOLING_BLOCKS:
            self._check_images(images)
            # One pass; timm normalises each tapped block output with the final norm (norm=True).
            per_block = self.backbone.forward_intermediates(
                images,
                indices=POOLING_BLOCKS[pooling],
                norm=True,
                output_fmt="NLC",
                intermediates_only=True,
                return_prefix_tokens=True,
                stop_early=True,
            )
            return torch.cat([prefix[:, 0] for _spatial, prefix in per_block], dim=-1)
        tokens = self.forward_features(images)
        if pooling == "cls":
            return tokens[:, 0]
        # mean_patch: registers are scratch space, not image content, so they are excluded like CLS.
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
        stop_early: bool = False,
    ):
        """Block outputs, as timm's ``VisionTransformer.forward_intermediates`` (delegated to it).

        Args:
            images: (B, C, H, W) normalised float images.
            indices: last n blocks if int, all if None, the listed block indices if a list.
            norm: pass each intermediate through the final LayerNorm.
            output_fmt: ``"NCHW"`` gives (B, D, h, w) patch grids, ``"NLC"`` gives (B, h*w, D).
            intermediates_only: return only the list of intermediates.
            return_prefix_tokens: return (patch, prefix) pairs, prefix being (B, 1 + num_reg_tokens, D).
            stop_early: stop after the last requested block.

        Returns:
            The list of intermediates, or ``(final_tokens (B, T, D), intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise UserInputError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        self._check_images(images)
        return self.backbone.forward_intermediates(
            images,
            indices=indices,
            norm=norm,
            output_fmt=output_fmt,
            intermediates_only=intermediates_only,
            return_prefix_tokens=return_prefix_tokens,
            stop_early=stop_early,
        )

    # ------------------------------------------------------------------ thin delegations
    # Imports are local so that visreg_hub.models never imports hub/inference at import time.
    @property
    def backend(self) -> str:
        """What :meth:`encode` runs on now: ``"torch"`` or ``"onnx"`` (``from_pretrained(backend=...)``).

        With ``backend="auto"``, ``"onnx"`` turns into ``"torch"`` after the first call if the ONNX export
        cache turns out not to be writable (that call warns once and runs on torch).
        """
        from visreg_hub.inference.backends import resolve_backend, spec_of

        return resolve_backend(self, spec_of(self))

    def encode(
        self,
        images: Any,
        *,
        batch_size: int = 64,
        pooling: str | None = None,
        normalize: bool | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        num_workers: int = 0,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        normalize_embeddings: bool | None = None,
        precision: str = "float32",
        calibration_embeddings: np.ndarray | torch.Tensor | None = None,
        truncate_dim: int | None = None,
        on_error: str = "raise",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        backend: str | None = None,
        draft_decode: bool = False,
    ) -> torch.Tensor | np.ndarray | EncodeResult:
        """Embed paths, PIL images, arrays or tensors; see :func:`visreg_hub.inference.embedder.encode`
        for every argument (sentence-transformers' names: ``batch_size``, ``convert_to_numpy``, ...).

        Runs on the backend chosen at load time (``from_pretrained(..., backend=...)``): its default
        ``"auto"`` is ONNX Runtime on a CPU when onnxruntime is installed, else torch; ``model.backend``
        says which. The two agree to about 1e-7, not bit for bit.

        Shape:
            a list of N images gives (N, E) with E = ``self.embedding_dim(pooling)`` (``truncate_dim`` if
            given); a single image gives (E,).
        """
        from visreg_hub.inference.embedder import encode

        # Spelled out (not **kwargs) so that help(), IDEs and notebooks show the arguments; a test keeps
        # this list equal to encode()'s.
        return encode(
            self, images, batch_size=batch_size, pooling=pooling, normalize=normalize, device=device,
            dtype=dtype, num_workers=num_workers, show_progress_bar=show_progress_bar,
            convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor,
            normalize_embeddings=normalize_embeddings, precision=precision,
            calibration_embeddings=calibration_embeddings, truncate_dim=truncate_dim, on_error=on_error,
            max_pixels=max_pixels, backend=backend, draft_decode=draft_decode,
        )  # fmt: skip

    def similarity(self, embeddings1, embeddings2) -> torch.Tensor:
        """Cosine similarity matrix, as sentence-transformers' ``model.similarity``.

        Shape:
            (N, E) or (E,) with (M, E) or (E,) -> (N, M) float32.
        """
        from visreg_hub.inference.similarity import cos_sim

        return cos_sim(embeddings1, embeddings2)

    def save_pretrained(self, folder, **kwargs):
        """Write config.json, model.safetensors, README.md (:func:`visreg_hub.hub.saving.save_pretrained`)."""
        from visreg_hub.hub.saving import save_pretrained

        return save_pretrained(self, folder, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload to the Hugging Face Hub; see :func:`visreg_hub.hub.saving.push_to_hub`."""
        from visreg_hub.hub.saving import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> VISRegEncoder:
        """Load by registry name, Hub repo or folder; see :func:`visreg_hub.hub.loading.from_pretrained`."""
        from visreg_hub.hub.loading import from_pretrained

        return from_pretrained(name_or_path, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, pooling={self.config.pooling!r}, embed_dim={self.embed_dim}"
