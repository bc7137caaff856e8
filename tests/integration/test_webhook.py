"""`POST /events` over HTTP (issue 2, item 3; contract §5, §7): a local HTTP API gateway in front of the real
handler, moto server and the Edge simulator on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
from relay.runtime import Runtime
from relay.settings import load_settings

from devtools.edge_sim import ERROR_TYPE_BASE, INJECTED_VALIDATION_ERRORS, VALIDATION_CODES, new_ecid
from devtools.gateway import LocalGateway
from devtools.signing import sign_webhook
from devtools.stack import DATASTREAM_ID, LocalStack
from relayctl.__main__ import _replay_plan

pytestmark = pytest.mark.integration

INVALID_EVENT_TYPE = "https://github.com/interact-relay/errors/invalid-event"
AS_RECEIVED = (
    "(Edge's own limit), counted on the body as received: compact UTF-8 JSON (no indentation, no \\u escapes for "
    "other scripts) is smaller"
)
PROBLEM = "application/problem+json"
UNAUTHORIZED = {
    "type": "about:blank",
    "title": "Unauthorized",
    "status": 401,
    "detail": "missing or invalid webhook signature",
}


@pytest.fixture
def gateway(clean_stack: LocalStack) -> Iterator[LocalGateway]:
    """The gateway in front of a fresh execution environment of the function."""
    runtime = Runtime(load_settings(os.environ))
    yield clean_stack.gateway(runtime.handle)


def interact_event(event_id: str | None = None) -> dict[str, Any]:
    xdm: dict[str, Any] = {
        "eventType": "commerce.purchases",
        "identityMap": {"ECID": [{"id": new_ecid(), "primary": True}]},
        "timestamp": "2026-01-01T00:00:00.000Z",
    }
    if event_id is not None:
        xdm["_id"] = event_id
    return {"event": {"xdm": xdm}}


def post(gw: LocalGateway, body: str, headers: dict[str, str], query: str = "") -> requests.Response:
    return requests.post(
        f"{gw.url}/events{query}",
        data=body.encode("utf-8"),
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )


def post_rejected_by_edge(stack: LocalStack, gw: LocalGateway, status: int) -> tuple[str, str, requests.Response]:
    """Post a signed event that Edge answers with `status`: its eventId, its body and the relay's answer."""
    event_id = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=event_id, status=status)
    body = json.dumps(interact_event(event_id))
    return event_id, body, post(gw, body, stack.sign(body))


def edge_requests(stack: LocalStack, event_id: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in stack.sim.requests_log()
        if r["path"].endswith("/interact") and (event_id is None or r["xdm_id"] == event_id)
    ]


def assert_problem(stack: LocalStack, resp: requests.Response, status: int, body: dict[str, Any]) -> None:
    """A problem+json answer with exactly `body`, and nothing secret or internal in it."""
    assert (resp.status_code, resp.headers["content-type"], resp.json()) == (status, PROBLEM, body)
    text = resp.text
    secrets = [*stack.webhook_secrets, *(s.removeprefix("whsec_") for s in stack.webhook_secrets)]
    secrets += [stack.sim.client_secret]
    for secret in secrets:
        assert secret not in text
    for marker in ("Traceback", 'File "', "Bearer", "botocore", "/relay/"):
        assert marker not in text


def delivered(stack: LocalStack, resp: requests.Response, event_id: str) -> dict[str, Any]:
    """Assert a 200 delivered answer for `event_id` that matches the stored item; return the body."""
    assert (resp.status_code, resp.headers["content-type"]) == (200, "application/json")
    body = resp.json()
    item = stack.result_item(event_id)
    assert item is not None
    assert (item["status"], item["source"]) == ("delivered", "webhook")
    assert body == {"eventId": event_id, "requestId": item["requestId"], "handle": item["handle"]}
    [call] = edge_requests(stack, event_id)
    assert call["request_id"] == item["requestId"]
    return body


# ---------------------------------------------------------------------------------------------------------- 200


def test_signed_event_is_delivered_and_answered_200(clean_stack: LocalStack, gateway: LocalGateway) -> None:
    stack = clean_stack
    # GIVEN a signed event without xdm._id (the webhook-id becomes the eventId)
    doc = interact_event()
    body = json.dumps(doc)
    headers = stack.sign(body)
    event_id = headers["webhook-id"]

    # WHEN it is posted
    resp = post(gateway, body, headers)

    # THEN 200 with the stored result
    answer = delivered(stack, resp, event_id)
    assert [h["type"] for h in answer["handle"]] == ["locationHint:result", "state:store"]
    # AND Edge got the event with xdm._id = webhook-id, on the default datastream, with the Edge headers
    [call] = edge_requests(stack, event_id)
    assert call["body"] == {"event": {"xdm": {**doc["event"]["xdm"], "_id": event_id}}}
    assert call["query"]["datastreamId"] == DATASTREAM_ID
    assert call["headers"]["authorization"].startswith("Bearer ")
    assert (call["headers"]["x-api-key"], call["headers"]["x-gw-ims-org-id"]) == (stack.sim.client_id, stack.sim.org_id)
    item = stack.result(event_id)
    assert (item["datastreamId"], item["eventId"], item["attempts"]) == (DATASTREAM_ID, event_id, 1)


def test_a_body_starting_with_a_byte_order_mark_is_delivered(clean_stack: LocalStack, gateway: LocalGateway) -> None:
    stack = clean_stack
    # GIVEN a signed event whose body starts with a UTF-8 byte-order mark (as some senders' writers add)
    doc = interact_event(f"evt-{uuid.uuid4()}")
    body = "\ufeff" + json.dumps(doc)

    # WHEN it is posted
    resp = post(gateway, body, stack.sign(body))

    # THEN it is delivered, and Edge got the event itself
    delivered(stack, resp, doc["event"]["xdm"]["_id"])
    [call] = edge_requests(stack, doc["event"]["xdm"]["_id"])
    assert call["body"] == doc


def test_a_correctly_signed_body_that_is_not_utf8_is_answered_400_and_stored_rejected(
    clean_stack: LocalStack, gateway: LocalGateway
) -> None:
    stack = clean_stack
    # GIVEN a Latin-1 body (é as one byte) sent as binary, so that API Gateway passes its bytes on (base64), signed
    # over those bytes as the standard defines (computed here apart from the library, which signs only text)
    body = '{"event": {"xdm": {"eventType": "commerce.purchases", "note": "caf\u00e9"}}}'.encode("latin-1")
    msg_id, ts = f"msg_{uuid.uuid4().hex}", int(time.time())
    key = base64.b64decode(stack.webhook_secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        "content-type": "application/octet-stream",
    }

    # WHEN it is posted
    resp = requests.post(f"{gateway.url}/events", data=body, headers=headers, timeout=30)

    # THEN not 401 (its signature is right) but the 400 of a body that is not JSON, naming the byte; no Edge call;
    # and the rejection is kept under its webhook-id, with the reason
    at = body.index("é".encode("latin-1"))
    errors = [{"path": "$", "message": f"body is not UTF-8 (byte {at})"}]
    assert resp.status_code == 400, resp.text
    assert (resp.json()["eventId"], resp.json()["errors"]) == (msg_id, errors)
    assert edge_requests(stack) == []
    item = stack.result_item(msg_id)
    assert item is not None
    assert (item["status"], item["error"]["errors"]) == ("rejected", errors)


def test_repeat_of_a_delivered_webhook_id_answers_the_same_body_without_calling_edge(
    clean_stack: LocalStack, gateway: LocalGateway
) -> None:
    stack = clean_stack
    # GIVEN an event delivered once
    body = json.dumps(interact_event())
    headers = stack.sign(body)
    first = post(gateway, body, headers)
    assert first.status_code == 200

    # WHEN the sender retries it (same webhook-id, re-signed later)
    time.sleep(1)
    second = post(gateway, body, stack.sign(body, msg_id=headers["webhook-id"]))

    # THEN the same 200 body, and Edge was called once
    assert (second.status_code, second.json()) == (200, first.json())
    assert len(edge_requests(stack, headers["webhook-id"])) == 1
    assert stack.result(headers["webhook-id"])["attempts"] == 1


def test_second_rotated_secret_is_accepted(clean_stack: LocalStack, gateway: LocalGateway) -> None:
    stack = clean_stack
    # GIVEN the second secret listed in the webhook secret (read back from Secrets Manager)
    value = stack.secretsmanager.get_secret_value(SecretId=stack.resources.webhook_secret_id)["SecretString"]
    secrets = json.loads(value)["secrets"]
    assert len(secrets) == 2 and secrets == stack.webhook_secrets
    body = json.dumps(interact_event())
    headers = sign_webhook(body, secrets[1])

    # WHEN an event signed only with it is posted
    resp = post(gateway, body, headers)

    # THEN it is delivered
    delivered(stack, resp, headers["webhook-id"])


def test_a_signature_sent_as_two_header_lines_is_verified(clean_stack: LocalStack, gateway: LocalGateway) -> None:
    stack = clean_stack
    # GIVEN an event signed with the current secret, and a sender (or a proxy) that puts a signature made with a
    # secret the relay does not hold on one `webhook-signature` line, and the valid one on a second line
    body = json.dumps(interact_event())
    headers = stack.sign(body)
    stale = sign_webhook(
        body,
        "whsec_" + base64.b64encode(b"a secret rotated out long ago!!!").decode(),
        msg_id=headers["webhook-id"],
        timestamp=int(headers["webhook-timestamp"]),
    )

    # WHEN it is posted (API Gateway hands the function the two lines joined by a comma)
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/events")
    for name, value in [
        ("content-type", "application/json"),
        ("content-length", str(len(body.encode()))),
        ("webhook-id", headers["webhook-id"]),
        ("webhook-timestamp", headers["webhook-timestamp"]),
        ("webhook-signature", stale["webhook-signature"]),
        ("webhook-signature", headers["webhook-signature"]),
    ]:
        conn.putheader(name, value)
    conn.endheaders(body.encode())
    answer = conn.getresponse()

    # THEN it is delivered, once
    assert answer.status == 200, answer.read()
    assert json.loads(answer.read())["eventId"] == headers["webhook-id"]
    conn.close()
    assert stack.result(headers["webhook-id"])["status"] == "delivered"
    assert len(edge_requests(stack, headers["webhook-id"])) == 1


def test_datastream_query_parameter_is_used(clean_stack: LocalStack, gateway: LocalGateway) -> None:
    stack = clean_stack
    # GIVEN a second datastream known to Edge
    stack.sim.datastreams.add("ds-second")
    try:
        body = json.dumps(interact_event())
        headers = stack.sign(body)

        # WHEN an event is posted with ?datastreamId=ds-second
        resp = post(gateway, body, headers, query="?datastreamId=ds-second")
    finally:
        stack.sim.datastreams.discard("ds-second")

    # THEN Edge was called on that datastream and the result says so
    delivered(stack, resp, headers["webhook-id"])
    [call] = edge_requests(stack, headers["webhook-id"])
    assert call["query"]["datastreamId"] == "ds-second"
    assert stack.result(headers["webhook-id"])["datastreamId"] == "ds-second"


def test_a_corrected_retry_after_a_bad_datastream_parameter_is_delivered(
    clean_stack: LocalStack, gateway: LocalGateway
) -> None:
    stack = clean_stack
    # GIVEN an event posted with a datastreamId query parameter that is not a datastream id (answered 400, stored)
    event_id = f"evt-{uuid.uuid4()}"
    body = json.dumps(interact_event(event_id))
    first = post(gateway, body, stack.sign(body), query="?datastreamId=ds-a,ds-b")
    assert first.status_code == 400
    assert stack.result(event_id)["status"] == "rejected"

    # WHEN the sender fixes its URL and posts the same event again
    second = post(gateway, body, stack.sign(body))

    # THEN it is delivered: the first attempt never reached Edge, so it is not a repeat to answer 400 for ever
    assert second.status_code == 200
    assert len(edge_requests(stack, event_id)) == 1
    assert stack.result(event_id)["status"] == "delivered"


# ---------------------------------------------------------------------------------------------------------- 401


def _expired(stack: LocalStack, body: str) -> dict[str, str]:
    return sign_webhook(body, stack.webhook_secret, timestamp=int(time.time()) - 360)


def _wrong_signature(stack: LocalStack, body: str) -> dict[str, str]:
    headers = stack.sign(body)
    return {**headers, "webhook-signature": sign_webhook(body + " ", stack.webhook_secret)["webhook-signature"]}


def _unknown_secret(stack: LocalStack, body: str) -> dict[str, str]:
    return sign_webhook(body, "whsec_" + "QUJD" * 8)


def _missing_signature(stack: LocalStack, body: str) -> dict[str, str]:
    headers = stack.sign(body)
    del headers["webhook-signature"]
    return headers


def _missing_all(stack: LocalStack, body: str) -> dict[str, str]:
    return {}


@pytest.mark.parametrize(
    "make_headers",
    [_wrong_signature, _unknown_secret, _expired, _missing_signature, _missing_all],
    ids=["wrong-signature", "unknown-secret", "expired-6-minutes", "missing-signature", "missing-headers"],
)
def test_unauthenticated_request_is_answered_401_and_not_relayed(
    clean_stack: LocalStack, gateway: LocalGateway, make_headers: Any
) -> None:
    stack = clean_stack
    # GIVEN an event whose signature headers are wrong, expired or missing
    event_id = f"evt-{uuid.uuid4()}"
    body = json.dumps(interact_event(event_id))
    headers = make_headers(stack, body)

    # WHEN it is posted
    resp = post(gateway, body, headers)

    # THEN 401 problem, no Edge call, nothing stored
    assert_problem(stack, resp, 401, UNAUTHORIZED)
    assert edge_requests(stack) == []
    assert stack.result_item(event_id) is None
    if "webhook-id" in headers:
        assert stack.result_item(headers["webhook-id"]) is None


# ---------------------------------------------------------------------------------------------------------- 400 / 413


@pytest.mark.parametrize("with_id", [False, True], ids=["without-xdm-id", "with-xdm-id"])
def test_body_over_64_kib_is_answered_413_and_stored_rejected(
    clean_stack: LocalStack, gateway: LocalGateway, with_id: bool
) -> None:
    stack = clean_stack
    # GIVEN a signed event of 64 KiB + 1 byte, with or without its own xdm._id
    doc = interact_event(f"big-{uuid.uuid4()}" if with_id else None)
    doc["event"]["data"] = {"pad": ""}
    doc["event"]["data"]["pad"] = "x" * (65537 - len(json.dumps(doc)))
    body = json.dumps(doc)
    assert len(body.encode()) == 65537
    headers = stack.sign(body)
    # (its eventId is its xdm._id, as for any event, even though the body is refused before it is read as an event)
    event_id = doc["event"]["xdm"]["_id"] if with_id else headers["webhook-id"]

    # WHEN it is posted
    resp = post(gateway, body, headers)

    # THEN 413, never truncated nor relayed, and stored rejected with the body as received
    errors = [{"path": "$", "message": "body is 65537 bytes; the limit is 65536 bytes " + AS_RECEIVED}]
    assert_problem(
        stack,
        resp,
        413,
        {
            "type": "about:blank",
            "title": "Payload too large",
            "status": 413,
            "detail": "the body is over Edge's 65536-byte limit; make the event smaller, or send it as compact JSON",
            "eventId": event_id,
            "errors": errors,
        },
    )
    assert edge_requests(stack) == []
    item = stack.result_item(event_id)
    assert item is not None
    assert {k: item[k] for k in ("eventId", "status", "source", "datastreamId", "error", "request")} == {
        "eventId": event_id,
        "status": "rejected",
        "source": "webhook",
        "datastreamId": DATASTREAM_ID,
        "error": {
            "type": INVALID_EVENT_TYPE,
            "title": "Payload too large",
            "status": 413,
            "detail": "the body is over Edge's 65536-byte limit; make the event smaller, or send it as compact JSON",
            "errors": errors,
        },
        "request": body,
    }


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ("not json at all", [{"path": "$", "message": "body is not JSON: Expecting value at line 1 column 1"}]),
        (
            '{"event": {"xdm": {"a": 1}}',
            [{"path": "$", "message": "body is not JSON: Expecting ',' delimiter at line 1 column 28"}],
        ),
        ("[1, 2]", [{"path": "$", "message": "must be a JSON object, not array"}]),
        ('{"query": {}}', [{"path": "event", "message": "is required"}]),
        ('{"event": {"data": {}}}', [{"path": "event.xdm", "message": "is required"}]),
        (
            json.dumps(
                {
                    "event": {
                        "xdm": {
                            "_id": 7,
                            "timestamp": 17,
                            "identityMap": {"ECID": [{"id": "", "primary": "yes"}], "Email": {}},
                        },
                        "data": [],
                    },
                    "meta": {"state": {"entries": [{"value": 1}]}},
                    "query": "all",
                }
            ),
            [
                {"path": "event.xdm._id", "message": "must be a string of 1-256 characters"},
                {
                    "path": "event.xdm.timestamp",
                    "message": "must be a date and time, as XDM's date-time (RFC 3339: 2026-01-01T00:05:00.000Z; an "
                    "offset or none)",
                },
                {"path": "event.xdm.identityMap.ECID[0].id", "message": "is required and must be a non-empty string"},
                {"path": "event.xdm.identityMap.ECID[0].primary", "message": "must be a boolean"},
                {"path": "event.xdm.identityMap.Email", "message": "must be an array of identities"},
                {"path": "event.data", "message": "must be an object, not array"},
                {"path": "query", "message": "must be an object, not string"},
                {"path": "meta.state.entries[0]", "message": "must be an object with a key"},
            ],
        ),
    ],
    ids=["not-json", "truncated-json", "json-array", "no-event", "no-xdm", "wrong-types"],
)
def test_body_that_is_not_an_event_is_answered_400_with_field_paths(
    clean_stack: LocalStack, gateway: LocalGateway, body: str, errors: list[dict[str, str]]
) -> None:
    stack = clean_stack
    # GIVEN a correctly signed body that is not an interact event
    headers = stack.sign(body)
    event_id = headers["webhook-id"]

    # WHEN it is posted
    posted_at = time.time()
    resp = post(gateway, body, headers)

    # THEN 400 naming every failing field, no Edge call, stored rejected with the body as received
    assert_problem(
        stack,
        resp,
        400,
        {
            "type": "about:blank",
            "title": "Invalid event",
            "status": 400,
            "detail": "the body is not a valid interact event",
            "eventId": event_id,
            "errors": errors,
        },
    )
    assert edge_requests(stack) == []
    item = stack.result_item(event_id)
    assert item is not None
    assert (item["status"], item["error"], item["request"]) == (
        "rejected",
        {"type": INVALID_EVENT_TYPE, "title": "Invalid event", "status": 400, "errors": errors},
        body,
    )
    # with when it came (a replay of a refused body that gave no `xdm.timestamp` is sent with that time)
    received = datetime.fromisoformat(item["receivedAt"]).timestamp()
    assert posted_at - 1 <= received <= time.time(), (received, posted_at)


def test_a_body_with_a_key_twice_is_answered_400_naming_it_and_kept_under_its_id(
    clean_stack: LocalStack, gateway: LocalGateway
) -> None:
    stack = clean_stack
    # GIVEN a signed event with two identityMaps: a sender-side check that kept the first saw one person, Python's
    # parser would keep the other
    event_id = f"evt-{uuid.uuid4()}"
    alice = '"identityMap": {"Email": [{"id": "alice@example.com", "primary": true}]}'
    mallory = '"identityMap": {"Email": [{"id": "mallory@example.com", "primary": true}]}'
    body = '{"event": {"xdm": {"_id": "' + event_id + '", ' + alice + ", " + mallory + "}}}"

    # WHEN it is posted
    resp = post(gateway, body, stack.sign(body))

    # THEN 400 naming the repeated key (never an identity), no Edge call, stored rejected under its xdm._id
    errors = [{"path": "event.xdm.identityMap", "message": "appears more than once in its object"}]
    assert resp.status_code == 400
    assert (resp.json()["eventId"], resp.json()["errors"]) == (event_id, errors)
    assert "example.com" not in resp.text
    assert edge_requests(stack) == []
    item = stack.result_item(event_id)
    assert item is not None and (item["status"], item["error"]["errors"], item["request"]) == ("rejected", errors, body)


# ---------------------------------------------------------------------------------------------------------- Edge errors


@pytest.mark.parametrize(
    ("edge_status", "answer", "code", "title", "detail"),
    [
        (
            422,
            422,
            "EXEG-0104-422",
            "Unprocessable entity",
            "Invalid request (report attached). Please check your request and try again.",
        ),
        (400, 422, "EXEG-0102-400", "Invalid request", "The request failed validation."),
        (
            500,
            502,
            "EXEG-0001-500",
            "Request processing error",
            "An unexpected error occurred while processing the request. Do not retry this request.",
        ),
    ],
    ids=["edge-422-is-422", "edge-400-is-422", "edge-500-is-502"],
)
def test_edge_rejection_is_answered_with_edges_problem_and_not_retried(
    clean_stack: LocalStack, gateway: LocalGateway, edge_status: int, answer: int, code: str, title: str, detail: str
) -> None:
    stack = clean_stack
    # GIVEN Edge rejects this event
    event_id = f"evt-{uuid.uuid4()}"
    doc = interact_event(event_id)
    stack.sim.add_fault(match_id=event_id, status=edge_status)
    body = json.dumps(doc)

    # WHEN it is posted
    resp = post(gateway, body, stack.sign(body))

    # THEN the answer carries Edge's type/title/detail
    assert_problem(
        stack,
        resp,
        answer,
        {
            "type": ERROR_TYPE_BASE + code,
            "title": title,
            "status": answer,
            "detail": detail,
            "edgeStatus": edge_status,
            "eventId": event_id,
        },
    )
    # AND Edge was called exactly once (never retried)
    [call] = edge_requests(stack, event_id)
    assert call["status"] == edge_status
    # AND the event is stored rejected with Edge's problem and the request, so it can be replayed
    item = stack.result_item(event_id)
    assert item is not None
    problem: dict[str, Any] = {"type": ERROR_TYPE_BASE + code, "status": edge_status, "title": title, "detail": detail}
    report: dict[str, Any] = {"requestId": call["request_id"]}
    if edge_status == 422:
        report["orgId"] = stack.sim.org_id
    if code in VALIDATION_CODES:  # a validation refusal's report lists what failed (reference §3.2)
        report["errors"] = list(INJECTED_VALIDATION_ERRORS)
    problem["report"] = report
    assert {k: item[k] for k in ("eventId", "status", "source", "requestId", "error", "request")} == {
        "eventId": event_id,
        "status": "rejected",
        "source": "webhook",
        "requestId": call["request_id"],
        "error": problem,
        "request": doc,
    }


def test_an_invalid_resend_never_replaces_edges_rejection_and_is_kept_beside_it(
    clean_stack: LocalStack, gateway: LocalGateway
) -> None:
    stack = clean_stack
    # GIVEN an event Edge answered 500 (stored rejected, to be replayed once Edge is fixed)
    event_id, _, first = post_rejected_by_edge(stack, gateway, 500)
    assert first.status_code == 502
    before = stack.result_item(event_id)

    # WHEN an invalid body is sent under the same eventId
    bad = json.dumps({"event": {"xdm": {"_id": event_id, "timestamp": 5}}})
    resp = post(gateway, bad, stack.sign(bad))

    # THEN it gets its 400, naming where its rejection is kept: beside Edge's, which is unchanged and still replayable
    assert resp.status_code == 400
    filed_as = resp.json()["eventId"]
    assert filed_as.startswith(f"{event_id}#invalid-")
    assert stack.result_item(event_id) == before
    assert _replay_plan(before) is None
    kept = stack.result_item(filed_as)
    assert kept is not None
    assert (kept["status"], kept["rejectedBy"], kept["request"]) == ("rejected", "relay", bad)
    # AND sent again, it lands on the same item
    assert post(gateway, bad, stack.sign(bad)).json()["eventId"] == filed_as


def test_edge_500_with_a_problem_body_that_gives_no_status_is_answered_502(
    clean_stack: LocalStack, gateway: LocalGateway
) -> None:
    stack = clean_stack
    # GIVEN Edge answers 500 with a problem body that has a type and a title but no status
    event_id = f"evt-{uuid.uuid4()}"
    edge_problem = {"type": ERROR_TYPE_BASE + "EXEG-0001-500", "title": "Request processing error"}
    stack.sim.add_fault(
        match_id=event_id, status=500, body=json.dumps(edge_problem), content_type="application/problem+json"
    )
    body = json.dumps(interact_event(event_id))

    # WHEN it is posted
    resp = post(gateway, body, stack.sign(body))

    # THEN the HTTP status decides: Edge failed (502), not the event (422), and the stored problem says 500
    assert_problem(
        stack,
        resp,
        502,
        {**edge_problem, "status": 502, "detail": "", "edgeStatus": 500, "eventId": event_id},
    )
    assert stack.result(event_id)["error"] == {**edge_problem, "status": 500}


def test_edge_answer_cut_off_mid_body_is_delivered_once_not_sent_again(
    clean_stack: LocalStack, gateway: LocalGateway
) -> None:
    stack = clean_stack
    # GIVEN Edge's first answer to this event is a 200 whose connection closes halfway through the body
    event_id = f"evt-{uuid.uuid4()}"
    stack.sim.add_fault(match_id=event_id, truncate=True, times=1)
    body = json.dumps(interact_event(event_id))

    # WHEN it is posted
    resp = post(gateway, body, stack.sign(body))

    # THEN Edge took the event (its 200 arrived), so it is not sent again, as Adobe's SDKs never send an event again
    # once its 2xx arrived (a second call would be a second hit); it is delivered without handles, said unreadable
    assert resp.status_code == 200
    assert [c["xdm_id"] for c in edge_requests(stack, event_id)] == [event_id]
    item = stack.result(event_id)
    assert (item["status"], item["attempts"], item["answerUnreadable"]) == ("delivered", 1, True)
    assert resp.json()["requestId"] is None and resp.json()["handle"] == []


def test_repeat_of_a_rejected_event_answers_the_same_problem_without_calling_edge(
    clean_stack: LocalStack, gateway: LocalGateway
) -> None:
    stack = clean_stack
    # GIVEN an event Edge rejected with 422
    event_id, body, first = post_rejected_by_edge(stack, gateway, 422)
    assert first.status_code == 422

    # WHEN the sender retries it after Edge stopped rejecting
    stack.sim.clear_faults()
    second = post(gateway, body, stack.sign(body))

    # THEN the same problem, and still one Edge call
    assert_problem(stack, second, 422, first.json())
    assert len(edge_requests(stack, event_id)) == 1


def test_an_eventid_reused_for_another_person_gets_422_and_never_that_persons_answer(
    clean_stack: LocalStack, gateway: LocalGateway
) -> None:
    stack = clean_stack
    # GIVEN an event delivered for one person, whose answer holds that person's ECID
    event_id = f"order-{uuid.uuid4()}"
    first_body = json.dumps(interact_event(event_id))
    first = post(gateway, first_body, stack.sign(first_body))
    assert first.status_code == 200 and first.json()["handle"]

    # WHEN the sender posts another person's event under the same xdm._id
    other = interact_event(event_id)
    other_body = json.dumps(other)
    second = post(gateway, other_body, stack.sign(other_body))

    # THEN 422 naming the field, under the id it was filed as, with nothing of the first answer; Edge was called once
    problem = second.json()
    filed_as = problem["eventId"]
    assert filed_as.startswith(f"{event_id}#reused-")
    assert_problem(
        stack,
        second,
        422,
        {
            "type": "https://github.com/interact-relay/errors/invalid-event",
            "title": "Event id already used",
            "status": 422,
            "detail": "this eventId was already used for a different event; give every event its own xdm._id",
            "eventId": filed_as,
            "errors": [
                {
                    "path": "event.xdm._id",
                    "message": "already the eventId of an event relayed for another identity or datastream; "
                    "not sent to Edge",
                }
            ],
        },
    )
    assert len(edge_requests(stack, event_id)) == 1
    # AND it is kept, rejected, with its own request (to send again under an id of its own); the first is untouched
    stored = stack.result(filed_as)
    assert (stored["status"], stored["rejectedBy"], stored["request"]["event"]["xdm"]["identityMap"]) == (
        "rejected",
        "relay",
        other["event"]["xdm"]["identityMap"],
    )
    assert stack.result(event_id)["handle"] == first.json()["handle"]
