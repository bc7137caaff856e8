"""Schemathesis against openapi.yaml, over real HTTP: the local HTTP API gateway in front of the REAL handler
(`relay.handler.new_runtime()`), moto and the Edge simulator (issue 6).

Two rounds, each bounded (Hypothesis `max_examples`, no deadline; the module takes well under a minute):

* unsigned: schemathesis' own headers (random `webhook-*` values or none), positive and negative data. Every
  answer is a documented 401 problem; afterwards nothing was stored and Edge was never called;
* signed: each generated request is signed with the stack's webhook secret over the exact bytes sent, so the
  body validation and Edge paths are reached. Every answer is documented and matches its schema; afterwards
  every Edge call belongs to an event the relay accepted, and no event it refused (400/413) reached Edge.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devtools.gateway import LocalGateway
from devtools.stack import ROOT, LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCHEMA = schemathesis.openapi.from_path(ROOT / "openapi.yaml")
OPERATION = SCHEMA["/events"]["POST"]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
MAX_EXAMPLES = 100  # per generation mode and round: 4 x 100 requests
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
HTTP_TIMEOUT = (5, 60)


@pytest.fixture(scope="module")
def gateway(stack: LocalStack) -> Iterator[LocalGateway]:
    from relay.handler import new_runtime  # the session fixture has applied the stack's environment

    stack.reset()
    runtime = new_runtime()
    gw = stack.gateway(runtime.handle)
    yield gw
    stack.stop_triggers()


def table_items(stack: LocalStack) -> list[dict[str, Any]]:
    paginator = stack.dynamodb.get_paginator("scan")
    return [i for page in paginator.paginate(TableName=stack.resources.table_name) for i in page.get("Items", [])]


def interact_calls(stack: LocalStack) -> list[dict[str, Any]]:
    return [e for e in stack.sim.requests_log() if e["path"].endswith("/interact")]


def request_kwargs(case: Any, base_url: str) -> tuple[dict[str, Any], bytes]:
    """The requests kwargs schemathesis would use, with the body as the exact bytes to send."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    if "json" in kwargs:
        body = json.dumps(kwargs.pop("json")).encode("utf-8")
    else:
        data = kwargs.pop("data", b"")
        body = data.encode("utf-8") if isinstance(data, str) else bytes(data or b"")
    kwargs["data"] = body
    return kwargs, body


def test_fuzz_unsigned_requests_are_refused_and_touch_nothing(stack: LocalStack, gateway: LocalGateway) -> None:
    statuses: list[int] = []

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @FUZZ_SETTINGS
        @given(case=OPERATION.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            kwargs, _ = request_kwargs(case, gateway.url)
            response = requests.request(**kwargs, timeout=HTTP_TIMEOUT)
            case.validate_response(response, checks=CHECKS)
            assert response.status_code == 401, response.text
            statuses.append(response.status_code)

        fuzz()

    assert len(statuses) >= MAX_EXAMPLES
    assert interact_calls(stack) == [], "an unsigned request reached Edge"
    assert table_items(stack) == [], "an unsigned request changed the table"


def test_fuzz_signed_requests_get_documented_answers(stack: LocalStack, gateway: LocalGateway) -> None:
    refused: set[str] = set()  # eventIds the relay answered 400/413 (never to be sent to Edge)
    accepted: set[str] = set()  # eventIds that went on to Edge (200/202/422/502)
    statuses: dict[int, int] = {}

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @FUZZ_SETTINGS
        @given(case=OPERATION.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            kwargs, body = request_kwargs(case, gateway.url)
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None:
                headers = {k: v for k, v in kwargs["headers"].items() if not k.lower().startswith("webhook-")}
                kwargs["headers"] = {**headers, **stack.sign(text)}
            response = requests.request(**kwargs, timeout=HTTP_TIMEOUT)
            case.validate_response(response, checks=CHECKS)
            status = response.status_code
            statuses[status] = statuses.get(status, 0) + 1
            if text is None:
                assert status == 401
                return
            assert status in (200, 202, 400, 409, 413, 422, 502), response.text
            answer = response.json()
            (refused if status in (400, 413) else accepted).add(answer.get("eventId", ""))

        fuzz()

    print("signed fuzz statuses:", statuses)
    assert sum(statuses.values()) >= MAX_EXAMPLES
    assert statuses.get(400, 0) > 0, statuses  # negative data reached body validation
    # Every Edge call was for an event the relay accepted; no refused event reached Edge.
    sent = {e["xdm_id"] for e in interact_calls(stack)}
    assert not (sent & (refused - accepted)), "a refused event reached Edge"
    assert sent <= accepted, sent - accepted
