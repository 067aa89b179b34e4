"""from_pretrained: registry name | ``hf-hub:org/repo`` | ``org/repo`` | local folder -> VISRegEncoder.

Downloads go through huggingface_hub's cache (``hf_hub_download``), so ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` behave as everywhere else in the ecosystem. Weights
are read from safetensors only (no pickle on any load path) and loaded strictly: missing, unexpected
or mis-shaped keys are a :class:`CheckpointError` listing them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from visreg_hub.errors import CheckpointError, ConfigError, ModelNotFoundError, ModelNotPublishedError
from visreg_hub.hub import registry
from visreg_hub.hub.saving import CONFIG_NAME, FORMAT_VERSION, PROMOTED_EXTRA_KEYS, WEIGHTS_NAME
from visreg_hub.models.config import ModelConfig

logger = logging.getLogger(__name__)

# model_args that describe only the (absent) classifier head or training-time dropout
_IGNORED_MODEL_ARGS = {
    "num_classes",
    "global_pool",
    "drop_rate",
    "pos_drop_rate",
    "attn_drop_rate",
    "proj_drop_rate",
}
_MODEL_ARG_TO_FIELD = {
    "img_size": "img_size",
    "patch_size": "patch_size",
    "embed_dim": "embed_dim",
    "depth": "depth",
    "num_heads": "num_heads",
    "in_chans": "in_chans",
    "mlp_ratio": "mlp_ratio",
    "reg_tokens": "num_reg_tokens",
    "dynamic_img_size": "dynamic_img_size",
    "qkv_bias": "qkv_bias",
    "init_values": "init_values",
    "drop_path_rate": "drop_path_rate",
}
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


# ---------------------------------------------------------------------- config.json -> ModelConfig
def _architecture_defaults(architecture: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """Fields a plain timm config.json leaves implicit, read from the architecture built on ``meta``."""
    import timm

    try:
        with torch.device("meta"):
            reference = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    except RuntimeError as exc:
        raise ConfigError(
            f"config.json names architecture {architecture!r}, which timm cannot build: {exc}"
        ) from exc
    if not hasattr(reference, "patch_embed") or not hasattr(reference, "blocks"):
        raise ConfigError(
            f"architecture {architecture!r} is not a timm VisionTransformer; visreg_hub loads ViTs only"
        )
    return {
        "img_size": int(reference.patch_embed.img_size[0]),
        "patch_size": int(reference.patch_embed.patch_size[0]),
        "embed_dim": int(reference.embed_dim),
        "depth": len(reference.blocks),
        "num_heads": int(reference.blocks[0].attn.num_heads),
    }


def config_from_config_json(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Rebuild the :class:`ModelConfig` from a timm-compatible ``config.json`` (visreg block optional).

    Raises:
        CheckpointError: the file is not a ViT config this library can rebuild.
    """
    if not isinstance(data, dict) or "architecture" not in data:
        raise CheckpointError(f"{source} has no 'architecture'; it is not a timm/visreg_hub config.json")
    visreg = data.get("visreg") or {}
    version = visreg.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} uses visreg format_version {version}, newer than this library's {FORMAT_VERSION}; "
            "upgrade visreg_hub"
        )
    model_args = dict(data.get("model_args") or {})
    unsupported = sorted(set(model_args) - set(_MODEL_ARG_TO_FIELD) - _IGNORED_MODEL_ARGS)
    if unsupported:
        raise CheckpointError(
            f"{source}: model_args {unsupported} are not supported by VISRegEncoder "
            "(a standard ViT with a CLS token)"
        )
    fields: dict[str, Any] = {"architecture": data["architecture"]}
    for arg, field_name in _MODEL_ARG_TO_FIELD.items():
        if arg in model_args:
            fields[field_name] = model_args[arg]
    if isinstance(fields.get("img_size"), list | tuple):
        height, width = fields["img_size"]
        if height != width:
            raise CheckpointError(f"{source}: non-square img_size {fields['img_size']} is not supported")
        fields["img_size"] = height
    if isinstance(fields.get("patch_size"), list | tuple):
        fields["patch_size"] = fields["patch_size"][0]
    if any(key not in fields for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")):
        known = {k: v for k, v in model_args.items() if k not in _IGNORED_MODEL_ARGS}
        defaults = _architecture_defaults(data["architecture"], known)
        fields = {**defaults, **fields}
    pretrained_cfg = data.get("pretrained_cfg") or {}
    for key in ("mean", "std", "crop_pct", "interpolation"):
        if key in pretrained_cfg:
            fields[key] = pretrained_cfg[key]
    for key in ("pooling", "name", "drop_path_rate"):
        if visreg.get(key) is not None:
            fields[key] = visreg[key]
    extra = dict(visreg.get("extra") or {})
    extra.update({key: visreg[key] for key in PROMOTED_EXTRA_KEYS if key in visreg})
    if "license" not in extra and pretrained_cfg.get("license"):
        extra["license"] = pretrained_cfg["license"]
    fields["extra"] = extra
    try:
        return ModelConfig(**fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{source} describes an invalid model: {exc}") from exc


def read_config_json(path: str | Path) -> ModelConfig:
    """Read and parse a ``config.json`` file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    return config_from_config_json(data, source=str(path))


# ---------------------------------------------------------------------- weights
def load_safetensors_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file onto the CPU, refusing anything else (pickles renamed included).

    Raises:
        CheckpointError: the file is not valid safetensors; the message says if it looks like a pickle.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError / OSError subclasses on malformed files
        with open(path, "rb") as handle:
            head = handle.read(4)
        looks_pickled = head.startswith(_PICKLE_MAGIC)
        hint = (
            " It looks like a pickled PyTorch file (.pt/.pth/.bin) renamed to .safetensors; visreg_hub never "
            "unpickles weights. Convert it with `visreg-hub convert` (weights-only loader) instead."
            if looks_pickled
            else " The file is corrupt or truncated; delete it (or the cache entry) and download it again."
        )
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}).{hint}") from exc


def load_backbone_weights(model, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load timm-keyed weights into ``model.backbone`` strictly.

    Raises:
        CheckpointError: lists missing keys, unexpected keys and shape mismatches (never a warning).
    """
    expected = model.backbone.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mismatched:
            problems.append(f"shape mismatches {mismatched}")
        raise CheckpointError(
            f"weights in {source} do not match the model described by its config: {'; '.join(problems)}. "
            "Make sure config.json and model.safetensors come from the same save_pretrained call."
        )
    model.backbone.load_state_dict(state_dict, strict=True)


def verify_sha256(path: str | Path, expected: str | None, name: str) -> str:
    """Compare a file's SHA-256 with the registry's pin; return the digest."""
    from visreg_hub.hub.convert import file_sha256

    digest = file_sha256(path)
    if expected is None:
        logger.info("%s: sha256 %s (not pinned in the registry)", name, digest)
    elif digest != expected.lower():
        raise CheckpointError(
            f"{name}: SHA-256 of {path} is {digest}, the registry pins {expected}. "
            "The download is corrupt or "
            "the upstream file changed; delete the cached file and retry, or pin the new revision."
        )
    return digest


def load_folder(folder: str | Path, *, weights_sha256: str | None = None, name: str | None = None):
    """Build a :class:`VISRegEncoder` from a checkpoint folder (config.json + model.safetensors)."""

    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{folder} has no {CONFIG_NAME}; it is not a visreg_hub/timm checkpoint folder"
        )
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in {".pth", ".pt", ".bin", ".ckpt"})
        hint = f" Found pickled weights {pickles}: convert them with `visreg-hub convert`." if pickles else ""
        raise CheckpointError(
            f"{folder} has no {WEIGHTS_NAME} (safetensors is the only accepted format).{hint}"
        )
    if weights_sha256 is not None:
        verify_sha256(weights_path, weights_sha256, name or str(folder))
    return _build(read_config_json(config_path), weights_path)


def _build(config: ModelConfig, weights_path: Path):
    from visreg_hub.models.encoder import VISRegEncoder

    state_dict = load_safetensors_weights(weights_path)
    model = VISRegEncoder(config)
    load_backbone_weights(model, state_dict, source=str(weights_path))
    return model


# ---------------------------------------------------------------------- Hub downloads
def hub_download(repo_id: str, filename: str, **download_kwargs: Any) -> Path:
    """``hf_hub_download`` with library identification and visreg_hub errors."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    import visreg_hub

    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                library_name="visreg_hub",
                library_version=visreg_hub.__version__,
                **download_kwargs,
            )
        )
    except LocalEntryNotFoundError as exc:
        raise ModelNotFoundError(
            f"{filename} of {repo_id!r} is not in the local Hugging Face cache and downloading is disabled "
            "(HF_HUB_OFFLINE=1 or local_files_only=True) or the Hub is unreachable. Download it once online, "
            "or pass a local folder."
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(
            f"revision {download_kwargs.get('revision')!r} does not exist in {repo_id!r}: {exc}"
        ) from exc
    except RepositoryNotFoundError as exc:  # includes gated repositories without access
        raise ModelNotFoundError(
            f"Hub repository {repo_id!r} was not found or is private/gated; check the name, or log in / pass "
            f"token= (HF_TOKEN) if you have access"
        ) from exc
    except EntryNotFoundError as exc:
        raise CheckpointError(
            f"{repo_id!r} has no {filename}; visreg_hub needs config.json and model.safetensors "
            "(pickled .bin/.pth weights are never loaded; convert them with `visreg-hub convert`)"
        ) from exc
    except HFValidationError as exc:
        raise ModelNotFoundError(f"{repo_id!r} is not a valid Hub repository id: {exc}") from exc


def _load_hub_repo(repo_id: str, *, weights_sha256: str | None = None, **download_kwargs: Any):
    config_path = hub_download(repo_id, CONFIG_NAME, **download_kwargs)
    config = read_config_json(config_path)
    weights_path = hub_download(repo_id, WEIGHTS_NAME, **download_kwargs)
    if weights_sha256 is not None:
        verify_sha256(weights_path, weights_sha256, repo_id)
    return _build(config, weights_path)


def _bundled_folder(entry: registry.RegistryEntry) -> Path:
    package_root = Path(__file__).resolve().parents[1]
    for base in (package_root, package_root.parent):  # inside the package, then the repository root
        candidate = base / entry.local_path
        if candidate.is_dir():
            return candidate
    raise ModelNotFoundError(
        f"bundled model {entry.name!r} should be at {entry.local_path!r} (under {package_root} or "
        f"{package_root.parent}) but the folder is missing; reinstall or check out the repository's assets"
    )


def _load_registry_entry(entry: registry.RegistryEntry, revision: str | None, **download_kwargs: Any):
    if entry.status == "not yet published":
        how = f" To train one yourself: {entry.train_command}" if entry.train_command else ""
        raise ModelNotPublishedError(
            f"{entry.name!r} is listed in the registry but its weights are not yet published "
            f"({entry.source}).{how}"
        )
    if entry.status == "bundled":
        return load_folder(_bundled_folder(entry), weights_sha256=entry.sha256, name=entry.name)
    revision = revision or entry.revision
    if entry.format == "visreg_hub":
        return _load_hub_repo(
            entry.repo_id, weights_sha256=entry.sha256, revision=revision, **download_kwargs
        )
    # official-pth: download the pickled release, check it, convert in memory with the weights-only loader
    from visreg_hub.hub.convert import official_encoder

    pth_path = hub_download(entry.repo_id, entry.filename, revision=revision, **download_kwargs)
    verify_sha256(pth_path, entry.sha256, entry.name)
    extra = {"license": entry.license, "source": entry.source}
    if entry.dataset:
        extra["datasets"] = [entry.dataset]
    return official_encoder(pth_path, entry.size, name=entry.name, extra=extra, **entry.config_overrides)


# ---------------------------------------------------------------------- entry point
def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or name in {".", ".."}
    )


def from_pretrained(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a :class:`~visreg_hub.models.VISRegEncoder` in eval mode.

    Resolution order: an existing local folder; ``hf-hub:org/repo``; a registry name
    (:func:`visreg_hub.list_models`); ``org/repo`` on the Hugging Face Hub.

    Args:
        name_or_path: folder, registry name, ``hf-hub:org/repo`` or ``org/repo``.
        revision: Hub branch, tag or commit hash to pin (overrides the registry's pin).
        cache_dir: Hugging Face cache directory (default: ``HF_HUB_CACHE`` / ``HF_HOME``).
        local_files_only: never touch the network; use the cache only (``HF_HUB_OFFLINE=1`` does the same).
        token: Hub token (default: ``HF_TOKEN`` or the stored login).
        device: where to put the model.
        dtype: floating dtype of the parameters (e.g. ``torch.bfloat16``).

    Raises:
        ModelNotFoundError: nothing matches (close registry names are suggested).
        ModelNotPublishedError: a registry entry without public weights.
        CheckpointError: malformed config, non-safetensors weights, key/shape mismatch, sha256 mismatch.
    """
    if isinstance(name_or_path, Path) or (
        isinstance(name_or_path, str) and Path(name_or_path).expanduser().is_dir()
    ):
        model = load_folder(Path(name_or_path).expanduser())
    elif isinstance(name_or_path, str) and Path(name_or_path).expanduser().is_file():
        raise ModelNotFoundError(
            f"{name_or_path!r} is a file; pass the folder that holds config.json and model.safetensors "
            "(for an official .pth, run `visreg-hub convert` first)"
        )
    elif not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelNotFoundError(f"from_pretrained needs a name, repo id or folder, got {name_or_path!r}")
    else:
        download_kwargs = {"cache_dir": cache_dir, "local_files_only": local_files_only, "token": token}
        name = name_or_path.strip()
        entry = registry.find_entry(name)
        if name.startswith("hf-hub:"):
            model = _load_hub_repo(name[len("hf-hub:") :], revision=revision, **download_kwargs)
        elif entry is not None:
            model = _load_registry_entry(entry, revision, **download_kwargs)
        elif _looks_like_path(name) or name.count("/") != 1:
            where = "no such folder" if _looks_like_path(name) else "not a registry name or 'org/repo'"
            raise ModelNotFoundError(f"cannot load {name!r}: {where}.{registry.suggest_names(name)}")
        else:
            model = _load_hub_repo(name, revision=revision, **download_kwargs)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()
