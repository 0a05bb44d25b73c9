"""Response models of the HTTP API, with their OpenAPI examples."""

from __future__ import annotations

import base64
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.model_client import Classified
from service.errors import LungserveError
from service.model.decision import DecisionName, Reason

_CLASSES_EXAMPLE: Final[dict[str, Any]] = {"lung_aca": 0.991, "lung_n": 0.001, "lung_scc": 0.008}
_MODEL_EXAMPLE: Final[dict[str, Any]] = {"name": "lungserve-lung-cnn", "version": "2026.11.22-6d5d6424"}
_PREDICTION_EXAMPLE: Final[dict[str, Any]] = {
    "label": "lung_aca",
    "confidence": 0.991,
    "probabilities": _CLASSES_EXAMPLE,
    "decision": "accept",
    "reason": None,
    "model": _MODEL_EXAMPLE,
}
_FILE_PREDICTION_EXAMPLE: Final[dict[str, Any]] = {**_PREDICTION_EXAMPLE, "filename": "tile-001.jpeg"}
_REFERRED_EXAMPLES: Final[list[dict[str, Any]]] = [
    {
        "filename": "tile-002.jpeg",
        "label": "lung_scc",
        "confidence": 0.618,
        "probabilities": {"lung_aca": 0.377, "lung_n": 0.005, "lung_scc": 0.618},
        "decision": "refer",
        "reason": "low_confidence",
        "model": _MODEL_EXAMPLE,
    },
    {
        "filename": "holiday.jpeg",
        "label": "lung_n",
        "confidence": 0.987,
        "probabilities": {"lung_aca": 0.004, "lung_n": 0.987, "lung_scc": 0.009},
        "decision": "refer",
        "reason": "out_of_distribution",
        "model": _MODEL_EXAMPLE,
    },
]


class ErrorInfo(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. invalid_image")
    message: str = Field(description="what was wrong, for a human")
    request_id: str | None = Field(default=None, description="the X-Request-ID of the request, when known")


class FileErrorInfo(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"error": {"code": "invalid_image", "message": "the file is empty"}}]}
    )
    error: ErrorInfo


def error_examples(*errors: tuple[str, str]) -> dict[str, Any]:
    """`content` for one status of an OpenAPI `responses` table: one example per error code it can
    carry (Swagger UI shows a picker), so each status shows its own errors."""
    return {
        "application/json": {
            "examples": {
                code: {"summary": code, "value": {"error": {"code": code, "message": message, "request_id": "3f2a9c"}}}
                for code, message in errors
            }
        }
    }


def multipart_body(field: str, many: bool) -> dict[str, Any]:
    """`openapi_extra` describing an upload route's form (the routes parse the body themselves)."""
    # minLength: an empty file is never an image (422), so the schema says so.
    binary: dict[str, Any] = {"type": "string", "format": "binary", "minLength": 1}
    schema = {"type": "array", "items": binary} if many else binary
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "required": [field], "properties": {field: schema}}
                }
            },
        }
    }


# The error answers every upload route documents.
ERROR_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    400: {
        "model": ErrorResponse,
        "description": "malformed multipart body or HTTP framing",
        "content": error_examples(("bad_request", "malformed multipart body: it ends before the closing boundary")),
    },
    408: {
        "model": ErrorResponse,
        "description": "the body arrived below the minimum upload rate",
        "content": error_examples(
            ("upload_too_slow", "the request body arrived at under 16384 bytes/s (LUNGSERVE_MIN_UPLOAD_RATE_BYTES_S)")
        ),
    },
    401: {
        "model": ErrorResponse,
        "description": "no valid API key (only when LUNGSERVE_API_KEYS_FILE is set)",
        "content": error_examples(("unauthorized", "the API key is not valid")),
    },
    413: {
        "model": ErrorResponse,
        "description": "file, image or request too large; too many files",
        "content": error_examples(
            ("image_too_large", "image is 12000x9000 = 108000000 pixels; the limit is 50000000"),
            ("too_many_files", "more than 64 file(s) in field 'files'"),
            ("request_too_large", "the request body is over 134217728 bytes"),
        ),
    },
    415: {
        "model": ErrorResponse,
        "description": "not a multipart/form-data body",
        "content": error_examples(
            ("unsupported_media_type", "expected a multipart/form-data body with field 'file', got application/json")
        ),
    },
    422: {
        "model": ErrorResponse,
        "description": "missing field, or not a decodable image",
        "content": error_examples(
            ("missing_field", "no file in multipart field 'file' (sent: 'image')"),
            ("invalid_image", "not a decodable image (expected JPEG, PNG, TIFF or BMP)"),
        ),
    },
    503: {
        "model": ErrorResponse,
        "description": "overloaded (with Retry-After), loading or shutting down",
        "content": error_examples(
            ("overloaded", "the server is at capacity (256 images admitted); retry shortly"),
            ("model_not_ready", "the model is still loading or warming up"),
            ("shutting_down", "the server is shutting down"),
        ),
    },
    504: {
        "model": ErrorResponse,
        "description": "no answer within the request deadline",
        "content": error_examples(("deadline_exceeded", "no answer within the request deadline of 30 s")),
    },
}


class ModelRef(BaseModel):
    name: str
    version: str


class PredictionResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_PREDICTION_EXAMPLE]})
    label: str = Field(description="the most probable class")
    confidence: float = Field(description="the calibrated probability of `label`")
    probabilities: dict[str, float] = Field(description="calibrated probability of every class, in model order")
    decision: DecisionName = Field(
        description="accept: the label may be used as it is; refer: a pathologist should look at this image"
    )
    reason: Reason | None = Field(
        description=(
            "why it was referred (null when accepted): low_confidence -- the calibrated confidence is below "
            "the refer threshold; out_of_distribution -- not a plausible H&E tile, or unlike the training data"
        )
    )
    model: ModelRef = Field(description="the model that computed this answer")


class FilePrediction(PredictionResponse):
    """One file's answer in /predict-many: /predict's answer plus the file's name."""

    model_config = ConfigDict(json_schema_extra={"examples": [_FILE_PREDICTION_EXAMPLE]})
    filename: str | None


class FileError(BaseModel):
    filename: str | None
    error: FileErrorInfo


class PredictManyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "results": [
                        _FILE_PREDICTION_EXAMPLE,
                        *_REFERRED_EXAMPLES,
                        {
                            "filename": "notes.txt",
                            "error": {
                                "code": "invalid_image",
                                "message": "not a decodable image (expected JPEG, PNG, TIFF or BMP)",
                            },
                        },
                    ]
                }
            ]
        }
    )
    results: list[FilePrediction | FileError] = Field(description="one entry per uploaded file, in upload order")


class LiveResponse(BaseModel):
    status: Literal["alive"] = "alive"


class ReadyResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"status": "ready", "model": _MODEL_EXAMPLE, "provider": "CPUExecutionProvider"}]
        }
    )
    status: Literal["ready"] = "ready"
    model: ModelRef
    provider: str


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_batch_delay_s: float
    queue_limit: int
    max_in_flight_batches: int
    request_deadline_s: float


class UploadLimitsInfo(BaseModel):
    max_file_bytes: int
    max_files_per_request: int
    max_request_bytes: int
    max_image_pixels: int


class DecisionInfo(BaseModel):
    """The refer thresholds in force: the manifest's, or the settings that override them."""

    refer_below: float | None = Field(description="refer as low_confidence below this confidence; null: off")
    ood_above: float | None = Field(description="refer as out_of_distribution above this ood_score; null: off")
    ood_score: bool = Field(description="whether this model computes an ood_score")
    tissue_check: bool = Field(
        description="whether the image-level H&E tissue check refers images (service.model.tissue)"
    )


class ModelInfoResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "manifest": {
                        **_MODEL_EXAMPLE,
                        "classes": ["lung_aca", "lung_n", "lung_scc"],
                        "input_name": "image",
                        "output_name": "probabilities",
                        "input_size": 128,
                        "input_dtype": "uint8",
                        "...": "every other key of model.json",
                    },
                    "provider": "CPUExecutionProvider",
                    "batching": {
                        "max_batch_size": 4,
                        "max_batch_delay_s": 0.005,
                        "queue_limit": 256,
                        "max_in_flight_batches": 1,
                        "request_deadline_s": 30.0,
                    },
                    "decision": {"refer_below": 0.93, "ood_above": 41.7, "ood_score": True, "tissue_check": True},
                    "limits": {
                        "max_file_bytes": 20971520,
                        "max_files_per_request": 64,
                        "max_request_bytes": 134217728,
                        "max_image_pixels": 50000000,
                    },
                }
            ]
        }
    )
    manifest: dict[str, Any] = Field(description="model.json of the model being served")
    provider: str = Field(description="the ONNX Runtime execution provider really in use")
    source: dict[str, str | None] | None = Field(
        default=None, description="where the model was fetched from (URI, S3 ETag / version id)"
    )
    batching: BatchingInfo
    limits: UploadLimitsInfo
    decision: DecisionInfo


def prediction(result: Classified) -> PredictionResponse:
    """/predict's answer for one classified image."""
    return PredictionResponse(**_prediction_fields(result))


def file_prediction(filename: str | None, result: Classified) -> FilePrediction:
    """/predict-many's answer for one classified file."""
    return FilePrediction(filename=filename, **_prediction_fields(result))


def file_error(filename: str | None, error: LungserveError) -> FileError:
    return FileError(filename=filename, error=FileErrorInfo(code=error.code, message=error.message))


def _prediction_fields(result: Classified) -> dict[str, Any]:
    manifest = result.manifest
    return {
        "label": result.label,
        "confidence": result.confidence,
        "probabilities": result.by_class(),
        "decision": result.decision.decision,
        "reason": result.decision.reason,
        "model": ModelRef(name=manifest.name, version=manifest.version),
    }


# --- /explain and /analyze ------------------------------------------------------------------


class ExplanationInfo(BaseModel):
    method: Literal["grad-cam"] = "grad-cam"
    layer: str = Field(description="the model output holding the last conv block's activations")
    class_name: str = Field(
        serialization_alias="class", description="the class explained (asked for, else the predicted one)"
    )
    grid: list[list[float]] = Field(
        description="the Grad-CAM map at feature-map resolution (rows of columns), divided by its peak: 0..1"
    )
    grid_peak: float = Field(description="the map's maximum before normalisation (0: no positive evidence)")
    overlay_png: str = Field(description="base64 PNG: the map upsampled over the uploaded image (viridis)")
    media_type: Literal["image/png"] = "image/png"
    overlay_width: int
    overlay_height: int


class ExplainResponse(PredictionResponse):
    explanation: ExplanationInfo


class TileAnswer(BaseModel):
    x: int = Field(description="left edge in source pixels")
    y: int = Field(description="top edge in source pixels")
    width: int
    height: int
    label: str
    confidence: float
    probabilities: dict[str, float]
    decision: str = Field(default="accept", description="accept | refer")
    reason: str | None = Field(default=None, description="why a tile is referred, else null")


class AnalysisSummary(BaseModel):
    tiles: int = Field(description="tiles in the grid")
    tissue_tiles: int = Field(description="tiles classified")
    background_tiles: int = Field(description="mostly white tiles, skipped")
    referred_tiles: int = Field(description="tissue tiles whose decision is refer")
    tissue_tiles_by_class: dict[str, int]
    tissue_share: dict[str, float] = Field(description="share of tissue tiles per predicted class (sums to 1)")


class SourceInfo(BaseModel):
    reader: str = Field(
        description="pillow (plain images), tiff-strips (plain stripped TIFF) or openslide (tiled TIFF, slide formats)"
    )
    format: str
    mpp: float | None = Field(default=None, description="microns per pixel at full resolution, when the file says")
    levels: int = Field(default=1, description="pyramid levels in the file")


class AnalyzeResponse(BaseModel):
    width: int = Field(description="image width in source pixels")
    height: int
    tile_source_px: int = Field(description="tile side in source pixels (the model's training scale)")
    input_size: int = Field(description="model input side each tile is resized to")
    source: SourceInfo
    tiles: list[TileAnswer] = Field(description="every classified (tissue) tile, row by row")
    summary: AnalysisSummary
    colours: dict[str, str] = Field(description="the class colours of the overlay")
    overlay_png: str = Field(description="base64 PNG: the class map over a thumbnail of the image")
    thumbnail_png: str = Field(description="base64 PNG: the same thumbnail without the map")
    overlay_width: int
    overlay_height: int
    model: ModelRef


def b64(data: bytes) -> str:
    """PNG bytes as the base64 text a JSON answer carries."""
    return base64.b64encode(data).decode("ascii")
