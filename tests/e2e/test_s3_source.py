"""The S3 model source against a real S3 endpoint: a moto server process on 127.0.0.1.

Nothing is patched. Where a test needs to see what the client did, it reads the server's
request log or registers a botocore event hook (a public botocore API) on the aioboto3 session
it hands to `fetch_model`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import aioboto3
import anyio
import httpx
import pytest
from botocore.exceptions import EndpointConnectionError

from export.upload import upload
from service.core.engine import Engine
from service.errors import ModelSourceError
from service.model.manifest import MANIFEST_NAME
from service.model.source import ModelArtifact, S3Options, current_etag, fetch_model
from tests.onnx_models import manifest_for, model_bytes, write_model_dir
from tests.s3fixtures import Gate, MotoServer, boto3_client, moto_server, refusing_socket, set_dummy_aws_env

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

ROOT = Path(__file__).resolve().parents[2]


def put(moto: MotoServer, bucket: str, key: str, body: bytes) -> None:
    boto3_client("s3", moto.url).put_object(Bucket=bucket, Key=key, Body=body)


async def fetch(moto: MotoServer, uri: str, cache: Path, **kwargs: Any) -> ModelArtifact:
    """What start-up does: fetch (sha256 checked), then build the Engine (the model's verification)."""
    kwargs.setdefault("max_attempts", 2)
    kwargs.setdefault("timeout_s", 120)
    artifact = await fetch_model(uri, cache_dir=cache, s3=S3Options(endpoint_url=moto.url, **kwargs))
    Engine(artifact.onnx_path, artifact.manifest, provider="cpu").warm_up([1, 2])
    return artifact


def model_gets(lines: list[str], bucket: str, key: str = "model.onnx") -> list[str]:
    return [x for x in lines if f'"GET /{bucket}/' in x and key in x]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --------------------------------------------------------------------------- success and cache


async def test_fetch_success_then_cache_hit_downloads_nothing(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    manifest = write_model_dir(tmp_path / "export", version="2026.1")
    uris = await upload(tmp_path / "export", f"s3://{bucket}/lung/", s3=S3Options(endpoint_url=moto.url))
    assert uris == [f"s3://{bucket}/lung/model.onnx", f"s3://{bucket}/lung/model.json"]
    cache = tmp_path / "cache"

    start = moto.log_position()
    first = await fetch(moto, f"s3://{bucket}/lung/", cache)
    assert first.identity.version == "2026.1"
    assert first.manifest == manifest
    assert first.downloaded_bytes == (tmp_path / "export" / "model.onnx").stat().st_size
    assert first.onnx_path.read_bytes() == (tmp_path / "export" / "model.onnx").read_bytes()
    assert first.onnx_path.is_relative_to(cache)
    assert first.identity.etag is not None
    assert first.identity.etag == await current_etag(f"s3://{bucket}/lung/", s3=S3Options(endpoint_url=moto.url))
    assert len(model_gets(moto.requests_since(start), bucket)) == 1

    # A restart: same cache, same manifest -> the manifest is read, the model is not.
    start = moto.log_position()
    second = await fetch(moto, f"s3://{bucket}/lung/", cache)
    requests = moto.requests_since(start)
    assert second.downloaded_bytes == 0
    assert second.onnx_path == first.onnx_path
    assert model_gets(requests, bucket) == []
    assert len(model_gets(requests, bucket, MANIFEST_NAME)) == 1
    assert not [p for p in leftovers(cache) if p.endswith(".part")]


async def test_tampered_cache_file_is_downloaded_again(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    write_model_dir(tmp_path / "export")
    await upload(tmp_path / "export", f"s3://{bucket}/m/", s3=S3Options(endpoint_url=moto.url))
    first = await fetch(moto, f"s3://{bucket}/m/", tmp_path / "cache")
    first.onnx_path.write_bytes(b"bit rot")
    again = await fetch(moto, f"s3://{bucket}/m/", tmp_path / "cache")
    assert again.downloaded_bytes
    assert again.onnx_path.read_bytes() == (tmp_path / "export" / "model.onnx").read_bytes()


async def test_direct_onnx_key_with_manifest_beside_it(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    data = model_bytes()
    put(moto, bucket, "flat/v3.onnx", data)
    put(moto, bucket, "flat/model.json", json.dumps(manifest_for(data, version="3", file="v3.onnx")).encode())
    artifact = await fetch(moto, f"s3://{bucket}/flat/v3.onnx", tmp_path / "cache")
    assert artifact.identity.version == "3"
    assert artifact.identity.source == f"s3://{bucket}/flat/v3.onnx"


async def test_new_upload_changes_the_etag(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/lung/"
    write_model_dir(tmp_path / "v1", version="1")
    write_model_dir(tmp_path / "v2", version="2", bias=[0.0, 3.0, 0.0])
    await upload(tmp_path / "v1", uri, s3=S3Options(endpoint_url=moto.url))
    etag1 = await current_etag(uri, s3=S3Options(endpoint_url=moto.url))
    await upload(tmp_path / "v2", uri, s3=S3Options(endpoint_url=moto.url))
    etag2 = await current_etag(uri, s3=S3Options(endpoint_url=moto.url))
    assert etag1 != etag2
    artifact = await fetch(moto, uri, tmp_path / "cache")
    assert (artifact.identity.version, artifact.identity.etag) == ("2", etag2)
    assert await current_etag(str(tmp_path / "v1")) is None  # local models are not polled

    # The cache keeps the current model and the one before it (a quick roll-back), no more.
    write_model_dir(tmp_path / "v3", version="3", bias=[0.0, 0.0, 3.0])
    await upload(tmp_path / "v3", uri, s3=S3Options(endpoint_url=moto.url))
    await fetch(moto, uri, tmp_path / "cache")
    await upload(tmp_path / "v1", uri, s3=S3Options(endpoint_url=moto.url))
    latest = await fetch(moto, uri, tmp_path / "cache")
    kept = sorted(p.name for p in latest.onnx_path.parent.glob("*.onnx"))
    assert len(kept) == 2
    assert latest.onnx_path.name in kept


# --------------------------------------------------------------------------- each failure, one line


async def expect_failure(coro: Any, pattern: str) -> str:
    with pytest.raises(ModelSourceError, match=pattern) as info:
        await coro
    message = str(info.value)
    assert "\n" not in message
    return message


async def test_missing_bucket(moto: MotoServer, aws_env: None, tmp_path: Path) -> None:
    uri = "s3://no-such-bucket-lungserve/lung/"
    await expect_failure(fetch(moto, uri, tmp_path), r"^bucket 'no-such-bucket-lungserve' does not exist")
    await expect_failure(
        current_etag(uri, s3=S3Options(endpoint_url=moto.url)), r"^bucket 'no-such-bucket-lungserve' does not"
    )


async def test_missing_manifest_key(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    await expect_failure(
        fetch(moto, f"s3://{bucket}/nothing/", tmp_path), rf"^manifest not found: s3://{bucket}/nothing/model.json"
    )
    await expect_failure(
        current_etag(f"s3://{bucket}/nothing/", s3=S3Options(endpoint_url=moto.url)), "^manifest not found"
    )


async def test_missing_model_key(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    put(moto, bucket, "half/model.json", json.dumps(manifest_for(model_bytes())).encode())
    await expect_failure(
        fetch(moto, f"s3://{bucket}/half/", tmp_path), rf"^model not found: s3://{bucket}/half/model.onnx"
    )


async def test_checksum_mismatch_leaves_nothing_in_the_cache(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    data = model_bytes()
    put(moto, bucket, "bad/model.onnx", data + b"\x00")  # e.g. a partial or tampered upload
    put(moto, bucket, "bad/model.json", json.dumps(manifest_for(data)).encode())
    await expect_failure(
        fetch(moto, f"s3://{bucket}/bad/", tmp_path / "cache"), r"^checksum mismatch: s3://.*/bad/model.onnx has sha256"
    )
    assert not [p for p in leftovers(tmp_path / "cache") if p.endswith((".onnx", ".part"))]


async def test_not_an_onnx_file(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    junk = b"PK\x03\x04 this is a zip, not a model"
    put(moto, bucket, "junk/model.onnx", junk)
    put(moto, bucket, "junk/model.json", json.dumps(manifest_for(junk)).encode())
    await expect_failure(fetch(moto, f"s3://{bucket}/junk/", tmp_path), "^not a loadable ONNX model")


@pytest.mark.parametrize(
    ("overrides", "cause"),
    [({"classes": ["a", "b", "c", "d"]}, r"\[batch, 4\]"), ({"input_size": 32}, r"\[batch, 32, 32, 3\]")],
)
async def test_manifest_does_not_fit_model(
    moto: MotoServer, bucket: str, tmp_path: Path, overrides: dict[str, Any], cause: str
) -> None:
    data = model_bytes()
    put(moto, bucket, "odd/model.onnx", data)
    put(moto, bucket, "odd/model.json", json.dumps(manifest_for(data, **overrides)).encode())
    await expect_failure(fetch(moto, f"s3://{bucket}/odd/", tmp_path), f"^manifest does not fit the model: .*{cause}")


async def test_invalid_manifest(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    put(moto, bucket, "broken/model.json", b'{"name": "x"}')
    await expect_failure(
        fetch(moto, f"s3://{bucket}/broken/", tmp_path), r"^invalid manifest s3://.*/broken/model.json"
    )


async def test_access_denied_and_rejected_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """IAM enforcement needs its own moto server: it is switched on for the whole process."""
    set_dummy_aws_env(monkeypatch)
    with moto_server() as server:
        s3 = boto3_client("s3", server.url)
        s3.create_bucket(Bucket="locked")
        write_model_dir(tmp_path / "m")
        await upload(tmp_path / "m", "s3://locked/lung/", s3=S3Options(endpoint_url=server.url))
        iam = boto3_client("iam", server.url)
        iam.create_user(UserName="lister")
        iam.put_user_policy(
            UserName="lister",
            PolicyName="list-only",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:ListBucket", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="lister")["AccessKey"]
        # From now on moto authenticates and authorises every request like IAM would.
        async with httpx.AsyncClient() as client:
            (await client.post(f"{server.url}/moto-api/reset-auth", content=b"0")).raise_for_status()

        set_dummy_aws_env(monkeypatch, key=key["AccessKeyId"], secret=key["SecretAccessKey"])
        message = await expect_failure(
            fetch(server, "s3://locked/lung/", tmp_path / "cache"),
            r"^access denied reading manifest s3://locked/lung/model.json",
        )
        assert "s3:GetObject" in message

        set_dummy_aws_env(monkeypatch, key="AKIAUNKNOWNKEY000000", secret="nope")
        await expect_failure(
            fetch(server, "s3://locked/lung/", tmp_path / "cache"), r"^credentials rejected .*InvalidAccessKeyId"
        )


async def test_no_credentials_in_the_chain(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    set_dummy_aws_env(monkeypatch)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    await expect_failure(fetch(moto, "s3://any-bucket/lung/", tmp_path), "^no usable AWS credentials")


def counting_session(event: str) -> tuple[aioboto3.Session, list[dict[str, Any]]]:
    """A session whose clients record every `event` (a public botocore hook; it returns None, so
    it never changes what the client does)."""
    session = aioboto3.Session()
    seen: list[dict[str, Any]] = []

    def hook(**kwargs: Any) -> None:
        seen.append(kwargs)

    session.events.register(event, hook)
    return session, seen


async def test_unreachable_endpoint_after_retries(aws_env: None, tmp_path: Path) -> None:
    sock = refusing_socket()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        session, sends = counting_session("before-send.s3.GetObject")
        message = await expect_failure(
            fetch_model(
                "s3://bucket/lung/",
                cache_dir=tmp_path,
                s3=S3Options(endpoint_url=url, max_attempts=3, timeout_s=60),
                session=session,
            ),
            rf"^S3 endpoint {url} unreachable after 3 attempt\(s\) reading manifest",
        )
        assert len(sends) == 3  # botocore's standard retry mode made every attempt
        assert "Could not connect" in message
    finally:
        sock.close()


async def test_endpoint_that_refuses_then_comes_up(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    write_model_dir(tmp_path / "export", version="late")
    await upload(tmp_path / "export", f"s3://{bucket}/lung/", s3=S3Options(endpoint_url=moto.url))
    gate = Gate()
    refused = asyncio.Event()
    refusals: list[BaseException] = []
    session = aioboto3.Session()

    def on_needs_retry(caught_exception: BaseException | None = None, **_: Any) -> None:
        # A public botocore hook, called before botocore decides whether to retry; returns None.
        if isinstance(caught_exception, EndpointConnectionError):
            refusals.append(caught_exception)
            refused.set()

    session.events.register("needs-retry.s3.GetObject", on_needs_retry)
    try:
        task = asyncio.create_task(
            fetch_model(
                f"s3://{bucket}/lung/",
                cache_dir=tmp_path / "cache",
                s3=S3Options(endpoint_url=gate.url, max_attempts=10, timeout_s=120),
                session=session,
            )
        )
        with anyio.fail_after(60):
            await refused.wait()  # the first attempt hit a closed port...
        await gate.open(moto.port)  # ...and now the endpoint comes up, inside the retry window
        artifact = await task
    finally:
        await gate.close()
    assert artifact.identity.version == "late"
    assert len(refusals) >= 1


async def test_startup_timeout_bounds_a_hanging_endpoint(aws_env: None, tmp_path: Path) -> None:
    # Accepts the TCP connection (kernel backlog) but never answers: only the overall bound ends it.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        await expect_failure(
            fetch_model(
                "s3://bucket/lung/", cache_dir=tmp_path, s3=S3Options(endpoint_url=url, read_timeout_s=600, timeout_s=1)
            ),
            r"^fetching the model from s3://bucket/lung/ did not finish within 1 s",
        )


# --------------------------------------------------------------------------- big object, streamed


async def test_24_mib_object_is_streamed_not_buffered(moto: MotoServer, bucket: str, tmp_path: Path) -> None:
    big = os.urandom(24 * 1024 * 1024)
    warm = os.urandom(2 * 1024 * 1024)
    put(moto, bucket, "big.bin", big)
    put(moto, bucket, "warm.bin", warm)
    big_sha = hashlib.sha256(big).hexdigest()
    args = [moto.url, bucket, "warm.bin", hashlib.sha256(warm).hexdigest(), "big.bin", big_sha, str(tmp_path)]
    del big, warm
    with anyio.fail_after(300):
        result = await anyio.run_process([sys.executable, "-m", "tests.e2e.stream_probe", *args], cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["size"] == 24 * 1024 * 1024
    assert hashlib.sha256((tmp_path / "big.bin").read_bytes()).hexdigest() == big_sha
    growth_mib = (report["after_kib"] - report["before_kib"]) / 1024
    control_mib = (report["control_kib"] - report["control_base_kib"]) / 1024
    assert growth_mib < 8, report  # a few 1 MiB chunks in flight at most, never the 24 MiB object
    assert control_mib > 16, report  # the probe does see a buffered read of the same object


# --------------------------------------------------------------------------- `lungserve upload` round trip


async def test_upload_cli_round_trip(moto: MotoServer, aws_env: None, tmp_path: Path) -> None:
    write_model_dir(tmp_path / "export", version="cli")
    lungserve = Path(sys.executable).with_name("lungserve")
    start = moto.log_position()
    result = await anyio.run_process(
        [
            str(lungserve),
            "upload",
            str(tmp_path / "export"),
            "s3://cli-bucket/lung/v1/",
            "--endpoint-url",
            moto.url,
            "--create-bucket",
        ],
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines() == [
        "uploaded s3://cli-bucket/lung/v1/model.onnx",
        "uploaded s3://cli-bucket/lung/v1/model.json",
    ]
    puts = [x for x in moto.requests_since(start) if '"PUT /cli-bucket/lung/v1/' in x]
    assert [("model.json" in x) for x in puts] == [False, True]  # model first, manifest last

    artifact = await fetch(moto, "s3://cli-bucket/lung/v1/", tmp_path / "cache")
    assert artifact.identity.version == "cli"
    assert artifact.downloaded_bytes

    # A folder whose manifest does not describe its model is refused before anything is sent.
    (tmp_path / "export" / "model.onnx").write_bytes(b"edited by hand")
    result = await anyio.run_process(
        [str(lungserve), "upload", str(tmp_path / "export"), "s3://cli-bucket/lung/v2/", "--endpoint-url", moto.url],
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode().startswith("lungserve upload: checksum mismatch")
    with pytest.raises(ModelSourceError, match="manifest not found"):
        await fetch(moto, "s3://cli-bucket/lung/v2/", tmp_path / "cache")


async def test_upload_to_a_missing_bucket_names_it(moto: MotoServer, aws_env: None, tmp_path: Path) -> None:
    write_model_dir(tmp_path / "export")
    await expect_failure(
        upload(tmp_path / "export", "s3://absent-bucket-lungserve/x/", s3=S3Options(endpoint_url=moto.url)),
        r"^bucket 'absent-bucket-lungserve' does not exist .* writing upload",
    )
