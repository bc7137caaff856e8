"""Secret- and PII-safe logs (issue 6): the local stack at log level DEBUG, webhook and SQS events carrying known
identity, body and state values, every success and failure path the relay has (200, 202, 400, 401, 422, 502, 503,
Edge 429/503 retries, token refresh, SQS redelivery and rejection). Afterwards no captured log line, EMF metric
line or HTTP answer holds a secret, a token, a raw body, an identity value or a `state:store` value."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from relay.observability import logger as relay_logger
from relay.runtime import Runtime
from relay.settings import load_settings

from devtools.edge_sim import encode_identity_state
from devtools.stack import LocalStack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IDENTITY = "leak-canary-identity-7731"
BODY_CANARY = "leak-canary-body-5531"
STATE_CANARY = "leak-canary-state-9917"
HTTP_TIMEOUT = (5, 60)


class Capture(logging.Handler):
    """Every record of the relay's logger, formatted exactly as Powertools writes it."""

    libraries: Capture | None = None  # the libraries' records, captured beside it

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class LibraryCapture(Capture):
    """Every record the libraries the relay runs on (boto3, botocore, urllib3, requests, Powertools, standardwebhooks)
    send to the root logger at WARNING and above: what Lambda's runtime writes to the function's log by default."""

    LIBRARIES = ("boto3", "botocore", "urllib3", "requests", "aws_lambda_powertools", "standardwebhooks", "py.warnings")

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.addFilter(lambda record: record.name.split(".")[0] in self.LIBRARIES)


@pytest.fixture
def debug_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Capture]:
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "DEBUG")
    previous = relay_logger.log_level
    relay_logger.setLevel("DEBUG")
    capture = Capture()
    capture.setFormatter(relay_logger.registered_formatter)
    std_logger = logging.getLogger(relay_logger.name)
    std_logger.addHandler(capture)
    libraries = LibraryCapture()
    root = logging.getLogger()
    root_level = root.level
    root.setLevel(logging.WARNING)
    root.addHandler(libraries)
    logging.captureWarnings(True)
    capture.libraries = libraries
    yield capture
    logging.captureWarnings(False)
    root.removeHandler(libraries)
    root.setLevel(root_level)
    std_logger.removeHandler(capture)
    relay_logger.setLevel(previous)


def event(event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "event": {
            "xdm": {
                "_id": event_id,
                "eventType": "commerce.purchases",
                "identityMap": {"CRMID": [{"id": IDENTITY, "primary": True}]},
            },
            "data": {"note": BODY_CANARY},
        },
        "query": {"identity": {"fetch": ["ECID"]}},
        **extra,
    }


def test_logs_and_answers_never_carry_secrets_tokens_bodies_identities_or_state(
    clean_stack: LocalStack, debug_logs: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = clean_stack
    sim = stack.sim
    env = dict(os.environ)
    # A short webhook deadline so the Edge-unavailable path (retries, then 202) is quick, yet long enough (2.25 s for
    # Edge) that a delivered event's call, on a cold or loaded runtime, is not queued instead (it was 1500: 0.75 s).
    runtime = Runtime(load_settings({**env, "WEBHOOK_DEADLINE_MS": "3000"}))
    # A retry queue that does not exist: the fallback enqueue fails (503).
    broken_queue = Runtime(
        load_settings({**env, "WEBHOOK_DEADLINE_MS": "1000", "RETRY_QUEUE_URL": "http://127.0.0.1:9/q"})
    )
    gateway = stack.gateway(runtime.handle)
    broken_gateway = stack.gateway(broken_queue.handle)
    raw_bodies: list[str] = []
    answers: list[tuple[int, str]] = []

    def post(body: str, *, signed: bool = True, secret: str | None = None, url: str | None = None) -> int:
        raw_bodies.append(body)
        headers = {"content-type": "application/json"}
        if signed:
            headers.update(stack.sign(body, secret=secret))
        resp = requests.post(f"{url or gateway.url}/events", data=body.encode(), headers=headers, timeout=HTTP_TIMEOUT)
        answers.append((resp.status_code, resp.text))
        return resp.status_code

    # Delivered, then a state:store entry with a known value, which the relay stores and sends back.
    assert post(json.dumps(event("leak-ok-1"))) == 200
    ecid = next(e["ecid"] for e in sim.requests_log() if e["xdm_id"] == "leak-ok-1")
    sim.queue_state_entries(ecid, [{"key": "leak_custom", "value": STATE_CANARY, "maxAge": 3600}])
    assert post(json.dumps(event("leak-ok-2"))) == 200
    assert post(json.dumps(event("leak-ok-3"))) == 200
    sent_back = next(e["body"] for e in sim.requests_log() if e["xdm_id"] == "leak-ok-3")
    assert STATE_CANARY in json.dumps(sent_back), "the stored state went back to Edge (the path under test ran)"
    # Expired token: refreshed once (the IMS exchange carries the client secret).
    sim.expire_tokens()
    assert post(json.dumps(event("leak-ok-4"))) == 200
    # Refusals before Edge.
    other_secret = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
    assert post(json.dumps(event("leak-bad-sig")), secret=other_secret) == 401
    assert post(json.dumps(event("leak-unsigned")), signed=False) == 401
    assert post(json.dumps({"event": {"xdm": BODY_CANARY}, "meta": {"note": IDENTITY}})) == 400
    assert post(f"not json {BODY_CANARY} {IDENTITY}") == 400
    # Edge refusals and outages.
    sim.add_fault(status=422, match_id="leak-422")
    assert post(json.dumps(event("leak-422"))) == 422
    sim.add_fault(status=500, match_id="leak-500")
    assert post(json.dumps(event("leak-500"))) == 502
    sim.add_fault(status=503, match_id="leak-503", retry_after=0)
    sim.add_fault(status=429, match_id="leak-429", retry_after=0)
    assert post(json.dumps(event("leak-503"))) == 202
    assert post(json.dumps(event("leak-429"))) == 202
    sim.add_fault(status=503, match_id="leak-503-nofallback", retry_after=0)
    assert post(json.dumps(event("leak-503-nofallback")), url=broken_gateway.url) == 503

    # SQS: a valid event, an invalid body, and the queued webhook events (Edge still down: redelivered).
    for body in (json.dumps(event("leak-sqs-ok")), json.dumps({"event": {"xdm": [BODY_CANARY, IDENTITY]}})):
        raw_bodies.append(body)
        stack.sqs.send_message(QueueUrl=stack.resources.queue_url, MessageBody=body)
    poller = stack.poller(runtime.handle, batching_window=0)
    poller.poll_once(wait_time_seconds=0)
    sim.clear_faults()
    time.sleep(1.2)  # failed records reappear after the stack's failure visibility timeout
    poller.drain(20)
    assert stack.result("leak-sqs-ok")["status"] == "delivered"  # type: ignore[index]
    assert stack.result("leak-503")["status"] == "delivered"  # type: ignore[index]

    # What to look for.
    tokens = {
        entry["headers"].get("authorization", "").partition(" ")[2]
        for entry in sim.requests_log()
        if entry["path"].endswith("/interact")
    } - {""}
    assert len(tokens) >= 2, "the token was refreshed"
    secrets = [
        *stack.webhook_secrets,
        *(s.removeprefix("whsec_") for s in stack.webhook_secrets),
        other_secret.removeprefix("whsec_"),
        stack.adobe_secret["clientSecret"],
        *tokens,
    ]
    identities = [IDENTITY, BODY_CANARY, *raw_bodies]
    state_values = [STATE_CANARY, ecid, encode_identity_state(ecid)]

    out, err = capsys.readouterr()
    # The libraries' capture works (a record from urllib3, as one of its warnings would come)...
    logging.getLogger("urllib3.connectionpool").warning("capture check: a library warning")
    library_lines = debug_logs.libraries.lines if debug_logs.libraries else []
    assert "urllib3.connectionpool WARNING capture check: a library warning" in library_lines
    emitted = [*debug_logs.lines, *library_lines, *out.splitlines(), *err.splitlines()]
    assert any('"message":"event delivered"' in line for line in debug_logs.lines), "relay logs were captured"
    assert any('"_aws"' in line and "CloudWatchMetrics" in line for line in emitted), "EMF metrics were captured"
    assert relay_logger.log_level == logging.DEBUG

    for line in emitted:
        for value in (*secrets, *identities, *state_values):
            assert value not in line, f"a log line leaks {value[:12]}...: {line[:200]}"
    statuses = sorted({status for status, _ in answers})
    assert statuses == [200, 202, 400, 401, 422, 502, 503]
    for status, text in answers:
        for value in (*secrets, IDENTITY, BODY_CANARY):
            assert value not in text, f"a {status} answer leaks {value[:12]}..."
        if status != 200:
            # A delivered answer's `handle` is what Edge returned: it legitimately holds the ECID and the
            # state:store values for the caller. Every other answer must not.
            for value in state_values:
                assert value not in text, f"a {status} answer leaks a state value"
