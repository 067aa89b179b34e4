"""The FastAPI application factory of ``visreg-hub serve`` (and of the demo, which mounts its UI on it).

:func:`create_app` builds the :class:`~visreg_hub.serving.service.Service` (each model loaded once, each
durable index opened, one :class:`~visreg_hub.serving.batcher.DynamicBatcher` per model) and wires the
routes of :mod:`visreg_hub.serving.routes` and the offline API docs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from visreg_hub.errors import require_extra
from visreg_hub.serving.config import ServeConfig
from visreg_hub.serving.runtime import ModelRuntime
from visreg_hub.serving.service import Service

logger = logging.getLogger(__name__)


def create_app(config: ServeConfig, *, runtimes: dict[str, ModelRuntime] | None = None) -> Any:
    """Build the FastAPI app (models loaded and indexes opened before this returns).

    Args:
        config: see :class:`~visreg_hub.serving.config.ServeConfig`.
        runtimes: pre-loaded models by name (optional; see :class:`Service`).

    Returns:
        a ``fastapi.FastAPI``; run it with uvicorn. ``app.state.service`` is the :class:`Service`.
    """
    fastapi = require_extra("fastapi", "serve")
    from visreg_hub.serving.docs_ui import install_docs
    from visreg_hub.serving.routes import install

    service = Service(config, runtimes)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        service.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            logger.info("shutting down: draining batchers, snapshotting indexes")
            await asyncio.to_thread(service.close)

    app = fastapi.FastAPI(
        title="visreg_hub inference API",
        version=__import__("visreg_hub").__version__,
        description="Image embeddings and similarity search with VISReg encoders.",
        lifespan=lifespan,
        docs_url=None,  # served by install_docs from shipped files (the default loads them from a CDN)
        redoc_url=None,  # ReDoc's page would load its script from a CDN too
    )
    app.state.service = service
    install(app, service)
    install_docs(app)
    return app
