"""ASGI middleware of the inference API: JSON 500s and 503s, request metrics, HEAD answered as GET.

Installed by :func:`install_middleware`, from the innermost out: HEAD is answered like GET
(:class:`HeadAsGetMiddleware`), unexpected errors become a JSON 500 and requests cut off by a forced stop a
JSON 503 (:class:`InternalErrorMiddleware`), the body limit
(:class:`~visreg_hub.serving.security.BodyLimitMiddleware`), metrics (:class:`MetricsMiddleware`),
then CORS when configured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from visreg_hub.serving import schemas
from visreg_hub.serving.security import BodyLimitMiddleware
from visreg_hub.serving.service import Service

logger = logging.getLogger(__name__)


class InternalErrorMiddleware:
    """ASGI middleware: an unexpected exception becomes the JSON 500 here, inside the other middlewares;
    a request cut off by a forced stop is a JSON 503.

    why not ``app.exception_handler(Exception)``: Starlette answers those from its outermost middleware, so
    the 500 carried no CORS headers (a browser saw an opaque CORS failure, not the error) and bypassed the
    request metrics. The traceback is logged; the client gets no detail.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except ClientDisconnect:  # the client left mid-body (or its body timed out): nothing went wrong here
            logger.debug("%s %s: the client disconnected mid-body", scope.get("method"), scope.get("path"))
        except asyncio.CancelledError:
            # why: a forced stop (a second Ctrl-C, or the graceful wait ending) cancels requests in flight;
            # uvicorn answered one without a response yet with a plain-text 500, which clients read as a bug
            # to report; it is the service being unavailable, so a retry elsewhere is the right reaction
            if not started:
                body = schemas.error_body(
                    "the server was stopped before this request finished; retry it",
                    503,
                    code="server_stopping",
                )
                await JSONResponse(body, 503, headers={"Connection": "close"})(scope, receive, send)
            raise
        except Exception:
            logger.exception("unexpected error")
            if started:  # too late for a clean answer: let the server close the connection
                raise
            body = schemas.error_body("internal error; it was logged on the server", 500)
            await JSONResponse(body, 500)(scope, receive, send)


class HeadAsGetMiddleware:
    """ASGI middleware: a HEAD request is answered as its GET would be, headers only (RFC 9110, 9.3.2).

    why: FastAPI routes answer only the methods they declare, so a load balancer's or monitor's
    ``HEAD /v1/models`` was a 405 while GET worked, and a HEAD on an unknown path was 405, not 404.
    The app sees a GET (on a copy of the scope: the metrics outside still count a HEAD); the body is
    dropped, its Content-Length kept.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route_of(scope) -> Any:
    """The route a request is for when a middleware answered it before routing (the body limit's 413),
    so its metrics carry the route's label and not that of unknown paths; None for an unknown path."""
    app = scope.get("app")
    for route in getattr(getattr(app, "router", None), "routes", ()):
        if route.matches(scope)[0] != Match.NONE:
            return route
    return None


class MetricsMiddleware:
    """ASGI middleware: count requests by route template, method and status; observe their latency."""

    def __init__(self, app, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            path = getattr(scope.get("route") or _route_of(scope), "path", None) or "unmatched"
            # any token is a method to uvicorn: a fixed label set, or clients could grow /metrics at will
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(path, method, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def install_middleware(app: FastAPI, service: Service) -> None:
    """Add the API's middleware to ``app`` (the first added is the innermost)."""
    app.add_middleware(HeadAsGetMiddleware)
    # unexpected errors become a JSON 500 that metrics count and CORS decorates
    app.add_middleware(InternalErrorMiddleware)
    # the body limit holds before anything reads the body; metrics count its refusals too
    app.add_middleware(
        BodyLimitMiddleware,
        limit=service.limits.max_body_bytes,
        on_refuse=service.metrics.rejected.labels("max_body_bytes").inc,
        drain_timeout_s=service.limits.request_timeout_s,
    )
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    if service.config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(service.config.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            # any request header: the OpenAI JS SDK sends x-stainless-* on every call, and the origin list
            # (never "*" with credentials) is what guards the API
            allow_headers=["*"],
            expose_headers=["Retry-After"],  # so browser code can honour a 429's back-off
        )
