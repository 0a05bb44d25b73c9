"""Settings: defaults, LUNGSERVE_* environment variables, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.settings import BUNDLED_MODEL_DIR, Settings

pytestmark = pytest.mark.usefixtures("no_lungserve_env")


def test_defaults() -> None:
    s = Settings()
    assert Path(s.model_uri) == BUNDLED_MODEL_DIR
    assert (BUNDLED_MODEL_DIR / "model.json").is_file()
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.provider == "auto"
    assert s.max_batch_size == 4
    assert s.max_files_per_request == 64
    assert s.ort_intra_op_threads is None
    assert s.ort_inter_op_threads is None
    assert s.preprocess_workers >= 1
    assert s.admin_token is None


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUNGSERVE_PROVIDER", "cpu")
    monkeypatch.setenv("LUNGSERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("LUNGSERVE_MAX_BATCH_DELAY_S", "0.002")
    monkeypatch.setenv("LUNGSERVE_ORT_INTRA_OP_THREADS", "2")
    monkeypatch.setenv("LUNGSERVE_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("LUNGSERVE_MODEL_URI", "s3://bucket/models/")
    s = Settings()
    assert (s.provider, s.max_batch_size, s.max_batch_delay_s, s.ort_intra_op_threads) == ("cpu", 8, 0.002, 2)
    assert s.model_uri == "s3://bucket/models/"
    assert s.admin_token is not None
    assert s.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    assert Settings(max_batch_size=4).max_batch_size == 4  # explicit arguments win over the environment


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("provider", "gpu"),
        ("max_batch_size", 0),
        ("max_batch_delay_s", -0.1),
        ("queue_limit", 0),
        ("request_deadline_s", 0),
        ("port", 70000),
        ("ort_intra_op_threads", 0),
        ("preprocess_workers", 0),
        ("max_file_bytes", 0),
        ("max_files_per_request", 0),
        ("max_image_pixels", 0),
    ],
)
def test_out_of_range(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_cross_field_rules() -> None:
    with pytest.raises(ValidationError, match="queue_limit"):
        Settings(max_batch_size=32, queue_limit=16)
    with pytest.raises(ValidationError, match="max_files_per_request"):
        Settings(max_files_per_request=100, queue_limit=64)
    with pytest.raises(ValidationError, match="max_request_bytes"):
        Settings(max_file_bytes=1000, max_request_bytes=999)


def test_forwarded_allow_ips_default_none_and_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LUNGSERVE_FORWARDED_ALLOW_IPS", raising=False)
    assert Settings().forwarded_allow_ips == []
    monkeypatch.setenv("LUNGSERVE_FORWARDED_ALLOW_IPS", "10.0.0.5, 10.1.0.0/16")
    assert Settings().forwarded_allow_ips == ["10.0.0.5", "10.1.0.0/16"]


def test_workers_default_to_the_usable_cpus_read_when_settings_are_built(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def usable() -> int:
        calls.append(1)
        return 3

    monkeypatch.setattr("service.settings.usable_cpus", usable)
    monkeypatch.setenv("LUNGSERVE_PREPROCESS_WORKERS", "2")
    assert Settings().workers == 3
    assert Settings().workers == 3
    assert len(calls) == 2  # each build reads them again (a container may be resized)
    monkeypatch.setenv("LUNGSERVE_WORKERS", "1")
    assert Settings().workers == 1
    assert len(calls) == 2  # pinned: not read at all
    # Decode threads too: the usable CPUs (a pod's limit), not the node's cores.
    monkeypatch.delenv("LUNGSERVE_PREPROCESS_WORKERS")
    assert Settings().preprocess_workers == 3


def test_workers_default_never_exceeds_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.settings.usable_cpus", lambda: 4096)
    assert Settings().workers == 1024
