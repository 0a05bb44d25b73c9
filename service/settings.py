"""Service configuration: one `Settings` object, read from `LUNGSERVE_*` environment variables.

There is deliberately no module-level instance: `create_app(settings)` receives one (or
builds one), so tests construct their own and nothing reads the environment at import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.cpus import usable_cpus

ProviderPolicy = Literal["auto", "cuda", "cpu"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
# Where inference runs when LUNGSERVE_WORKERS > 1 (docs/topology.md): one model process for every
# front, or a model in each front. auto: the model process with CUDA, else in the fronts.
InferencePlacement = Literal["auto", "model-process", "in-front"]

# Resolved from the installed package, so the default works from any working directory.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "bundled_model"

MiB = 1024 * 1024


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _state_home() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")


def _default_decode_threads() -> int:
    # The CPUs it may use, not os.cpu_count(): in a pod limited to 2 CPUs on a 64-core node,
    # 64 decode threads per front would only contend (and hold 64 images' pixels).
    return min(usable_cpus(), 1024)


def _default_fronts() -> int:
    """LUNGSERVE_WORKERS unset: one front per CPU this process may use (read when Settings are built)."""
    return min(usable_cpus(), 1024)


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
    grpc_port: int | None = Field(
        default=None, ge=0, le=65535, description="also serve the Open Inference Protocol over gRPC here (grpc extra)"
    )

    # --- batching ---
    # 4 on CPU (docs/benchmarks/PROFILE.md): ORT's CPU time per image grows with the batch, and two
    # runs of 16 in flight grow its arena by ~70 MiB. With CUDA, raise it (16-64).
    max_batch_size: int = Field(
        default=4, ge=1, le=1024, description="images per ORT run (4 suits CPU; raise to 16-64 with CUDA)"
    )
    max_batch_size_cuda: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="images per ORT run when the session really runs on CUDA; unset: LUNGSERVE_MAX_BATCH_SIZE",
    )
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

    # --- processes (docs/topology.md) ---
    workers: int = Field(
        default_factory=_default_fronts,
        ge=1,
        le=1024,
        description=(
            "front processes sharing the port; default: the CPUs this process may use (its affinity, capped by "
            "a cgroup CPU quota, e.g. a pod's CPU limit); 1: one process"
        ),
    )
    inference: InferencePlacement = Field(
        default="auto", description="with several workers: auto, model-process (one per device) or in-front"
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
        default_factory=_default_decode_threads, ge=1, le=1024, description="decode threads (Pillow drops the GIL)"
    )

    # --- upload limits (all refused with 413 / 422 JSON, never 500) ---
    max_file_bytes: int = Field(default=20 * MiB, ge=1, description="bytes per uploaded file")
    max_files_per_request: int = Field(default=64, ge=1, le=10_000, description="files per /predict-many")
    max_request_bytes: int = Field(default=128 * MiB, ge=1, description="whole multipart body of /predict-many")
    # Pillow itself refuses above 2 x its own MAX_IMAGE_PIXELS (178,956,970) before our check runs.
    max_image_pixels: int = Field(
        default=50_000_000, ge=1, le=178_956_970, description="width x height per decoded image"
    )
    max_slide_bytes: int = Field(
        default=4096 * MiB, ge=1, description="bytes of one /analyze or /jobs slide (spooled to disk, not memory)"
    )

    # --- slide jobs (service.jobs; docs/pathology.md) ---
    jobs_uri: str = Field(
        default_factory=lambda: str(_state_home() / "lungserve" / "jobs"),
        description="where slide jobs, their checkpoints and results live: a folder or s3://bucket/prefix",
    )
    jobs_concurrency: int = Field(default=1, ge=1, le=64, description="slide jobs running at once; others wait queued")
    jobs_queue_share: float = Field(
        default=0.25, gt=0.0, le=1.0, description="most of LUNGSERVE_QUEUE_LIMIT that job tiles may hold at once"
    )
    jobs_checkpoint_tiles: int = Field(
        default=64, ge=1, le=100_000, description="tiles per checkpoint: at most this many are redone after a restart"
    )
    jobs_max_tiles: int = Field(
        default=200_000, ge=1, description="tiles in one slide's grid (checked from its header), else 413"
    )

    # --- hostile clients (docs/reliability.md) ---
    max_request_pixels: int = Field(
        default=256_000_000, ge=1, description="decoded pixels per request (JPEG counted at its draft size), else 413"
    )
    large_image_pixels: int = Field(
        default=4_000_000,
        ge=1,
        description="decoded pixels from which an image goes to the one-thread large-image lane",
    )
    max_uploads_in_flight: int = Field(
        default=1024, ge=1, description="request bodies being received at once, else 503"
    )
    max_body_bytes_in_flight: int = Field(
        default=256 * MiB, ge=1, description="request body bytes held at once (declared or the route's limit), else 503"
    )
    min_upload_rate_bytes_s: float = Field(
        default=16 * 1024, ge=0.0, description="average body rate after the grace period, else 408; 0: off"
    )
    upload_rate_grace_s: float = Field(default=5.0, ge=0.0, le=3600.0, description="before the upload rate applies")
    max_connections: int = Field(default=2048, ge=1, description="open connections; beyond, JSON 503 and close")
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description="request line + headers, else 431")
    header_timeout_s: float = Field(default=10.0, gt=0.0, le=3600.0, description="to receive the headers, else 408")
    keep_alive_timeout_s: float = Field(default=5.0, gt=0.0, le=3600.0, description="idle keep-alive connections")
    shutdown_delay_s: float = Field(
        default=5.0,
        ge=0.0,
        le=3600.0,
        description="after SIGTERM: /health/ready answers 503 this long before the listener closes",
    )

    # --- the refer decision (service.model.decision; docs/decision.md) ---
    refer_below: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="refer when the calibrated max probability is below this; None: the manifest's",
    )
    ood_above: float | None = Field(
        default=None,
        ge=0.0,
        description="refer as out of distribution when the model's ood_score is above this; None: the manifest's",
    )
    tissue_check: bool = Field(
        default=True,
        description=(
            "refer images that are not plausible H&E tiles (service.model.tissue); false: only the model decides"
        ),
    )

    # --- admin ---
    admin_token: SecretStr | None = Field(default=None, description="bearer token for admin endpoints")
    admin_port: int | None = Field(
        default=None, ge=0, le=65535, description="serve /admin and /metrics only on this port (same host)"
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "addresses or networks of the reverse proxies whose X-Forwarded-For/-Proto are believed "
            '(comma-separated or JSON list, "*" any); unset: none, the peer address is the client'
        ),
    )
    admin_auth_failures_per_minute: int = Field(
        default=10, ge=1, description="401s per client address and minute before admin answers 429"
    )

    # --- client access (see service/http/access.py) ---
    api_keys_file: Path | None = Field(
        default=None,
        description="file of NAME:KEY lines; when set, prediction routes need one of the keys; unset: open",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='origins allowed to call the API from a browser: JSON list or comma-separated; "*" any',
    )

    # --- logs (read by `lungserve serve`; see service.observability.logs) ---
    log_json: bool = Field(default=True, description="one JSON object per log line on stderr; false: plain text")
    log_level: LogLevel = Field(default="INFO", description="DEBUG also logs /metrics scrapes and health probes")

    @field_validator("cors_origins", "forwarded_allow_ips", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        # NoDecode: the raw environment string arrives here, JSON or comma-separated.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("jobs_uri")
    @classmethod
    def _jobs_location(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        scheme = parts.scheme.lower()
        # One letter is a Windows drive ("C:/jobs"), not a scheme.
        if (scheme == "s3" and not parts.netloc) or (len(scheme) > 1 and scheme not in ("s3", "file")):
            raise ValueError("expected a folder, file:///path or s3://bucket/prefix")
        return value.strip()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        # Messages name the variables an operator sets, as every other settings error does.
        if self.max_batch_size > self.queue_limit:
            raise ValueError(
                f"LUNGSERVE_MAX_BATCH_SIZE ({self.max_batch_size}) must not exceed "
                f"LUNGSERVE_QUEUE_LIMIT ({self.queue_limit})"
            )
        if self.max_batch_size_cuda is not None and self.max_batch_size_cuda > self.queue_limit:
            raise ValueError(
                f"LUNGSERVE_MAX_BATCH_SIZE_CUDA ({self.max_batch_size_cuda}) must not exceed "
                f"LUNGSERVE_QUEUE_LIMIT ({self.queue_limit})"
            )
        if self.max_files_per_request > self.queue_limit:
            # A /predict-many that can never be admitted would be refused forever.
            raise ValueError(
                f"LUNGSERVE_MAX_FILES_PER_REQUEST ({self.max_files_per_request}) must not exceed "
                f"LUNGSERVE_QUEUE_LIMIT ({self.queue_limit})"
            )
        if self.max_body_bytes_in_flight < self.max_request_bytes:
            raise ValueError(
                f"LUNGSERVE_MAX_BODY_BYTES_IN_FLIGHT ({self.max_body_bytes_in_flight}) must be >= "
                f"LUNGSERVE_MAX_REQUEST_BYTES ({self.max_request_bytes}), or a full /predict-many could never be read"
            )
        if self.max_request_pixels < self.max_image_pixels:
            raise ValueError(
                f"LUNGSERVE_MAX_REQUEST_PIXELS ({self.max_request_pixels}) must be >= "
                f"LUNGSERVE_MAX_IMAGE_PIXELS ({self.max_image_pixels})"
            )
        if self.admin_port is not None and self.admin_port == self.port and self.port != 0:
            raise ValueError(f"LUNGSERVE_ADMIN_PORT ({self.admin_port}) must differ from LUNGSERVE_PORT ({self.port})")
        if self.max_request_bytes < self.max_file_bytes:
            raise ValueError(
                f"LUNGSERVE_MAX_REQUEST_BYTES ({self.max_request_bytes}) must be >= "
                f"LUNGSERVE_MAX_FILE_BYTES ({self.max_file_bytes})"
            )
        return self


def env_name(field: str) -> str:
    """The environment variable of a settings field: `max_batch_size` -> `LUNGSERVE_MAX_BATCH_SIZE`."""
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def describe_error(exc: ValidationError) -> str:
    """One line per problem, naming the variable (as the README says), never the field."""
    lines = []
    for error in exc.errors():
        loc = error.get("loc", ())
        message = str(error.get("msg", "invalid"))
        if loc and isinstance(loc[0], str) and loc[0] in Settings.model_fields:
            value = error.get("input")
            shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
            lines.append(f"{env_name(loc[0])}: {message}{shown}")
        else:
            lines.append(message.removeprefix("Value error, "))
    return "\n".join(lines)


def describe_settings() -> str:
    """Every setting as `lungserve serve --help` lists it: variable, default, meaning."""
    lines = []
    for name, info in Settings.model_fields.items():
        if name == "model_uri":
            default = "the bundled model"
        elif name == "workers":
            default = "the usable CPUs"
        elif info.default_factory is not None:
            default = "computed"
        elif info.default is None:
            default = "unset"
        else:
            default = str(info.default)
        lines.append(f"  {env_name(name)} (default: {default})")
        if info.description:
            lines.append(f"      {info.description}")
    return "\n".join(lines)
