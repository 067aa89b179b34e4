"""from_pretrained = resolve(name) -> :class:`Source`, then load(source) -> VISRegEncoder (as timm does).

:func:`resolve` turns what the user typed (local folder, registry name, ``hf-hub:org/repo``, ``org/repo``)
into a :class:`Source` without touching the network; :func:`load` fetches and builds it. Downloads go
through huggingface_hub's cache (``hf_hub_download``), so ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` behave as everywhere else in the ecosystem. Weights
are read from safetensors only (no pickle on any load path) and loaded strictly: missing, unexpected
or mis-shaped keys are a :class:`CheckpointError` listing them. The file format itself lives in
:mod:`visreg_hub.hub.format`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from visreg_hub.devices import resolve_device
from visreg_hub.errors import CheckpointError, ModelNotFoundError, ModelNotPublishedError, UserInputError
from visreg_hub.folders import outside_target
from visreg_hub.hub import format as ckpt
from visreg_hub.hub import preflight, registry
from visreg_hub.hub.saving import interrupted_save
from visreg_hub.models.limits import ModelLimits, check_budget

logger = logging.getLogger(__name__)

SourceKind = Literal["folder", "hub", "official-pth"]


@dataclass(frozen=True)
class Source:
    """Where a checkpoint lives, resolved from a user-facing name (no I/O beyond local stat calls).

    Attributes:
        kind: ``folder`` (config.json + model.safetensors on disk), ``hub`` (the same files in a Hub
            repository) or ``official-pth`` (the official pickled release, converted on load).
        location: folder path or Hub repository id.
        name: registry name, or None.
        revision: Hub branch, tag or commit to download.
        filename: file inside the repository (``official-pth`` only).
        sha256: expected SHA-256 of the weights file, checked on load when set.
        config_overrides: ModelConfig fields for ``official-pth`` (the release has no config.json).
        size: named size the ``official-pth`` weights fit.
    """

    kind: SourceKind
    location: str
    name: str | None = None
    revision: str | None = None
    filename: str | None = None
    sha256: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    size: str | None = None


# ---------------------------------------------------------------------- resolve
def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or "\\" in name
        or name in {".", ".."}
    )


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


def _registry_source(entry: registry.RegistryEntry, revision: str | None) -> Source:
    if entry.status == "not yet published":
        how = f" To train one yourself: {entry.train_command}" if entry.train_command else ""
        raise ModelNotPublishedError(
            f"{entry.name!r} is listed in the registry but its weights are not yet published "
            f"({entry.source}).{how}"
        )
    if entry.status == "bundled":
        return Source("folder", str(_bundled_folder(entry)), name=entry.name, sha256=entry.sha256)
    revision = revision or entry.revision
    if entry.format == "visreg_hub":
        return Source("hub", entry.repo_id, name=entry.name, revision=revision, sha256=entry.sha256)
    extra = {"license": entry.license, "source": entry.source}
    if entry.dataset:
        extra["datasets"] = [entry.dataset]
    return Source(
        "official-pth",
        entry.repo_id,
        name=entry.name,
        revision=revision,
        filename=entry.filename,
        sha256=entry.sha256,
        config_overrides={**entry.config_overrides, "name": entry.name, "extra": extra},
        size=entry.size,
    )


def _local_kind(name_or_path: object) -> str | None:
    """``"folder"`` or ``"file"`` when a string or Path names one on this machine, else None.

    A name the OS cannot even look up (too long, a NUL byte) is no local path: it falls through to the
    registry and Hub checks, which explain what is accepted.
    """
    if not isinstance(name_or_path, str | Path):
        return None
    try:
        path = Path(name_or_path).expanduser()
        return "folder" if path.is_dir() else "file" if path.is_file() else None
    except (OSError, ValueError):
        return None


def resolve(name_or_path: str | Path, *, revision: str | None = None) -> Source:
    """Turn a folder, registry name, ``hf-hub:org/repo`` or ``org/repo`` into a :class:`Source`.

    Resolution order: an existing local folder; ``hf-hub:org/repo``; a registry name
    (:func:`visreg_hub.list_models`); ``org/repo`` on the Hugging Face Hub. Hub names may pin a revision
    as timm does, ``hf-hub:org/repo@REVISION`` (the same as ``revision=REVISION``); timm's
    ``local-dir:FOLDER`` is the folder.

    Raises:
        ModelNotFoundError: nothing matches (close registry names are suggested), or a file was given.
        ModelNotPublishedError: a registry entry without public weights.
    """
    if isinstance(name_or_path, registry.RegistryEntry):  # an item of list_models()
        name_or_path = name_or_path.name
    if isinstance(name_or_path, str) and name_or_path.startswith("local-dir:"):  # as timm.create_model takes
        name_or_path = name_or_path[len("local-dir:") :]
        if name_or_path.strip():
            name_or_path = Path(name_or_path)
    if isinstance(name_or_path, str) and not name_or_path.strip():  # Path("") would be the current folder
        raise ModelNotFoundError(f"from_pretrained needs a name, repo id or folder, got {name_or_path!r}")
    kind = _local_kind(name_or_path)
    if kind == "file":  # a str, a Path or local-dir: alike
        raise ModelNotFoundError(
            f"{str(name_or_path)!r} is a file; pass the folder that holds config.json and model.safetensors "
            "(for an official .pth, run `visreg-hub convert` first; an exported .onnx graph is run with "
            "visreg_hub.inference.onnx.OnnxEmbedder(path))"
        )
    if isinstance(name_or_path, Path) or kind == "folder":  # a Path that does not exist: load says so
        return Source("folder", str(Path(name_or_path).expanduser()))
    if not isinstance(name_or_path, str):
        raise ModelNotFoundError(f"from_pretrained needs a name, repo id or folder, got {name_or_path!r}")
    name = name_or_path.strip()
    url = re.match(r"^https?://(?:www\.)?huggingface\.co/([^/?#]+/[^/?#]+)", name)
    if url:
        raise ModelNotFoundError(f"{name!r} is a web address; pass {url.group(1)!r}, the repository id")
    if name.startswith("hf-hub:"):
        repo_id, revision = _split_revision(name[len("hf-hub:") :], revision)
        return Source("hub", repo_id, revision=revision)
    entry = registry.find_entry(name)
    if entry is not None:
        return _registry_source(entry, revision)
    if _looks_like_path(name) or name.count("/") != 1:
        where = "no such folder" if _looks_like_path(name) else "not a registry name or 'org/repo'"
        raise ModelNotFoundError(f"cannot load {name!r}: {where}.{registry.suggest_names(name)}")
    repo_id, revision = _split_revision(name, revision)
    return Source("hub", repo_id, revision=revision)


def _split_revision(repo: str, revision: str | None) -> tuple[str, str | None]:
    """``org/repo@rev`` -> (``org/repo``, ``rev``), timm's ``hf-hub:`` spelling of a pinned revision.

    Raises:
        ModelNotFoundError: an empty ``@`` suffix, or one that disagrees with ``revision=``.
    """
    repo_id, at, pinned = repo.partition("@")
    if not at:
        return repo, revision
    if not pinned:
        raise ModelNotFoundError(f"{repo!r} ends in '@' without a revision; write org/repo@REVISION")
    if revision is not None and revision != pinned:
        raise ModelNotFoundError(
            f"{repo!r} pins revision {pinned!r} but revision={revision!r} was also given; pass one of them"
        )
    return repo_id, pinned


# ---------------------------------------------------------------------- Hub downloads
def _bundled_names() -> str:
    from visreg_hub.hub.registry import list_models

    return ", ".join(entry.name for entry in list_models() if entry.status == "bundled")


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
            f"pass a local folder, or use a bundled model, which needs no network ({_bundled_names()})."
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


# ---------------------------------------------------------------------- load
def _check_pin(path: Path, source: Source) -> None:
    label = source.name or source.location
    if source.sha256 is None:
        logger.info("%s: sha256 %s (not pinned in the registry)", label, ckpt.sha256_file(path))
    else:
        ckpt.verify_sha256(path, source.sha256, label)


def _build(config, weights_path: Path, limits: ModelLimits | None = None):
    """Check budget and declared shapes (no allocation), then read, build, load strictly, refuse NaN/Inf."""
    from visreg_hub.models.encoder import VISRegEncoder

    preflight.check_before_build(config, weights_path, limits)
    state_dict = ckpt.read_weights(weights_path)
    model = VISRegEncoder(config)
    ckpt.load_backbone_weights(model, state_dict, source=str(weights_path))
    preflight.check_finite(state_dict, str(weights_path))
    return model


def _check_inside(folder: Path, path: Path) -> None:
    """Refuse a checkpoint file that resolves outside ``folder`` (a symlink to elsewhere on the machine).

    why: a folder from someone else must not make the loader read other files; their bytes could end up
    in an error message or a log. A Hugging Face cache snapshot (``.../snapshots/<rev>/``) links its files
    to ``../../blobs/``, which is allowed when ``blobs`` is a real folder (a ``blobs`` that is itself a
    link could lead anywhere).
    """
    if not path.is_symlink():
        return
    base = folder.resolve()
    blobs = base.parent.parent / "blobs"
    cache_layout = base.parent.name == "snapshots" and blobs.is_dir() and not blobs.is_symlink()
    if outside_target(folder, path, [blobs] if cache_layout else []) is not None:
        raise CheckpointError(
            f"{path} is a symlink to a file outside the folder; copy the file into {folder} instead "
            "(visreg_hub reads only the folder it is given)"
        )


def load_folder(
    folder: str | Path,
    *,
    weights_sha256: str | None = None,
    name: str | None = None,
    limits: ModelLimits | None = None,
):
    """Build a :class:`VISRegEncoder` from a checkpoint folder (config.json + model.safetensors)."""
    folder = Path(folder)
    config_path, weights_path = folder / ckpt.CONFIG_NAME, folder / ckpt.WEIGHTS_NAME
    if not folder.exists():
        raise ModelNotFoundError(
            f"{folder} does not exist; pass a checkpoint folder, a registry name or org/repo"
        )
    for path in (config_path, weights_path):
        _check_inside(folder, path)
        if path.exists() and not path.is_file():  # a folder or FIFO of that name is no missing file
            raise CheckpointError(
                f"{path} is not a regular file (a folder, FIFO or device); a checkpoint folder holds "
                f"{ckpt.CONFIG_NAME} and {ckpt.WEIGHTS_NAME} as files: replace it with the file"
            )
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"{folder} has no {ckpt.CONFIG_NAME}; it is not a visreg_hub/timm checkpoint folder"
        )
    if not weights_path.is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in {".pth", ".pt", ".bin", ".ckpt"})
        hint = f" Found pickled weights {pickles}: convert them with `visreg-hub convert`." if pickles else ""
        raise CheckpointError(
            f"{folder} has no {ckpt.WEIGHTS_NAME} (safetensors is the only accepted format).{hint}"
        )
    staging = interrupted_save(folder)
    if staging is not None:
        raise CheckpointError(
            f"{folder} is half saved: a save stopped after renaming its {ckpt.WEIGHTS_NAME} in and before "
            f"its {ckpt.CONFIG_NAME}, so the weights do not match the config beside them. Finish that save "
            f"by moving the files of {staging} into {folder}, or save the model again"
        )
    if weights_sha256 is not None:
        ckpt.verify_sha256(weights_path, weights_sha256, name or str(folder))
    return _build(ckpt.read_config(config_path), weights_path, limits)


def load(source: Source, *, limits: ModelLimits | None = None, **download_kwargs: Any):
    """Fetch and build the model a :class:`Source` points at (not yet in eval mode or moved).

    Args:
        source: from :func:`resolve`.
        limits: the parameter / activation budget a downloaded or local config must fit (default
            :class:`~visreg_hub.models.limits.ModelLimits`).
        **download_kwargs: ``cache_dir``, ``local_files_only``, ``token`` for Hub downloads.
    """
    if source.kind == "folder":
        return load_folder(source.location, weights_sha256=source.sha256, name=source.name, limits=limits)
    if source.kind == "hub":
        revision = {"revision": source.revision}
        config = ckpt.read_config(
            hub_download(source.location, ckpt.CONFIG_NAME, **revision, **download_kwargs)
        )
        weights_path = hub_download(source.location, ckpt.WEIGHTS_NAME, **revision, **download_kwargs)
        if source.sha256 is not None:
            ckpt.verify_sha256(weights_path, source.sha256, source.name or source.location)
        return _build(config, weights_path, limits)
    # official-pth: download the pickled release, check it, convert in memory with the weights-only loader
    from visreg_hub.hub.convert import official_encoder

    pth_path = hub_download(source.location, source.filename, revision=source.revision, **download_kwargs)
    _check_pin(pth_path, source)
    return official_encoder(pth_path, source.size, **source.config_overrides)


def build_architecture(
    registry_name: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    provider: str | None = None,
    precision: str = "fp32",
    limits: ModelLimits | None = None,
    **download_options,
):
    """A registry model's architecture with random weights (nothing is downloaded), in eval mode.

    Takes :func:`from_pretrained`'s arguments, checked the same way (``limits`` too, before anything is
    built). ``backend`` None means ``"torch"`` unless ``provider`` or ``precision`` ask for ONNX Runtime:
    ``"auto"`` would export and cache an ONNX graph of throwaway weights. The download options
    (``revision``, ``cache_dir``, ``local_files_only``, ``token``) are accepted, so that torch.hub's
    ``pretrained=False`` takes the same call, and ignored with a warning.

    Raises:
        ModelNotFoundError: not a registry name (close names are suggested).
        DeviceError, UserInputError: as :func:`from_pretrained`.
    """
    from visreg_hub.models.config import ModelConfig
    from visreg_hub.models.encoder import VISRegEncoder

    unknown = sorted(set(download_options) - set(_DOWNLOAD_DEFAULTS))
    if unknown:
        raise TypeError(f"build_architecture() got unexpected keyword arguments {unknown}")
    ignored = [f"{key}={value!r}" for key, value in download_options.items()
               if value != _DOWNLOAD_DEFAULTS[key]]  # fmt: skip
    if ignored:
        logger.warning("%s ignored: pretrained=False builds random weights, nothing is downloaded",
                       ", ".join(ignored))  # fmt: skip
    if backend is None and provider is None and precision in ("fp32", "float32"):
        backend = "torch"
    backend, dtype = _checked_runtime_options(device, dtype, backend, provider, precision)
    entry = registry.find_entry(registry_name)
    if entry is None:
        raise ModelNotFoundError(
            f"no registry model {registry_name!r}.{registry.suggest_names(registry_name)}"
        )
    if entry.status == "bundled":
        config = ckpt.read_config(_bundled_folder(entry))
    else:
        config = ModelConfig.from_name(entry.size, **{"name": entry.name, **entry.config_overrides})
    check_budget(config, limits, source=f"registry model {entry.name!r}")
    return _placed(VISRegEncoder(config), device, dtype, backend, provider, precision)


_DOWNLOAD_DEFAULTS = {"revision": None, "cache_dir": None, "local_files_only": False, "token": None}


def _checked_runtime_options(device, dtype, backend, provider, precision) -> tuple[str, torch.dtype | None]:
    """``(backend, dtype)`` resolved, after checking every option that says where and how the model runs;
    a bad one is one clear error before any download or build."""
    from visreg_hub.inference.backends import default_backend, make_spec, resolve_dtype

    if backend is None:  # a provider or a precision only means something to ONNX Runtime
        backend = (
            "onnx" if provider is not None or precision not in ("fp32", "float32") else default_backend()
        )
    spec = make_spec(backend, provider, precision)
    resolve_device(device)
    if isinstance(dtype, str):  # "bf16" as encode() takes it
        dtype = resolve_dtype(dtype)
    elif dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserInputError(f"dtype must be a floating torch dtype or 'fp32', 'fp16', 'bf16', got {dtype!r}")
    if spec.backend == "onnx" and dtype not in (None, torch.float32):
        raise UserInputError(
            f"dtype={dtype} sets the PyTorch model's precision; the ONNX graph's is precision= "
            "('fp16' for GPU providers, 'int8' for CPUs), or pass backend='torch' to run in that dtype"
        )
    return backend, dtype


def _placed(model, device, dtype, backend: str, provider, precision):
    """``model`` on ``device`` in ``dtype``, in eval mode, with its ``encode()`` backend set."""
    from visreg_hub.inference.backends import set_backend

    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return set_backend(model.eval(), backend, provider, precision)


def from_pretrained(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    backend: str | None = None,
    provider: str | None = None,
    precision: str = "fp32",
    limits: ModelLimits | None = None,
):
    """Load a :class:`~visreg_hub.models.VISRegEncoder` in eval mode: ``load(resolve(name_or_path))``.

    Args:
        name_or_path: folder, registry name, ``hf-hub:org/repo`` or ``org/repo`` (see :func:`resolve`).
        revision: Hub branch, tag or commit hash to pin (overrides the registry's pin).
        cache_dir: Hugging Face cache directory (default: ``HF_HUB_CACHE`` / ``HF_HOME``).
        local_files_only: never touch the network; use the cache only (``HF_HUB_OFFLINE=1`` does the same).
        token: Hub token (default: ``HF_TOKEN`` or the stored login).
        device: where to put the model.
        dtype: floating dtype of the parameters (``torch.bfloat16`` or ``"bf16"``, as ``encode`` takes).
        backend: what ``model.encode()`` runs on: ``"auto"`` (ONNX Runtime on the CPU when
            ``visreg_hub[onnx-cpu]`` is installed, else torch; torch on GPUs), ``"torch"`` (the model itself)
            or ``"onnx"`` (the model exported once, cached on disk, run by ONNX Runtime). None:
            ``$VISREG_HUB_BACKEND`` if set, else ``"auto"``. ``model.backend`` says which is used, and the
            choice is logged (see :mod:`visreg_hub.inference.backends`).
        provider: ONNX Runtime provider for ``backend="onnx"`` (``"cpu"``, ``"cuda"``, ``"tensorrt"``;
            None: from ``device``, else the best available).
        precision: ONNX graph precision: ``"fp32"``, ``"fp16"`` (GPU providers) or ``"int8"`` (CPUs:
            dynamic int8 linear layers, about 2x fp32; see docs/inference.md). Implies ``backend="onnx"``.
        limits: budget checked before anything is built (default ``ModelLimits()``: at most 3 B
            parameters and 8 GiB of float32 activations per image); e.g.
            ``ModelLimits(max_params=None)`` to load a larger model you trust.

    Raises:
        ModelNotFoundError: nothing matches (close registry names are suggested).
        ModelNotPublishedError: a registry entry without public weights.
        CheckpointError: malformed config, non-safetensors weights, key/shape mismatch, sha256 mismatch,
            NaN/Inf weights.
        ConfigError: unknown (non-ViT) architecture, or a model over ``limits``.
        DeviceError: ``device`` is malformed or absent on this machine (e.g. ``cuda`` without a GPU).
    """
    backend, dtype = _checked_runtime_options(device, dtype, backend, provider, precision)
    source = resolve(name_or_path, revision=revision)
    ignored = [f"{key}={value!r}" for key, value in (("revision", revision), ("cache_dir", cache_dir))
               if value is not None]  # fmt: skip
    if source.kind == "folder" and ignored:  # transformers ignores them for folders too, but silently
        what = f"bundled model {source.name!r}" if source.name else f"local folder {source.location!r}"
        logger.warning("%s ignored: the %s is read from disk, nothing is downloaded", ", ".join(ignored),
                       what)  # fmt: skip
    model = load(source, limits=limits, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    return _placed(model, device, dtype, backend, provider, precision)
