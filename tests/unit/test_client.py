"""The Python client's retry rule and its parsing of answers (the HTTP path is tested e2e)."""

from __future__ import annotations

import pytest

from service.clients.http_client import Prediction, RetryPolicy


@pytest.mark.parametrize("attempt", [1, 2, 3, 6, 12])
def test_backoff_grows_is_capped_and_honours_retry_after(attempt: int) -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0)
    backoff = min(4.0, 0.5 * 2 ** (attempt - 1))
    for _ in range(50):
        assert backoff / 2 <= policy.delay(attempt, None) <= backoff
        # Never sooner than the server asked, whatever the backoff says.
        assert policy.delay(attempt, "7") >= 7.0
        assert backoff / 2 <= policy.delay(attempt, "Wed, 21 Oct 2015 07:28:00 GMT") <= backoff


def test_prediction_from_answers() -> None:
    answer = {
        "filename": "t.jpeg",
        "label": "lung_scc",
        "confidence": 0.8,
        "probabilities": {"lung_aca": 0.1, "lung_n": 0.1, "lung_scc": 0.8},
        "decision": "refer",
        "reason": "low_confidence",
        "model": {"name": "m", "version": "v2"},
    }
    p = Prediction.from_json(answer, "dir/t.jpeg")
    assert (p.file, p.label, p.decision, p.reason, p.model_version, p.ok) == (
        "dir/t.jpeg",
        "lung_scc",
        "refer",
        "low_confidence",
        "v2",
        True,
    )
    e = Prediction.from_json({"filename": "x.txt", "error": {"code": "invalid_image", "message": "empty"}})
    assert (e.file, e.ok, e.error, e.label) == ("x.txt", False, "invalid_image: empty", None)
    # An answer from a server without decisions has none.
    del answer["decision"], answer["reason"]
    assert Prediction.from_json(answer).decision is None
