"""The job store's own errors (both store implementations raise them)."""

from __future__ import annotations

from service.errors import LungserveError


class JobStoreError(LungserveError):
    """The job store cannot be read or written (a 503: the data is safe, the store is not reachable)."""

    code = "job_store_unavailable"
    status = 503


class SourceTooLarge(LungserveError):
    code = "image_too_large"
    status = 413
