"""The dashboard's files over HTTP (what a browser fetches; test_browser_dashboard.py runs them):
the page behind the token, its assets shipped in the package, nothing from elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.backends]


def test_page_and_assets(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "dashboard/dashboard.js" in refs and "dashboard/dashboard.css" in refs
    assert not [r for r in refs if "//" in r], "the page loads nothing from other hosts"
    for asset in ("dashboard.js", "msgpack.js", "ndrelay-sse.js", "dashboard.css"):
        got = httpx.get(f"{server.url}/dashboard/{asset}")
        assert got.status_code == 200 and got.content
        assert "http://" not in got.text and "https://" not in got.text
    assert httpx.get(server.url + "/dashboard/nope.js").status_code == 404


def test_page_wants_the_token(serve):
    server = serve(token="s3cret")
    assert httpx.get(server.url + "/").status_code == 401
    assert httpx.get(server.url + "/?token=wrong").status_code == 401
    assert httpx.get(server.url + "/?token=s3cret").status_code == 200
    # the script holds no data: it loads without the token, as <script src> would
    assert httpx.get(server.url + "/dashboard/dashboard.js").status_code == 200


def test_openapi_declares_the_page(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "text/html" in spec["paths"]["/"]["get"]["responses"]["200"]["content"]


def test_the_readme_shows_the_snippet_the_dashboard_serves(server):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    served = httpx.get(server.url + "/dashboard/ndrelay-sse.js").text
    blocks = re.findall(r"```js\n(.*?)```", readme, re.S)
    assert served in blocks
