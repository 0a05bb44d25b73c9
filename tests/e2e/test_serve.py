"""`lungserve serve` as a real uvicorn process: concurrent clients get exactly the answers
that ONNX Runtime gives for each image alone, and SIGTERM is a clean exit."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.model.manifest import Manifest
from service.model.preprocess import load_image
from tests.conftest import BUNDLED_MODEL, lc25000_tiles
from tests.e2e.server import EXIT_TIMEOUT_S, start_server, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]


def reference(datas: list[bytes]) -> list[np.ndarray]:
    """Direct ORT inference, one image per run: what batching must never change."""
    manifest = Manifest.read(BUNDLED_MODEL / "model.json")
    session = ort.InferenceSession(str(BUNDLED_MODEL / manifest.file), providers=["CPUExecutionProvider"])
    out = []
    for data in datas:
        batch = load_image(data, manifest.input_size)[None]
        (probs,) = session.run([manifest.output_name], {manifest.input_name: batch})
        out.append(np.asarray(probs[0]))
    return out


async def test_concurrent_answers_equal_direct_inference_and_sigterm_exits_0(tmp_path: Path, lc25000: Path) -> None:
    manifest = Manifest.read(BUNDLED_MODEL / "model.json")
    paths = lc25000_tiles(lc25000, per_class=8)
    datas = [p.read_bytes() for p in paths]
    expected = reference(datas)

    with start_server(tmp_path, LUNGSERVE_MAX_BATCH_SIZE="8", LUNGSERVE_MAX_BATCH_DELAY_S="0.01") as server:
        await wait_ready(server)
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0, limits=limits) as client:
            singles = [
                client.post("/predict", files={"file": (p.name, d, "image/jpeg")})
                for p, d in zip(paths, datas, strict=True)
            ]
            many = client.post(
                "/predict-many", files=[("files", (p.name, d, "image/jpeg")) for p, d in zip(paths, datas, strict=True)]
            )
            *single_responses, many_response = await asyncio.gather(*singles, many)
            info = (await client.get("/model")).json()

        assert info["batching"]["max_batch_size"] == 8
        for r, want in zip(single_responses, expected, strict=True):
            assert r.status_code == 200, r.text
            got = [r.json()["probabilities"][c] for c in manifest.classes]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            assert r.json()["label"] == manifest.classes[int(np.argmax(want))]
        assert many_response.status_code == 200, many_response.text
        results = many_response.json()["results"]
        assert [x["filename"] for x in results] == [p.name for p in paths]
        for x, want in zip(results, expected, strict=True):
            np.testing.assert_allclose([x["probabilities"][c] for c in manifest.classes], want, rtol=0, atol=1e-5)

        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(EXIT_TIMEOUT_S) == 0, server.output()
    assert "Application shutdown complete" in server.output()


async def test_cuda_policy_without_cuda_fails_startup_with_a_clear_message(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a CUDA build of onnxruntime")
    with start_server(tmp_path, LUNGSERVE_PROVIDER="cuda") as server:
        code = server.proc.wait(EXIT_TIMEOUT_S)
    assert code == 3, server.output()
    assert "provider policy 'cuda'" in server.output()


async def test_invalid_settings_exit_2(tmp_path: Path) -> None:
    with start_server(tmp_path, LUNGSERVE_MAX_BATCH_SIZE="0") as server:
        code = server.proc.wait(EXIT_TIMEOUT_S)
    assert code == 2, server.output()
    # The variable the operator set, as the README promises (issue 11), not the field name.
    assert "LUNGSERVE_MAX_BATCH_SIZE: Input should be greater than or equal to 1 (got '0')" in server.output()
