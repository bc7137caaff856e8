"""Delivery guarantees under injected faults (issue 4, item 2): one Edge call per eventId, Adobe's retry rules inside
the Lambda's time, the webhook's queue fallback. Real HTTP to moto server and the Edge simulator; the only injected
piece of the relay is its clock (`Runtime(..., clock=FakeClock)`), and, for the DynamoDB failure, a loopback proxy in
front of moto that the runtime's own boto3 client talks to."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
import requests
from relay.integrations.aws_clients import build_clients, client_config
from relay.runtime import Runtime
from relay.settings import load_settings

from devtools.edge_sim import ERROR_TYPE_BASE, new_ecid
from devtools.gateway import LocalGateway
from devtools.lambda_context import new_context
from devtools.stack import DATASTREAM_ID, LocalStack
from relayctl.__main__ import replay_event
from tests.fakes import FakeClock

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
# Between the relay sending a call and the simulator logging its arrival, on a loaded 2-core machine.
ARRIVAL_SLACK_S = 0.25


# ---------------------------------------------------------------------------------------------------------- helpers


class SkipClock:
    """Real time, except that `sleep()` returns at once: it records the wait and moves this clock forward by it."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self._skipped = 0.0

    def now(self) -> float:
        return time.time() + self._skipped

    def monotonic(self) -> float:
        return time.monotonic() + self._skipped

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._skipped += max(seconds, 0.0)


def new_runtime(clock: Any = None, clients: dict[str, Any] | None = None, **overrides: str) -> Runtime:
    return Runtime(load_settings({**os.environ, **overrides}), clock=clock, clients=clients)


def interact_event(event_id: str | None = None, *, ecid: str | None = None) -> dict[str, Any]:
    xdm: dict[str, Any] = {
        "eventType": "commerce.purchases",
        "identityMap": {"ECID": [{"id": ecid or new_ecid(), "primary": True}]},
        "timestamp": "2026-01-01T00:00:00.000Z",
    }
    if event_id is not None:
        xdm["_id"] = event_id
    return {"event": {"xdm": xdm}}


def record(stack: LocalStack, doc: dict[str, Any], message_id: str | None = None) -> dict[str, Any]:
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": "rh",
        "body": json.dumps(doc),
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": str(int(time.time() * 1000))},
        "messageAttributes": {},
        "md5OfBody": "0" * 32,
        "eventSource": "aws:sqs",
        "eventSourceARN": stack.resources.queue_arn,
        "awsRegion": stack.region,
    }


def batch(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


def failures(*message_ids: str) -> dict[str, Any]:
    return {"batchItemFailures": [{"itemIdentifier": m} for m in message_ids]}


def edge_requests(stack: LocalStack, event_id: str) -> list[dict[str, Any]]:
    return [r for r in stack.sim.requests_log() if r["path"].endswith("/interact") and r["xdm_id"] == event_id]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def post(gw: LocalGateway, stack: LocalStack, doc: dict[str, Any], msg_id: str | None = None) -> requests.Response:
    body = json.dumps(doc)
    headers = {"content-type": "application/json", **stack.sign(body, msg_id=msg_id)}
    return requests.post(f"{gw.url}/events", data=body, headers=headers, timeout=30)


def queued_while_edge_is_down(stack: LocalStack, gw: LocalGateway, doc: dict[str, Any]) -> str:
    """Post `doc` (naming no datastream) while Edge answers its calls 503: queued (202). Its webhook-id, Edge back."""
    msg_id = f"msg_{uuid.uuid4().hex}"
    rule = stack.sim.add_fault(match_id=msg_id, status=503, retry_after=0)
    assert post(gw, stack, doc, msg_id).status_code == 202
    stack.sim.remove_fault(rule)
    return msg_id


def resent_after_a_redeploy(stack: LocalStack, doc: dict[str, Any], msg_id: str, **settings: str) -> requests.Response:
    """`doc` posted again (naming no datastream) to a runtime whose default datastream is now "ds-new" (which Edge
    knows), with `settings` besides."""
    stack.sim.datastreams.add("ds-new")
    try:
        redeployed = new_runtime(None, None, DATASTREAM_ID="ds-new", **settings)
        return post(stack.gateway(redeployed.handle), stack, doc, msg_id)
    finally:
        stack.sim.datastreams.discard("ds-new")


def queue_messages(stack: LocalStack) -> list[dict[str, Any]]:
    """Peek at the queue (the messages stay visible)."""
    return stack.sqs.receive_message(
        QueueUrl=stack.resources.queue_url,
        MaxNumberOfMessages=10,
        VisibilityTimeout=0,
        MessageAttributeNames=["All"],
        AttributeNames=["All"],
    ).get("Messages", [])


def warm_up(stack: LocalStack, runtime: Runtime) -> None:
    """One delivered event, so the runtime holds its secrets and IMS token (what a warm execution environment has)."""
    assert runtime.handle(batch(record(stack, interact_event(f"warm-{uuid.uuid4()}"))), new_context(30)) == failures()


# ---------------------------------------------------------------------------------------------------------- duplicates


def test_duplicate_event_id_in_one_batch_calls_edge_once(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN one batch carrying the same event twice (two messages, one xdm._id)
    event_id = f"evt-{uuid.uuid4()}"
    doc = interact_event(event_id)
    first, second = record(stack, doc), record(stack, doc)

    # WHEN the function handles it
    answer = new_runtime().handle(batch(first, second), new_context(30))

    # THEN both records are acknowledged, Edge was called once and the result is stored once
    assert answer == failures()
    assert [r["status"] for r in edge_requests(stack, event_id)] == [200]
    item = stack.result(event_id)
    assert (item["status"], item["attempts"], item["requestId"]) == (
        "delivered",
        1,
        edge_requests(stack, event_id)[0]["request_id"],
    )


def test_duplicate_event_id_across_batches_calls_edge_once(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN an event delivered by one execution environment
    event_id = f"evt-{uuid.uuid4()}"
    doc = interact_event(event_id)
    assert new_runtime().handle(batch(record(stack, doc)), new_context(30)) == failures()
    stored = stack.result(event_id)

    # WHEN SQS delivers it again, in another batch, to another execution environment
    answer = new_runtime().handle(batch(record(stack, doc)), new_context(30))

    # THEN it is acknowledged without a second Edge call, and the stored result is untouched
    assert answer == failures()
    assert len(edge_requests(stack, event_id)) == 1
    assert stack.result_item(event_id) == stored


def test_concurrent_sqs_duplicate_is_busy_and_edge_is_called_once(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN two warm execution environments, and Edge holding the first call for 3 s
    event_id = f"evt-{uuid.uuid4()}"
    doc = interact_event(event_id)
    stack.sim.add_fault(match_id=event_id, delay=3, times=1)
    one, two = new_runtime(), new_runtime()
    warm_up(stack, one)
    warm_up(stack, two)
    first, second = record(stack, doc), record(stack, doc)
    answers: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: answers.update(one=one.handle(batch(first), new_context(30))))

    # WHEN the first is inside its Edge call and the duplicate reaches the second
    worker.start()
    wait_for(lambda: len(edge_requests(stack, event_id)) == 1)
    busy = two.handle(batch(second), new_context(30))
    worker.join(timeout=10)

    # THEN the duplicate is handed back for redelivery (not failed, not sent), the first delivers
    assert busy == failures(second["messageId"])
    assert answers["one"] == failures()
    # AND when it comes back it is acknowledged as a duplicate; Edge saw one call in all
    assert two.handle(batch(second), new_context(30)) == failures()
    assert len(edge_requests(stack, event_id)) == 1
    assert stack.result(event_id)["status"] == "delivered"


def test_concurrent_webhook_duplicate_gets_409_then_the_delivered_answer(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN two warm execution environments behind two gateways, and Edge holding the first call for 1.5 s
    # (under the first attempt's read timeout: half of the 4.25 s webhook budget)
    gw_one = stack.gateway(new_runtime().handle)
    gw_two = stack.gateway(new_runtime().handle)
    for gw in (gw_one, gw_two):
        assert post(gw, stack, interact_event()).status_code == 200
    doc = interact_event()
    msg_id = f"msg_{uuid.uuid4().hex}"
    stack.sim.add_fault(match_id=msg_id, delay=1.5, times=1)
    answers: dict[str, requests.Response] = {}
    worker = threading.Thread(target=lambda: answers.update(one=post(gw_one, stack, doc, msg_id)))

    # WHEN the sender's retry arrives at the second while the first is inside its Edge call
    worker.start()
    wait_for(lambda: len(edge_requests(stack, msg_id)) == 1)
    conflict = post(gw_two, stack, doc, msg_id)
    worker.join(timeout=10)

    # THEN the retry gets 409 with Retry-After, the first gets 200
    assert (conflict.status_code, conflict.headers["content-type"], conflict.headers["retry-after"]) == (
        409,
        PROBLEM,
        "2",
    )
    assert conflict.json() == {
        "type": "about:blank",
        "title": "Conflict",
        "status": 409,
        "detail": "this event is being processed; retry shortly to read its result",
        "eventId": msg_id,
        "retryAfter": 2,
    }
    assert answers["one"].status_code == 200
    # AND retrying after Retry-After reads the same delivered answer; Edge saw one call in all
    again = post(gw_two, stack, doc, msg_id)
    assert (again.status_code, again.json()) == (200, answers["one"].json())
    assert len(edge_requests(stack, msg_id)) == 1


# ---------------------------------------------------------------------------------------------------------- retries


@pytest.mark.parametrize(("edge_status", "code"), [(500, "EXEG-0001-500"), (400, "EXEG-0102-400")])
def test_edge_500_and_400_are_not_retried(clean_stack: LocalStack, edge_status: int, code: str) -> None:
    stack = clean_stack
    # GIVEN Edge answers this event with a status Adobe says must not be retried
    event_id = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=event_id, status=edge_status)
    clock = FakeClock(wall=time.time(), mono=time.monotonic())

    # WHEN the function gets it from SQS
    answer = new_runtime(clock).handle(batch(record(stack, interact_event(event_id))), new_context(30))

    # THEN it is acknowledged and stored rejected after exactly one Edge call, without any wait
    assert answer == failures()
    assert [r["status"] for r in edge_requests(stack, event_id)] == [edge_status]
    assert clock.sleeps == []
    item = stack.result(event_id)
    assert (item["status"], item["error"]["type"], item["error"]["status"]) == (
        "rejected",
        ERROR_TYPE_BASE + code,
        edge_status,
    )


def test_429_with_retry_after_2_waits_2_seconds_on_the_injected_clock(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN Edge throttles this event once with `Retry-After: 2`
    event_id = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=event_id, status=429, retry_after=2, times=1)
    clock = FakeClock(wall=time.time(), mono=time.monotonic())

    # WHEN the function gets it
    answer = new_runtime(clock).handle(batch(record(stack, interact_event(event_id))), new_context(30))

    # THEN it waited what Edge asked, on the injected clock (whose sleep does not sleep: no wall-time assertion,
    # which a loaded machine would break), then delivered
    assert answer == failures()
    assert clock.sleeps == [2.0]
    calls = edge_requests(stack, event_id)
    assert [r["status"] for r in calls] == [429, 200]
    assert calls[0]["body"] == calls[1]["body"]
    assert stack.result(event_id)["status"] == "delivered"


def test_429_with_retry_after_as_http_date_waits_until_that_date(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN Edge throttles this event once with a `Retry-After` HTTP-date 3 s from now (1 s resolution)
    event_id = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=event_id, status=429, retry_after=3, retry_after_http_date=True, times=1)
    clock = SkipClock()  # follows real time, so the date compares with the real now; sleeps are skipped
    runtime = new_runtime(clock)
    warm_up(stack, runtime)  # secrets and token held: the time below is the two calls', not a cold start's

    # WHEN the function gets it
    started = time.monotonic()
    answer = runtime.handle(batch(record(stack, interact_event(event_id))), new_context(30))

    # THEN it waited until the date (2-3 s after the answer), on the injected clock, then delivered
    assert answer == failures()
    assert len(clock.sleeps) == 1 and 2.0 - 0.5 <= clock.sleeps[0] <= 3.0
    assert time.monotonic() - started < 2.0
    assert [r["status"] for r in edge_requests(stack, event_id)] == [429, 200]


def test_retry_budget_fits_the_lambdas_remaining_time_with_retry_after(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN Edge answers 503 with `Retry-After: 1` forever, 4 s left in the invocation, a 1.5 s safety margin (2.5 s
    # for Edge; the margin, 0.5 s before, was a loaded machine's whole slack for storing the outcome and returning)
    event_id = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=event_id, status=503, retry_after=1)
    msg = record(stack, interact_event(event_id))

    runtime = new_runtime(SAFETY_MARGIN_MS="1500")
    warm_up(stack, runtime)

    # WHEN the function gets the event
    started = time.time()
    answer = runtime.handle(batch(msg), new_context(4))
    elapsed = time.time() - started

    # THEN it tried about every second (t=0, 1, 2 s), stopped when the next wait would not fit in 4 - 1.5 s,
    # and returned before the Lambda's deadline
    calls = edge_requests(stack, event_id)
    assert [c["status"] for c in calls] in ([503, 503], [503, 503, 503])
    # (the simulator logs a call when it reads it: the relay starts its last by 2.45 s, and a loaded machine may take
    # a moment to carry it over; a call past the budget would come at about 3 s)
    assert all(c["time"] - started < 2.5 + ARRIVAL_SLACK_S for c in calls)
    assert all(b["time"] - a["time"] >= 1.0 for a, b in zip(calls, calls[1:], strict=False))
    assert elapsed < 4.0
    assert answer == failures(msg["messageId"])
    item = stack.result(event_id)
    assert (item["status"], item["lastError"]) == ("queued", "edge answered 503 " + ERROR_TYPE_BASE + "EXEG-0000-503")


def test_a_queued_result_holds_the_latest_attempts_retry_after_only(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN an event that Edge answers 503 with `Retry-After: 7` once, one attempt per invocation
    event_id = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=event_id, status=503, retry_after=7, times=1)
    msg = record(stack, interact_event(event_id))
    runtime = new_runtime(EDGE_MAX_ATTEMPTS="1")

    # WHEN the function gets it
    assert runtime.handle(batch(msg), new_context(30)) == failures(msg["messageId"])

    # THEN its result says it is queued, why, and how long Edge asked it to wait
    item = stack.result(event_id)
    assert (item["status"], item["retryAfterSeconds"]) == ("queued", 7)
    assert item["lastError"] == "edge answered 503 " + ERROR_TYPE_BASE + "EXEG-0000-503"

    # AND WHEN it comes back and Edge drops the connection (no Retry-After this time)
    stack.sim.add_fault(match_id=event_id, drop=True, times=1)
    assert runtime.handle(batch(msg), new_context(30)) == failures(msg["messageId"])

    # THEN the result holds the new reason and no stale wait
    item = stack.result(event_id)
    assert (item["status"], item["lastError"]) == ("queued", "edge call failed: ConnectionError")
    assert "retryAfterSeconds" not in item


def test_retry_budget_caps_a_slow_answer_by_the_lambdas_remaining_time(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN Edge takes 5 s to answer, while the invocation has 4 s left (1.5 s safety margin: 2.5 s for Edge)
    event_id = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=event_id, delay=5)
    msg = record(stack, interact_event(event_id))

    runtime = new_runtime(SAFETY_MARGIN_MS="1500")
    warm_up(stack, runtime)

    # WHEN the function gets the event
    started = time.time()
    answer = runtime.handle(batch(msg), new_context(4))
    elapsed = time.time() - started

    # THEN each attempt's timeouts were cut to what was left: the handler returns before the Lambda's deadline
    assert elapsed < 4.0
    assert answer == failures(msg["messageId"])
    calls = edge_requests(stack, event_id)
    assert calls and all(c["time"] - started < 2.5 + ARRIVAL_SLACK_S for c in calls)  # logged on arrival, as above
    item = stack.result(event_id)
    assert (item["status"], item["lastError"]) == ("queued", "edge call failed: ReadTimeout")


def test_retry_budget_includes_the_ims_token_request(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN a cold execution environment (no token yet), IMS taking 6 s to answer, 4 s left in the invocation
    stack.sim.add_fault(match_path="/ims/token/v3", delay=6)
    event_id = f"evt-{uuid.uuid4()}"
    msg = record(stack, interact_event(event_id))
    runtime = new_runtime(SAFETY_MARGIN_MS="1500")

    # WHEN the function gets an event
    started = time.time()
    answer = runtime.handle(batch(msg), new_context(4))
    elapsed = time.time() - started

    # THEN it gives up on the token in time and hands the record back, before the Lambda's deadline
    assert elapsed < 4.0, f"the invocation ran {elapsed:.1f} s with 4 s left: Lambda would have killed it"
    assert answer == failures(msg["messageId"])


# ---------------------------------------------------------------------------------------------------------- webhook


def test_webhook_falls_back_to_the_queue_with_202_and_the_poller_delivers_it_later(clean_stack: LocalStack):
    stack = clean_stack
    # GIVEN Edge answers 503 to every attempt for this event
    runtime = new_runtime()
    gw = stack.gateway(runtime.handle)
    doc = interact_event()  # no xdm._id: the eventId is the webhook-id
    msg_id = f"msg_{uuid.uuid4().hex}"
    rule = stack.sim.add_fault(match_id=msg_id, status=503, retry_after=0)

    # WHEN it is posted
    resp = post(gw, stack, doc, msg_id)

    # THEN 202 queued, after the 5 attempts of the retry budget
    assert (resp.status_code, resp.headers["content-type"], resp.json()) == (
        202,
        "application/json",
        {"eventId": msg_id, "status": "queued"},
    )
    assert [r["status"] for r in edge_requests(stack, msg_id)] == [503] * 5
    # AND the queue holds the event as sent to Edge (stable xdm._id) with its eventId, source and datastream
    [message] = queue_messages(stack)
    sent = {"event": {"xdm": {**doc["event"]["xdm"], "_id": msg_id}}}
    assert json.loads(message["Body"]) == sent
    assert {k: v["StringValue"] for k, v in message["MessageAttributes"].items()} == {
        "eventId": msg_id,
        "relaySource": "webhook",
        "datastreamId": DATASTREAM_ID,
    }
    item = stack.result(msg_id)
    assert (item["status"], item["source"], item["lastError"]) == (
        "queued",
        "webhook",
        "edge answered 503 " + ERROR_TYPE_BASE + "EXEG-0000-503",
    )

    # WHEN Edge recovers and the poller runs
    stack.sim.remove_fault(rule)
    poller = stack.poller(runtime.handle, batching_window=0)
    poller.drain(timeout=20, raise_on_timeout=True)

    # THEN it is delivered under the same eventId, with the same body every time
    item = stack.result(msg_id)
    assert (item["status"], item["eventId"], item["source"]) == ("delivered", msg_id, "webhook")
    calls = edge_requests(stack, msg_id)
    assert [c["status"] for c in calls] == [503] * 5 + [200]
    assert all(c["body"] == sent for c in calls)
    assert item["requestId"] == calls[-1]["request_id"]
    # AND a sender's late retry now reads the delivered answer
    again = post(gw, stack, doc, msg_id)
    assert (again.status_code, again.json()["requestId"]) == (200, item["requestId"])


def test_during_an_outage_an_environment_tries_each_event_once_until_edge_answers_one(clean_stack: LocalStack):
    stack = clean_stack
    # GIVEN a warm execution environment (backoff waits skipped, and recorded), then Edge answering 503 to every call
    clock = SkipClock()
    runtime = new_runtime(clock=clock)
    warm_up(stack, runtime)
    rule = stack.sim.add_fault(status=503, retry_after=0)

    # WHEN an event arrives: all its 5 attempts fail, and Edge answers nothing else meanwhile
    first = f"evt-{uuid.uuid4()}"
    assert runtime.handle(batch(record(stack, interact_event(first), first)), new_context(30)) == failures(first)
    assert len(edge_requests(stack, first)) == 5

    # THEN the next batch's events and a webhook event are each tried once, without a wait: handed back, and queued
    waits = len(clock.sleeps)
    second = [f"evt-{uuid.uuid4()}" for _ in range(20)]
    answer = runtime.handle(batch(*(record(stack, interact_event(e), e) for e in second)), new_context(30))
    assert answer == failures(*second)
    hook = f"evt-{uuid.uuid4()}"
    resp = post(stack.gateway(runtime.handle), stack, interact_event(hook))
    assert (resp.status_code, resp.json()) == (202, {"eventId": hook, "status": "queued"})
    assert [len(edge_requests(stack, e)) for e in [*second, hook]] == [1] * 21
    assert len(clock.sleeps) == waits
    assert stack.result(second[0])["lastError"] == "edge answered 503 " + ERROR_TYPE_BASE + "EXEG-0000-503"

    # WHEN Edge answers again: a batch is delivered, each event in one call; then one event meets a single 503
    stack.sim.remove_fault(rule)
    third = [f"evt-{uuid.uuid4()}" for _ in range(5)]
    assert runtime.handle(batch(*(record(stack, interact_event(e), e) for e in third)), new_context(30)) == failures()
    blip = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=blip, status=503, retry_after=0, times=1)
    assert runtime.handle(batch(record(stack, interact_event(blip), blip)), new_context(30)) == failures()

    # THEN the outage is over for this environment: that event was retried as usual, and delivered
    assert [len(edge_requests(stack, e)) for e in third] == [1] * 5
    assert [c["status"] for c in edge_requests(stack, blip)] == [503, 200]
    assert stack.result(blip)["status"] == "delivered"


def test_a_character_cut_in_half_and_an_id_with_a_tab_go_through_the_queue_fallback_unchanged(
    clean_stack: LocalStack,
) -> None:
    stack = clean_stack
    # GIVEN an event whose xdm._id holds a tab (SQS takes one in an attribute) and whose data holds a lone surrogate
    # (an emoji cut in half, which JavaScript's JSON.stringify writes as "\ud83d"), and Edge answering 503 to it
    runtime = new_runtime()
    gw = stack.gateway(runtime.handle)
    event_id = f"ord\t{uuid.uuid4().hex}"
    doc = interact_event(event_id)
    doc["event"]["data"] = {"productName": "Sunglasses \ud83d"}
    rule = stack.sim.add_fault(match_id=event_id, status=503, retry_after=0)

    # WHEN it is posted, and queued
    resp = post(gw, stack, doc)
    assert (resp.status_code, resp.json()) == (202, {"eventId": event_id, "status": "queued"})
    [message] = queue_messages(stack)
    assert message["MessageAttributes"]["eventId"]["StringValue"] == event_id
    assert "\\ud83d" in message["Body"]  # the escape, as received

    # AND Edge recovers and the poller runs
    stack.sim.remove_fault(rule)
    stack.poller(runtime.handle, batching_window=0).drain(timeout=20, raise_on_timeout=True)

    # THEN it is delivered, and every call carried the body as sent, the surrogate included
    assert stack.result(event_id)["status"] == "delivered"
    calls = edge_requests(stack, event_id)
    assert [c["status"] for c in calls] == [503] * 5 + [200]
    assert all(c["body"] == doc for c in calls)


def test_a_queued_webhook_event_replayed_to_another_datastream_is_refused_and_still_delivered(
    clean_stack: LocalStack,
) -> None:
    stack = clean_stack
    # GIVEN a signed webhook event that Edge could not take (queued, 202), and a second datastream Edge knows
    runtime = new_runtime()
    gw = stack.gateway(runtime.handle)
    doc = interact_event()
    msg_id = queued_while_edge_is_down(stack, gw, doc)
    stack.sim.datastreams.add("ds-other")
    try:
        # WHEN someone who captured the signed request sends it again, unchanged but for `?datastreamId=` (the query
        # string is not covered by the signature)
        body = json.dumps(doc)
        headers = {**stack.sign(body, msg_id=msg_id), "content-type": "application/json"}
        replay = requests.post(f"{gw.url}/events?datastreamId=ds-other", data=body, headers=headers, timeout=30)

        # THEN it is refused as busy (409): the waiting event is not taken over, nothing goes to the other datastream
        assert replay.status_code == 409
        assert all(c["query"]["datastreamId"] == DATASTREAM_ID for c in edge_requests(stack, msg_id))
        assert stack.result(msg_id)["datastreamId"] == DATASTREAM_ID

        # AND the queued event is delivered to its own datastream when its message comes
        stack.poller(runtime.handle, batching_window=0).drain(timeout=20, raise_on_timeout=True)
    finally:
        stack.sim.datastreams.discard("ds-other")
    item = stack.result(msg_id)
    assert (item["status"], item["datastreamId"]) == ("delivered", DATASTREAM_ID)
    assert [c["status"] for c in edge_requests(stack, msg_id)] == [503] * 5 + [200]


def test_a_request_replayed_first_to_an_unlisted_datastream_is_refused_and_the_genuine_one_delivered(
    clean_stack: LocalStack,
) -> None:
    stack = clean_stack
    # GIVEN a deployment that lists the datastreams its events may name (ALLOWED_DATASTREAM_IDS), and a signed request
    # for one of them that someone captured before it reached the relay (the sender's first try was lost)
    stack.sim.datastreams.update({"ds-listed", "ds-unlisted"})
    runtime = new_runtime(ALLOWED_DATASTREAM_IDS="ds-listed")
    gw = stack.gateway(runtime.handle)
    doc = interact_event(f"order-{uuid.uuid4().hex[:8]}")
    event_id = doc["event"]["xdm"]["_id"]
    msg_id = f"msg_{uuid.uuid4().hex}"
    body = json.dumps(doc)
    headers = {**stack.sign(body, msg_id=msg_id), "content-type": "application/json"}
    try:
        # WHEN it is replayed first, to another datastream Edge knows (the query string is not signed)
        replay = requests.post(f"{gw.url}/events?datastreamId=ds-unlisted", data=body, headers=headers, timeout=30)

        # THEN it is refused, saying why (the datastream, not the body), and nothing is sent to Edge
        assert replay.status_code == 400
        assert replay.json()["detail"] == "the event's datastream is malformed or not one this relay sends to"
        assert replay.json()["errors"] == [
            {
                "path": "datastreamId",
                "message": '"ds-unlisted" is not one of the datastreams this relay sends to (ALLOWED_DATASTREAM_IDS)',
            }
        ]
        # AND so is one without the query string: the default datastream is not listed
        bare = requests.post(f"{gw.url}/events", data=body, headers=headers, timeout=30)
        assert (bare.status_code, bare.json()["errors"][0]["path"]) == (400, "datastreamId")
        assert edge_requests(stack, event_id) == []

        # AND the genuine request, coming after it, is delivered to its datastream (the relay's own refusal does not
        # hold the eventId)
        genuine = requests.post(f"{gw.url}/events?datastreamId=ds-listed", data=body, headers=headers, timeout=30)
        assert genuine.status_code == 200, genuine.text
    finally:
        stack.sim.datastreams.difference_update({"ds-listed", "ds-unlisted"})
    assert [c["query"]["datastreamId"] for c in edge_requests(stack, event_id)] == ["ds-listed"]
    item = stack.result(event_id)
    assert (item["status"], item["datastreamId"]) == ("delivered", "ds-listed")


def untimed_event() -> dict[str, Any]:
    """An event whose sender gives no `xdm.timestamp`: the relay sets the receive time (an earlier attempt's wins)."""
    doc = interact_event()
    del doc["event"]["xdm"]["timestamp"]
    return doc


def test_a_webhook_resent_after_the_default_datastream_changed_is_delivered_where_it_was_first_taken(
    clean_stack: LocalStack,
) -> None:
    stack = clean_stack
    # GIVEN a webhook naming no datastream, taken for the default one and queued (Edge down, 202), whose sender resends
    # it (it never saw the 202) after a deploy changed the default datastream
    gw = stack.gateway(new_runtime().handle)
    doc = untimed_event()
    msg_id = queued_while_edge_is_down(stack, gw, doc)
    first_time = edge_requests(stack, msg_id)[0]["body"]["event"]["xdm"]["timestamp"]
    stack.sim.datastreams.add("ds-new")
    try:
        redeployed = new_runtime(DATASTREAM_ID="ds-new")
        gw = stack.gateway(redeployed.handle)

        # WHEN the resend comes
        time.sleep(0.01)  # a later receive time than the first attempt's
        resend = post(gw, stack, doc, msg_id)

        # THEN it is delivered (not answered 409 at every resend), to the datastream it was first taken for, with the
        # first attempt's time under the same `_id`
        assert resend.status_code == 200, resend.text
        delivered = edge_requests(stack, msg_id)[-1]
        assert (delivered["status"], delivered["query"]["datastreamId"]) == (200, DATASTREAM_ID)
        assert delivered["body"]["event"]["xdm"]["timestamp"] == first_time
        item = stack.result(msg_id)
        assert (item["status"], item["datastreamId"]) == ("delivered", DATASTREAM_ID)

        # AND its queued message, when it comes, is a repeat: Edge got the event once
        stack.poller(redeployed.handle, batching_window=0).drain(timeout=20, raise_on_timeout=True)
    finally:
        stack.sim.datastreams.discard("ds-new")
    assert [c["status"] for c in edge_requests(stack, msg_id)] == [503] * 5 + [200]


def test_a_webhook_resent_after_the_default_datastream_changed_gets_its_first_answer(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN a webhook naming no datastream, delivered to the default one, whose sender resends it (its answer was lost)
    # after a deploy changed the default datastream
    gw = stack.gateway(new_runtime().handle)
    doc = interact_event()
    msg_id = f"msg_{uuid.uuid4().hex}"
    first = post(gw, stack, doc, msg_id)
    assert first.status_code == 200, first.text

    # WHEN the resend comes
    resend = resent_after_a_redeploy(stack, doc, msg_id)

    # THEN it is a repeat: the first answer, nothing sent again, nothing filed as an eventId reused for another event
    assert (resend.status_code, resend.json()) == (200, first.json())
    assert len(edge_requests(stack, msg_id)) == 1
    assert stack.result(msg_id)["datastreamId"] == DATASTREAM_ID
    assert stack.filed_under(msg_id) == [msg_id]


def test_another_identitys_event_reusing_a_finished_events_id_after_a_redeploy_is_filed_where_it_was_meant_to_go(
    clean_stack: LocalStack,
) -> None:
    stack = clean_stack
    # GIVEN an event naming no datastream, delivered to the default one, and a deploy changing the default to ds-new
    gw = stack.gateway(new_runtime().handle)
    event_id = f"evt-{uuid.uuid4().hex}"
    assert post(gw, stack, interact_event(event_id)).status_code == 200

    # WHEN another identity's event reuses its eventId, naming no datastream either (meant for ds-new)
    other = interact_event(event_id)
    answer = resent_after_a_redeploy(stack, other, f"msg_{uuid.uuid4().hex}")

    # THEN it is refused as an eventId reuse, and filed under the datastream it resolved to, not the first event's (a
    # review found the first's: `relayctl rejected --from-datastream` would look for it in the wrong place)
    assert answer.status_code == 422, answer.text
    filed = stack.result(answer.json()["eventId"])
    assert (filed["status"], filed["datastreamId"]) == ("rejected", "ds-new")
    assert stack.result(event_id)["datastreamId"] == DATASTREAM_ID


def test_a_webhook_resent_after_its_first_datastream_was_delisted_is_refused_saying_why(
    clean_stack: LocalStack,
) -> None:
    stack = clean_stack
    # GIVEN a webhook naming no datastream, queued for the default one (202), whose sender resends it after a deploy
    # made another datastream the default and the only one listed (ALLOWED_DATASTREAM_IDS)
    gw = stack.gateway(new_runtime().handle)
    doc = interact_event()
    msg_id = queued_while_edge_is_down(stack, gw, doc)

    # WHEN the resend comes
    resend = resent_after_a_redeploy(stack, doc, msg_id, ALLOWED_DATASTREAM_IDS="ds-new")

    # THEN it is refused (400, kept) naming the datastream the event was first taken for; nothing is sent anywhere
    assert resend.status_code == 400, resend.text
    [error] = resend.json()["errors"]
    assert error["path"] == "datastreamId"
    assert f'"{DATASTREAM_ID}"' in error["message"] and "first taken for" in error["message"]
    assert [c["status"] for c in edge_requests(stack, msg_id)] == [503] * 5
    filed = stack.result(resend.json()["eventId"])
    assert (filed["status"], filed["datastreamId"]) == ("rejected", DATASTREAM_ID)


@pytest.mark.parametrize("edge", ["answers", "is down"])
def test_a_request_naming_no_datastream_does_not_follow_a_replay_that_named_another_first(
    edge: str, clean_stack: LocalStack
) -> None:
    stack = clean_stack
    # GIVEN a signed request its sender meant for the default datastream (it names none), captured and replayed first
    # with ?datastreamId=ds-other (docs/security.md, "A replay that arrives first"): delivered there, or queued
    gw = stack.gateway(new_runtime().handle)
    doc = interact_event()
    msg_id = f"msg_{uuid.uuid4().hex}"
    body = json.dumps(doc)
    headers = {**stack.sign(body, msg_id=msg_id), "content-type": "application/json"}
    stack.sim.datastreams.add("ds-other")
    rule = stack.sim.add_fault(match_id=msg_id, status=503, retry_after=0) if edge == "is down" else None
    try:
        replay = requests.post(f"{gw.url}/events?datastreamId=ds-other", data=body, headers=headers, timeout=30)
        assert replay.status_code == (200 if rule is None else 202), replay.text
        if rule is not None:
            stack.sim.remove_fault(rule)

        # WHEN the genuine request (no query string) comes
        genuine = post(gw, stack, doc, msg_id)
    finally:
        stack.sim.datastreams.discard("ds-other")

    # THEN it is not taken for the replay's event (a review found it answered with the replay's delivery to ds-other,
    # or sending the queued replay there itself): filed as an eventId reuse once that is finished, busy while it waits
    assert genuine.status_code == (422 if rule is None else 409), genuine.text
    assert {c["query"]["datastreamId"] for c in edge_requests(stack, msg_id)} == {"ds-other"}
    assert len(edge_requests(stack, msg_id)) == (1 if rule is None else 5)


def test_a_resend_while_its_event_is_in_flight_for_a_delisted_datastream_is_busy_not_refused(
    clean_stack: LocalStack,
) -> None:
    stack = clean_stack
    # GIVEN a webhook event naming no datastream, held under a live claim for the old default datastream by an
    # invocation of the previous version still running after a deploy made "ds-new" the default and the only one listed
    doc = interact_event()
    msg_id = f"msg_{uuid.uuid4().hex}"
    held = new_runtime().relay.store.claim(
        msg_id, datastream_id=DATASTREAM_ID, source="webhook", lease_s=300, default_datastream=True
    )
    assert held.acquired

    # WHEN the sender resends it
    resend = resent_after_a_redeploy(stack, doc, msg_id, ALLOWED_DATASTREAM_IDS="ds-new")

    # THEN it is told the event is being processed (409: retry to read its result), not refused for good (a review
    # found 400 while the running invocation may still deliver it)
    assert resend.status_code == 409, resend.text
    assert edge_requests(stack, msg_id) == []


@pytest.mark.parametrize("to_datastream", [None, "ds-c"])
def test_a_resend_of_a_replayed_event_is_sent_with_its_first_attempts_time(
    to_datastream: str | None, clean_stack: LocalStack
) -> None:
    stack = clean_stack
    # GIVEN a webhook naming no datastream (no xdm.timestamp: the relay sets it), refused by Edge for good (500: the
    # sender is answered 502 and retries), which the operator replays, to its datastream or to another
    gw = stack.gateway(new_runtime().handle)
    doc = untimed_event()
    msg_id = f"msg_{uuid.uuid4().hex}"
    rule = stack.sim.add_fault(match_id=msg_id, status=500)
    first = post(gw, stack, doc, msg_id)
    assert first.status_code == 502, first.text
    stack.sim.remove_fault(rule)
    first_time = edge_requests(stack, msg_id)[0]["body"]["event"]["xdm"]["timestamp"]
    stack.sim.datastreams.add("ds-c")
    try:
        res = stack.resources
        replayed = replay_event(stack.dynamodb, stack.sqs, res.table_name, res.queue_url, msg_id, None, to_datastream)
        assert replayed == "queued"

        # WHEN the sender's retry (no query string, default unchanged) comes before a batch takes the replay
        time.sleep(0.01)
        resend = post(gw, stack, doc, msg_id)
    finally:
        stack.sim.datastreams.discard("ds-c")

    # THEN it is delivered where the replay sends it, with its first attempt's time, as the replayed message would
    # send it (reviews found the resend's own time: a result keeps none of its claim's first time, and the replay did
    # not put it back; to another datastream, the resend following the event there)
    assert resend.status_code == 200, resend.text
    sent = edge_requests(stack, msg_id)[-1]
    assert sent["query"]["datastreamId"] == (to_datastream or DATASTREAM_ID)
    assert sent["body"]["event"]["xdm"]["timestamp"] == first_time


def test_another_identitys_event_reusing_a_waiting_events_id_is_not_taken_for_it(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN a webhook naming no datastream queued for the default one (Edge down, 202), then a deploy changing the
    # default
    gw = stack.gateway(new_runtime().handle)
    event_id = f"evt-{uuid.uuid4().hex}"
    genuine = interact_event(event_id)
    rule = stack.sim.add_fault(match_id=event_id, status=503, retry_after=0)
    assert post(gw, stack, genuine).status_code == 202
    stack.sim.remove_fault(rule)
    stack.sim.datastreams.add("ds-new")
    try:
        redeployed = new_runtime(DATASTREAM_ID="ds-new")
        gw = stack.gateway(redeployed.handle)
        # WHEN another identity's event (another body, naming no datastream: meant for ds-new) reuses its eventId
        other = interact_event(event_id)
        assert other["event"]["xdm"]["identityMap"] != genuine["event"]["xdm"]["identityMap"]
        answer = post(gw, stack, other)
        stack.poller(redeployed.handle, batching_window=0).drain(timeout=20, raise_on_timeout=True)
    finally:
        stack.sim.datastreams.discard("ds-new")

    # THEN it is not taken for the waiting event (a review found it delivered to the old default in its place; a
    # finished one files it as an eventId reuse): busy, as before, and the genuine event is the one delivered there
    assert answer.status_code == 409, answer.text

    def ecid_of(call: dict[str, Any]) -> str:
        return str(call["body"]["event"]["xdm"]["identityMap"]["ECID"][0]["id"])

    delivered = [(c["query"]["datastreamId"], ecid_of(c)) for c in edge_requests(stack, event_id) if c["status"] == 200]
    other_ecid = other["event"]["xdm"]["identityMap"]["ECID"][0]["id"]
    genuine_ecid = genuine["event"]["xdm"]["identityMap"]["ECID"][0]["id"]
    assert (DATASTREAM_ID, other_ecid) not in delivered, (answer.status_code, delivered)
    assert (DATASTREAM_ID, genuine_ecid) in delivered, (answer.status_code, delivered)


def test_a_replay_does_not_give_a_senders_own_time_to_a_later_attempt_that_gives_none(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN a webhook event carrying its sender's own xdm.timestamp, refused by Edge for good (500: answered 502)
    gw = stack.gateway(new_runtime().handle)
    doc = interact_event()
    sender_time = doc["event"]["xdm"]["timestamp"]
    msg_id = f"msg_{uuid.uuid4().hex}"
    rule = stack.sim.add_fault(match_id=msg_id, status=500)
    assert post(gw, stack, doc, msg_id).status_code == 502
    stack.sim.remove_fault(rule)

    # WHEN the operator replays it, and before a batch takes the replay the sender resends a corrected body that gives
    # no time (the relay sets its receive time)
    res = stack.resources
    assert replay_event(stack.dynamodb, stack.sqs, res.table_name, res.queue_url, msg_id) == "queued"
    corrected = untimed_event()
    corrected["event"]["xdm"]["identityMap"] = doc["event"]["xdm"]["identityMap"]
    resend = post(gw, stack, corrected, msg_id)

    # THEN that attempt is sent with the relay's time, not the sender's earlier one, which a replay carries forward only
    # when the relay had set it (a review found it given the sender's)
    assert resend.status_code == 200, resend.text
    assert edge_requests(stack, msg_id)[-1]["body"]["event"]["xdm"]["timestamp"] != sender_time


def test_a_resend_whose_event_moves_again_between_its_two_claims_is_busy_not_queued(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN a webhook naming no datastream queued for the default one (202); a deploy changes the default
    gw = stack.gateway(new_runtime().handle)
    doc = interact_event()
    msg_id = queued_while_edge_is_down(stack, gw, doc)
    while stack.sqs.receive_message(QueueUrl=stack.resources.queue_url, WaitTimeSeconds=0).get("Messages"):
        pass  # the first attempt's retry message: hidden, to see only what the resend queues
    stack.sim.datastreams.add("ds-new")
    redeployed = new_runtime(DATASTREAM_ID="ds-new")
    store = redeployed.relay.store
    real_claim = store.claim
    calls: list[Any] = []

    def claim(event_id: str, **kw: Any) -> Any:
        got = real_claim(event_id, **kw)
        calls.append(kw["datastream_id"])
        if len(calls) == 1:
            # between the resend's two claims the item is re-pointed (relayctl replay --to-datastream, or a producer
            # message taking it over for the default): a race, made certain here
            stack.dynamodb.update_item(
                TableName=stack.resources.table_name,
                Key={"pk": {"S": f"EVENT#{msg_id}"}, "sk": {"S": "RESULT"}},
                UpdateExpression="SET datastreamId = :c",
                ExpressionAttributeValues={":c": {"S": "ds-c"}},
            )
        return got

    store.claim = claim  # type: ignore[method-assign]
    try:
        gw = stack.gateway(redeployed.handle)
        resend = post(gw, stack, doc, msg_id)
    finally:
        stack.sim.datastreams.discard("ds-new")
    # THEN it is busy (409): a review found the second call's answer taken for a retry, the sender told 202 "queued"
    # with nothing claimed, and a message queued for the datastream the item no longer holds
    assert calls == ["ds-new", DATASTREAM_ID]
    assert resend.status_code == 409, resend.text
    assert not stack.sqs.receive_message(QueueUrl=stack.resources.queue_url, WaitTimeSeconds=0).get("Messages")


def test_webhook_answers_202_within_its_deadline_when_edge_is_slow(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN Edge takes 8 s to answer this event; the webhook deadline is the default 5 s; a warm environment
    runtime = new_runtime()
    gw = stack.gateway(runtime.handle)
    assert post(gw, stack, interact_event()).status_code == 200
    runtime.clients["sqs"]  # built on first use, here inside the 0.75 s enqueue reserve the bound below includes
    msg_id = f"msg_{uuid.uuid4().hex}"
    stack.sim.add_fault(match_id=msg_id, delay=8)

    # WHEN it is posted
    started = time.monotonic()
    resp = post(gw, stack, interact_event(), msg_id)
    elapsed = time.monotonic() - started

    # THEN the sender gets 202 within the deadline and the event waits in the queue
    assert (resp.status_code, resp.json()) == (202, {"eventId": msg_id, "status": "queued"})
    assert elapsed < 5.0, elapsed
    assert all(c["fault"] for c in edge_requests(stack, msg_id))  # every attempt was one of the slow ones
    assert [m["MessageAttributes"]["eventId"]["StringValue"] for m in queue_messages(stack)] == [msg_id]


def test_a_webhook_event_not_queued_for_want_of_a_queue_says_so(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN an execution environment with no retry queue configured (RETRY_QUEUE_URL unset), and Edge answering 503
    runtime = new_runtime(RETRY_QUEUE_URL="")
    gw = stack.gateway(runtime.handle)
    msg_id = f"msg_{uuid.uuid4().hex}"
    stack.sim.add_fault(match_id=msg_id, status=503, retry_after=0)

    # WHEN an event is posted
    resp = post(gw, stack, interact_event(), msg_id)

    # THEN the sender must retry, and the stored item says why nothing was queued: no queue, not a refusal
    assert resp.status_code == 503
    assert stack.result(msg_id)["lastError"].startswith(
        "not queued (no retry queue is configured; the sender was answered 503)"
    )


def test_webhook_answers_503_when_edge_is_down_and_the_queue_too(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN an execution environment whose retry queue does not exist, and Edge answering 503
    missing_queue = f"{stack.moto.url}/123456789012/no-such-queue"
    runtime = new_runtime(RETRY_QUEUE_URL=missing_queue)
    gw = stack.gateway(runtime.handle)
    msg_id = f"msg_{uuid.uuid4().hex}"
    rule = stack.sim.add_fault(match_id=msg_id, status=503, retry_after=0)
    doc = interact_event()

    # WHEN an event is posted
    resp = post(gw, stack, doc, msg_id)

    # THEN 503 problem telling the sender to retry
    assert (resp.status_code, resp.headers["content-type"], resp.headers["retry-after"]) == (503, PROBLEM, "30")
    assert resp.json() == {
        "type": "about:blank",
        "title": "Service unavailable",
        "status": 503,
        "detail": "Edge is unavailable and the event could not be queued; retry",
        "eventId": msg_id,
        "retryAfter": 30,
    }
    assert queue_messages(stack) == []
    item = stack.result(msg_id)
    assert item["status"] == "queued"  # released: the sender's retry may claim it
    # and the item says nothing waits in the queue for it (no retryAfterSeconds promising a next attempt)
    assert item["lastError"].startswith("not queued (the retry queue refused it; the sender was answered 503)")
    assert "retryAfterSeconds" not in item

    # WHEN Edge recovers and the sender retries
    stack.sim.remove_fault(rule)
    again = post(gw, stack, doc, msg_id)

    # THEN it is delivered
    assert again.status_code == 200
    assert stack.result(msg_id)["status"] == "delivered"
    assert [c["status"] for c in edge_requests(stack, msg_id)] == [503] * 5 + [200]


# ---------------------------------------------------------------------------------------------------------- DynamoDB


RESULT_WRITES = (".PutItem", ".BatchWriteItem")  # a webhook's result is one PutItem, an SQS batch's a BatchWriteItem


class FailingDynamoProxy:
    """An HTTP proxy in front of moto's DynamoDB: forwards everything, except that it answers the first `fail`
    result writes (PutItem or BatchWriteItem of a `delivered` outcome) with `status`/`error_type`."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.fail = 0
        self.status = 400
        self.error_type = "ResourceNotFoundException"
        self.failed = 0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> FailingDynamoProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                target = self.headers.get("x-amz-target", "")
                if target.endswith(RESULT_WRITES) and b'"delivered"' in body and proxy.fail > 0:
                    proxy.fail -= 1
                    proxy.failed += 1
                    payload = json.dumps(
                        {"__type": f"com.amazonaws.dynamodb.v20120810#{proxy.error_type}", "message": "injected"}
                    ).encode()
                    self.send_response(proxy.status)
                    self.send_header("content-type", "application/x-amz-json-1.0")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                skip = {"host", "content-length", "connection", "accept-encoding"}
                headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
                resp = requests.post(proxy.target + self.path, data=body, headers=headers, timeout=30)
                self.send_response(resp.status_code)
                for name in ("content-type", "x-amz-crc32", "x-amzn-requestid"):
                    if name in resp.headers:
                        self.send_header(name, resp.headers[name])
                self.send_header("content-length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def dynamo_proxy(clean_stack: LocalStack) -> Iterator[FailingDynamoProxy]:
    proxy = FailingDynamoProxy(clean_stack.moto.url).start()
    yield proxy
    proxy.stop()


def proxied_clients(proxy: FailingDynamoProxy) -> dict[str, Any]:
    clients = build_clients(20)
    clients["dynamodb"] = boto3.session.Session().client("dynamodb", endpoint_url=proxy.url, config=client_config(20))
    return clients


def test_transient_dynamodb_failure_after_edge_success_is_retried_by_the_write(
    clean_stack: LocalStack, dynamo_proxy: FailingDynamoProxy
) -> None:
    stack = clean_stack
    # GIVEN DynamoDB fails the first two writes of the outcome with a 500
    dynamo_proxy.fail, dynamo_proxy.status, dynamo_proxy.error_type = 2, 500, "InternalServerError"
    event_id = f"evt-{uuid.uuid4()}"
    runtime = new_runtime(clients=proxied_clients(dynamo_proxy))

    # WHEN the function gets the event
    answer = runtime.handle(batch(record(stack, interact_event(event_id))), new_context(30))

    # THEN the write was retried and succeeded: delivered, with one Edge call
    assert answer == failures()
    assert dynamo_proxy.failed == 2
    assert stack.result(event_id)["status"] == "delivered"
    assert len(edge_requests(stack, event_id)) == 1


def test_lasting_dynamodb_failure_after_edge_success_fails_the_record(
    clean_stack: LocalStack, dynamo_proxy: FailingDynamoProxy
) -> None:
    stack = clean_stack
    # GIVEN DynamoDB refuses the outcome write (after Edge answered 200)
    dynamo_proxy.fail = 1
    event_id = f"evt-{uuid.uuid4()}"
    msg = record(stack, interact_event(event_id))
    runtime = new_runtime(clients=proxied_clients(dynamo_proxy))

    # WHEN the function gets the event
    answer = runtime.handle(batch(msg), new_context(30))

    # THEN the record is handed back for redelivery, not silently acknowledged
    assert answer == failures(msg["messageId"])
    assert dynamo_proxy.failed == 1
    item = stack.result(event_id)
    assert (item["status"], item["lastError"]) == (
        "queued",
        "dynamodb batch_write_item failed: ResourceNotFoundException"
        " (no such table: check HANDLES_TABLE and the region)",
    )
    # AND the redelivery sends the same event again (Edge dedupes on xdm._id) and stores it delivered
    assert runtime.handle(batch(msg), new_context(30)) == failures()
    calls = edge_requests(stack, event_id)
    assert [c["status"] for c in calls] == [200, 200]
    assert calls[0]["body"]["event"] == calls[1]["body"]["event"]  # (the 2nd also carries the identity's state)
    item = stack.result(event_id)
    assert (item["status"], item["requestId"], item["attempts"]) == ("delivered", calls[1]["request_id"], 2)
