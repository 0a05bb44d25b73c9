"""The gRPC side of the one error mapping: every domain error gets the status a gRPC client expects."""

from __future__ import annotations

import pytest

from service.errors import (
    ClientGone,
    DeadlineExceeded,
    ImageTooLarge,
    InferenceFailed,
    InvalidImage,
    LungserveError,
    NotFound,
    Overloaded,
    ShuttingDown,
    TooManyFiles,
    Unauthorized,
)
from service.http.errors import grpc_status, http_error
from service.oip.tensors import InvalidInferRequest


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidInferRequest("x"), "INVALID_ARGUMENT"),
        (InvalidImage("x"), "INVALID_ARGUMENT"),
        (ImageTooLarge("x"), "RESOURCE_EXHAUSTED"),
        (TooManyFiles("x"), "RESOURCE_EXHAUSTED"),
        (Unauthorized("x"), "UNAUTHENTICATED"),
        (NotFound("x"), "NOT_FOUND"),
        (Overloaded("x", retry_after_s=2), "UNAVAILABLE"),
        (ShuttingDown("x"), "UNAVAILABLE"),
        (DeadlineExceeded("x"), "DEADLINE_EXCEEDED"),
        (ClientGone("x"), "CANCELLED"),
        (InferenceFailed("x"), "INTERNAL"),
        (LungserveError("x"), "INTERNAL"),
    ],
)
def test_grpc_status(error: LungserveError, status: str) -> None:
    assert grpc_status(error) == status


def test_oip_shape_keeps_status_and_headers() -> None:
    err = http_error(Overloaded("full", retry_after_s=2), "rid", oip=True)
    assert (err.status, err.body, err.headers) == (503, {"error": "full"}, {"Retry-After": "2"})
