"""Regressions found by the soak: ordering hold-back must not dead-letter healthy records, and a webhook rejection
that cannot be stored must make the sender retry rather than be lost."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from relay.batch import HOLD_BACK_RECEIVES, BatchRunner
from relay.clock import Deadline
from relay.errors import StoreUnavailable
from relay.models import InboundEvent
from relay.process_event import Outcome, Result
from relay.settings import load_settings

from devtools.signing import sign_webhook
from tests.fakes import FakeClock
from tests.unit.test_security_properties import SECRETS, harness, http_event

SETTINGS = load_settings({"HANDLES_TABLE": "t", "DATASTREAM_ID": "ds-1", "EDGE_AUTH": "none", "WEBHOOK_AUTH": "none"})


class ScriptedRelay:
    """Fails the events named in `failing`, delivers the rest; records the order of processing."""

    def __init__(self, failing: set[str]) -> None:
        self.clock = FakeClock()
        self.failing = failing
        self.processed: list[str] = []

    def process(self, inbound: InboundEvent, deadline: Deadline, *, lease_s: float, state: Any = None) -> Result:
        self.processed.append(inbound.event_id)
        outcome = Outcome.RETRY if inbound.event_id in self.failing else Outcome.DELIVERED
        return Result(outcome, inbound.event_id)

    def prefetch_states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        return {}

    def reject_invalid(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}


def record(event_id: str, receive_count: int) -> dict[str, Any]:
    body = {"event": {"xdm": {"_id": event_id, "identityMap": {"CRMID": [{"id": "crm-1", "primary": True}]}}}}
    return {
        "messageId": f"m-{event_id}",
        "body": json.dumps(body),
        "attributes": {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "1700000000000"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
    }


@pytest.mark.parametrize("receive_count", [1, HOLD_BACK_RECEIVES - 1])
def test_batch_holds_back_later_records_of_a_failed_identity_on_early_receives(receive_count: int) -> None:
    # GIVEN one identity's two records, the first failing, on an early receive
    relay = ScriptedRelay(failing={"a1"})
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2))  # type: ignore[arg-type]
    event = {"Records": [record("a1", receive_count), record("a2", receive_count)]}

    # WHEN the batch runs
    answer = runner.run(event, Deadline(relay.clock, 20), lease_s=25)

    # THEN the second waits for the first (order kept): both are redelivered, the second was never sent
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-a1"}, {"itemIdentifier": "m-a2"}]}
    assert relay.processed == ["a1"]


def test_batch_stops_holding_back_once_a_record_keeps_failing() -> None:
    # GIVEN the same records on their HOLD_BACK_RECEIVES-th receive (a poison record ahead of a healthy one)
    relay = ScriptedRelay(failing={"a1"})
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2))  # type: ignore[arg-type]
    event = {"Records": [record("a1", HOLD_BACK_RECEIVES), record("a2", HOLD_BACK_RECEIVES)]}

    # WHEN the batch runs
    answer = runner.run(event, Deadline(relay.clock, 20), lease_s=25)

    # THEN the healthy record is processed (still after the failing one) and only the poison one is redelivered
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-a1"}]}
    assert relay.processed == ["a1", "a2"]


def test_webhook_invalid_body_whose_rejection_cannot_be_stored_answers_503() -> None:
    # GIVEN a signed body that is not an event, and a store that is down
    h = harness()

    def down(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise StoreUnavailable("dynamodb put_item failed: InternalServerError")

    h.store.reject_unclaimed = down  # type: ignore[method-assign]
    body = b'{"event": {}}'
    headers = sign_webhook(body, SECRETS[0], msg_id="msg-store-down")

    # WHEN it is posted
    answer = h.app.handle(http_event(body, headers), None)

    # THEN the sender is told to retry (a 400 would be final, and nothing would be kept)
    assert answer["statusCode"] == 503
    assert answer["headers"]["Retry-After"] == "5"
    doc = json.loads(answer["body"])
    assert (doc["status"], doc["eventId"], doc["title"]) == (503, "msg-store-down", "Service unavailable")
