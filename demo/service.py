"""What the demo does, without Gradio: model and gallery choices, upload checks, extraction, retrieval.

:class:`DemoService` is what ``demo/app.py`` wires into the UI and what tests call directly. It loads
models with :func:`visreg_hub.from_pretrained`, embeds with :func:`visreg_hub.inference.encode` (so the
demo's numbers are the library's numbers), and keeps one cached gallery index per (model, gallery)
(:mod:`demo.cache`). Every problem a user can cause raises :class:`UserInputError`, whose message is
shown in the UI as is; it never holds a traceback or a server path.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import visreg_hub
from demo.cache import CachedIndex, load_or_build, model_identity, scan_gallery
from visreg_hub.devices import default_device
from visreg_hub.errors import ImageDecodeError, ModelNotFoundError, UserInputError
from visreg_hub.hub import from_pretrained, registry
from visreg_hub.inference import (
    IMAGE_EXTENSIONS,
    Preprocessor,
    encode,
    extract_patch_features,
    patch_pca_rgb,
)
from visreg_hub.inference.images import DEFAULT_FORMATS, PIXEL_CAP_HINT, ImageSource, decode_image
from visreg_hub.inference.preprocess import DRAFT_MARGIN, draft_size
from visreg_hub.models.config import POOLINGS
from visreg_hub.native_io import utf8_path

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
# Bundled models ship inside the library (visreg_hub/assets/<registry name>), so they also work after a
# pip install; their galleries and example queries are in demo/assets.
MODEL_ASSETS = Path(visreg_hub.__file__).resolve().parent / "assets"
BUNDLED = "bundled"


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
# 2048 x 2048 decoded pixels: an RGBA upload then needs ~16 MB per copy while it is decoded. Large JPEGs
# (camera photos) are decoded at a reduced scale first (decode_image's draft_to), so they pass.
DEMO_MAX_PIXELS = 2048 * 2048
MAX_K = 50
DISPLAY_SIZE = 224
RESCAN_S = 10.0  # a gallery's files are listed again when its index was checked longer ago
DOWNLOAD_MAX_AGE_S = 3600  # .npy downloads older than this are removed (Gradio has its own copy by then)
# Pillow decoders an upload may use (by content, whatever its name): the library's, so every extension the
# file picker offers decodes; the rest (EPS, PSD, ...) are refused. JPEG covers camera MPO files too.
ALLOWED_FORMATS = DEFAULT_FORMATS
ACCEPTED_TYPES = ", ".join(IMAGE_EXTENSIONS)


class BundledAssetMissingError(ModelNotFoundError):
    """The bundled model or gallery folder is missing from this checkout."""


@dataclass(frozen=True)
class Choice:
    """One entry of the model or gallery menu: ``key`` is what the UI sends, ``source`` what it means."""

    key: str
    label: str
    source: str


@dataclass
class LoadedModel:
    """A model ready to embed, with the identity that keys its gallery indexes."""

    model: torch.nn.Module
    spec: str
    identity: dict
    seconds: float


@dataclass
class Hit:
    """One retrieval result. ``id`` is the file's position in the sorted gallery listing."""

    rank: int
    id: int
    path: Path
    relpath: str
    label: str
    score: float

    def as_dict(self) -> dict:
        # why "file", not "path": gradio_client takes any JSON dict with a "path" for a file to download
        return {"rank": self.rank, "id": self.id, "file": self.relpath, "label": self.label,
                "score": self.score}  # fmt: skip


@dataclass
class Extraction:
    """Feature extraction output: the embedding and the pictures shown next to it."""

    embedding: np.ndarray  # (E,) float32
    pooling: str
    normalized: bool
    npy_path: Path
    model_view: Image.Image  # what the model sees (resized, cropped), upscaled for display
    pca: Image.Image  # first 3 principal components of the patch tokens as RGB, upscaled
    overlay: Image.Image  # pca blended over model_view
    grid: tuple[int, int] = (0, 0)

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.embedding.astype(np.float64)))


@dataclass
class SearchOutcome:
    """Retrieval output: the hits, best first, and the decoded query for display."""

    hits: list[Hit]
    query: Image.Image
    index: CachedIndex
    extra: dict = field(default_factory=dict)


def _bundled_choice(bundled: BundledSet) -> Choice:
    return Choice(bundled.key, f"bundled ({bundled.model_name})", str(bundled.model_folder))


def _bundled_gallery(bundled: BundledSet) -> Choice:
    return Choice(bundled.key, f"bundled: {bundled.gallery_label}", str(bundled.gallery))


def _names_bundled(spec: str, bundled: BundledSet) -> bool:
    """``spec`` (a ``--model`` value) is ``bundled``'s model: its folder, or its registry name when no
    folder of that name exists (from_pretrained's order)."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return folder.resolve() == bundled.model_folder.resolve()
    entry = registry.find_entry(spec)
    return entry is not None and entry.name == bundled.model_name


class DemoService:
    """Models, galleries and the operations of the demo.

    Args:
        models: model specs the operator allows (folder, registry name or ``org/repo``); the first is the
            default. The bundled model (``demo/assets/model``) is offered too when it exists.
        galleries: gallery folders the operator allows; the first is the default. The bundled gallery
            is offered too when it exists.
        cache_dir: where gallery indexes are cached (see :mod:`demo.cache`).
        download_dir: where ``.npy`` downloads are written (the app removes it at exit).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        max_pixels: pixel cap for uploads (width * height, of the decoded image: large JPEGs are
            decoded at a reduced size first when the model needs far fewer pixels).
        batch_size: images per forward pass when embedding a gallery.
        model_loader: loads a model from its source (default: ``from_pretrained``); the combined
            server passes the serving app's models so each is in memory once.
        embedder: ``(model key, decoded RGB image) -> (E,)`` default-pooling, normalised embedding;
            the combined server passes one that goes through the serving app's batcher. Default:
            ``encode()`` in the calling thread.

    Raises:
        BundledAssetMissingError: no model (or gallery) was named and the bundled one is missing.
    """

    def __init__(
        self,
        models: Sequence[str] = (),
        galleries: Sequence[str | Path] = (),
        *,
        cache_dir: str | Path,
        download_dir: str | Path,
        device: str | None = "auto",
        max_pixels: int = DEMO_MAX_PIXELS,
        batch_size: int = 64,
        model_loader: Callable[[str], torch.nn.Module] | None = None,
        embedder: Callable[[str, Image.Image], np.ndarray] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.download_dir = Path(download_dir)
        self.device = default_device(device)
        self.max_pixels = int(max_pixels)
        self.batch_size = int(batch_size)
        self.model_loader = model_loader
        self.embedder = embedder
        self.model_choices = self._model_choices(models)
        self.gallery_choices = self._gallery_choices(galleries, first=self.model_choices[0].key)
        self._models: dict[str, LoadedModel] = {}
        self._indexes: dict[tuple[str, str], tuple[CachedIndex, float]] = {}  # pair -> (index, scanned at)
        self._pair_locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.RLock()  # models, and the two dicts above (never held while embedding)

    # ------------------------------------------------------------------ choices
    @staticmethod
    def _model_choices(models: Sequence[str]) -> list[Choice]:
        """The operator's ``--model`` specs in order, then the bundled models; a spec naming a bundled model
        (its registry name or its folder) is that bundled choice, so it is loaded and listed once, with
        its gallery."""
        bundled = [b for b in BUNDLED_SETS if (b.model_folder / "config.json").is_file()]
        choices: list[Choice] = []
        for spec in dict.fromkeys(str(m) for m in models):
            same = next((b for b in bundled if _names_bundled(spec, b)), None)
            choice = Choice(spec, spec, spec) if same is None else _bundled_choice(same)
            if choice.key not in {c.key for c in choices}:
                choices.append(choice)
        listed = {choice.key for choice in choices}
        choices += [_bundled_choice(b) for b in bundled if b.key not in listed]
        missing = [str(b.model_folder) for b in BUNDLED_SETS if b not in bundled]
        if not choices:
            raise BundledAssetMissingError(
                f"the bundled model is missing: {', '.join(missing)} has no config.json. Pass --model with a "
                "model folder or name, or re-create it with the commands in scripts/bundle_model.py"
            )
        if missing:
            logger.warning("bundled model(s) %s missing; offering the others", missing)
        return choices

    @staticmethod
    def _gallery_choices(galleries: Sequence[str | Path], first: str | None = None) -> list[Choice]:
        """The operator's ``--gallery`` folders, then the bundled galleries; without ``--gallery`` the
        default model's own gallery (``first``: its key, when it is a bundled model) comes first."""
        bundled_at = {b.gallery.resolve(): b for b in BUNDLED_SETS if b.gallery.is_dir()}
        choices: list[Choice] = []
        for folder in dict.fromkeys(Path(g).expanduser().resolve() for g in galleries):
            if not folder.is_dir():
                raise NotADirectoryError(f"gallery {folder} is not a folder; pass --gallery DIR of images")
            same = bundled_at.get(folder)  # a bundled gallery named with --gallery: its one choice
            choices.append(
                Choice(str(folder), str(folder), str(folder)) if same is None else _bundled_gallery(same)
            )
        ordered = sorted(BUNDLED_SETS, key=lambda b: b.key != first)  # stable: the rest keep their order
        listed = {choice.key for choice in choices}
        choices += [_bundled_gallery(b) for b in ordered if b.gallery.is_dir() and b.key not in listed]
        if not choices:
            raise BundledAssetMissingError(
                f"the bundled galleries {[str(b.gallery) for b in BUNDLED_SETS]} are missing; run "
                "`python -m demo.make_photo_gallery` / `python -m demo.make_gallery` or pass --gallery DIR"
            )
        return choices

    @property
    def default_model(self) -> str:
        return self.model_choices[0].key

    @property
    def default_gallery(self) -> str:
        return self.gallery_choices[0].key

    def allowed_paths(self) -> list[str]:
        """Folders the web server may serve files from: the galleries and the bundled examples."""
        return [choice.source for choice in self.gallery_choices] + [str(b.examples) for b in BUNDLED_SETS]

    @staticmethod
    def examples() -> list[Path]:
        """The bundled example queries (none is in a bundled gallery), the default set's first."""
        return [
            path
            for bundled in BUNDLED_SETS
            for path in sorted(bundled.examples.glob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]

    def _find(self, choices: list[Choice], key: str, what: str) -> Choice:
        for choice in choices:
            if choice.key == key:
                return choice
        known = ", ".join(repr(c.key) for c in choices)
        raise UserInputError(f"unknown {what} {key!r}; choose one of {known}")

    # ------------------------------------------------------------------ loading
    def get_model(self, key: str | None = None) -> LoadedModel:
        """The model behind a menu key, loaded once."""
        choice = self._find(self.model_choices, key or self.default_model, "model")
        with self._lock:
            if choice.key not in self._models:
                start = time.perf_counter()
                if self.model_loader is not None:
                    model = self.model_loader(choice.source)
                else:
                    model = from_pretrained(choice.source, device=self.device)
                entry = None if Path(choice.source).is_dir() else registry.find_entry(choice.source)
                identity = model_identity(choice.source, model, getattr(entry, "revision", None))
                seconds = time.perf_counter() - start
                logger.info("loaded model %s in %.1f s", choice.source, seconds)
                self._models[choice.key] = LoadedModel(model, choice.source, identity, seconds)
            return self._models[choice.key]

    def get_index(self, model_key: str | None = None, gallery_key: str | None = None) -> CachedIndex:
        """The gallery index for a (model, gallery) pair: from memory, the disk cache, or built.

        The gallery folder is listed again when its index was last checked over :data:`RESCAN_S` seconds
        ago; a changed, added or removed file then rebuilds it (what the cache key covers), so a running
        demo follows its folders. Building one pair holds only that pair's lock: searches on other
        pairs go on meanwhile.
        """
        model_key = self._find(self.model_choices, model_key or self.default_model, "model").key
        gallery = self._find(self.gallery_choices, gallery_key or self.default_gallery, "gallery")
        pair = (model_key, gallery.key)
        with self._lock:
            known = self._indexes.get(pair)
            pair_lock = self._pair_locks.setdefault(pair, threading.Lock())
        if known is not None and time.monotonic() - known[1] < RESCAN_S:
            return known[0]
        with pair_lock:
            with self._lock:
                known = self._indexes.get(pair)
            now = time.monotonic()
            if known is not None and now - known[1] < RESCAN_S:
                return known[0]  # another request checked it while this one waited
            if known is not None and scan_gallery(known[0].root) == known[0].files:
                cached = known[0]
            else:
                if known is not None:
                    logger.info("gallery %s changed since its index was built; rebuilding", gallery.source)
                loaded = self.get_model(model_key)
                cached = load_or_build(
                    self.cache_dir, loaded.model, loaded.identity, gallery.source,
                    model_name=loaded.spec, batch_size=self.batch_size,
                )  # fmt: skip
            with self._lock:
                self._indexes[pair] = (cached, now)
            return cached

    def describe(self, model_key: str | None = None, gallery_key: str | None = None) -> str:
        """Markdown status line for a (model, gallery) pair (loads or builds it if needed)."""
        loaded = self.get_model(model_key)
        cached = self.get_index(model_key, gallery_key)
        config = loaded.model.config
        how = f"built in {cached.seconds:.1f} s" if cached.built else "loaded from the cache"
        text = (
            f"**Model** `{config.name or config.architecture}`: {config.img_size} px, "
            f"{config.in_chans} channel(s), patch {config.patch_size}, embedding dim "
            f"{loaded.model.embedding_dim()} ({config.pooling}), on {self.device.type}. "
            f"**Gallery** {len(cached.index)} images, index {how} (`{cached.folder.name}`)."
        )
        if cached.failures:
            text += f" {len(cached.failures)} gallery file(s) could not be read and are left out."
        made_for = {bundled.key: bundled for bundled in BUNDLED_SETS}
        model_key, gallery_key = model_key or self.default_model, gallery_key or self.default_gallery
        if model_key in made_for and gallery_key in made_for and model_key != gallery_key:
            text += (
                f" Note: this gallery goes with `{made_for[gallery_key].model_name}`; this model was trained "
                "on other images, so its neighbours here mean little."
            )
        return text

    # ------------------------------------------------------------------ uploads
    def check_query(
        self, path: str | Path | None, draft_to: int = DRAFT_MARGIN * DISPLAY_SIZE
    ) -> Image.Image:
        """Validate an uploaded or picked image and decode it (RGB).

        Checks the extension, that the content is one of :data:`ALLOWED_FORMATS`, and decodes it with
        the library's rules (pixel cap, truncated data, EXIF, alpha, 16-bit). A JPEG over twice
        ``draft_to`` pixels on its shorter side is decoded at a reduced scale (a memory bound; see
        ``decode_image``'s ``draft_to``).

        Raises:
            UserInputError: the message names the file (not its server path) and what is wrong.
        """
        if path is None or str(path) == "":
            raise UserInputError("No image yet: upload one or pick an example first.")
        path = Path(path)
        name = path.name
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise UserInputError(
                f"{name}: file type {path.suffix or '(none)'!r} is not accepted; "
                f"upload one of {ACCEPTED_TYPES}"
            )
        if not path.is_file():
            raise UserInputError(f"{name}: the uploaded file is gone; upload it again")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path, formats=ALLOWED_FORMATS):
                    pass
        except UnidentifiedImageError:
            raise UserInputError(
                f"{name}: not a readable image; the content is not {', '.join(ALLOWED_FORMATS)} or is corrupt"
            ) from None
        except Image.DecompressionBombError:
            raise UserInputError(f"{name}: {self._too_many_pixels()}") from None
        except OSError as exc:
            raise UserInputError(f"{name}: truncated or corrupt image ({exc})") from None
        try:
            return decode_image(ImageSource(path, name), max_pixels=self.max_pixels, draft_to=draft_to)
        except ImageDecodeError as exc:
            raise UserInputError(self._clean(str(exc), path)) from None

    def _too_many_pixels(self, size: str | None = None) -> str:
        """The one message for an upload over ``max_pixels`` (``size``: "W x H = N" when known)."""
        found = f"{size} pixels, " if size else ""
        return (
            f"the image has too many pixels ({found}limit {self.max_pixels:,}); upload a smaller one "
            "(a large JPEG passes: it is decoded at a reduced size)"
        )

    def _clean(self, message: str, path: Path) -> str:
        """Replace server paths in a library message by the file's name; drop library-user hints."""
        message = message.replace(str(path), path.name)
        message = re.sub(r"image is (\d+)x(\d+) = ([\d,]+) pixels, above the cap max_pixels=[\d,]+ "
                         rf"\(decompression-bomb guard\); {re.escape(PIXEL_CAP_HINT)}",
                         lambda m: self._too_many_pixels(f"{m[1]} x {m[2]} = {m[3]}"), message)  # fmt: skip
        message = message.replace(f"; {PIXEL_CAP_HINT}", "")
        return re.sub(r" \(input index \d+; pass on_error='skip' to embed the others\)", "", message)

    def _decode_for(self, loaded: LoadedModel, path: str | Path | None) -> Image.Image:
        """check_query with draft decoding at the model's resize target."""
        return self.check_query(path, draft_to=draft_size(Preprocessor(loaded.model.data_config)))

    def _embed(
        self, model_key: str | None, loaded: LoadedModel, image: Image.Image, *, pooling=None, normalize=True
    ) -> np.ndarray:
        """(E,) embedding of a decoded image: through ``embedder`` (the server's batcher) for the default
        pooling, normalised; with ``encode()`` otherwise."""
        default = pooling in (None, loaded.model.config.pooling) and normalize
        if self.embedder is not None and default:
            return self.embedder(model_key or self.default_model, image)
        return encode(loaded.model, [image], pooling=pooling, normalize=normalize, convert_to_numpy=True)[0]

    # ------------------------------------------------------------------ operations
    def extract(
        self,
        model_key: str | None,
        path: str | Path | None,
        *,
        pooling: str | None = None,
        normalize: bool = True,
    ) -> Extraction:
        """Embed one image and picture its patch tokens.

        The embedding is exactly ``model.encode(path, pooling=pooling, normalize=normalize)`` (for a JPEG
        more than 8x larger than the model's input, of its reduced-size decode); it is also written to
        a ``.npy`` file under ``download_dir``. The image is decoded once for all outputs.
        """
        if path is None or str(path) == "":
            raise UserInputError("No image yet: upload one or pick an example first.")
        loaded = self.get_model(model_key)
        image = self._decode_for(loaded, path)
        path = Path(path)
        model = loaded.model
        pooling = pooling or model.config.pooling
        if pooling not in POOLINGS:
            raise UserInputError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        try:
            model.embedding_dim(pooling)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
        embedding = self._embed(model_key, loaded, image, pooling=pooling, normalize=normalize)
        grid = extract_patch_features(model, [image], max_pixels=None, convert_to_numpy=True)[0]
        view, pca, overlay = self._pca_pictures(model, image, grid)
        npy_path = self._write_npy(embedding, path.stem)
        return Extraction(embedding, pooling, normalize, npy_path, view, pca, overlay, tuple(grid.shape[:2]))

    def _pca_pictures(self, model, image: Image.Image, grid: np.ndarray):
        """(model view, PCA of patch tokens, overlay), upscaled by an integer factor to about 224 px."""
        preprocessor = Preprocessor(model.data_config)
        view = preprocessor.resize_crop(image.convert("L") if preprocessor.channels == 1 else image)
        view = view.convert("RGB")
        scale = max(1, round(DISPLAY_SIZE / max(view.size)))
        size = (view.width * scale, view.height * scale)
        view = view.resize(size, Image.Resampling.BICUBIC)
        pca = Image.fromarray(patch_pca_rgb(grid)).resize(size, Image.Resampling.NEAREST)
        return view, pca, Image.blend(view, pca, 0.55)

    def _write_npy(self, embedding: np.ndarray, stem: str) -> Path:
        """Write the embedding to a fresh folder under ``download_dir``."""
        target = self._fresh_download_folder() / f"{_safe_stem(stem)}_embedding.npy"
        np.save(target, embedding.astype(np.float32), allow_pickle=False)
        return target

    def _servable(self, path: Path) -> Path:
        """``path``, or for a name that is not valid UTF-8 a copy with a UTF-8 name under ``download_dir``
        (Gradio's file cache takes UTF-8 paths only; the gallery file itself is never renamed)."""
        if utf8_path(path) is not None:
            return path
        copy = self._fresh_download_folder() / f"{_safe_stem(path.stem)}{path.suffix}"
        return Path(shutil.copyfile(path, copy))

    def _fresh_download_folder(self) -> Path:
        """A new folder under ``download_dir``, after pruning the folders older than an hour."""
        if self.download_dir.is_dir():
            cutoff = time.time() - DOWNLOAD_MAX_AGE_S
            for old in self.download_dir.iterdir():
                with contextlib.suppress(OSError):
                    if old.stat().st_mtime < cutoff:
                        shutil.rmtree(old)
        folder = self.download_dir / uuid.uuid4().hex
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def search(
        self, model_key: str | None, gallery_key: str | None, path: str | Path | None, k: int = 8
    ) -> SearchOutcome:
        """Top-k gallery images for a query image, by cosine similarity of the model's embeddings."""
        whole = isinstance(k, int | float) and not isinstance(k, bool) and math.isfinite(k) and int(k) == k
        if not whole or not 1 <= k <= MAX_K:
            raise UserInputError(f"k must be a whole number from 1 to {MAX_K}, got {k!r}")
        if path is None or str(path) == "":
            raise UserInputError("No image yet: upload one or pick an example first.")
        loaded = self.get_model(model_key)
        image = self._decode_for(loaded, path)
        cached = self.get_index(model_key, gallery_key)
        query = self._embed(model_key, loaded, image)[None, :]
        result = cached.index.search(query, int(k))
        hits = []
        for rank, (score, item_id, meta) in enumerate(
            zip(result.scores[0].tolist(), result.ids[0].tolist(), result.metadata[0]), start=1
        ):
            if item_id < 0:
                continue
            file = self._servable(cached.root / cached.files[item_id].relpath)  # the exact file, by id
            hits.append(Hit(rank, item_id, file, meta["path"], meta["label"], float(score)))
        return SearchOutcome(hits, image, cached)


def _safe_stem(stem: str) -> str:
    """A file name stem of ASCII letters, digits, ``_.-`` only (at most 60 characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:60] or "image"
