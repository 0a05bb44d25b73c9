"""Service configuration: one `Settings` object, read from `LUNGSERVE_*` environment variables.

There is deliberately no module-level instance: `create_app(settings)` receives one (or
builds one), so tests construct their own and nothing reads the environment at import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ProviderPolicy = Literal["auto", "cuda", "cpu"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

# Resolved from the installed package, so the default works from any working directory.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "bundled_model"

MiB = 1024 * 1024


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _default_workers() -> int:
    return os.cpu_count() or 1


class Settings(BaseSettings):
    """Every knob of the server; `LUNGSERVE_<FIELD>` in the environment overrides the default."""

    model_config = SettingsConfigDict(env_prefix="LUNGSERVE_", extra="ignore", frozen=True)

    # --- model ---
    model_uri: str = Field(
        default=str(BUNDLED_MODEL_DIR),
        description="folder holding model.json + model.onnx (s3:// URIs are handled by the model source)",
    )

    model_cache_dir: Path = Field(
        default_factory=lambda: _cache_home() / "lungserve" / "models",
        description="where models fetched from S3 are cached (verified by sha256)",
    )
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (MinIO, moto)")
    s3_region: str | None = Field(default=None, description="None: the AWS chain's region")
    model_fetch_timeout_s: float = Field(default=300.0, gt=0.0, le=86_400.0, description="whole model fetch")
    s3_max_attempts: int = Field(
        default=5, ge=1, le=50, description="tries per S3 request (botocore standard retries, exponential backoff)"
    )
    model_poll_interval_s: float | None = Field(
        default=None, gt=0.0, description="check the S3 manifest's ETag this often and reload on change; None: off"
    )

    # --- HTTP server (used by `lungserve serve`; the app itself does not bind) ---
    host: str = Field(default="127.0.0.1", description="bind address; 0.0.0.0 only inside a container")
    port: int = Field(default=8000, ge=0, le=65535)

    # --- batching ---
    max_batch_size: int = Field(default=16, ge=1, le=1024, description="images per ORT run")
    max_batch_delay_s: float = Field(
        default=0.005, ge=0.0, le=1.0, description="longest wait for a batch to fill after its first image"
    )
    queue_limit: int = Field(
        default=256, ge=1, description="images admitted but not yet answered; beyond it requests get 503"
    )
    max_in_flight_batches: int = Field(
        default=2, ge=1, le=64, description="model runs at once (on CPU each uses one ORT thread by default)"
    )
    request_deadline_s: float = Field(
        default=30.0, gt=0.0, le=3600.0, description="upload + decode + queue + inference, else 504"
    )
    retry_after_s: int = Field(default=1, ge=1, le=3600, description="Retry-After sent with 503 overload")
    drain_timeout_s: float = Field(
        default=30.0, ge=0.0, le=3600.0, description="at shutdown, how long queued work may finish"
    )

    # --- ONNX Runtime ---
    provider: ProviderPolicy = Field(
        default="auto", description="auto: CUDA if really active else CPU; cuda: refuse to start without it"
    )
    ort_intra_op_threads: int | None = Field(
        default=None, ge=1, le=1024, description="None: 1 per run on CPU (runs overlap instead), ORT's default on CUDA"
    )
    ort_inter_op_threads: int | None = Field(default=None, ge=1, le=1024, description="None = ORT default")

    # --- preprocessing ---
    preprocess_workers: int = Field(
        default_factory=_default_workers, ge=1, le=1024, description="decode threads (Pillow drops the GIL)"
    )

    # --- upload limits (all refused with 413 / 422 JSON, never 500) ---
    max_file_bytes: int = Field(default=20 * MiB, ge=1, description="bytes per uploaded file")
    max_files_per_request: int = Field(default=64, ge=1, le=10_000, description="files per /predict-many")
    max_request_bytes: int = Field(
        default=128 * MiB, ge=1, description="whole multipart body of /predict-many"
    )
    max_image_pixels: int = Field(default=50_000_000, ge=1, description="width x height per decoded image")
    max_slide_bytes: int = Field(
        default=4096 * MiB, ge=1, description="bytes of one /analyze upload (spooled to a temporary file, not memory)"
    )

    # --- admin ---
    admin_token: SecretStr | None = Field(default=None, description="bearer token for admin endpoints")

    # --- logs (read by `lungserve serve`; see service.logs) ---
    log_json: bool = Field(default=True, description="one JSON object per log line on stderr; false: plain text")
    log_level: LogLevel = Field(default="INFO", description="DEBUG also logs /metrics scrapes and health probes")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.max_batch_size > self.queue_limit:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size}) must not exceed queue_limit ({self.queue_limit})"
            )
        if self.max_files_per_request > self.queue_limit:
            # A /predict-many that can never be admitted would be refused forever.
            raise ValueError(
                f"max_files_per_request ({self.max_files_per_request}) must not exceed "
                f"queue_limit ({self.queue_limit})"
            )
        if self.max_request_bytes < self.max_file_bytes:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) must be >= max_file_bytes ({self.max_file_bytes})"
            )
        return self
