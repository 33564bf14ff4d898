"""The live dashboard at `GET /`: one HTML page and its script and style, shipped in the
package (no build step, no CDN); the page polls `/streams` and `/streams/{name}/latest`."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

__all__ = ["add_dashboard"]

_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "ndrelay-sse.js": "text/javascript; charset=utf-8",
    "msgpack.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


def _read(name: str) -> bytes:
    return files(__name__).joinpath(name).read_bytes()


def add_dashboard(app: FastAPI, auth: Sequence[Any]) -> None:
    """Serve the page at `/` (behind `auth`, like the API: `/?token=` works) and its
    assets under `/dashboard/` (no token: they hold no stream data)."""
    page = _read("index.html")
    assets = {name: (_read(name), media) for name, media in _ASSETS.items()}

    @app.get("/", dependencies=list(auth), tags=["service"], response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The live dashboard: every stream's rates, depth, consumers and drops, and a
        preview of the newest item of the one clicked."""
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    for name, (body, media) in assets.items():

        def asset(body: bytes = body, media: str = media) -> Response:
            return Response(body, media_type=media, headers={"cache-control": "no-cache"})

        app.add_api_route(f"/dashboard/{name}", asset, methods=["GET"], include_in_schema=False)
