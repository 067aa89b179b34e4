"""The HTTP inference API: ``visreg-hub serve``, :func:`create_app` and the :class:`Client`.

Server pieces: :mod:`~visreg_hub.serving.config` (what to serve, limits), :mod:`.batcher` (dynamic
batching), :mod:`.runtime` (one model), :mod:`.service` (the models, batchers, indexes and admission of
a running app), :mod:`.app` (the FastAPI factory), :mod:`.store` + :mod:`.wal` (durable indexes),
:mod:`.routes` (HTTP), :mod:`.security` (API keys, body limit), :mod:`.metrics` (Prometheus), :mod:`.server`
(uvicorn, signals). FastAPI and uvicorn come with ``pip install 'visreg_hub[serve]'``; the client needs
only the standard library.
"""

from __future__ import annotations

from visreg_hub._lazy import lazy_exports

_LAZY = {
    "Client": "visreg_hub.serving.client",
    "ServeConfig": "visreg_hub.serving.config",
    "Limits": "visreg_hub.serving.config",
    "ModelSpec": "visreg_hub.serving.config",
    "IndexSpec": "visreg_hub.serving.config",
    "create_app": "visreg_hub.serving.app",
    "serve": "visreg_hub.serving.server",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
