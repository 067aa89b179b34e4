"""The state of a running inference API: :class:`Service` (models, batchers, indexes, admission limits)
and :class:`ApiError`, the error answer every route raises.

One ``Service`` per app (``app.state.service``, built by :func:`visreg_hub.serving.app.create_app`) is
what routes, the demo and tests share: one copy of each model, one batcher each.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time

import numpy as np

from visreg_hub.errors import ConfigError, VisregHubError, shown
from visreg_hub.inference.images import PIXEL_CAP_HINT
from visreg_hub.serving.batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from visreg_hub.serving.config import IndexSpec, ServeConfig
from visreg_hub.serving.metrics import Metrics
from visreg_hub.serving.runtime import ModelRuntime, load_runtime
from visreg_hub.serving.schemas import ItemMessage
from visreg_hub.serving.store import DurableIndex, IndexStore

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answer: HTTP ``status``, a one-line ``message`` naming the problem and the fix."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        limit: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
        items: dict[int, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.limit, self.headers = status, message, limit, headers
        self.code = code  # OpenAI's error code, for clients that branch on it
        self.items = items  # per-input messages (index -> message), answered as "errors"
        self.param = param  # OpenAI's param: the request field at fault


class Service:
    """Models, batchers, indexes and limits of one server process.

    Args:
        config: what to serve.
        runtimes: already loaded models to use instead of loading ``config.models`` (the demo passes
            none; tests may share a model object with the reference they compare against).
    """

    def __init__(self, config: ServeConfig, runtimes: dict[str, ModelRuntime] | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = Metrics()
        self.started = time.time()
        self.ready = False
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, set when it starts
        self.runtimes: dict[str, ModelRuntime] = dict(runtimes or {})
        for spec in config.models:
            if spec.name not in self.runtimes:
                self.runtimes[spec.name] = load_runtime(spec, config.device, config.backend)
        for runtime in self.runtimes.values():
            runtime.batcher = self._batcher(runtime)
        # bounded decode pool: at most decode_workers images are being decoded at any moment
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            config.limits.decode_workers, thread_name_prefix="decode"
        )
        self.admitted: dict[str, int] = dict.fromkeys(self.runtimes, 0)  # images in decode or queue
        self.activity = 0  # requests admitted so far (the idle memory trim watches it)
        self.indexes: dict[str, IndexStore] = {}
        self.index_models: dict[str, str | None] = {}
        self.index_problems: dict[str, str] = {}  # why an index has no model for images, where known
        for spec in config.indexes:
            self._open_index(spec)
        self.ready = True

    def _batcher(self, runtime: ModelRuntime) -> DynamicBatcher:
        name = runtime.name
        batch_size, batch_seconds = (
            self.metrics.batch_size.labels(name),
            self.metrics.batch_seconds.labels(name),
        )
        depth, items = self.metrics.queue_depth.labels(name), self.metrics.items_embedded.labels(name)

        def on_batch(size: int, seconds: float) -> None:
            batch_size.observe(size)
            batch_seconds.observe(seconds)
            items.inc(size)

        return DynamicBatcher(
            runtime.forward,
            max_batch_size=self.config.max_batch_size,
            max_wait_ms=self.config.max_wait_ms,
            max_queue=self.limits.max_queue,
            name=name,
            on_batch=on_batch,
            on_queue=depth.set,
        )

    def attach_index(self, name: str, store: IndexStore, model: str | None) -> None:
        """Serve ``store`` (opened by the caller, e.g. the demo's read-only galleries) as index ``name``,
        its image queries embedded with the served ``model`` (None: vector queries only).

        Raises:
            ConfigError: ``name`` is already served, or ``model`` is not.
        """
        if name in self.indexes:
            raise ConfigError(f"index name {name!r} is served twice; give each index its own name")
        if model is not None and model not in self.runtimes:
            served = ", ".join(sorted(self.runtimes))
            raise ConfigError(f"index {name!r}: model {model!r} is not served ({served})")
        self.indexes[name] = store
        self.index_models[name] = model

    def _open_index(self, spec: IndexSpec) -> None:
        from visreg_hub.retrieval import EmbeddingIndex

        model = self.runtimes[spec.model] if spec.model else self.runtimes[self.config.default_model]

        def new_index() -> EmbeddingIndex:
            return EmbeddingIndex(model.embedding_dim, metric="ip", normalize=True, model_name=model.name)

        def prepare(index) -> None:
            if index.metric == "ip" and index.normalized and not index.normalize:
                # why: an index of unit vectors (e.g. from `visreg-hub index build`) ranks by cosine; a raw
                # vector added through the API would otherwise outrank everything by its length alone.
                # Before the log replay, so adds acknowledged since the snapshot come back normalised too.
                index.normalize = True
                logger.info("index %s holds unit vectors: added and query vectors are normalised", spec.name)

        store = DurableIndex(
            spec.folder, new_index, snapshot_every=self.config.snapshot_every, prepare=prepare
        )
        self.indexes[spec.name] = store
        self.index_models[spec.name] = self._model_for_index(spec, store)

    def _model_for_index(self, spec: IndexSpec, store: DurableIndex) -> str | None:
        """The served model that embeds this index's image queries (None: vectors only).

        A served model whose pooling differs from the one the index records would embed images into
        another space of the same width (cosine 0.6 to the stored vectors in a probe): vectors only then.
        """
        chosen = self._served_model_for(spec, store)
        pooling = store.index.pooling
        if chosen is not None and pooling and pooling != self.runtimes[chosen].model.config.pooling:
            served = self.runtimes[chosen].model.config.pooling
            self.index_problems[spec.name] = (
                f"index {spec.name!r} was built with pooling {pooling!r} and the served model {chosen!r} "
                f"embeds with {served!r}; query it with 'vector', or serve a model whose default pooling is "
                f"{pooling!r}"
            )
            logger.warning("%s", self.index_problems[spec.name])
            return None
        return chosen

    def _served_model_for(self, spec: IndexSpec, store: DurableIndex) -> str | None:
        if spec.model:
            return spec.model
        recorded = store.index.model_name
        for runtime in self.runtimes.values():
            if recorded in (runtime.name, runtime.spec.source):
                return runtime.name
        default = self.runtimes[self.config.default_model]
        if default.embedding_dim == store.index.dim:
            if recorded:
                logger.warning(
                    "index %s was built with model %r, which is not served; image queries use %r",
                    spec.name,
                    recorded,
                    default.name,
                )
            return default.name
        logger.warning(
            "index %s (dim %d) matches no served model: vector queries only", spec.name, store.index.dim
        )
        return None

    # ------------------------------------------------------------------ lookups
    def runtime(self, name: str | None) -> ModelRuntime:
        name = self.config.default_model if name is None else name  # "" is a name, and not a served one
        if name not in self.runtimes:
            known = ", ".join(sorted(self.runtimes))
            raise ApiError(
                404,
                f"unknown model {shown(name)}; GET /v1/models lists the served ones ({known})",
                code="model_not_found",  # param stays null, as OpenAI answers an unknown model
            )
        return self.runtimes[name]

    def index(self, name: str) -> IndexStore:
        if name not in self.indexes:
            known = ", ".join(sorted(self.indexes)) or self.config.without_indexes
            message = f"unknown index {shown(name)}; served indexes: {known}"
            raise ApiError(404, message, code="index_not_found")
        return self.indexes[name]

    def writable_index(self, name: str) -> IndexStore:
        """:meth:`index`, or a 403 when that index is served read-only (before the request does any work)."""
        store = self.index(name)
        if store.read_only_reason is not None:
            raise ApiError(
                403, f"index {name!r} is read-only: {store.read_only_reason}", code="read_only_index"
            )
        return store

    # ------------------------------------------------------------------ embedding
    def admit(self, model: str, count: int) -> None:
        """Reserve room for ``count`` images of ``model`` (decoding + queued), or raise 429 (busy now) or
        413 (more than ``max_queue`` on its own)."""
        runtime = self.runtimes[model]
        if count > self.limits.max_queue:  # would never fit, however long the client waits: not a 429
            self.metrics.rejected.labels("max_queue").inc()
            raise ApiError(
                413,
                f"{count} images in one request, more than this server ever queues for a model "
                f"(max_queue={self.limits.max_queue}); split the request into parts of at most "
                f"{self.limits.max_queue} images",
                limit="max_queue",
            )
        if self.admitted[model] + count > self.limits.max_queue:
            self.metrics.rejected.labels("max_queue").inc()
            raise ApiError(
                429,
                f"server busy: {self.admitted[model]} images of model {model!r} are waiting "
                f"(limit max_queue={self.limits.max_queue}); retry after the Retry-After seconds",
                limit="max_queue",
                headers={"Retry-After": str(runtime.batcher.retry_after())},
            )
        self.admitted[model] += count
        self.activity += 1

    def release(self, model: str, count: int) -> None:
        self.admitted[model] -= count

    async def embed_payloads(
        self, model: str, payloads: list[bytes | None], labels: list[str], errors: dict[int, str]
    ) -> dict[int, np.ndarray]:
        """Decode (bounded pool) and embed (batcher) the non-None payloads.

        Items that fail to decode get a message in ``errors``; returns index -> (E,) float32 embedding.
        """
        runtime = self.runtimes[model]
        cap = self.limits.max_image_bytes
        for i, payload in enumerate(payloads):
            if payload is not None and len(payload) > cap:
                errors[i] = ItemMessage(
                    f"{labels[i]}: {len(payload)} bytes, over max_image_bytes={cap}; "
                    "send a smaller file (downscale or re-encode it)",
                    "max_image_bytes",
                )
                self.metrics.rejected.labels("max_image_bytes").inc()
        wanted = [i for i, payload in enumerate(payloads) if payload is not None and i not in errors]
        if not wanted:
            return {}
        self.admit(model, len(wanted))
        try:
            decoded = await self._decode_fairly(runtime, [(payloads[i], labels[i]) for i in wanted])
            good = [(i, pixels) for i, (pixels, _) in zip(wanted, decoded) if pixels is not None]
            for i, (_, message) in zip(wanted, decoded):
                if message is not None:
                    errors[i] = message
                    self.metrics.decode_failures.inc()
            if not good:
                return {}
            import torch

            outputs = await self._submit(runtime, torch.stack([pixels for _, pixels in good]))
            return {i: outputs[row] for row, (i, _) in enumerate(good)}
        finally:
            self.release(model, len(wanted))

    async def embed_pixels(self, model: str, pixels) -> np.ndarray:
        """Embed (n, C, H, W) uint8 pixels already preprocessed for ``model`` (admission + batcher)."""
        count = int(pixels.shape[0])
        self.admit(model, count)
        try:
            return await self._submit(self.runtimes[model], pixels)
        finally:
            self.release(model, count)

    async def _submit(self, runtime: ModelRuntime, pixels) -> np.ndarray:
        """The batcher's answer for ``pixels``; its refusals as API errors (429 busy, 503 stopping).

        Admission keeps the batcher's queue from overflowing, so these are a safety net, not a path."""
        try:
            return await runtime.batcher.submit(pixels)
        except QueueFullError as exc:
            self.metrics.rejected.labels("max_queue").inc()
            raise ApiError(
                429, str(exc), limit="max_queue",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None  # fmt: skip
        except BatcherClosedError as exc:
            raise ApiError(503, str(exc), code="server_stopping") from None

    def embed_images_blocking(self, model: str, images: list) -> np.ndarray:
        """From a thread other than the server's event loop (the demo's UI handlers): preprocess decoded
        RGB PIL ``images`` here, embed them through the model's batcher, wait. Returns (n, E) float32.

        Raises:
            ApiError: 429 when the queue is full, 408 after ``request_timeout_s``.
        """
        import torch

        if self.loop is None:
            raise RuntimeError("the server is not running; embed_images_blocking needs its event loop")
        runtime = self.runtimes[model]
        pixels = torch.stack([runtime.transform(image) for image in images])
        future = asyncio.run_coroutine_threadsafe(
            self.within_limits(self.embed_pixels(model, pixels)), self.loop
        )
        return future.result()

    async def _decode_fairly(self, runtime: ModelRuntime, items: list[tuple[bytes, str]]) -> list[tuple]:
        """Decode ``items`` (payload, label) on the shared pool; returns (pixels | None, message | None) each.

        Why lanes: the pool's queue is first come, first served, so handing it all of a 1,000-image request
        at once would put every other request's images behind those 1,000 decodes (seconds, up to the
        timeout). Each request keeps at most ``decode_workers`` images queued and takes its next one when
        one finishes, so concurrent requests interleave image by image.
        """
        loop = asyncio.get_running_loop()
        draft = self.config.draft_decode
        results: list[tuple] = [(None, None)] * len(items)
        pending = iter(range(len(items)))

        async def lane() -> None:
            for position in pending:  # shared iterator: each lane takes the next undecoded item
                payload, label = items[position]
                results[position] = await loop.run_in_executor(
                    self.decode_pool, self._decode, runtime, payload, label, draft
                )

        await asyncio.gather(*(lane() for _ in range(min(self.limits.decode_workers, len(items)))))
        return results

    def _decode(self, runtime: ModelRuntime, payload: bytes, label: str, draft: bool):
        try:
            return runtime.decode(payload, label, max_pixels=self.limits.max_pixels, draft=draft), None
        except VisregHubError as exc:
            # the library's hint names encode(max_pixels=...) and CLI flags: a client can only resize
            message = str(exc).replace(f"; {PIXEL_CAP_HINT}", "; send a smaller image (resize it)")
            return None, ItemMessage(message, getattr(exc, "limit", None))
        except Exception as exc:  # why: an unexpected decoder error is this item's, not the request's
            logger.warning("unexpected error decoding %s: %r", label, exc)
            return None, f"{label}: could not be decoded ({type(exc).__name__})"

    async def within_limits(self, coro, receive=None):
        """Run ``coro`` within ``request_timeout_s`` (else 408) and, given the request's ASGI ``receive``
        (its body already read), only while the client is still connected (else 499, which nobody reads).

        Either way the work is cancelled: images still queued in the batcher are dropped before they cost
        a forward pass and the request's room in ``max_queue`` is released. why watch the connection:
        uvicorn does not cancel a handler whose client has gone, so a client that times out and retries
        (as the OpenAI SDK does) would have every abandoned request embedded anyway, filling the queue
        and turning live clients away with 429.
        """
        work = asyncio.ensure_future(asyncio.wait_for(coro, self.limits.request_timeout_s))
        if receive is None:
            return await self._timed(work)
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler itself is cancelled (server shutdown)
            gone.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                await work
            self.metrics.rejected.labels("client_disconnected").inc()
            raise ApiError(499, "the client disconnected before its answer was ready; the work was dropped")
        return await self._timed(work)

    async def _timed(self, work):
        try:
            return await work
        except TimeoutError:
            self.metrics.rejected.labels("request_timeout_s").inc()
            raise ApiError(
                408,
                f"the request took longer than request_timeout_s={self.limits.request_timeout_s:g}; "
                "send fewer images per request or retry later",
                limit="request_timeout_s",
                code="timeout",
            ) from None

    def close(self) -> None:
        """Drain the batchers, snapshot every index (graceful shutdown)."""
        self.ready = False
        for runtime in self.runtimes.values():
            if runtime.batcher is not None:
                runtime.batcher.close()
        self.decode_pool.shutdown(wait=True, cancel_futures=True)
        for name, store in self.indexes.items():
            try:
                store.close()
            except Exception:  # why: one failing index must not keep the others from their snapshot
                logger.exception("closing index %s failed; its log still holds every change", name)


async def _until_disconnect(receive) -> None:
    """Return when ASGI ``receive`` reports ``http.disconnect`` (call it only once the body has been read:
    every later message of a request is its disconnect, or the end of its response)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception as exc:  # a receive that cannot be watched never cancels the work: stop watching
        logger.debug("not watching the connection for a disconnect: %r", exc)
        await asyncio.get_running_loop().create_future()  # until cancelled with the finished work
