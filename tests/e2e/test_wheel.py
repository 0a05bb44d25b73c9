"""The wheel a user installs (README, "Only the server"): built the way `make wheel` builds it
(python -m build --no-isolation: the sdist, then the wheel from it), it carries every file under
service/ and export/, adds exactly the import names the README documents, and, installed into a
fresh venv outside the checkout from the serving lock (hash-checked) plus the wheel, its own
`lungserve serve`, started from a directory outside the checkout, answers /predict on a real image
with the bundled model, and OIP over gRPC (the serving lock carries the `grpc` and `slides`
extras, as the images do). An editable install or PYTHONPATH would hide a missing file or package."""

from __future__ import annotations

import asyncio
import email
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from packaging.specifiers import SpecifierSet

from service.model.manifest import Manifest
from tests.conftest import BUNDLED_MODEL, ROOT
from tests.e2e.server import free_port, run_server, wait_ready
from tools.locks import checkout_lock

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

# The import names the wheel adds to an environment (README "Only the server", DEVELOPERS.md).
TOP_LEVEL = {"service", "export"}
INSTALL_TIMEOUT_S = 600.0
# What the installed server must not see: this checkout's code (PYTHONPATH, as the developers'
# workflow sets it), another venv, or settings meant for another server.
_LEAKS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")


def run(argv: list[str | Path], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def outside_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _LEAKS and not k.startswith("LUNGSERVE_")}


def packaged_files() -> set[str]:
    """Every file under service/ and export/ (code, the bundled model, static assets), less
    bytecode and dot-files."""
    return {
        p.relative_to(ROOT).as_posix()
        for top in TOP_LEVEL
        for p in (ROOT / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".") and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    with checkout_lock(ROOT):  # `make test` runs the other-version matrix beside the suite
        run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], cwd=ROOT)
    (built,) = out.glob("lungserve-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv outside the checkout: the serving lock (--require-hashes), then the wheel --no-deps."""
    venv = tmp_path_factory.mktemp("outside") / "venv"
    assert ROOT not in venv.parents
    env = outside_env()
    run([sys.executable, "-m", "venv", venv], cwd=venv.parent, env=env)
    # --no-compile: byte-compiling every dependency doubles the install; imports compile lazily.
    pip: list[str | Path] = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "--no-input"]
    pip += ["install", "-q"]
    pip.append("--no-compile")
    run([*pip, "--require-hashes", "-r", ROOT / "requirements" / "serve.txt"], cwd=venv.parent, env=env)
    run([*pip, "--no-deps", wheel], cwd=venv.parent, env=env)
    return venv


def test_wheel_carries_every_file_under_service_and_export(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not packaged_files() - names, "files the wheel lacks (package-data or a sub-package)"
    assert {"service/bundled_model/model.onnx", "service/bundled_model/model.json", "service/py.typed"} <= names


def test_wheel_adds_exactly_the_documented_import_names(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        tops = {n.split("/")[0] for n in whl.namelist() if not n.split("/")[0].endswith(".dist-info")}
        (dist_info,) = {n.split("/")[0] for n in whl.namelist() if n.split("/")[0].endswith(".dist-info")}
        metadata = email.message_from_bytes(whl.read(f"{dist_info}/METADATA"))
        entry_points = whl.read(f"{dist_info}/entry_points.txt").decode()
    assert tops == TOP_LEVEL
    assert "lungserve = service.cli:main" in entry_points
    requires_python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(metadata["Requires-Python"]) == SpecifierSet(requires_python)
    # Serving needs no TensorFlow: the wheel's own requirements never name it outside `export`.
    assert all("tensorflow" not in r or 'extra == "export"' in r for r in metadata.get_all("Requires-Dist", []))


async def test_installed_wheel_serves_predict_from_outside_the_checkout(
    installed: Path, tmp_path: Path, real_images: list[Path]
) -> None:
    env = outside_env()
    # The serving extras are in the lock: gRPC (grpcio + Triton's generated code) and OpenSlide.
    probe = (
        "import importlib.util as u, service, export, grpc, openslide, tritonclient.grpc.service_pb2; "
        "print(service.__file__); print(u.find_spec('tensorflow'))"
    )
    where, tensorflow = run([installed / "bin" / "python", "-c", probe], cwd=tmp_path, env=env).splitlines()
    assert Path(where).is_relative_to(installed), f"service imported from {where}, not from the installed wheel"
    assert tensorflow == "None", "the serving lock pulled TensorFlow"
    run([installed / "bin" / "python", "-m", "pip", "check"], cwd=tmp_path, env=env)  # the lock meets the wheel

    manifest = Manifest.read(BUNDLED_MODEL / "model.json")
    grpc_port = free_port()
    with run_server(tmp_path, installed / "bin" / "lungserve", env, {"LUNGSERVE_GRPC_PORT": str(grpc_port)}) as server:
        await wait_ready(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
            image = real_images[0]
            r = await client.post("/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
        over_grpc = await asyncio.to_thread(infer_over_grpc, grpc_port, manifest.name, image.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body["probabilities"]) == manifest.classes
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["model"]["version"] == manifest.version  # the bundled model, shipped in the wheel
    want = [body["probabilities"][c] for c in manifest.classes]
    np.testing.assert_allclose(over_grpc, [want], rtol=0, atol=1e-5)


def infer_over_grpc(port: int, model: str, image: bytes) -> np.ndarray:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_model_ready(model)
        tensor = grpcclient.InferInput("image_bytes", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=np.object_))
        probabilities = client.infer(model, [tensor]).as_numpy("probabilities")
    finally:
        client.close()
    assert isinstance(probabilities, np.ndarray)
    return probabilities
