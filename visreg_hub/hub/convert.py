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
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from visreg_hub.errors import CheckpointError, ConfigError, ModelNotFoundError, VisregHubError
from visreg_hub.filehash import sha256_file
from visreg_hub.hub import preflight
from visreg_hub.hub.format import load_backbone_weights
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
        raise ModelNotFoundError(f"no checkpoint file at {path}")
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head[:1] == b"\x80":
        # why: the pre-1.6 format declares each storage's size in the file and torch allocates it before
        # reading, so a few bytes can ask for any amount of memory
        raise CheckpointError(
            f"{path} uses PyTorch's legacy (pre-1.6) serialisation, which is not read from untrusted files; "
            "load it where you trust it and re-save it with a current torch.save"
        )
    if head != b"PK":
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it starts with {head!r}, not torch.save's zip archive); "
            "pass the official .pth file"
        )
    _check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} was refused by the weights-only loader: it contains Python objects other than tensors "
            f"and plain containers, and visreg_hub never executes pickled code ({_refusal_detail(exc)})"
        ) from exc
    except Exception as exc:  # a damaged file makes the unpickler raise KeyError, IndexError, ...
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); it is damaged or "
            "not the official .pth file"
        ) from None


def _check_archive(path: Path) -> None:
    """torch.save writes its zip uncompressed: refuse compressed entries before torch inflates them.

    why: a 1 MB archive of deflated zeros inflates to about 1 GB, which torch allocates before anything
    can be checked. With stored entries only, what torch reads is bounded by the file's own size.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
        packed = [info.filename for info in entries if info.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable zip archive ({exc}); it is damaged") from None
    if packed:
        raise CheckpointError(
            f"{path} holds compressed entries ({packed[:3]}), which torch.save never writes; the file was "
            "re-packed by another tool: re-save the weights with torch.save"
        )


def _refusal_detail(exc: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names the offending object, without its advice to turn the
    weights-only loader off (the one thing never to do with an untrusted file)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"it asks for {found.group(1)}" if found else "an object the loader does not allow"


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
        if not isinstance(original_key, str):
            raise CheckpointError(
                f"the state dict has a {type(original_key).__name__} key {original_key!r}; parameter names "
                "are strings: this is not a model's state_dict"
            )
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
    hint = (
        "Pass the architecture the weights were trained with (--arch, a named size: "
        f"{', '.join(NAMED_SIZES)}), and its img_size / register tokens through "
        "convert_official_checkpoint(..., img_size=...)."
    )
    load_backbone_weights(model, state_dict, source=str(pth_path), hint=hint)
    # as from_pretrained does: a folder written from NaN weights would be refused at every load
    preflight.check_finite(state_dict, str(pth_path))
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

    folder = save_pretrained(model, out_folder, overwrite_card=True)  # the card describes these weights
    logger.info("converted %s (sha256 %s) into %s", pth_path, digest, folder)
    return folder
