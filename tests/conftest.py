"""Shared fixtures: paths to the real data beside the project, and the bundled model."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def real_images(lc25000: Path) -> list[Path]:
    """A few real 224 px tiles, one class after another."""
    return [next(iter(sorted((lc25000 / c).glob("*.jpeg")))) for c in ("lung_aca", "lung_n", "lung_scc")]
