"""The playground's routes without a browser: the page, its assets, offline /docs and /redoc, open with keys on."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from app.api.ui import STATIC_DIR, VENDOR_DIR
from app.settings import Settings

LINK = re.compile(r'(?:src|href)="([^"#]+)"')


def test_page_and_every_asset_it_names_come_from_this_service(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    links = LINK.findall(r.text)
    assert "static/playground.js" in links and "static/playground.css" in links
    for link in links:
        assert "://" not in link and not link.startswith("//"), link  # relative: this origin, any root path
        assert client.get("/" + link).status_code == 200, link
    modules = re.findall(r'from "\./([\w.-]+)"', (STATIC_DIR / "playground.js").read_text())
    assert {"core.js", "classify.js", "faces.js", "text.js", "style.js"} <= set(modules)
    for name in modules:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
        assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in r.text


def test_static_serves_only_listed_files(client: TestClient) -> None:
    for name in ("README.md", ".hidden.js", "index.html", "nope.js", "%2e%2e%2fmain.py", "..%2fmain.py"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 404, name
        assert r.headers["content-type"] == "application/problem+json"
    assert client.get("/static/../app/main.py").status_code == 404
    assert client.get("/static/swagger-ui.css").headers["cache-control"] == "public, max-age=86400"


def test_docs_and_redoc_load_their_assets_from_here(client: TestClient) -> None:
    for page, assets in (("/docs", ["/static/swagger-ui-bundle.js", "/static/swagger-ui.css"]),
                         ("/redoc", ["/static/redoc.standalone.js"])):
        html = client.get(page).text
        for asset in assets:
            assert asset in html
            assert client.get(asset).status_code == 200
        assert not re.findall(r'(?:src|href)="https?://', html), page  # no CDN, no web fonts
    redoc = client.get("/static/redoc.standalone.js").text
    assert "cdn.redoc.ly" not in redoc and "Redoc" in redoc
    assert client.get("/docs/oauth2-redirect").status_code == 200


def test_vendored_files_match_their_recorded_hashes() -> None:
    table = (VENDOR_DIR / "README.md").read_text()
    rows = re.findall(r"\| `([\w.-]+)` \|[^\n]*\| `([0-9a-f]{64})` \|", table)
    assert {n for n, _ in rows} == {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"}
    for name, digest in rows:
        assert hashlib.sha256((VENDOR_DIR / name).read_bytes()).hexdigest() == digest, name
    for licence in ("LICENSE-swagger-ui.txt", "NOTICE-swagger-ui.txt", "LICENSE-redoc.txt"):
        assert (VENDOR_DIR / licence).stat().st_size > 0


def test_page_and_assets_stay_open_when_keys_are_on(base_settings: Settings, tmp_path: Path,
                                                    client_factory: Callable[[Settings], object]) -> None:
    keyed = base_settings.model_copy(update={"api_keys": ["k-secret"]})
    with client_factory(keyed) as c:  # type: ignore[attr-defined]
        for path in ("/", "/static/playground.js", "/static/swagger-ui-bundle.js", "/docs", "/redoc"):
            assert c.get(path).status_code == 200, path
        assert c.get("/models").status_code == 401
        assert c.get("/models", headers={"X-API-Key": "k-secret"}).status_code == 200
