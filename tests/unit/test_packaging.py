"""Which Pythons lungserve supports, said once and agreed everywhere: requires-python, the
classifiers and the Makefile's SUPPORTED; the locks cover them with no download address; the
Makefile refuses an unsupported interpreter by name; the matrix finds interpreters by running them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from tests.conftest import ROOT
from tools import lock, matrix

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CURRENT = f"{sys.version_info.major}.{sys.version_info.minor}"


def makefile_supported() -> list[str]:
    match = re.search(r"^SUPPORTED := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "the Makefile names SUPPORTED"
    return match.group(1).split()


def test_supported_versions_agree_in_pyproject_classifiers_and_makefile() -> None:
    supported = makefile_supported()
    classifiers = PYPROJECT["project"]["classifiers"]
    prefix = "Programming Language :: Python :: "
    assert [c.removeprefix(prefix) for c in classifiers if re.fullmatch(re.escape(prefix) + r"3\.\d+", c)] == supported
    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert [f"3.{minor}" for minor in range(6, 20) if f"3.{minor}.0" in spec] == supported
    assert CURRENT in supported


@pytest.mark.parametrize("name", [lk.name for lk in lock.LOCKS])
def test_locks_are_universal_hashed_and_name_no_address(name: str) -> None:
    text = (ROOT / "requirements" / f"{name}.txt").read_text()
    header = text.splitlines()[1]
    assert "--universal" in header
    assert "--generate-hashes" in header
    assert f"--python-version {makefile_supported()[0]}" in header  # resolved from the oldest supported
    assert not [word for word in lock.FORBIDDEN if word in text]
    pins = re.findall(r"^([A-Za-z0-9._-]+)==\S+(?: ;[^\\]*)? \\\n    --hash=sha256:", text, re.MULTILINE)
    assert len(pins) == len(re.findall(r"^[A-Za-z0-9._-]+==", text, re.MULTILINE)), "every pin has its hashes"


def test_serving_locks_never_hold_tensorflow_nor_both_onnxruntimes() -> None:
    for name in ("serve", "gpu", "test"):
        text = (ROOT / "requirements" / f"{name}.txt").read_text()
        assert not re.search(r"^(tensorflow|tf2onnx|keras)", text, re.MULTILINE), name
        assert not (re.search(r"^onnxruntime==", text, re.M) and re.search(r"^onnxruntime-gpu==", text, re.M))


def test_makefile_refuses_an_unsupported_python_by_name(tmp_path: Path) -> None:
    make = shutil.which("make")
    assert make, "make is what the README's commands run"
    fake = tmp_path / "python3.10"
    # Answers the version probe as 3.10 would and fails the supported check; it must never be run
    # for anything else (a venv would be created otherwise).
    fake.write_text('#!/bin/sh\ncase "$2" in *print*version_info*) echo 3.10 ;; *) exit 1 ;; esac\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    argv = [make, "--no-print-directory", "serve", f"PYTHON={fake}", f"VENV={venv}"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert f"lungserve supports CPython {' '.join(makefile_supported())}; {fake} is 3.10" in done.stderr
    assert not venv.exists()


def test_makefile_uses_the_python_it_is_given() -> None:
    make = shutil.which("make")
    assert make
    argv = [make, "--no-print-directory", "help", f"PYTHON={sys.executable}"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert f"(Python: {sys.executable}, {CURRENT};" in done.stdout


def test_matrix_accepts_only_an_interpreter_that_runs_as_the_asked_version(tmp_path: Path) -> None:
    found = matrix.find(CURRENT)
    assert found is not None
    assert found.version == CURRENT
    assert matrix._probe(sys.executable, CURRENT) is not None
    assert matrix._probe(sys.executable, "3.99") is None
    shim = tmp_path / "python3.99"  # like a pyenv shim of an inactive version: on PATH, fails to run
    shim.write_text("#!/bin/sh\necho 'pyenv: python3.99: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    assert matrix._probe(shim, "3.99") is None
