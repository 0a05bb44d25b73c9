"""Shared fixtures: paths to the real data beside the project, and the bundled model."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the clone; LUNGSERVE_SHARED_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("LUNGSERVE_SHARED_DATA", ROOT.parent / "shared" / "data"))
LC25000 = SHARED_DATA / "lc25000-lung"
LC25000_768 = SHARED_DATA / "lc25000-lung-768"
BUNDLED_MODEL = ROOT / "service" / "bundled_model"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def no_lungserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's LUNGSERVE_* variables must not change what the tests see."""
    for name in list(os.environ):
        if name.startswith("LUNGSERVE_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def lc25000() -> Path:
    if not (LC25000 / "groups.csv").exists():
        pytest.skip(f"real data not found at {LC25000}")
    return LC25000


@pytest.fixture(scope="session")
def lc25000_768() -> Path:
    if not LC25000_768.is_dir():
        pytest.skip(f"real data not found at {LC25000_768}")
    return LC25000_768


def lc25000_tiles(lc25000: Path, per_class: int) -> list[Path]:
    """The first `per_class` tiles of each class (by name), one class after another."""
    return [p for c in ("lung_aca", "lung_n", "lung_scc") for p in sorted((lc25000 / c).glob("*.jpeg"))[:per_class]]


@pytest.fixture(scope="session")
def real_images(lc25000: Path) -> list[Path]:
    """A few real 224 px tiles, one class after another."""
    return lc25000_tiles(lc25000, per_class=1)


def _server_side(record: logging.LogRecord) -> bool:
    # The test's own HTTP client logs the URLs it requests; a server never runs it.
    return not record.name.startswith(("httpx", "httpcore", "asyncio"))


@pytest.fixture
def server_log() -> Iterator[io.StringIO]:
    """Every server-side log record, as `lungserve serve` writes it (JSON lines)."""
    from service.observability.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_server_side)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
