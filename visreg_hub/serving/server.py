"""Run the inference API with uvicorn: allocator bounds, graceful SIGTERM (drain, then snapshot)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
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


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, for :func:`run_app`; bind it before loading any model.

    why first: a port already taken is then reported at once, on one line, instead of by uvicorn after
    every model has loaded (and with uvicorn's own exit status).

    Raises:
        UserInputError: the address cannot be bound (in use, not an address of this machine, a
            privileged port), naming the address and the fix.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserInputError(f"cannot serve on {host}:{port}: {exc.strerror}; check --host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart past TIME_WAIT
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserInputError(
            f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another --port, or stop the "
            "process that listens there"
        ) from None
    return sock


def run_app(
    app: Any, host: str, port: int, *, log_level: str = "info", graceful_s: float = 30.0,
    before_shutdown: Callable[[], None] | None = None, sock: socket.socket | None = None,
) -> None:  # fmt: skip
    """Serve ``app`` until SIGINT/SIGTERM; in-flight requests get ``graceful_s`` to finish, then the
    app's shutdown drains the batchers and snapshots every index.

    Args:
        before_shutdown: called when shutdown starts, before waiting for open connections (the demo
            ends the event streams that browser tabs keep open).
        sock: a socket from :func:`listening_socket` (bound to ``host:port`` earlier); default: bind now.
    """
    uvicorn = require_extra("uvicorn", "serve")

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
                # why: uvicorn re-raises SIGTERM/SIGINT once it has shut down, so a clean stop would end the
                # process with -15; by now requests are drained and indexes snapshotted, so it exits 0
                getattr(self, "_captured_signals", []).clear()

    service = app.state.service

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
    )
    sock = listening_socket(host, port) if sock is None else sock
    with sock:
        Server(config).run(sockets=[sock])


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Bind ``host:port``, load the models of ``config``, open its indexes and serve the API (blocks).

    Raises:
        UserInputError: ``host:port`` cannot be bound (checked before any model is loaded).
    """
    from visreg_hub.serving.app import create_app

    sock = listening_socket(host, port)
    with sock:
        bound_allocator()
        run_app(create_app(config), host, port, log_level=log_level, sock=sock)
