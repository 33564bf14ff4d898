"""`GET /docs` and `GET /openapi.json`: the API documentation, with Swagger UI served from
the package itself (no CDN: relays often run on rigs without internet access).

With a token configured, both want it like every other endpoint (`Authorization:
Bearer`, or `?token=` in a browser: `/docs?token=...` passes it on to the page's own
requests), unless `Settings.public_docs` makes them public.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

__all__ = ["SWAGGER_UI_VERSION", "install_docs"]

#: The Swagger UI release in `swagger-ui/` (see its README.md: origin, licence, hashes).
SWAGGER_UI_VERSION = "5.35.0"

_ASSETS = Path(__file__).with_name("swagger-ui")
_MEDIA = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}

# Swagger UI's own start-up, with the token of the page's URL (if any) passed on to
# the OpenAPI document and to every "Try it out" request.
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="{static}/swagger-ui.css{query}">
<link rel="icon" type="image/png" href="{static}/favicon-32x32.png{query}">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{static}/swagger-ui-bundle.js{query}"></script>
<script>
const token = {token};
window.ui = SwaggerUIBundle({{
  url: {openapi},
  dom_id: "#swagger-ui",
  deepLinking: true,
  requestInterceptor: (request) => {{
    if (token) request.headers["Authorization"] = "Bearer " + token;
    return request;
  }},
}});
</script>
</body>
</html>
"""


def install_docs(app: FastAPI, auth: Sequence[Any], public: bool = False) -> None:
    """Add `/openapi.json`, `/docs` and `/docs/static/{file}` to `app` (built with
    `openapi_url=None, docs_url=None, redoc_url=None`).

    Args:
        auth: the dependencies that check the token (as on every other endpoint).
        public: serve the three without the token.
    """
    dependencies = [] if public else list(auth)

    @app.get("/openapi.json", dependencies=dependencies, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=dependencies, include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        token = request.query_params.get("token")
        query = f"?token={quote(token, safe='')}" if token else ""
        page = _PAGE.format(
            title=html.escape(f"{app.title} {app.version}: API"),
            static="docs/static",  # relative: works behind a proxy's path prefix
            query=html.escape(query),
            # json.dumps, then "<" escaped: a token can never close the script element
            token=json.dumps(token).replace("<", "\\u003c"),
            openapi=json.dumps("openapi.json" + query).replace("<", "\\u003c"),
        )
        return HTMLResponse(page, headers={"cache-control": "no-store"})

    @app.get("/docs/static/{file}", dependencies=dependencies, include_in_schema=False)
    async def static(file: str) -> FileResponse:
        media = _MEDIA.get(file)
        if media is None:
            raise HTTPException(404, f"no documentation file {file!r}")
        return FileResponse(_ASSETS / file, media_type=media)
