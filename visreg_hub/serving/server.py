"""Run the inference API with uvicorn: allocator bounds, graceful SIGTERM (drain, then snapshot)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from visreg_hub.errors import require_extra
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


def run_app(
    app: Any, host: str, port: int, *, log_level: str = "info", graceful_s: float = 30.0,
    before_shutdown: Callable[[], None] | None = None,
) -> None:  # fmt: skip
    """Serve ``app`` until SIGINT/SIGTERM; in-flight requests get ``graceful_s`` to finish, then the
    app's shutdown drains the batchers and snapshots every index.

    Args:
        before_shutdown: called when shutdown starts, before waiting for open connections (the demo
            ends the event streams that browser tabs keep open).
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
    Server(config).run()


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Load the models of ``config``, open its indexes and serve the API on ``host:port`` (blocks)."""
    from visreg_hub.serving.app import create_app

    bound_allocator()
    run_app(create_app(config), host, port, log_level=log_level)
