"""`/docs` and `/openapi.json`: Swagger UI served from the package (a rig without
internet access still gets its documentation), behind the token like every endpoint
but `/healthz`, unless `--public-docs`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest
from conftest import need

from ndrelay.server.apidocs import SWAGGER_UI_VERSION

pytestmark = pytest.mark.e2e

ASSETS = ["swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"]


def test_docs_page_loads_nothing_from_elsewhere(server):
    with httpx.Client(base_url=server.url, timeout=20) as http:
        page = http.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sorted(refs) == sorted(f"docs/static/{name}" for name in ASSETS)
        assert "//" not in page.text.replace("http://www.w3.org", "")  # no absolute URL
        for name, media in zip(ASSETS, ["text/javascript", "text/css", "image/png"], strict=True):
            r = http.get(f"/docs/static/{name}")
            assert r.status_code == 200, name
            assert r.headers["content-type"].split(";")[0] == media
            assert len(r.content) > 500
        assert http.get("/docs/static/../relay.py").status_code == 404
        assert http.get("/docs/static/LICENSE").status_code == 404  # only the assets
        assert http.get("/openapi.json").json()["info"]["title"] == "ndrelay"
        assert http.get("/redoc").status_code == 404  # ReDoc would load from a CDN


def test_vendored_swagger_ui_records_version_and_licence():
    import ndrelay.server.apidocs as apidocs

    here = Path(apidocs.__file__).with_name("swagger-ui")
    notes = (here / "README.md").read_text()
    assert f"Swagger UI **{SWAGGER_UI_VERSION}**" in notes
    assert "Apache License 2.0" in notes
    assert "Apache License" in (here / "LICENSE").read_text()
    bundle = (here / "swagger-ui-bundle.js").read_text()
    assert SWAGGER_UI_VERSION in bundle


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/docs/static/swagger-ui.css"])
def test_docs_want_the_token(serve, path):
    handle = serve(token="s3cret")
    with httpx.Client(base_url=handle.url, timeout=20) as http:
        refused = http.get(path)
        assert refused.status_code == 401
        assert refused.json()["error"] == "AuthError"
        assert http.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get(path, params={"token": "s3cret"}).status_code == 200
        assert http.get(path, params={"token": "wrong"}).status_code == 401
        assert http.get("/healthz").status_code == 200


def test_docs_page_passes_its_token_on(serve):
    handle = serve(token="s3<cret")
    with httpx.Client(base_url=handle.url, timeout=20) as http:
        page = http.get("/docs", params={"token": "s3<cret"}).text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert all(ref.endswith("?token=s3%3Ccret") for ref in refs), refs
    assert '"openapi.json?token=s3%3Ccret"' in page
    assert "s3<cret" not in page  # never raw in the page
    assert '"Bearer " + token' in page  # "Try it out" requests carry it


def test_public_docs_flag(serve):
    handle = serve(token="s3cret", public_docs=True)
    with httpx.Client(base_url=handle.url, timeout=20) as http:
        for path in ["/docs", "/openapi.json", "/docs/static/swagger-ui.css"]:
            assert http.get(path).status_code == 200, path
        assert http.get("/streams").status_code == 401  # the rest keeps its token


@pytest.mark.slow
def test_docs_render_in_a_browser_without_internet(serve, tmp_path):
    """Headless Chromium, every host but 127.0.0.1 unresolvable: Swagger UI renders."""
    chromium = need("chromium")
    handle = serve(token="s3cret")
    done = subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=20000",
            "--dump-dom",
            f"{handle.url}/docs?token=s3cret",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    dom = done.stdout
    assert 'class="title">ndrelay' in dom, dom[-2000:]
    assert "/streams/{name}/info" in dom  # the operations, from /openapi.json?token=...
