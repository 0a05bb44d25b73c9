"""OIP v2 over gRPC against a real `lungserve serve`, spoken by the real `tritonclient.grpc`:
health, metadata, inference equal to /predict's, status codes, API keys."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from service.model.manifest import Manifest
from service.model.preprocess import load_image
from service.oip.dataplane import OUTPUTS
from tests.conftest import BUNDLED_MODEL, lc25000_tiles
from tests.e2e.server import free_port, start_server, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

MANIFEST = Manifest.read(BUNDLED_MODEL / "model.json")
KEY = "grpc-key-0123456789abcdef"


def text(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]


async def test_tritonclient_grpc_answers_equal_predict(tmp_path: Path, lc25000: Path) -> None:
    paths = lc25000_tiles(lc25000, per_class=2)
    datas = [p.read_bytes() for p in paths]
    keys = tmp_path / "keys"
    keys.write_text(f"grpc-test:{KEY}\n")
    port = free_port()
    env = {"LUNGSERVE_PROVIDER": "cpu", "LUNGSERVE_GRPC_PORT": str(port), "LUNGSERVE_API_KEYS_FILE": str(keys)}
    with start_server(tmp_path, **env) as server:
        await wait_ready(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0, headers={"X-API-Key": KEY}) as http:
            expected = [
                (await http.post("/predict", files={"file": (p.name, d)})).json()
                for p, d in zip(paths, datas, strict=True)
            ]
        want = np.array([[e["probabilities"][c] for c in MANIFEST.classes] for e in expected])

        def use_grpc() -> None:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            auth = {"authorization": f"Bearer {KEY}"}
            try:
                # Health and readiness are open, as /v2/health/* are.
                assert client.is_server_live()
                assert client.is_server_ready()
                assert client.is_model_ready(MANIFEST.name)
                assert not client.is_model_ready("resnet50")
                with pytest.raises(InferenceServerException) as refused:
                    client.get_model_metadata(MANIFEST.name)
                assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
                meta = client.get_model_metadata(MANIFEST.name, headers=auth, as_json=True)
                assert meta["versions"] == [MANIFEST.version]
                assert [o["name"] for o in meta["outputs"]] == list(OUTPUTS)

                tensor = grpcclient.InferInput("image_bytes", [len(datas)], "BYTES")
                tensor.set_data_from_numpy(np.array(datas, dtype=np.object_))
                result = client.infer(MANIFEST.name, [tensor], headers=auth, request_id="g1")
                np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=0, atol=1e-5)
                assert text(result.as_numpy("label")) == [e["label"] for e in expected]
                assert result.get_response().id == "g1"

                pixels = np.stack([load_image(d, MANIFEST.input_size) for d in datas])
                tensor = grpcclient.InferInput(MANIFEST.input_name, list(pixels.shape), "UINT8")
                tensor.set_data_from_numpy(pixels)
                only = [grpcclient.InferRequestedOutput("probabilities")]
                result = client.infer(MANIFEST.name, [tensor], outputs=only, headers=auth)
                np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=0, atol=1e-5)
                assert result.as_numpy("label") is None

                bad = grpcclient.InferInput("image_bytes", [1], "BYTES")
                bad.set_data_from_numpy(np.array([b"plain text, not an image"], dtype=np.object_))
                with pytest.raises(InferenceServerException, match="not a decodable image") as invalid:
                    client.infer(MANIFEST.name, [bad], headers=auth)
                assert invalid.value.status() == "StatusCode.INVALID_ARGUMENT"
                with pytest.raises(InferenceServerException) as unknown:
                    client.infer("resnet50", [tensor], headers=auth)
                assert unknown.value.status() == "StatusCode.NOT_FOUND"
            finally:
                client.close()

        await asyncio.to_thread(use_grpc)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as http:
            metrics = (await http.get("/metrics")).text
        assert 'route="/inference.GRPCInferenceService/ModelInfer",status="2xx"} 2.0' in metrics
        assert 'lungserve_api_key_requests_total{key="grpc-test",outcome="ok"}' in metrics
