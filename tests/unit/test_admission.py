"""UploadGate: upload slots until the body is read, body bytes until the response; 503 first."""

from __future__ import annotations

import pytest

from service.core.admission import UploadGate
from service.errors import Overloaded


def test_upload_slots_free_when_the_body_is_read() -> None:
    gate = UploadGate(max_uploads=2, max_body_bytes=1000, retry_after_s=3)
    a, b = gate.admit(10), gate.admit(10)
    with pytest.raises(Overloaded, match="MAX_UPLOADS_IN_FLIGHT") as info:
        gate.admit(10)
    assert info.value.retry_after_s == 3
    a.body_read()
    a.body_read()  # idempotent
    c = gate.admit(10)
    assert (gate.uploads, gate.body_bytes) == (2, 30)
    for ticket in (a, b, c):
        ticket.close()
        ticket.close()
    assert (gate.uploads, gate.body_bytes) == (0, 0)


def test_body_bytes_are_held_until_the_response() -> None:
    gate = UploadGate(max_uploads=10, max_body_bytes=250, retry_after_s=1)
    with gate.admit(120) as first:
        first.body_read()
        with gate.admit(120), pytest.raises(Overloaded, match="MAX_BODY_BYTES_IN_FLIGHT"):
            gate.admit(120)
    assert gate.body_bytes == 0
    gate.admit(250).close()
