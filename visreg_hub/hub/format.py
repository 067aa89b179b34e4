"""The checkpoint format's one home: file names, config.json in both directions, safetensors I/O, sha256.

A checkpoint is a folder (one folder = one model):

* ``config.json``: timm-compatible (``architecture``, ``num_classes``, ``num_features``, ``global_pool``,
  ``model_args``, ``pretrained_cfg`` with ``mean``, ``std``, ``input_size``, ``crop_pct``,
  ``interpolation``, ``crop_mode``) plus a ``visreg`` block (``format_version``, ``pooling``,
  ``embedding_dim``, ``name``, ``license``, ``recipe``, ``loss``, ``datasets``, evaluation results, other
  ``extra``).
  ``model_args`` holds only architecture arguments: the head arguments (``num_classes``,
  ``global_pool``) live at the top level, because timm's ``local-dir:`` loader and transformers'
  ``TimmWrapperModel`` pass ``num_classes`` themselves and a second copy inside ``model_args`` is a
  "multiple values for keyword argument" error.
* ``model.safetensors``: the backbone's ``state_dict`` with timm key names (no projector, no
  ``backbone.`` prefix), so timm and transformers load it unchanged.
* ``README.md``: the model card (:mod:`visreg_hub.hub.card`).

Conventional ``config.extra`` keys, promoted into the ``visreg`` block: ``license`` (SPDX-style id),
``recipe`` (dict), ``loss`` (dict: name and settings), ``datasets`` (list of Hub dataset ids),
``eval_results`` (list of dicts with task, dataset, metric, value, split, command), ``eval_command``,
``source``; the rest stays under ``visreg["extra"]``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from visreg_hub.durable import current_umask
from visreg_hub.errors import CheckpointError, ConfigError
from visreg_hub.filehash import sha256_file
from visreg_hub.hub.header import looks_like_pickle
from visreg_hub.jsonio import read_json_file
from visreg_hub.models import limits
from visreg_hub.models.config import ModelConfig
from visreg_hub.native_io import load_safetensors

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # a config.json with model card data is a few KB
# extra keys stored at the top of the visreg block (the rest stays under visreg["extra"])
PROMOTED_EXTRA_KEYS = ("license", "recipe", "loss", "datasets", "eval_results", "eval_command", "source")

# model_args that describe only the (absent) classifier head or training-time dropout; accepted when
# reading (format_version 1 folders written before the fix repeat num_classes/global_pool there)
_IGNORED_MODEL_ARGS = {
    "num_classes",
    "global_pool",
    "drop_rate",
    "pos_drop_rate",
    "attn_drop_rate",
    "proj_drop_rate",
}
# timm model_args key -> ModelConfig field
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


# ---------------------------------------------------------------------- checksums
def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's tensors (state dict names, dtypes, shapes, bytes, in key order): its identity.

    Used wherever embeddings are cached or resumed (exported ONNX graphs, bulk shards, the demo's indexes)
    so that different weights never reuse another model's results.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, name: str) -> str:
    """Compare a file's SHA-256 with a pinned digest; return the digest.

    Raises:
        CheckpointError: the digests differ.
    """
    digest = sha256_file(path)
    if digest != expected.lower():
        raise CheckpointError(
            f"{name}: SHA-256 of {path} is {digest}, the registry pins {expected}. The download is corrupt "
            "or the upstream file changed; delete the cached file and retry, or pin the new revision."
        )
    return digest


# ---------------------------------------------------------------------- ModelConfig -> config.json
def config_to_json(config: ModelConfig, embedding_dim: int) -> dict[str, Any]:
    """The timm-compatible ``config.json`` content for ``config``.

    Args:
        config: the model configuration.
        embedding_dim: length of the default (``config.pooling``) embedding.
    """
    pretrained_cfg = config.timm_pretrained_cfg()
    extra = dict(config.extra)
    visreg: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "library": "visreg_hub",
        "name": config.name,
        "pooling": config.pooling,
        "embedding_dim": embedding_dim,
        "drop_path_rate": config.drop_path_rate,
    }
    for key in PROMOTED_EXTRA_KEYS:
        if key in extra:
            visreg[key] = extra.pop(key)
    visreg["extra"] = extra
    return {
        "architecture": config.architecture,
        "num_classes": 0,
        "num_features": config.embed_dim,
        "global_pool": "token",
        "model_args": config.timm_kwargs(),
        "pretrained_cfg": pretrained_cfg,
        "visreg": visreg,
    }


def write_config(folder: str | Path, config: ModelConfig, embedding_dim: int) -> Path:
    """Write ``config.json`` into ``folder`` and return its path."""
    path = Path(folder) / CONFIG_NAME
    data = config_to_json(config, embedding_dim)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------------- config.json -> ModelConfig
def _architecture_defaults(architecture: str, model_args: dict[str, Any]) -> dict[str, Any]:
    """Fields a plain timm config.json leaves implicit, read from the architecture built on ``meta``."""
    import timm

    try:
        with torch.device("meta"):
            reference = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    except Exception as exc:  # timm asserts/raises anything on odd arguments from a file
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"config.json names architecture {architecture!r} with model_args timm cannot build "
            f"({type(exc).__name__}: {message}); fix model_args"
        ) from None
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


def config_from_json(data: dict[str, Any], source: str = CONFIG_NAME) -> ModelConfig:
    """Rebuild the :class:`ModelConfig` from a timm-compatible ``config.json`` (visreg block optional).

    Raises:
        CheckpointError: the file is not a ViT config this library can rebuild.
    """
    if not isinstance(data, dict) or "architecture" not in data:
        raise CheckpointError(f"{source} has no 'architecture'; it is not a timm/visreg_hub config.json")
    for key in ("visreg", "model_args", "pretrained_cfg"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise CheckpointError(f"{source}: {key!r} must be a JSON object, got {type(data[key]).__name__}")
    try:  # only timm ViT names reach timm (no hf-hub:/local-dir: indirection from a config file)
        limits.check_architecture(data["architecture"])
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    visreg = data.get("visreg") or {}
    version = visreg.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{source}: visreg.format_version must be an integer, got {version!r}")
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
        if len(fields["img_size"]) != 2 or fields["img_size"][0] != fields["img_size"][1]:
            raise CheckpointError(f"{source}: img_size {fields['img_size']} is not a square size [h, h]")
        height, width = fields["img_size"]
        if height != width:
            raise CheckpointError(f"{source}: non-square img_size {fields['img_size']} is not supported")
        fields["img_size"] = height
    if isinstance(fields.get("patch_size"), list | tuple):
        patch = fields["patch_size"]
        if len(patch) != 2 or patch[0] != patch[1]:
            # timm and transformers would build a non-square patch embedding from this file
            raise CheckpointError(f"{source}: patch_size {patch} is not a square size [p, p]")
        fields["patch_size"] = patch[0]
    try:  # types and bounds before timm sees any of it (the meta build below still makes modules)
        limits.check_field_bounds(fields)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if any(key not in fields for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")):
        known = {k: v for k, v in model_args.items() if k not in _IGNORED_MODEL_ARGS}
        defaults = _architecture_defaults(data["architecture"], known)
        fields = {**defaults, **fields}
    pretrained_cfg = data.get("pretrained_cfg") or {}
    for key in ("mean", "std", "crop_pct", "interpolation", "crop_mode"):
        if key in pretrained_cfg:
            fields[key] = pretrained_cfg[key]
    if fields.get("crop_mode", "center") is None:  # timm's default, as its transforms read a null
        fields["crop_mode"] = "center"
    for key in ("pooling", "name", "drop_path_rate"):
        if visreg.get(key) is not None:
            fields[key] = visreg[key]
    if not isinstance(visreg.get("extra") or {}, dict):
        raise CheckpointError(f"{source}: visreg.extra must be a JSON object")
    extra = dict(visreg.get("extra") or {})
    extra.update({key: visreg[key] for key in PROMOTED_EXTRA_KEYS if key in visreg})
    _check_promoted(extra, source)
    if "license" not in extra and pretrained_cfg.get("license"):
        extra["license"] = pretrained_cfg["license"]
    fields["extra"] = extra
    try:
        config = ModelConfig(**fields)
    except (ConfigError, TypeError, ValueError) as exc:  # e.g. mean: "abc" -> float() ValueError
        raise CheckpointError(f"{source} describes an invalid model: {exc}") from None
    _check_derived_fields(data, config, source)
    return config


# pretrained_cfg keys that tell timm where to fetch weights; timm's own save drops them, so a folder that has
# them was edited, and timm's loaders could follow them instead of reading the folder's weights
_DOWNLOAD_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "source")


def _check_derived_fields(data: dict[str, Any], config: ModelConfig, source: str) -> None:
    """Refuse the fields visreg_hub writes for timm and transformers when they disagree with the model.

    why: visreg_hub rebuilds the model from ``model_args`` alone, but timm's ``local-dir:`` loader and
    transformers read ``pretrained_cfg.input_size`` and the head fields, so a folder whose copies disagree
    is a different model (or preprocessing) in each library: an index built with one would be searched
    with another model without any error.
    """
    from visreg_hub.models.config import POOLING_BLOCKS

    pretrained_cfg = data.get("pretrained_cfg") or {}
    visreg = data.get("visreg") or {}
    model_args = data.get("model_args") or {}
    expected = {
        "pretrained_cfg.input_size": (pretrained_cfg, "input_size", [config.in_chans, config.img_size,
                                                                     config.img_size]),
        "num_features": (data, "num_features", config.embed_dim),
        "num_classes": (data, "num_classes", 0),
        "pretrained_cfg.num_classes": (pretrained_cfg, "num_classes", 0),
        # CLS after the final norm: another pool ("avg" builds fc_norm, "map" an attention head) is a model
        # whose head timm refuses to load and transformers fills with random weights
        "global_pool": (data, "global_pool", "token"),
        "model_args.global_pool": (model_args, "global_pool", "token"),
        "model_args.num_classes": (model_args, "num_classes", 0),
        "visreg.embedding_dim": (visreg, "embedding_dim",
                                 config.embed_dim * POOLING_BLOCKS.get(config.pooling, 1)),
    }  # fmt: skip
    for label, (block, key, want) in expected.items():
        if key in block and block[key] != want:
            raise CheckpointError(
                f"{source}: {label} is {block[key]!r} but the model it describes has {want!r} (from "
                "model_args, pooling and the visreg block); timm and transformers would read another model "
                "from this folder: fix or remove the field"
            )
    input_size = expected["pretrained_cfg.input_size"][2]
    assumed = _timm_fallback_input_size()
    if "input_size" not in pretrained_cfg and assumed[1:] != input_size[1:]:
        raise CheckpointError(
            f"{source}: pretrained_cfg.input_size is missing, so timm and transformers would preprocess at "
            f"their default {assumed} while the model takes {input_size}: add "
            f'"input_size": {input_size} to pretrained_cfg'
        )
    sources = [key for key in _DOWNLOAD_KEYS if pretrained_cfg.get(key) not in (None, "")]
    if sources:
        raise CheckpointError(
            f"{source}: pretrained_cfg names a weights location ({', '.join(sources)}); a model folder "
            "carries its own model.safetensors, and timm could fetch the named one instead: remove the key(s)"
        )


def _timm_fallback_input_size() -> list[int]:
    """``[C, H, W]`` that timm and transformers' TimmWrapper assume when a folder's pretrained_cfg has no
    input_size: timm's ``PretrainedCfg`` default (224 px), whatever the architecture's own default (a
    ``*_384`` name too: the folder's pretrained_cfg replaces the architecture's)."""
    from timm.models import PretrainedCfg

    return list(PretrainedCfg().input_size)


_PROMOTED_TYPES = {
    "license": (str, "a string such as 'apache-2.0'"),
    "recipe": (dict, "an object"),
    "loss": (dict, "an object"),
    "datasets": (list, "a list of dataset names"),
    "eval_results": (list, "a list of objects (task, dataset, metric, value)"),
    "eval_command": (str, "a string"),
    "source": (str, "a string"),
}


def _check_promoted(extra: dict[str, Any], source: str) -> None:
    """The conventional ``visreg`` keys have the types the model card and ``save_pretrained`` use.

    why: a loaded model is saved again (fine-tuning, re-publishing); a list-valued license or a string of
    datasets loaded fine and then broke the next save, or was split into characters.
    """
    for key, (kind, what) in _PROMOTED_TYPES.items():
        value = extra.get(key)
        if value is None:
            continue
        if not isinstance(value, kind):
            raise CheckpointError(f"{source}: visreg.{key} must be {what}, got {type(value).__name__}")
    if any(not isinstance(name, str) for name in extra.get("datasets") or []):
        raise CheckpointError(f"{source}: visreg.datasets must be a list of strings")
    if any(not isinstance(result, dict) for result in extra.get("eval_results") or []):
        raise CheckpointError(f"{source}: visreg.eval_results must be a list of objects")


def read_config(path: str | Path) -> ModelConfig:
    """Read and parse a ``config.json`` file (or the one inside a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    data = read_json_file(path, error=CheckpointError, max_bytes=MAX_CONFIG_BYTES)
    return config_from_json(data, source=str(path))


# ---------------------------------------------------------------------- weights
def backbone_state_dict(model) -> dict[str, torch.Tensor]:
    """The backbone weights as contiguous CPU tensors with timm key names (what model.safetensors holds)."""
    return {key: value.detach().to("cpu").contiguous() for key, value in model.backbone.state_dict().items()}


def write_weights(folder: str | Path, model) -> Path:
    """Write ``model.safetensors`` (the backbone of a VISRegEncoder) into ``folder``; return its path."""
    from safetensors.torch import save_file

    path = Path(folder) / WEIGHTS_NAME
    save_file(backbone_state_dict(model), str(path), metadata={"format": "pt"})
    # safetensors creates the file 0600 whatever the umask, so config.json was readable by others and the
    # weights were not (a model folder written by one account and served by another failed to load)
    path.chmod(0o666 & ~current_umask())
    return path


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file onto the CPU, refusing anything else (pickles renamed included).

    Raises:
        CheckpointError: the file is not valid safetensors; the message says if it looks like a pickle.
    """
    path = Path(path)
    try:
        return load_safetensors(path)
    except Exception as exc:  # safetensors raises SafetensorError / OSError subclasses on malformed files
        hint = (
            " It looks like a pickled PyTorch file (.pt/.pth/.bin) renamed to .safetensors; visreg_hub never "
            "unpickles weights. Convert it with `visreg-hub convert` (weights-only loader) instead."
            if looks_like_pickle(path)
            else " The file is corrupt or truncated; delete it (or the cache entry) and download it again."
        )
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc}).{hint}") from exc


def load_backbone_weights(
    model,
    state_dict: dict[str, torch.Tensor],
    source: str = "checkpoint",
    hint: str = "Make sure config.json and model.safetensors come from the same save_pretrained call.",
) -> None:
    """Load timm-keyed weights into ``model.backbone`` strictly.

    Args:
        hint: the fix the error names (a converter's differs from a checkpoint folder's).

    Raises:
        CheckpointError: names the first missing keys, unexpected keys and shape mismatches (never a
            warning).
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
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                           ("shape mismatches", mismatched)):  # fmt: skip
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                problems.append(f"{len(keys)} {what} {keys[:5]}{more}")
        raise CheckpointError(
            f"weights in {source} do not match the model described by its config: {'; '.join(problems)}. "
            f"{hint}"
        )
    model.backbone.load_state_dict(state_dict, strict=True)
