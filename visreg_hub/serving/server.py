"""Run the inference API with uvicorn: allocator bounds, graceful SIGTERM (drain, then snapshot)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from visreg_hub.errors import UserInputError, require_extra
from visreg_hub.serving.config import ServeConfig
from visreg_hub.serving.memory import bound_allocator, trim

logger = logging.getLogger(__name__)

IDLE_TRIM_S = 2.0


async def trim_when_idle(service, interval: float = IDLE_TRIM_S) -> None:
    """Every ``interval`` s: if images were embedded since the last look and none is in flight now,
    return freed heap memory to the OS (:func:`~visreg_hub.serving.memory.trim`)."""
    seen = -1
    while True:
        await asyncio.sleep(interval)
        if service.activity != seen and not any(service.admitted.values()):
            seen = service.activity
            await asyncio.to_thread(trim)


_BIND_HINTS = {
    errno.EADDRINUSE: "choose another --port, or stop the process that listens there",
    errno.EACCES: "ports below 1024 need root: choose a port of 1024 or above",
    errno.EADDRNOTAVAIL: "this machine has no such address: check --host (127.0.0.1, 0.0.0.0, ::1, ...)",
}


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """TCP sockets bound to every address of ``host`` (``localhost``: 127.0.0.1 and ::1, as uvicorn binds
    it), for :func:`run_app`; bind them before loading any model.

    why first: a port already taken is then reported at once, on one line, instead of by uvicorn after
    every model has loaded (and with uvicorn's own exit status). An address family this machine has
    turned off (``::1`` in /etc/hosts without IPv6) is skipped when another address binds, as asyncio does.

    Raises:
        UserInputError: the host does not resolve, or an address cannot be bound (in use, not this
            machine's, a privileged port), naming the address and the fix.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserInputError(f"cannot serve on {_shown(host, port)}: {exc.strerror}; check --host") from None
    infos = list(dict.fromkeys(infos))  # getaddrinfo repeats some entries
    sockets: list[socket.socket] = []
    unavailable = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart past TIME_WAIT
            if family == socket.AF_INET6 and len(infos) > 1:  # its own address only, beside the IPv4 one
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRNOTAVAIL:
                unavailable = exc
                continue
            for bound in sockets:
                bound.close()
            hint = _BIND_HINTS.get(exc.errno, "check --host and --port")
            raise UserInputError(
                f"cannot serve on {_shown(address[0], port)}: {exc.strerror or exc}; {hint}"
            ) from None
        sockets.append(sock)
    if not sockets:
        raise UserInputError(
            f"cannot serve on {_shown(host, port)}: {unavailable.strerror if unavailable else 'no address'}; "
            f"{_BIND_HINTS[errno.EADDRNOTAVAIL]}"
        )
    return sockets


def _not_a_cancellation(record: logging.LogRecord) -> bool:
    """Log filter: False for uvicorn's report of a task cancelled by a forced stop (a request's
    ``CancelledError`` with its traceback, or the lifespan's traceback text ending in it)."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, asyncio.CancelledError):
        return False
    message = record.getMessage()
    return not (message.startswith("Traceback") and "CancelledError" in message)


def run_app(
    app: Any, host: str, port: int, *, log_level: str = "info", graceful_s: float | None = None,
    before_shutdown: Callable[[], None] | None = None, sockets: list[socket.socket] | None = None,
) -> None:  # fmt: skip
    """Serve ``app`` until SIGINT/SIGTERM; in-flight requests get ``graceful_s`` to finish, then the
    app's shutdown drains the batchers and snapshots every index.

    Args:
        graceful_s: default ``request_timeout_s`` + 5 s, so that every request the server admitted can
            finish (a fixed 30 s cut longer requests off with a bare 500 under ``--request-timeout-s 45``).
        before_shutdown: called when shutdown starts, before waiting for open connections (the demo
            ends the event streams that browser tabs keep open).
        sockets: from :func:`listening_sockets` (bound to ``host:port`` earlier); default: bind now.
    """
    uvicorn = require_extra("uvicorn", "serve")
    # why: Pillow logs ERROR lines for some malformed files (a TIFF with 38 samples per pixel); what a
    # client sent is its request's 422, and anyone could otherwise write ERROR lines into this log
    logging.getLogger("PIL").setLevel(logging.CRITICAL)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            service.ready = False  # /ready answers 503 from now on: load balancers stop sending
            if before_shutdown is not None:
                before_shutdown()
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                if self.force_exit:  # a second signal: requests were cut off, so the exit is not clean
                    logger.warning("stopped without waiting for the requests in flight (a second signal)")
                    # why raise here: uvicorn would re-raise the captured SIGINTs through asyncio's own
                    # SIGINT handler (the first only cancels the serving task), and a run under load once
                    # ended 0, as a drained stop does; an interrupt is exit 130 in the CLI
                    getattr(self, "_captured_signals", []).clear()
                    # the tasks still running (the cut requests, the app's lifespan) are cancelled as the
                    # loop closes, and uvicorn logged a traceback for each: the line above says it all
                    logging.getLogger("uvicorn.error").addFilter(_not_a_cancellation)
                    raise KeyboardInterrupt
                # why: uvicorn re-raises SIGTERM/SIGINT once it has shut down, so a clean stop would end the
                # process with -15; by now requests are drained and indexes snapshotted, so it exits 0
                getattr(self, "_captured_signals", []).clear()

    service = app.state.service
    if graceful_s is None:
        graceful_s = service.limits.request_timeout_s + 5.0

    @contextlib.asynccontextmanager
    async def trimming(_app):
        task = asyncio.create_task(trim_when_idle(service))
        try:
            async with original(_app) as state:
                yield state
        finally:
            task.cancel()

    original = app.router.lifespan_context
    app.router.lifespan_context = trimming
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=graceful_s,
        server_header=False,
        # uvicorn's own choice looks at stdout, but its lines go to stderr: a log redirected to a file
        # from a terminal got colour codes; NO_COLOR (no-color.org) turns them off too
        use_colors=sys.stderr.isatty() and not os.environ.get("NO_COLOR"),
    )
    sockets = listening_sockets(host, port) if sockets is None else sockets
    for sock in sockets:  # uvicorn logs no address for sockets it is handed (port 0 would go unnamed)
        bound_host, bound_port = sock.getsockname()[:2]
        logger.info("listening on http://%s", _shown(bound_host, bound_port))
    try:
        Server(config).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Bind ``host:port``, load the models of ``config``, open its indexes and serve the API (blocks).

    Raises:
        UserInputError: ``host:port`` cannot be bound (checked before any model is loaded).
    """
    from visreg_hub.serving.app import create_app

    sockets = listening_sockets(host, port)
    try:
        bound_allocator()
        app = create_app(config)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    run_app(app, host, port, log_level=log_level, sockets=sockets)
