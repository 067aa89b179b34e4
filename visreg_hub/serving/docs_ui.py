"""Swagger UI at ``/docs`` from files shipped in the package, so the API's docs work without a network.

FastAPI's default ``/docs`` page loads Swagger UI's JavaScript and CSS from a CDN: on an offline machine
(where the bundled models and the demo are meant to work) it stays blank. The same page is served here
with the unmodified Swagger UI files in ``swagger_ui/`` (see its README for version and licence).
"""

# no ``from __future__ import annotations``: FastAPI reads the handler's ``fastapi.Request`` annotation at
# definition time, and fastapi is imported inside install_docs (an optional extra)
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).with_name("swagger_ui")
#: URL prefix of the shipped files (under /docs, so the page and its files share one path)
ASSET_PREFIX = "/docs/assets"


def install_docs(app: Any) -> None:
    """Serve Swagger UI at ``/docs`` of ``app`` (a FastAPI app made with ``docs_url=None``)."""
    import fastapi
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.staticfiles import StaticFiles

    app.mount(ASSET_PREFIX, StaticFiles(directory=ASSETS), name="swagger-ui-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: fastapi.Request) -> Any:
        # under a proxy prefix (uvicorn --root-path) every URL the page loads carries the prefix
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url,
            title=f"{app.title} - docs",
            swagger_js_url=f"{root}{ASSET_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSET_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSET_PREFIX}/favicon-32x32.png",
        )
