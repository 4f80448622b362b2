"""Schemathesis against the gateway's own OpenAPI document: a real gateway over a real gRPC server.

Every operation of /openapi.json gets generated requests, valid and invalid ones
(a bounded number per operation, so that the run stays well under a minute); each
answer must not be a 5xx and must match the response schema the document
declares (including the problem+json bodies of 4xx answers).

The document is built at collection time from the gateway app itself (schemathesis
parametrizes tests when they are collected; its fixture-based loader does not run
on this pytest), and the test checks that the live gateway serves that same document.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from replica import Replica
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from lossd.server.gateway import create_app
from lossd.server.settings import Settings

EXAMPLES_PER_OPERATION = 50
_STATUSES: Counter[str] = Counter()


def _document() -> dict[str, Any]:
    app = create_app(Settings(grpc_port=0, http_port=0, device="cpu"), backends=["127.0.0.1:1"])  # never called
    return dict(app.openapi())


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def gateway() -> Iterator[Replica]:
    replica = Replica().start()
    assert httpx.get(f"{replica.url}/openapi.json", timeout=30).json() == DOCUMENT, "the live gateway serves another document"
    yield replica
    replica.stop()
    print(f"\nschemathesis answers by operation and status: {dict(sorted(_STATUSES.items()))}")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same cases on every run: a failure here is reproducible
)
def test_no_server_errors_and_answers_match_the_schema(case: schemathesis.Case, gateway: Replica) -> None:
    response = case.call_and_validate(base_url=gateway.url, checks=[not_a_server_error, response_schema_conformance], timeout=30)
    _STATUSES[f"{case.method} {case.path} {response.status_code}"] += 1
