"""A catalogue of malformed and hostile requests against a real `lungserve serve` (issue 10).

Each case is sent over a raw socket (so broken framing can be sent at all) and gets its
expected status and error code; an error on a body the server did not read must close the
connection (row 12). After the catalogue the server is still ready, still classifies, and its
RSS has grown by less than `RSS_GROWTH_BOUND_MIB` over its level before the catalogue.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs; only memory_info()
import pytest
from PIL import Image

from tests.e2e import rawhttp
from tests.e2e.rawhttp import Multipart, RawResponse, exchange, request
from tests.e2e.server import Server, start_server, wait_ready
from tests.images import encode, jpeg_with_declared_size, noise, png_header_only

pytestmark = [pytest.mark.e2e]

# What the catalogue may add to the server's resident memory: decode buffers of the largest
# images it sends (3000 x 3000 PNGs, 27 MB RGB each, one large decode at a time), allocator slack.
RSS_GROWTH_BOUND_MIB = 150

SETTINGS = {
    "LUNGSERVE_MAX_FILE_BYTES": str(2 * 1024 * 1024),
    "LUNGSERVE_MAX_REQUEST_BYTES": str(8 * 1024 * 1024),
    "LUNGSERVE_MAX_FILES_PER_REQUEST": "8",
    "LUNGSERVE_QUEUE_LIMIT": "32",
    "LUNGSERVE_MAX_BATCH_SIZE": "8",
    "LUNGSERVE_MAX_IMAGE_PIXELS": "20000000",
    "LUNGSERVE_MAX_REQUEST_PIXELS": "20000000",
    "LUNGSERVE_HEADER_TIMEOUT_S": "1",
    "LUNGSERVE_MAX_HEADER_BYTES": "16384",
    "LUNGSERVE_MIN_UPLOAD_RATE_BYTES_S": "20000",
    "LUNGSERVE_UPLOAD_RATE_GRACE_S": "1",
    "LUNGSERVE_ADMIN_TOKEN": "catalogue-secret",
    "LUNGSERVE_SHUTDOWN_DELAY_S": "0",
    "LUNGSERVE_LOG_LEVEL": "WARNING",
}


# --- payloads ---------------------------------------------------------------------------------


JPEG = encode(noise(), "JPEG", quality=90)


def animated_gif(frames: int) -> bytes:
    images = [Image.new("P", (32, 32), i % 256) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:])
    return buf.getvalue()


def big_flat_png(side: int) -> bytes:
    # Compresses to a few kB, decodes to side^2 x 3 bytes: the pixels cost, not the bytes.
    return encode(Image.new("RGB", (side, side), (180, 120, 200)), "PNG")


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"


def predict(data: bytes, filename: str = "x.jpeg", ctype: str = "image/jpeg") -> bytes:
    form = Multipart().add("file", data, filename, ctype)
    return request("POST", "/predict", form.body(), [("Content-Type", form.content_type)])


def predict_many(*files: bytes) -> bytes:
    form = Multipart()
    for i, data in enumerate(files):
        form.add("files", data, f"f{i}.img")
    return request("POST", "/predict-many", form.body(), [("Content-Type", form.content_type)])


def raw_multipart(path: str, body: bytes, boundary: str = "BOUND") -> bytes:
    return request("POST", path, body, [("Content-Type", f"multipart/form-data; boundary={boundary}")])


def declared_only(path: str, length: int, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """Headers declaring `length` bytes and no body at all: only an early answer can come."""
    headers = [("Content-Type", "multipart/form-data; boundary=B"), ("Content-Length", str(length)), *extra]
    return request("POST", path, b"", headers)


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[], bytes]
    status: int
    code: str | None
    closes: bool = False  # an answer before the body was read must close the connection
    check: Callable[[RawResponse], None] | None = None


def _quotes_our_pixel_limit(r: RawResponse) -> None:
    assert "LUNGSERVE_MAX_IMAGE_PIXELS" in r.json()["error"]["message"]


def _many_results(*codes: str | None) -> Callable[[RawResponse], None]:
    def check(r: RawResponse) -> None:
        got = [x.get("error", {}).get("code") for x in r.json()["results"]]
        assert got == list(codes), got

    return check


def _classified(r: RawResponse) -> None:
    assert r.json()["label"] in ("lung_aca", "lung_n", "lung_scc")


CASES = [
    # Formats outside the allow-list (row 3, 4) and garbage.
    Case("gif", lambda: predict(encode(noise(64), "GIF"), "a.gif", "image/gif"), 422, "invalid_image"),
    Case("gif-2000-frames", lambda: predict(animated_gif(2000), "a.gif", "image/gif"), 422, "invalid_image"),
    Case("webp", lambda: predict(encode(noise(64), "WEBP"), "a.webp", "image/webp"), 422, "invalid_image"),
    Case("ico", lambda: predict(encode(noise(64), "ICO")), 422, "invalid_image"),
    Case("pcx", lambda: predict(encode(noise(64), "PCX")), 422, "invalid_image"),
    Case("ppm", lambda: predict(encode(noise(64), "PPM")), 422, "invalid_image"),
    Case("tga", lambda: predict(encode(noise(64), "TGA")), 422, "invalid_image"),
    Case("eps", lambda: predict(EPS, "a.eps", "application/postscript"), 422, "invalid_image"),
    Case("pdf", lambda: predict(b"%PDF-1.7\n1 0 obj<<>>endobj\n%%EOF\n", "a.pdf"), 422, "invalid_image"),
    Case("svg", lambda: predict(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "a.svg"), 422, "invalid_image"),
    Case("html", lambda: predict(b"<html><script>alert(1)</script></html>", "a.html"), 422, "invalid_image"),
    Case("zeros", lambda: predict(bytes(4096)), 422, "invalid_image"),
    Case("empty-file", lambda: predict(b""), 422, "invalid_image"),
    # Truncated and corrupt data is never classified (rows 1, 2).
    Case("jpeg-header-4000x4000", lambda: predict(jpeg_with_declared_size(JPEG, 4000, 4000)), 422, "invalid_image"),
    Case("jpeg-cut-plus-eoi", lambda: predict(JPEG[: len(JPEG) // 3] + b"\xff\xd9"), 422, "invalid_image"),
    Case("jpeg-cut", lambda: predict(JPEG[: len(JPEG) // 2]), 422, "invalid_image"),
    Case("jpeg-header-only", lambda: predict(JPEG[:400]), 422, "invalid_image"),
    Case("png-cut", lambda: predict(encode(noise(200), "PNG")[:5000]), 422, "invalid_image"),
    Case("bmp-cut", lambda: predict(encode(noise(100), "BMP")[:3000]), 422, "invalid_image"),
    Case("tiff-bad-ifd", lambda: predict(b"II*\x00\xff\xff\xff\x7f" + bytes(64)), 422, "invalid_image"),
    # Pixel bombs: refused from the header, quoting our setting.
    Case(
        "png-20000x20000",
        lambda: predict(png_header_only(20_000, 20_000)),
        413,
        "image_too_large",
        check=_quotes_our_pixel_limit,
    ),
    Case(
        "png-6000x4000",
        lambda: predict(png_header_only(6000, 4000)),
        413,
        "image_too_large",
        check=_quotes_our_pixel_limit,
    ),
    # Row 8: the request's decode budget (20 Mpx here) admits two 3000^2 PNGs of four; a tile still goes.
    Case(
        "many-3000px-pngs-over-request-budget",
        lambda: predict_many(big_flat_png(3000), big_flat_png(3000), big_flat_png(3000), JPEG),
        200,
        None,
        check=_many_results(None, None, "image_too_large", None),
    ),
    # Multipart and body limits.
    Case("no-content-type", lambda: request("POST", "/predict", b"hello"), 415, "unsupported_media_type", True),
    Case(
        "json-body",
        lambda: request("POST", "/predict", b"{}", [("Content-Type", "application/json")]),
        415,
        "unsupported_media_type",
        True,
    ),
    Case(
        "multipart-mixed",
        lambda: request("POST", "/predict", b"--B--\r\n", [("Content-Type", "multipart/mixed; boundary=B")]),
        415,
        "unsupported_media_type",
        True,
    ),
    Case(
        "no-boundary",
        lambda: request("POST", "/predict", b"--B--\r\n", [("Content-Type", "multipart/form-data")]),
        400,
        "bad_request",
        True,
    ),
    Case("empty-multipart", lambda: raw_multipart("/predict", b""), 400, "bad_request"),
    Case(
        "no-closing-boundary",
        lambda: request(
            "POST",
            "/predict",
            Multipart("B").add("file", JPEG).body(close=False),
            [("Content-Type", "multipart/form-data; boundary=B")],
        ),
        400,
        "bad_request",
    ),
    Case("garbage-multipart", lambda: raw_multipart("/predict", b"\x00\x01garbage" * 100), 400, "bad_request"),
    Case(
        "part-without-name",
        lambda: raw_multipart("/predict", Multipart("BOUND").add(None, JPEG).body()),
        400,
        "bad_request",
    ),
    Case(
        "wrong-field",
        lambda: raw_multipart("/predict", Multipart("BOUND").add("image", JPEG).body()),
        422,
        "missing_field",
    ),
    Case(
        "two-files-to-predict",
        lambda: raw_multipart("/predict", Multipart("BOUND").add("file", JPEG).add("file", JPEG).body()),
        413,
        "too_many_files",
    ),
    Case("nine-files-to-predict-many", lambda: predict_many(*[JPEG] * 9), 413, "too_many_files"),
    Case("file-over-max-bytes", lambda: predict(JPEG + bytes(3 * 1024 * 1024)), 413, "image_too_large", True),
    Case(
        "declared-body-over-limit",
        lambda: declared_only("/predict-many", 100 * 1024 * 1024),
        413,
        "request_too_large",
        True,
    ),
    Case("declared-file-over-limit", lambda: declared_only("/predict", 50 * 1024 * 1024), 413, "image_too_large", True),
    Case(
        "expect-100-over-limit",
        lambda: declared_only("/predict", 50 * 1024 * 1024, (("Expect", "100-continue"),)),
        413,
        "image_too_large",
        True,
    ),
    Case(
        "preamble-accepted",
        lambda: raw_multipart("/predict", Multipart("BOUND").add("file", JPEG).body(preamble=b"MIME preamble\r\n")),
        200,
        None,
        check=_classified,
    ),
    Case(
        "many-one-bad-one-good",
        lambda: predict_many(JPEG, b"not an image"),
        200,
        None,
        check=_many_results(None, "invalid_image"),
    ),
    Case("unicode-filename", lambda: predict(JPEG, "т€st ☃.jpeg"), 200, None, check=_classified),
    Case("long-filename", lambda: predict(JPEG, "a" * 1000 + ".jpeg"), 200, None, check=_classified),
    Case("part-header-over-python-multipart-limit", lambda: predict(JPEG, "a" * 10_000 + ".jpeg"), 400, "bad_request"),
    # Routes, methods.
    Case("unknown-route", lambda: request("GET", "/etc/passwd"), 404, "not_found"),
    Case("path-traversal", lambda: request("GET", "/../../etc/passwd"), 404, "not_found"),
    Case("get-predict", lambda: request("GET", "/predict"), 405, "method_not_allowed"),
    Case("admin-no-token", lambda: request("POST", "/admin/reload"), 401, "unauthorized"),
    Case(
        "admin-wrong-token",
        lambda: request("POST", "/admin/reload", headers=[("Authorization", "Bearer nope")]),
        401,
        "unauthorized",
    ),
    # Broken HTTP framing: answered by the protocol layer, still our JSON, connection closed.
    Case("negative-content-length", lambda: declared_only("/predict", -5), 400, "bad_request", True),
    Case(
        "non-numeric-content-length",
        lambda: b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
        400,
        "bad_request",
        True,
    ),
    Case(
        "content-length-and-chunked",
        lambda: (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        400,
        "bad_request",
        True,
    ),
    Case(
        "bad-chunk-size",
        lambda: (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=B\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        ),
        400,
        "bad_request",
        True,
    ),
    Case(
        "garbage-request-line",
        lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n",
        400,
        "bad_request",
        True,
    ),
    Case(
        "nul-in-header",
        lambda: b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        400,
        "bad_request",
        True,
    ),
    Case(
        "header-too-large",
        lambda: request("GET", "/health/live", headers=[("X-Big", "a" * 200_000)]),
        431,
        "headers_too_large",
        True,
    ),
    Case(
        "many-headers",
        lambda: request("GET", "/health/live", headers=[(f"X-{i}", "v" * 40) for i in range(2000)]),
        431,
        "headers_too_large",
        True,
    ),
    Case("http-1.0-health", lambda: b"GET /health/live HTTP/1.0\r\n\r\n", 200, None),
    Case(
        "bad-request-id-replaced",
        lambda: request("GET", "/health/live", headers=[("X-Request-ID", "<script>")]),
        200,
        None,
        check=lambda r: _assert(r.headers.get("x-request-id") != "<script>"),
    ),
]


def _assert(condition: bool) -> None:
    assert condition


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    import asyncio

    with start_server(tmp_path_factory.mktemp("hostile"), **SETTINGS) as running:
        asyncio.run(wait_ready(running))
        yield running


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def rss_before(server: Server) -> int:
    # After one classification, so the model's first-run allocations are in the baseline.
    exchange(port_of(server), predict(JPEG))
    return int(psutil.Process(server.proc.pid).memory_info().rss)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_catalogue(server: Server, rss_before: int, case: Case) -> None:
    response = exchange(port_of(server), case.send())
    assert (response.status, response.code) == (case.status, case.code), response.body[:500]
    if case.status >= 400:
        assert response.headers.get("content-type", "").startswith("application/json")
    if case.closes:
        assert response.closed, response.headers
    if case.check is not None:
        case.check(response)


def test_header_timeout_408(server: Server) -> None:
    # Row 6: headers trickling (here: stopping) are cut off by the header timeout.
    with rawhttp.connect(port_of(server)) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        response = rawhttp.read_response(sock)
    assert (response.status, response.code, response.closed) == (408, "header_timeout", True)


def test_slow_body_408_and_the_slot_is_free(server: Server) -> None:
    # Row 5: a body below the minimum rate gets 408 (after the grace period); others are served meanwhile.
    form = Multipart().add("file", JPEG)
    body = form.body()
    head = request("POST", "/predict", b"", [("Content-Type", form.content_type), ("Content-Length", str(len(body)))])
    with rawhttp.connect(port_of(server)) as sock:
        sock.sendall(head + body[:100])
        assert exchange(port_of(server), predict(JPEG)).status == 200  # not blocked by the trickle
        response = rawhttp.read_response(sock)
    assert (response.status, response.code, response.closed) == (408, "upload_too_slow", True)


def test_idle_connection_without_a_request_is_closed(server: Server) -> None:
    with rawhttp.connect(port_of(server)) as sock:
        response = rawhttp.read_response(sock)
    assert (response.status, response.code) == (408, "header_timeout")


def test_admin_401s_are_rate_limited(server: Server) -> None:
    statuses = [exchange(port_of(server), request("POST", "/admin/reload")).status for _ in range(30)]
    assert statuses[0] == 401
    assert 429 in statuses


def test_after_the_catalogue_the_server_is_ready_classifies_and_memory_is_bounded(
    server: Server, rss_before: int
) -> None:
    assert server.proc.poll() is None
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health/ready").status_code == 200
        r = client.post("/predict", files={"file": ("t.jpeg", JPEG, "image/jpeg")})
        assert r.status_code == 200, r.text
    rss_after = psutil.Process(server.proc.pid).memory_info().rss
    grown_mib = (rss_after - rss_before) / 2**20
    assert grown_mib < RSS_GROWTH_BOUND_MIB, f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"


def test_catalogue_size() -> None:
    assert len(CASES) >= 40
