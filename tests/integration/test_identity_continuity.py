"""Identity continuity over real HTTP (issue 3; contract §6, §9): the relay keeps each visitor's Edge `state:store`
entries and location hint in DynamoDB (moto server) and sends them back to the Edge simulator like Adobe's SDKs do.

Nothing is patched: events arrive through the SQS poller's record format or the local HTTP API gateway, the relay
talks to moto and the simulator on loopback. Where time matters the relay runs on a `FakeClock` (advanced between
events); the simulator keeps real time, which only its IMS tokens use.
"""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from relay import codec
from relay.identity_state import opaque_identity_id
from relay.runtime import Runtime
from relay.settings import load_settings

from devtools.edge_sim import FIXTURE_DIR, IDENTITY_MAX_AGE, decode_identity_state, org_cookie_prefix
from devtools.fault_proxy import FaultProxy
from devtools.stack import DATASTREAM_ID, LocalStack
from tests.fakes import FakeClock

pytestmark = pytest.mark.integration

PREFIX = org_cookie_prefix("5BFE274A5F6980A50A495C08@AdobeOrg")
IDENTITY_KEY = PREFIX + "_identity"
CLUSTER_KEY = PREFIX + "_cluster"
HINT_TTL = 1800
UNHINTED = "/ee/v2/interact"
OR2 = "/ee/or2/v2/interact"
VA6 = "/ee/va6/v2/interact"
T0 = 1_750_000_000.0  # the relay's fake wall clock starts here (a whole second)


# ---------------------------------------------------------------------------------------------------- helpers

RuntimeFactory = Callable[..., Runtime]


@pytest.fixture
def new_runtime(stack: LocalStack) -> Iterator[RuntimeFactory]:
    """`new_runtime(clock=None)`: a fresh handler instance (a cold start); its pool and session are closed after."""
    made: list[Runtime] = []

    def make(clock: Any = None) -> Runtime:
        runtime = Runtime(load_settings(os.environ), clock=clock)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        if "executor" in runtime.__dict__:
            runtime.executor.shutdown(wait=True)
        if "session" in runtime.__dict__:
            runtime.session.close()


def crm_event(crm_id: str, event_id: str, *, entries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An interact request whose primary identity is a CRMID, asking Edge for the ECID."""
    body: dict[str, Any] = {
        "event": {
            "xdm": {
                "_id": event_id,
                "eventType": "web.webpagedetails.pageViews",
                "identityMap": {"CRMID": [{"id": crm_id, "authenticatedState": "authenticated", "primary": True}]},
            }
        },
        "query": {"identity": {"fetch": ["ECID"]}},
    }
    if entries is not None:
        body["meta"] = {"state": {"entries": entries}}
    return body


def new_ids(prefix: str, n: int) -> tuple[str, list[str]]:
    """A unique CRM id (never seen by the simulator) and n unique event ids."""
    tag = uuid.uuid4().hex[:12]
    return f"crm-{prefix}-{tag}", [f"evt-{prefix}-{tag}-{i}" for i in range(1, n + 1)]


def via_sqs(stack: LocalStack, runtime: Runtime, *bodies: dict[str, Any]) -> dict[str, Any]:
    """Send `bodies` to the events queue (in this order) and have the SQS poller hand them, as one batch, to
    `runtime.handle`. Returns the batch's outcome; fails unless every record went into that one batch, in order."""
    sent = [
        stack.sqs.send_message(QueueUrl=stack.resources.queue_url, MessageBody=json.dumps(b))["MessageId"]
        for b in bodies
    ]
    poller = stack.poller(runtime.handle, batching_window=0)
    assert poller.poll_once(wait_time_seconds=0) == len(bodies)
    outcome = poller.history[-1]
    assert outcome.message_ids == sent, "the poller's batch holds every record in send order"
    assert outcome.failed == [] and outcome.error is None
    return {"failed": outcome.failed, "deleted": outcome.deleted}


def via_webhook(stack: LocalStack, runtime: Runtime, body: dict[str, Any]) -> dict[str, Any]:
    """POST a signed body to the local HTTP API gateway in front of `runtime.handle`; the 200 answer's JSON."""
    gateway = stack.gateway(runtime.handle)
    raw = json.dumps(body)
    resp = requests.post(
        f"{gateway.url}/events",
        data=raw.encode(),
        headers={**stack.sign(raw), "content-type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def edge_requests(stack: LocalStack, *event_ids: str) -> list[dict[str, Any]]:
    """The simulator's log entries of `interact` calls for these events, oldest first."""
    wanted = set(event_ids)
    return [r for r in stack.sim.requests_log() if r["path"].endswith("/interact") and r["xdm_id"] in wanted]


def request_of(stack: LocalStack, event_id: str) -> dict[str, Any]:
    [entry] = edge_requests(stack, event_id)
    return entry


def sent_entries(log_entry: dict[str, Any]) -> list[dict[str, Any]]:
    """`meta.state.entries` of a logged request ([] when absent)."""
    return list(((log_entry["body"] or {}).get("meta") or {}).get("state", {}).get("entries") or [])


def sent_values(log_entry: dict[str, Any]) -> dict[str, str]:
    entries = sent_entries(log_entry)
    keys = [e["key"] for e in entries]
    assert len(keys) == len(set(keys)), f"each key is sent once: {keys}"
    return {e["key"]: e["value"] for e in entries}


def handle_payload(handles: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    [handle] = [h for h in handles if h["type"] == kind]
    return list(handle["payload"])


def stored_ecid(stack: LocalStack, event_id: str) -> str:
    item = result(stack, event_id)
    assert item["status"] == "delivered", item
    [identity] = handle_payload(item["handle"], "identity:result")
    return str(identity["id"])


def result(stack: LocalStack, event_id: str) -> dict[str, Any]:
    item = stack.result_item(event_id)
    assert item is not None, f"no result stored for {event_id}"
    return item


def state_item(stack: LocalStack, crm_id: str) -> dict[str, Any]:
    """The identity-state item of a CRMID on the local datastream, with `state` decoded."""
    resp = stack.dynamodb.get_item(
        TableName=stack.resources.table_name,
        Key={"pk": {"S": f"IDENTITY#{stack.identity_id('CRMID', crm_id)}"}, "sk": {"S": f"STATE#{DATASTREAM_ID}"}},
        ConsistentRead=True,
    )
    item = resp.get("Item")
    assert item, "no identity-state item"
    return {
        "pk": item["pk"]["S"],
        "sk": item["sk"]["S"],
        "state": codec.decode_json(item["state"]),
        "version": int(item["version"]["N"]),
        "expiresAt": int(item["expiresAt"]["N"]),
        "updatedAt": item["updatedAt"]["S"],
    }


def identity_items(stack: LocalStack) -> list[dict[str, Any]]:
    items = stack.dynamodb.scan(TableName=stack.resources.table_name, ConsistentRead=True)["Items"]
    return [i for i in items if i["pk"]["S"].startswith("IDENTITY#")]


# ---------------------------------------------------------------------------------------------------- 1. continuity


def test_three_cold_starts_keep_one_ecid_and_send_back_state_on_the_hinted_path(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a CRMID the simulator has never seen (it would mint a new random ECID for it on every state-less call)
    stack = clean_stack
    crm, (e1, e2, e3) = new_ids("continuity", 3)
    clock = FakeClock(wall=T0)

    # WHEN three events of that identity arrive, each handled by a fresh handler instance:
    #      the first and third through SQS, the second through the webhook
    via_sqs(stack, new_runtime(clock), crm_event(crm, e1))
    clock.advance(5)
    answer = via_webhook(stack, new_runtime(clock), crm_event(crm, e2))
    clock.advance(5)
    via_sqs(stack, new_runtime(clock), crm_event(crm, e3))

    # THEN all three got the same ECID, as stored with their results and as answered to the webhook caller
    ecid = stored_ecid(stack, e1)
    assert [stored_ecid(stack, e) for e in (e1, e2, e3)] == [ecid, ecid, ecid]
    assert handle_payload(answer["handle"], "identity:result") == [{"id": ecid, "namespace": {"code": "ECID"}}]
    assert [result(stack, e)["source"] for e in (e1, e2, e3)] == ["sqs", "webhook", "sqs"]
    # AND the first call went to the unhinted path without state, the next two to the hinted path
    r1, r2, r3 = edge_requests(stack, e1, e2, e3)
    assert [r["xdm_id"] for r in (r1, r2, r3)] == [e1, e2, e3]
    assert [r["path"] for r in (r1, r2, r3)] == [UNHINTED, OR2, OR2]
    assert [r["hint_mismatch"] for r in (r1, r2, r3)] == [False, False, False]
    assert "meta" not in r1["body"]
    # AND they carried the first answer's state:store entries, with their remaining lifetime as maxAge
    first_store = handle_payload(result(stack, e1)["handle"], "state:store")
    assert {e["key"]: e["value"] for e in first_store} == {
        IDENTITY_KEY: first_store[0]["value"],
        CLUSTER_KEY: "or2",
    }
    assert decode_identity_state(first_store[0]["value"]) == ecid
    assert sent_entries(r2) == [
        {"key": CLUSTER_KEY, "value": "or2", "maxAge": HINT_TTL - 5},
        {"key": IDENTITY_KEY, "value": first_store[0]["value"], "maxAge": IDENTITY_MAX_AGE - 5},
    ]
    assert sent_entries(r3) == [
        {"key": CLUSTER_KEY, "value": "or2", "maxAge": HINT_TTL - 10},
        {"key": IDENTITY_KEY, "value": first_store[0]["value"], "maxAge": IDENTITY_MAX_AGE - 10},
    ]
    # AND the simulator saw one visitor for all three calls
    assert [r["ecid"] for r in (r1, r2, r3)] == [ecid, ecid, ecid]
    assert stack.sim.visitors()[ecid]["events"] == 3


# ---------------------------------------------------------------------------------------------------- 2. expiry


def test_an_identity_issued_by_real_edge_is_kept_sent_back_and_continued(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a new CRMID whose first answer is Adobe's real captured one (its ECID, its identity and cluster entries)
    stack = clean_stack
    crm, (e1, e2) = new_ids("real-edge", 2)
    fixture = json.loads((FIXTURE_DIR / "send-event-with-identity.json").read_text())
    [fixture_identity] = handle_payload(fixture["handle"], "identity:result")
    fixture_entries = {e["key"]: e["value"] for e in handle_payload(fixture["handle"], "state:store")}
    stack.sim.add_fault(match_id=e1, fixture="send-event-with-identity.json")
    clock = FakeClock(wall=T0)
    via_sqs(stack, new_runtime(clock), crm_event(crm, e1))
    assert stored_ecid(stack, e1) == fixture_identity["id"]

    # WHEN the identity's next event arrives (another execution environment)
    clock.advance(5)
    via_sqs(stack, new_runtime(clock), crm_event(crm, e2))

    # THEN the relay sent Edge's own entries back, byte for byte, and Edge went on with that visitor: same ECID
    assert sent_values(request_of(stack, e2)) == fixture_entries
    assert stored_ecid(stack, e2) == fixture_identity["id"]


def test_entry_past_its_max_age_is_not_sent_while_the_identity_entry_still_is(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a known visitor whose last answer added `custom_short` with maxAge 60
    stack = clean_stack
    crm, (e1, e2, e3) = new_ids("maxage", 3)
    clock = FakeClock(wall=T0)
    runtime = new_runtime(clock)
    via_sqs(stack, runtime, crm_event(crm, e1))
    ecid = stored_ecid(stack, e1)
    stack.sim.queue_state_entries(ecid, [{"key": "custom_short", "value": "x", "maxAge": 60}])
    clock.advance(1)
    via_sqs(stack, runtime, crm_event(crm, e2))
    stack.sim.clear_state_entries(ecid)
    assert state_item(stack, crm)["state"]["entries"]["custom_short"] == {
        "value": "x",
        "expiresAt": int(T0) + 1 + 60,
        "maxAge": 60,
    }

    # WHEN 61 s pass and the next event comes
    clock.advance(61)
    via_sqs(stack, runtime, crm_event(crm, e3))

    # THEN the expired entry is not sent, the identity (and cluster) entries are
    identity_value = sent_values(request_of(stack, e2))[IDENTITY_KEY]
    assert sent_values(request_of(stack, e3)) == {IDENTITY_KEY: identity_value, CLUSTER_KEY: "or2"}
    assert stored_ecid(stack, e3) == ecid


def test_a_session_entry_is_sent_back_without_max_age_while_the_identity_is_active(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a known visitor whose answer carried an entry without maxAge (Adobe: "stored only for the current
    # session"; its example sends `..._personalization_sessionId` back)
    stack = clean_stack
    crm, (e1, e2, e3, e4) = new_ids("session", 4)
    clock = FakeClock(wall=T0)
    runtime = new_runtime(clock)
    via_sqs(stack, runtime, crm_event(crm, e1))
    ecid = stored_ecid(stack, e1)
    session_key = PREFIX + "_personalization_sessionId"
    stack.sim.queue_state_entries(ecid, [{"key": session_key, "value": "0a88f43e-044b-41a6-a4f3-6c2848bbc672"}])
    via_sqs(stack, runtime, crm_event(crm, e2))
    stack.sim.clear_state_entries(ecid)

    # WHEN the visitor's next events come 29 minutes apart, then one 34 minutes after the last (past the 30 minutes,
    # and the tenth of them an unwritten extension may add)
    clock.advance(29 * 60)
    via_sqs(stack, runtime, crm_event(crm, e3))
    clock.advance(34 * 60)
    via_sqs(stack, runtime, crm_event(crm, e4))

    # THEN the session entry went back with the event 29 minutes on, without a maxAge (as the Web SDK sends a session
    # cookie), and no longer once more than half an hour passed without an answer
    assert {"key": session_key, "value": "0a88f43e-044b-41a6-a4f3-6c2848bbc672"} in sent_entries(request_of(stack, e3))
    assert session_key not in sent_values(request_of(stack, e4))
    assert IDENTITY_KEY in sent_values(request_of(stack, e4))
    assert stored_ecid(stack, e4) == ecid


def test_max_age_zero_entry_deletes_the_key(clean_stack: LocalStack, new_runtime: RuntimeFactory) -> None:
    # GIVEN a known visitor with a stored `custom_del` entry
    stack = clean_stack
    crm, (e1, e2, e3, e4) = new_ids("delete", 4)
    clock = FakeClock(wall=T0)
    runtime = new_runtime(clock)
    via_sqs(stack, runtime, crm_event(crm, e1))
    ecid = stored_ecid(stack, e1)
    stack.sim.queue_state_entries(ecid, [{"key": "custom_del", "value": "keep-me", "maxAge": 3600}])
    via_sqs(stack, runtime, crm_event(crm, e2))
    stack.sim.clear_state_entries(ecid)
    assert sorted(state_item(stack, crm)["state"]["entries"]) == sorted([CLUSTER_KEY, IDENTITY_KEY, "custom_del"])

    # WHEN Edge answers the next event with `custom_del` at maxAge 0
    stack.sim.queue_state_entries(ecid, [{"key": "custom_del", "value": "", "maxAge": 0}])
    via_sqs(stack, runtime, crm_event(crm, e3))
    stack.sim.clear_state_entries(ecid)

    # THEN the stored state no longer has the key (it was still sent with the event that deleted it)
    assert sent_values(request_of(stack, e3))["custom_del"] == "keep-me"
    assert sorted(state_item(stack, crm)["state"]["entries"]) == sorted([CLUSTER_KEY, IDENTITY_KEY])
    # AND the event after that does not carry it
    via_sqs(stack, runtime, crm_event(crm, e4))
    assert sorted(sent_values(request_of(stack, e4))) == sorted([CLUSTER_KEY, IDENTITY_KEY])
    assert stored_ecid(stack, e4) == ecid


def test_expired_hint_sends_the_next_call_to_the_unhinted_path(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a known visitor on hint or2 (ttlSeconds 1800)
    stack = clean_stack
    crm, (e1, e2, e3) = new_ids("hint-expiry", 3)
    clock = FakeClock(wall=T0)
    runtime = new_runtime(clock)
    via_sqs(stack, runtime, crm_event(crm, e1))
    ecid = stored_ecid(stack, e1)

    # WHEN 1980 s pass (the hint and the 1800 s cluster entry lapse, with the tenth of their lifetime an extension not
    # yet written could have added) and the next event comes
    clock.advance(HINT_TTL + 180)
    via_sqs(stack, runtime, crm_event(crm, e2))

    # THEN it goes to the unhinted path, still carrying the identity entry, and keeps the ECID
    r2 = request_of(stack, e2)
    assert r2["path"] == UNHINTED
    assert sorted(sent_values(r2)) == [IDENTITY_KEY]
    assert stored_ecid(stack, e2) == ecid
    # AND that answer's hint is kept again: the event after it is routed to or2
    via_sqs(stack, runtime, crm_event(crm, e3))
    assert request_of(stack, e3)["path"] == OR2


def test_hint_is_extended_by_every_answer_that_carries_one(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a visitor whose hint was stored at T0 (until T0 + 1800) and answered again at T0 + 1000
    stack = clean_stack
    crm, (e1, e2, e3) = new_ids("hint-extend", 3)
    clock = FakeClock(wall=T0)
    runtime = new_runtime(clock)
    via_sqs(stack, runtime, crm_event(crm, e1))
    clock.advance(1000)
    via_sqs(stack, runtime, crm_event(crm, e2))
    assert state_item(stack, crm)["state"]["hintExpiresAt"] == int(T0) + 1000 + HINT_TTL

    # WHEN the next event comes at T0 + 2000, after the first hint's expiry
    clock.advance(1000)
    via_sqs(stack, runtime, crm_event(crm, e3))

    # THEN it still goes to the hinted path
    assert [r["path"] for r in edge_requests(stack, e1, e2, e3)] == [UNHINTED, OR2, OR2]


def test_an_extension_not_yet_written_still_routes_the_next_event_while_edge_keeps_the_hint(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a visitor whose hint and cluster entry were stored at T0 (until T0 + 1800), and answered again at T0 + 170,
    # which extends both at Edge to T0 + 1970 but is not written (an extension is written once a tenth has passed)
    stack = clean_stack
    crm, (e1, e2, e3, e4) = new_ids("hint-unwritten", 4)
    clock = FakeClock(wall=T0)
    runtime = new_runtime(clock)
    via_sqs(stack, runtime, crm_event(crm, e1))
    clock.advance(170)
    via_sqs(stack, runtime, crm_event(crm, e2))
    assert state_item(stack, crm)["state"]["hintExpiresAt"] == int(T0) + HINT_TTL

    # WHEN the next event comes at T0 + 1850: past the stored expiry, within Edge's
    clock.advance(1680)
    via_sqs(stack, runtime, crm_event(crm, e3))

    # THEN it still goes to the hinted path, with the cluster entry, and the hint is written again
    assert [r["path"] for r in edge_requests(stack, e1, e2, e3)] == [UNHINTED, OR2, OR2]
    assert sorted(sent_values(request_of(stack, e3))) == [CLUSTER_KEY, IDENTITY_KEY]
    assert state_item(stack, crm)["state"]["hintExpiresAt"] == int(T0) + 1850 + HINT_TTL

    # AND once even an unwritten extension would have lapsed (a tenth of 1800 s past the stored expiry), it does not
    clock.advance(HINT_TTL + 180)
    via_sqs(stack, runtime, crm_event(crm, e4))
    assert request_of(stack, e4)["path"] == UNHINTED
    assert sorted(sent_values(request_of(stack, e4))) == [IDENTITY_KEY]


def test_moved_visitor_is_routed_to_the_new_hint(clean_stack: LocalStack, new_runtime: RuntimeFactory) -> None:
    # GIVEN a known visitor on or2
    stack = clean_stack
    crm, (e1, e2, e3) = new_ids("move", 3)
    clock = FakeClock(wall=T0)
    runtime = new_runtime(clock)
    via_sqs(stack, runtime, crm_event(crm, e1))
    ecid = stored_ecid(stack, e1)

    # WHEN Edge moves the visitor to va6 (the next answer carries the new hint) and two more events come
    stack.sim.move_visitor(ecid, "va6")
    via_sqs(stack, runtime, crm_event(crm, e2))
    via_sqs(stack, runtime, crm_event(crm, e3))

    # THEN the event that learned the move still used or2, the one after it goes to /ee/va6/v2/interact
    r1, r2, r3 = edge_requests(stack, e1, e2, e3)
    assert [r["path"] for r in (r1, r2, r3)] == [UNHINTED, OR2, VA6]
    assert [r["hint_mismatch"] for r in (r1, r2, r3)] == [False, True, False]
    assert sent_values(r3)[CLUSTER_KEY] == "va6"
    stored = state_item(stack, crm)["state"]
    assert (stored["hint"], stored["hintExpiresAt"]) == ("va6", int(T0) + HINT_TTL)
    assert stored_ecid(stack, e3) == ecid


def test_caller_entries_win_over_stored_entries_with_the_same_key(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a known visitor with a stored `custom_pref` = "stored"
    stack = clean_stack
    crm, (e1, e2, e3) = new_ids("caller-wins", 3)
    clock = FakeClock(wall=T0)
    runtime = new_runtime(clock)
    via_sqs(stack, runtime, crm_event(crm, e1))
    ecid = stored_ecid(stack, e1)
    stack.sim.queue_state_entries(ecid, [{"key": "custom_pref", "value": "stored", "maxAge": 3600}])
    via_sqs(stack, runtime, crm_event(crm, e2))
    stack.sim.clear_state_entries(ecid)
    assert state_item(stack, crm)["state"]["entries"]["custom_pref"]["value"] == "stored"

    # WHEN the caller sends its own `custom_pref` in meta.state.entries
    caller_entry = {"key": "custom_pref", "value": "caller", "maxAge": 120}
    via_sqs(stack, runtime, crm_event(crm, e3, entries=[caller_entry]))

    # THEN the request carries the caller's value, once, next to the other stored entries
    entries = sent_entries(request_of(stack, e3))
    assert [e for e in entries if e["key"] == "custom_pref"] == [caller_entry]
    assert sorted(e["key"] for e in entries) == sorted([CLUSTER_KEY, IDENTITY_KEY, "custom_pref"])
    assert stored_ecid(stack, e3) == ecid


def test_a_cluster_entry_from_the_caller_routes_the_call_where_it_says(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a known visitor whose stored hint is or2
    stack = clean_stack
    crm, (e1, e2) = new_ids("caller-cluster", 2)
    runtime = new_runtime(FakeClock(wall=T0))
    via_sqs(stack, runtime, crm_event(crm, e1))

    # WHEN the caller forwards a browser's cluster entry for va6 with the next event
    via_sqs(stack, runtime, crm_event(crm, e2, entries=[{"key": CLUSTER_KEY, "value": "va6", "maxAge": 1800}]))

    # THEN the call goes to va6, where the cluster entry Edge receives says the session is (as the Web SDK routes)
    r2 = request_of(stack, e2)
    assert r2["path"] == VA6
    assert sent_values(r2)[CLUSTER_KEY] == "va6"


def test_a_host_that_refuses_hinted_paths_gets_every_event_on_the_plain_path(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a host that answers 404 on hinted paths (Adobe's server-API code says server.adobedc.net does)
    stack = clean_stack
    stack.sim.add_fault(status=404, match_path="/ee/or2/")
    crm, (e1, e2, e3) = new_ids("hint-404", 3)
    runtime = new_runtime(FakeClock(wall=T0))

    # WHEN three events of one visitor come, one after another
    for event_id in (e1, e2, e3):
        via_sqs(stack, runtime, crm_event(crm, event_id))

    # THEN all are delivered: the second tried its hint once and went on to the plain path at once, the third went
    # there directly (hinted routes paused); the hint and state are still kept and sent back
    assert [(r["xdm_id"], r["path"], r["status"]) for r in edge_requests(stack, e1, e2, e3)] == [
        (e1, UNHINTED, 200),
        (e2, OR2, 404),
        (e2, UNHINTED, 200),
        (e3, UNHINTED, 200),
    ]
    assert [result(stack, e)["status"] for e in (e1, e2, e3)] == ["delivered"] * 3
    assert sent_values(edge_requests(stack, e3)[0])[CLUSTER_KEY] == "or2"
    assert state_item(stack, crm)["state"]["hint"] == "or2"


# ---------------------------------------------------------------------------------------------------- 3. batches


def test_two_identities_interleaved_in_one_batch_keep_separate_state_in_order(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN two unknown identities and an Edge that takes 0.3 s per answer
    stack = clean_stack
    latency = 0.3
    crm_a, (a1, a2) = new_ids("batch-a", 2)
    crm_b, (b1, b2) = new_ids("batch-b", 2)
    stack.sim.set_latency(latency)
    try:
        # WHEN one SQS batch holds A1, B1, A2, B2
        via_sqs(
            stack,
            new_runtime(),
            crm_event(crm_a, a1),
            crm_event(crm_b, b1),
            crm_event(crm_a, a2),
            crm_event(crm_b, b2),
        )
    finally:
        stack.sim.set_latency(0.0)

    # THEN each identity kept its own ECID, and each second event carried only its own identity's entries
    ecid_a, ecid_b = stored_ecid(stack, a1), stored_ecid(stack, b1)
    assert ecid_a != ecid_b
    assert (stored_ecid(stack, a2), stored_ecid(stack, b2)) == (ecid_a, ecid_b)
    ra1, rb1, ra2, rb2 = (request_of(stack, e) for e in (a1, b1, a2, b2))
    assert (sent_entries(ra1), sent_entries(rb1)) == ([], [])
    assert decode_identity_state(sent_values(ra2)[IDENTITY_KEY]) == ecid_a
    assert decode_identity_state(sent_values(rb2)[IDENTITY_KEY]) == ecid_b
    assert sorted(sent_values(ra2)) == sorted(sent_values(rb2)) == sorted([CLUSTER_KEY, IDENTITY_KEY])
    assert [r["path"] for r in (ra1, rb1, ra2, rb2)] == [UNHINTED, UNHINTED, OR2, OR2]
    # AND each identity's second request reached Edge only after its first was answered (in order),
    #     while the two first requests were in flight at the same time
    log_a = [r["xdm_id"] for r in edge_requests(stack, a1, a2)]
    log_b = [r["xdm_id"] for r in edge_requests(stack, b1, b2)]
    assert (log_a, log_b) == ([a1, a2], [b1, b2])
    assert ra2["time"] - ra1["time"] >= latency
    assert rb2["time"] - rb1["time"] >= latency
    assert abs(ra1["time"] - rb1["time"]) < latency
    # AND two different state items exist, keyed by a hash that never holds the raw id
    item_a, item_b = state_item(stack, crm_a), state_item(stack, crm_b)
    assert item_a["pk"] != item_b["pk"] and item_a["state"] != item_b["state"]
    raw_items = identity_items(stack)
    assert sorted(i["pk"]["S"] for i in raw_items) == sorted([item_a["pk"], item_b["pk"]])
    for raw in raw_items:
        assert re.fullmatch(r"IDENTITY#[0-9a-f]{64}", raw["pk"]["S"])
        assert raw["sk"]["S"] == f"STATE#{DATASTREAM_ID}"
        dumped = json.dumps(raw, default=str)
        assert crm_a not in dumped and crm_b not in dumped


def test_different_identities_in_one_batch_are_relayed_concurrently(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN four unknown identities and an Edge that takes 0.5 s per answer
    stack = clean_stack
    latency = 0.5
    ids = [new_ids(f"overlap-{n}", 1) for n in range(4)]
    stack.sim.set_latency(latency)
    try:
        # WHEN one SQS batch holds one event of each
        via_sqs(stack, new_runtime(), *(crm_event(crm, events[0]) for crm, events in ids))
    finally:
        stack.sim.set_latency(0.0)

    # THEN all four reached Edge before the first of them was answered: they were in flight at once
    log = edge_requests(stack, *(events[0] for _, events in ids))
    assert sorted(r["xdm_id"] for r in log) == sorted(events[0] for _, events in ids)
    arrivals = [r["time"] for r in log]
    assert max(arrivals) - min(arrivals) < latency
    assert [result(stack, events[0])["status"] for _, events in ids] == ["delivered"] * 4


# ---------------------------------------------------------------------------------------------------- 5. no identity


def test_events_without_a_primary_identity_keep_no_state_and_are_rejected(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN two events without a primary identity: no identityMap, and an identityMap with no primary entry
    stack = clean_stack
    tag = uuid.uuid4().hex[:12]
    no_map_id, no_primary_id = f"evt-nomap-{tag}", f"evt-noprimary-{tag}"
    no_map = {"event": {"xdm": {"_id": no_map_id, "eventType": "web.webpagedetails.pageViews"}}}
    no_primary = crm_event(f"crm-noprimary-{tag}", no_primary_id)
    no_primary["event"]["xdm"]["identityMap"]["CRMID"][0]["primary"] = False

    # WHEN both are relayed, one per trigger
    via_sqs(stack, new_runtime(), no_map)
    gateway = stack.gateway(new_runtime().handle)
    raw = json.dumps(no_primary)
    resp = requests.post(
        f"{gateway.url}/events",
        data=raw.encode(),
        headers={**stack.sign(raw), "content-type": "application/json"},
        timeout=30,
    )

    # THEN Edge answered EXEG-0306-400 and both are stored as rejected with that problem and the request
    assert resp.status_code == 422
    assert resp.json()["type"] == "https://ns.adobe.com/aep/errors/EXEG-0306-400"
    for event_id, body in ((no_map_id, no_map), (no_primary_id, no_primary)):
        item = result(stack, event_id)
        assert item["status"] == "rejected"
        assert item["error"]["type"] == "https://ns.adobe.com/aep/errors/EXEG-0306-400"
        assert item["error"]["status"] == 400
        assert item["request"]["event"]["xdm"]["_id"] == event_id
        assert item["request"]["event"]["xdm"].get("identityMap") == body["event"]["xdm"].get("identityMap")
        assert "meta" not in request_of(stack, event_id)["body"]
    # AND no identity-state item was written
    assert identity_items(stack) == []


def test_an_event_with_two_primary_identities_is_stored_as_edges_rejection_and_keeps_no_state(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN an event whose identityMap marks two identities primary (Edge wants exactly one)
    stack = clean_stack
    tag = uuid.uuid4().hex[:12]
    event_id = f"evt-twoprimary-{tag}"
    doc = crm_event(f"crm-twoprimary-{tag}", event_id)
    doc["event"]["xdm"]["identityMap"]["Email"] = [{"id": f"{tag}@example.com", "primary": True}]

    # WHEN it is relayed
    via_sqs(stack, new_runtime(), doc)

    # THEN Edge refused it (EXEG-0306-400), the relay stored that rejection, and wrote no state for either identity
    item = result(stack, event_id)
    assert (item["status"], item["error"]["type"]) == ("rejected", "https://ns.adobe.com/aep/errors/EXEG-0306-400")
    assert identity_items(stack) == []


# ---------------------------------------------------------------------------------------------------- state write fails


def test_a_failed_state_write_after_delivery_does_not_send_the_event_to_edge_twice(
    clean_stack: LocalStack, new_runtime: RuntimeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN DynamoDB (through a fault proxy on loopback) refuses the identity's first state write
    stack = clean_stack
    crm, (e1,) = new_ids("state-write-fails", 1)
    proxy = FaultProxy(stack.moto.url).start()
    state_key = f"IDENTITY#{stack.identity_id('CRMID', crm)}|STATE#{DATASTREAM_ID}"
    proxy.fail_item(state_key, ["validation"])  # not retried by botocore: the write fails at once
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", proxy.url)  # before the instance builds its clients
    runtime = new_runtime()
    try:
        # WHEN an event is relayed from the queue, and the queue is drained (failed records come back after 1 s)
        stack.sqs.send_message(QueueUrl=stack.resources.queue_url, MessageBody=json.dumps(crm_event(crm, e1)))
        poller = stack.poller(runtime.handle, batching_window=0)
        poller.drain(timeout=10, raise_on_timeout=True)
    finally:
        proxy.stop()

    # THEN the state write was refused, yet Edge was called once and the event is stored as delivered
    assert proxy.failed_keys() == {state_key: 1}
    assert len(edge_requests(stack, e1)) == 1
    assert result(stack, e1)["status"] == "delivered"
    assert [o.failed for o in poller.history] == [[]]


# ---------------------------------------------------------------------------------------------------- 6. TTL / writes


def test_state_item_ttl_is_the_last_entry_lapse_and_early_extensions_are_not_written(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN a new visitor's first event at T (a fractional second, so the TTL's rounding shows)
    stack = clean_stack
    crm, (e1, e2, e3, e4) = new_ids("ttl", 4)
    start = T0 + 0.25
    clock = FakeClock(wall=start)
    runtime = new_runtime(clock)

    # WHEN it is relayed
    via_sqs(stack, runtime, crm_event(crm, e1))

    # THEN the item's TTL is when its last entry (the identity, maxAge 34128000) lapses, rounded up to a second; the
    # expiries inside are kept to the millisecond
    first = state_item(stack, crm)
    assert first["version"] == 1
    assert first["expiresAt"] == math.ceil(start + IDENTITY_MAX_AGE)
    assert first["state"]["hint"] == "or2"
    assert first["state"]["hintExpiresAt"] == round(start + HINT_TTL, 3)
    assert {k: v["expiresAt"] for k, v in first["state"]["entries"].items()} == {
        IDENTITY_KEY: round(start + IDENTITY_MAX_AGE, 3),
        CLUSTER_KEY: round(start + HINT_TTL, 3),
    }

    # WHEN two more events come before a tenth of the hint's lifetime (180 s) has passed
    clock.advance(10)
    via_sqs(stack, runtime, crm_event(crm, e2))
    clock.advance(169)  # T + 179: 1621 s of the hint and the cluster entry left
    via_sqs(stack, runtime, crm_event(crm, e3))

    # THEN their answers (which only extend expiries) did not rewrite the item
    assert state_item(stack, crm) == first

    # WHEN an event comes once a tenth of the hint's lifetime has passed
    clock.advance(2)  # T + 181: 1619 s left
    via_sqs(stack, runtime, crm_event(crm, e4))

    # THEN the item is rewritten with the extended expiries and TTL
    later = state_item(stack, crm)
    now = start + 181
    assert later["version"] == 2
    assert later["expiresAt"] == math.ceil(now + IDENTITY_MAX_AGE)
    assert later["state"]["hintExpiresAt"] == round(now + HINT_TTL, 3)
    assert {k: v["expiresAt"] for k, v in later["state"]["entries"].items()} == {
        IDENTITY_KEY: round(now + IDENTITY_MAX_AGE, 3),
        CLUSTER_KEY: round(now + HINT_TTL, 3),
    }
    assert later["updatedAt"] > first["updatedAt"]
    # AND all four events kept the ECID
    assert len({stored_ecid(stack, e) for e in (e1, e2, e3, e4)}) == 1


def test_state_keys_are_keyed_hashes_that_a_guessed_identity_cannot_find(
    clean_stack: LocalStack, new_runtime: RuntimeFactory
) -> None:
    # GIVEN the stack's identity key (generated from the template's IdentityKeySecret, read back from the emulator)
    stack = clean_stack
    assert stack.identity_key is not None and len(stack.identity_key) == 64
    crm, (e1,) = new_ids("keyed", 1)

    # WHEN an event of that identity is relayed
    via_sqs(stack, new_runtime(FakeClock(wall=T0)), crm_event(crm, e1))

    # THEN its state is kept under the HMAC of the identity, and nothing under the plain SHA-256 anyone could compute
    keys = {item["pk"]["S"] for item in stack.dynamodb.scan(TableName=stack.resources.table_name)["Items"]}
    assert f"IDENTITY#{stack.identity_id('CRMID', crm)}" in keys
    assert f"IDENTITY#{opaque_identity_id('CRMID', crm)}" not in keys
    assert result(stack, e1)["identityId"] == stack.identity_id("CRMID", crm)
