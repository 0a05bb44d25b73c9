"""The batch rule, pure: `dispatch_delay` without a batcher or an event loop."""

from __future__ import annotations

from typing import Any

import pytest

from service.core.batch_rule import dispatch_delay
from service.core.batcher import dispatch_delay as reexported


def test_the_batcher_reexports_the_rule() -> None:
    assert reexported is dispatch_delay


RULE: dict[str, Any] = {"max_batch_size": 4, "max_batch_delay_s": 0.005, "dispatch_when_idle": True, "draining": False}


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"queued": 4, "oldest_wait_s": 0.0, "on_their_way": 9}, 0.0),  # full
        ({"queued": 1, "oldest_wait_s": 0.0, "on_their_way": 0}, 0.0),  # nothing more is coming
        ({"queued": 1, "oldest_wait_s": 0.002, "on_their_way": 2}, 0.003),  # wait for the rest of the delay
        ({"queued": 1, "oldest_wait_s": 0.009, "on_their_way": 2}, 0.0),  # the delay is over
        ({"queued": 1, "oldest_wait_s": 0.0, "on_their_way": 2, "draining": True}, 0.0),
        ({"queued": 1, "oldest_wait_s": 0.0, "on_their_way": 0, "dispatch_when_idle": False}, 0.005),
    ],
)
def test_dispatch_delay(state: dict[str, Any], expected: float) -> None:
    assert dispatch_delay(**(RULE | state)) == pytest.approx(expected)
