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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from demo.cache import CachedIndex, load_or_build, model_identity, scan_gallery
from demo.menus import (  # noqa: F401  (re-exported: the names callers of demo.service know)
    BUNDLED_SETS,
    BundledAssetMissingError,
    Choice,
    example_files,
    find_choice,
    gallery_choices,
    model_choices,
)
from demo.uploads import DEMO_MAX_PIXELS, NO_IMAGE, check_upload
from visreg_hub.devices import default_device
from visreg_hub.errors import UserInputError
from visreg_hub.hub import from_pretrained, registry
from visreg_hub.inference import Preprocessor, encode, extract_patch_features, patch_pca_rgb
from visreg_hub.inference.preprocess import DRAFT_MARGIN, draft_size
from visreg_hub.models.config import POOLINGS
from visreg_hub.native_io import utf8_path

logger = logging.getLogger(__name__)

MAX_K = 50
DISPLAY_SIZE = 224
RESCAN_S = 10.0  # a gallery's files are listed again when its index was checked longer ago
# how long get_index(wait=False) waits for the work it starts in the background: a cached or small gallery
# is answered at once, a long build never holds the caller's thread longer than this
BACKGROUND_WAIT_S = 2.0
DOWNLOAD_MAX_AGE_S = 3600  # .npy downloads older than this are removed (Gradio has its own copy by then)


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


class IndexBuildingError(UserInputError):
    """A gallery's first index is being built by another thread (``get_index(wait=False)``)."""


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
        self.model_choices = model_choices(models)
        self.gallery_choices = gallery_choices(galleries, first=self.model_choices[0].key)
        self._models: dict[str, LoadedModel] = {}
        self._indexes: dict[tuple[str, str], tuple[CachedIndex, float]] = {}  # pair -> (index, scanned at)
        self._pair_locks: dict[tuple[str, str], threading.Lock] = {}
        # get_index(wait=False)'s background work per pair, and the error of the last one that failed
        self._workers: dict[tuple[str, str], threading.Thread] = {}
        self._failures: dict[tuple[str, str], Exception] = {}
        self._lock = threading.RLock()  # models, and the dicts above (never held while embedding)

    # ------------------------------------------------------------------ choices
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
        return example_files()

    # ------------------------------------------------------------------ loading
    def get_model(self, key: str | None = None) -> LoadedModel:
        """The model behind a menu key, loaded once."""
        choice = find_choice(self.model_choices, key or self.default_model, "model")
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

    def get_index(
        self, model_key: str | None = None, gallery_key: str | None = None, *, wait: bool = True
    ) -> CachedIndex:
        """The gallery index for a (model, gallery) pair: from memory, the disk cache, or built.

        The gallery folder is listed again when its index was last checked over :data:`RESCAN_S` seconds
        ago; a changed, added or removed file then rebuilds it (what the cache key covers), so a running
        demo follows its folders. Building one pair holds only that pair's lock: searches on other
        pairs go on meanwhile.

        Args:
            wait: False: never list, load or build in the caller's thread, so callers on a small shared
                thread pool (the API) never queue behind a build. The work runs in a background thread;
                meanwhile the pair's last index is returned, or, when it has none yet, the caller waits
                up to :data:`BACKGROUND_WAIT_S` (a cached index loads in that time) and then gets
                :class:`IndexBuildingError` (or the error the work ended with).
        """
        model_key = find_choice(self.model_choices, model_key or self.default_model, "model").key
        gallery = find_choice(self.gallery_choices, gallery_key or self.default_gallery, "gallery")
        pair = (model_key, gallery.key)
        with self._lock:
            known = self._indexes.get(pair)
            pair_lock = self._pair_locks.setdefault(pair, threading.Lock())
        if known is not None and time.monotonic() - known[1] < RESCAN_S:
            return known[0]
        if not wait:
            return self._in_background(pair, known)
        pair_lock.acquire()
        try:
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
        finally:
            pair_lock.release()

    def _in_background(self, pair: tuple[str, str], known) -> CachedIndex:
        """``get_index(wait=False)``: the pair's check, load or build in a background thread (one per
        pair at a time); the last index meanwhile, else a short wait for a quick result."""
        with self._lock:
            worker = self._workers.get(pair)
            if worker is None or not worker.is_alive():
                self._failures.pop(pair, None)
                worker = threading.Thread(
                    target=self._refresh, args=pair, name=f"gallery-index-{pair[1]}", daemon=True
                )
                self._workers[pair] = worker
                worker.start()
        if known is not None:
            return known[0]  # being checked or rebuilt: the last one meanwhile
        worker.join(BACKGROUND_WAIT_S)
        with self._lock:
            fresh, failure = self._indexes.get(pair), self._failures.get(pair)
        if fresh is not None:
            return fresh[0]
        if failure is not None and not worker.is_alive():
            raise failure
        raise IndexBuildingError(f"the index of this gallery for model {pair[0]!r} is being built")

    def _refresh(self, model_key: str, gallery_key: str) -> None:
        """A background thread's ``get_index``: its failure is kept for the callers that wait on it, and
        the pair's last index is dropped (its folder could not be read again: emptied, removed)."""
        try:
            self.get_index(model_key, gallery_key)
        except Exception as exc:  # why: a thread's error would only reach stderr; the API reports it
            logger.warning("gallery %s with model %s: %s", gallery_key, model_key, exc)
            with self._lock:
                self._failures[(model_key, gallery_key)] = exc
                self._indexes.pop((model_key, gallery_key), None)

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
        """An uploaded or picked image, checked and decoded (RGB); see :func:`demo.uploads.check_upload`.

        Raises:
            UserInputError: the message names the file (not its server path) and what is wrong.
        """
        return check_upload(path, max_pixels=self.max_pixels, draft_to=draft_to)

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
            raise UserInputError(NO_IMAGE)
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
            raise UserInputError(NO_IMAGE)
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
