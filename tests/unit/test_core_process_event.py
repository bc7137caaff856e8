"""relay.process_event: with_state and Relay.process (claim → identity state → Edge → store) on fakes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from relay.clock import Deadline
from relay.errors import CredentialsError, EdgeRejected, EdgeUnavailable, InvalidEvent, StoreUnavailable
from relay.identity_state import IdentityState, StoredEntry, opaque_identity_id
from relay.integrations.edge import EdgeAnswer
from relay.integrations.ims import NoTimeLeft
from relay.integrations.store import Claim, ResultWrite
from relay.models import MAX_BODY_BYTES, InboundEvent, as_dict, as_list, build_inbound
from relay.process_event import INVALID_EVENT_TYPE, Outcome, Relay, Result, edge_status_of, with_state

from devtools.edge_sim import FIXTURE_DIR
from tests.fakes import WALL_START, FakeClock, FakeEdge, FakeStore
from tests.unit.conftest import StoreOnMoto

FIXTURE_BODY = json.loads((FIXTURE_DIR / "send-event-with-identity.json").read_text())  # Adobe's, kept in the repo
NOW = WALL_START
DS = "ds-1"
OPAQUE = opaque_identity_id("FPID", "fp-1")
CLUSTER_KEY = "kndctr_5BFE274A5F6980A50A495C08_AdobeOrg_cluster"
IDENTITY_KEY = "kndctr_5BFE274A5F6980A50A495C08_AdobeOrg_identity"


def inbound(*, identity: bool = True, meta: dict[str, Any] | None = None) -> InboundEvent:
    xdm: dict[str, Any] = {"eventType": "web.webpagedetails.pageViews"}
    if identity:
        xdm["identityMap"] = {"FPID": [{"id": "fp-1", "primary": True}]}
    doc: dict[str, Any] = {"event": {"xdm": xdm}}
    if meta is not None:
        doc["meta"] = meta
    return build_inbound(doc, event_id="evt-1", datastream_id=DS, source="sqs", received_at=NOW)


def relay(store: FakeStore, edge: FakeEdge, clock: FakeClock) -> Relay:
    return Relay(store, edge, clock)  # type: ignore[arg-type]


def process(store: FakeStore, edge: FakeEdge, clock: FakeClock, event: InboundEvent | None = None) -> Result:
    return relay(store, edge, clock).process(event or inbound(), Deadline(clock, 10), lease_s=30)


def sized(event: InboundEvent, slack: int) -> InboundEvent:
    """`event` with `event.data` padded so that its request, encoded compactly, is `slack` bytes under Edge's limit
    (over it when `slack` is negative)."""
    pad = MAX_BODY_BYTES - len(json.dumps(event.request, separators=(",", ":"))) - slack
    return replace(event, request={**event.request, "event": {**event.request["event"], "data": {"p": "x" * pad}}})


# -- with_state ----------------------------------------------------------------------------------------------------


def test_with_state_without_entries_returns_the_request_unchanged():
    # GIVEN
    request = {"event": {"xdm": {}}, "meta": {"konductorConfig": {"a": 1}}}

    # WHEN
    out = with_state(request, IdentityState(), NOW)

    # THEN
    assert out is request


def test_with_state_adds_live_entries_and_keeps_other_meta():
    # GIVEN
    request = {"event": {"xdm": {}}, "meta": {"state": {"domain": "example.com"}, "other": 1}}
    state = IdentityState(
        entries={"live": StoredEntry("v", NOW + 60, 100), "gone": StoredEntry("x", NOW, 100)},
    )

    # WHEN
    out = with_state(request, state, NOW)

    # THEN
    assert out == {
        "event": {"xdm": {}},
        "meta": {
            "state": {"domain": "example.com", "entries": [{"key": "live", "value": "v", "maxAge": 60}]},
            "other": 1,
        },
    }
    assert request == {"event": {"xdm": {}}, "meta": {"state": {"domain": "example.com"}, "other": 1}}


def test_with_state_caller_entries_win_by_key():
    # GIVEN
    request = {"event": {"xdm": {}}, "meta": {"state": {"entries": [{"key": "k", "value": "caller"}]}}}
    state = IdentityState(entries={"k": StoredEntry("stored", NOW + 60, 100), "j": StoredEntry("j", NOW + 60, 100)})

    # WHEN
    out = with_state(request, state, NOW)

    # THEN
    assert out["meta"]["state"]["entries"] == [
        {"key": "j", "value": "j", "maxAge": 60},
        {"key": "k", "value": "caller"},
    ]


def test_edge_status_of_defaults_to_400():
    # WHEN / THEN
    assert edge_status_of({"error": {"status": 500}}) == 500
    assert edge_status_of({"error": {"status": "500"}}) == 400
    assert edge_status_of({}) == 400


# -- Relay.process -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["delivered", "rejected"])
def test_process_duplicate_of_a_finished_event_does_not_call_edge(status):
    # GIVEN
    existing = {"eventId": "evt-1", "status": status, "handle": []}
    store = FakeStore(claim_result=Claim(False, existing=existing))
    edge = FakeEdge()

    # WHEN
    result = process(store, edge, FakeClock())

    # THEN
    assert result == Result(Outcome.DUPLICATE, "evt-1", item=existing)
    assert edge.calls == []
    assert store.finished == []
    assert store.releases == []


@pytest.mark.parametrize("existing", [{"eventId": "evt-1", "status": "pending"}, None])
def test_process_live_claim_is_busy(existing):
    # GIVEN another invocation holds the event
    store = FakeStore(claim_result=Claim(False, existing=existing))
    edge = FakeEdge()

    # WHEN
    result = process(store, edge, FakeClock())

    # THEN
    assert result == Result(Outcome.BUSY, "evt-1", reason="another invocation is processing this event")
    assert edge.calls == []
    assert store.releases == []


def test_process_claims_with_the_event_details():
    # GIVEN
    store = FakeStore()
    edge = FakeEdge(EdgeAnswer(200, {"requestId": "r", "handle": []}, 1))

    # WHEN
    process(store, edge, FakeClock())

    # THEN
    assert store.claims == [{"event_id": "evt-1", "datastream_id": DS, "source": "sqs", "lease_s": 30, "token": None}]


def test_process_store_unavailable_on_claim_is_retry_without_release(caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN a table that cannot be written (missing, throttled, an IAM gap)
    store = FakeStore(claim_result=StoreUnavailable("dynamodb update_item failed: ResourceNotFoundException"))
    edge = FakeEdge()

    # WHEN
    with caplog.at_level(logging.INFO, logger="interact-relay"):
        result = process(store, edge, FakeClock())

    # THEN the event is retried, nothing was sent or given back
    assert result == Result(Outcome.RETRY, "evt-1", reason="dynamodb update_item failed: ResourceNotFoundException")
    assert edge.calls == []
    assert store.releases == []
    # AND the operator is told why, at WARNING, with the line the runbook says to look for
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warned] == ["event will be retried"]
    assert "ResourceNotFoundException" in str(warned[0].__dict__.get("reason"))


def test_process_edge_unavailable_releases_the_claim_and_retries():
    # GIVEN
    store = FakeStore()
    edge = FakeEdge(EdgeUnavailable("edge answered 503", retry_after=2.0, attempts=5))

    # WHEN
    result = process(store, edge, FakeClock())

    # THEN
    assert result == Result(Outcome.RETRY, "evt-1", reason="edge answered 503", retry_after=2.0, given_back=True)
    assert store.releases == [("evt-1", "tok-1", "edge answered 503")]
    assert store.retry_after == {"evt-1": 2.0}  # kept on the queued item, so a user can tell when it comes back
    assert store.finished == []


def test_process_credentials_error_releases_the_claim_and_retries():
    # GIVEN
    store = FakeStore()
    edge = FakeEdge(CredentialsError("IMS refused the token request (HTTP 401)"))

    # WHEN
    result = process(store, edge, FakeClock())

    # THEN
    assert result == Result(Outcome.RETRY, "evt-1", reason="IMS refused the token request (HTTP 401)", given_back=True)
    assert store.releases == [("evt-1", "tok-1", "IMS refused the token request (HTTP 401)")]
    assert store.retry_after == {"evt-1": None}


@pytest.mark.parametrize(
    ("failure", "counted"),
    [
        (CredentialsError("IMS refused the token request (HTTP 400 invalid_client)"), ["CredentialsUnavailable"]),
        (NoTimeLeft("no time left to request an IMS token"), []),  # about the event's deadline, not the credentials
        (EdgeUnavailable("edge answered 503"), []),
        (EdgeRejected(400, {"type": "https://ns.adobe.com/aep/errors/EXEG-0003-400", "status": 400}), ["EdgeRejected"]),
        (EdgeRejected(500, {"status": 500}), ["EdgeRejected"]),
    ],
)
def test_credential_failures_and_edges_refusals_are_counted_for_their_alarms(
    failure: Exception, counted: list[str], emitted: Callable[[], dict[str, list[float]]]
) -> None:
    # GIVEN an Edge call that fails for want of credentials, or that Edge refuses for good
    store = FakeStore()

    # WHEN the event is processed
    process(store, FakeEdge(failure), FakeClock())

    # THEN each is counted on its own (CredentialsUnavailableAlarm, EdgeRejectedRateAlarm): a bad client secret or a
    # deleted datastream fails every event, and would otherwise page only once the events reached the dead-letter
    # queue (the first) or never (the second: they are stored `rejected`, counted with the senders' bad bodies)
    seen = emitted()
    assert [name for name in ("CredentialsUnavailable", "EdgeRejected") if name in seen] == counted
    assert all(seen[name] == [1.0] for name in counted)


def test_the_relays_own_refusal_of_a_too_large_event_is_not_counted_as_edges(
    emitted: Callable[[], dict[str, list[float]]],
) -> None:
    # GIVEN an event over Edge's limit once the relay's additions are in it (refused without a call)
    # WHEN it is processed
    result = process(FakeStore(), FakeEdge(), FakeClock(), sized(inbound(), -10))

    # THEN it is a rejection, but not Edge's: the alarm on Edge's refusals does not see it
    assert result.outcome is Outcome.REJECTED
    assert "EdgeRejected" not in emitted() and emitted()["Rejected"] == [1.0]


def test_every_finished_event_says_whether_the_relay_itself_refused_it(
    store_on_moto: StoreOnMoto, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    # GIVEN the real store (on in-process moto), and Edge that takes one event, refuses one for good, then is down
    store, clock = store_on_moto.store, store_on_moto.clock
    edge = FakeEdge(
        EdgeAnswer(200, FIXTURE_BODY, 1),
        EdgeRejected(400, {"type": "https://ns.adobe.com/aep/errors/EXEG-0003-400", "status": 400}),
        EdgeUnavailable("edge answered 503"),
    )
    relay_ = Relay(store, edge, clock)  # type: ignore[arg-type]
    run = lambda event: relay_.process(event, Deadline(clock, 10), lease_s=30)  # noqa: E731

    def event(event_id: str, person: str) -> InboundEvent:
        doc = {"event": {"xdm": {"_id": event_id, "identityMap": {"Email": [{"id": person, "primary": True}]}}}}
        return build_inbound(doc, event_id=event_id, datastream_id=DS, source="sqs", received_at=NOW)

    # WHEN one event is delivered, one refused by Edge, one refused as too large for Edge, one reuses the delivered
    # one's eventId for another person, one body is invalid; and a repeat and an event Edge could not take
    outcomes = [
        run(event("e-delivered", "alice@example.com")).outcome,
        run(event("e-edge", "alice@example.com")).outcome,
        run(sized(event("e-large", "alice@example.com"), -10)).outcome,
        run(event("e-delivered", "bob@example.com")).outcome,
    ]
    relay_.reject_invalid(
        "e-invalid", datastream_id=DS, source="sqs", error=InvalidEvent([{"path": "event", "message": "x"}]), raw="{}"
    )
    outcomes += [run(event("e-delivered", "alice@example.com")).outcome, run(event("e-retry", "carol@x.com")).outcome]
    assert outcomes == [Outcome.DELIVERED, *[Outcome.REJECTED] * 3, Outcome.DUPLICATE, Outcome.RETRY]

    # THEN each finished event adds one value to RefusedByRelay, 1 when the relay refused it and 0 when it was
    # delivered or refused by Edge (the alarm averages it: here 3 of 5); a repeat of the delivered event, answered
    # from its result, and a retry add none
    seen = emitted()
    assert seen["RefusedByRelay"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert (seen["Delivered"], seen["Rejected"], seen["EdgeRejected"]) == ([1.0], [1.0] * 4, [1.0])


def test_process_unexpected_error_after_the_claim_releases_it_and_retries():
    # GIVEN a defect somewhere after the claim (here: in the Edge client)
    store = FakeStore()
    edge = FakeEdge(KeyError("handle"))

    # WHEN
    result = process(store, edge, FakeClock())

    # THEN the event is handed back for a retry at once, not left claimed until its lease runs out (and a webhook
    # answers 202 queued instead of a 500)
    assert result == Result(Outcome.RETRY, "evt-1", reason="unexpected error: KeyError", given_back=True)
    assert store.releases == [("evt-1", "tok-1", "unexpected error: KeyError")]
    assert store.finished == []


def test_process_release_failure_still_returns_retry():
    # GIVEN a store that cannot release
    class NoRelease(FakeStore):
        def release(self, event_id: str, token: str, reason: str, **kwargs: Any) -> None:
            raise StoreUnavailable("down")

    store = NoRelease()
    edge = FakeEdge(EdgeUnavailable("edge call failed: Timeout", attempts=1))

    # WHEN
    result = process(store, edge, FakeClock())

    # THEN
    assert result == Result(Outcome.RETRY, "evt-1", reason="edge call failed: Timeout")  # the give-back was not written


def test_process_rejected_stores_error_and_request():
    # GIVEN
    problem = {
        "type": "https://ns.adobe.com/aep/errors/EXEG-0104-422",
        "status": 422,
        "title": "Unprocessable entity",
        "detail": "Invalid request",
        "report": {"requestId": "edge-req-9"},
    }
    store = FakeStore()
    edge = FakeEdge(EdgeRejected(422, problem))
    event = inbound()

    # WHEN
    result = process(store, edge, FakeClock(), event)

    # THEN
    fields = {
        "status": "rejected",
        "datastreamId": DS,
        "source": "sqs",
        "identityId": OPAQUE,
        "requestId": "edge-req-9",
        "error": problem,
        "request": event.request,
        "defaultTimestamp": True,  # the event gave none: the relay's, which a replay carries forward
    }
    assert store.finished == [("evt-1", fields)]
    assert result == Result(
        Outcome.REJECTED,
        "evt-1",
        item={**fields, "eventId": "evt-1", "storedAt": "2023-11-14T22:13:20.000Z"},
        state=IdentityState(),  # unchanged by a rejection; a batch carries it to the identity's next record
    )
    assert store.releases == []
    assert store.state_writes == []


def test_process_delivered_stores_result_and_writes_new_state():
    # GIVEN a first event for this identity
    clock = FakeClock()
    store = FakeStore()
    body = {**FIXTURE_BODY, "warnings": [{"type": "w"}], "errors": []}
    edge = FakeEdge(EdgeAnswer(200, body, 2))

    # WHEN
    result = process(store, edge, clock)

    # THEN the event went to the default URL with the request as built
    assert [(c.datastream_id, c.request, c.hint) for c in edge.calls] == [(DS, inbound().request, None)]
    fields = {
        "status": "delivered",
        "datastreamId": DS,
        "source": "sqs",
        "identityId": OPAQUE,  # the opaque id: a repeat must be the same identity's
        "requestId": "3931ed0b-d171-45f6-9d3e-29a61113aac2-identity-test",
        "handle": FIXTURE_BODY["handle"],
        "warnings": [{"type": "w"}],
    }
    assert store.finished == [("evt-1", fields)]
    assert result.outcome is Outcome.DELIVERED
    assert result.item == {**fields, "eventId": "evt-1", "storedAt": "2023-11-14T22:13:20.000Z"}
    # and the identity state was written once, under the hashed id
    assert store.state_reads == [(OPAQUE, DS)]
    assert len(store.state_writes) == 1
    opaque, ds, state = store.state_writes[0]
    assert (opaque, ds) == (OPAQUE, DS)
    assert state.hint == "or2"
    assert state.hint_expires_at == NOW + 1800
    assert set(state.entries) == {CLUSTER_KEY, IDENTITY_KEY}
    assert state.version == 1


def test_a_cluster_entry_from_the_caller_routes_the_call_over_the_stored_hint() -> None:
    # GIVEN an identity whose stored hint is or2, and an event forwarding a browser's cluster entry for va6
    clock = FakeClock()
    store = FakeStore()
    process(store, FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1)), clock)
    edge = FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1))
    forwarded = {"state": {"entries": [{"key": CLUSTER_KEY, "value": "va6"}]}}

    # WHEN
    process(store, edge, clock, inbound(meta=forwarded))

    # THEN the call goes where the entry Edge receives says (as Adobe's Web SDK routes), not to the stored hint
    call = edge.calls[0]
    assert call.hint == "va6"
    assert {"key": CLUSTER_KEY, "value": "va6"} in call.request["meta"]["state"]["entries"]


@pytest.mark.parametrize(
    "entry",
    [
        {"key": CLUSTER_KEY, "value": "../evil.example"},  # not a plain name: never a URL part
        {"key": CLUSTER_KEY, "value": 7},
        {"key": CLUSTER_KEY, "value": "OR2"},  # Edge's hints are lower case: not one it issued
        {"key": CLUSTER_KEY, "value": "va6", "maxAge": 0},  # the caller deletes it
        {"key": "kndctr_5BFE274A5F6980A50A495C08_AdobeOrg_identity", "value": "va6"},
        {"key": "cluster", "value": "va6"},
    ],
)
def test_other_caller_entries_leave_the_route_to_the_stored_hint(entry: dict[str, Any]) -> None:
    # GIVEN an identity whose stored hint is or2, and an event with an entry that is not a usable cluster entry
    clock = FakeClock()
    store = FakeStore()
    process(store, FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1)), clock)
    edge = FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1))

    # WHEN
    process(store, edge, clock, inbound(meta={"state": {"entries": [entry]}}))

    # THEN
    assert edge.calls[0].hint == "or2"


def test_process_second_event_sends_stored_state_and_hint_and_skips_an_unneeded_write():
    # GIVEN the state from a first event, and the same answer 60 s later
    clock = FakeClock()
    store = FakeStore()
    process(store, FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1)), clock)
    clock.advance(60)
    edge = FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1))

    # WHEN
    result = process(store, edge, clock)

    # THEN the stored entries and hint went to Edge
    assert result.outcome is Outcome.DELIVERED
    call = edge.calls[0]
    assert call.hint == "or2"
    assert call.request["meta"]["state"]["entries"] == [
        {"key": CLUSTER_KEY, "value": "or2", "maxAge": 1740},
        {"key": IDENTITY_KEY, "value": "CiQ0MTg2MTY2NjE5MzE0MDE2MTkzNDI3Njg0NTY1MTE0ODg3Njk4OA==", "maxAge": 34127940},
    ]
    # and no second state write (nothing due yet)
    assert len(store.state_writes) == 1


def test_process_writes_state_again_once_a_tenth_of_the_lifetime_passed():
    # GIVEN the same answer 181 s after the first (of the 1800 s hint and cluster entry, 180 s is a tenth)
    clock = FakeClock()
    store = FakeStore()
    process(store, FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1)), clock)
    clock.advance(181)

    # WHEN
    process(store, FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1)), clock)

    # THEN
    assert len(store.state_writes) == 2
    assert store.state_writes[1][2].hint_expires_at == NOW + 181 + 1800
    assert store.state_writes[1][2].version == 2


def test_process_caller_entries_win_over_stored_ones():
    # GIVEN stored state and a caller who sends its own cluster entry
    clock = FakeClock()
    store = FakeStore(
        states={(OPAQUE, DS): IdentityState(entries={CLUSTER_KEY: StoredEntry("or2", NOW + 100, 1800)}, version=1)}
    )
    edge = FakeEdge(EdgeAnswer(200, {"requestId": "r", "handle": []}, 1))
    event = inbound(meta={"state": {"entries": [{"key": CLUSTER_KEY, "value": "va6"}]}})

    # WHEN
    process(store, edge, clock, event)

    # THEN
    assert edge.calls[0].request["meta"]["state"]["entries"] == [{"key": CLUSTER_KEY, "value": "va6"}]


def test_process_without_primary_identity_keeps_no_state():
    # GIVEN
    store = FakeStore()
    edge = FakeEdge(EdgeAnswer(207, {"requestId": "r", "handle": [], "errors": [{"type": "e"}]}, 1))

    # WHEN
    result = process(store, edge, FakeClock(), inbound(identity=False))

    # THEN
    assert result.outcome is Outcome.DELIVERED
    assert store.state_reads == []
    assert store.state_writes == []
    assert store.finished[0][1] == {
        "status": "delivered",
        "datastreamId": DS,
        "source": "sqs",
        "identityId": "",  # none: compared as such on a repeat
        "requestId": "r",
        "handle": [],
        "errors": [{"type": "e"}],
    }


def test_process_store_failure_after_delivery_is_retry_and_releases():
    # GIVEN a store whose result write fails
    class NoFinish(FakeStore):
        def put_result(self, write: ResultWrite) -> None:
            raise StoreUnavailable("dynamodb put_item failed: InternalServerError")

    store = NoFinish()
    edge = FakeEdge(EdgeAnswer(200, {"requestId": "r", "handle": []}, 1))

    # WHEN
    result = process(store, edge, FakeClock(), inbound(identity=False))

    # THEN
    assert result == Result(
        Outcome.RETRY, "evt-1", reason="dynamodb put_item failed: InternalServerError", given_back=True
    )
    assert store.releases == [("evt-1", "tok-1", "dynamodb put_item failed: InternalServerError")]


def test_reject_invalid_stores_the_field_errors_and_raw_body():
    # GIVEN
    store = FakeStore()
    error = InvalidEvent([{"path": "event.xdm", "message": "is required"}])

    # WHEN
    item = relay(store, FakeEdge(), FakeClock()).reject_invalid(
        "msg-1", datastream_id=DS, source="webhook", error=error, raw='{"event":{}}'
    )

    # THEN
    fields = {
        "datastreamId": DS,
        "source": "webhook",
        "error": {
            "type": INVALID_EVENT_TYPE,
            "title": "Invalid event",
            "status": 400,
            "errors": [{"path": "event.xdm", "message": "is required"}],
        },
        "request": '{"event":{}}',
    }
    assert store.rejected_unclaimed == [("msg-1", fields)]
    assert item == {**fields, "eventId": "msg-1", "status": "rejected", "storedAt": "2023-11-14T22:13:20.000Z"}


def test_process_with_a_known_state_does_not_read_it_and_returns_the_state_after():
    # GIVEN a first event whose result carries the identity's state as stored
    clock = FakeClock()
    store = FakeStore()
    first = process(store, FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1)), clock)
    assert first.state == store.states[(OPAQUE, DS)]  # what was written, version 1
    reads = list(store.state_reads)

    # WHEN the identity's next event is given that state (as a batch carries it) 60 s later
    clock.advance(60)
    edge = FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1))
    second = relay(store, edge, clock).process(inbound(), Deadline(clock, 10), lease_s=30, state=first.state)

    # THEN the state is not read again, it goes to Edge, and (no write needed yet) the state after is the same one
    assert store.state_reads == reads
    assert edge.calls[0].hint == "or2"
    assert second.outcome is Outcome.DELIVERED
    assert second.state == first.state


def test_process_asks_the_state_source_only_after_taking_the_claim():
    # GIVEN a state source (a batch's read still running) that records when it is asked
    store = FakeStore()
    asked: list[int] = []

    def source() -> IdentityState:
        asked.append(len(store.claims))
        return IdentityState()

    # WHEN an event is processed
    result = relay(store, FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1)), FakeClock()).process(
        inbound(), Deadline(FakeClock(), 10), lease_s=30, state_source=source
    )

    # THEN it was asked once, after the claim, and the state was not read per event
    assert (result.outcome, asked, store.state_reads) == (Outcome.DELIVERED, [1], [])


def test_process_does_not_wait_for_the_state_of_a_duplicate():
    store = FakeStore(claim_result=Claim(False, existing={"status": "delivered"}))

    def source() -> IdentityState:
        raise AssertionError("a duplicate needs no state")

    result = relay(store, FakeEdge(), FakeClock()).process(
        inbound(), Deadline(FakeClock(), 10), lease_s=30, state_source=source
    )
    assert result.outcome is Outcome.DUPLICATE


@pytest.mark.parametrize(
    "failure",
    [
        StoreUnavailable("dynamodb update_item failed: InternalServerError"),  # an outage
        OverflowError("cannot convert float infinity to integer"),  # a defect in the state step
    ],
    ids=["store-unavailable", "defect"],
)
def test_process_a_failed_state_step_after_edge_answered_still_delivers_once(failure: Exception) -> None:
    # GIVEN a state step that fails once Edge has the event
    class Broken(FakeStore):
        def update_state(self, *args: Any, **kwargs: Any) -> int:
            raise failure

    store = Broken()
    edge = FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1))

    # WHEN
    result = process(store, edge, FakeClock())

    # THEN Edge has the event: it is stored as delivered, never handed back to be sent again; only its state is lost
    assert result.outcome is Outcome.DELIVERED
    assert len(edge.calls) == 1
    assert store.releases == []
    assert [eid for eid, _ in store.finished] == ["evt-1"]


def test_process_leaves_stored_entries_out_when_they_would_take_the_event_over_edges_limit():
    # GIVEN a stored identity entry, and an event just under Edge's 64 KiB
    clock = FakeClock()
    store = FakeStore()
    store.states[(OPAQUE, DS)] = IdentityState(entries={IDENTITY_KEY: StoredEntry("v" * 200, NOW + 3600, 3600)})
    event = sized(inbound(), 100)
    edge = FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1))

    # WHEN
    result = process(store, edge, clock, event)

    # THEN it went to Edge as received, within the limit, and Edge's answer still updated the state
    assert result.outcome is Outcome.DELIVERED
    sent = edge.calls[0].request
    assert sent == event.request
    assert len(json.dumps(sent, separators=(",", ":")).encode()) <= MAX_BODY_BYTES
    assert set(store.states[(OPAQUE, DS)].entries) == {CLUSTER_KEY, IDENTITY_KEY}


def test_process_leaves_out_the_entries_that_lapse_first_and_keeps_the_identity_entry_when_it_fits(
    emitted: Callable[[], dict[str, list[float]]],
) -> None:
    # GIVEN a stored identity entry (long-lived), a cluster entry and a large entry that lapse sooner, and an event
    # that fits Edge's 64 KiB with the identity entry but not with the others too
    clock = FakeClock()
    store = FakeStore()
    identity = StoredEntry("CiY" + "i" * 60, NOW + 34_128_000, 34_128_000)
    store.states[(OPAQUE, DS)] = IdentityState(
        entries={
            IDENTITY_KEY: identity,
            CLUSTER_KEY: StoredEntry("va6", NOW + 1800, 1800),
            "kndctr_5BFE274A5F6980A50A495C08_AdobeOrg_consent": StoredEntry("c" * 3000, NOW + 7200, 7200),
        }
    )
    event = sized(inbound(), 400)
    edge = FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1))

    # WHEN
    result = process(store, edge, clock, event)

    # THEN it went with the identity entry only (Edge answers under the same identity), within the limit
    assert result.outcome is Outcome.DELIVERED
    sent = edge.calls[0].request
    assert sent["meta"]["state"]["entries"] == [{"key": IDENTITY_KEY, "value": identity.value, "maxAge": 34_128_000}]
    assert len(json.dumps(sent, separators=(",", ":")).encode()) <= MAX_BODY_BYTES
    assert {k: v for k, v in sent.items() if k != "meta"} == event.request
    # and the entries left out were counted
    assert emitted()["StateNotSent"] == [1.0]


@pytest.mark.parametrize("fitting", [0, 1, 3, 7, 9, 10])
def test_the_fewest_entries_are_left_out_and_the_longest_lived_are_kept(fitting: int) -> None:
    from relay.process_event import with_state_within_limit

    # GIVEN ten stored entries of about 1 KB, each lapsing later than the last, and an event with room for `fitting`
    entries = {f"k{i}": StoredEntry(f"{i}" * 1000, NOW + 100 * (i + 1), 100 * (i + 1)) for i in range(10)}
    state = IdentityState(entries=entries)
    event = inbound().request
    one = len(json.dumps({"key": "k0", "value": "0" * 1000, "maxAge": 100}, separators=(",", ":"))) + 1
    room = 40 + fitting * one  # the `meta.state.entries` wrapper, and `fitting` entries with their commas
    pad = MAX_BODY_BYTES - len(json.dumps(event, separators=(",", ":"))) - room - 8  # `,"data":{"p":""}` is 16
    event = {**event, "event": {**event["event"], "data": {"p": "x" * (pad - 8)}}}

    # WHEN the request is made to fit
    body, left_out = with_state_within_limit(event, state, NOW)
    sent = json.loads(body)

    # THEN the fewest were left out, those that lapse first, and it fits
    assert len(body) <= MAX_BODY_BYTES
    assert left_out == 10 - fitting
    kept = [e["key"] for e in as_list(as_dict(as_dict(sent.get("meta")).get("state")).get("entries"))]
    assert kept == [f"k{i}" for i in range(10 - fitting, 10)]


def test_an_event_the_relays_additions_take_over_edges_limit_is_refused_without_a_call() -> None:
    # GIVEN an event that is over Edge's 64 KiB once the relay's `_id` and timestamp are in it
    store = FakeStore()
    event = sized(inbound(), -10)
    edge = FakeEdge()

    # WHEN
    result = process(store, edge, FakeClock(), event)

    # THEN it is stored as the relay's own 413 rejection (replaying it could never work), and Edge was not called
    assert result.outcome is Outcome.REJECTED
    assert edge.calls == []
    [(event_id, doc)] = store.finished
    assert event_id == "evt-1" and doc["status"] == "rejected"
    assert doc["error"]["status"] == 413 and doc["error"]["type"] == INVALID_EVENT_TYPE
    assert "over Edge's 65536-byte limit" in doc["error"]["errors"][0]["message"]
    assert doc["error"]["detail"] == "the request is too large for Edge as the relay sends it; make the event smaller"
    assert doc["rejectedBy"] == "relay"  # its own refusal: a corrected resend under the same eventId is processed
    assert doc["request"] == event.request


def test_a_corrected_resend_of_an_event_refused_as_too_large_is_delivered(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an event refused by the relay as too large as sent (the real store, on in-process moto)
    store, clock = store_on_moto.store, store_on_moto.clock
    big = sized(inbound(), -10)
    edge = FakeEdge(EdgeAnswer(200, {"requestId": "r", "handle": []}, 1))
    assert Relay(store, edge, clock).process(big, Deadline(clock, 10), lease_s=30).outcome is Outcome.REJECTED  # type: ignore[arg-type]

    # WHEN the sender sends a smaller event under the same eventId
    result = Relay(store, edge, clock).process(inbound(), Deadline(clock, 10), lease_s=30)  # type: ignore[arg-type]

    # THEN it is delivered (not answered as a repeat of the refusal)
    assert result.outcome is Outcome.DELIVERED
    assert len(edge.calls) == 1
    assert (store.get_result("evt-1") or {}).get("status") == "delivered"


def test_process_sends_stored_entries_when_the_event_with_them_fits():
    # GIVEN the same stored entry and a small event
    store = FakeStore()
    store.states[(OPAQUE, DS)] = IdentityState(entries={IDENTITY_KEY: StoredEntry("v" * 200, NOW + 3600, 3600)})
    edge = FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1))

    # WHEN
    process(store, edge, FakeClock())

    # THEN
    assert edge.calls[0].request["meta"]["state"]["entries"] == [
        {"key": IDENTITY_KEY, "value": "v" * 200, "maxAge": 3600}
    ]


def test_process_stores_an_unreadable_answer_as_delivered_and_says_so():
    # GIVEN Edge accepted the event with a body that is not an answer
    store = FakeStore()
    edge = FakeEdge(EdgeAnswer(200, {}, 1, unreadable=True))

    # WHEN
    result = process(store, edge, FakeClock())

    # THEN
    assert result.outcome is Outcome.DELIVERED
    ((_, fields),) = store.finished
    assert fields["handle"] == [] and fields["answerUnreadable"] is True and fields["requestId"] is None
    assert store.state_writes == []


def test_an_answer_holding_a_lone_surrogate_is_stored_as_delivered_and_equal(store_on_moto: StoreOnMoto) -> None:
    # GIVEN Edge accepts the event with an answer holding a lone UTF-16 surrogate (JSON "\\ud83d": an offer cut in the
    # middle of an emoji), in a handle and in a state:store entry (the real store, on in-process moto)
    store, clock = store_on_moto.store, store_on_moto.clock
    body = json.loads(
        '{"requestId": "r-1", "handle": [{"type": "personalization:decisions", "payload": [{"content": "hi \\ud83d"}]},'
        ' {"type": "state:store", "payload": [{"key": "k", "value": "v\\udc00", "maxAge": 3600}]}]}'
    )
    edge = FakeEdge(EdgeAnswer(200, body, 1), EdgeAnswer(200, body, 1))

    # WHEN it is processed, and the identity's next event too
    first = Relay(store, edge, clock).process(inbound(), Deadline(clock, 10), lease_s=30)  # type: ignore[arg-type]
    if first.pending is not None:
        store.put_results([first.pending])
    second_event = build_inbound(
        {"event": {"xdm": {"identityMap": {"FPID": [{"id": "fp-1", "primary": True}]}}}},
        event_id="evt-2",
        datastream_id=DS,
        source="sqs",
        received_at=NOW,
    )
    second = Relay(store, edge, clock).process(second_event, Deadline(clock, 10), lease_s=30)  # type: ignore[arg-type]

    # THEN it is delivered once (never handed back, which would send it to Edge again), what is stored equals the
    # answer, and the entry is sent back with the next event as Edge gave it
    assert (first.outcome, second.outcome) == (Outcome.DELIVERED, Outcome.DELIVERED)
    stored = store.get_result("evt-1") or {}
    assert (stored["status"], stored["handle"]) == ("delivered", body["handle"])
    assert edge.calls[1].request["meta"]["state"]["entries"] == [{"key": "k", "value": "v\udc00", "maxAge": 3600}]


def test_a_request_id_holding_a_lone_surrogate_is_stored_delivered_or_rejected(store_on_moto: StoreOnMoto) -> None:
    # GIVEN Edge's requestId (a plain string attribute, not a JSON document) holding a lone surrogate: in a 200, and
    # in a 4xx problem's report (the real store, on in-process moto)
    store, clock = store_on_moto.store, store_on_moto.clock
    problem = {
        "type": "https://ns.adobe.com/aep/errors/EXEG-0104-422",
        "status": 422,
        "report": {"requestId": "q\udc00"},
    }
    edge = FakeEdge(EdgeAnswer(200, {"requestId": "r-\ud83d", "handle": []}, 1), EdgeRejected(422, problem))
    other = build_inbound({"event": {"xdm": {}}}, event_id="evt-2", datastream_id=DS, source="sqs", received_at=NOW)

    # WHEN both are processed
    delivered = Relay(store, edge, clock).process(inbound(), Deadline(clock, 10), lease_s=30)  # type: ignore[arg-type]
    rejected = Relay(store, edge, clock).process(other, Deadline(clock, 10), lease_s=30)  # type: ignore[arg-type]

    # THEN each keeps its outcome (never handed back to be sent again), the surrogate written as its escape
    assert (delivered.outcome, rejected.outcome) == (Outcome.DELIVERED, Outcome.REJECTED)
    assert (store.get_result("evt-1") or {})["requestId"] == "r-\\ud83d"
    assert (store.get_result("evt-2") or {})["status"] == "rejected"
    assert len(edge.calls) == 2


def test_a_release_whose_reason_holds_a_lone_surrogate_gives_the_event_back(store_on_moto: StoreOnMoto) -> None:
    # GIVEN a claimed event, and a reason built from Edge's problem type holding a lone surrogate
    store = store_on_moto.store
    claim = store.claim("evt-1", datastream_id=DS, source="sqs", lease_s=30)

    # WHEN it is given back
    store.release("evt-1", claim.token, "edge answered 503 EXEG-\ud83d")

    # THEN it is queued, and the reason readable
    item = store.get_result("evt-1") or {}
    assert (item["status"], item["lastError"]) == ("queued", "edge answered 503 EXEG-\\ud83d")


def test_an_answer_that_cannot_be_kept_is_stored_as_delivered_without_it(caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN an answer the store cannot compose a result of (a defect)
    class Broken(FakeStore):
        def compose_result(self, event_id: str, fields: dict[str, Any], claimed: dict[str, Any] | None) -> ResultWrite:
            if fields.get("handle"):
                raise TypeError("cannot keep this")
            return super().compose_result(event_id, fields, claimed)

    store = Broken()
    edge = FakeEdge(EdgeAnswer(200, FIXTURE_BODY, 1))

    # WHEN
    result = process(store, edge, FakeClock())

    # THEN Edge has the event: it is delivered, not handed back, and the result says its answer was not kept
    assert result.outcome is Outcome.DELIVERED
    ((_, fields),) = store.finished
    assert (fields["status"], fields["handle"], fields["answerNotKept"]) == ("delivered", [], True)
    assert store.releases == [] and len(edge.calls) == 1


def test_process_without_time_left_leaves_the_event_untouched():
    # GIVEN a batch whose time has run out
    clock = FakeClock()
    store = FakeStore()
    edge = FakeEdge()

    # WHEN
    result = relay(store, edge, clock).process(inbound(), Deadline(clock, 0), lease_s=30)

    # THEN it is redelivered without a claim taken and given back (two writes for nothing) or an Edge call
    assert result == Result(Outcome.RETRY, "evt-1", reason="no time left to relay the event", untried=True)
    assert store.claims == [] and store.releases == [] and edge.calls == []


def event_for(person: str, *, datastream: str = DS) -> InboundEvent:
    doc = {"event": {"xdm": {"_id": "order-1001", "identityMap": {"Email": [{"id": person, "primary": True}]}}}}
    return build_inbound(doc, event_id="order-1001", datastream_id=datastream, source="webhook", received_at=NOW)


def test_an_eventid_reused_for_another_identity_is_rejected_on_its_own_and_never_given_the_first_ones_answer(
    store_on_moto: StoreOnMoto,
) -> None:
    # GIVEN an event delivered for Alice (the real store, on in-process moto)
    store, clock = store_on_moto.store, store_on_moto.clock
    edge = FakeEdge(*[EdgeAnswer(200, FIXTURE_BODY, 1)] * 3)
    run = lambda event: Relay(store, edge, clock).process(event, Deadline(clock, 10), lease_s=30)  # type: ignore[arg-type]  # noqa: E731
    first = run(event_for("alice@example.com"))
    assert first.outcome is Outcome.DELIVERED

    # WHEN the sender gives Bob's event, then an event to another datastream, the same eventId; and Alice's is resent
    bob = run(event_for("bob@example.com"))
    bob_again = run(event_for("bob@example.com"))  # a redelivery of Bob's
    other_ds = run(event_for("alice@example.com", datastream="ds-2"))
    repeat = run(event_for("alice@example.com"))

    # THEN Bob's is not sent to Edge and does not get Alice's handle: it is stored `rejected` under an id of its own,
    # with its request (to send again under a new xdm._id); its redelivery lands on that same item
    assert len(edge.calls) == 1
    assert bob.outcome is Outcome.REJECTED and "handle" not in bob.item
    assert bob.event_id.startswith("order-1001#reused-") and bob_again.event_id == bob.event_id
    stored = store.get_result(bob.event_id) or {}
    assert stored["status"] == "rejected" and stored["rejectedBy"] == "relay"
    assert stored["error"]["status"] == 422 and stored["error"]["errors"][0]["path"] == "event.xdm._id"
    assert stored["request"]["event"]["xdm"]["identityMap"]["Email"][0]["id"] == "bob@example.com"
    # another datastream is another event too, filed apart from Bob's
    assert other_ds.outcome is Outcome.REJECTED and other_ds.event_id not in (bob.event_id, "order-1001")
    # Alice's own resend is the repeat it is, answered with her result
    assert repeat.outcome is Outcome.DUPLICATE and repeat.item["handle"] == FIXTURE_BODY["handle"]
    assert (store.get_result("order-1001") or {})["identityId"] == event_for("alice@example.com").identity_id


def test_a_result_stored_before_identities_were_kept_is_still_a_repeat() -> None:
    # GIVEN a finished result without `identityId` (stored by an earlier version)
    store = FakeStore(claim_result=Claim(False, existing={"status": "delivered", "eventId": "order-1001"}))
    edge = FakeEdge()

    # WHEN the event comes again
    result = process(store, edge, FakeClock(), event_for("bob@example.com"))

    # THEN it is answered as a repeat, as before (there is nothing to compare)
    assert result.outcome is Outcome.DUPLICATE and store.rejected_unclaimed == [] and edge.calls == []
