"""Hostile inputs, round 2 (issue 22), each against a real `lungserve serve`.

Files that cost far more than they claim (progressive-JPEG scan bombs), files that claim far
more than they are (a 146-byte tiled TIFF of 4e6 x 4e6 px), truncated progressive JPEGs, deep
JSON, a full spool disk, forwarded headers from an untrusted peer, and the security headers
of the page and the docs. After them the server is ready, classifies, and its memory is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs; only memory_info()
import pytest

from tests.e2e.rawhttp import Multipart, RawResponse, exchange, request
from tests.e2e.server import Server, start_server, wait_ready
from tests.hostile_files import (
    cut_after_scans,
    cut_at,
    nested_json,
    progressive,
    scan_bomb,
    scan_starts,
    tiled_tiff_claiming,
)
from tests.images import encode, noise

pytestmark = [pytest.mark.e2e]

# Decode buffers of the largest images sent (a 7000 x 7000 progressive JPEG is refused before
# its coefficients are allocated), allocator slack.
RSS_GROWTH_BOUND_MIB = 150

SETTINGS = {
    "LUNGSERVE_MAX_FILE_BYTES": str(8 * 1024 * 1024),
    "LUNGSERVE_MAX_REQUEST_BYTES": str(16 * 1024 * 1024),
    "LUNGSERVE_MAX_BODY_BYTES_IN_FLIGHT": str(64 * 1024 * 1024),
    "LUNGSERVE_MAX_SLIDE_BYTES": str(16 * 1024 * 1024),
    "LUNGSERVE_MAX_FILES_PER_REQUEST": "8",
    "LUNGSERVE_QUEUE_LIMIT": "64",
    "LUNGSERVE_MAX_BATCH_SIZE": "8",
    "LUNGSERVE_ADMIN_TOKEN": "round-two-secret",
    "LUNGSERVE_ADMIN_AUTH_FAILURES_PER_MINUTE": "5",
    "LUNGSERVE_SHUTDOWN_DELAY_S": "0",
    "LUNGSERVE_PROVIDER": "cpu",
    "LUNGSERVE_LOG_LEVEL": "WARNING",
}

TILE = noise(224)
JPEG = encode(TILE, "JPEG", quality=90)
PROGRESSIVE = progressive(noise(448, seed=3))
# A plain image /analyze tiles (2 x 2 tiles of 768 px): large enough that a cut leaves rows missing.
LARGE = noise(1536, seed=5)


def port_of(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def upload(path: str, data: bytes, *, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    form = Multipart().add("file", data, "x.img")
    return request("POST", path, form.body(), [("Content-Type", form.content_type), *headers])


def send(server: Server, data: bytes, timeout: float = 60.0) -> RawResponse:
    return exchange(port_of(server), data, timeout)


def assert_error(response: RawResponse, status: int, code: str) -> None:
    assert (response.status, response.code) == (status, code), response.body[:500]
    assert response.headers.get("content-type", "").startswith("application/json")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start_server(tmp_path_factory.mktemp("hostile2"), **SETTINGS) as running:
        asyncio.run(wait_ready(running))
        yield running


@pytest.fixture(scope="module")
def rss_before(server: Server) -> int:
    # After a classification and an /analyze, so first-run allocations are in the baseline.
    assert send(server, upload("/predict", JPEG)).status == 200
    assert send(server, upload("/analyze", encode(LARGE, "JPEG", quality=90))).status == 200
    return int(psutil.Process(server.proc.pid).memory_info().rss)


# --- 1. progressive-JPEG scan bombs -----------------------------------------------------------


@pytest.fixture(scope="module")
def bomb() -> bytes:
    # Grey 7000 x 7000, thousands of scans: each scan walks all 766,000 blocks of the image.
    data = scan_bomb(7000, 3000)
    assert len(scan_starts(data)) > 3000
    return data


@pytest.mark.parametrize("path", ["/predict", "/explain", "/analyze"])
def test_a_progressive_scan_bomb_is_refused_from_its_markers(
    server: Server, rss_before: int, bomb: bytes, path: str
) -> None:
    response = send(server, upload(path, bomb))
    assert_error(response, 413, "image_too_large")
    assert "scans" in response.json()["error"]["message"]


def test_scan_bombs_in_parallel_leave_predict_answering(server: Server, rss_before: int, bomb: bytes) -> None:
    # Four bombs and four tiles at once: every bomb refused, every tile classified.
    with ThreadPoolExecutor(8) as pool:
        bombs = [pool.submit(send, server, upload("/predict", bomb)) for _ in range(4)]
        tiles = [pool.submit(send, server, upload("/predict", JPEG)) for _ in range(4)]
        assert [f.result().status for f in bombs] == [413] * 4
        assert [f.result().status for f in tiles] == [200] * 4


def test_an_ordinary_progressive_jpeg_is_classified(server: Server, rss_before: int) -> None:
    assert 5 <= len(scan_starts(PROGRESSIVE)) <= 20
    assert send(server, upload("/predict", PROGRESSIVE)).status == 200


# --- 2. sizes a file claims -------------------------------------------------------------------


@pytest.mark.parametrize("side", [4_000_000, 1_000_000, 100_000])
def test_a_tiny_tiff_claiming_a_huge_size_gets_413_at_once(server: Server, rss_before: int, side: int) -> None:
    data = tiled_tiff_claiming(side, side)
    assert len(data) < 200
    response = send(server, upload("/analyze", data), timeout=20.0)
    assert response.status == 413, response.body[:500]
    assert response.code in ("too_many_tiles", "image_too_large")
    with httpx.Client(base_url=server.url, timeout=5) as client:
        assert client.get("/health/live").status_code == 200


def test_a_tiff_claiming_one_huge_tile_is_refused_before_reading_it(server: Server, rss_before: int) -> None:
    # 4 x 4 tiles of the model's scale (admitted), but one TIFF tile of 3008^2 px that a reader
    # would allocate whole: the tile size is a claim too.
    data = tiled_tiff_claiming(3000, 3000)
    response = send(server, upload("/analyze", data))
    assert response.status in (413, 422), response.body[:500]


def test_a_tiff_with_no_pixel_data_gets_422(server: Server, rss_before: int) -> None:
    # A modest claim with tiles that are not there: the reader's error is the client's 422, not a 500.
    data = tiled_tiff_claiming(1500, 1500, tile=256)
    response = send(server, upload("/analyze", data))
    assert response.status in (413, 422), response.body[:500]


def _zlib_tiled_tiff(side: int, tile: int) -> tuple[bytes, list[int]]:
    """A tiled, zlib-compressed RGB TIFF (as OpenSlide reads it: generic-tiff) and where each
    tile's compressed bytes start."""
    import io

    import numpy as np
    import tifffile

    buffer = io.BytesIO()
    pixels = np.random.default_rng(7).integers(0, 255, (side, side, 3), np.uint8)
    tifffile.imwrite(buffer, pixels, tile=(tile, tile), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(io.BytesIO(buffer.getvalue())) as tif:
        offsets = [int(o) for o in tif.pages[0].dataoffsets]
    return buffer.getvalue(), offsets


def test_corrupt_tiles_among_good_ones_never_take_the_server_down(server: Server, rss_before: int) -> None:
    """Some tiles fail to decode while pool threads still read others. The request ends with a
    422 while those reads run, and its slide is closed: OpenSlide aborted the whole process
    then (an assertion in its TIFF cache), seen within 250 fuzzed uploads."""
    data, offsets = _zlib_tiled_tiff(1024, 256)
    for k in range(12):
        corrupt = bytearray(data)
        for offset in offsets[k % 4 :: 3]:  # every third tile's zlib stream, from a different start
            corrupt[offset + 2 : offset + 10] = bytes(8)
        response = send(server, upload("/analyze", bytes(corrupt)))
        assert response.status in (200, 422), response.body[:500]
    assert server.proc.poll() is None
    assert send(server, upload("/predict", JPEG)).status == 200


# --- 3 and 6. truncated progressive JPEGs, one validity path for /predict and /analyze ---------


def _truncations(data: bytes) -> dict[str, bytes]:
    scans = len(scan_starts(data))
    return {
        "after-first-scan": cut_after_scans(data, 1),
        "before-last-scan": cut_after_scans(data, scans - 1),
        "at-half": cut_at(data, 0.5),
        "in-last-scan": cut_at(data, 0.97),
    }


@pytest.mark.parametrize("cut", ["after-first-scan", "before-last-scan", "at-half", "in-last-scan"])
@pytest.mark.parametrize("path", ["/predict", "/analyze"])
def test_a_truncated_progressive_jpeg_is_invalid(server: Server, rss_before: int, cut: str, path: str) -> None:
    source = PROGRESSIVE if path == "/predict" else progressive(LARGE)
    response = send(server, upload(path, _truncations(source)[cut]))
    assert_error(response, 422, "invalid_image")


@pytest.mark.parametrize("fraction", [0.33, 0.9])
def test_analyze_refuses_a_grey_filled_baseline_jpeg_like_predict(
    server: Server, rss_before: int, fraction: float
) -> None:
    data = encode(LARGE, "JPEG", quality=90)
    cut = data[: int(len(data) * fraction)] + b"\xff\xd9"
    assert_error(send(server, upload("/predict", cut)), 422, "invalid_image")
    assert_error(send(server, upload("/analyze", cut)), 422, "invalid_image")


def test_analyze_classifies_a_whole_progressive_jpeg(server: Server, rss_before: int) -> None:
    response = send(server, upload("/analyze", progressive(LARGE)))
    assert response.status == 200, response.body[:500]
    assert response.json()["summary"]["tiles"] == 4


# --- 4. deep JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [100_000, 5_000, 200])
def test_deep_json_to_oip_is_a_400(server: Server, rss_before: int, depth: int) -> None:
    body = nested_json(depth)
    response = send(
        server,
        request("POST", "/v2/models/lungserve-lung-cnn/infer", body, [("Content-Type", "application/json")]),
    )
    assert response.status == 400, response.body[:500]
    assert "error" in response.json()


def test_deep_tensor_data_to_oip_is_a_400(server: Server, rss_before: int) -> None:
    data = b"[" * 50 + b"1" + b"]" * 50
    body = b'{"inputs":[{"name":"pixels","datatype":"UINT8","shape":[1,128,128,3],"data":' + data + b"}]}"
    response = send(
        server,
        request("POST", "/v2/models/lungserve-lung-cnn/infer", body, [("Content-Type", "application/json")]),
    )
    assert response.status == 400, response.body[:500]


# --- many tiny multipart parts ------------------------------------------------------------------


def test_many_tiny_multipart_parts_are_refused_early(server: Server, rss_before: int) -> None:
    form = Multipart()
    for _ in range(20_000):
        form.add("note", b"", None, "text/plain")
    form.add("files", JPEG)
    response = send(server, request("POST", "/predict-many", form.body(), [("Content-Type", form.content_type)]))
    assert_error(response, 413, "too_many_files")
    assert "parts" in response.json()["error"]["message"]


# --- 7. forwarded headers ---------------------------------------------------------------------


def test_rotating_x_forwarded_for_does_not_reset_the_admin_rate_limit(server: Server, rss_before: int) -> None:
    statuses = [
        send(
            server,
            request("POST", "/admin/reload", headers=[("X-Forwarded-For", f"10.9.{i // 256}.{i % 256}")]),
        ).status
        for i in range(12)
    ]
    assert statuses[0] == 401
    assert statuses[-1] == 429, statuses


def test_forwarded_headers_are_trusted_from_the_addresses_the_operator_names(tmp_path: Path) -> None:
    env = {**SETTINGS, "LUNGSERVE_FORWARDED_ALLOW_IPS": "127.0.0.1"}
    with start_server(tmp_path, **env) as running:
        asyncio.run(wait_ready(running))
        # From a trusted proxy each forwarded address is its own client: none reaches the limit.
        statuses = [
            send(running, request("POST", "/admin/reload", headers=[("X-Forwarded-For", f"10.8.0.{i}")])).status
            for i in range(12)
        ]
    assert statuses == [401] * 12


# --- 8. security headers ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/docs", "/redoc", "/openapi.json", "/page/page.js", "/health/live", "/nope"])
def test_security_headers(server: Server, rss_before: int, path: str) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        response = client.get(path)
    headers = response.headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "no-referrer"


def test_the_protocol_layers_own_answers_say_nosniff(server: Server, rss_before: int) -> None:
    response = send(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n")
    assert_error(response, 400, "bad_request")
    assert response.headers["x-content-type-options"] == "nosniff"


# --- after all of it ---------------------------------------------------------------------------


def test_after_round_two_the_server_is_ready_classifies_and_memory_is_bounded(server: Server, rss_before: int) -> None:
    assert server.proc.poll() is None
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/health/ready").status_code == 200
        r = client.post("/predict", files={"file": ("t.jpeg", JPEG, "image/jpeg")})
        assert r.status_code == 200, r.text
    rss_after = psutil.Process(server.proc.pid).memory_info().rss
    grown_mib = (rss_after - rss_before) / 2**20
    assert grown_mib < RSS_GROWTH_BOUND_MIB, f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"


# --- 5. a full spool disk ---------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of 256 inodes (needs root, as the project's test machines run): a disk that fills up."""
    mount = tmp_path / "spool"
    mount.mkdir()
    # In CI (root, as the project's machines run) a missing mount is a failure, never a silent skip.
    unavailable = pytest.fail if os.environ.get("CI") else pytest.skip
    if os.geteuid() != 0:
        unavailable("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=256", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_spool_disk_is_a_507_and_the_server_keeps_going(tmp_path: Path, small_tmpfs: Path) -> None:
    env = {**SETTINGS, "TMPDIR": str(small_tmpfs)}
    with start_server(tmp_path, **env) as running:
        asyncio.run(wait_ready(running))
        big = JPEG + os.urandom(10 * 1024 * 1024)  # > the 8 MiB disk
        response = send(running, upload("/analyze", big))
        assert_error(response, 507, "insufficient_storage")
        # The partial spool file and its folder were removed.
        assert [p.name for p in small_tmpfs.iterdir() if p.name.startswith("lungserve-analyze-")] == []
        # Chunked (no declared length): the disk fills while the body is written, the same 507.
        form = Multipart().add("file", big, "x.img")
        body = form.body()
        chunked = b"".join(
            b"%x\r\n%s\r\n" % (len(c), c) for c in (body[i : i + 65536] for i in range(0, len(body), 65536))
        )
        head = [("Content-Type", form.content_type), ("Transfer-Encoding", "chunked")]
        response = send(running, request("POST", "/analyze", chunked + b"0\r\n\r\n", head, content_length=False))
        assert_error(response, 507, "insufficient_storage")
        assert [p.name for p in small_tmpfs.iterdir() if p.name.startswith("lungserve-analyze-")] == []
        # The disk is free again: an /analyze that fits, and /predict, still work.
        assert send(running, upload("/analyze", encode(LARGE, "JPEG", quality=90))).status == 200
        assert send(running, upload("/predict", JPEG)).status == 200


def test_a_spool_disk_filled_by_others_is_a_507(tmp_path: Path, small_tmpfs: Path) -> None:
    env = {**SETTINGS, "TMPDIR": str(small_tmpfs)}
    with start_server(tmp_path, **env) as running:
        asyncio.run(wait_ready(running))
        # The first spool picks TMPDIR (Python's tempfile checks it is writable, once).
        assert send(running, upload("/analyze", JPEG)).status == 200
        with contextlib.suppress(OSError), (small_tmpfs / "filler").open("wb") as f:  # every block
            while True:
                f.write(bytes(65536))
        assert_error(send(running, upload("/analyze", JPEG)), 507, "insufficient_storage")
        with contextlib.suppress(OSError):  # and every inode: the spool folder cannot be made
            for i in range(1000):
                (small_tmpfs / f"i{i}").touch()
        assert_error(send(running, upload("/analyze", JPEG)), 507, "insufficient_storage")
        assert send(running, upload("/predict", JPEG)).status == 200
