"""Domain errors: every layer raises these plain exceptions, framework-free.

Each has a `code` and an HTTP `status`; `service.http.errors` is the one place that turns them
into answers.
"""

from __future__ import annotations


class LungserveError(Exception):
    """Base of every error the service reports to a client."""

    code: str = "internal_error"
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(LungserveError):
    code = "bad_request"
    status = 400


class InvalidImage(BadRequest):
    """The bytes are not a decodable image (empty, truncated, unknown format...)."""

    code = "invalid_image"
    status = 422


class ImageTooLarge(LungserveError):
    """Too many bytes or too many pixels: refused before (or instead of) decoding."""

    code = "image_too_large"
    status = 413


class RequestTooLarge(LungserveError):
    """The whole body is over the limit (declared or streamed): refused before it is read."""

    code = "request_too_large"
    status = 413


class UnsupportedMediaType(BadRequest):
    """The body is not multipart/form-data."""

    code = "unsupported_media_type"
    status = 415


class UploadTooSlow(BadRequest):
    """The body arrived slower than the minimum upload rate: its slot goes to someone else."""

    code = "upload_too_slow"
    status = 408


class TooManyFiles(LungserveError):
    code = "too_many_files"
    status = 413


class MissingField(BadRequest):
    code = "missing_field"
    status = 422


class Overloaded(LungserveError):
    """The bounded queue is full: shed load now rather than queue without limit."""

    code = "overloaded"
    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyRequests(LungserveError):
    """Too many failed attempts from one client (admin authentication): wait before retrying."""

    code = "too_many_requests"
    status = 429

    def __init__(self, message: str, retry_after_s: int = 60) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(LungserveError):
    code = "deadline_exceeded"
    status = 504


class ClientGone(LungserveError):
    """The client disconnected while its images were waiting; nobody reads this answer."""

    code = "client_closed_request"
    status = 499  # nginx's convention; only ever seen in logs and metrics


class ModelNotReady(LungserveError):
    code = "model_not_ready"
    status = 503


class ShuttingDown(LungserveError):
    code = "shutting_down"
    status = 503


class JobsUnavailable(LungserveError):
    """Several fronts: the front that runs slide jobs (front 0) is not answering -- restarting
    after a crash, or still starting. The request was not delivered; the client retries."""

    code = "jobs_unavailable"
    status = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InferenceFailed(LungserveError):
    """The model run for this request's batch failed; other batches are unaffected."""

    code = "inference_failed"
    status = 500


class Unauthorized(LungserveError):
    code = "unauthorized"
    status = 401


class NotFound(LungserveError):
    code = "not_found"
    status = 404


class UnknownClass(BadRequest):
    """`/explain?class=` names a class the model does not have."""

    code = "unknown_class"
    status = 422


class ExplainUnavailable(LungserveError):
    """The model being served has no Grad-CAM outputs (feature_maps, cam_weights).

    A 4xx, not 501: the server implements /explain, the current model (a state that a reload
    changes) cannot be explained, and no answer of lungserve is a 5xx unless it is a fault.
    """

    code = "explain_unavailable"
    status = 409


class TooManyTiles(LungserveError):
    """A large image has more tiles than the server can admit at once."""

    code = "too_many_tiles"
    status = 413


class InsufficientStorage(LungserveError):
    """The disk an upload is spooled to (TMPDIR) is full; the request is refused, the server goes on."""

    code = "insufficient_storage"
    status = 507


class ModelSourceError(Exception):
    """The model could not be fetched or verified. Fatal at startup, refused on reload."""


class ModelRejected(LungserveError):
    """A reload found a model it could not fetch, verify or warm up; the old one keeps serving."""

    code = "model_rejected"
    status = 409


def one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace (multi-line library errors) and cap the length: one log line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
