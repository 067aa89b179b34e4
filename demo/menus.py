"""The demo's menus: the bundled (model, gallery, examples) sets and the model and gallery choices.

A choice is what one menu entry means: ``key`` is what the UI sends back, ``source`` the model spec or
gallery folder behind it. The operator's ``--model`` / ``--gallery`` values come first, then the bundled
sets; one that names a bundled model or gallery (by registry name or folder) is that bundled choice, so
nothing is loaded or listed twice. A model or ``--gallery`` folder is shown and keyed by its name (a
folder's own name), never by the server path behind it, and that name is also its id (a model) or index
name (a gallery) in the HTTP API; two of one name are ``name`` and ``name-2``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import visreg_hub
from visreg_hub.errors import ModelNotFoundError, UserInputError
from visreg_hub.hub import registry
from visreg_hub.inference import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
# Bundled models ship inside the library (visreg_hub/assets/<registry name>), so they also work after a
# pip install; their galleries and example queries are in demo/assets.
MODEL_ASSETS = Path(visreg_hub.__file__).resolve().parent / "assets"
BUNDLED = "bundled"


class BundledAssetMissingError(ModelNotFoundError):
    """The bundled model or gallery folder is missing from this checkout."""


@dataclass(frozen=True)
class BundledSet:
    """A bundled model with its gallery and example queries; ``key`` is their key in both menus."""

    key: str
    model_name: str
    gallery: Path
    gallery_label: str
    examples: Path

    @property
    def model_folder(self) -> Path:
        return MODEL_ASSETS / self.model_name


# Data, not code: menu order, the first set is the demo's default (no --model / --gallery given).
BUNDLED_SETS = (
    BundledSet("bundled-photos", "vit-tiny-p8-colour", ASSETS / "photo-gallery",
               "photos, clipart, satellite tiles (demo/assets/photo-gallery)", ASSETS / "photo-examples"),
    BundledSet(BUNDLED, "vit-tiny-p4-fmnist", ASSETS / "gallery",
               "Fashion-MNIST test images (demo/assets/gallery)", ASSETS / "examples"),
)  # fmt: skip
BUNDLED_GALLERY = ASSETS / "gallery"  # the Fashion-MNIST gallery (kept for callers of the single-set demo)
EXAMPLES = ASSETS / "examples"


@dataclass(frozen=True)
class Choice:
    """One entry of the model or gallery menu.

    Attributes:
        key: what the UI sends back (and the menu's Gradio API takes).
        label: what the menu shows.
        source: the model spec (folder or registry name) or gallery folder behind the entry.
        name: a model's id in the HTTP API (``/v1/models``), unique among the models; "" for a gallery.
    """

    key: str
    label: str
    source: str
    name: str = ""


def bundled_model_choice(bundled: BundledSet, name: str | None = None) -> Choice:
    return Choice(bundled.key, f"bundled ({bundled.model_name})", str(bundled.model_folder),
                  name or bundled.model_name)  # fmt: skip


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, else ``name-2``, ``name-3``, ...: the first not in ``taken``."""
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def _model_identity(spec: str) -> tuple[str, str]:
    """(what the spec loads, its public name): a folder by its resolved path and its own name, anything
    else (a registry name, ``org/repo``) by its text."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        resolved = folder.resolve()
        return str(resolved), resolved.name
    return spec, spec


def bundled_gallery_choice(bundled: BundledSet) -> Choice:
    return Choice(bundled.key, f"bundled: {bundled.gallery_label}", str(bundled.gallery))


def names_bundled_model(spec: str, bundled: BundledSet) -> bool:
    """``spec`` (a ``--model`` value) is ``bundled``'s model: its folder, or its registry name when no
    folder of that name exists (from_pretrained's order)."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return folder.resolve() == bundled.model_folder.resolve()
    entry = registry.find_entry(spec)
    return entry is not None and entry.name == bundled.model_name


def model_choices(models: Sequence[str]) -> list[Choice]:
    """The operator's ``--model`` specs in order, then the bundled models; a spec naming a bundled model
    (its registry name or its folder) is that bundled choice, so it is loaded and listed once, with its
    gallery.

    Raises:
        BundledAssetMissingError: no model was named and no bundled model is present.
    """
    bundled = [b for b in BUNDLED_SETS if (b.model_folder / "config.json").is_file()]
    choices: list[Choice] = []
    loaded: set[str] = set()  # what each listed spec loads: "x" and "./x/" are one model
    for spec in dict.fromkeys(str(m) for m in models):
        same = next((b for b in bundled if names_bundled_model(spec, b)), None)
        if same is not None:
            choice = bundled_model_choice(same, unique_name(same.model_name, {c.name for c in choices}))
            target = choice.key
        else:
            target, public = _model_identity(spec)
            # keys and API ids are one name, unique among the models and apart from the bundled keys
            taken = {c.name for c in choices} | {c.key for c in choices} | {b.key for b in bundled}
            name = unique_name(public, taken)
            choice = Choice(name, name, spec, name)
        if target not in loaded:
            loaded.add(target)
            choices.append(choice)
    listed = {choice.key for choice in choices}
    for b in bundled:
        if b.key not in listed:
            choices.append(bundled_model_choice(b, unique_name(b.model_name, {c.name for c in choices})))
    missing = [str(b.model_folder) for b in BUNDLED_SETS if b not in bundled]
    if not choices:
        raise BundledAssetMissingError(
            f"the bundled model is missing: {', '.join(missing)} has no config.json. Pass --model with a "
            "model folder or name, or re-create it with the commands in scripts/bundle_model.py"
        )
    if missing:
        logger.warning("bundled model(s) %s missing; offering the others", missing)
    return choices


def gallery_choices(galleries: Sequence[str | Path], first: str | None = None) -> list[Choice]:
    """The operator's ``--gallery`` folders, then the bundled galleries; without ``--gallery`` the default
    model's own gallery (``first``: its key, when it is a bundled model) comes first.

    Raises:
        NotADirectoryError: a ``--gallery`` value is not a folder.
        BundledAssetMissingError: no gallery was named and no bundled gallery is present.
    """
    bundled_at = {b.gallery.resolve(): b for b in BUNDLED_SETS if b.gallery.is_dir()}
    choices: list[Choice] = []
    for folder in dict.fromkeys(Path(g).expanduser().resolve() for g in galleries):
        if not folder.is_dir():
            raise NotADirectoryError(f"gallery {folder} is not a folder; pass --gallery DIR of images")
        same = bundled_at.get(folder)  # a bundled gallery named with --gallery: its one choice
        if same is None:  # its own name, apart from the bundled keys and the galleries before it
            name = unique_name(
                folder.name or "gallery", {c.key for c in choices} | {b.key for b in BUNDLED_SETS}
            )
            choices.append(Choice(name, name, str(folder)))
        else:
            choices.append(bundled_gallery_choice(same))
    ordered = sorted(BUNDLED_SETS, key=lambda b: b.key != first)  # stable: the rest keep their order
    listed = {choice.key for choice in choices}
    choices += [bundled_gallery_choice(b) for b in ordered if b.gallery.is_dir() and b.key not in listed]
    if not choices:
        raise BundledAssetMissingError(
            f"the bundled galleries {[str(b.gallery) for b in BUNDLED_SETS]} are missing; run "
            "`python -m demo.make_photo_gallery` / `python -m demo.make_gallery` or pass --gallery DIR"
        )
    return choices


def example_files() -> list[Path]:
    """The bundled example queries (none is in a bundled gallery), the default set's first."""
    return [
        path
        for bundled in BUNDLED_SETS
        for path in sorted(bundled.examples.glob("*"))
        if path.suffix.lower() in IMAGE_EXTENSIONS
    ]


def example_set(path: Path) -> BundledSet | None:
    """The bundled set whose example queries hold ``path`` (None for any other file)."""
    for bundled in BUNDLED_SETS:
        if path.parent.resolve() == bundled.examples.resolve():
            return bundled
    return None


def find_choice(choices: Sequence[Choice], key: str, what: str) -> Choice:
    """The choice with ``key``; a :class:`UserInputError` listing the known keys otherwise."""
    for choice in choices:
        if choice.key == key:
            return choice
    known = ", ".join(repr(c.key) for c in choices)
    raise UserInputError(f"unknown {what} {key!r}; choose one of {known}")
