"""Regressions found by the soak: ordering hold-back must not dead-letter healthy records, and a webhook rejection
that cannot be stored must make the sender retry rather than be lost. And how a batch writes its results: 25 to a
BatchWriteItem, a record acknowledged only once its result is written."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from relay.batch import HOLD_BACK_RECEIVES, BatchRunner
from relay.clock import Deadline
from relay.errors import StoreUnavailable
from relay.integrations.edge import EdgeAnswer
from relay.models import InboundEvent
from relay.process_event import Outcome, Relay, Result
from relay.settings import load_settings

from devtools.signing import sign_webhook
from tests.fakes import FakeClock, FakeEdge, FakeStore
from tests.unit.test_security_properties import SECRETS, harness, http_event

SETTINGS = load_settings({"HANDLES_TABLE": "t", "DATASTREAM_ID": "ds-1", "EDGE_AUTH": "none", "WEBHOOK_AUTH": "none"})


class ScriptedRelay:
    """Fails the events named in `failing`, delivers the rest; records the order of processing."""

    def __init__(self, failing: set[str]) -> None:
        self.clock = FakeClock()
        self.failing = failing
        self.processed: list[str] = []

    def process(
        self, inbound: InboundEvent, deadline: Deadline, *, lease_s: float, state: Any = None, **kwargs: Any
    ) -> Result:
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


# -- result writes ---------------------------------------------------------------------------------------------------


def sqs(event_id: str, message_id: str, person: str) -> dict[str, Any]:
    body = {"event": {"xdm": {"_id": event_id, "identityMap": {"CRMID": [{"id": person, "primary": True}]}}}}
    return {
        "messageId": message_id,
        "body": json.dumps(body),
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": "1700000000000"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
    }


def real_relay(store: FakeStore, calls: int) -> tuple[Relay, FakeEdge]:
    edge = FakeEdge(*[EdgeAnswer(200, {"requestId": f"r{n}", "handle": []}, 1) for n in range(calls)])
    return Relay(store, edge, FakeClock()), edge  # type: ignore[arg-type]


def run_batch(relay: Relay, records: list[dict[str, Any]]) -> dict[str, Any]:
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1))
    return runner.run({"Records": records}, Deadline(relay.clock, 20), lease_s=25)


def test_batch_writes_its_results_25_to_a_request() -> None:
    # GIVEN 60 events of 60 people
    store = FakeStore()
    relay, _ = real_relay(store, 60)
    records = [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(60)]

    # WHEN the batch runs
    answer = run_batch(relay, records)

    # THEN every record is acknowledged, and the 60 results were written in requests of 25, 25 and 10
    assert answer == {"batchItemFailures": []}
    assert [len(chunk) for chunk in store.batch_writes] == [25, 25, 10]
    assert sorted(event_id for event_id, _ in store.finished) == sorted(f"e{n}" for n in range(60))


def test_batch_result_that_cannot_be_written_is_redelivered_and_its_claim_given_back() -> None:
    # GIVEN three events, the second's result write fails (after Edge accepted it)
    store = FakeStore(failing_writes={"e1"})
    relay, edge = real_relay(store, 3)

    # WHEN the batch runs
    answer = run_batch(relay, [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(3)])

    # THEN only that record is redelivered, its claim is released with the reason, the others are stored
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m1"}]}
    assert store.releases == [("e1", "tok-1", "scripted write failure")]
    assert sorted(event_id for event_id, _ in store.finished) == ["e0", "e2"]
    assert len(edge.calls) == 3


@pytest.mark.parametrize("write_fails", [False, True])
def test_batch_repeat_of_an_event_shares_the_first_records_fate(write_fails: bool) -> None:
    # GIVEN one event delivered twice in one batch (two messages), and another event
    store = FakeStore(failing_writes={"e1"} if write_fails else set())
    relay, edge = real_relay(store, 2)
    records = [sqs("e1", "m1", "p1"), sqs("e2", "m2", "p2"), sqs("e1", "m1-again", "p1")]

    # WHEN the batch runs
    answer = run_batch(relay, records)

    # THEN Edge got the event once; the repeat is acknowledged with the first, or redelivered with it
    assert [call.request["event"]["xdm"]["_id"] for call in edge.calls] == ["e1", "e2"]
    failed = [{"itemIdentifier": "m1"}, {"itemIdentifier": "m1-again"}] if write_fails else []
    assert answer == {"batchItemFailures": failed}
    assert len(store.claims) == 2


def test_a_batch_logs_one_info_summary_and_its_deliveries_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN three events, one whose result cannot be written
    store = FakeStore(failing_writes={"e1"})
    relay, _ = real_relay(store, 3)

    # WHEN the batch runs at the deployed log level
    with caplog.at_level(logging.INFO, logger="interact-relay"):
        run_batch(relay, [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(3)])

    # THEN the deliveries are not logged one by one at INFO; one summary line counts the outcomes
    messages = [r.getMessage() for r in caplog.records]
    assert "event delivered" not in messages
    summary = [r for r in caplog.records if r.getMessage() == "batch done"]
    assert len(summary) == 1
    fields = summary[0].__dict__
    assert (fields["records"], fields["redelivered"], fields["writesFailed"]) == (3, 1, 1)
    assert fields["outcomes"] == {"delivered": 3}
    # AND the failure is still logged on its own, as a warning
    assert "event will be retried" in messages
