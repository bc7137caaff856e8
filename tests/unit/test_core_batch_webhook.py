"""Regressions found by the soak: ordering hold-back must not dead-letter healthy records, and a webhook rejection
that cannot be stored must make the sender retry rather than be lost. How a batch writes its results: 25 to a
BatchWriteItem, a record acknowledged only once its result is written. And how a record Edge asked to retry later
than the queue's visibility timeout is kept invisible until then."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest.mock import patch

import pytest
import relay.batch as batch_module
from botocore.exceptions import ClientError, ReadTimeoutError
from relay.batch import CLAIM_AHEAD, HOLD_BACK_RECEIVES, BatchRunner
from relay.clock import Deadline
from relay.errors import CredentialsError, EdgeUnavailable, StoreUnavailable
from relay.identity_state import opaque_identity_id
from relay.integrations.aws_clients import SQS_WORST_CASE_S
from relay.integrations.edge import EdgeAnswer
from relay.integrations.ims import NoTimeLeft
from relay.integrations.queue import RetryQueue, queue_url_for
from relay.integrations.store import UNPROCESSED, Claim, ClaimKey, decode_item
from relay.models import InboundEvent, build_inbound
from relay.process_event import Outcome, Relay, Result
from relay.settings import load_settings

from devtools.poller import record_from_message
from devtools.signing import sign_webhook
from tests.fakes import FakeClock, FakeEdge, FakeStore
from tests.unit.conftest import StoreOnMoto
from tests.unit.test_security_properties import ENV as SIGNED_ENV
from tests.unit.test_security_properties import SECRETS, check_answer, harness, http_event

EDGE_HOST = "https://edge.adobedc.net"  # EDGE_AUTH=none takes the unauthenticated host (never called here)
ENV = {
    "HANDLES_TABLE": "handles",
    "DATASTREAM_ID": "ds-1",
    "EDGE_AUTH": "none",
    "EDGE_BASE_URL": EDGE_HOST,
    "WEBHOOK_AUTH": "none",
}
SETTINGS = load_settings(ENV)


class ScriptedRelay:
    """Fails the events named in `failing`, delivers the rest; records the order of processing."""

    def __init__(self, failing: set[str], retry_after: dict[str, float] | None = None) -> None:
        self.clock = FakeClock()
        self.failing = failing
        self.retry_after = retry_after or {}  # event id -> the Retry-After Edge answered it with
        self.processed: list[str] = []

    def process(
        self, inbound: InboundEvent, deadline: Deadline, *, lease_s: float, state: Any = None, **kwargs: Any
    ) -> Result:
        self.processed.append(inbound.event_id)
        outcome = Outcome.RETRY if inbound.event_id in self.failing else Outcome.DELIVERED
        return Result(outcome, inbound.event_id, retry_after=self.retry_after.get(inbound.event_id))

    def prefetch_states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        return {}

    def reject_invalid(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {}


QUEUE_ARN = "arn:aws:sqs:eu-west-1:123456789012:relay-events"
QUEUE_URL = "https://sqs.eu-west-1.amazonaws.com/123456789012/relay-events"


def record(event_id: str, receive_count: int, person: str = "crm-1") -> dict[str, Any]:
    body = {"event": {"xdm": {"_id": event_id, "identityMap": {"CRMID": [{"id": person, "primary": True}]}}}}
    return {
        "messageId": f"m-{event_id}",
        "receiptHandle": f"rh-{event_id}",
        "body": json.dumps(body),
        "attributes": {"ApproximateReceiveCount": str(receive_count), "SentTimestamp": "1700000000000"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": QUEUE_ARN,
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


def test_a_late_copy_of_a_held_back_record_is_not_kept_waiting_into_the_dead_letter_queue() -> None:
    # GIVEN one identity's first record failing on its first receive, then its second record, and a second copy of
    # that second record (another message of the same event) on its last receive before the dead-letter queue
    relay = ScriptedRelay(failing={"a1"})
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2))  # type: ignore[arg-type]
    late = {**record("a2", 5), "messageId": "m-a2-copy"}
    event = {"Records": [record("a1", 1), record("a2", 1), late]}

    # WHEN the batch runs
    answer = runner.run(event, Deadline(relay.clock, 20), lease_s=25)

    # THEN the event is sent, as any record on a late receive is, and both its copies are acknowledged: the copy is not
    # redelivered a fifth time into the dead-letter queue, where it would page and, redriven, duplicate the event
    assert relay.processed == ["a1", "a2"]
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-a1"}]}


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


def test_an_identity_with_many_records_in_a_batch_starts_first() -> None:
    # GIVEN a batch in which one identity's three records come after two identities with one record each, and one
    # worker (so the order in which groups start is the order they run in)
    relay = ScriptedRelay(failing=set())
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1))  # type: ignore[arg-type]
    records = [record("a1", 1, "crm-a"), record("b1", 1, "crm-b")]
    records += [record(f"c{n}", 1, "crm-c") for n in (1, 2, 3)]

    # WHEN the batch runs
    answer = runner.run({"Records": records}, Deadline(relay.clock, 20), lease_s=25)

    # THEN the long group started first (its records in their order; started last, it would be the batch's tail while
    # the other workers sat idle), and the others kept batch order
    assert answer == {"batchItemFailures": []}
    assert relay.processed == ["c1", "c2", "c3", "a1", "b1"]


def test_webhook_invalid_body_whose_rejection_cannot_be_stored_answers_503(
    emitted: Callable[[], dict[str, list[float]]],
) -> None:
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
    # AND it is counted as any event handed back for a retry (the runbook's webhook-server-errors points there)
    assert emitted() == {"RetriesScheduled": [1.0]}


# -- result writes ---------------------------------------------------------------------------------------------------


def sqs(event_id: str, message_id: str, person: str) -> dict[str, Any]:
    return {**record(event_id, 1, person), "messageId": message_id}


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


def test_results_a_mid_batch_write_leaves_unprocessed_wait_for_the_final_write_not_for_the_worker() -> None:
    # GIVEN 30 people's events, and a table that leaves 3 of the first chunk's results unprocessed for as long as the
    # writer will not wait (a worker's write mid-batch), and takes them when the batch's final write does
    class Throttled(FakeStore):
        def __init__(self) -> None:
            super().__init__()
            self.deadlines: list[Deadline | None] = []

        def put_results(self, writes: list[Any], deadline: Deadline | None = None) -> dict[str, str]:
            self.deadlines.append(deadline)
            left = {w.event_id for w in writes if w.event_id in {"e1", "e2", "e3"}} if deadline is None else set()
            super().put_results([w for w in writes if w.event_id not in left], deadline)
            return dict.fromkeys(left, UNPROCESSED)

    store = Throttled()
    relay, _ = real_relay(store, 30)
    records = [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(30)]

    # WHEN the batch runs
    answer = run_batch(relay, records)

    # THEN no record comes back: the 3 were written by the final write, which may wait for DynamoDB (the worker's did
    # not, and went on with its records)
    assert answer == {"batchItemFailures": []}
    assert [d is None for d in store.deadlines] == [True, False]
    assert sorted(e for e, _ in store.finished) == sorted(f"e{n}" for n in range(30))


def test_a_batchs_metrics_are_written_before_its_last_result_write(
    emitted: Callable[[], dict[str, list[float]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a batch whose last result write stalls (a function that times out there runs no `finally`, where the
    # metrics are written), and stdout recorded
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    seen_at_last_write: list[str] = []

    class Stalling(FakeStore):
        def put_results(self, writes: list[Any], deadline: Deadline | None = None) -> dict[str, str]:
            if deadline is not None:  # the batch's final write
                seen_at_last_write.append(out.getvalue())
            return super().put_results(writes, deadline)

    store = Stalling()
    relay, _ = real_relay(store, 3)
    records = [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(3)] + [sqs("e0", "m0-again", "p0")]

    # WHEN the batch runs
    run_batch(relay, records)

    # THEN by the time of that write, what the batch had counted (here the repeat; in Lambda, the Edge calls) was
    # already out
    [written] = seen_at_last_write
    documents = [json.loads(line) for line in written.splitlines() if '"_aws"' in line]
    assert [doc.get("Duplicates") for doc in documents] == [[1.0]]


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

    # AND at DEBUG each stored delivery has its own line (the two whose results were written)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="interact-relay"):
        run_batch(
            real_relay(FakeStore(failing_writes={"e1"}), 3)[0], [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(3)]
        )
    debug = [r for r in caplog.records if r.getMessage() == "event delivered"]
    assert sorted(r.__dict__["eventId"] for r in debug) == ["e0", "e2"]
    assert {r.levelno for r in debug} == {logging.DEBUG}


# -- Retry-After longer than the queue's visibility timeout ----------------------------------------------------------


class FakeSqs:
    """`change_message_visibility_batch` only: records each call; entries whose receipt handle is in `refuse` fail."""

    def __init__(self, refuse: frozenset[str] = frozenset(), error: Exception | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.refuse = refuse
        self.error = error

    def change_message_visibility_batch(self, *, QueueUrl: str, Entries: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append({"QueueUrl": QueueUrl, "Entries": Entries})
        if self.error is not None:
            raise self.error
        failed = [
            {"Id": e["Id"], "Code": "ReceiptHandleIsInvalid"} for e in Entries if e["ReceiptHandle"] in self.refuse
        ]
        return {
            "Successful": [{"Id": e["Id"]} for e in Entries if e["ReceiptHandle"] not in self.refuse],
            "Failed": failed,
        }


def postponed(sqs: FakeSqs) -> dict[str, int]:
    return {e["ReceiptHandle"]: e["VisibilityTimeout"] for call in sqs.calls for e in call["Entries"]}


def test_records_edge_asked_to_retry_after_the_visibility_timeout_wait_until_then() -> None:
    # GIVEN a queue whose visibility timeout is 180 s, and a batch in which Edge answers:
    #   a1 Retry-After 600 (a2, the same identity, waits behind it), b1 Retry-After 30, c1 Retry-After 5000,
    #   d1 fails with no Retry-After (a DynamoDB outage, say), e1 is delivered; e1-twin repeats a1's eventId
    settings = load_settings({**ENV, "QUEUE_VISIBILITY_TIMEOUT_SECONDS": "180"})
    relay = ScriptedRelay(failing={"a1", "b1", "c1", "d1"}, retry_after={"a1": 600, "b1": 30, "c1": 5000})
    sqs = FakeSqs()
    runner = BatchRunner(settings, relay, ThreadPoolExecutor(2), lambda: RetryQueue(sqs, QUEUE_URL))  # type: ignore[arg-type]
    twin = {**record("a1", 1), "messageId": "m-a1-twin", "receiptHandle": "rh-a1-twin"}
    records = [record("a1", 1), record("a2", 1), twin]
    records += [record("b1", 1, "crm-2"), record("c1", 1, "crm-3"), record("d1", 1, "crm-4"), record("e1", 1, "crm-5")]

    # WHEN the batch runs
    answer = runner.run({"Records": records}, Deadline(relay.clock, 20), lease_s=25)

    # THEN every failed record is redelivered, and only those whose Retry-After outlasts the visibility timeout are
    # kept invisible that long: a1 for 600 s with the record waiting behind it and its repeat, c1 for at most 900 s
    assert [f["itemIdentifier"] for f in answer["batchItemFailures"]] == [
        "m-a1",
        "m-a2",
        "m-a1-twin",
        "m-b1",
        "m-c1",
        "m-d1",
    ]
    assert postponed(sqs) == {"rh-a1": 600, "rh-a2": 600, "rh-a1-twin": 600, "rh-c1": 900}
    assert {call["QueueUrl"] for call in sqs.calls} == {QUEUE_URL}


@pytest.mark.parametrize(("budget", "postponed_too"), [(2.0, True), (1.9, False), (-1.0, False)])
def test_records_are_postponed_only_while_a_slow_sqs_call_still_fits_in_the_invocation(
    budget: float, postponed_too: bool
) -> None:
    # GIVEN a batch whose record Edge asked to retry in 600 s, and the batch deadline (the Lambda's remaining time
    # minus SAFETY_MARGIN_MS, 2 s here) nearly used up by the time the batch is done
    relay = ScriptedRelay(failing={"a1"}, retry_after={"a1": 600})
    sqs = FakeSqs()
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1), lambda: RetryQueue(sqs, QUEUE_URL))  # type: ignore[arg-type]

    # WHEN the batch runs with `budget` seconds of the deadline left when it postpones
    answer = runner.run({"Records": [record("a1", 1)]}, Deadline(relay.clock, budget), lease_s=25)

    # THEN it postpones only if the SQS client's worst case (4 s) fits in the time the invocation has left; either
    # way the record is redelivered
    assert SETTINGS.safety_margin_s + 2.0 == SQS_WORST_CASE_S
    assert [f["itemIdentifier"] for f in answer["batchItemFailures"]] == ["m-a1"]
    assert postponed(sqs) == ({"rh-a1": 600} if postponed_too else {})


def test_when_time_runs_out_mid_postponing_no_record_comes_back_before_the_one_it_waits_for() -> None:
    # GIVEN a batch of eleven records Edge asked to retry in 600 s (two calls of SQS's 10): a1, then a2 of the same
    # identity, held back behind it, then nine other identities' records; and SQS so slow that after the first call
    # there is no time for a second (a model check of the real batch runner found a2 postponed less than a1: it came
    # back alone at the queue's timeout and went to Edge before a1)
    others = [f"{letter}1" for letter in "bcdefghij"]
    relay = ScriptedRelay(failing={"a1", *others}, retry_after=dict.fromkeys(["a1", *others], 600))

    class SlowSqs(FakeSqs):
        def change_message_visibility_batch(self, **kwargs: Any) -> dict[str, Any]:
            relay.clock.advance(SQS_WORST_CASE_S)  # the client's worst case
            return super().change_message_visibility_batch(**kwargs)

    sqs = SlowSqs()
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2), lambda: RetryQueue(sqs, QUEUE_URL))  # type: ignore[arg-type]
    records = [record("a1", 1), record("a2", 1)] + [record(o, 1, f"crm-{o}") for o in others]

    # WHEN the batch runs with time for one slow SQS call, not two
    answer = runner.run({"Records": records}, Deadline(relay.clock, SQS_WORST_CASE_S + 1), lease_s=25)

    # THEN every record is redelivered, and the one left at the queue's timeout is a1, which comes back first: a2 is
    # kept invisible longer, never returning before the record it waits for
    assert len(answer["batchItemFailures"]) == 11
    assert len(sqs.calls) == 1
    assert "rh-a1" not in postponed(sqs) and postponed(sqs)["rh-a2"] == 600


@pytest.mark.parametrize(
    ("a1_asks", "a2_asks"),
    [(None, 600), (200, 900), (900, 200)],  # no Retry-After then a long one; two long ones, either way round
)
def test_a_held_back_record_never_comes_back_before_any_earlier_failed_record_of_its_identity(
    a1_asks: int | None, a2_asks: int
) -> None:
    # GIVEN one identity's records: a1 on its first receive, a2 on a late one (so it is tried even after a1 fails),
    # a3 on its first (held back behind them); both a1 and a2 fail, each asked to wait as given (a review found a3
    # kept only as long as a1, so it came back before a2 and reached Edge first)
    settings = load_settings({**ENV, "QUEUE_VISIBILITY_TIMEOUT_SECONDS": "180"})
    asks = {"a1": a1_asks, "a2": a2_asks}
    relay = ScriptedRelay(failing={"a1", "a2"}, retry_after={k: v for k, v in asks.items() if v is not None})
    sqs = FakeSqs()
    runner = BatchRunner(settings, relay, ThreadPoolExecutor(2), lambda: RetryQueue(sqs, QUEUE_URL))  # type: ignore[arg-type]
    records = [record("a1", 1), record("a2", HOLD_BACK_RECEIVES), record("a3", 1)]

    # WHEN the batch runs
    answer = runner.run({"Records": records}, Deadline(relay.clock, 20), lease_s=25)

    # THEN a3 is held back, and kept invisible as long as the longest wait asked of a record it waits for
    assert relay.processed == ["a1", "a2"]
    assert [f["itemIdentifier"] for f in answer["batchItemFailures"]] == ["m-a1", "m-a2", "m-a3"]
    longest = max(v for v in asks.values() if v is not None)
    assert postponed(sqs)["rh-a3"] == longest >= max(postponed(sqs).get(f"rh-{k}", 180) for k in asks)


def test_no_sqs_call_once_the_invocation_has_less_than_the_sqs_worst_case_left_whatever_the_margin() -> None:
    # GIVEN a record Edge asked to retry in 600 s, and a SAFETY_MARGIN_MS of 10 s (allowed: up to 60 s), with the
    # batch's work run 9.5 s past its deadline: 0.5 s of the invocation left (a review found the SQS call still made,
    # since the time to the deadline stops at 0, and 0 + 10 s seemed to leave room for the client's 4 s worst case)
    settings = load_settings({**ENV, "SAFETY_MARGIN_MS": "10000"})
    relay = ScriptedRelay(failing={"a1"}, retry_after={"a1": 600})
    sqs = FakeSqs()
    runner = BatchRunner(settings, relay, ThreadPoolExecutor(1), lambda: RetryQueue(sqs, QUEUE_URL))  # type: ignore[arg-type]
    deadline = Deadline(relay.clock, 20)  # the invocation ends 10 s after this
    relay.clock.advance(29.5)

    # WHEN the batch runs
    answer = runner.run({"Records": [record("a1", 1)]}, deadline, lease_s=35)

    # THEN the answer comes first: no SQS call, the record back at the queue's timeout
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-a1"}]}
    assert sqs.calls == []


def test_a_wait_a_little_shorter_than_the_visibility_timeout_asked_late_in_the_invocation_is_still_kept() -> None:
    # GIVEN a 180 s visibility timeout (SQS counts it from the receive, before the invocation starts), and Edge
    # answering a1 with Retry-After 170 twenty seconds into the invocation (a review found it left to come back at
    # the timeout, 10 s before Edge's wait was over)
    settings = load_settings({**ENV, "QUEUE_VISIBILITY_TIMEOUT_SECONDS": "180"})

    class Slow(ScriptedRelay):
        def process(self, inbound: Any, deadline: Any, **kwargs: Any) -> Any:
            self.clock.advance(20)
            return super().process(inbound, deadline, **kwargs)

    relay = Slow(failing={"a1"}, retry_after={"a1": 170})
    sqs = FakeSqs()
    runner = BatchRunner(settings, relay, ThreadPoolExecutor(1), lambda: RetryQueue(sqs, QUEUE_URL))  # type: ignore[arg-type]

    # WHEN the batch runs
    runner.run({"Records": [record("a1", 1)]}, Deadline(relay.clock, 25), lease_s=30)

    # THEN the record is kept invisible for Edge's 170 s from now, beyond the 160 s its visibility had left
    assert postponed(sqs) == {"rh-a1": 170}


@pytest.mark.parametrize(
    ("receive_count", "received_s_before", "wait"),
    [
        (1, 4, 178),  # its first receive, which it says was 4 s before the handler began
        (2, 4, 179),  # a redelivery, which does not say when: taken as RECEIVE_SLACK_S before
    ],
)
def test_a_wait_that_outlasts_the_visibility_counted_from_the_receive_is_kept(
    receive_count: int, received_s_before: float, wait: int
) -> None:
    # GIVEN a 180 s visibility timeout, which SQS counts from the receive, before the handler begins (the event source
    # mapping's batching window, an invoke, a cold start's init); Edge answers at once with a Retry-After a little
    # shorter (a review found the wait counted from the handler's start: 0 + 178 <= 180, so the record came back
    # before Edge's wait was over, to one more 429 and one more receive)
    settings = load_settings({**ENV, "QUEUE_VISIBILITY_TIMEOUT_SECONDS": "180"})
    relay = ScriptedRelay(failing={"a1"}, retry_after={"a1": wait})
    rec = record("a1", receive_count)
    rec["attributes"]["ApproximateFirstReceiveTimestamp"] = str(int((relay.clock.now() - received_s_before) * 1000))
    sqs = FakeSqs()
    runner = BatchRunner(settings, relay, ThreadPoolExecutor(1), lambda: RetryQueue(sqs, QUEUE_URL))  # type: ignore[arg-type]

    # WHEN the batch runs
    runner.run({"Records": [rec]}, Deadline(relay.clock, 25), lease_s=30)

    # THEN it is kept invisible for Edge's wait
    assert postponed(sqs) == {"rh-a1": wait}


def test_a_held_back_record_never_comes_back_before_the_record_it_waits_for_whatever_its_receive_time() -> None:
    # GIVEN one identity's records a1 (first receive: fails, no Retry-After), a2 (third receive: tried, asked 5 s)
    # and a3 (held back behind them), whose receive looks 200 s old, past the 180 s timeout (an invoke retried after a
    # throttle, a clock ahead) (review "late": leaving a1 to the queue's timeout sent a3 back before it)
    settings = load_settings({**ENV, "QUEUE_VISIBILITY_TIMEOUT_SECONDS": "180"})
    relay = ScriptedRelay(failing={"a1", "a2"}, retry_after={"a2": 5})
    records = [record("a1", 1), record("a2", 3), record("a3", 1)]
    for r in records:
        r["attributes"]["ApproximateFirstReceiveTimestamp"] = str(int((relay.clock.now() - 200) * 1000))
    sqs = FakeSqs()
    runner = BatchRunner(settings, relay, ThreadPoolExecutor(1), lambda: RetryQueue(sqs, QUEUE_URL))  # type: ignore[arg-type]

    # WHEN the batch runs
    runner.run({"Records": records}, Deadline(relay.clock, 25), lease_s=30)

    # THEN a1 is shown again no later than a3
    later = postponed(sqs)
    assert later.get("rh-a1", 180) <= later.get("rh-a3", 180), later


def test_a_short_retry_after_leaves_the_visibility_alone_and_builds_no_sqs_client() -> None:
    # GIVEN Edge asking for a retry well within the visibility timeout (it only comes back later than asked; a shorter
    # visibility would use up its receives sooner in an outage)
    relay = ScriptedRelay(failing={"a1"}, retry_after={"a1": 120})

    def no_queue() -> RetryQueue:
        raise AssertionError("the SQS client must not be built when nothing is postponed")

    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1), no_queue)  # type: ignore[arg-type]

    # WHEN the batch runs
    answer = runner.run({"Records": [record("a1", 1)]}, Deadline(relay.clock, 20), lease_s=25)

    # THEN the record is simply redelivered
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-a1"}]}


def test_no_postponing_once_the_batch_time_is_up() -> None:
    # GIVEN a record Edge asked to retry in 600 s, in a batch whose time runs out while it is processed
    relay = ScriptedRelay(failing={"a1"}, retry_after={"a1": 600})
    sqs = FakeSqs()
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1), lambda: RetryQueue(sqs, QUEUE_URL))  # type: ignore[arg-type]
    deadline = Deadline(relay.clock, 20)
    relay.clock.advance(21)

    # WHEN the batch runs
    answer = runner.run({"Records": [record("a1", 1)]}, deadline, lease_s=25)

    # THEN the answer comes first: the record is redelivered at the queue's own timeout
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-a1"}]}
    assert sqs.calls == []


def test_postponing_goes_ten_records_to_a_call_and_a_refusal_only_costs_the_wait() -> None:
    # GIVEN 23 records to keep invisible, one of whose receipt handles SQS refuses
    sqs = FakeSqs(refuse=frozenset({"rh-e7"}))
    records = [(record(f"e{n}", 1), 300) for n in range(23)]

    # WHEN they are postponed
    done = RetryQueue(sqs, QUEUE_URL).postpone(records)

    # THEN three calls of at most ten, each entry with its own id, and the refused one is not counted
    assert [len(call["Entries"]) for call in sqs.calls] == [10, 10, 3]
    assert all(len({e["Id"] for e in call["Entries"]}) == len(call["Entries"]) for call in sqs.calls)
    assert done == 22


def test_postponing_never_raises() -> None:
    error = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ChangeMessageVisibilityBatch")
    assert RetryQueue(FakeSqs(error=error), QUEUE_URL).postpone([(record("a1", 1), 300)]) == 0


@pytest.mark.parametrize(
    ("arn", "known", "url"),
    [
        (QUEUE_ARN, QUEUE_URL, QUEUE_URL),
        (
            QUEUE_ARN,
            "http://127.0.0.1:5000/123456789012/relay-events",
            "http://127.0.0.1:5000/123456789012/relay-events",
        ),
        (QUEUE_ARN, "https://sqs.eu-west-1.amazonaws.com/123456789012/other", QUEUE_URL),
        (QUEUE_ARN, None, QUEUE_URL),
        ("arn:aws-cn:sqs:cn-north-1:123456789012:q", None, "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/q"),
        ("arn:aws:sns:eu-west-1:123456789012:topic", QUEUE_URL, None),
        ("not an arn", QUEUE_URL, None),
        ("", QUEUE_URL, None),
    ],
)
def test_queue_url_of_a_record(arn: str, known: str | None, url: str | None) -> None:
    # The configured retry queue's URL when the record came from it (as the template wires it), else SQS's own form
    assert queue_url_for(arn, known) == url


# -- records that cannot be read ---------------------------------------------------------------------------------


def test_a_body_with_an_overlong_number_is_rejected_and_its_batch_mates_delivered() -> None:
    # GIVEN a poison body (Python refuses integers of more than 4,300 digits) between two healthy records
    store = FakeStore()
    relay, edge = real_relay(store, 2)
    poison = {**sqs("x", "m-poison", "p-x"), "body": '{"event":{"xdm":{"_id":"poison-1","n":' + "1" * 5000 + "}}}"}
    records = [sqs("e0", "m0", "p0"), poison, sqs("e1", "m1", "p1")]

    # WHEN the batch runs
    answer = run_batch(relay, records)

    # THEN nothing is redelivered: the healthy ones are delivered, the poison one is stored rejected with the reason
    assert answer == {"batchItemFailures": []}
    assert sorted(event_id for event_id, _ in store.finished) == ["e0", "e1"]
    [(event_id, fields)] = store.rejected_unclaimed
    assert event_id == "m-poison"  # the body could not be read, so its xdm._id neither
    assert fields["error"]["errors"] == [{"path": "$", "message": "body has a number with too many digits to read"}]
    assert len(edge.calls) == 2


def test_a_body_that_is_not_a_string_is_rejected() -> None:
    # GIVEN a malformed record whose body is an object
    store = FakeStore()
    relay, _ = real_relay(store, 0)

    # WHEN the batch runs
    answer = run_batch(relay, [{**sqs("x", "m-obj", "p-x"), "body": {"event": {}}}])

    # THEN it is stored rejected, not a crash of the batch
    assert answer == {"batchItemFailures": []}
    assert store.rejected_unclaimed[0][1]["error"]["errors"] == [
        {"path": "$", "message": "body is object, not a string"}
    ]


def test_a_bad_datastream_attribute_is_rejected_under_the_events_own_id() -> None:
    # GIVEN a record whose body names its eventId, with a datastreamId attribute that is not a datastream id
    store = FakeStore()
    relay, _ = real_relay(store, 0)
    bad = sqs("order-42", "m-123", "p")
    bad["messageAttributes"] = {"datastreamId": {"stringValue": "not a datastream!", "dataType": "String"}}

    # WHEN the batch runs
    run_batch(relay, [bad])

    # THEN the rejection is kept under order-42 (where `relayctl show order-42` finds it), not the messageId
    [(event_id, fields)] = store.rejected_unclaimed
    assert event_id == "order-42"
    assert fields["error"]["errors"][0]["path"] == "datastreamId"


@pytest.mark.parametrize(
    ("attribute", "wrong"),
    [
        ({"binaryValue": "ZHMtb3RoZXI=", "dataType": "Binary"}, "Binary"),
        ({"stringValue": "123", "dataType": "Number"}, "Number"),
        ({"stringValue": "7", "dataType": "Number.int"}, "Number"),
    ],
)
def test_a_datastream_attribute_that_is_not_a_string_is_rejected_not_taken_for_absent(
    attribute: dict[str, str], wrong: str
) -> None:
    # GIVEN a record whose datastreamId attribute is not a String attribute (contract: "datastreamId (String)")
    store = FakeStore()
    relay, edge = real_relay(store, 0)
    bad = sqs("order-43", "m-124", "p")
    bad["messageAttributes"] = {"datastreamId": attribute}

    # WHEN the batch runs
    answer = run_batch(relay, [bad])

    # THEN it is stored rejected under its eventId, saying which attribute and why, and not sent to the default
    # datastream
    assert answer == {"batchItemFailures": []}
    [(event_id, fields)] = store.rejected_unclaimed
    assert event_id == "order-43"
    assert fields["error"]["errors"] == [
        {"path": "datastreamId", "message": f"must be a String message attribute, not {wrong}"}
    ]
    assert edge.calls == []


def test_a_record_naming_a_datastream_not_listed_is_rejected_and_its_batch_mates_delivered() -> None:
    # GIVEN a deployment that lists its datastreams, and a record naming another one
    store = FakeStore(insert_claims=True)
    relay, edge = real_relay(store, 1)
    settings = load_settings({**ENV, "ALLOWED_DATASTREAM_IDS": "ds-listed"})
    runner = BatchRunner(settings, relay, ThreadPoolExecutor(1))
    unlisted = sqs("order-45", "m-126", "p")
    unlisted["messageAttributes"] = {"datastreamId": {"stringValue": "ds-other", "dataType": "String"}}
    listed = sqs("order-46", "m-127", "q")
    listed["messageAttributes"] = {"datastreamId": {"stringValue": "ds-listed", "dataType": "String"}}

    # WHEN the batch runs
    answer = runner.run({"Records": [unlisted, listed]}, Deadline(relay.clock, 20), lease_s=25)

    # THEN the unlisted one is stored rejected (filed under the default datastream) and acknowledged, the listed one
    # delivered
    assert answer == {"batchItemFailures": []}
    [(event_id, fields)] = store.rejected_unclaimed
    assert (event_id, fields["datastreamId"], fields["error"]["errors"][0]["path"]) == (
        "order-45",
        "ds-1",
        "datastreamId",
    )
    assert [call.datastream_id for call in edge.calls] == ["ds-listed"]


def test_a_datastream_attribute_of_a_string_subtype_names_the_datastream() -> None:
    store = FakeStore(insert_claims=True)
    relay, edge = real_relay(store, 1)
    record = sqs("order-44", "m-125", "p")
    record["messageAttributes"] = {"datastreamId": {"stringValue": "ds-named", "dataType": "String.datastream"}}

    assert run_batch(relay, [record]) == {"batchItemFailures": []}
    assert [call.datastream_id for call in edge.calls] == ["ds-named"]


@pytest.mark.parametrize(("xdm", "filed_as"), [({"_id": "order-big"}, "order-big"), ({}, "m-big")])
def test_a_record_over_64_kib_is_rejected_under_its_xdm_id_when_it_has_one(xdm: dict[str, Any], filed_as: str) -> None:
    # GIVEN a record whose body is over Edge's 64 KiB limit, with or without its own xdm._id
    store = FakeStore()
    relay, edge = real_relay(store, 0)
    body = json.dumps({"event": {"xdm": {**xdm, "pad": "x" * 66_000}}})

    # WHEN the batch runs
    answer = run_batch(relay, [{**sqs("x", "m-big", "p"), "body": body}])

    # THEN it is acknowledged and stored rejected (413) under its xdm._id, the id its producer knows (the messageId
    # only when it has none), and never sent
    assert answer == {"batchItemFailures": []}
    [(event_id, fields)] = store.rejected_unclaimed
    assert (event_id, fields["error"]["status"]) == (filed_as, 413)
    assert edge.calls == []


@pytest.mark.parametrize("body", ["{not json", '{"event": []}'])
def test_a_body_that_cannot_be_read_is_filed_under_the_datastream_its_record_named(body: str) -> None:
    # GIVEN a record naming its datastream, whose body is not JSON (or is JSON but not an event)
    store = FakeStore()
    relay, _ = real_relay(store, 0)
    bad = {**sqs("x", "m-9", "p"), "body": body}
    bad["messageAttributes"] = {"datastreamId": {"stringValue": "ds-named", "dataType": "String"}}

    # WHEN the batch runs
    run_batch(relay, [bad])

    # THEN the rejection is filed under ds-named (where anyone filtering by datastream looks), not the default
    [(_, fields)] = store.rejected_unclaimed
    assert fields["datastreamId"] == "ds-named"


@pytest.mark.parametrize("body", [b"{not json", b'{"event": []}'])
def test_a_webhook_body_that_cannot_be_read_is_filed_under_the_datastream_it_named(body: bytes) -> None:
    # GIVEN a signed webhook naming ?datastreamId=ds-named, whose body is not JSON (or not an event)
    h = harness()
    headers = sign_webhook(body, SECRETS[0], msg_id="msg-ds")

    # WHEN it is posted
    answer = h.app.handle(http_event(body, headers, query="datastreamId=ds-named"), None)

    # THEN 400, and the rejection is filed under the datastream the request named
    assert answer["statusCode"] == 400
    [(_, fields)] = h.store.rejected_unclaimed
    assert fields["datastreamId"] == "ds-named"


@pytest.mark.parametrize("query", ["dataStreamId=ds-named", "datastreamId=ds-named&dataStreamId=ds-named"])
def test_a_webhook_naming_its_datastream_as_edge_also_spells_it_goes_there(query: str) -> None:
    # GIVEN a signed webhook naming ?dataStreamId= (the spelling Edge takes too, and Adobe's Node sample uses)
    h = harness()
    body = json.dumps({"event": {"xdm": {"_id": "order-ds"}}}).encode()

    # WHEN it is posted
    answer = h.call(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg-ds"), query=query))

    # THEN it goes to that datastream, not (silently) to the default one, which may be another sandbox
    assert answer["statusCode"] == 200
    [call] = h.session.calls
    assert call["params"]["datastreamId"] == "ds-named"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("DatastreamId=ds-named", "is spelled datastreamId (or dataStreamId), not DatastreamId"),
        ("datastreamid=ds-named", "is spelled datastreamId (or dataStreamId), not datastreamid"),
        ("datastream_id=ds-named", "is spelled datastreamId (or dataStreamId), not datastream_id"),
        (
            "datastreamId=ds-named&dataStreamId=ds-other",
            "is given twice, as datastreamId and dataStreamId, with different values",
        ),
    ],
)
def test_a_webhook_naming_its_datastream_in_another_spelling_is_refused_not_sent_to_the_default(
    query: str, message: str
) -> None:
    h = harness()
    body = json.dumps({"event": {"xdm": {"_id": "order-ds"}}}).encode()

    # WHEN it is posted
    answer = h.call(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg-ds"), query=query))

    # THEN 400 naming the parameter, stored rejected, and nothing sent
    assert answer["statusCode"] == 400
    assert json.loads(answer["body"])["errors"] == [{"path": "datastreamId", "message": message}]
    assert [event_id for event_id, _ in h.store.rejected_unclaimed] == ["order-ds"]
    assert h.session.calls == []


@pytest.mark.parametrize(
    ("attributes", "sent_to", "refusal"),
    [
        ({"dataStreamId": {"stringValue": "ds-named", "dataType": "String"}}, ["ds-named"], None),
        ({"DataStreamId": {"stringValue": "ds-named", "dataType": "String"}}, [], "not DataStreamId"),
        (
            {
                "datastreamId": {"stringValue": "ds-named", "dataType": "String"},
                "dataStreamId": {"stringValue": "ds-other", "dataType": "String"},
            },
            [],
            "with different values",
        ),
        (["not", "an", "object"], ["ds-1"], None),  # a hand-built record: no attributes, not a redelivery forever
        ({"relaySource": "webhook"}, ["ds-1"], None),  # an attribute that is not an object: as if absent
        ({"datastreamId": {"dataType": "String", "stringValue": 7}}, ["ds-1"], None),  # no string value: none named
    ],
)
def test_a_record_naming_its_datastream_goes_there_in_either_spelling_and_is_refused_in_any_other(
    attributes: Any, sent_to: list[str], refusal: str | None
) -> None:
    store = FakeStore(insert_claims=True)
    relay, edge = real_relay(store, len(sent_to))
    record = sqs("order-46", "m-126", "p")
    record["messageAttributes"] = attributes

    # WHEN the batch runs, THEN the record is done either way (delivered, or refused and stored: never redelivered)
    assert run_batch(relay, [record]) == {"batchItemFailures": []}
    assert [call.datastream_id for call in edge.calls] == sent_to
    if refusal is not None:
        [(event_id, fields)] = store.rejected_unclaimed
        [error] = fields["error"]["errors"]
        assert (event_id, error["path"]) == ("order-46", "datastreamId") and error["message"].endswith(refusal)


def test_a_failed_record_without_a_message_id_fails_the_whole_batch_rather_than_being_deleted() -> None:
    # GIVEN a malformed record without a messageId whose event fails
    relay = ScriptedRelay(failing={"a1"})
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2))  # type: ignore[arg-type]
    broken = record("a1", 1)
    del broken["messageId"]

    # WHEN the batch runs
    answer = runner.run({"Records": [broken]}, Deadline(relay.clock, 20), lease_s=25)

    # THEN it is reported with an empty identifier: Lambda then treats the whole batch as failed and nothing is deleted
    assert answer == {"batchItemFailures": [{"itemIdentifier": ""}]}


def test_a_defect_reading_one_record_redelivers_only_that_record(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a defect in reading one particular record
    import relay.batch as batch_module

    real = batch_module.read_event

    def flaky(raw: Any, *args: Any, **kwargs: Any) -> Any:
        if "boom" in raw:
            raise RuntimeError("a defect")
        return real(raw, *args, **kwargs)

    monkeypatch.setattr(batch_module, "read_event", flaky)
    relay = ScriptedRelay(failing=set())
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2))  # type: ignore[arg-type]
    records = [record("a1", 1, "p1"), record("boom", 1, "p2"), record("a3", 1, "p3")]

    # WHEN the batch runs
    answer = runner.run({"Records": records}, Deadline(relay.clock, 20), lease_s=25)

    # THEN only that record comes back; its batch-mates are processed
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-boom"}]}
    assert sorted(relay.processed) == ["a1", "a3"]


def test_a_webhook_defect_before_the_claim_answers_503_not_500(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a defect in reading a webhook body
    import relay.webhook as webhook_module

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a defect")

    monkeypatch.setattr(webhook_module, "read_event", broken)
    h = harness()
    body = b'{"event": {"xdm": {}}}'

    # WHEN a signed event is posted
    answer = h.app.handle(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg-defect")), None)

    # THEN the sender is told to retry (it still holds the event), with no stack trace in the answer
    assert answer["statusCode"] == 503
    assert answer["headers"]["Retry-After"] == "30"
    assert "Traceback" not in answer["body"] and "RuntimeError" not in answer["body"]


# -- the HTTP API's edges ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/events"), ("DELETE", "/events"), ("POST", "/other")])
def test_a_wrong_route_is_404_not_a_503_that_tells_the_sender_to_retry(method: str, path: str) -> None:
    # GIVEN a request for a route that does not exist
    h = harness()
    event = http_event(b"{}", {})
    event["requestContext"]["http"].update(method=method, path=path)
    event.update(rawPath=path, routeKey=f"{method} {path}")

    # WHEN / THEN it is answered 404 (final), without a Retry-After
    answer = h.app.handle(event, None)
    assert answer["statusCode"] == 404
    assert "Retry-After" not in (answer.get("headers") or {})
    assert json.loads(answer["body"])["detail"] == "the only route is POST /events"


@pytest.mark.parametrize("missing", ["rawPath", "stage", "method"])
def test_a_hand_built_event_missing_what_api_gateway_sends_gets_400_not_a_crash(missing: str) -> None:
    # GIVEN an HTTP API event without one of the fields API Gateway always sends
    h = harness()
    event = http_event(b"{}", {})
    {"rawPath": event, "stage": event["requestContext"], "method": event["requestContext"]["http"]}[missing].pop(
        missing
    )

    # WHEN / THEN
    answer = h.app.handle(event, None)
    assert (answer["statusCode"], json.loads(answer["body"])["detail"]) == (400, "not an HTTP API 2.0 event")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("headers", "x"),
        ("headers", ["webhook-id"]),
        ("queryStringParameters", "datastreamId=x"),
        ("headers", {"webhook-timestamp": 1795842876}),
        ("queryStringParameters", {"datastreamId": 5}),
    ],
)
def test_a_hand_built_event_whose_headers_or_query_are_not_maps_of_strings_gets_400_not_a_defect(
    field: str, value: Any, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    # GIVEN an HTTP API event, signed, whose headers (or query parameters) are not the object of strings API Gateway
    # sends (reviews found Powertools' ValueError taken for a defect: a 503 asking to retry, UnexpectedErrors counted,
    # then a crash; and a number among them: a TypeError in the signature check or the datastream's reading)
    h = harness()
    event = http_event(b"{}", sign_webhook(b"{}", SECRETS[0]))
    event[field] = {**event[field], **value} if field == "headers" and isinstance(value, dict) else value

    # WHEN / THEN a final 400 naming the field, and nothing counted as a defect
    answer = h.app.handle(event, None)
    problem_ = json.loads(answer["body"])
    assert (answer["statusCode"], problem_["detail"], problem_["errors"][0]["path"]) == (
        400,
        "not an HTTP API 2.0 event",
        field,
    )
    assert "UnexpectedErrors" not in emitted()


@pytest.mark.parametrize("body", [{"event": {"xdm": {}}}, 7, ["event"]])
def test_a_hand_built_event_whose_body_is_not_a_string_gets_400_not_a_retry(body: Any) -> None:
    # GIVEN an HTTP API event whose body is JSON rather than the string API Gateway sends (a hand-built event's usual
    # mistake)
    h = harness()
    event = {**http_event(b"{}", {}), "body": body}

    # WHEN / THEN a final 400 saying so, not a 503 asking to retry what can never succeed
    answer = h.app.handle(event, None)
    assert (answer["statusCode"], json.loads(answer["body"])["detail"]) == (400, "not an HTTP API 2.0 event")
    assert "Retry-After" not in (answer.get("headers") or {})


def test_two_long_webhook_ids_that_share_their_first_256_characters_stay_two_events() -> None:
    # GIVEN two signed events without xdm._id whose webhook-ids differ only after 260 characters
    h = harness()
    body = b'{"event": {"xdm": {"identityMap": {"CRMID": [{"id": "c1", "primary": true}]}}}}'
    ids = ["msg_" + "a" * 260 + "-1", "msg_" + "a" * 260 + "-2"]

    # WHEN both are posted, and the first once more
    answers = [h.app.handle(http_event(body, sign_webhook(body, SECRETS[0], msg_id=i)), None) for i in [*ids, ids[0]]]

    # THEN two distinct eventIds of at most 256 characters (each the xdm._id Edge got); the repeat has the first's
    event_ids = [json.loads(a["body"])["eventId"] for a in answers]
    assert event_ids[0] != event_ids[1] and event_ids[2] == event_ids[0]
    assert all(len(e) <= 256 and e.startswith("msg_aaaa") for e in event_ids)
    assert [json.loads(c["data"])["event"]["xdm"]["_id"] for c in h.session.calls] == event_ids


def test_a_webhook_id_holding_characters_sqs_refuses_becomes_an_event_id_it_takes() -> None:
    # GIVEN signed events without xdm._id whose webhook-ids hold characters the retry queue's `eventId` attribute
    # cannot carry (SQS refuses U+FFFE and C0 controls: such an event, kept under its id as it came, could never be
    # queued while Edge is down, and its sender would get 503 on every resend)
    from relay.models import _ID_REFUSED

    h = harness()
    body = b'{"event": {"xdm": {"identityMap": {"CRMID": [{"id": "c1", "primary": true}]}}}}'
    ids = ["msg_1\ufffe", "msg_1\x01", "msg_1\ufffe"]

    # WHEN they are posted (the last is the first one's resend)
    answers = [h.app.handle(http_event(body, sign_webhook(body, SECRETS[0], msg_id=i)), None) for i in ids]

    # THEN each eventId (the xdm._id Edge got, and the queue's attribute) holds none of them; the two ids stay two
    # events, and the resend is a repeat of the first
    event_ids = [json.loads(a["body"])["eventId"] for a in answers]
    assert not any(_ID_REFUSED.search(e) for e in event_ids)
    assert event_ids[0] != event_ids[1] and event_ids[2] == event_ids[0]
    assert all(e.startswith("msg_1~") for e in event_ids)
    assert [json.loads(c["data"])["event"]["xdm"]["_id"] for c in h.session.calls] == event_ids


def test_an_unsigned_event_whose_body_is_not_the_base64_it_claims_is_401() -> None:
    # GIVEN a hand-built event flagged base64 whose body is plain JSON, without signature headers
    h = harness()
    event = http_event(b"{}", {})
    event.update(isBase64Encoded=True, body='{"event": {"xdm": {}}}')

    # WHEN / THEN it is unauthenticated (401), as any request whose signature cannot be checked
    answer = h.app.handle(event, None)
    assert (answer["statusCode"], json.loads(answer["body"])["title"]) == (401, "Unauthorized")
    assert not h.reached_relay


def test_a_queued_event_goes_to_sqs_as_compact_json_with_only_what_sqs_refuses_escaped() -> None:
    # GIVEN an event whose strings hold characters JSON allows and SQS refuses (U+FFFE, U+FFFF), and others outside
    # ASCII, which must stay as they are (escaping them would triple an emoji and could push the event it over 64 KiB)
    class Sends:
        def __init__(self) -> None:
            self.bodies: list[str] = []

        def send_message(self, **kwargs: Any) -> dict[str, Any]:
            self.bodies.append(kwargs["MessageBody"])
            return {"MessageId": "m"}

    doc = {"event": {"xdm": {"_id": "e1", "note": "caf\u00e9 \uffff \ufffe \U0001f600 \u4e2d"}}}
    inbound = build_inbound(doc, event_id="e1", datastream_id="ds-1", source="webhook", received_at=1_700_000_000)
    sqs = Sends()

    # WHEN
    assert RetryQueue(sqs, QUEUE_URL).send(inbound) is True

    # THEN
    (body,) = sqs.bodies
    assert "\uffff" not in body and "\ufffe" not in body
    assert "caf\u00e9" in body and "\U0001f600" in body and "\u4e2d" in body
    assert (
        len(body.encode())
        == len(json.dumps(inbound.request, separators=(",", ":"), ensure_ascii=False).encode()) + 2 * 3
    )
    assert json.loads(body) == inbound.request


def test_a_webhook_event_back_from_the_queue_is_not_refused_for_its_size() -> None:
    # GIVEN a webhook event the relay queued itself, over 64 KiB once back from the queue, and an SQS producer's
    # message of the same content (larger still: its `é` are ASCII escapes)
    relay = ScriptedRelay(failing=set())
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1))  # type: ignore[arg-type]
    rejected: list[str] = []

    def reject_invalid(event_id: str, **kwargs: Any) -> dict[str, Any]:
        rejected.append(event_id)
        return {}

    relay.reject_invalid = reject_invalid  # type: ignore[method-assign]
    big = {"event": {"xdm": {"_id": "w1"}, "data": {"pad": "\u00e9" * 33_000}}}
    webhook = {**record("w1", 1), "body": json.dumps(big, ensure_ascii=False)}
    webhook["messageAttributes"] = {"relaySource": {"stringValue": "webhook", "dataType": "String"}}
    producer = {
        **record("p1", 1, "crm-2"),
        "body": json.dumps({**big, "event": {**big["event"], "xdm": {"_id": "p1"}}}),
    }

    # WHEN
    answer = runner.run({"Records": [webhook, producer]}, Deadline(relay.clock, 20), lease_s=25)

    # THEN the relay's own goes to Edge; the producer's is refused (413, stored) as before
    assert len(webhook["body"].encode()) > 65536
    assert answer["batchItemFailures"] == []
    assert relay.processed == ["w1"]
    assert rejected == ["p1"]  # under its xdm._id, though refused before it was read as an event


def test_a_defect_prefetching_states_does_not_fail_the_batch() -> None:
    # GIVEN a batch whose states read fails with something other than an unavailable store
    relay = ScriptedRelay(failing=set())

    def broken(keys: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        raise ValueError("Expecting value: line 1 column 1 (char 0)")

    relay.prefetch_states = broken  # type: ignore[method-assign]
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2))  # type: ignore[arg-type]

    # WHEN
    answer = runner.run({"Records": [record("a1", 1), record("b1", 1, "crm-2")]}, Deadline(relay.clock, 20), lease_s=25)

    # THEN every record goes on (each reads its own state) and the batch answers
    assert answer == {"batchItemFailures": []}
    assert sorted(relay.processed) == ["a1", "b1"]


@pytest.mark.parametrize("order", ["invalid-first", "corrected-first"])
def test_a_corrected_resend_in_the_same_batch_as_its_invalid_original_is_delivered(order: str) -> None:
    # GIVEN an invalid body and its corrected resend under the same eventId, in one batch
    relay = ScriptedRelay(failing=set())
    rejected: list[str] = []

    def reject_invalid(event_id: str, **kwargs: Any) -> dict[str, Any]:
        rejected.append(event_id)
        return {}

    relay.reject_invalid = reject_invalid  # type: ignore[method-assign]
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2))  # type: ignore[arg-type]
    bad = {**record("e-42", 1), "messageId": "m-bad"}
    bad["body"] = json.dumps({"event": {"xdm": {"_id": "e-42"}, "data": "not an object"}})
    good = {**record("e-42", 1), "messageId": "m-good"}
    records = [bad, good] if order == "invalid-first" else [good, bad]

    # WHEN
    answer = runner.run({"Records": records}, Deadline(relay.clock, 20), lease_s=25)

    # THEN the invalid one is stored rejected and the corrected one goes to Edge: neither shares the other's fate
    assert answer == {"batchItemFailures": []}
    assert rejected == ["e-42"]
    assert relay.processed == ["e-42"]


def test_postponing_many_records_stops_while_the_invocation_can_still_answer() -> None:
    # GIVEN 25 records to postpone (3 calls of at most 10), and time for 2 calls only
    sqs = FakeSqs()
    records = [(record(f"e{n}", 1), 600) for n in range(25)]
    calls_left = iter([True, True, False])

    # WHEN
    done = RetryQueue(sqs, QUEUE_URL).postpone(records, time_for_a_call=lambda: next(calls_left))

    # THEN it made the calls there was time for; the rest come back at the queue's timeout
    assert done == 20
    assert [len(call["Entries"]) for call in sqs.calls] == [10, 10]


def test_the_batch_summary_says_why_records_were_redelivered(
    caplog: pytest.LogCaptureFixture, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    # GIVEN one identity's two events and another identity's event, in a batch whose time has run out
    store = FakeStore()
    relay, edge = real_relay(store, 3)
    records = [sqs("e1", "m1", "p1"), sqs("e2", "m2", "p1"), sqs("e3", "m3", "p2")]

    # WHEN the batch runs at WARNING, the lowest log level the runbook's procedures allow (INFO is the default)
    with caplog.at_level(logging.WARNING, logger="interact-relay"):
        answer = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1)).run(
            {"Records": records}, Deadline(relay.clock, 0.05), lease_s=25
        )

    # THEN all three come back, none was sent, and the summary says why: these reasons have no line of their own,
    # and the runbook's dead-letter procedure reads them there
    assert answer == {"batchItemFailures": [{"itemIdentifier": m} for m in ("m1", "m2", "m3")]}
    assert edge.calls == []
    (summary,) = [r for r in caplog.records if r.getMessage() == "batch done"]
    assert summary.__dict__["redeliveredBecause"] == {
        "no time left to relay the event": 2,
        "held back behind an earlier record of its identity": 1,
    }
    # AND the three, sent back untried (each return a receive, towards the dead-letter queue), are counted
    assert emitted() == {"RecordsNotTried": [3.0]}


def test_records_sent_back_without_an_edge_call_are_counted_whatever_left_them_untried(
    emitted: Callable[[], dict[str, list[float]]],
) -> None:
    # GIVEN three people's events: one whose Edge attempts all failed, one for which no attempt could start (no slot
    # or no time for it), one for which there was no time to get a token
    store = FakeStore()
    edge = FakeEdge(
        EdgeUnavailable("edge answered 503", attempts=2),
        EdgeUnavailable("no time left for an attempt", attempts=0),
        NoTimeLeft("no time left waiting for the IMS token another call is fetching"),
    )
    relay = Relay(store, edge, FakeClock())  # type: ignore[arg-type]
    records = [sqs("e1", "m1", "p1"), sqs("e2", "m2", "p2"), sqs("e3", "m3", "p3")]

    # WHEN the batch runs
    answer = run_batch(relay, records)

    # THEN all three come back, and the two that never reached Edge are counted as not tried
    assert answer == {"batchItemFailures": [{"itemIdentifier": m} for m in ("m1", "m2", "m3")]}
    assert emitted()["RecordsNotTried"] == [2.0]


def test_a_defect_settling_a_written_result_leaves_the_others_settled_and_the_batch_answered(
    emitted: Callable[[], dict[str, list[float]]],
) -> None:
    # GIVEN 60 people's events, and a defect counting the third stored result
    store = FakeStore()
    relay, edge = real_relay(store, 60)
    stored, calls, counting = relay.stored, [], threading.Lock()

    def faulty(result: Result, *, in_batch: bool = False) -> None:
        with counting:  # two workers may settle their chunks at once
            calls.append(result.event_id)
            third = len(calls) == 3
        if third:
            raise RuntimeError("defect")
        stored(result, in_batch=in_batch)

    relay.stored = faulty  # type: ignore[method-assign]

    # WHEN the batch runs on four workers (chunks of 25 results are written by the workers)
    answer = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(4)).run(
        {"Records": [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(60)]}, Deadline(relay.clock, 20), lease_s=25
    )

    # THEN the batch is answered: every result was written, so every record is acknowledged, the defect counted
    assert answer == {"batchItemFailures": []}
    assert len(store.finished) == 60 and len(calls) == 60
    assert emitted()["UnexpectedErrors"] == [1.0]


def test_a_defect_in_one_identitys_run_sends_its_records_back_after_every_group_has_finished(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN three people's events, and a defect outside a record's own run for one of them (here: buffering its result)
    store = FakeStore()
    relay, _ = real_relay(store, 4)
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2))
    add = batch_module._ResultWrites.add

    def faulty(self: Any, message_id: str, result: Result) -> None:
        if message_id == "m-b1":
            raise RuntimeError("defect")
        add(self, message_id, result)

    records = [sqs("a1", "m-a1", "ann"), sqs("b1", "m-b1", "bob"), sqs("b2", "m-b2", "bob"), sqs("c1", "m-c1", "cy")]

    # WHEN the batch runs
    with (
        caplog.at_level(logging.INFO, logger="interact-relay"),
        patch.object(batch_module._ResultWrites, "add", faulty),
    ):
        answer = runner.run({"Records": records}, Deadline(relay.clock, 20), lease_s=25)

    # THEN the batch is answered (not failed whole), only that person's records come back, in their order, and the
    # other groups had finished, their results written, before it returned: none runs on into the next invocation
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-b1"}, {"itemIdentifier": "m-b2"}]}
    assert sorted(e for e, _ in store.finished) == ["a1", "c1"]
    (summary,) = [r for r in caplog.records if r.getMessage() == "batch done"]
    assert summary.__dict__["redeliveredBecause"] == {"unexpected error": 2}


def test_the_batch_summary_counts_an_invalid_record_whose_rejection_was_not_stored_as_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN an invalid record whose rejection cannot be stored
    relay = ScriptedRelay(failing=set())

    def reject_invalid(event_id: str, **kwargs: Any) -> dict[str, Any]:
        raise StoreUnavailable("dynamodb put_item failed: InternalServerError")

    relay.reject_invalid = reject_invalid  # type: ignore[method-assign]
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1))  # type: ignore[arg-type]
    bad = {**record("e-1", 1), "body": "not json"}

    # WHEN
    with caplog.at_level(logging.INFO, logger="interact-relay"):
        answer = runner.run({"Records": [bad]}, Deadline(relay.clock, 20), lease_s=25)

    # THEN it is redelivered, and the summary says so (not "rejected")
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-e-1"}]}
    (summary,) = [r for r in caplog.records if r.getMessage() == "batch done"]
    assert summary.__dict__["outcomes"] == {"failed": 1}


# -- misconfiguration the operator must be told about ----------------------------------------------------------------


class RefusingSqs:
    def send_message(self, **kwargs: Any) -> dict[str, Any]:
        raise ClientError({"Error": {"Code": "AWS.SimpleQueueService.NonExistentQueue", "Message": "m"}}, "SendMessage")


@pytest.mark.parametrize(
    ("client", "url", "level", "message", "reason"),
    [
        (RefusingSqs(), QUEUE_URL, logging.WARNING, "the retry queue refused the event", "NonExistentQueue"),
        (None, None, logging.ERROR, "no retry queue: RETRY_QUEUE_URL is not set", None),
    ],
)
def test_a_queue_that_cannot_take_an_event_says_why(
    caplog: pytest.LogCaptureFixture, client: Any, url: str | None, level: int, message: str, reason: str | None
) -> None:
    # GIVEN a webhook event to queue, and a queue that does not exist (or none configured)
    inbound = build_inbound(
        {"event": {"xdm": {"_id": "q-1"}}}, event_id="q-1", datastream_id="ds-1", source="webhook", received_at=0
    )

    # WHEN it is sent
    with caplog.at_level(logging.INFO, logger="interact-relay"):
        sent = RetryQueue(client, url).send(inbound)

    # THEN it failed (the webhook answers 503) and the log says why, in AWS's words
    assert sent is False
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.levelno, r.getMessage()) for r in records] == [(level, message)]
    if reason is not None:
        assert reason in str(records[0].__dict__.get("reason"))


class ExplodingSqs:
    """An SQS client whose send fails with neither a ClientError nor a BotoCoreError (a defect)."""

    def send_message(self, **kwargs: Any) -> Any:
        raise RuntimeError("defect in sending")


@pytest.mark.parametrize("where", ["send", "client"])
def test_a_webhook_event_that_could_not_be_queued_for_a_defect_is_not_left_saying_queued(
    where: str, store_on_moto: StoreOnMoto, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    from relay.errors import EdgeUnavailable
    from relay.webhook import WebhookApp

    # GIVEN Edge unavailable, and a retry queue whose send (or whose client's creation) fails with a defect
    settings = load_settings({**ENV, "RETRY_QUEUE_URL": QUEUE_URL})
    store, clock = store_on_moto.store, store_on_moto.clock
    relay = Relay(store, FakeEdge(EdgeUnavailable("edge answered 503")), clock)  # type: ignore[arg-type]

    def queue() -> RetryQueue:
        if where == "client":
            raise RuntimeError("defect building the SQS client")
        return RetryQueue(ExplodingSqs(), QUEUE_URL)

    app = WebhookApp(settings, relay, lambda: None, queue, clock)  # type: ignore[arg-type,return-value]
    body = json.dumps({"event": {"xdm": {"_id": "ev-q"}}}).encode()

    # WHEN a webhook event arrives
    answer = app.handle(http_event(body, {"webhook-id": "msg_q"}), None)

    # THEN the sender is told to retry, and the stored item says nothing waits in the queue for it
    assert answer["statusCode"] == 503
    assert json.loads(answer["body"])["detail"] == "Edge is unavailable and the event could not be queued; retry"
    item = store.get_result("ev-q")
    assert item["status"] == "queued"  # released: the sender's retry may claim it
    assert item["lastError"] == (
        "not queued (it could not be sent to the retry queue; the sender was answered 503): edge answered 503"
    )
    assert "retryAfterSeconds" not in item
    # and the defect is counted for the alarm, as well as the failed fallback
    assert emitted()["UnexpectedErrors"] == [1.0]
    assert emitted()["QueueFallbackFailed"] == [1.0]


@pytest.mark.usefixtures("aws")
def test_a_safety_margin_as_long_as_the_invocation_is_logged_as_the_error_it_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # GIVEN SAFETY_MARGIN_MS as long as the function's timeout (every event would go to the dead-letter queue)
    from relay.runtime import Runtime

    from devtools.lambda_context import new_context

    runtime = Runtime(load_settings({**ENV, "SAFETY_MARGIN_MS": "30000"}))

    # WHEN a batch arrives with 30 s to run
    with caplog.at_level(logging.INFO, logger="interact-relay"):
        answer = runtime.handle({"Records": [record("s1", 1)]}, new_context(30))

    # THEN the record is redelivered untouched, and one ERROR names the setting
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-s1"}]}
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("SAFETY_MARGIN_MS leaves no time")


@pytest.mark.usefixtures("aws")
@pytest.mark.parametrize(("allowed", "warned"), [("ds-other", True), ("ds-other,ds-1", False), ("", False)])
def test_a_default_datastream_left_out_of_the_allowed_ones_is_said_once_per_environment(
    caplog: pytest.LogCaptureFixture, allowed: str, warned: bool
) -> None:
    # GIVEN ALLOWED_DATASTREAM_IDS without DATASTREAM_ID (events naming none are refused), with it, or empty (any)
    import io

    from relay.observability import logger
    from relay.runtime import Runtime

    from devtools.lambda_context import new_context

    runtime = Runtime(load_settings({**ENV, "ALLOWED_DATASTREAM_IDS": allowed}))
    out = io.StringIO()  # the lines as the function's formatter writes them
    handler = logging.StreamHandler(out)
    handler.setFormatter(logger.registered_formatter)
    logger._logger.addHandler(handler)

    # WHEN two batches arrive
    contexts = [new_context(30), new_context(30)]
    try:
        with caplog.at_level(logging.INFO, logger="interact-relay"):
            for n, context in enumerate(contexts):
                runtime.handle({"Records": [record(f"w{n}", 1)]}, context)
    finally:
        logger._logger.removeHandler(handler)

    # THEN only the first list is said, as a warning, once, naming its invocation as every line of it does
    said = [r for r in caplog.records if "DATASTREAM_ID is not in ALLOWED_DATASTREAM_IDS" in r.getMessage()]
    assert [r.levelno for r in said] == ([logging.WARNING] if warned else [])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    warnings = [line for line in lines if line["message"].startswith("DATASTREAM_ID is not in")]
    assert [line.get("function_request_id") for line in warnings] == ([contexts[0].aws_request_id] if warned else [])


def test_a_webhook_event_the_relays_additions_take_over_the_limit_is_answered_413_saying_so() -> None:
    # GIVEN a signed body 20 bytes under 64 KiB, without an `_id` or timestamp (the relay fills both in)
    h = harness()
    head = b'{"event": {"xdm": {"identityMap": {"CRMID": [{"id": "u", "primary": true}]}, "p": "'
    body = head + b"x" * (64 * 1024 - 20 - len(head) - 4) + b'"}}}'
    assert len(body) == 64 * 1024 - 20

    # WHEN it is posted
    answer = h.app.handle(http_event(body, sign_webhook(body.decode(), SECRETS[0], msg_id="msg-big")), None)

    # THEN 413, saying what is too large and by how much; Edge was never called
    assert answer["statusCode"] == 413
    doc = json.loads(answer["body"])
    assert doc["detail"] == "the request is too large for Edge as the relay sends it; make the event smaller"
    assert "over Edge's 65536-byte limit" in doc["errors"][0]["message"]
    assert h.session.calls == []
    # AND it was refused on arrival, before any claim: a webhook never queues (202) an event it could not deliver
    assert h.store.claims == []
    [(event_id, fields)] = h.store.rejected_unclaimed
    assert event_id == "msg-big" and fields["error"]["status"] == 413


# -- what the alarms count ---------------------------------------------------------------------------------------


def test_an_unreadable_webhook_secret_is_counted_for_its_alarm(emitted: Callable[[], dict[str, list[float]]]) -> None:
    # GIVEN the relay's webhook secret cannot be read (every webhook is refused while Lambda sees no error)
    from relay.errors import CredentialsError

    h = harness()

    def unreadable(*, force: bool = False) -> list[str]:
        raise CredentialsError("webhook secret (WEBHOOK_SECRET_ID) could not be read (AccessDeniedException)")

    h.app._credentials().webhook_secrets = unreadable  # type: ignore[method-assign]
    body = b'{"event": {}}'

    # WHEN a webhook arrives
    answer = h.app.handle(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg-1")), None)

    # THEN 503, and WebhookAuthUnavailable is counted (the only thing WebhookAuthUnavailableAlarm can see)
    assert answer["statusCode"] == 503
    assert emitted().get("WebhookAuthUnavailable") == [1.0]


class BrokenStore(FakeStore):
    """A store with a defect (not an outage) in one method."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def claim(self, event_id: str, **kwargs: Any) -> Any:
        if self.where == "claim":
            raise RuntimeError("defect")
        return super().claim(event_id, **kwargs)

    def put_results(self, writes: list[Any], deadline: Any = None) -> dict[str, str]:
        if self.where == "put_results":
            raise RuntimeError("defect")
        return super().put_results(writes, deadline)


@pytest.mark.parametrize("where", ["claim", "put_results"])
def test_a_defect_in_a_batch_is_counted_for_the_unexpected_errors_alarm(
    where: str, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    # GIVEN a defect while claiming, or while writing the results
    relay, _ = real_relay(BrokenStore(where), 1)

    # WHEN a batch runs
    answer = run_batch(relay, [sqs("d1", "m-d1", "p")])

    # THEN the record is redelivered, and the defect counted (UnexpectedErrorsAlarm)
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-d1"}]}
    assert emitted().get("UnexpectedErrors") == [1.0]


def test_a_rejection_that_could_not_be_stored_is_not_counted_as_rejected(
    emitted: Callable[[], dict[str, list[float]]],
) -> None:
    # GIVEN a store that is down, and an invalid body
    store = FakeStore()

    def down(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise StoreUnavailable("dynamodb put_item failed: InternalServerError")

    store.reject_unclaimed = down  # type: ignore[method-assign]
    relay, _ = real_relay(store, 0)

    # WHEN the batch runs
    answer = run_batch(relay, [{**sqs("x", "m-x", "p"), "body": "{not json"}])

    # THEN the record is redelivered: counted as handed back, not (yet) as rejected
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-x"}]}
    seen = emitted()
    assert "Rejected" not in seen
    assert seen.get("RetriesScheduled") == [1.0]


def test_powertools_dev_mode_never_prints_a_webhook_request(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an operator who turned on Powertools' extra verbosity while debugging
    monkeypatch.setenv("POWERTOOLS_DEV", "true")
    h = harness()
    person = "alice.secret@example.com"
    body = json.dumps({"event": {"xdm": {"_id": "ev-dev", "identityMap": {"Email": [{"id": person}]}}}}).encode()

    # WHEN a signed request and an unsigned one arrive
    signed = h.call(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg_dev")))
    unsigned = h.call(http_event(body, {}))

    # THEN both are answered as usual, and neither the identity nor the signature is printed anywhere
    assert (signed["statusCode"], unsigned["statusCode"]) == (200, 401)
    out = capsys.readouterr()
    assert person not in out.out + out.err
    assert "v1," not in out.out + out.err


def reused_elsewhere() -> Claim:
    """The claim's answer for an eventId already delivered for another identity."""
    existing = {"status": "delivered", "eventId": "order-1001", "datastreamId": "ds-1", "identityId": "0" * 64}
    return Claim(False, existing={**existing, "handle": [{"type": "state:store", "payload": ["someone else's"]}]})


def test_a_webhook_reusing_another_identitys_eventid_gets_422_saying_which_field_and_no_handle() -> None:
    # GIVEN an eventId already delivered for another identity
    h = harness()
    h.store.claim_result = reused_elsewhere()
    body = json.dumps({"event": {"xdm": {"_id": "order-1001", "identityMap": {"CRMID": [{"id": "bob"}]}}}}).encode()

    # WHEN a signed event reuses it
    answer = h.call(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg_reuse")))

    # THEN 422, naming the field, under the id it was filed as; nothing of the other event's answer
    problem = check_answer(answer)
    assert answer["statusCode"] == 422 and problem["title"] == "Event id already used"
    assert problem["errors"][0]["path"] == "event.xdm._id"
    assert problem["eventId"].startswith("order-1001#reused-")
    assert "handle" not in problem and "someone else" not in answer["body"]
    assert [e for e, _ in h.store.rejected_unclaimed] == [problem["eventId"]]
    assert h.session.calls == []


def test_a_batch_record_reusing_another_identitys_eventid_is_stored_rejected_and_acknowledged() -> None:
    # GIVEN an eventId already delivered for another identity
    store = FakeStore(claim_result=reused_elsewhere())
    relay, edge = real_relay(store, 0)

    # WHEN a record reuses it
    answer = run_batch(relay, [sqs("order-1001", "m-1", "bob")])

    # THEN it is acknowledged, filed `rejected` under an id of its own, and Edge was not called
    assert answer == {"batchItemFailures": []}
    [(event_id, fields)] = store.rejected_unclaimed
    assert event_id.startswith("order-1001#reused-") and fields["error"]["status"] == 422
    assert edge.calls == []


def key_unavailable() -> bytes:
    raise CredentialsError("identity key secret (IDENTITY_KEY_SECRET_ID) could not be read (AccessDeniedException)")


def test_a_batch_whose_identity_key_cannot_be_read_sends_back_the_events_with_an_identity_untouched(
    emitted: Callable[[], dict[str, list[float]]],
) -> None:
    # GIVEN the identity key cannot be read
    store = FakeStore()
    relay, edge = real_relay(store, 2)
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1), identity_key=key_unavailable)
    anonymous = {**sqs("e-3", "m-3", "x"), "body": json.dumps({"event": {"xdm": {"_id": "e-3"}}})}

    # WHEN a batch arrives with two people's events and one without any identity
    answer = runner.run(
        {"Records": [sqs("e-1", "m-1", "ann"), sqs("e-2", "m-2", "bob"), anonymous]}, Deadline(relay.clock, 20), 25
    )

    # THEN the two with an identity are neither claimed nor sent (no state could be found or kept) and come back;
    # the one without needs no key and is delivered
    assert answer == {"batchItemFailures": [{"itemIdentifier": "m-1"}, {"itemIdentifier": "m-2"}]}
    assert [c["event_id"] for c in store.claims] == ["e-3"]
    assert [c.request["event"]["xdm"]["_id"] for c in edge.calls] == ["e-3"]
    # AND each is counted for CredentialsUnavailableAlarm (it would otherwise page only from the dead-letter queue)
    assert emitted()["CredentialsUnavailable"] == [1.0, 1.0]


def test_a_batch_keys_identities_with_the_deployments_key() -> None:
    # GIVEN an identity key
    store = FakeStore()
    handle = [{"type": "state:store", "payload": [{"key": "k", "value": "v", "maxAge": 60}]}]
    relay = Relay(store, FakeEdge(EdgeAnswer(200, {"requestId": "r", "handle": handle}, 1)), FakeClock())  # type: ignore[arg-type]
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1), identity_key=lambda: b"k" * 64)

    # WHEN an event of CRMID "ann" is relayed
    runner.run({"Records": [sqs("e-1", "m-1", "ann")]}, Deadline(relay.clock, 20), 25)

    # THEN its state is keyed with the HMAC, not the plain SHA-256
    [(opaque, _, _)] = store.state_writes
    assert opaque == opaque_identity_id("CRMID", "ann", key=b"k" * 64) != opaque_identity_id("CRMID", "ann")


def test_a_webhook_whose_identity_key_cannot_be_read_is_queued_not_refused(
    emitted: Callable[[], dict[str, list[float]]],
) -> None:
    # GIVEN the identity key cannot be read
    h = harness()
    h.app._identity_key = key_unavailable
    doc = {"event": {"xdm": {"_id": "ev-key", "identityMap": {"CRMID": [{"id": "ann", "primary": True}]}}}}
    body = json.dumps(doc).encode()

    # WHEN a signed event arrives
    answer = h.call(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg_key")))

    # THEN it is queued (202) for a batch to deliver, untouched (no claim, no Edge call)
    assert (answer["statusCode"], json.loads(answer["body"])) == (202, {"eventId": "ev-key", "status": "queued"})
    assert [e.event_id for e in h.queue.sent] == ["ev-key"]
    assert h.store.claims == [] and h.session.calls == []
    assert emitted()["CredentialsUnavailable"] == [1.0]  # CredentialsUnavailableAlarm


@pytest.mark.parametrize("queue_takes_it", [True, False])
def test_a_webhook_event_given_back_for_the_queue_says_so_until_its_message_is_sent(queue_takes_it: bool) -> None:
    # GIVEN Edge unavailable for a webhook's event
    h = harness()
    h.relay.edge = FakeEdge(EdgeUnavailable("edge answered 503", retry_after=5))  # type: ignore[assignment]
    if not queue_takes_it:
        h.queue.send = lambda inbound, delay_s=None: False  # type: ignore[method-assign,misc]
    body = json.dumps({"event": {"xdm": {"_id": "ev-q"}}}).encode()

    # WHEN it arrives
    answer = h.call(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg_q")))

    # THEN its claim was given back marked as on its way to the queue (what an invocation that ended before the send
    # would leave: `relayctl show` then says it may not be queued), and the mark is cleared only once it is sent
    assert h.store.releases == [("ev-q", "tok-1", "queue send pending: edge answered 503")]
    if queue_takes_it:
        assert answer["statusCode"] == 202
        assert h.store.queued_notes == [("ev-q", "edge answered 503")]
    else:
        assert answer["statusCode"] == 503
        assert h.store.queued_notes == []


def test_a_webhook_event_whose_give_back_failed_is_queued_without_a_second_write() -> None:
    # GIVEN Edge unavailable, and DynamoDB refusing the give-back
    h = harness()
    h.relay.edge = FakeEdge(EdgeUnavailable("edge answered 503"))  # type: ignore[assignment]

    def down(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("dynamodb update_item failed: InternalServerError")

    h.store.release = down  # type: ignore[method-assign]
    body = json.dumps({"event": {"xdm": {"_id": "ev-r"}}}).encode()

    # WHEN it arrives
    answer = h.call(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg_r")))

    # THEN it is queued (its claim lapses by itself), and no mark is cleared that was never written: no DynamoDB call
    # (which, with DynamoDB failing, could hold the answer past its deadline) after the message is sent
    assert answer["statusCode"] == 202
    assert h.store.queued_notes == []


def test_a_record_reusing_an_eventid_in_the_same_batch_is_not_taken_for_a_repeat(store_on_moto: StoreOnMoto) -> None:
    # GIVEN one batch with two people's events under one eventId (the real store, on in-process moto)
    ddb, store, clock = store_on_moto.ddb, store_on_moto.store, store_on_moto.clock
    edge = FakeEdge(*[EdgeAnswer(200, {"requestId": f"r{n}", "handle": []}, 1) for n in range(2)])
    relay = Relay(store, edge, clock)  # type: ignore[arg-type]
    ann, bob = sqs("order-7", "m-ann", "ann"), sqs("order-7", "m-bob", "bob")

    # WHEN the batch runs, and then Bob's record comes back
    first = run_batch(relay, [ann, bob])
    again = run_batch(relay, [bob])

    # THEN Bob's is not acknowledged as Ann's repeat: it comes back, and is then filed as a reuse; Edge got Ann's only
    assert first == {"batchItemFailures": [{"itemIdentifier": "m-bob"}]}
    assert again == {"batchItemFailures": []}
    assert len(edge.calls) == 1
    items = ddb.scan(TableName="t", ProjectionExpression="pk, #s", ExpressionAttributeNames={"#s": "status"})["Items"]
    found = {
        i["pk"]["S"].split("#reused-")[0] + ("#reused" if "#reused-" in i["pk"]["S"] else ""): i["status"]["S"]
        for i in items
        if i["pk"]["S"].startswith("EVENT#")
    }
    assert found == {"EVENT#order-7": "delivered", "EVENT#order-7#reused": "rejected"}


def test_a_webhook_without_a_primary_identity_needs_no_identity_key() -> None:
    # GIVEN the identity key cannot be read
    h = harness()
    h.app._identity_key = key_unavailable
    body = json.dumps({"event": {"xdm": {"_id": "ev-anon", "eventType": "web.webpagedetails.pageViews"}}}).encode()

    # WHEN a signed event without any identity arrives
    answer = h.call(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg_anon")))

    # THEN it is delivered as usual, not queued
    assert answer["statusCode"] == 200 and h.queue.sent == []


def test_kept_alive_connections_are_dropped_after_an_idle_minute_and_kept_under_load() -> None:
    # GIVEN a loopback server that records each connection, and a runtime whose session talks to it
    import threading
    from http.server import ThreadingHTTPServer

    from relay.runtime import IDLE_RECONNECT_S, Runtime, new_http_session
    from relay.settings import load_settings

    from devtools.loopback import LoopbackHandler
    from tests.fakes import FakeClock

    connections: list[int] = []

    class Handler(LoopbackHandler):
        def setup(self) -> None:
            super().setup()
            connections.append(self.client_address[1])

        def do_GET(self) -> None:
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    clock = FakeClock()
    settings = load_settings(ENV)
    runtime = Runtime(settings, clock=clock, session=new_http_session(4))

    def invocation() -> None:
        with pytest.raises(ValueError):
            runtime.handle({"unsupported": True}, None)  # an invocation that does nothing, start to end
        assert runtime.session.get(url, timeout=5).status_code == 204

    opened: list[int] = []  # connections the server had accepted after each invocation
    try:
        # WHEN invocations follow each other, then one comes after more than a minute idle
        invocation()
        opened.append(len(connections))
        clock.advance(5)
        invocation()
        opened.append(len(connections))
        clock.advance(IDLE_RECONNECT_S + 1)
        invocation()
        opened.append(len(connections))
    finally:
        runtime.session.close()
        server.shutdown()
        server.server_close()

    # THEN the second reused the first one's connection, and the one after the idle minute opened a new one
    assert opened == [1, 1, 2]


# -- claims of new events, 25 to a request ---------------------------------------------------------------------------


def test_a_batch_claims_the_first_record_of_each_identity_25_to_a_request() -> None:
    # GIVEN 60 events of 60 people, first receives, and a store that inserts every new claim
    store = FakeStore(insert_claims=True)
    relay, edge = real_relay(store, 60)

    # WHEN the batch runs
    answer = run_batch(relay, [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(60)])

    # THEN the 60 claims went in requests of 25, 25 and 10, none one by one, and each result kept its claim's token
    assert answer == {"batchItemFailures": []}
    assert [len(chunk) for chunk in store.new_claims] == [25, 25, 10]
    assert sorted(e for chunk in store.new_claims for e in chunk) == sorted(f"e{n}" for n in range(60))
    assert store.claims == []
    assert len(edge.calls) == 60 and len(store.finished) == 60


def test_an_event_the_batch_could_not_insert_is_claimed_on_its_own_with_the_token_tried() -> None:
    # GIVEN a store whose INSERTs all fail (the events exist: a repeat, a retry, a lapsed claim)
    store = FakeStore(insert_claims=None)
    relay, _ = real_relay(store, 2)

    # WHEN the batch runs
    answer = run_batch(relay, [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(2)])

    # THEN each was claimed on its own with its INSERT's token (an INSERT written whose answer was lost is its own)
    assert answer == {"batchItemFailures": []}
    assert sorted((c["event_id"], c["token"]) for c in store.claims) == [("e0", "new-e0"), ("e1", "new-e1")]


def test_a_defect_claiming_a_batch_leaves_each_event_to_claim_itself(emitted: Callable[[], dict[str, Any]]) -> None:
    # GIVEN a claim_new that raises something unexpected
    store = FakeStore(insert_claims=RuntimeError("boom"))
    relay, edge = real_relay(store, 3)

    # WHEN the batch runs
    answer = run_batch(relay, [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(3)])

    # THEN nothing fails: each event was claimed on its own, delivered, and the defect counted
    assert answer == {"batchItemFailures": []}
    assert sorted(c["event_id"] for c in store.claims) == ["e0", "e1", "e2"]
    assert len(edge.calls) == 3
    assert emitted()["UnexpectedErrors"] == [1.0]


def test_only_first_receives_from_the_sender_are_claimed_with_the_batch() -> None:
    # GIVEN a first receive, a redelivery, a replay (names its eventId), an event the webhook queued, and a second
    # event of the first one's identity
    store = FakeStore(insert_claims=True)
    relay, _ = real_relay(store, 6)
    redelivered = {**record("e-again", 2, "p2"), "messageId": "m2"}
    replayed = sqs("e-replay", "m3", "p3")
    replayed["messageAttributes"] = {
        "eventId": {"stringValue": "e-replay", "dataType": "String"},
        "relaySource": {"stringValue": "sqs", "dataType": "String"},
    }
    queued = sqs("e-queued", "m4", "p4")
    queued["messageAttributes"] = {"relaySource": {"stringValue": "webhook", "dataType": "String"}}
    records = [sqs("e-new", "m1", "p1"), redelivered, replayed, queued, sqs("e-second", "m5", "p1")]
    records.append(sqs("e-new2", "m6", "p6"))

    # WHEN the batch runs
    answer = run_batch(relay, records)

    # THEN only the first receives were INSERTed; the others (whose items exist, or whose turn comes later) claim alone
    assert answer == {"batchItemFailures": []}
    assert store.new_claims == [["e-new", "e-new2"]]
    assert sorted(c["event_id"] for c in store.claims) == ["e-again", "e-queued", "e-replay", "e-second"]


def test_an_event_id_twice_in_a_batch_for_two_identities_is_inserted_once() -> None:
    # GIVEN two people's events that share an eventId (DynamoDB refuses two statements on one item in a batch)
    store = FakeStore(insert_claims=True)
    relay, _ = real_relay(store, 3)

    # WHEN the batch runs
    run_batch(relay, [sqs("same", "m1", "p1"), sqs("same", "m2", "p2"), sqs("other", "m3", "p3")])

    # THEN one INSERT for it, and the other record claimed on its own
    assert store.new_claims == [["same", "other"]]
    assert [c["event_id"] for c in store.claims] == ["same"]


def test_a_claim_taken_for_an_event_that_has_no_time_left_is_given_back() -> None:
    # GIVEN a claim the batch took, and no time left to relay the event
    store = FakeStore()
    relay, edge = real_relay(store, 1)
    inbound = build_inbound(
        {"event": {"xdm": {"_id": "e1"}}}, event_id="e1", datastream_id="ds", source="sqs", received_at=0
    )

    # WHEN it is processed
    result = relay.process(
        inbound, Deadline(relay.clock, 0.01), lease_s=25, claim=Claim(True, token="tok-new", item={})
    )

    # THEN it comes back without a call, and its claim is released so that the redelivery can take it at once
    assert result.outcome is Outcome.RETRY
    assert edge.calls == []
    assert store.releases == [("e1", "tok-new", "no time left to relay the event")]


def test_a_lone_new_event_is_claimed_with_update_item_not_a_batch_of_one() -> None:
    # GIVEN a batch of one first receive
    store = FakeStore(insert_claims=True)
    relay, _ = real_relay(store, 1)

    # WHEN it runs
    assert run_batch(relay, [sqs("e1", "m1", "p1")]) == {"batchItemFailures": []}

    # THEN it claims itself (one request either way; UpdateItem answers a repeat with the stored result)
    assert store.new_claims == []
    assert [c["event_id"] for c in store.claims] == ["e1"]


def test_a_batch_does_not_answer_while_its_state_read_still_runs() -> None:
    # GIVEN a batch of repeats (no group ever asks for the states) and a slow state read (DynamoDB throttling it)
    store = FakeStore(claim_result=Claim(False, existing={"status": "delivered"}))
    relay, _ = real_relay(store, 0)
    finished = threading.Event()

    def slow_read(keys: Any) -> Any:
        time.sleep(0.3)
        finished.set()
        return {}

    relay.prefetch_states = slow_read  # type: ignore[method-assign]
    records = [{**sqs(f"e{n}", f"m{n}", f"p{n}"), "attributes": {"ApproximateReceiveCount": "2"}} for n in range(3)]

    # WHEN the batch runs
    answer = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(4)).run(
        {"Records": records}, Deadline(relay.clock, 20), lease_s=25
    )

    # THEN it answers only once the read is done (a read left running would resume in the next invocation)
    assert answer == {"batchItemFailures": []}
    assert finished.is_set()


def test_a_batch_with_no_time_left_writes_nothing(store_on_moto: StoreOnMoto) -> None:
    # GIVEN three new events and a batch whose time is up
    relay = Relay(store_on_moto.store, FakeEdge(), store_on_moto.clock)  # type: ignore[arg-type]
    writes: list[str] = []
    for op in ("batch_execute_statement", "update_item", "put_item", "batch_write_item"):
        real = getattr(store_on_moto.ddb, op)

        def counted(*args: Any, _op: str = op, _real: Any = real, **kwargs: Any) -> Any:
            writes.append(_op)
            return _real(*args, **kwargs)

        setattr(store_on_moto.ddb, op, counted)

    # WHEN it runs
    answer = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2)).run(
        {"Records": [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(3)]}, Deadline(relay.clock, 0.01), lease_s=25
    )

    # THEN every record comes back untouched: no claim taken (and given back), nothing written
    assert len(answer["batchItemFailures"]) == 3
    assert writes == []


def test_claims_stay_a_few_groups_ahead_of_the_workers() -> None:
    # GIVEN 100 new events and one worker
    store = FakeStore(insert_claims=True)
    relay, edge = real_relay(store, 100)
    claimed_when: list[int] = []  # Edge calls made when each claim_new was made
    real_claim_new = store.claim_new

    def spy(events: list[ClaimKey], *, lease_s: float) -> dict[str, Claim]:
        claimed_when.append(len(edge.calls))
        return real_claim_new(events, lease_s=lease_s)

    store.claim_new = spy  # type: ignore[method-assign]

    # WHEN the batch runs
    assert run_batch(relay, [sqs(f"e{n}", f"m{n}", f"p{n}") for n in range(100)]) == {"batchItemFailures": []}

    # THEN each chunk of 25 is claimed before the worker reaches it, but only once it is within 8 groups of it
    assert [len(c) for c in store.new_claims] == [25, 25, 25, 25]
    assert claimed_when[0] == 0
    for n in (1, 2, 3):
        assert 25 * n - CLAIM_AHEAD - 1 <= claimed_when[n] <= 25 * n


def test_a_webhook_400_never_repeats_an_identity_used_as_a_namespace() -> None:
    # GIVEN a signed event whose identityMap is keyed by an email address, with a broken entry
    h = harness()
    body = json.dumps({"event": {"xdm": {"identityMap": {"alice@example.com": [{"id": ""}]}}}}).encode()

    # WHEN it is posted
    answer = h.app.handle(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg-ns")), None)

    # THEN a 400 with the field's position, and the address nowhere in the answer
    doc = check_answer(answer)
    assert answer["statusCode"] == 400
    assert doc["errors"] == [
        {"path": "event.xdm.identityMap[<namespace 1>][0].id", "message": "is required and must be a non-empty string"}
    ]
    assert "alice@example.com" not in answer["body"]


def test_an_environments_first_event_is_counted_as_a_cold_start(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a new execution environment
    from relay.runtime import Runtime
    from relay.settings import load_settings

    settings = load_settings(ENV)
    runtime = Runtime(settings, clock=FakeClock())

    def cold_starts_flushed() -> list[float]:
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
        return [v for doc in lines for v in doc.get("ColdStarts", [])]

    # WHEN it handles two invocations (that do nothing, start to end)
    with pytest.raises(ValueError):
        runtime.handle({"unsupported": True}, None)
    first = cold_starts_flushed()
    with pytest.raises(ValueError):
        runtime.handle({"unsupported": True}, None)

    # THEN only the first is a cold start, flushed with that invocation's metrics
    assert first == [1.0]
    assert cold_starts_flushed() == []


def test_a_queued_events_own_replay_refused_as_invalid_is_kept_beside_it_and_the_event_told(
    store_on_moto: StoreOnMoto,
) -> None:
    # GIVEN an event marked queued (a replay's mark: its message is on the queue), and that message refused as invalid
    store, clock = store_on_moto.store, store_on_moto.clock
    claim = store.claim("order-3", datastream_id="ds-1", source="sqs", lease_s=30)
    store.release("order-3", claim.token, "edge unavailable")
    bad = {**sqs("order-3", "m-bad", "p"), "body": json.dumps({"event": {"xdm": {"_id": "order-3", "timestamp": 5}}})}
    bad["messageAttributes"] = {
        "eventId": {"stringValue": "order-3", "dataType": "String"},
        "relaySource": {"stringValue": "sqs", "dataType": "String"},
    }

    # WHEN the batch runs
    assert run_batch(Relay(store, FakeEdge(), clock), [bad]) == {"batchItemFailures": []}  # type: ignore[arg-type]

    # THEN the rejection is kept beside the queued event, which is told where (relayctl show explains it)
    items = {i["pk"]["S"]: i for i in store_on_moto.ddb.scan(TableName="t")["Items"]}
    [filed] = [pk.removeprefix("EVENT#") for pk in items if "#invalid-" in pk]
    assert items[f"EVENT#{filed}"]["status"]["S"] == "rejected"
    queued = items["EVENT#order-3"]
    assert (queued["status"]["S"], queued["invalidFiling"]["S"]) == ("queued", filed)


def test_a_producers_own_eventid_attribute_does_not_key_its_events() -> None:
    # GIVEN two different orders from a producer, without xdm._id, each with a message attribute `eventId` that the
    # producer uses for its own purpose (the same on both)
    store = FakeStore(insert_claims=True)
    relay, edge = real_relay(store, 2)
    orders = []
    for n in (1, 2):
        body = {"event": {"xdm": {"eventType": "order", "identityMap": {"CRMID": [{"id": f"p{n}", "primary": True}]}}}}
        message = {**sqs("unused", f"m-{n}", f"p{n}"), "body": json.dumps(body)}
        message["messageAttributes"] = {"eventId": {"stringValue": "order.created", "dataType": "String"}}
        orders.append(message)

    # WHEN the batch runs
    answer = run_batch(relay, orders)

    # THEN each is its own event, keyed by its messageId (contract §2), and both reach Edge
    assert answer == {"batchItemFailures": []}
    assert sorted(c.request["event"]["xdm"]["_id"] for c in edge.calls) == ["m-1", "m-2"]


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({}, "2023-07-22T04:26:40.000Z"),  # the message's own SentTimestamp
        ({"relaySentTimestamp": "1600000000000"}, "2023-07-22T04:26:40.000Z"),  # not the relay's message: ignored
        ({"relaySource": "sqs", "relaySentTimestamp": "1600000000000"}, "2020-09-13T12:26:40.000Z"),  # a redrive's
        ({"relaySource": "sqs", "relaySentTimestamp": "1e300"}, "2023-07-22T04:26:40.000Z"),  # not a time: ignored
        ({"relaySource": "sqs", "relaySentTimestamp": "soon"}, "2023-07-22T04:26:40.000Z"),
    ],
)
def test_the_default_timestamp_is_the_send_time_of_the_message_the_event_first_came_in(
    attributes: dict[str, str], expected: str
) -> None:
    # GIVEN an event without xdm.timestamp, in a message sent at 1690000000000 ms (not the clock's now), with these
    # attributes
    store = FakeStore()
    relay, edge = real_relay(store, 1)
    message = {**sqs("e-1", "m-1", "p1"), "body": json.dumps({"event": {"xdm": {"_id": "e-1"}}})}
    message["attributes"] = {**message["attributes"], "SentTimestamp": "1690000000000"}
    message["messageAttributes"] = {k: {"stringValue": v, "dataType": "String"} for k, v in attributes.items()}

    # WHEN the batch runs
    run_batch(relay, [message])

    # THEN the timestamp Edge gets is that of the first message (a redriven copy, a new message, names it)
    assert [c.request["event"]["xdm"]["timestamp"] for c in edge.calls] == [expected]


# -- what the Edge calls need, fetched while the batch reads and claims ---------------------------------------------


def test_a_batch_fetches_its_token_while_it_reads_states_and_answers_only_once_that_is_done() -> None:
    # GIVEN a token fetch that takes a while, and a state read that notes whether the fetch had started by then
    relay = ScriptedRelay(failing=set())
    fetch_started, fetch_done = threading.Event(), threading.Event()
    seen_by_the_read: list[bool] = []
    deadlines: list[Deadline] = []

    def warm(deadline: Deadline) -> None:
        deadlines.append(deadline)
        fetch_started.set()
        time.sleep(0.3)
        fetch_done.set()

    def read(keys: Any) -> dict[Any, Any]:
        seen_by_the_read.append(fetch_started.wait(5))
        return {}

    relay.prefetch_states = read  # type: ignore[method-assign]
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(4), warm=warm)  # type: ignore[arg-type]
    deadline = Deadline(relay.clock, 20)

    # WHEN a batch of two identities runs
    answer = runner.run({"Records": [record("a1", 1, "crm-a"), record("b1", 1, "crm-b")]}, deadline, lease_s=25)

    # THEN the fetch ran alongside the state read (not after it), within the batch's deadline, and the batch answered
    # only once it was over (left running, Lambda would freeze it into the next invocation)
    assert seen_by_the_read == [True]
    assert deadlines == [deadline]
    assert fetch_done.is_set()
    assert answer == {"batchItemFailures": []}
    assert sorted(relay.processed) == ["a1", "b1"]  # two identities: in either order (Python 3.13 often swaps them)


def test_a_batch_that_will_not_call_edge_does_not_fetch_a_token() -> None:
    # GIVEN a batch of bodies the relay refuses itself (not JSON)
    relay = ScriptedRelay(failing=set())
    warmed: list[Deadline] = []
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(2), warm=warmed.append)  # type: ignore[arg-type]
    records = [{**record(f"x{n}", 1), "body": "not json"} for n in range(3)]

    # WHEN it runs
    answer = runner.run({"Records": records}, Deadline(relay.clock, 20), lease_s=25)

    # THEN no token is fetched for it (nor waited for): each body is rejected, nothing is sent
    assert warmed == []
    assert answer == {"batchItemFailures": []}
    assert relay.processed == []


class _Tokens:
    def __init__(self, live: bool, error: str | None = None, lapses_in: float = 3600.0) -> None:
        self.live, self.error, self.lapses_in = live, error, lapses_in
        self.fetched: list[Deadline | None] = []
        self.live_for: list[float] = []

    def has_live_token(self, *, for_s: float = 0.0) -> bool:
        return self.live and self.lapses_in > for_s

    def get(self, *, deadline: Deadline | None = None, live_for_s: float = 0.0) -> Any:
        self.fetched.append(deadline)
        self.live_for.append(live_for_s)
        if self.error:
            raise CredentialsError(self.error)
        return object()


@pytest.mark.parametrize(
    ("tokens", "fetched"),
    [(_Tokens(live=False), 1), (_Tokens(live=True), 0), (_Tokens(live=False, error="IMS refused (HTTP 401)"), 1)],
)
def test_the_runtime_fetches_a_token_ahead_only_when_none_is_cached_and_leaves_a_failure_to_the_edge_calls(
    tokens: _Tokens, fetched: int
) -> None:
    from relay.runtime import Runtime

    runtime = Runtime(load_settings(ENV), clock=FakeClock())
    runtime.__dict__["tokens"] = tokens  # what `tokens` would have built (EDGE_AUTH=ims)
    deadline = Deadline(runtime.clock, 20)

    runtime._warm_token(deadline)  # a refusal is not raised: the Edge calls ask again and report it per event

    assert tokens.fetched == [deadline] * fetched


def test_a_token_that_would_lapse_during_the_batch_is_renewed_ahead_of_it() -> None:
    from relay.runtime import Runtime

    # GIVEN a cached token that reaches its refresh point in 5 s, and a batch with 20 s left
    runtime = Runtime(load_settings(ENV), clock=FakeClock())
    tokens = _Tokens(live=True, lapses_in=5)
    runtime.__dict__["tokens"] = tokens
    deadline = Deadline(runtime.clock, 20)

    # WHEN the batch warms its token
    runtime._warm_token(deadline)

    # THEN it is renewed now, for the batch's whole time: not by the Edge call that would find it lapsed near the
    # batch's end, holding the token lock through a secret read and a token request the time left may not cover
    assert tokens.fetched == [deadline] and tokens.live_for == [20]


def test_no_token_is_fetched_ahead_when_the_batch_has_no_time_left() -> None:
    from relay.runtime import Runtime

    runtime = Runtime(load_settings(ENV), clock=FakeClock())
    tokens = _Tokens(live=False)
    runtime.__dict__["tokens"] = tokens

    runtime._warm_token(Deadline(runtime.clock, 0.01))

    assert tokens.fetched == []


def test_a_defect_fetching_a_token_ahead_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    from relay.runtime import Runtime

    class Broken(_Tokens):
        def get(self, *, deadline: Deadline | None = None, live_for_s: float = 0.0) -> Any:
            raise OverflowError("a defect")

    runtime = Runtime(load_settings(ENV), clock=FakeClock())
    runtime.__dict__["tokens"] = Broken(live=False)

    with caplog.at_level(logging.ERROR):
        runtime._warm_token(Deadline(runtime.clock, 20))  # not raised: nothing reads the task's result

    assert any("unexpected error fetching the IMS token" in r.getMessage() for r in caplog.records)
    assert emitted() == {"UnexpectedErrors": [1.0]}


def test_without_ims_there_is_no_token_to_fetch_ahead() -> None:
    from relay.runtime import Runtime

    runtime = Runtime(load_settings(ENV), clock=FakeClock())  # EDGE_AUTH=none

    runtime._warm_token(Deadline(runtime.clock, 20))

    assert runtime.tokens is None


# -- a webhook's state read and token fetch overlap its claim ---------------------------------------------------------


class _ClaimWatchingStore(FakeStore):
    """Its claim waits (10 s at most) for `started`, set by whatever the webhook started beside the claim, and records
    whether it came; a state read can wait for the claim to have answered (`read_after_claim`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.started = threading.Event()
        self.claimed = threading.Event()
        self.overlapped: list[bool] = []
        self.reads_done: list[tuple[str, str]] = []
        self.read_after_claim = False

    def claim(self, event_id: str, **kwargs: Any) -> Claim:
        self.overlapped.append(self.started.wait(timeout=10))
        try:
            return super().claim(event_id, **kwargs)
        finally:
            self.claimed.set()

    def get_state(self, opaque_id: str, datastream_id: str) -> Any:
        self.started.set()
        if self.read_after_claim:
            self.claimed.wait(timeout=10)
            time.sleep(0.05)  # still reading when the webhook has its answer (not a timing assertion)
        state = super().get_state(opaque_id, datastream_id)
        self.reads_done.append((opaque_id, datastream_id))
        return state


def _webhook_runtime(store: FakeStore, **env: str) -> Any:
    from relay.runtime import Runtime

    from tests.unit.test_security_properties import OkSession

    runtime = Runtime(load_settings({**ENV, **env}))
    runtime.__dict__["store"] = store
    runtime.__dict__["session"] = OkSession()
    return runtime


def _webhook(doc: dict[str, Any]) -> dict[str, Any]:
    return http_event(json.dumps(doc).encode(), {"webhook-id": "msg_ahead"})


ANN = {"CRMID": [{"id": "ann", "primary": True}]}


def test_a_webhook_reads_its_identitys_state_while_its_claim_is_taken() -> None:
    # GIVEN a store whose claim answers only once the identity's state is being read (or after 10 s)
    store = _ClaimWatchingStore()
    runtime = _webhook_runtime(store)

    # WHEN a webhook event of CRMID "ann" arrives
    answer = runtime.handle(_webhook({"event": {"xdm": {"_id": "ev-ahead", "identityMap": ANN}}}), None)

    # THEN the state read was under way while the claim was taken, it was read once, and the event was delivered
    assert answer["statusCode"] == 200, answer
    assert store.overlapped == [True]
    assert store.state_reads == [(opaque_identity_id("CRMID", "ann"), "ds-1")]
    assert len(runtime.session.calls) == 1


def test_a_webhook_fetches_a_missing_ims_token_while_its_claim_is_taken() -> None:
    from tests.fakes import FakeTokenProvider

    # GIVEN IMS auth with no token cached, and a claim that answers only once the token is being fetched
    store = _ClaimWatchingStore()
    runtime = _webhook_runtime(store, EDGE_AUTH="ims", ADOBE_SECRET_ID="adobe", IMS_TOKEN_URL="https://ims.test/t")

    class NoTokenYet(FakeTokenProvider):
        fetched = False

        def has_live_token(self, *, for_s: float = 0.0) -> bool:
            return self.fetched

        def get(self, **kwargs: Any) -> Any:
            store.started.set()
            self.fetched = True
            return super().get(**kwargs)

    runtime.__dict__["tokens"] = NoTokenYet()

    # WHEN a webhook event without a primary identity arrives (no state to read)
    answer = runtime.handle(_webhook({"event": {"xdm": {"_id": "ev-token"}}}), None)

    # THEN the token was being fetched while the claim was taken, and the Edge call carried it
    assert answer["statusCode"] == 200, answer
    assert store.overlapped == [True]
    assert store.state_reads == []
    [call] = runtime.session.calls
    assert call["headers"]["Authorization"] == "Bearer token-1"


def test_a_repeat_webhook_answers_only_once_the_state_read_started_for_it_has_ended() -> None:
    # GIVEN the event was delivered before, and a state read that ends only after the claim has answered
    delivered = {"status": "delivered", "eventId": "ev-again", "handle": [], "requestId": "r-1"}
    store = _ClaimWatchingStore(claim_result=Claim(False, existing=delivered))
    store.read_after_claim = True
    runtime = _webhook_runtime(store)

    # WHEN the event is sent again
    answer = runtime.handle(_webhook({"event": {"xdm": {"_id": "ev-again", "identityMap": ANN}}}), None)

    # THEN it is answered with the stored result, and nothing the webhook started is left running when it returns
    # (Lambda would freeze it halfway)
    assert (answer["statusCode"], json.loads(answer["body"])["eventId"]) == (200, "ev-again")
    assert store.reads_done == [(opaque_identity_id("CRMID", "ann"), "ds-1")]
    assert runtime.session.calls == []


def test_every_log_line_of_an_invocation_names_its_lambda_request_id() -> None:
    # GIVEN a runtime, and two invocations with their own request ids (the runbook's log lines must join Lambda's
    # START/REPORT lines, which carry only the request id); the lines as the function's formatter writes them
    import io

    from relay.observability import logger
    from relay.runtime import Runtime

    from devtools.lambda_context import new_context

    runtime = Runtime(load_settings(ENV), clock=FakeClock())
    first, second = new_context(30), new_context(30)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logger.registered_formatter)
    logger._logger.addHandler(handler)
    try:
        # WHEN each logs a line (an event the function cannot take)
        for context in (first, second):
            with pytest.raises(ValueError):
                runtime.handle({"unsupported": True}, context)
    finally:
        logger._logger.removeHandler(handler)

    # THEN each line names its own invocation
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["message"] for line in lines] == ["unsupported event shape"] * 2
    assert [line.get("function_request_id") for line in lines] == [first.aws_request_id, second.aws_request_id]


@pytest.mark.parametrize(
    "event", [{"Records": ["x"]}, {"requestContext": "x"}, {"Records": [None]}, {"Records": []}, None, []]
)
def test_a_hand_built_event_of_an_odd_shape_is_said_unsupported_not_a_crash(event: dict[str, Any]) -> None:
    # GIVEN an event neither trigger sends (`sam local invoke -e` with a hand-edited file)
    from relay.runtime import Runtime

    from devtools.lambda_context import new_context

    runtime = Runtime(load_settings(ENV), clock=FakeClock())

    # WHEN it is handled, THEN it is refused as unsupported (logged as such), not an AttributeError from inside
    with pytest.raises(ValueError, match="unsupported event"):
        runtime.handle(event, new_context(30))


def test_connections_stay_pooled_for_more_hosts_than_a_few() -> None:
    # GIVEN six keep-alive hosts on loopback (Edge's base host, IMS, and regions under a sub-domain hint template)
    import threading
    from http.server import ThreadingHTTPServer

    from relay.runtime import new_http_session

    from devtools.loopback import LoopbackHandler

    connections: list[str] = []

    class Handler(LoopbackHandler):
        def setup(self) -> None:
            super().setup()
            connections.append(self.server.server_address[0])  # type: ignore[index]

        def do_GET(self) -> None:
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    servers = [ThreadingHTTPServer((f"127.0.0.{n}", 0), Handler) for n in range(1, 7)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    session = new_http_session(16)
    try:
        # WHEN calls go to each host in turn, ten rounds
        for _ in range(10):
            for server in servers:
                host, port = server.server_address[:2]
                assert session.get(f"http://{host!s}:{port}/", timeout=5).status_code == 204
    finally:
        session.close()
        for server in servers:
            server.shutdown()
            server.server_close()

    # THEN each host was connected to once (with 4 host pools, every call evicted one and reconnected: 60)
    assert sorted(connections) == [f"127.0.0.{n}" for n in range(1, 7)]


@pytest.mark.parametrize(
    ("deadline_ms", "timeout_s", "edge_s"),
    [
        (5000, 30, 4.25),  # the default: the budget less the 0.75 s kept back to queue the event
        (29000, 30, 23.0),  # 30 s less the safety margin (2 s) and the fallback at its worst (5 s)
        (29000, 60, 23.0),  # a longer function timeout does not lengthen API Gateway's 30 s
    ],
)
def test_a_webhooks_edge_attempts_end_in_time_for_its_fallback_to_answer_before_api_gateway_gives_up(
    deadline_ms: int, timeout_s: float, edge_s: float
) -> None:
    # GIVEN a webhook deadline (up to the largest the settings take) and a function timeout, on a clock that stands
    # still (so the budget is exact whatever the machine's load)
    class Context:
        def get_remaining_time_in_millis(self) -> int:
            return int(timeout_s * 1000)

    seen: list[float] = []
    h = harness()
    h.app._settings = load_settings({**ENV, "WEBHOOK_DEADLINE_MS": str(deadline_ms)})
    h.app._clock = FakeClock()
    process = h.relay.process

    def spy(inbound: Any, deadline: Deadline, **kwargs: Any) -> Any:
        seen.append(deadline.remaining())
        return process(inbound, deadline, **kwargs)

    h.relay.process = spy  # type: ignore[method-assign]
    body = json.dumps({"event": {"xdm": {"_id": "e-budget", "timestamp": "2023-11-14T22:13:20.000Z"}}}).encode()

    # WHEN an event is posted
    answer = h.app.handle(http_event(body, sign_webhook(body, SECRETS[0])), Context())

    # THEN Edge gets at most what leaves the queue send (4 s at worst) and its writes time to answer within 30 s
    assert answer["statusCode"] == 200
    (remaining,) = seen
    assert remaining == pytest.approx(edge_s)


def test_a_webhooks_edge_attempts_count_api_gateways_time_already_spent_on_the_request() -> None:
    # GIVEN a function timeout of 60 s, the largest webhook deadline, and a webhook secret read that takes 5 s
    from devtools.lambda_context import new_context

    clock = FakeClock()
    seen: list[float] = []
    h = harness()
    h.app._settings = load_settings({**SIGNED_ENV, "WEBHOOK_DEADLINE_MS": "29000"})  # signatures checked
    h.app._clock = clock

    class SlowSecret:
        def webhook_secrets(self, *, force: bool = False) -> list[str]:
            clock.advance(5.0)
            return list(SECRETS)

    h.app._credentials = lambda: SlowSecret()  # type: ignore[assignment,return-value]

    def spy(inbound: Any, deadline: Deadline, **kwargs: Any) -> Any:
        seen.append(deadline.remaining())
        return Result(Outcome.RETRY, inbound.event_id, reason="edge answered 503")

    h.relay.process = spy  # type: ignore[method-assign]
    body = json.dumps({"event": {"xdm": {"_id": "e-slow", "timestamp": "2023-11-14T22:13:20.000Z"}}}).encode()
    context = new_context(60)

    # WHEN an event is posted
    h.app.handle(http_event(body, sign_webhook(body, SECRETS[0])), context)

    # THEN Edge gets what is left of API Gateway's 30 s after those 5 s, less the safety margin and the fallback
    (remaining,) = seen
    assert remaining == pytest.approx(30.0 - 5.0 - 2.0 - 5.0)


@pytest.mark.parametrize(
    ("payload", "omitted"),
    [
        ('<div class="offer">' * 20, False),  # a typical offer: answered whole
        ('"' * 1_600_000, True),  # 1.6 MB of quotes (each 4 characters once escaped twice): 6.4 MB as Lambda encodes it
        ("é" * 1_000_000, True),  # 2 MB of UTF-8 (each character 7 once escaped twice): 7 MB
    ],
)
def test_a_delivered_answer_never_makes_a_response_larger_than_lambda_returns(payload: str, omitted: bool) -> None:
    # GIVEN a delivered event whose stored handles hold a payload (Edge's answers are read up to 2 MiB)
    from relay.webhook import delivered_response

    item = {
        "eventId": "e1",
        "requestId": "r1",
        "status": "delivered",
        "handle": [{"type": "personalization:decisions", "payload": [{"html": payload}]}],
        "warnings": [{"code": "W1"}],
    }

    # WHEN it is answered
    response = delivered_response(item)

    # THEN the response, as the Lambda runtime encodes it (the body escaped again inside API Gateway's JSON), stays
    # under Lambda's 6 MB limit, with the handles when they fit and flagged as left out when they do not
    encoded = json.dumps({"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": response.body})
    assert len(encoded.encode("utf-8")) < 6_291_456
    assert isinstance(response.body, str)
    doc = json.loads(response.body)
    assert (doc["eventId"], doc["requestId"]) == ("e1", "r1")
    if omitted:
        assert doc == {"eventId": "e1", "requestId": "r1", "handle": [], "handleOmitted": True, "warningsOmitted": True}
    else:
        assert doc["handle"] == item["handle"] and doc["warnings"] == item["warnings"]


def test_a_delivered_answer_says_which_parts_the_stored_result_had_to_shed() -> None:
    # GIVEN a delivered event whose stored result shed its handles to fit DynamoDB's item limit
    from relay.webhook import delivered_response

    item = {"eventId": "e1", "requestId": "r1", "status": "delivered", "handleOmitted": True}

    # WHEN it is answered (first time or repeat)
    doc = json.loads(str(delivered_response(item).body))

    # THEN the answer says the handles were left out, rather than look like an answer without any
    assert doc == {"eventId": "e1", "requestId": "r1", "handle": [], "handleOmitted": True}


@pytest.mark.parametrize(
    ("item", "status", "flag"),
    [
        ({"status": "delivered", "handleUnreadable": True}, 200, "handleUnreadable"),
        ({"status": "rejected", "errorUnreadable": True}, 422, "errorUnreadable"),
        ({"status": "rejected", "errorUnreadable": True, "rejectedBy": "relay"}, 422, "errorUnreadable"),
    ],
)
def test_a_repeat_whose_stored_answer_cannot_be_read_says_so(item: dict[str, Any], status: int, flag: str) -> None:
    # GIVEN a finished event whose stored handles or problem are in an encoding this version does not read (another
    # version's, or an item edited by hand: decode_item flags them)
    from relay.webhook import delivered_response, rejected_response

    stored = {"eventId": "e1", "requestId": "r1", **item}

    # WHEN a repeat of it is answered
    response = delivered_response(stored) if item["status"] == "delivered" else rejected_response(stored)

    # THEN the answer says what could not be read, rather than answer an empty list or a made-up problem as the truth
    assert response.status_code == status
    doc = json.loads(str(response.body))
    assert doc[flag] is True
    if item["status"] == "rejected":
        refuser = "the relay" if item.get("rejectedBy") else "Edge"
        assert (doc["title"], doc["detail"]) == (
            "Event refused",
            f"{refuser} refused this event; its stored problem could not be read",
        )
        assert "edgeStatus" not in doc


def test_a_webhook_event_queued_while_edge_is_unavailable_waits_as_long_as_edge_asked() -> None:
    # GIVEN Edge unavailable, asking for a retry in 120 s (a 429 or 503 with Retry-After)
    h = harness()
    h.relay.edge = FakeEdge(EdgeUnavailable("edge answered 503", retry_after=120))  # type: ignore[assignment]
    body = json.dumps({"event": {"xdm": {"_id": "ev-ra"}}}).encode()

    # WHEN a webhook event arrives
    answer = h.call(http_event(body, sign_webhook(body.decode(), SECRETS[0], msg_id="msg_ra")))

    # THEN it is queued (202) to be tried again when Edge asked, not at once (each early receive would count towards
    # the dead-letter queue while Edge is still refusing)
    assert answer["statusCode"] == 202
    assert h.queue.delays == [120]


@pytest.mark.parametrize(
    ("asked", "delay"), [(120, 120), (5000, 900), (None, 0), (-5, 0), (0.4, 1), (4.4, 5), (899.5, 900)]
)
def test_the_retry_queue_delays_a_message_as_edge_asked_within_what_sqs_takes(asked: float | None, delay: int) -> None:
    # GIVEN an SQS client that records what it is asked to send
    sent: list[dict[str, Any]] = []

    class Sqs:
        def send_message(self, **call: Any) -> dict[str, Any]:
            sent.append(call)
            return {"MessageId": "m-1"}

    inbound = build_inbound(
        {"event": {"xdm": {"_id": "ev-d"}}}, event_id="ev-d", datastream_id="ds-1", source="webhook", received_at=0.0
    )

    # WHEN an event is sent with Edge's Retry-After
    assert RetryQueue(Sqs(), QUEUE_URL).send(inbound, delay_s=asked)

    # THEN the message is delayed that long, within SQS's 0 to 900 s, in whole seconds rounded up (an HTTP-date read
    # 0.6 s into its second asks 4.4 s: visible after 4 s, the retry would come before Edge's time, and spend a
    # receive on another 429), as the batch's postponement and the stored retryAfterSeconds round
    assert [call["DelaySeconds"] for call in sent] == [delay]


def test_a_webhooks_claim_is_leased_for_longer_than_its_invocation_can_run() -> None:
    # GIVEN an invocation with 29 s left (its Edge attempts, then a result write or the queue fallback, may use them)
    from devtools.lambda_context import new_context

    h = harness()
    body = json.dumps({"event": {"xdm": {"_id": "ev-lease"}}}).encode()

    # WHEN a webhook event arrives
    h.app.handle(http_event(body, sign_webhook(body.decode(), SECRETS[0], msg_id="msg_lease")), new_context(29))

    # THEN its claim outlives the invocation: a resend or a queued copy cannot take the event over while it runs
    assert [claim["lease_s"] >= 29 for claim in h.store.claims] == [True]


def test_a_stored_field_error_is_never_answered_with_a_status_that_asks_for_a_retry() -> None:
    from relay.webhook import rejected_response

    # GIVEN a stored refusal of the relay's own (field errors) whose status is not one it answers (another version's
    # item, one edited by hand): a 503 would make the sender resend, and a 500 is not documented
    item = {"eventId": "e", "status": "rejected", "error": {"status": 503, "errors": [{"path": "$", "message": "x"}]}}

    # THEN it stays a final 400
    assert rejected_response(item).status_code == 400


class _Writes(io.StringIO):
    """A stdout that records each write() call, and gives other threads a chance to run between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        time.sleep(0)
        return super().write(text)


def test_a_metric_set_written_mid_batch_is_one_line_in_one_write(
    emitted: Callable[[], dict[str, list[float]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN stdout recorded write by write (EMF documents and log lines both go there in Lambda)
    from relay.observability import metrics, timing

    out = _Writes()
    monkeypatch.setattr("sys.stdout", out)

    # WHEN a batch records more values of one metric than one EMF document holds (100: one EdgeLatency per attempt)
    for n in range(250):
        timing("EdgeLatency", n)

    # THEN each document written so far is a whole JSON line in a single write (Powertools' own `print` makes two, and
    # another worker's log line could land between them: CloudWatch would drop the document), and no value is lost
    documents = [call for call in out.calls if '"_aws"' in call]
    assert documents and all(call.endswith("\n") and json.loads(call) for call in documents)
    written = [v for call in documents for v in json.loads(call)["EdgeLatency"]]
    held = list(metrics.metric_set["EdgeLatency"]["Value"])
    assert sorted(written + held) == sorted(emitted()["EdgeLatency"]) == [float(n) for n in range(250)]


def test_metrics_written_mid_batch_never_share_a_line_with_a_workers_log_line(
    emitted: Callable[[], dict[str, list[float]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the log handler and stdout on one recorded stream, as in Lambda
    from relay.observability import logger, metrics, timing

    out = _Writes()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr(logger.registered_handler, "stream", out)
    start = threading.Barrier(16)

    def measure() -> None:
        start.wait()
        for n in range(300):
            timing("EdgeLatency", n)

    def log() -> None:
        start.wait()
        for _ in range(300):
            logger.info("edge call will be retried", attempt=1)

    # WHEN 8 workers record Edge latencies while 8 others log, as in an Edge outage
    threads = [threading.Thread(target=measure if n % 2 else log) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # THEN every line is one JSON object (a metric document or a log line), and every value was written or is held
    lines = out.getvalue().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert sum(1 for doc in parsed if "_aws" in doc) >= 20
    assert sum(1 for doc in parsed if doc.get("message") == "edge call will be retried") == 8 * 300
    written = [v for doc in parsed if "_aws" in doc for v in doc["EdgeLatency"]]
    held = list(metrics.metric_set["EdgeLatency"]["Value"])
    assert len(written) + len(held) == len(emitted()["EdgeLatency"]) == 8 * 300


def applied_then_lost(real: Callable[..., Any]) -> Callable[..., Any]:
    """A DynamoDB call that is applied, but whose answer (and every retry's) is lost: the caller gets boto3's error."""
    calls: list[int] = []

    def call(**kwargs: Any) -> Any:
        if calls:
            return real(**kwargs)
        calls.append(1)
        real(**kwargs)
        raise ReadTimeoutError(endpoint_url="https://dynamodb.eu-west-1.amazonaws.com")

    return call


class NoQueue:
    def send_message(self, **kwargs: Any) -> Any:
        raise AssertionError("nothing is to be queued")


def webhook_on_moto(store_on_moto: StoreOnMoto, edge: Any, sqs_client: Any = None) -> Any:
    """The webhook app in front of the real store on in-process moto, with `edge` and a retry queue on `sqs_client`
    (by default one that nothing may be sent to)."""
    from relay.webhook import WebhookApp

    settings = load_settings({**ENV, "RETRY_QUEUE_URL": QUEUE_URL})
    relay = Relay(store_on_moto.store, edge, store_on_moto.clock)
    queue = RetryQueue(sqs_client or NoQueue(), QUEUE_URL)
    return WebhookApp(settings, relay, lambda: None, lambda: queue, store_on_moto.clock)  # type: ignore[arg-type,return-value]


class SqsRefusingOnce:
    """SQS that refuses the first message (a 4xx), then takes every message (kept in `queued`)."""

    def __init__(self) -> None:
        self.refused = False
        self.queued: list[dict[str, Any]] = []

    def send_message(self, **kwargs: Any) -> dict[str, Any]:
        if not self.refused:
            self.refused = True
            raise ClientError({"Error": {"Code": "KmsThrottled", "Message": "m"}}, "SendMessage")
        self.queued.append(kwargs)
        return {"MessageId": "m-1"}


@pytest.mark.parametrize("edge_says", ["delivered", "rejected"])
def test_a_webhook_result_written_though_its_answer_was_lost_is_the_answer(
    edge_says: str, store_on_moto: StoreOnMoto, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    from relay.errors import EdgeRejected

    # GIVEN Edge's answer (a delivery, or a refusal for good), and a result PutItem that DynamoDB applies but whose
    # answer is lost (a read timeout, a dropped connection, on every attempt boto3 makes)
    store = store_on_moto.store
    problem = {"type": "https://ns.adobe.com/aep/errors/EXEG-0104-422", "status": 422, "title": "Unprocessable"}
    answer_of_edge = (
        EdgeAnswer(200, {"requestId": "r-1", "handle": [{"type": "x", "payload": []}]}, 1)
        if edge_says == "delivered"
        else EdgeRejected(422, problem)
    )
    app = webhook_on_moto(store_on_moto, FakeEdge(answer_of_edge))
    store_on_moto.ddb.put_item = applied_then_lost(store_on_moto.ddb.put_item)
    body = json.dumps({"event": {"xdm": {"_id": "ev-1"}}}).encode()

    # WHEN the event arrives
    answer = app.handle(http_event(body, {"webhook-id": "msg_1"}), None)

    # THEN the sender is answered what is stored, not "queued" for an event that is done (it would never hear of its
    # handles, nor of Edge's refusal), nothing is queued, and the outcome is counted (EdgeRejectedRateAlarm counts it)
    item = store.get_result("ev-1")
    assert item is not None and item["status"] == edge_says
    if edge_says == "delivered":
        assert answer["statusCode"] == 200 and json.loads(answer["body"])["handle"] == item["handle"]
        assert emitted() == {"Delivered": [1.0], "RefusedByRelay": [0.0]}
    else:
        assert answer["statusCode"] == 422
        assert emitted() == {"Rejected": [1.0], "EdgeRejected": [1.0], "RefusedByRelay": [0.0]}


def test_batch_results_written_though_their_answer_was_lost_are_not_redelivered(
    store_on_moto: StoreOnMoto, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    # GIVEN two people's events, and a BatchWriteItem of their results that DynamoDB applies but whose answer is lost
    store, clock = store_on_moto.store, store_on_moto.clock
    edge = FakeEdge(*[EdgeAnswer(200, {"requestId": f"r{n}", "handle": []}, 1) for n in range(2)])
    relay = Relay(store, edge, clock)  # type: ignore[arg-type]
    store_on_moto.ddb.batch_write_item = applied_then_lost(store_on_moto.ddb.batch_write_item)

    # WHEN the batch runs
    answer = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1)).run(
        {"Records": [record("e1", 1, "p1"), record("e2", 1, "p2")]}, Deadline(clock, 20), lease_s=25
    )

    # THEN both records are done (a redelivery would only find them delivered), and counted as delivered
    assert answer == {"batchItemFailures": []}
    assert [store.get_result(e)["status"] for e in ("e1", "e2")] == ["delivered", "delivered"]  # type: ignore[index]
    assert emitted() == {"Delivered": [1.0, 1.0], "RefusedByRelay": [0.0, 0.0]} and len(edge.calls) == 2


def test_a_result_write_that_really_failed_still_gives_the_claim_back(
    store_on_moto: StoreOnMoto, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    # GIVEN a result PutItem that DynamoDB never applies (its every attempt times out)
    store, clock = store_on_moto.store, store_on_moto.clock
    relay = Relay(store, FakeEdge(EdgeAnswer(200, {"requestId": "r-1", "handle": []}, 1)), clock)  # type: ignore[arg-type]

    def lost(**kwargs: Any) -> Any:
        raise ReadTimeoutError(endpoint_url="https://dynamodb.eu-west-1.amazonaws.com")

    store_on_moto.ddb.put_item = lost
    inbound = build_inbound(
        {"event": {"xdm": {"_id": "ev-1"}}}, event_id="ev-1", datastream_id="ds-1", source="webhook", received_at=0.0
    )

    # WHEN the event is relayed
    result = relay.process(inbound, Deadline(clock, 20), lease_s=25)

    # THEN it is a retry, its claim given back for the sender's resend (Edge dedupes the same xdm._id)
    assert result.outcome is Outcome.RETRY and result.given_back
    assert store.get_result("ev-1")["status"] == "queued"  # type: ignore[index]
    assert emitted() == {"RetriesScheduled": [1.0]}


class SqsAppliedThenLost:
    """SQS that queues the message, but whose answer never comes (boto3's attempts time out), or that fails with a
    5xx after it may have queued it."""

    def __init__(self, failure: Exception) -> None:
        self.sent: list[dict[str, Any]] = []
        self._failure = failure

    def send_message(self, **kwargs: Any) -> dict[str, Any]:
        self.sent.append(kwargs)
        raise self._failure


@pytest.mark.parametrize(
    "failure",
    [
        ReadTimeoutError(endpoint_url="https://sqs.eu-west-1.amazonaws.com"),
        ClientError(
            {"Error": {"Code": "InternalError", "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": 500}},
            "SendMessage",
        ),
    ],
    ids=["timeout", "5xx"],
)
def test_a_fallback_send_that_may_have_been_queued_is_not_said_to_be_unqueued(
    failure: Exception, store_on_moto: StoreOnMoto, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    # GIVEN Edge unavailable, and a retry queue that takes the message but whose answer never comes (or is a 5xx)
    store = store_on_moto.store
    sqs_client = SqsAppliedThenLost(failure)
    app = webhook_on_moto(store_on_moto, FakeEdge(EdgeUnavailable("edge answered 503")), sqs_client)
    body = json.dumps({"event": {"xdm": {"_id": "ev-q"}}}).encode()

    # WHEN a webhook event arrives
    answer = app.handle(http_event(body, {"webhook-id": "msg_q"}), None)

    # THEN the sender is told to retry (nothing says it was queued), but the item keeps the give-back's mark, which
    # `relayctl show` reads as "it may be in the queue, or not": not "nothing is queued", which may be false
    assert answer["statusCode"] == 503 and len(sqs_client.sent) == 1
    item = store.get_result("ev-q")
    assert item is not None and item["status"] == "queued"
    assert item["lastError"] == "queue send pending: edge answered 503"
    assert emitted()["QueueFallbackFailed"] == [1.0]


def test_a_queue_that_may_have_taken_an_event_says_so() -> None:
    # GIVEN a webhook event to queue, and SQS whose answer never comes
    inbound = build_inbound(
        {"event": {"xdm": {"_id": "q-1"}}}, event_id="q-1", datastream_id="ds-1", source="webhook", received_at=0
    )
    client = SqsAppliedThenLost(ReadTimeoutError(endpoint_url="https://sqs.eu-west-1.amazonaws.com"))

    # WHEN / THEN it is neither sent nor refused: it may have been queued
    assert RetryQueue(client, QUEUE_URL).send(inbound) is None


def resent_after_an_unqueued_timeout(store_on_moto: StoreOnMoto, second: Exception) -> tuple[FakeEdge, SqsRefusingOnce]:
    """An event without xdm.timestamp whose first attempt got no answer from Edge and could not be queued (the sender
    was answered 503), resent by its sender 90 s later, when Edge's answer is `second`: queued (202)."""
    edge = FakeEdge(EdgeUnavailable("edge call failed: ReadTimeout"), second)
    sqs_client = SqsRefusingOnce()
    app = webhook_on_moto(store_on_moto, edge, sqs_client)
    body = json.dumps({"event": {"xdm": {"_id": "ev-1"}}}).encode()
    assert app.handle(http_event(body, {"webhook-id": "msg_1"}), None)["statusCode"] == 503
    store_on_moto.clock.advance(90)
    assert app.handle(http_event(body, {"webhook-id": "msg_1"}), None)["statusCode"] == 202
    return edge, sqs_client


def test_a_webhook_resend_that_falls_back_to_the_queue_queues_the_first_attempts_time(
    store_on_moto: StoreOnMoto,
) -> None:
    # GIVEN an event whose first attempt could not be queued, WHEN its sender resends it and Edge is still unavailable
    edge, sqs_client = resent_after_an_unqueued_timeout(store_on_moto, EdgeUnavailable("edge answered 503"))

    # THEN both Edge calls and the queued message carry the first attempt's time: the message, delivered later, is
    # that same event at that same time
    first, second = (call.request["event"]["xdm"]["timestamp"] for call in edge.calls)
    [message] = sqs_client.queued
    assert second == first and json.loads(message["MessageBody"])["event"]["xdm"]["timestamp"] == first


def test_a_give_back_sent_again_by_boto3_still_counts_as_given_back(store_on_moto: StoreOnMoto) -> None:
    # GIVEN Edge unavailable, and DynamoDB applying the webhook's give-back but losing its answer: boto3 sends it
    # again, and that one's condition finds no claim (the first took it away)
    store = store_on_moto.store
    real = store_on_moto.ddb.update_item

    def sent_again(**kwargs: Any) -> Any:
        if kwargs["UpdateExpression"].startswith("SET #s = :queued"):
            real(**kwargs)
        return real(**kwargs)

    store_on_moto.ddb.update_item = sent_again

    class Sqs:
        def send_message(self, **kwargs: Any) -> dict[str, Any]:
            return {"MessageId": "m-1"}

    app = webhook_on_moto(store_on_moto, FakeEdge(EdgeUnavailable("edge answered 503")), Sqs())
    body = json.dumps({"event": {"xdm": {"_id": "ev-q"}}}).encode()

    # WHEN the event arrives and is queued
    assert app.handle(http_event(body, {"webhook-id": "msg_q"}), None)["statusCode"] == 202

    # THEN the item says it is queued (the mark replaced by the plain reason), not that it may or may not be
    assert store.get_result("ev-q")["lastError"] == "edge answered 503"  # type: ignore[index]


def test_a_producers_resend_goes_with_the_time_its_batch_insert_claim_kept(store_on_moto: StoreOnMoto) -> None:
    # GIVEN a batch of two people's first receives (so their claims go as one INSERT batch), one of them without
    # xdm.timestamp, which Edge does not answer; then the producer's resend of it: a new message, sent 90 s later
    store, clock = store_on_moto.store, store_on_moto.clock
    ok = EdgeAnswer(200, {"requestId": "r", "handle": []}, 1)
    edge = FakeEdge(EdgeUnavailable("edge call failed: ReadTimeout"), ok, ok)
    relay = Relay(store, edge, clock)  # type: ignore[arg-type]
    runner = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1))
    runner.run({"Records": [record("ev-1", 1, "p1"), record("other", 1, "p9")]}, Deadline(clock, 20), lease_s=25)
    resend = {**record("ev-1", 1, "p1"), "messageId": "m-resent"}
    resend["attributes"] = {**resend["attributes"], "SentTimestamp": "1700000090000"}

    # WHEN the resend is run
    clock.advance(90)
    runner.run({"Records": [resend]}, Deadline(clock, 20), lease_s=25)

    # THEN both Edge calls of that event carry the first message's time
    sent = [c.request["event"]["xdm"]["timestamp"] for c in edge.calls if c.request["event"]["xdm"]["_id"] == "ev-1"]
    assert len(sent) == 2 and sent[0] == sent[1] == "2023-11-14T22:13:20.000Z"


def test_a_batch_that_sent_nothing_back_says_so_at_info(caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN a batch whose every record is delivered
    store = FakeStore()
    relay, _ = real_relay(store, 2)

    # WHEN it runs
    with caplog.at_level(logging.INFO, logger="interact-relay"):
        BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1)).run(
            {"Records": [sqs("e1", "m1", "p1"), sqs("e2", "m2", "p2")]}, Deadline(relay.clock, 20), lease_s=25
        )

    # THEN its summary is INFO: a WARNING for every clean batch would be noise at LogLevel WARNING
    (summary,) = [r for r in caplog.records if r.getMessage() == "batch done"]
    assert summary.levelno == logging.INFO


@pytest.mark.parametrize("trigger", ["webhook", "sqs"])
def test_an_event_whose_id_holds_a_lone_surrogate_is_refused_and_kept_under_its_transport_id(
    trigger: str, store_on_moto: StoreOnMoto
) -> None:
    # GIVEN a body whose xdm._id holds a lone UTF-16 surrogate (`"\ud800"` in its JSON: a character cut in half),
    # which no DynamoDB key or SQS attribute can hold
    store, clock = store_on_moto.store, store_on_moto.clock
    body = '{"event": {"xdm": {"_id": "ev-\\ud800"}}}'

    # WHEN it arrives
    if trigger == "webhook":
        app = webhook_on_moto(store_on_moto, FakeEdge())
        answer = app.handle(http_event(body.encode(), {"webhook-id": "msg_cut"}), None)
        kept_under = "msg_cut"
        # THEN the sender is told why (400, the field's path), not asked to retry what can never be stored
        assert answer["statusCode"] == 400
        problem = json.loads(answer["body"])
        assert problem["eventId"] == kept_under and problem["errors"][0]["path"] == "event.xdm._id"
    else:
        record_ = {**record("x", 1), "messageId": "m-cut", "body": body}
        relay = Relay(store, FakeEdge(), clock)  # type: ignore[arg-type]
        answer = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1)).run(
            {"Records": [record_]}, Deadline(clock, 20), lease_s=25
        )
        kept_under = "m-cut"
        # THEN the record is done (not redelivered until the dead-letter queue)
        assert answer == {"batchItemFailures": []}

    # AND the refusal is stored, under the transport's id
    item = store.get_result(kept_under)
    assert item is not None and item["status"] == "rejected"


def test_a_webhook_resend_handed_back_after_a_defect_is_queued_with_the_first_attempts_time(
    store_on_moto: StoreOnMoto,
) -> None:
    # GIVEN an event whose first attempt could not be queued, WHEN its sender resends it and the resend meets a defect
    # (an unexpected exception) after taking the first attempt's time
    edge, sqs_client = resent_after_an_unqueued_timeout(store_on_moto, RuntimeError("a defect"))

    # THEN the queued message carries the first attempt's time, as every attempt of the event does
    first = edge.calls[0].request["event"]["xdm"]["timestamp"]
    [message] = sqs_client.queued
    assert json.loads(message["MessageBody"])["event"]["xdm"]["timestamp"] == first
    # AND the item says only why it waits: the defect's give-back mark, tied to its claim, was cleared once sent
    item = decode_item(
        store_on_moto.ddb.get_item(TableName="t", Key={"pk": {"S": "EVENT#ev-1"}, "sk": {"S": "RESULT"}})["Item"]
    )
    assert (item["status"], item["lastError"]) == ("queued", "unexpected error: RuntimeError")
    assert "queueSendBy" not in item


@pytest.mark.parametrize("resend_meets", ["claim_fails", "identity_key_unreadable"])
def test_a_resend_queued_without_a_claim_is_delivered_with_the_first_attempts_time(
    store_on_moto: StoreOnMoto, resend_meets: str
) -> None:
    # GIVEN an event without xdm.timestamp whose first webhook attempt got no answer from Edge (it may have reached
    # Edge) and could not be queued (503): its item keeps xdmTimestamp T0
    edge = FakeEdge(
        EdgeUnavailable("edge call failed: ReadTimeout"), EdgeAnswer(200, {"requestId": "r", "handle": []}, 1)
    )
    sqs_client = SqsRefusingOnce()
    app = webhook_on_moto(store_on_moto, edge, sqs_client)
    doc = {"event": {"xdm": {"_id": "ev-1", "identityMap": {"CRMID": [{"id": "ann", "primary": True}]}}}}
    body = json.dumps(doc).encode()
    assert app.handle(http_event(body, {"webhook-id": "msg_1"}), None)["statusCode"] == 503
    first = edge.calls[0].request["event"]["xdm"]["timestamp"]

    # WHEN the sender resends it 90 s later, and the resend is queued without a claim (DynamoDB throttles the claim,
    # or the identity key cannot be read for a moment)
    store_on_moto.clock.advance(90)
    if resend_meets == "claim_fails":
        real = store_on_moto.store.claim

        def claim(*a: Any, **k: Any) -> Any:
            raise StoreUnavailable("dynamodb update_item failed: ProvisionedThroughputExceededException")

        store_on_moto.store.claim = claim  # type: ignore[method-assign]
    else:
        app._identity_key = key_unavailable
    assert app.handle(http_event(body, {"webhook-id": "msg_1"}), None)["statusCode"] == 202
    if resend_meets == "claim_fails":
        store_on_moto.store.claim = real  # type: ignore[method-assign]
    [sent] = sqs_client.queued

    # AND a batch later reads the message back (as Lambda hands it over) and delivers it
    message = {
        "MessageId": "m-q",
        "ReceiptHandle": "rh-q",
        "Body": sent["MessageBody"],
        "MD5OfBody": "x",
        "Attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": str(int(store_on_moto.clock.now() * 1000))},
        "MessageAttributes": sent["MessageAttributes"],
    }
    store_on_moto.clock.advance(10)
    relay = Relay(store_on_moto.store, edge, store_on_moto.clock)  # type: ignore[arg-type]
    answer = BatchRunner(SETTINGS, relay, ThreadPoolExecutor(1)).run(
        {"Records": [record_from_message(message, QUEUE_ARN, "eu-west-1")]}, Deadline(store_on_moto.clock, 20), 25
    )
    assert answer == {"batchItemFailures": []}

    # THEN Edge got the event, under the same _id, with the time its first attempt was sent with (a review found the
    # resend's time: the queued body's timestamp read back as the sender's own)
    assert [c.request["event"]["xdm"]["_id"] for c in edge.calls] == ["ev-1", "ev-1"]
    assert edge.calls[1].request["event"]["xdm"]["timestamp"] == first
