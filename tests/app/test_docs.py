"""/docs and /redoc work offline; the OpenAPI document declares the admin bearer scheme and one
error example per status; hits on the docs count under their own routes."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.app.conftest import Served

pytestmark = pytest.mark.anyio

CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


class _Urls(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href", "spec-url"} and value:
                self.urls.append(value)


def referenced_urls(html: str) -> list[str]:
    parser = _Urls()
    parser.feed(html)
    # Swagger UI's `url: '/openapi.json'` lives in the inline script, not in an attribute.
    return parser.urls + re.findall(r"url: '([^']+)'", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_reference_only_local_urls_and_each_is_served(served: Served, page: str) -> None:
    response = await served.client.get(page)
    assert response.status_code == 200
    html = response.text
    assert "cdn" not in html.lower()
    assert "googleapis" not in html
    urls = referenced_urls(html)
    assert any(u.endswith(".js") for u in urls)
    assert "/openapi.json" in urls
    for url in urls:
        parsed = urlparse(urljoin("http://lungserve.test" + page, url))
        assert parsed.netloc == "lungserve.test", f"{page} references {url}: not this server"
        asset = await served.client.get(parsed.path)
        assert asset.status_code == 200, url
        suffix = parsed.path[parsed.path.rfind(".") :]
        expected = CONTENT_TYPES.get(suffix, "application/json")
        assert asset.headers["content-type"].startswith(expected), (url, asset.headers["content-type"])
        assert len(asset.content) > 0


async def test_openapi_declares_admin_bearer_and_per_status_error_examples(served: Served) -> None:
    schema = (await served.client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    admin = schema["paths"]["/admin/reload"]["post"]
    (requirement,) = admin["security"]
    (name,) = requirement
    assert schemes[name] == {"type": "http", "scheme": "bearer", "description": schemes[name]["description"]}
    assert "LUNGSERVE_ADMIN_TOKEN" in schemes[name]["description"]
    # Without API keys configured, prediction routes declare no security.
    assert "security" not in schema["paths"]["/predict"]["post"]

    responses = schema["paths"]["/predict-many"]["post"]["responses"]
    codes_by_status: dict[str, set[str]] = {}
    for status in ("400", "413", "415", "422", "503", "504"):
        examples = responses[status]["content"]["application/json"]["examples"]
        codes_by_status[status] = {e["value"]["error"]["code"] for e in examples.values()}
    assert codes_by_status["400"] == {"bad_request"}
    assert codes_by_status["413"] == {"image_too_large", "too_many_files", "request_too_large"}
    assert codes_by_status["415"] == {"unsupported_media_type"}
    assert codes_by_status["422"] == {"missing_field", "invalid_image"}
    assert codes_by_status["503"] == {"overloaded", "model_not_ready", "shutting_down"}
    assert codes_by_status["504"] == {"deadline_exceeded"}
    admin_codes = {
        status: {e["value"]["error"]["code"] for e in r["content"]["application/json"]["examples"].values()}
        for status, r in admin["responses"].items()
        if status != "200"
    }
    assert admin_codes == {
        "401": {"unauthorized"},
        "429": {"too_many_requests"},
        "404": {"not_found"},
        "409": {"model_rejected"},
        "503": {"model_not_ready", "shutting_down"},
    }


async def test_docs_hits_count_under_their_own_routes(served: Served) -> None:
    for path in ("/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui/swagger-ui.css"):
        assert (await served.client.get(path)).status_code == 200
    text = (await served.client.get("/metrics")).text
    routes = {
        sample.labels["route"]
        for family in text_string_to_metric_families(text)
        if family.name == "lungserve_requests"
        for sample in family.samples
        if sample.name == "lungserve_requests_total"
    }
    assert {"/docs", "/redoc", "/openapi.json", "/docs-assets/{asset:path}"} <= routes
    assert "unmatched" not in routes
