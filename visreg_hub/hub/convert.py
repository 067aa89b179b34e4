"""Convert the official VISReg ``.pth`` release into a visreg_hub checkpoint folder.

The official weights are pickled PyTorch files. This module holds the project's only ``torch.load``,
always with ``weights_only=True``: PyTorch's restricted unpickler then accepts tensors and plain
containers only and refuses any other object (a crafted file cannot run code). torch >= 2.10 is
required because earlier releases had bypasses of that restriction.

Released files are flat timm state dicts plus projector keys; training checkpoints nest them (e.g.
``{"net_state_dict": {...}}``) and prefix them with ``module.`` (DDP), ``_orig_mod.`` (torch.compile),
``backbone.`` / ``encoder.`` (wrappers). All of these are unwrapped; projector and probe heads are
dropped (and logged); whatever remains must match the timm model exactly.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from visreg_hub.errors import CheckpointError, ConfigError, VisregHubError
from visreg_hub.hub.format import load_backbone_weights, sha256_file
from visreg_hub.models.config import NAMED_SIZES, ModelConfig

logger = logging.getLogger(__name__)

MIN_TORCH = (2, 10)
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")
NON_BACKBONE_PREFIXES = (
    "proj.", "projector.", "projection_head.", "head.", "heads.", "probe.", "online_probe.",
    "linear_probe.", "classifier.", "predictor.",
)  # fmt: skip
# Keys under which training scripts commonly nest the model's state dict.
CONTAINER_KEYS = ("net_state_dict", "state_dict", "model_state_dict", "model", "net", "encoder", "backbone")
OFFICIAL_LICENSE = "cc-by-nc-4.0"


def _check_torch_version() -> None:
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_TORCH:
        raise VisregHubError(
            f"converting pickled checkpoints needs torch >= {'.'.join(map(str, MIN_TORCH))} for a safe "
            f"weights_only unpickler; found torch {torch.__version__}. Upgrade torch."
        )


def load_pth_weights_only(path: str | Path) -> Any:
    """Unpickle ``path`` with PyTorch's restricted loader (tensors and plain containers only).

    Raises:
        CheckpointError: the file holds other objects (refused, nothing executed) or is not a torch file.
    """
    _check_torch_version()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as handle:
        head = handle.read(2)
    if not (head == b"PK" or head[:1] == b"\x80"):  # torch zip archive, or a legacy pickle (protocol 2+)
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it starts with {head!r}, not a zip archive or a pickle); "
            "pass the official .pth file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused by the weights-only loader: it contains Python objects other than tensors "
            f"and plain containers, and visreg_hub never executes pickled code. Details: {exc}"
        ) from exc
    except Exception as exc:  # a damaged file makes the unpickler raise KeyError, IndexError, ...
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); it is damaged or "
            "not the official .pth file"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, *, max_depth: int = 3) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a (possibly nested) checkpoint.

    A dict whose values are all tensors is returned as is; otherwise the first of ``CONTAINER_KEYS``
    holding a dict is searched (non-tensor entries such as epoch or optimizer state are ignored).
    """
    current = obj
    for _ in range(max_depth + 1):
        if _is_state_dict(current):
            return current
        if not isinstance(current, dict):
            break
        nested = next((current[k] for k in CONTAINER_KEYS if isinstance(current.get(k), dict)), None)
        if nested is None:
            tensors = {k: v for k, v in current.items() if isinstance(v, torch.Tensor)}
            if tensors:
                logger.info("ignoring non-tensor checkpoint entries: %s", sorted(set(current) - set(tensors)))
                return tensors
            break
        current = nested
    top = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"no state dict found in the checkpoint (top level: {top}); expected tensors or {CONTAINER_KEYS}"
    )


def strip_prefixes(key: str) -> str:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, ``backbone.``, ``encoder.``) in any order."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def extract_backbone_state_dict(checkpoint: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Backbone tensors with timm key names, and the list of dropped head keys.

    Args:
        checkpoint: what ``torch.load`` returned (flat or nested state dict).

    Returns:
        (state_dict, dropped): ``dropped`` lists the projector/probe keys (after prefix stripping).

    Raises:
        CheckpointError: two keys collide after prefix stripping.
    """
    raw = unwrap_state_dict(checkpoint)
    backbone: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for original_key, tensor in raw.items():
        key = strip_prefixes(original_key)
        if key.startswith(NON_BACKBONE_PREFIXES):
            dropped.append(key)
            continue
        if key in backbone:
            raise CheckpointError(
                f"keys collide after removing wrapper prefixes: {original_key!r} -> {key!r}"
            )
        backbone[key] = tensor
    if dropped:
        logger.info("dropped %d non-backbone keys (projector/probe heads): %s", len(dropped), sorted(dropped))
    return backbone, sorted(dropped)


def resolve_size_name(arch: str) -> str:
    """Accept a named size (``vit-b16``) or a timm architecture (``vit_base_patch16_224``)."""
    if arch.lower() in NAMED_SIZES:
        return arch.lower()
    for size_name, fields in NAMED_SIZES.items():
        if fields["architecture"] == arch and "img_size" not in fields:
            return size_name
    raise ConfigError(
        f"unknown architecture {arch!r}; use a named size ({', '.join(NAMED_SIZES)}) "
        "or one of their timm architecture names"
    )


def official_encoder(pth_path: str | Path, arch: str = "vit-b16", **config_overrides: Any):
    """Build a :class:`VISRegEncoder` holding the weights of an official ``.pth`` (strictly checked).

    Args:
        pth_path: the official checkpoint.
        arch: named size or timm architecture the weights belong to.
        **config_overrides: ModelConfig fields (name, extra, data config...).
    """
    from visreg_hub.models.encoder import VISRegEncoder

    config = ModelConfig.from_name(resolve_size_name(arch), **config_overrides)
    state_dict, _dropped = extract_backbone_state_dict(load_pth_weights_only(pth_path))
    model = VISRegEncoder(config)
    load_backbone_weights(model, state_dict, source=str(pth_path))
    return model.eval()


def convert_official_checkpoint(
    pth_path: str | Path,
    out_folder: str | Path,
    arch: str = "vit-b16",
    *,
    name: str | None = None,
    license: str = OFFICIAL_LICENSE,
    datasets: list[str] | None = None,
    source: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Convert an official VISReg ``.pth`` into a folder (config.json, model.safetensors, README.md).

    Args:
        pth_path: official checkpoint (e.g. ``visreg-vit-b-inet1k.pth``).
        out_folder: folder to write.
        arch: named size (``vit-b16``, ``vit-l14``...) or timm architecture of the weights.
        name: model name for the config and card (default: the file's stem).
        license: license carried into config.json and the card (the official release is CC BY-NC 4.0).
        datasets: training datasets for the card metadata.
        source: provenance line for the card (default: the file name and its SHA-256).
        **config_overrides: ModelConfig fields that differ from the named size (img_size, pooling, mean...).

    Returns:
        The written folder.
    """
    pth_path = Path(pth_path)
    digest = sha256_file(pth_path) if pth_path.is_file() else None
    extra: dict[str, Any] = {
        "license": license,
        "source": source or f"converted from {pth_path.name} (sha256 {digest}) by visreg_hub",
    }
    if datasets:
        extra["datasets"] = list(datasets)
    model = official_encoder(pth_path, arch, name=name or pth_path.stem, extra=extra, **config_overrides)
    from visreg_hub.hub.saving import save_pretrained

    folder = save_pretrained(model, out_folder)
    logger.info("converted %s (sha256 %s) into %s", pth_path, digest, folder)
    return folder
