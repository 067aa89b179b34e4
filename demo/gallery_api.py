"""The demo's galleries as read-only indexes of its HTTP API (``POST /v1/search``, ``GET /v1/indexes``).

Each gallery of the page's menu is one index of the API, named without any server path: a bundled
gallery by its menu key (``bundled-photos``, ``bundled``), a ``--gallery`` folder by the folder's own name
(``name-2`` for a second folder of one name). Each is searched with the model the page pairs it with by
default: a bundled gallery with its own bundled model, a ``--gallery`` folder with the first model. The
index is the page's own (:meth:`demo.service.DemoService.get_index`): loaded from the demo's cache or
built on first use, and rebuilt when the folder's files change, so the API and the page give the same
hits. A hit's metadata is what the page shows: the file's ``path`` relative to the gallery and its
``label`` (its top folder).
"""

from __future__ import annotations

import numpy as np

from demo.cache import CachedIndex
from demo.menus import BUNDLED_SETS
from demo.service import RESCAN_S, DemoService, IndexBuildingError
from visreg_hub.errors import UserInputError
from visreg_hub.serving.service import ApiError, Service

BUILD_RETRY_AFTER_S = 5  # a bundled gallery builds in seconds; a large --gallery in minutes
READ_ONLY = (
    "it is a demo gallery, which follows the files of its folder (add or remove images there: a search "
    f"made {RESCAN_S:.0f} s later rebuilds the index); `visreg-hub serve --index NAME=FOLDER` serves an "
    "index that POST /v1/indexes/{name}/items and DELETE can change"
)


class GalleryIndex:
    """One (model, gallery) pair of the demo as an :class:`~visreg_hub.serving.store.IndexStore`.

    Args:
        service: the demo's service (it owns the index, its cache and its rebuilds).
        name: the index's name in the API (what its error messages name).
        model_key: the menu key of the model that embeds the gallery and the queries.
        gallery_key: the menu key of the gallery.
        dim: that model's embedding width (the width of vector queries), known without building.
    """

    read_only_reason = READ_ONLY
    snapshot_error = None  # nothing to snapshot or log: the folder is the record
    write_error = None

    def __init__(self, service: DemoService, name: str, model_key: str, gallery_key: str, dim: int) -> None:
        self.service, self.name, self.model_key, self.gallery_key = service, name, model_key, gallery_key
        self._dim = int(dim)

    @property
    def dim(self) -> int:
        return self._dim

    def _cached(self) -> CachedIndex:
        """The page's index for this pair (blocking: it may list the folder, load or build the index).

        Never waits for another thread's build: requests run on asyncio's default thread pool (cores + 4
        threads: 6 on 2 cores), which every request's body parsing also uses, so requests queued behind a
        long build would hold up the whole API. The first build answers others 503 with Retry-After; a
        rebuild serves the last index meanwhile.

        Raises:
            ApiError: 503 while the pair's first index is being built, or when the gallery holds no image
                that can be read any more (its message names the index, not the server's folder).
        """
        try:
            return self.service.get_index(self.model_key, self.gallery_key, wait=False)
        except IndexBuildingError:
            raise ApiError(
                503,
                f"gallery {self.name!r} is being indexed (its first build since the demo started); retry "
                "after the Retry-After seconds",
                code="index_building",
                headers={"Retry-After": str(BUILD_RETRY_AFTER_S)},
            ) from None
        except (UserInputError, OSError):  # the folder was emptied, removed or made unreadable meanwhile
            raise ApiError(
                503,
                f"gallery {self.name!r} cannot be searched now: its folder holds no image that can be read; "
                "the demo indexes it again once it does",
                code="index_unavailable",
            ) from None

    @property
    def index(self):
        """The gallery's EmbeddingIndex (ids: positions in the sorted file listing)."""
        return self._cached().index

    def __len__(self) -> int:
        return len(self._cached().index)

    def search(self, queries: np.ndarray, k: int):
        """Nearest gallery images of (Q, D) ``queries`` by cosine (the index L2-normalises queries, as its
        vectors are); None for an empty index.

        Raises:
            ValueError: a query vector is all zeros (no direction to compare).
        """
        index = self._cached().index
        if len(index) == 0:
            return None
        return index.search(queries, k=min(int(k), len(index)))

    def metadata_of(self, item_id: int) -> tuple[bool, dict | None]:
        index = self._cached().index
        if item_id not in index:
            return False, None
        return True, index.get_metadata([item_id])[0]

    def close(self) -> None:
        """Nothing to flush: the demo's cache entries are written whole when built."""


def attach_galleries(api: Service, service: DemoService, model_names: dict[str, str]) -> dict[str, str]:
    """Serve every gallery of ``service``'s menu as a read-only index of ``api``.

    Args:
        api: the serving app's service (its models are the demo's).
        service: the demo's service.
        model_names: model menu key -> the model's API name (``demo.server.model_specs``).

    Returns:
        API index name -> gallery menu key, in menu order.
    """
    bundled = {b.key for b in BUNDLED_SETS}
    attached: dict[str, str] = {}
    for choice in service.gallery_choices:  # named as in the menu: never a server path
        # a bundled gallery goes with its bundled model (same key in both menus) when that model is served
        paired = choice.key in bundled and choice.key in model_names
        model_key = choice.key if paired else service.default_model
        model = model_names[model_key]
        store = GalleryIndex(service, choice.key, model_key, choice.key, api.runtimes[model].embedding_dim)
        api.attach_index(choice.key, store, model)
        attached[choice.key] = choice.key
    return attached
