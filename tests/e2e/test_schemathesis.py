"""schemathesis against a real `lungserve serve`: generated requests for every operation in
/openapi.json (fixed seed), failing on any 5xx, any response off its documented schema, status
or content type. The schema says what it can: required multipart fields, non-empty files.

(schemathesis' pytest plugin, `from_fixture`, breaks on pytest 9: it reads a private node
attribute. Each operation's Hypothesis strategy is driven directly instead.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis.strategies import SearchStrategy

from tests.e2e.server import start_server, wait_ready

pytestmark = [pytest.mark.e2e]

# Operations with a body (7 doors: /predict, /predict-many, OIP infer x2, /explain, /analyze, /jobs),
# in both modes: 7 x 2 x 90 = 1,260 cases; operations with path parameters 25 each; the rest 1.
EXAMPLES_WITH_BODY = 90
EXAMPLES_WITH_PARAMETERS = 25
SEED = 20261202


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, schemathesis.schemas.BaseSchema]]:
    env = {
        "LUNGSERVE_ADMIN_TOKEN": "fuzz-secret",
        "LUNGSERVE_LOG_LEVEL": "WARNING",
        "LUNGSERVE_SHUTDOWN_DELAY_S": "0",
        # Generated 401s must not turn into 429s half-way: a high rate limit for this run.
        "LUNGSERVE_ADMIN_AUTH_FAILURES_PER_MINUTE": "100000",
        # Generated slide jobs name s3:// objects: with no credentials they fail at once, and the
        # AWS credential chain must not reach for the instance metadata service (loopback only).
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with start_server(tmp_path_factory.mktemp("schemathesis"), **env) as server:
        asyncio.run(wait_ready(server))
        yield server.url, schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_every_operation_holds_its_schema(api_schema: tuple[str, schemathesis.schemas.BaseSchema]) -> None:
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    url, schema = api_schema
    checks = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
    sent: dict[str, int] = {}
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and not operation.body:
                continue  # negative cases for bodies only (path parameters are plain strings)
            label = f"{operation.label} ({mode.value})"
            examples = EXAMPLES_WITH_BODY if operation.body else EXAMPLES_WITH_PARAMETERS
            _fuzz(operation.as_strategy(mode), label, url, checks, sent, examples)
    assert {"POST /predict (negative)", "POST /predict-many (positive)"} <= set(sent)
    assert sum(sent.values()) >= 1000, sent


def _fuzz(
    strategy: SearchStrategy[Any],
    label: str,
    url: str,
    checks: list[Callable[..., bool | None]],
    sent: dict[str, int],
    examples: int,
) -> None:
    @seed(SEED)
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=strategy)
    def run(case: Any) -> None:
        sent[label] = sent.get(label, 0) + 1
        case.call_and_validate(base_url=url, checks=checks, timeout=30)

    run()
