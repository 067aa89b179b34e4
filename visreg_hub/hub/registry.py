"""Named checkpoints (data, not code): where each one lives, its format, license and status.

Statuses:
    ``published``: weights are downloadable; ``format`` says how they are stored.
    ``bundled``: weights ship with this project (a folder under the package or ``demo/assets``).
    ``not yet published``: the name is reserved; loading it raises ``ModelNotPublishedError`` with the
        command that trains one.

Formats:
    ``official-pth``: the official VISReg release (pickled PyTorch state dict). It is downloaded through
        the Hugging Face cache and converted on load by :mod:`visreg_hub.hub.convert` with
        ``torch.load(weights_only=True)`` (no code execution).
    ``visreg_hub``: a folder written by ``save_pretrained`` (config.json + model.safetensors + README.md).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

from visreg_hub.errors import UserInputError
from visreg_hub.models.config import IMAGENET_MEAN, IMAGENET_STD
from visreg_hub.suggest import did_you_mean

STATUSES = ("published", "bundled", "not yet published")
FORMATS = ("official-pth", "visreg_hub")

# The model `visreg-hub serve` and `visreg-hub embed` use when none is named: bundled (so they work
# offline) and trained on colour photos, like the demo's default set (a Fashion-MNIST model would answer a
# photo with clothing-space vectors).
DEFAULT_MODEL = "vit-tiny-p8-colour"
OFFICIAL_REPO = "BooBooWu/visreg"
OFFICIAL_LICENSE = "cc-by-nc-4.0"  # per the official repository's README
OFFICIAL_SOURCE = "Official VISReg release (github.com/HaiyuWu/visreg), Hugging Face Hub BooBooWu/visreg"
# Evaluation preprocessing of the official release: resize 256 bicubic, centre crop 224, ImageNet stats.
OFFICIAL_DATA = {
    "crop_pct": 0.875,
    "interpolation": "bicubic",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
}
# The bundled Fashion-MNIST models: one grey channel, normalised with the training set's statistics.
_FMNIST_DATA = {"in_chans": 1, "mean": (0.286,), "std": (0.353,)}


@dataclass(frozen=True)
class RegistryEntry:
    """One named checkpoint.

    Attributes:
        name: registry name passed to ``from_pretrained``.
        size: named size of ``ModelConfig.from_name`` (architecture) the weights fit.
        status: one of ``STATUSES``.
        format: one of ``FORMATS`` (how the weights are stored at the source).
        source: human-readable origin of the weights.
        license: SPDX-style license id carried into the model card.
        description: one line for listings.
        repo_id: Hugging Face Hub repository, for downloadable entries.
        filename: file inside ``repo_id`` (official-pth entries).
        revision: commit hash or tag that pins the download; None follows ``main``.
        sha256: expected SHA-256 of the downloaded weights file, checked when set.
        local_path: bundled folder, relative to the repository root or the installed package.
        dataset: training data, for the card's ``datasets`` metadata.
        config_overrides: ModelConfig fields that differ from the named size's defaults.
        train_command: how to train such a model (used in the not-yet-published message).
    """

    name: str
    size: str
    status: str
    format: str
    source: str
    license: str
    description: str = ""
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    sha256: str | None = None
    local_path: str | None = None
    dataset: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    train_command: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise UserInputError(f"registry entry {self.name!r}: status {self.status!r} not in {STATUSES}")
        if self.format not in FORMATS:
            raise UserInputError(f"registry entry {self.name!r}: format {self.format!r} not in {FORMATS}")


_ENTRIES: tuple[RegistryEntry, ...] = (
    RegistryEntry(
        name="vit-b16-in1k",
        size="vit-b16",
        status="published",
        format="official-pth",
        source=OFFICIAL_SOURCE,
        license=OFFICIAL_LICENSE,
        description="VISReg ViT-B/16 pre-trained on ImageNet-1K (official weights, converted on load)",
        repo_id=OFFICIAL_REPO,
        filename="visreg-vit-b-inet1k.pth",
        # revision / sha256 are left unpinned: they could not be verified from this machine (no network).
        # The loader logs the SHA-256 of the downloaded file; paste it here (and the commit hash) to pin.
        revision=None,
        sha256=None,
        dataset="imagenet-1k",
        config_overrides=dict(OFFICIAL_DATA),
    ),
    RegistryEntry(
        name="vit-l14-in1k",
        size="vit-l14",
        status="published",
        format="official-pth",
        source=OFFICIAL_SOURCE,
        license=OFFICIAL_LICENSE,
        description="VISReg ViT-L/14 pre-trained on ImageNet-1K (official weights, converted on load)",
        repo_id=OFFICIAL_REPO,
        filename="visreg-vit-l-inet1k.pth",
        revision=None,
        sha256=None,
        dataset="imagenet-1k",
        config_overrides=dict(OFFICIAL_DATA),
    ),
    RegistryEntry(
        name="vit-l14-in22k",
        size="vit-l14",
        status="not yet published",
        format="visreg_hub",
        source="Paper result (VISReg-IN22K ViT-L/14); no public checkpoint",
        license=OFFICIAL_LICENSE,
        description="VISReg ViT-L/14 pre-trained on ImageNet-22K (not yet published)",
        dataset="imagenet-22k",
        train_command="accelerate launch training/pretrain.py --config training/configs/vit-l14-in22k.yaml",
    ),
    # ---------------------------------------------------------------- bundled models
    # The project's own small models, shipped inside the package as save_pretrained folders.
    # Re-create with the commands in scripts/bundle_model.py's docstring; update sha256 with the weights.
    RegistryEntry(
        name="vit-tiny-p8-colour",
        size="vit-s8-64",
        status="bundled",
        format="visreg_hub",
        source="trained by visreg_hub: training/pretrain.py --config training/configs/colour-small-cpu.yaml",
        license="apache-2.0",
        description=(
            "Small colour VISReg ViT (width 128, 6 blocks, 8 px patches, 64 px RGB) trained on the offline "
            "apt/PyPI photo, clipart and texture sources (training/sources.py); the demo's default"
        ),
        local_path="assets/vit-tiny-p8-colour",
        sha256="be18347d104b7e78c505716f75722295f55cec80f4cd6bc239e6a76121199238",
        dataset="visreg-hub-offline-colour-sources",
        config_overrides=dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
    ),
    RegistryEntry(
        name="vit-tiny-p4-fmnist",
        size="vit-t4-28",
        status="bundled",
        format="visreg_hub",
        source="trained by visreg_hub: training/pretrain.py --config training/configs/fmnist-p4-cpu.yaml, "
        "continued with train.epochs=16, 26 and 36 --resume auto",
        license="apache-2.0",
        description="VISReg ViT (width 128, 6 blocks, 4 px patches), Fashion-MNIST; the demo's 2nd set",
        local_path="assets/vit-tiny-p4-fmnist",
        sha256="8533934d1aab08175360cb830c97ce5febc6c3b83c3b3ecb2b3fdfd543b98a13",
        dataset="fashion-mnist",
        config_overrides=dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, **_FMNIST_DATA),
    ),
    RegistryEntry(
        name="vit-mini-p7-fmnist",
        size="vit-t4-28",
        status="bundled",
        format="visreg_hub",
        source="trained by visreg_hub: training/pretrain.py --config training/configs/fmnist-bundle-cpu.yaml",
        license="apache-2.0",
        description="Small VISReg ViT (width 64, 4 blocks, 7 px patches), Fashion-MNIST; small and fast",
        local_path="assets/vit-mini-p7-fmnist",
        sha256="f73e7ff3e05fcd09755225c0eed0e33eb6788003bd646dbc29f9395246f7105d",
        dataset="fashion-mnist",
        config_overrides=dict(
            patch_size=7, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, **_FMNIST_DATA
        ),
    ),
)


def _normalise(name: str) -> str:
    return name.strip().lower()


def _index() -> dict[str, RegistryEntry]:
    return {entry.name: entry for entry in _ENTRIES}


def list_models(pattern: str | None = None) -> list[RegistryEntry]:
    """Registry entries, optionally filtered.

    Args:
        pattern: shell-style glob (``"vit-l14*"``) matched against the name; without wildcard characters
            it is a case-insensitive substring (``"in1k"``). None lists everything.

    Returns:
        Matching entries in registry order.
    """
    entries = list(_ENTRIES)
    if pattern is None:
        return entries
    pattern = _normalise(pattern)
    if any(char in pattern for char in "*?["):
        return [e for e in entries if fnmatch.fnmatchcase(e.name, pattern)]
    return [e for e in entries if pattern in e.name]


def find_entry(name: str) -> RegistryEntry | None:
    """The entry called ``name`` (case-insensitive; a leading ``visreg-`` is optional), or None."""
    index = _index()
    key = _normalise(name)
    for candidate in (key, key.removeprefix("visreg-"), f"visreg-{key}"):
        if candidate in index:
            return index[candidate]
    return None


def suggest_names(name: str) -> str:
    """A sentence with registry names close to ``name``, plus where to see them all."""
    names = [entry.name for entry in _ENTRIES]
    key = _normalise(name)
    # "visreg-vit-b16-in1k" and "vit-b16-in1k" both point at the same entry
    hint = did_you_mean(key, names) or did_you_mean(key.removeprefix("visreg-"), names)
    return f"{hint} Registry names: {', '.join(names)} (visreg_hub.list_models())."


def model_reference(spec: str | os.PathLike) -> str:
    """What a job or an index records for the model ``spec`` names: a local folder as its absolute path
    (``~`` expanded), so the record works from any folder; a registry name or Hub repo as given."""
    name = os.fspath(spec)
    folder = os.path.expanduser(name)
    return os.path.abspath(folder) if os.path.isdir(folder) else name
