"""OIP v2 against a real `lungserve serve`, spoken by the real `tritonclient.http`: health,
metadata, and inference with binary_data true and false, equal to /predict's answers. And the
blocking Python client (`service.clients.http_client`; the async one is driven by `lungserve predict`)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service.clients.http_client import ClientError, LungserveClient
from service.model.manifest import Manifest
from service.model.preprocess import load_image
from tests.conftest import BUNDLED_MODEL, lc25000_tiles
from tests.e2e.server import start_server, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

MANIFEST = Manifest.read(BUNDLED_MODEL / "model.json")


def bytes_input(datas: list[bytes], binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image_bytes", [len(datas)], "BYTES")
    # JSON carries BYTES as UTF-8 text: encoded images go as base64 there, raw in binary.
    values = datas if binary else [base64.b64encode(d) for d in datas]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def labels_of(result: httpclient.InferResult) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in result.as_numpy("label").tolist()]


async def test_tritonclient_answers_equal_predict(tmp_path: Path, lc25000: Path) -> None:
    paths = lc25000_tiles(lc25000, per_class=2)
    datas = [p.read_bytes() for p in paths]
    with start_server(tmp_path, LUNGSERVE_PROVIDER="cpu") as server:
        await wait_ready(server)
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as http:
            expected = [
                (await http.post("/predict", files={"file": (p.name, d, "image/jpeg")})).json()
                for p, d in zip(paths, datas, strict=True)
            ]
        want = np.array([[e["probabilities"][c] for c in MANIFEST.classes] for e in expected])

        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60.0)
        try:
            assert client.is_server_live()
            assert client.is_server_ready()
            assert client.is_model_ready(MANIFEST.name)
            assert client.is_model_ready(MANIFEST.name, MANIFEST.version)
            assert not client.is_model_ready("resnet50")
            assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
            meta = client.get_model_metadata(MANIFEST.name)
            assert meta["versions"] == [MANIFEST.version]

            for binary in (True, False):
                outputs = [
                    httpclient.InferRequestedOutput("probabilities", binary_data=binary),
                    httpclient.InferRequestedOutput("label", binary_data=binary),
                ]
                result = client.infer(MANIFEST.name, [bytes_input(datas, binary)], outputs=outputs, request_id="r1")
                np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=0, atol=1e-5)
                assert labels_of(result) == [e["label"] for e in expected]
                response = result.get_response()
                assert (response["model_version"], response["id"]) == (MANIFEST.version, "r1")

            # Pixels for clients that preprocess themselves (the same resize as the server's).
            pixels = np.stack([load_image(d, MANIFEST.input_size) for d in datas])
            tensor = httpclient.InferInput(MANIFEST.input_name, list(pixels.shape), "UINT8")
            tensor.set_data_from_numpy(pixels, binary_data=True)
            result = client.infer(MANIFEST.name, [tensor], model_version=MANIFEST.version)  # every output, binary
            np.testing.assert_allclose(result.as_numpy("probabilities"), want, rtol=0, atol=1e-5)
            assert labels_of(result) == [e["label"] for e in expected]

            # Errors arrive in the protocol's shape, which tritonclient turns into its exception.
            with pytest.raises(InferenceServerException, match="not a decodable image"):
                client.infer(MANIFEST.name, [bytes_input([b"plain text, not an image"], binary=True)])
            with pytest.raises(InferenceServerException, match="unknown model 'resnet50'"):
                client.infer("resnet50", [bytes_input(datas[:1], binary=True)])
        finally:
            client.close()


async def test_python_client_sync_against_a_real_server(tmp_path: Path, lc25000: Path) -> None:
    paths = lc25000_tiles(lc25000, per_class=1)
    with start_server(tmp_path, LUNGSERVE_PROVIDER="cpu") as server:
        await wait_ready(server)

        # The blocking client, in a worker thread: blocking calls do not belong on the test's event loop.
        def use_client() -> None:
            with LungserveClient(server.url) as client:
                info = client.model_info()
                assert info["manifest"]["classes"] == MANIFEST.classes
                single = client.predict(paths[0])
                assert single.ok
                assert single.file == str(paths[0])
                assert single.model_version == MANIFEST.version
                many = client.predict_many([*paths, ("notes.jpeg", b"not an image")])
                assert [p.file for p in many] == [*map(str, paths), "notes.jpeg"]
                assert many[0].probabilities == pytest.approx(single.probabilities, abs=1e-5)
                assert many[-1].error_code == "invalid_image"
                assert all(p.ok for p in many[:-1])
                with pytest.raises(ClientError) as info_error:
                    client.predict(("notes.jpeg", b"not an image"))
                assert (info_error.value.status, info_error.value.code) == (422, "invalid_image")

        await asyncio.to_thread(use_client)
