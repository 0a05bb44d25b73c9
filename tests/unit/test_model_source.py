"""Model source without a network: URI parsing, cache layout, error wording, local models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from export.upload import upload, upload_location
from service.core.engine import Engine
from service.errors import ModelSourceError, one_line
from service.model.manifest import MANIFEST_NAME, parse_manifest
from service.model.source import (
    LocalLocation,
    ModelArtifact,
    S3Location,
    S3Options,
    fetch_model,
    load_local_model,
    parse_model_uri,
)
from service.model.source.cache import cache_subdir
from service.model.source.s3 import describe_s3_error
from tests.onnx_models import manifest_for, model_bytes, write_model_dir

BUNDLED = Path(__file__).resolve().parents[2] / "service" / "bundled_model"


def load_verified(path: Path) -> ModelArtifact:
    """What start-up does with a local model: the source checks the sha256, the Engine the rest."""
    artifact = load_local_model(path)
    Engine(artifact.onnx_path, artifact.manifest, provider="cpu").warm_up([1, 2])
    return artifact


# --------------------------------------------------------------------------- URIs


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://models/lung/", S3Location("models", "lung/", "lung/model.json", None)),
        ("s3://models/lung", S3Location("models", "lung/", "lung/model.json", None)),
        ("s3://models/a/b/v3/", S3Location("models", "a/b/v3/", "a/b/v3/model.json", None)),
        ("s3://models", S3Location("models", "", "model.json", None)),
        ("s3://models/", S3Location("models", "", "model.json", None)),
        ("s3://models/lung/v3.onnx", S3Location("models", "lung/", "lung/model.json", "lung/v3.onnx")),
        ("s3://models/top.onnx", S3Location("models", "", "model.json", "top.onnx")),
        ("s3://models/lung/model.json", S3Location("models", "lung/", "lung/model.json", None)),
        ("/srv/model", LocalLocation(Path("/srv/model"))),
        ("relative/dir", LocalLocation(Path("relative/dir"))),
        ("file:///srv/my%20model/", LocalLocation(Path("/srv/my model/"))),
        ("file://localhost/srv/m", LocalLocation(Path("/srv/m"))),
    ],
)
def test_parse_model_uri(uri: str, expected: LocalLocation | S3Location) -> None:
    assert parse_model_uri(uri) == expected


@pytest.mark.parametrize(
    ("uri", "cause"),
    [
        ("", "empty"),
        ("s3:///prefix/", "no bucket"),
        ("s3://bucket/p/?versionId=1", "query"),
        ("gs://bucket/model/", "unsupported model URI scheme 'gs'"),
        ("https://example.org/model.onnx", "unsupported model URI scheme 'https'"),
        ("file://otherhost/srv/m", "local path"),
    ],
)
def test_parse_model_uri_refuses(uri: str, cause: str) -> None:
    with pytest.raises(ModelSourceError, match=cause):
        parse_model_uri(uri)


def test_cache_subdir_is_per_location_and_safe(tmp_path: Path) -> None:
    a = cache_subdir(tmp_path, S3Location("b", "lung/v1/", "lung/v1/model.json", None))
    b = cache_subdir(tmp_path, S3Location("b", "lung_v1/", "lung_v1/model.json", None))  # sanitises alike
    root = cache_subdir(tmp_path, S3Location("b", "", "model.json", None))
    evil = cache_subdir(tmp_path, S3Location("b", "../../etc/", "../../etc/model.json", None))
    assert a != b
    assert a.parent == b.parent == root.parent == evil.parent == tmp_path / "s3" / "b"
    assert a.name.startswith("lung_v1-")
    assert root.name.startswith("root-")
    assert ".." not in evil.name


# --------------------------------------------------------------------------- manifest and error wording


def test_parse_manifest_reports_one_line() -> None:
    doc = manifest_for(b"x")
    del doc["classes"]
    with pytest.raises(ModelSourceError) as info:
        parse_manifest(json.dumps(doc).encode(), "s3://b/p/model.json")
    assert "invalid manifest s3://b/p/model.json: classes" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelSourceError, match="invalid manifest"):
        parse_manifest(b"<html>not json</html>", "x")


@pytest.mark.parametrize("name", ["../model.onnx", "sub/model.onnx", "..", ""])
def test_parse_manifest_refuses_paths_as_file_name(name: str) -> None:
    with pytest.raises(ModelSourceError, match="plain file name"):
        parse_manifest(json.dumps(manifest_for(b"x", file=name)).encode(), "m")


def _client_error(code: str, status: int, op: str = "GetObject") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": "msg\nsecond line"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, op)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_client_error("NoSuchBucket", 404), "bucket 'bkt' does not exist"),
        (_client_error("NoSuchKey", 404), "manifest not found: s3://bkt/p/model.json"),
        (_client_error("404", 404, "HeadObject"), "manifest not found"),
        (_client_error("AccessDenied", 403), "access denied reading manifest"),
        (_client_error("InvalidAccessKeyId", 403), "credentials rejected"),
        (_client_error("SlowDown", 503), "S3 error SlowDown"),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "unreachable after 4 attempt(s)"),
        (NoCredentialsError(), "no usable AWS credentials"),
    ],
)
def test_describe_s3_error(exc: Exception, expected: str) -> None:
    error = describe_s3_error(
        exc, uri="s3://bkt/p/model.json", what="manifest", endpoint_url="http://127.0.0.1:9", max_attempts=4
    )
    assert expected in str(error)
    assert "\n" not in str(error)


def test_one_line_caps_length() -> None:
    assert one_line("a\n  b\tc") == "a b c"
    assert len(one_line("x" * 1000, 50)) == 50


# --------------------------------------------------------------------------- local models


def test_load_local_model_dir_file_and_manifest(tmp_path: Path) -> None:
    manifest = write_model_dir(tmp_path)
    for path in (tmp_path, tmp_path / "model.onnx", tmp_path / MANIFEST_NAME):
        artifact = load_local_model(path)
        assert artifact.onnx_path == tmp_path / "model.onnx"
        assert artifact.manifest == manifest
        assert artifact.identity.version == "1"
        assert artifact.identity.etag is None
        assert not artifact.downloaded_bytes


def test_bundled_model_loads() -> None:
    artifact = load_local_model(BUNDLED)
    assert artifact.manifest.classes == ["lung_aca", "lung_n", "lung_scc"]


@pytest.mark.anyio
async def test_fetch_model_dispatches_local_paths(tmp_path: Path) -> None:
    write_model_dir(tmp_path / "m", version="7")
    for uri in (str(tmp_path / "m"), (tmp_path / "m").as_uri()):
        artifact = await fetch_model(uri, cache_dir=tmp_path / "cache")
        assert artifact.identity.version == "7"
    assert not (tmp_path / "cache").exists()  # local models are used in place


def test_local_checksum_mismatch(tmp_path: Path) -> None:
    write_model_dir(tmp_path, sha256="0" * 64)
    with pytest.raises(ModelSourceError, match=r"^checksum mismatch: .*model.onnx has sha256 [0-9a-f]{64}"):
        load_local_model(tmp_path)


def test_local_not_onnx(tmp_path: Path) -> None:
    write_model_dir(tmp_path, data=b"\x00\x01 definitely not a protobuf")
    with pytest.raises(ModelSourceError, match=r"^not a loadable ONNX model: model.onnx"):
        load_verified(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "cause"),
    [
        ({"classes": ["a", "b", "c", "d"]}, "expected \\[batch, 4\\]"),
        ({"classes": ["a", "b"]}, "expected \\[batch, 2\\]"),
        ({"input_size": 16}, "expected \\[batch, 16, 16, 3\\]"),
        ({"input_name": "pixels"}, "manifest says 'pixels'"),
        ({"output_name": "logits"}, "no output 'logits'"),
        ({"input_dtype": "float32"}, "input_dtype"),
    ],
)
def test_local_manifest_does_not_fit(tmp_path: Path, overrides: dict[str, Any], cause: str) -> None:
    write_model_dir(tmp_path, **overrides)
    with pytest.raises(ModelSourceError, match=f"^manifest does not fit the model: .*{cause}"):
        load_verified(tmp_path)


def test_local_model_outputs_must_be_probabilities(tmp_path: Path) -> None:
    # Right signature, but logits instead of a softmax: not confidences the service may serve.
    write_model_dir(tmp_path, data=model_bytes(softmax=False, bias=[5.0, 0.0, 0.0]))
    with pytest.raises(ModelSourceError, match="not probabilities"):
        load_verified(tmp_path)


@pytest.mark.parametrize(
    ("layout", "cause"),
    [
        ("nothing", "model path not found"),
        ("no_manifest", "manifest not found"),
        ("no_model", "model file not found"),
        ("wrong_name", "describes 'model.onnx', not 'other.onnx'"),
    ],
)
def test_local_layout_errors(tmp_path: Path, layout: str, cause: str) -> None:
    target = tmp_path / "m"
    if layout == "no_manifest":
        target.mkdir()
    elif layout == "no_model":
        write_model_dir(target)
        (target / "model.onnx").unlink()
    elif layout == "wrong_name":
        write_model_dir(target)
        (target / "model.onnx").rename(target / "other.onnx")
        target = target / "other.onnx"
    with pytest.raises(ModelSourceError, match=cause):
        load_local_model(target)


# --------------------------------------------------------------------------- upload (local checks only)


@pytest.mark.parametrize("uri", ["s3://b/p/model.onnx", "s3://b/p/model.json", "/local/dir", "s3:///x/"])
def test_upload_needs_an_s3_prefix(uri: str) -> None:
    with pytest.raises(ModelSourceError):
        upload_location(uri)


@pytest.mark.anyio
async def test_upload_refuses_inconsistent_folder_before_any_request(tmp_path: Path) -> None:
    write_model_dir(tmp_path, sha256="1" * 64)
    # Port 9 on loopback: were a request attempted, this would fail differently.
    with pytest.raises(ModelSourceError, match=r"^checksum mismatch: .*re-export"):
        await upload(tmp_path, "s3://bucket/prefix/", s3=S3Options(endpoint_url="http://127.0.0.1:9"))
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(ModelSourceError, match="cannot read manifest"):
        await upload(tmp_path, "s3://bucket/prefix/", s3=S3Options(endpoint_url="http://127.0.0.1:9"))
