"""One process for the demo and the API: the serving app with the Gradio UI mounted at ``/``.

:func:`combined_app` builds :func:`visreg_hub.serving.create_app` on the demo's models (each loaded
once), points the :class:`~demo.service.DemoService` at those models and at the serving batcher (the UI's
embeddings are batched with the API's requests), mounts the Gradio Blocks at ``/`` and puts
:class:`PublicEventsOnly` in front: Gradio answers ``/gradio_api/call|run|api/<name>`` for every event
of the page, but only ``search`` and ``extract`` are meant for clients; the page itself uses the queue.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from demo.gallery_api import attach_galleries
from demo.service import DemoService, UserInputError
from visreg_hub.errors import shown
from visreg_hub.serving.app import create_app
from visreg_hub.serving.config import Limits, ModelSpec, ServeConfig
from visreg_hub.serving.schemas import error_body
from visreg_hub.serving.security import BodyDeadlineMiddleware
from visreg_hub.serving.service import ApiError

logger = logging.getLogger("demo")

PUBLIC_EVENTS = frozenset({"search", "extract"})
_NAMED_EVENT = re.compile(r"^/gradio_api/(?:call|run|api)/(?P<name>[^/]+)")


class PublicEventsOnly:
    """ASGI guard in front of the mounted page.

    * 404 for Gradio's named-event routes other than :data:`PUBLIC_EVENTS`;
    * 422 for a queue join (``POST /gradio_api/queue/join``) naming an event the page does not have
      (Gradio itself answers those with a 500 and a ``KeyError`` traceback in the log), 413 for a join
      or event body over :data:`MAX_JOIN_BYTES` (the page's own are a few kB: files are uploaded
      separately);
    * 422 for a join or event call whose file input is a URL: Gradio would download it into its cache,
      with no size limit (``--max-file-size`` applies to uploads only) and for any visitor, so inputs
      must be files uploaded through ``/gradio_api/upload``.
    """

    def __init__(self, app, public: frozenset[str] = PUBLIC_EVENTS, events: frozenset[int] | None = None):
        self.app = app
        self.public = public
        self.events = events

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope.get("path", "")
            match = _NAMED_EVENT.match(path)
            if match and match.group("name") not in self.public:
                await _json_error(send, 404, "not found")
                return
            if scope.get("method") == "POST" and (match or path == QUEUE_JOIN):
                body = await _read_body(receive, MAX_JOIN_BYTES)
                if body is None:
                    too_large = f"event body over {MAX_JOIN_BYTES} bytes"
                    await _json_error(send, 413, too_large)
                    return
                problem = self._body_problem(body, join=path == QUEUE_JOIN)
                if problem:
                    await _json_error(send, 422, problem)
                    return
                receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _body_problem(self, body: bytes, *, join: bool) -> str | None:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return None  # Gradio's own validation answers malformed JSON with a 422
        if join and self.events is not None:
            index = payload.get("fn_index") if isinstance(payload, dict) else None
            if isinstance(index, bool) or not isinstance(index, int) or index not in self.events:
                return f"unknown event fn_index={index!r}; this page has events {sorted(self.events)}"
        url = _file_url(payload)
        if url is not None:
            return (
                f"file inputs must be uploaded through /gradio_api/upload and passed by the path it returns; "
                f"this server does not fetch URLs (got {shown(url)})"
            )
        return None


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _file_url(payload: Any) -> str | None:
    """The first file object's ``path`` in ``payload`` that is a URL (Gradio would fetch it), else None."""
    stack = [payload]
    while stack:  # iterative: a hostile body may nest deeply
        item = stack.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and _URL.match(path.strip()):
                return path
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


QUEUE_JOIN = "/gradio_api/queue/join"
MAX_JOIN_BYTES = 1 << 20


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it exceeds ``limit`` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A ``receive`` that hands the already-read ``body`` to the app once, then passes on the server's
    ``receive`` (which waits for the client to disconnect)."""
    sent = False

    async def replaying_receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying_receive


async def _json_error(send, status: int, message: str) -> None:
    body = json.dumps(error_body(message, status)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def model_specs(service: DemoService) -> tuple[tuple[ModelSpec, ...], dict[str, str]]:
    """API model specs for the demo's menu, and menu key -> API model name (``Choice.name``, unique)."""
    choices = service.model_choices
    return tuple(ModelSpec(c.name, c.source) for c in choices), {c.key: c.name for c in choices}


def combined_app(
    service: DemoService,
    *,
    limits: Limits | None = None,
    max_batch_size: int = 32,
    max_image_bytes: int = Limits.max_image_bytes,
    request_timeout_s: float = Limits.request_timeout_s,
) -> Any:
    """The serving app on ``service``'s models, wired into ``service`` (mount the UI with :func:`mount_ui`).

    The API keeps the UI's limits: ``service.max_pixels`` per image and ``max_image_bytes`` (the demo's
    ``--max-file-size``) encoded bytes per image, and ``request_timeout_s`` for every request body and
    every embedding (:func:`mount_ui` holds the page's routes to the same deadline). JPEG uploads far
    larger than a model's input are decoded at a reduced size (``draft_decode``), in the API as in the
    UI, so camera photos pass ``max_pixels``; their embeddings are close to, not equal to, ``encode()``'s
    of the full decode. The galleries are the API's indexes, read-only (:mod:`demo.gallery_api`).
    """
    specs, names = model_specs(service)
    limits = limits or Limits(
        max_pixels=service.max_pixels, max_image_bytes=max_image_bytes, request_timeout_s=request_timeout_s
    )
    config = ServeConfig(
        models=specs,
        device=str(service.device),
        max_batch_size=max_batch_size,
        limits=limits,
        draft_decode=True,
    )
    app = create_app(config)
    api = app.state.service
    attach_galleries(api, service, names)  # read-only: /v1/search finds what the page finds
    by_source = {spec.source: spec.name for spec in specs}

    def load(source: str):
        return api.runtimes[by_source[source]].model

    def embed(model_key: str, image) -> Any:
        try:
            return api.embed_images_blocking(names[model_key], [image])[0]
        except ApiError as exc:
            raise UserInputError(
                f"The server is busy ({exc.message.split(';')[0]}); try again shortly."
            ) from None

    service.model_loader = load
    service.embedder = embed
    return app


def mount_ui(app, blocks, service: DemoService, *, max_file_size: int, css: str) -> Any:
    """Mount the Gradio Blocks at ``/`` of ``app`` (after the API routes, which keep precedence)."""
    import gradio as gr

    app = gr.mount_gradio_app(
        app, blocks, path="/", allowed_paths=service.allowed_paths(), max_file_size=max_file_size,
        show_error=False, ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False,
        footer_links=["api"], css=css, server_name="127.0.0.1",
    )  # fmt: skip
    # why: Gradio refuses a request's file paths that were not uploaded (and returned files outside
    # allowed_paths, the working directory and the temp folder) only once launch() has set has_launched;
    # mount_gradio_app never sets it, so a client could make the server read any image file by naming it
    # in a {"path": ...} payload. tests/demo/test_queue.py checks that this keeps holding.
    blocks.has_launched = True
    app.add_middleware(PublicEventsOnly, events=frozenset(blocks.fns))
    # outermost: the page's routes (uploads, queue joins) read their own bodies, with no deadline of
    # their own; /v1 bounds its reads itself
    api = app.state.service
    app.add_middleware(
        BodyDeadlineMiddleware,
        timeout_s=api.limits.request_timeout_s,
        max_body_bytes=max(int(max_file_size), MAX_JOIN_BYTES) + (64 << 10),  # + multipart's own lines
        skip_prefixes=("/v1/",),
        on_timeout=api.metrics.rejected.labels("request_timeout_s").inc,
    )
    return app
