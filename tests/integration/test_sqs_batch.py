"""SQS batches end to end (issue 2, item 2; contract §8-§9): the real handler over loopback HTTP against moto server and
the Edge simulator. Nothing patches `requests` or boto3; Edge faults come from the simulator's own fault rules."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from datetime import datetime
from typing import Any

import pytest
from relay.models import iso_millis
from relay.runtime import Runtime
from relay.settings import load_settings

from devtools.edge_sim import (
    ERROR_TYPE_BASE,
    FIXTURE_DIR,
    INJECTED_VALIDATION_ERRORS,
    encode_identity_state,
    new_ecid,
    org_cookie_prefix,
)
from devtools.lambda_context import new_context
from devtools.stack import DATASTREAM_ID, LocalStack

pytestmark = pytest.mark.integration

FIXTURES = FIXTURE_DIR  # Adobe's answers, kept in the repo (test_edge_sim checks them against ../shared when there)
INVALID_EVENT_TYPE = "https://github.com/interact-relay/errors/invalid-event"
THIRTY_DAYS = 30 * 86400


# ---------------------------------------------------------------------------------------------------------- helpers


def new_runtime(**overrides: str) -> Runtime:
    """A fresh execution environment built from the stack's environment (plus overrides)."""
    return Runtime(load_settings({**os.environ, **overrides}))


def interact_event(event_id: str | None = None, *, ecid: str | None = None) -> dict[str, Any]:
    xdm: dict[str, Any] = {
        "eventType": "web.webpagedetails.pageViews",
        "identityMap": {"ECID": [{"id": ecid or new_ecid(), "primary": True}]},
        "web": {"webPageDetails": {"name": "Home"}},
        "timestamp": "2026-01-01T00:00:00.000Z",
    }
    if event_id is not None:
        xdm["_id"] = event_id
    return {"event": {"xdm": xdm}}


def identity_of(stack: LocalStack, doc: dict[str, Any]) -> str:
    """The opaque id a result keeps of its event's primary identity (a repeat of the eventId must match it)."""
    [entry] = doc["event"]["xdm"]["identityMap"]["ECID"]
    return stack.identity_id("ECID", entry["id"])


def with_id(doc: dict[str, Any], event_id: str) -> dict[str, Any]:
    """`doc` as the relay sends it: `xdm._id` set to the eventId."""
    return {**doc, "event": {**doc["event"], "xdm": {**doc["event"]["xdm"], "_id": event_id}}}


def sqs_record(stack: LocalStack, body: str, *, message_id: str | None = None, sent_ms: int | None = None) -> dict:
    """One record exactly as the SQS event source mapping hands it to the function."""
    mid = message_id or str(uuid.uuid4())
    return {
        "messageId": mid,
        "receiptHandle": f"rh-{mid}",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": str(sent_ms if sent_ms is not None else int(time.time() * 1000)),
            "SenderId": "AIDAEXAMPLE",
            "ApproximateFirstReceiveTimestamp": str(int(time.time() * 1000)),
        },
        "messageAttributes": {},
        "md5OfBody": "0" * 32,
        "eventSource": "aws:sqs",
        "eventSourceARN": stack.resources.queue_arn,
        "awsRegion": stack.region,
    }


def edge_requests(stack: LocalStack, event_id: str) -> list[dict[str, Any]]:
    return [r for r in stack.sim.requests_log() if r["path"].endswith("/interact") and r["xdm_id"] == event_id]


def body_digest(body: str) -> str:
    """Where the relay would file this invalid body were its eventId taken (`<eventId>#invalid-<digest>`)."""
    return hashlib.sha256(f"{DATASTREAM_ID}\x1f{body}".encode()).hexdigest()[:16]


def timeless(item: dict[str, Any] | None) -> dict[str, Any]:
    """The stored item without its clock-dependent attributes, after checking their shape."""
    assert item is not None
    out = dict(item)
    stored = out.pop("storedAt")
    assert len(stored) == 24 and stored.endswith("Z"), stored
    assert abs(out.pop("expiresAt") - (time.time() + THIRTY_DAYS)) < 120
    out.pop("updatedAt", None)  # written by the claim
    received = out.pop("receivedAt", None)  # on a body the relay refused: when it came (its message's SentTimestamp)
    assert received is None or abs(datetime.fromisoformat(received).timestamp() - time.time()) < 120, received
    return out


def simulator_handle(stack: LocalStack, ecid: str) -> list[dict[str, Any]]:
    """What the simulator answers for a first event of `ecid` (no identity fetch, no personalization)."""
    prefix = org_cookie_prefix(stack.sim.org_id)
    return [
        {
            "type": "locationHint:result",
            "payload": [
                {"scope": "Target", "hint": "35", "ttlSeconds": 1800},
                {"scope": "AAM", "hint": "9", "ttlSeconds": 1800},
                {"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": 1800},
            ],
        },
        {
            "type": "state:store",
            "payload": [
                {"key": prefix + "_identity", "value": encode_identity_state(ecid), "maxAge": 34128000},
                {"key": prefix + "_cluster", "value": "or2", "maxAge": 1800},
            ],
        },
    ]


def assert_edge_headers(stack: LocalStack, request: dict[str, Any]) -> None:
    headers = request["headers"]
    scheme, _, token = headers["authorization"].partition(" ")
    assert (scheme, bool(token)) == ("Bearer", True)
    assert headers["x-api-key"] == stack.sim.client_id
    assert headers["x-gw-ims-org-id"] == stack.sim.org_id
    assert headers["content-type"] == "application/json"
    assert request["query"]["datastreamId"] == DATASTREAM_ID


# ---------------------------------------------------------------------------------------------------------- tests


def test_mixed_batch_reports_only_the_transient_failure_and_stores_every_outcome(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN a batch: three valid events (a plain answer, a fixture answer, a 207 with errors), a body that is not
    # JSON, JSON that is not an event, one Edge rejects with 400, and one Edge answers 503 every time
    ecids = [new_ecid() for _ in range(3)]
    ids = [f"evt-{uuid.uuid4()}" for _ in range(3)]
    valid = [interact_event(ids[i], ecid=ecids[i]) for i in range(3)]
    rejected_id = f"evt-{uuid.uuid4()}"
    rejected_doc = interact_event(rejected_id)
    unavailable_doc = interact_event()  # no xdm._id: the relay sets it to the messageId
    unavailable_mid = str(uuid.uuid4())
    stack.sim.add_fault(match_id=ids[1], fixture="send-event-with-identity.json")
    partial_error = {"type": ERROR_TYPE_BASE + "EXEG-0201-503", "status": 503, "title": "Target unavailable"}
    stack.sim.add_fault(match_id=ids[2], status=207, errors=[partial_error])
    stack.sim.add_fault(match_id=rejected_id, status=400)
    stack.sim.add_fault(match_id=unavailable_mid, status=503, retry_after=0)
    sent_ms = int(time.time() * 1000) - 5000
    records = [
        sqs_record(stack, json.dumps(valid[0])),
        sqs_record(stack, "this is {not json"),
        sqs_record(stack, json.dumps(valid[1])),
        sqs_record(stack, json.dumps({"event": {"xdm": []}, "query": "x"})),
        sqs_record(stack, json.dumps(rejected_doc)),
        sqs_record(stack, json.dumps(unavailable_doc), message_id=unavailable_mid, sent_ms=sent_ms),
        sqs_record(stack, json.dumps(valid[2])),
    ]
    not_json_mid, not_event_mid = records[1]["messageId"], records[3]["messageId"]

    # WHEN the function gets the batch
    answer = new_runtime().handle({"Records": records}, new_context(30))

    # THEN only the 503 record is to be redelivered
    assert answer == {"batchItemFailures": [{"itemIdentifier": unavailable_mid}]}

    # AND the simulator got one call per valid or Edge-rejected event, with the Edge headers and the body as sent
    for event_id, doc in [*zip(ids, valid, strict=True), (rejected_id, rejected_doc)]:
        calls = edge_requests(stack, event_id)
        assert len(calls) == 1, event_id
        assert_edge_headers(stack, calls[0])
        assert calls[0]["body"] == doc
    # AND the 503 event was tried 5 times (EDGE_MAX_ATTEMPTS), always with the same body and xdm._id (= messageId)
    calls = edge_requests(stack, unavailable_mid)
    assert [c["status"] for c in calls] == [503] * 5
    expected_body = with_id(unavailable_doc, unavailable_mid)
    assert all(c["body"] == expected_body for c in calls)
    for call in calls:
        assert_edge_headers(stack, call)
    # AND no Edge call was made for the two invalid bodies
    assert len([r for r in stack.sim.requests_log() if r["path"].endswith("/interact")]) == 4 + 5

    # AND the delivered items hold exactly the handles the simulator returned
    rid = {event_id: edge_requests(stack, event_id)[0]["request_id"] for event_id in [*ids, rejected_id]}
    fixture = json.loads((FIXTURES / "send-event-with-identity.json").read_text())
    base = {
        "pk": "",
        "sk": "RESULT",
        "status": "delivered",
        "datastreamId": DATASTREAM_ID,
        "source": "sqs",
        "defaultDatastream": True,  # the messages name none
    }
    assert timeless(stack.result_item(ids[0])) == {
        **base,
        "pk": f"EVENT#{ids[0]}",
        "eventId": ids[0],
        "identityId": identity_of(stack, valid[0]),
        "requestId": rid[ids[0]],
        "handle": simulator_handle(stack, ecids[0]),
        "attempts": 1,
    }
    assert timeless(stack.result_item(ids[1])) == {
        **base,
        "pk": f"EVENT#{ids[1]}",
        "eventId": ids[1],
        "identityId": identity_of(stack, valid[1]),
        "requestId": fixture["requestId"],
        "handle": fixture["handle"],
        "attempts": 1,
    }
    assert timeless(stack.result_item(ids[2])) == {
        **base,
        "pk": f"EVENT#{ids[2]}",
        "eventId": ids[2],
        "identityId": identity_of(stack, valid[2]),
        "requestId": rid[ids[2]],
        "handle": simulator_handle(stack, ecids[2]),
        "errors": [partial_error],
        "attempts": 1,
    }
    # AND the Edge rejection is stored with Edge's problem and the request as sent
    assert timeless(stack.result_item(rejected_id)) == {
        "pk": f"EVENT#{rejected_id}",
        "sk": "RESULT",
        "eventId": rejected_id,
        "status": "rejected",
        "datastreamId": DATASTREAM_ID,
        "source": "sqs",
        "identityId": identity_of(stack, rejected_doc),
        "requestId": rid[rejected_id],
        "error": {
            "type": ERROR_TYPE_BASE + "EXEG-0102-400",
            "status": 400,
            "title": "Invalid request",
            "detail": "The request failed validation.",
            "report": {"requestId": rid[rejected_id], "errors": list(INJECTED_VALIDATION_ERRORS)},
        },
        "request": rejected_doc,
        "attempts": 1,
        "defaultDatastream": True,
    }
    # AND the invalid bodies are stored rejected (eventId = messageId) with their field paths and the raw body
    assert timeless(stack.result_item(not_json_mid)) == {
        "pk": f"EVENT#{not_json_mid}",
        "sk": "RESULT",
        "eventId": not_json_mid,
        "status": "rejected",
        "rejectedBy": "relay",
        "datastreamId": DATASTREAM_ID,
        "source": "sqs",
        "error": {
            "type": INVALID_EVENT_TYPE,
            "title": "Invalid event",
            "status": 400,
            "errors": [{"path": "$", "message": "body is not JSON: Expecting value at line 1 column 1"}],
        },
        "request": "this is {not json",
        "bodyDigest": body_digest("this is {not json"),
    }
    assert timeless(stack.result_item(not_event_mid)) == {
        "pk": f"EVENT#{not_event_mid}",
        "sk": "RESULT",
        "eventId": not_event_mid,
        "status": "rejected",
        "rejectedBy": "relay",
        "datastreamId": DATASTREAM_ID,
        "source": "sqs",
        "error": {
            "type": INVALID_EVENT_TYPE,
            "title": "Invalid event",
            "status": 400,
            "errors": [
                {"path": "event.xdm", "message": "must be an object, not array"},
                {"path": "query", "message": "must be an object, not string"},
            ],
        },
        "request": json.dumps({"event": {"xdm": []}, "query": "x"}),
        "bodyDigest": body_digest(json.dumps({"event": {"xdm": []}, "query": "x"})),
    }
    # AND the 503 event is released for redelivery (no outcome stored yet), with the reason and Edge's Retry-After
    queued = stack.result_item(unavailable_mid)
    assert queued is not None
    assert abs(queued.pop("expiresAt") - (time.time() + THIRTY_DAYS)) < 120
    assert queued.pop("updatedAt").endswith("Z")
    assert queued == {
        "pk": f"EVENT#{unavailable_mid}",
        "sk": "RESULT",
        "eventId": unavailable_mid,
        "status": "queued",
        "datastreamId": DATASTREAM_ID,
        "source": "sqs",
        "attempts": 1,
        "defaultDatastream": True,
        "lastError": "edge answered 503 " + ERROR_TYPE_BASE + "EXEG-0000-503",
    }


def send(stack: LocalStack, body: str) -> str:
    return stack.sqs.send_message(QueueUrl=stack.resources.queue_url, MessageBody=body)["MessageId"]


def dlq_messages(stack: LocalStack) -> list[dict[str, Any]]:
    return stack.sqs.receive_message(
        QueueUrl=stack.resources.dlq_url, MaxNumberOfMessages=10, AttributeNames=["All"], WaitTimeSeconds=0
    ).get("Messages", [])


def test_poller_redelivers_the_503_record_until_the_dead_letter_queue(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN a valid event, a body that is not JSON, one Edge rejects with 422 and one Edge answers 503 every time
    # (no xdm._id and no xdm.timestamp: the relay fills both in, from the messageId and SentTimestamp)
    ok_id, rejected_id = f"evt-{uuid.uuid4()}", f"evt-{uuid.uuid4()}"
    ok_mid = send(stack, json.dumps(interact_event(ok_id)))
    bad_mid = send(stack, "{truncated")
    rejected_mid = send(stack, json.dumps(interact_event(rejected_id)))
    doc = interact_event()
    del doc["event"]["xdm"]["timestamp"]
    unavailable_mid = send(stack, json.dumps(doc))
    stack.sim.add_fault(match_id=rejected_id, status=422)
    stack.sim.add_fault(match_id=unavailable_mid, status=503, retry_after=0)
    max_receive = stack.resources.max_receive_count
    assert max_receive == 5

    # WHEN the event source mapping stand-in polls until the queue is empty (failed records reappear after 1 s)
    poller = stack.poller(new_runtime().handle, batching_window=0)
    poller.drain(timeout=40, raise_on_timeout=True)

    # THEN the first invocation acknowledged everything but the 503 record, which came back max_receive times
    first, *rest = poller.history
    assert sorted(first.message_ids) == sorted([ok_mid, bad_mid, rejected_mid, unavailable_mid])
    assert (sorted(first.deleted), first.failed) == (sorted([ok_mid, bad_mid, rejected_mid]), [unavailable_mid])
    assert [(o.message_ids, o.deleted, o.failed) for o in rest] == [([unavailable_mid], [], [unavailable_mid])] * (
        max_receive - 1
    )
    # AND it is now in the dead-letter queue, unchanged, and nothing is left in the queue
    dead = dlq_messages(stack)
    assert [(m["MessageId"], m["Body"]) for m in dead] == [(unavailable_mid, json.dumps(doc))]
    assert poller.pending() == 0
    # AND Edge saw 5 attempts on each receive until one receive's attempts all failed while Edge answered no other call
    # (the first, unless Edge answered a batch-mate's call meanwhile; then the second, alone): from then on the
    # execution environment took Edge for down, and each later receive made one. Every call was the same request:
    # xdm._id = messageId, timestamp = SentTimestamp
    calls = edge_requests(stack, unavailable_mid)
    assert [c["status"] for c in calls] in ([503] * (5 + max_receive - 1), [503] * (5 + 5 + max_receive - 2))
    sent_ts = int(dead[0]["Attributes"]["SentTimestamp"]) / 1000

    xdm = {**doc["event"]["xdm"], "_id": unavailable_mid, "timestamp": iso_millis(sent_ts)}
    assert all(c["body"] == {"event": {"xdm": xdm}} for c in calls)
    # AND the others ended as they should, each with exactly one Edge call
    assert stack.result(ok_id)["status"] == "delivered"
    assert stack.result(bad_mid)["status"] == "rejected"
    rejected = stack.result(rejected_id)
    assert (rejected["status"], rejected["error"]["status"], rejected["error"]["title"]) == (
        "rejected",
        422,
        "Unprocessable entity",
    )
    assert [len(edge_requests(stack, i)) for i in (ok_id, rejected_id)] == [1, 1]
    # AND the dead-lettered event's result says it is waiting for a retry, with the last reason
    item = stack.result(unavailable_mid)
    assert (item["status"], item["attempts"], item["lastError"]) == (
        "queued",
        max_receive,
        "edge answered 503 " + ERROR_TYPE_BASE + "EXEG-0000-503",
    )


def test_a_record_edge_asks_to_retry_later_than_the_visibility_timeout_waits_until_then(
    clean_stack: LocalStack,
) -> None:
    stack = clean_stack
    sqs, queue_url = stack.sqs, stack.resources.queue_url
    # GIVEN a queue whose visibility timeout is 2 s, and a function told so
    original = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["VisibilityTimeout"])["Attributes"]
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"VisibilityTimeout": "2"})
    try:
        runtime = new_runtime(QUEUE_VISIBILITY_TIMEOUT_SECONDS="2", EDGE_MAX_ATTEMPTS="1")
        # AND three events: Edge answers the first 503 with Retry-After 10 s once, the second is the same identity's
        # next event, and the third (another identity) gets a 503 with Retry-After 0 once
        ecid = new_ecid()
        first, second, other = (f"evt-{uuid.uuid4()}" for _ in range(3))
        first_mid = send(stack, json.dumps(interact_event(first, ecid=ecid)))
        second_mid = send(stack, json.dumps(interact_event(second, ecid=ecid)))
        other_mid = send(stack, json.dumps(interact_event(other)))
        stack.sim.add_fault(match_id=first, status=503, retry_after=10, times=1)
        stack.sim.add_fault(match_id=other, status=503, retry_after=0, times=1)
        poller = stack.poller(runtime.handle, batching_window=0, failure_visibility_timeout=None)

        # WHEN the event source mapping stand-in hands them to the function in one batch (and leaves the visibility
        # of failed records alone, as Lambda does)
        # (the relay sets the visibility during the call: 10 s from then is no sooner than 10 s from `asked`)
        asked = time.monotonic()
        assert poller.poll_once() == 3
        sent_back = time.monotonic()
        assert sorted(poller.history[0].failed) == sorted([first_mid, second_mid, other_mid])
        # AND the first event's result says it is queued, why, and how long Edge asked it to wait
        queued = stack.result(first)
        assert (queued["status"], queued["retryAfterSeconds"]) == ("queued", 10)
        assert queued["lastError"] == "edge answered 503 " + ERROR_TYPE_BASE + "EXEG-0000-503"

        # THEN once the queue's 2 s have passed, only the record with the short Retry-After is visible again: the
        # first event, and the second that waits for it, stay invisible for the 10 s Edge asked for
        time.sleep(max(0.0, sent_back + 3.5 - time.monotonic()))
        peek = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0)
        assert time.monotonic() - sent_back < 10, "the check came too late to tell"
        assert [m["MessageId"] for m in peek.get("Messages", [])] == [other_mid]

        # AND when they come back, all three are delivered, the first event before the second
        poller.drain(timeout=40, raise_on_timeout=True)
        assert time.monotonic() - asked >= 10
        assert [stack.result(e)["status"] for e in (first, second, other)] == ["delivered"] * 3
        assert [c["status"] for c in edge_requests(stack, first)] == [503, 200]
        assert [c["status"] for c in edge_requests(stack, second)] == [200]
        log = [r["xdm_id"] for r in stack.sim.requests_log() if r.get("status") == 200]
        assert log.index(first) < log.index(second)
    finally:
        sqs.set_queue_attributes(QueueUrl=queue_url, Attributes=original)


SUCCESS_FIXTURES = [
    "send-event.json",
    "send-event-with-identity.json",
    "personalization-view.json",
    "personalization-form-based.json",
]


@pytest.mark.parametrize("status", [200, 207])
@pytest.mark.parametrize("fixture", SUCCESS_FIXTURES)
def test_fixture_answer_is_stored_exactly_as_edge_returned_it(clean_stack: LocalStack, fixture: str, status: int):
    stack = clean_stack
    # GIVEN Edge answers with one of Adobe's captured response bodies (as a 207, with an error added)
    answer = json.loads((FIXTURES / fixture).read_text())
    event_id = f"evt-{uuid.uuid4()}"
    if status == 200:
        stack.sim.add_fault(match_id=event_id, fixture=fixture)
    else:
        answer["errors"] = [
            {
                "type": ERROR_TYPE_BASE + "EXEG-0201-503",
                "status": 503,
                "title": "The service is temporarily unable to serve this request. Please try again later.",
                "report": {"eventIndex": 0},
            }
        ]
        stack.sim.add_fault(match_id=event_id, status=207, body=json.dumps(answer), content_type="application/json")
    doc = interact_event(event_id)
    send(stack, json.dumps(doc))

    # WHEN the poller delivers it
    poller = stack.poller(new_runtime().handle, batching_window=0)
    poller.drain(timeout=20, raise_on_timeout=True)

    # THEN the stored handle array is the fixture's, unchanged, and a 207's errors are stored too
    assert [o.failed for o in poller.history] == [[]]
    stored = timeless(stack.result_item(event_id))
    expected = {
        "pk": f"EVENT#{event_id}",
        "sk": "RESULT",
        "eventId": event_id,
        "status": "delivered",
        "datastreamId": DATASTREAM_ID,
        "source": "sqs",
        "identityId": identity_of(stack, doc),
        "requestId": answer["requestId"],
        "handle": json.loads((FIXTURES / fixture).read_text())["handle"],
        "attempts": 1,
        "defaultDatastream": True,  # its message named none
    }
    if status == 207:
        expected["errors"] = answer["errors"]
    assert stored == expected
    assert [c["status"] for c in edge_requests(stack, event_id)] == [status]


def test_a_corrected_resend_of_an_event_the_relay_refused_is_delivered_not_a_repeat(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN an event the relay refused itself (its identityMap is not a map), stored rejected under its xdm._id
    event_id = f"evt-{uuid.uuid4()}"
    broken = interact_event(event_id)
    broken["event"]["xdm"]["identityMap"] = "not a map"
    runtime = new_runtime()
    assert runtime.handle({"Records": [sqs_record(stack, json.dumps(broken))]}, new_context(30)) == {
        "batchItemFailures": []
    }
    assert stack.result(event_id)["status"] == "rejected"
    assert edge_requests(stack, event_id) == []

    # WHEN the producer sends the corrected event under the same eventId
    fixed = interact_event(event_id)
    answer = runtime.handle({"Records": [sqs_record(stack, json.dumps(fixed))]}, new_context(30))

    # THEN it is delivered (the relay never sent the broken one to Edge, so there is nothing to dedupe), and the
    # result no longer carries the rejection
    assert answer == {"batchItemFailures": []}
    assert len(edge_requests(stack, event_id)) == 1
    item = stack.result(event_id)
    assert item["status"] == "delivered"
    assert not {"error", "request", "rejectedBy"} & set(item)


def test_a_delivered_message_naming_no_datastream_sent_again_after_the_default_changed_is_a_repeat(
    clean_stack: LocalStack,
) -> None:
    # GIVEN a producer's event delivered to the default datastream (its message names none)
    doc = interact_event(f"moved-{uuid.uuid4().hex[:8]}")
    event_id = doc["event"]["xdm"]["_id"]
    first = new_runtime().handle({"Records": [sqs_record(clean_stack, json.dumps(doc))]}, new_context(30))
    assert first == {"batchItemFailures": []}
    stored = clean_stack.result_item(event_id)
    assert stored is not None and stored["status"] == "delivered"

    # WHEN its message comes again (its delete was lost, say) after a deploy changed the default datastream
    clean_stack.sim.datastreams.add("ds-new")
    try:
        again = new_runtime(DATASTREAM_ID="ds-new").handle(
            {"Records": [sqs_record(clean_stack, json.dumps(doc))]}, new_context(30)
        )
    finally:
        clean_stack.sim.datastreams.discard("ds-new")

    # THEN it is a repeat of the event it was: nothing sent again, nothing filed as its eventId reused by another event
    # (which `relayctl replay` would then send to the new datastream)
    assert again == {"batchItemFailures": []}
    assert len(edge_requests(clean_stack, event_id)) == 1
    assert clean_stack.result_item(event_id) == stored
    assert clean_stack.filed_under(event_id) == [event_id]


def test_a_delivered_event_sent_again_among_new_ones_is_a_repeat_and_left_as_stored(clean_stack: LocalStack) -> None:
    # GIVEN an event delivered in an earlier batch
    runtime = new_runtime()
    doc = interact_event("again-1")
    first = runtime.handle({"Records": [sqs_record(clean_stack, json.dumps(doc))]}, new_context(30))
    assert first == {"batchItemFailures": []}
    stored = clean_stack.result_item("again-1")
    assert stored is not None and stored["status"] == "delivered"

    # WHEN the sender sends it again, as a new message (a first receive), in a batch with two new events: the batch
    # claims all three with one BatchExecuteStatement of INSERTs
    records = [
        sqs_record(clean_stack, json.dumps(interact_event("again-new-1"))),
        sqs_record(clean_stack, json.dumps(doc)),
        sqs_record(clean_stack, json.dumps(interact_event("again-new-2"))),
    ]
    assert runtime.handle({"Records": records}, new_context(30)) == {"batchItemFailures": []}

    # THEN Edge saw it once: its INSERT was refused (DuplicateItem), its own claim found it delivered, and its stored
    # result is as it was; the new events were delivered
    assert len(edge_requests(clean_stack, "again-1")) == 1
    assert clean_stack.result_item("again-1") == stored
    for event_id in ("again-new-1", "again-new-2"):
        assert (clean_stack.result_item(event_id) or {}).get("status") == "delivered"
        assert len(edge_requests(clean_stack, event_id)) == 1
