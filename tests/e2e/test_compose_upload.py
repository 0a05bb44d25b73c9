"""compose.yaml's one-shot `model-upload` job, run for real without Docker: its shell command, as
Compose would hand it to `sh -c` (`$$` unescaped to `$`), against a moto S3 server in place of
MinIO. Then a `lungserve serve` with the servers' S3 settings from compose.yaml loads that model.

The rest of the stack needs a Docker engine, which these machines do not have.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.server import ONE_PROCESS
from tests.s3fixtures import LoggedProcess, MotoServer, boto3_client

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MINIO = "http://minio:9000"
_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def test_the_upload_job_puts_a_model_the_servers_load(moto: MotoServer, aws_env: None, tmp_path: Path) -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    job = services["model-upload"]["command"]
    assert job[:2] == ["sh", "-c"]
    bucket = f"compose-{uuid.uuid4().hex[:12]}"  # a fresh bucket: the job must create it
    script = job[2].replace("$$", "$").replace(MINIO, moto.url).replace("lungserve-models", bucket)
    shell = shutil.which("sh")
    assert shell is not None
    # `lungserve` on PATH, as in the image (this interpreter's scripts directory).
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    upload = LoggedProcess([shell, "-c", script], env=env, cwd=tmp_path)
    try:
        assert upload.wait_exit(timeout_s=120) == 0, upload.output()
    finally:
        upload.stop()  # closes its output pipe
    keys = {o["Key"] for o in boto3_client("s3", moto.url).list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"lung/model.json", "lung/model.onnx"} <= keys

    server_env = {
        k: str(v).replace(MINIO, moto.url).replace("lungserve-models", bucket)
        for k, v in services["lungserve"]["environment"].items()
        if k.startswith("LUNGSERVE_")
    }
    server_env["LUNGSERVE_MODEL_CACHE_DIR"] = str(tmp_path / "cache")  # compose: a tmpfs
    server_env["LUNGSERVE_SHUTDOWN_DELAY_S"] = "0"  # no balancer to wait for here
    server_env.update(ONE_PROCESS)  # compose's fronts per replica are not what this test is about
    server = LoggedProcess(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0"], env=server_env, cwd=ROOT
    )
    try:
        match = _LISTENING.search(server.wait_for_line(_LISTENING, timeout_s=120))
        assert match is not None
        ready = httpx.get(f"http://127.0.0.1:{match.group(1)}/health/ready", timeout=10)
        assert ready.status_code == 200, ready.text
        model = httpx.get(f"http://127.0.0.1:{match.group(1)}/model", timeout=10).json()
        assert model["source"]["source"] == f"s3://{bucket}/lung/"
    finally:
        server.stop()
