"""/docs: Swagger UI served by lossd itself, under a 'self'-only Content-Security-Policy.

The Swagger UI distribution comes from the ``swagger-ui-py`` package (Apache
2.0); only its bundle, stylesheet and icon are served, from ``/docs/assets/``.
FastAPI's own /docs page would load them from a CDN and start them with an
inline script, which the CSP forbids: this page starts them from
``/docs/assets/init.js`` instead. The bearer scheme is declared in the OpenAPI
document so that "Authorize" in the page sends the token.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, Response

from lossd.server.gateway.problems import Problem

__all__ = ["install_docs", "swagger_ui_dir"]

_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>lossd gateway · API</title>
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/assets/init.js"></script>
</body>
</html>
"""

_INIT = """window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  persistAuthorization: false,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
});
"""


def swagger_ui_dir() -> Path:
    """The ``static`` folder of the installed ``swagger_ui`` package (found without importing it)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is missing: pip install lossd-server again")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def install_docs(app: FastAPI, *, bearer: bool) -> None:
    """Add GET /docs, /docs/assets/* and (with ``bearer``) the token scheme to ``app``'s OpenAPI document."""
    assets = swagger_ui_dir()

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_PAGE)

    @app.get("/docs/assets/init.js", include_in_schema=False)
    async def docs_init() -> Response:
        return Response(_INIT, media_type="text/javascript")

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> FileResponse:
        media_type = _ASSETS.get(name)
        if media_type is None:
            raise Problem(404, "not-found", "Not found", f"no docs asset {name!r}")
        return FileResponse(assets / name, media_type=media_type)

    if bearer:

        def openapi() -> dict[str, Any]:
            if app.openapi_schema is None:
                schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                schema["security"] = [{"bearer": []}]
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = openapi  # type: ignore[method-assign]
