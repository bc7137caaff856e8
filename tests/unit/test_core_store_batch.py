"""`HandlesStore.put_results`: 25 results to a BatchWriteItem, unprocessed items sent again, failures per event.

A scripted stand-in for the boto3 client (unit level); the real calls against moto are in the integration tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from relay.clock import Deadline
from relay.codec import item_size
from relay.errors import EdgeUnavailable, StoreUnavailable
from relay.identity_state import (
    DELETION_MEMORY_S,
    MAX_DELETED_KEY_BYTES,
    MAX_DELETIONS,
    MAX_ENTRY_BYTES,
    IdentityState,
    StoredEntry,
    apply_handles,
    needs_write,
    state_from_item,
    state_to_item,
)
from relay.integrations.edge import EdgeAnswer
from relay.integrations.store import HandlesStore, ResultWrite, decode_item
from relay.models import InboundEvent, Source, build_inbound
from relay.process_event import Outcome, Relay

from tests.fakes import FakeClock, FakeEdge
from tests.unit.conftest import StoreOnMoto


class ScriptedDynamo:
    """Answers each batch_write_item with its next step: the event ids to leave unprocessed, or an error."""

    def __init__(self, *steps: set[str] | Exception, bad_items: frozenset[str] = frozenset()) -> None:
        self.steps = list(steps)
        self.requests: list[list[str]] = []  # event ids per request
        self.bad_items = bad_items  # put_item refuses these with a ValidationException
        self.puts: list[str] = []

    def put_item(self, TableName: str, Item: dict[str, Any]) -> dict[str, Any]:  # noqa: N803 (boto3's names)
        event_id = Item["eventId"]["S"]
        if event_id in self.bad_items:
            raise ClientError({"Error": {"Code": "ValidationException", "Message": "x"}}, "PutItem")
        self.puts.append(event_id)
        return {}

    def batch_write_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:  # noqa: N803 (boto3's name)
        writes = RequestItems["t"]
        ids = [w["PutRequest"]["Item"]["eventId"]["S"] for w in writes]
        self.requests.append(ids)
        step = self.steps.pop(0) if self.steps else set()
        if isinstance(step, Exception):
            raise step
        left = [w for w, event_id in zip(writes, ids, strict=True) if event_id in step]
        return {"UnprocessedItems": {"t": left} if left else {}}


def store(client: ScriptedDynamo, clock: FakeClock | None = None) -> HandlesStore:
    return HandlesStore(client, "t", ttl_days=30, clock=clock or FakeClock())


def writes(s: HandlesStore, n: int) -> list[ResultWrite]:
    claimed = {"attempts": {"N": "2"}, "updatedAt": {"S": "2023-11-14T22:13:20.000Z"}}  # what a claim hands on
    return [s.compose_result(f"e{i}", {"status": "delivered", "handle": []}, claimed) for i in range(n)]


def test_results_go_25_to_a_request_and_all_are_stored():
    client = ScriptedDynamo()
    s = store(client)
    assert s.put_results(writes(s, 60)) == {}
    assert [len(r) for r in client.requests] == [25, 25, 10]


def test_the_written_item_is_whole_and_keeps_the_claims_attempt_count():
    s = store(ScriptedDynamo())
    item = writes(s, 1)[0].item
    assert item["attempts"] == {"N": "2"}
    assert (item["pk"], item["sk"], item["status"]) == ({"S": "EVENT#e0"}, {"S": "RESULT"}, {"S": "delivered"})
    assert set(item) == {"pk", "sk", "status", "handle", "eventId", "storedAt", "expiresAt", "attempts", "updatedAt"}


def test_unprocessed_items_are_sent_again_with_backoff():
    # GIVEN DynamoDB leaves 2 items unprocessed, then 1, then none
    clock = FakeClock()
    client = ScriptedDynamo({"e1", "e3"}, {"e3"}, set())
    s = store(client, clock)

    # WHEN
    failed = s.put_results(writes(s, 5))

    # THEN each retry carried only what was left, after 50 and 100 ms, and everything is stored
    assert failed == {}
    assert client.requests == [["e0", "e1", "e2", "e3", "e4"], ["e1", "e3"], ["e3"]]
    assert clock.sleeps == [0.05, 0.1]


def test_items_still_unprocessed_after_the_last_attempt_are_reported_failed():
    client = ScriptedDynamo({"e1"}, {"e1"}, {"e1"}, {"e1"})
    s = store(client)
    assert s.put_results(writes(s, 3)) == {"e1": "dynamodb batch_write_item left the item unprocessed"}
    assert len(client.requests) == 4


def test_unprocessed_results_are_sent_again_for_as_long_as_the_batchs_deadline_allows():
    # GIVEN DynamoDB throttles a result for 10 answers in a row (an on-demand table past its previous peak), and the
    # batch has 10 s left
    clock = FakeClock()
    client = ScriptedDynamo(*[{"e1"}] * 10, set())
    s = store(client, clock)

    # WHEN
    failed = s.put_results(writes(s, 3), Deadline(clock, 10))

    # THEN it is written on the 11th request, after a backoff doubling to 1 s (the record is not sent back, nor its
    # event, delivered already, sent to Edge again)
    assert failed == {}
    assert len(client.requests) == 11
    assert clock.sleeps == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_unprocessed_results_are_given_up_while_the_deadline_still_leaves_time_to_send_them_back():
    # GIVEN DynamoDB throttles a result on every answer, and the batch has 3 s left
    clock = FakeClock()
    client = ScriptedDynamo(*[{"e1"}] * 50)
    s = store(client, clock)

    # WHEN
    failed = s.put_results(writes(s, 3), Deadline(clock, 3))

    # THEN it stops once the next wait would leave less than a second, and reports the result not written
    assert failed == {"e1": "dynamodb batch_write_item left the item unprocessed"}
    assert sum(clock.sleeps) <= 2.0 and clock.sleeps[-1] <= 1.0
    assert len(client.requests) == len(clock.sleeps) + 1 > 4


def test_an_error_fails_its_chunk_only():
    # GIVEN the second request of 25 is refused (botocore has already retried it)
    error = ClientError({"Error": {"Code": "InternalServerError", "Message": "x"}}, "BatchWriteItem")
    client = ScriptedDynamo(set(), error)
    s = store(client)

    # WHEN 30 results are written
    failed = s.put_results(writes(s, 30))

    # THEN the 5 of the second chunk are reported, with the reason; the first 25 are stored
    assert failed == {f"e{i}": "dynamodb batch_write_item failed: InternalServerError" for i in range(25, 30)}


def test_a_validation_error_writes_the_chunk_one_by_one_so_only_the_bad_item_fails():
    # GIVEN DynamoDB refuses a batch because of one malformed item
    error = ClientError({"Error": {"Code": "ValidationException", "Message": "x"}}, "BatchWriteItem")
    client = ScriptedDynamo(error, bad_items=frozenset({"e1"}))
    s = store(client)

    # WHEN 3 results are written
    failed = s.put_results(writes(s, 3))

    # THEN the other two are written with PutItem, and only the bad one is reported
    assert client.puts == ["e0", "e2"]
    assert failed == {"e1": "dynamodb put_item failed: ValidationException"}


def test_a_state_left_without_live_entries_gets_a_ttl_dynamodb_still_acts_on():
    # GIVEN a stored state whose last entry Edge deletes (maxAge 0)
    class Puts:
        def __init__(self) -> None:
            self.items: list[dict[str, Any]] = []

        def put_item(self, **kwargs: Any) -> dict[str, Any]:
            self.items.append(kwargs["Item"])
            return {}

    client, clock = Puts(), FakeClock()
    s = HandlesStore(client, "t", ttl_days=30, clock=clock)
    current = IdentityState(entries={"a": StoredEntry("1", clock.now() + 100, 100)}, version=4)

    # WHEN
    s.update_state(
        "id",
        "ds",
        current,
        lambda state: apply_handles(
            state, [{"type": "state:store", "payload": [{"key": "a", "maxAge": 0}]}], clock.now()
        ),
    )

    # THEN the item expires once the deletion is forgotten, not in 1970 (TTL ignores items expired more than five years
    # ago)
    (item,) = client.items
    assert int(item["expiresAt"]["N"]) == int(clock.now() + DELETION_MEMORY_S) + 1


@pytest.mark.parametrize(
    "state",
    [
        {"S": "{truncated"},
        {"B": b"not zlib"},
        {"S": "[1, 2]"},
        {"S": '{"entries": {"k": {"value": "v", "expiresAt": "x"}}}'},
    ],
)
def test_an_unreadable_state_item_reads_as_empty_at_its_version(state: dict[str, Any]) -> None:
    # GIVEN a state item that cannot be read (damaged, or written by hand)
    class Gets:
        def get_item(self, **kwargs: Any) -> dict[str, Any]:
            return {
                "Item": {"pk": {"S": "IDENTITY#id"}, "sk": {"S": "STATE#ds"}, "state": state, "version": {"N": "3"}}
            }

        def batch_get_item(self, **kwargs: Any) -> dict[str, Any]:
            return {"Responses": {"t": [self.get_item()["Item"]]}}

    s = HandlesStore(Gets(), "t", ttl_days=30, clock=FakeClock())

    # WHEN / THEN it is empty, at its version (so the next conditional write replaces it), by either read
    assert s.get_state("id", "ds") == IdentityState(version=3)
    assert s.get_states([("id", "ds")]) == {("id", "ds"): IdentityState(version=3)}


def state_answer(hint: str, value: str | None) -> list[dict[str, Any]]:
    """An Edge answer's handles: `consent` set to `value` (deleted when None), and a location hint."""
    entry = {"key": "consent", "value": value or "", "maxAge": 3600 if value is not None else 0}
    return [
        {"type": "state:store", "payload": [entry]},
        {"type": "locationHint:result", "payload": [{"scope": "EdgeNetwork", "hint": hint, "ttlSeconds": 1800}]},
    ]


def state_change(handles: list[dict[str, Any]], received: float) -> Callable[[IdentityState], IdentityState | None]:
    """What `Relay._deliver` hands `update_state` for an answer received at `received`."""

    def change(current: IdentityState) -> IdentityState | None:
        new = apply_handles(current, handles, received)
        return new if needs_write(current, new, received) else None

    return change


def race(
    on: StoreOnMoto,
    stored: list[dict[str, Any]],
    first: tuple[list[dict[str, Any]], float],
    merged: tuple[list[dict[str, Any]], float],
) -> tuple[IdentityState, IdentityState]:
    """One identity's state (`stored`'s answer, at t0), read by two invocations; the `first` answer (handles, seconds
    after t0) is written first, and the other's write meets it and `merged` is merged onto it (`update_state`). The
    state as stored after the first write, and at the end."""
    store, t0 = on.store, on.clock.now()
    assert store.update_state("id", "ds", IdentityState(), state_change(stored, t0)) == 1
    read_by_a, read_by_b = store.get_state("id", "ds"), store.get_state("id", "ds")
    assert store.update_state("id", "ds", read_by_b, state_change(first[0], t0 + first[1])) == 1
    after_first = store.get_state("id", "ds")
    store.update_state("id", "ds", read_by_a, state_change(merged[0], t0 + merged[1]))
    return after_first, store.get_state("id", "ds")


@pytest.mark.parametrize("older", ["sets", "deletes"])
def test_an_older_answer_merged_after_a_newer_one_does_not_put_back_what_edge_replaced(
    older: str, store_on_moto: StoreOnMoto
) -> None:
    # GIVEN one identity's state, read by two invocations A and B; Edge answers A at t0+10 (consent set to "v-old",
    # or deleted; hint or2) and B at t0+11 (consent "v-new", hint va6), and B writes first
    # WHEN A's write meets B's and merges its older answer onto it
    a_answer = state_answer("or2", "v-old" if older == "sets" else None)
    _, final = race(store_on_moto, state_answer("or2", "v0"), (state_answer("va6", "v-new"), 11), (a_answer, 10))

    # THEN what Edge gave last stands: B's value and hint (a review found A's older value, or its deletion, and its
    # hint written over them)
    assert (final.entries["consent"].value, final.hint) == ("v-new", "va6")


@pytest.mark.parametrize("deletes", ["maxAge 0", "too large to keep"])
def test_an_older_answer_merged_after_a_newer_deletion_does_not_bring_the_entry_back(
    deletes: str, store_on_moto: StoreOnMoto
) -> None:
    # GIVEN consent "v0" stored, read by two invocations A and B; Edge answers A at t0+10 (consent "v-old") and B at
    # t0+11, deleting consent (or replacing it with a value too large to keep, which drops it), and B writes first
    b_answer = state_answer("or2", None if deletes == "maxAge 0" else "x" * (MAX_ENTRY_BYTES + 1))
    # WHEN A's write meets B's and A merges its older answer onto it
    store, t0 = store_on_moto.store, store_on_moto.clock.now()
    after_b, final = race(store_on_moto, state_answer("or2", "v0"), (b_answer, 11), (state_answer("or2", "v-old"), 10))
    assert "consent" not in after_b.entries

    # THEN Edge's last word, the deletion, stands (a review found A's older value put back, and sent to Edge again)
    assert "consent" not in final.entries
    # AND a later answer sets it again, as any answer after a deletion does
    store.update_state("id", "ds", final, state_change(state_answer("or2", "v2"), t0 + 12))
    assert store.get_state("id", "ds").entries["consent"].value == "v2"


def test_a_later_deletion_of_a_key_the_later_answers_state_did_not_hold_is_not_undone(
    store_on_moto: StoreOnMoto,
) -> None:
    # GIVEN a stored state without consent, read by invocations A and B; Edge answers A at t0+10 setting consent
    # "v-old" and B at t0+11 deleting it (maxAge 0, and a new hint, so B writes); B writes first
    hint_only = [
        {"type": "locationHint:result", "payload": [{"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": 1800}]}
    ]
    # WHEN A's write meets B's and A merges its older answer onto it
    _, final = race(store_on_moto, hint_only, (state_answer("va6", None), 11), (state_answer("or2", "v-old"), 10))

    # THEN Edge's last word for consent, B's deletion, stands (a review found it remembered only for a key B's state
    # held)
    assert "consent" not in final.entries


def test_a_deletion_of_a_key_not_held_costs_no_write_and_is_remembered_within_bounds() -> None:
    # GIVEN a state Edge's answer changes only by deleting keys it does not hold
    t0 = 1_800_000_000.0
    state = apply_handles(IdentityState(), state_answer("or2", "v0"), t0 - 60)
    keys = [f"gone-{n}" for n in range(MAX_DELETIONS + 5)] + ["k" * (MAX_DELETED_KEY_BYTES + 1)]
    answer = [{"type": "state:store", "payload": [{"key": k, "value": "", "maxAge": 0} for k in keys]}]
    after = apply_handles(state, answer, t0)

    # THEN nothing is written for it (write economy: remembered with the next change only), and what is remembered is
    # bounded: the latest MAX_DELETIONS keys, none longer than MAX_DELETED_KEY_BYTES
    assert not needs_write(state, after, t0)
    assert len(after.deleted) == MAX_DELETIONS
    assert all(len(k) <= MAX_DELETED_KEY_BYTES for k in after.deleted)


def test_a_deletion_is_remembered_only_as_long_as_an_older_answer_can_arrive() -> None:
    # GIVEN a state whose consent entry an answer deleted at t0
    t0 = 1_800_000_000.0
    kept = apply_handles(IdentityState(), state_answer("or2", "v0"), t0 - 60)
    deleted = apply_handles(kept, state_answer("or2", None), t0)
    assert deleted.deleted == {"consent": t0}
    # THEN the deletion is kept with the item (its TTL at least as long) and read back
    assert deleted.expires_at() >= t0 + DELETION_MEMORY_S
    assert state_from_item(state_to_item(deleted), 1).deleted == {"consent": t0}
    # AND forgotten once no invocation that read before it can still be merging (an answer that changes nothing else
    # does not write it away: a later write does)
    later = apply_handles(deleted, [], t0 + DELETION_MEMORY_S + 1)
    assert later.deleted == {}
    assert "deleted" not in state_to_item(later)


def test_a_newer_answer_merged_after_an_older_one_replaces_it(store_on_moto: StoreOnMoto) -> None:
    # GIVEN the same race the other way round: A, answered last, writes last
    # WHEN A's answer, Edge's later one, is merged onto B's
    _, final = race(
        store_on_moto, state_answer("or2", "v0"), (state_answer("va6", "v-old"), 10), (state_answer("or2", "v-new"), 11)
    )

    # THEN it replaces it, as any later answer does
    assert (final.entries["consent"].value, final.hint) == ("v-new", "or2")


@pytest.mark.parametrize(
    "damage",
    [
        {"state": {"S": "{truncated"}, "version": {"N": "3"}},  # state unreadable
        {"state": {"S": "{truncated"}},  # written by hand: no version
        {"state": {"S": "{}"}, "version": {"S": "three"}},  # version not a number
        # a number the relay never writes (an operator "resetting" an item by hand): once matched by no write
        {"state": {"S": "{}"}, "version": {"N": "0"}},
        {"state": {"S": "{}"}, "version": {"N": "-1"}},
        {"state": {"S": "{}"}, "version": {"N": "3.5"}},
        {"state": {"S": "{truncated"}, "version": {"N": "0"}},
    ],
)
def test_the_next_write_replaces_a_damaged_state_item(damage: dict[str, Any], store_on_moto: StoreOnMoto) -> None:
    # GIVEN a damaged state item in the template's table (moto in-process: DynamoDB's condition semantics)
    ddb, s, clock = store_on_moto.ddb, store_on_moto.store, store_on_moto.clock
    ddb.put_item(TableName="t", Item={**s.state_key("id", "ds"), **damage})
    answer = [{"type": "state:store", "payload": [{"key": "k", "value": "v", "maxAge": 60}]}]

    # WHEN the identity's next event writes its state
    current = s.get_state("id", "ds")
    wrote = s.update_state("id", "ds", current, lambda state: apply_handles(state, answer, clock.now()))

    # THEN one write replaced it, and it reads back whole
    assert wrote == 1
    after = s.get_state("id", "ds")
    assert set(after.entries) == {"k"}
    assert after.version == max(current.version, 0) + 1


def test_a_state_written_in_a_newer_format_is_neither_sent_nor_written_over(
    store_on_moto: StoreOnMoto, emitted: Any
) -> None:
    # GIVEN an identity's state item as a later relay version wrote it, in a format this one does not know (a rollback
    # after a deploy that changed it)
    ddb, store, clock = store_on_moto.ddb, store_on_moto.store, store_on_moto.clock
    later = {
        **HandlesStore.state_key("id", "ds"),
        "state": {"S": '{"entries": {"k": {"value": "v", "expiresAt": 9999999999}}, "layout": "v2"}'},
        "version": {"N": "7"},
        "stateFormat": {"N": "2"},
    }
    ddb.put_item(TableName="t", Item=later)

    # WHEN this version reads it (for one event, and for a batch) and an answer of Edge's would change it
    state = store.get_state("id", "ds")
    in_batch = store.get_states([("id", "ds")])[("id", "ds")]
    wrote = store.update_state(
        "id", "ds", state, lambda s: IdentityState(entries={"k2": StoredEntry("w", clock.now() + 100, 100)})
    )

    # THEN nothing of it is sent (no entry, no hint, as it could be misread), and it is not written over (which would
    # lose what the later version keeps: a person's ECID); the event's state not kept is counted
    assert state.newer_format and in_batch.newer_format
    assert (state.entries, state.hint) == ({}, None)
    assert wrote == 0
    assert ddb.get_item(TableName="t", Key=HandlesStore.state_key("id", "ds"))["Item"] == later
    assert emitted()["StateNotSent"] == [1.0]


def anns_event(now: float) -> InboundEvent:
    """An event whose primary identity is CRMID "ann", on datastream "ds"."""
    event = build_inbound(
        {"event": {"xdm": {"_id": "e1", "identityMap": {"CRMID": [{"id": "ann", "primary": True}]}}}},
        event_id="e1",
        datastream_id="ds",
        source="sqs",
        received_at=now,
    )
    assert event.identity_id
    return event


def put_in_a_newer_format(ddb: Any, identity_id: str | None, *, version: int) -> dict[str, Any]:
    """The identity's state item as a later relay version (stateFormat 2) wrote it; returned as written."""
    later = {
        **HandlesStore.state_key(identity_id or "", "ds"),
        "version": {"N": str(version)},
        "stateFormat": {"N": "2"},
    }
    ddb.put_item(TableName="t", Item=later)
    return later


def test_an_event_of_an_identity_whose_state_is_in_a_newer_format_is_delivered_without_an_error(
    store_on_moto: StoreOnMoto, emitted: Any
) -> None:
    # GIVEN the identity's state item in a format only a later version reads
    ddb, store, clock = store_on_moto.ddb, store_on_moto.store, store_on_moto.clock
    event = anns_event(clock.now())
    later = put_in_a_newer_format(ddb, event.identity_id, version=3)
    handles = [{"type": "state:store", "payload": [{"key": "kndctr_X_identity", "value": "v", "maxAge": 100}]}]
    edge = FakeEdge(EdgeAnswer(200, {"requestId": "r", "handle": handles}, 1))

    # WHEN one of its events is relayed
    result = Relay(store, edge, clock).process(event, Deadline(clock, 10), lease_s=30)  # type: ignore[arg-type]

    # THEN it is delivered, no stored entry was sent, the item is left as it is, and only StateNotSent is counted:
    # no state-write failure or defect (they would page two alarms for every such event after a rollback)
    assert result.outcome is Outcome.DELIVERED
    assert "meta" not in edge.calls[0].request
    assert ddb.get_item(TableName="t", Key=HandlesStore.state_key(event.identity_id or "", "ds"))["Item"] == later
    assert set(emitted()) == {"StateNotSent", "Delivered", "RefusedByRelay"}


def test_a_state_rewritten_in_a_newer_format_meanwhile_is_what_the_event_carries_on(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an identity's state as a batch read it (format 1, an entry "OLD"), then rewritten by a later version
    # (format 2) before this event's answer is written
    ddb, store, clock = store_on_moto.ddb, store_on_moto.store, store_on_moto.clock
    event = anns_event(clock.now())
    known = IdentityState(entries={"k": StoredEntry("OLD", clock.now() + 100, 100)}, version=1)
    later = put_in_a_newer_format(ddb, event.identity_id, version=9)
    handles = [{"type": "state:store", "payload": [{"key": "k", "value": "NEW", "maxAge": 100}]}]
    edge = FakeEdge(EdgeAnswer(200, {"requestId": "r", "handle": handles}, 1))

    # WHEN the event is relayed with the state the batch read
    result = Relay(store, edge, clock).process(event, Deadline(clock, 10), lease_s=30, state=known)  # type: ignore[arg-type]

    # THEN it is delivered, the later version's item is left as it is, and the state the batch carries to the
    # identity's next record is that one (sending nothing), not the one read before it was rewritten
    assert result.outcome is Outcome.DELIVERED
    assert ddb.get_item(TableName="t", Key=HandlesStore.state_key(event.identity_id or "", "ds"))["Item"] == later
    assert result.state is not None and result.state.newer_format and result.state.entries == {}


@pytest.mark.parametrize("meanwhile", [None, "a batch's give-back", "a resend's give-back for the queue"])
def test_nothing_queued_is_written_only_over_the_attempts_own_mark(
    store_on_moto: StoreOnMoto, meanwhile: str | None
) -> None:
    from relay.integrations.store import queue_send_pending

    # GIVEN a webhook's claim given back with its mark (A), and maybe another attempt that took the event and gave it
    # back since: a batch's (another reason), or the sender's resend (B) with the same mark text, whose message the
    # retry queue took (a model check of the claim protocol found this one)
    store = store_on_moto.store
    claim = store.claim("e1", datastream_id="ds", source="webhook", lease_s=30)
    assert claim.token is not None
    store.release("e1", claim.token, queue_send_pending("edge answered 503"), marked=True)
    if meanwhile is not None:
        again = store.claim("e1", datastream_id="ds", source="webhook", lease_s=30)
        assert again.token is not None
        if meanwhile == "a batch's give-back":
            store.release("e1", again.token, "edge answered 504")
        else:
            store.release("e1", again.token, queue_send_pending("edge answered 503"), marked=True)

    # WHEN A's send to the retry queue fails
    store.note_not_queued(
        "e1", "not queued (the retry queue refused it; ...): edge answered 503", "edge answered 503", claim.token
    )

    # THEN the item says nothing is queued only over A's own mark: another attempt's record (and what it queued)
    # stands, so `relayctl show` does not tell the operator nothing waits in the queue when B's message does
    doc = _raw(store_on_moto, "e1")
    assert doc is not None
    assert doc["lastError"].startswith("not queued") is (meanwhile is None)
    assert ("queueSendBy" in doc) is (meanwhile == "a resend's give-back for the queue")  # B's mark, until B notes it


def test_a_state_this_version_writes_says_its_format(store_on_moto: StoreOnMoto) -> None:
    store, clock = store_on_moto.store, store_on_moto.clock
    store.update_state(
        "id", "ds", IdentityState(), lambda s: IdentityState(hint="or2", hint_expires_at=clock.now() + 60)
    )
    item = store_on_moto.ddb.get_item(TableName="t", Key=HandlesStore.state_key("id", "ds"))["Item"]
    assert item["stateFormat"] == {"N": "1"}
    assert not store.get_state("id", "ds").newer_format


def test_a_result_field_in_an_encoding_this_version_does_not_write_is_flagged_not_fatal(
    store_on_moto: StoreOnMoto,
) -> None:
    # GIVEN a delivered result whose handle is stored as a native DynamoDB list (another version's encoding, or an
    # item edited by hand)
    ddb, store = store_on_moto.ddb, store_on_moto.store
    item = {
        **HandlesStore.result_key("e1"),
        "status": {"S": "delivered"},
        "datastreamId": {"S": "ds"},
        "identityId": {"S": ""},
        "handle": {"L": [{"M": {"type": {"S": "identity:result"}}}]},
    }
    ddb.put_item(TableName="t", Item=item)

    # WHEN a repeat of the event is claimed
    claim = store.claim("e1", datastream_id="ds", source="sqs", lease_s=30)

    # THEN it is found finished (a repeat, answered from the item), with the field it cannot read flagged, rather
    # than an error on every attempt until the dead-letter queue
    assert not claim.acquired and claim.existing is not None
    assert claim.existing["status"] == "delivered" and claim.existing["handleUnreadable"] is True
    assert "handle" not in claim.existing


def noise(n: int) -> str:
    """`n` characters zlib cannot shrink (so an item's size is what the test says)."""
    import base64
    import os

    return base64.b64encode(os.urandom(n))[:n].decode()


def composed(fields: dict[str, Any]) -> tuple[dict[str, Any], int]:
    write = store(ScriptedDynamo()).compose_result("e1", fields, None)
    return decode_item(write.item), item_size(write.item)


def test_a_small_result_is_stored_whole() -> None:
    doc, _ = composed({"status": "rejected", "error": {"type": "t", "detail": "d"}, "request": {"a": 1}})
    assert doc["error"] == {"type": "t", "detail": "d"} and doc["request"] == {"a": 1}
    assert not {"errorTrimmed", "requestOmitted", "handleOmitted"} & set(doc)


def test_a_huge_edge_problem_is_cut_before_the_request_so_the_rejection_stays_replayable() -> None:
    # GIVEN an Edge problem of 450 KB and a 53 KB request
    detail = noise(3000)
    problem: dict[str, Any] = {"type": "x/EXEG-0104-422", "status": 422, "title": "Unprocessable", "detail": detail}
    problem["report"] = {"blob": noise(450_000)}
    request = {"event": {"xdm": {"_id": "e1"}, "data": {"pad": noise(53_000)}}}

    # WHEN
    doc, size = composed({"status": "rejected", "error": problem, "request": request})

    # THEN the item fits, the request is kept, the problem keeps its essentials and says it was cut
    assert size <= 400_000
    assert doc["request"] == request and "requestOmitted" not in doc
    assert doc["error"] == {
        "type": "x/EXEG-0104-422",
        "status": 422,
        "title": "Unprocessable",
        "detail": detail[:1000],
    }
    assert doc["errorTrimmed"] is True


def test_a_huge_request_is_dropped_and_said_so() -> None:
    # WHEN
    doc, size = composed({"status": "rejected", "error": {"type": "t"}, "request": {"pad": noise(600_000)}})

    # THEN
    assert size <= 400_000
    assert "request" not in doc and doc["requestOmitted"] is True and doc["error"] == {"type": "t"}


def test_huge_207_errors_go_before_the_handles() -> None:
    # WHEN a delivered result's errors list is 600 KB (450 KB compressed)
    handle = [{"type": "identity:result", "payload": [{"id": "x"}]}]
    doc, size = composed({"status": "delivered", "handle": handle, "errors": [{"detail": noise(600_000)}]})

    # THEN
    assert size <= 400_000
    assert doc["handle"] == handle and "errors" not in doc and doc["errorsOmitted"] is True


def test_an_answer_too_large_in_fields_that_are_never_cut_still_fits_and_keeps_its_outcome() -> None:
    # GIVEN a delivered result whose requestId and an unexpected field hold 450 KB each (a hostile or broken Edge, or
    # a proxy on a misconfigured endpoint), beside a small handle
    handle = [{"type": "identity:result", "payload": [{"id": "x"}]}]
    fields = {"status": "delivered", "datastreamId": "ds", "requestId": noise(450_000), "handle": handle}
    fields["title"] = noise(450_000)

    # WHEN it is composed
    write = store(ScriptedDynamo()).compose_result("e1", fields, None)
    doc, size = decode_item(write.item), item_size(write.item)

    # THEN the item fits (DynamoDB would refuse it, and the event would go to Edge again on every retry), its outcome
    # is kept, the handle too, and what was left out is said
    assert size <= 400_000
    assert (doc["status"], doc["eventId"], doc["datastreamId"], doc["handle"]) == ("delivered", "e1", "ds", handle)
    assert doc["requestIdOmitted"] is True and doc["titleOmitted"] is True
    # AND the result the sender is answered with is what was stored, as a repeat of the event would be answered
    assert write.doc == {k: v for k, v in doc.items() if k not in ("pk", "sk", "expiresAt")}


def test_a_result_stored_whole_is_answered_as_composed() -> None:
    fields: dict[str, Any] = {"status": "delivered", "datastreamId": "ds", "identityId": None, "handle": []}
    write = store(ScriptedDynamo()).compose_result("e1", fields, None)
    assert write.doc == {**fields, "eventId": "e1", "storedAt": write.doc["storedAt"]}


# -- claims of new events: PartiQL INSERTs, 25 to a BatchExecuteStatement --------------------------------------------


def raw_result(on: StoreOnMoto, event_id: str) -> dict[str, Any]:
    item: dict[str, Any] = on.ddb.get_item(TableName="t", Key=HandlesStore.result_key(event_id))["Item"]
    return item


@pytest.mark.parametrize("stamp", [None, ("2026-01-01T00:00:00.000Z", "p1|ds")], ids=["own-timestamp", "stamped"])
def test_a_new_events_insert_claim_writes_what_an_update_claim_writes(
    stamp: tuple[str, str] | None, store_on_moto: StoreOnMoto
) -> None:
    # WHEN one event is claimed with an INSERT and another with the one-by-one UpdateItem claim (each without its own
    # xdm.timestamp, or with one)
    inserted = store_on_moto.store.claim_new([("e-insert", "ds", "sqs", stamp, "p1", False)], lease_s=30)["e-insert"]
    updated = store_on_moto.store.claim(
        "e-update", datastream_id="ds", source="sqs", lease_s=30, stamp=stamp, owner="p1"
    )

    # THEN both are taken, and their items hold the same attributes (but for their ids and tokens)
    assert inserted.acquired and updated.acquired
    assert inserted.timestamp == updated.timestamp == (stamp[0] if stamp else None)
    assert inserted.item == updated.item  # what the result keeps of the claim: attempts 1, updatedAt
    a, b = raw_result(store_on_moto, "e-insert"), raw_result(store_on_moto, "e-update")
    assert a["claimToken"] == {"S": inserted.token}
    varying = {"pk", "eventId", "claimToken"}
    assert {k: v for k, v in a.items() if k not in varying} == {k: v for k, v in b.items() if k not in varying}
    assert a["claimedBy"] == {"SS": ["p1"]}  # whose it is, while it waits (relayctl forget)


def test_a_claim_names_every_identity_that_took_the_event_while_it_waits(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an event of p1's claimed with its batch and given back (waiting in the queue)
    store = store_on_moto.store
    first = store.claim_new([("e1", "ds", "sqs", None, "p1", False)], lease_s=30)["e1"]
    assert first.acquired and first.token
    store.release("e1", first.token, "edge unavailable")

    # WHEN another identity's event reusing its eventId takes it over, and an event without a primary identity
    taken = store.claim("e1", datastream_id="ds", source="sqs", lease_s=30, owner="p2")
    assert taken.acquired and taken.token
    store.release("e1", taken.token, "edge unavailable")
    store.claim("e1", datastream_id="ds", source="sqs", lease_s=30, owner="")

    # THEN the item names each of them (`relayctl forget` finds p1's event still waiting under p2's claim), and an
    # event without one as "-" (a string set holds no empty string: DynamoDB refuses one), by an INSERT claim too
    assert set(raw_result(store_on_moto, "e1")["claimedBy"]["SS"]) == {"p1", "p2", "-"}
    assert store.get_result("e1")["status"] == "pending"
    assert store.claim_new([("e2", "ds", "sqs", None, "", False), ("e3", "ds", "sqs", None, "p3", False)], lease_s=30)[
        "e2"
    ].acquired
    assert raw_result(store_on_moto, "e2")["claimedBy"] == {"SS": ["-"]}


def test_an_existing_event_is_not_claimed_by_insert_and_is_left_alone(store_on_moto: StoreOnMoto) -> None:
    # GIVEN a delivered event and a live claim of another invocation
    store = store_on_moto.store
    done = store.claim("e-done", datastream_id="ds", source="sqs", lease_s=30)
    assert done.token
    store.put_result(store.compose_result("e-done", {"status": "delivered", "datastreamId": "ds"}, done.item))
    assert store.claim("e-busy", datastream_id="ds", source="sqs", lease_s=30).acquired
    before = {e: raw_result(store_on_moto, e) for e in ("e-done", "e-busy")}

    # WHEN the batch INSERTs them with a new event
    claims = store.claim_new(
        [
            ("e-done", "ds", "sqs", None, "", False),
            ("e-new", "ds", "sqs", None, "", False),
            ("e-busy", "ds", "sqs", None, "", False),
        ],
        lease_s=30,
    )

    # THEN only the new one is taken; the others are untouched, and the one-by-one claim decides for them
    assert {e: c.acquired for e, c in claims.items()} == {"e-done": False, "e-new": True, "e-busy": False}
    assert {e: raw_result(store_on_moto, e) for e in ("e-done", "e-busy")} == before
    repeat = store.claim("e-done", datastream_id="ds", source="sqs", lease_s=30, token=claims["e-done"].token)
    assert not repeat.acquired and (repeat.existing or {})["status"] == "delivered"
    busy = store.claim("e-busy", datastream_id="ds", source="sqs", lease_s=30, token=claims["e-busy"].token)
    assert not busy.acquired


def test_a_claim_whose_insert_answer_was_lost_is_taken_with_its_own_token(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an INSERT that was written, though the relay saw it fail (its answer lost)
    first = store_on_moto.store.claim_new([("e1", "ds", "sqs", None, "", False)], lease_s=30)["e1"]

    # WHEN the event is claimed one by one with that token, and by someone else
    again = store_on_moto.store.claim("e1", datastream_id="ds", source="sqs", lease_s=30, token=first.token)
    other = store_on_moto.store.claim("e1", datastream_id="ds", source="sqs", lease_s=30)

    # THEN the token's holder has it (not a live claim to wait out), and no one else does
    assert again.acquired and again.token == first.token
    assert not other.acquired


def test_insert_claims_go_25_to_a_request(store_on_moto: StoreOnMoto, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = store_on_moto.ddb.batch_execute_statement

    def counted(**kwargs: Any) -> Any:
        sizes.append(len(kwargs["Statements"]))
        return real(**kwargs)

    monkeypatch.setattr(store_on_moto.ddb, "batch_execute_statement", counted)
    claims = store_on_moto.store.claim_new([(f"e{n}", "ds", "sqs", None, "", False) for n in range(60)], lease_s=30)
    assert sizes == [25, 25, 10]
    assert all(c.acquired for c in claims.values()) and len(claims) == 60


def test_an_insert_refused_per_statement_leaves_the_event_to_claim_alone(store_on_moto: StoreOnMoto) -> None:
    # GIVEN a table name the table does not have: DynamoDB answers each statement with an error
    store = HandlesStore(store_on_moto.ddb, "missing", ttl_days=30, clock=FakeClock())

    # WHEN the batch claims
    claims = store.claim_new([("e1", "ds", "sqs", None, "", False), ("e2", "ds", "sqs", None, "", False)], lease_s=30)

    # THEN nothing raises: no event is taken, and each has a token for its own claim
    assert [(c.acquired, bool(c.token)) for c in claims.values()] == [(False, True), (False, True)]


class RefusingDynamo:
    def batch_execute_statement(self, Statements: list[Any]) -> dict[str, Any]:  # noqa: N803 (boto3's name)
        raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "BatchExecuteStatement")


def test_a_refused_insert_request_leaves_every_event_to_claim_alone(caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN a role without dynamodb:PartiQLInsert (a policy written by hand)
    store = HandlesStore(RefusingDynamo(), "t", ttl_days=30, clock=FakeClock())

    # WHEN the batch claims
    claims = store.claim_new([("e1", "ds", "sqs", None, "", False), ("e2", "ds", "sqs", None, "", False)], lease_s=30)

    # THEN nothing raises, no event is taken (each claims alone), and the log says why
    assert [(c.acquired, bool(c.token)) for c in claims.values()] == [(False, True), (False, True)]
    [warning] = [r for r in caplog.records if r.getMessage().startswith("claims not batched")]
    assert "AccessDeniedException" in warning.reason  # type: ignore[attr-defined]


def test_an_insert_whose_answer_was_lost_still_counts_one_attempt(store_on_moto: StoreOnMoto) -> None:
    # GIVEN a BatchExecuteStatement that was written, though its answer never came
    real = store_on_moto.ddb.batch_execute_statement

    def lost(**kwargs: Any) -> Any:
        real(**kwargs)
        raise ReadTimeoutError(endpoint_url="http://dynamodb")

    store_on_moto.ddb.batch_execute_statement = lost
    tried = store_on_moto.store.claim_new([("e1", "ds", "sqs", None, "", False)], lease_s=30)["e1"]
    assert not tried.acquired

    # WHEN the event is claimed on its own with the INSERT's token
    claim = store_on_moto.store.claim("e1", datastream_id="ds", source="sqs", lease_s=30, token=tried.token)

    # THEN it is one attempt, not two: in the claim (the result keeps its count) and in the item (a release keeps it)
    assert claim.acquired and claim.item is not None and claim.token
    assert claim.item["attempts"] == {"N": "1"}
    assert raw_result(store_on_moto, "e1")["attempts"] == {"N": "1"}
    store_on_moto.store.release("e1", claim.token, "edge unavailable")
    again = store_on_moto.store.claim("e1", datastream_id="ds", source="sqs", lease_s=30)
    assert again.item is not None and again.item["attempts"] == {"N": "2"}


@pytest.mark.parametrize("taken_meanwhile", [False, True])
def test_a_webhooks_queue_send_pending_mark_is_cleared_once_sent_unless_the_event_was_taken_meanwhile(
    store_on_moto: StoreOnMoto, taken_meanwhile: bool
) -> None:
    from relay.integrations.store import queue_send_pending

    # GIVEN a webhook's claim given back for the retry queue, with the mark an ended invocation would leave
    store = store_on_moto.store
    claim = store.claim("e1", datastream_id="ds", source="webhook", lease_s=30)
    assert claim.token is not None
    store.release("e1", claim.token, queue_send_pending("edge answered 503"), marked=True)
    if taken_meanwhile:  # the queued message's batch took it before the webhook said it was sent
        assert store.claim("e1", datastream_id="ds", source="webhook", lease_s=30).acquired

    # WHEN the webhook has sent the message
    store.note_queued("e1", "edge answered 503", claim.token)

    # THEN the item says only why it waits; an attempt that took it meanwhile keeps its own record
    doc = _raw(store_on_moto, "e1")
    assert doc is not None
    if taken_meanwhile:
        assert doc["status"] == "pending"
    else:
        assert (doc["status"], doc["lastError"]) == ("queued", "edge answered 503")
        assert "queueSendBy" not in doc  # the claim's token is not kept once its mark has served


def _raw(stack: StoreOnMoto, event_id: str) -> dict[str, Any] | None:
    item = stack.ddb.get_item(TableName="t", Key={"pk": {"S": f"EVENT#{event_id}"}, "sk": {"S": "RESULT"}}).get("Item")
    return decode_item(item) if item else None


INVALID = {"datastreamId": "ds-1", "source": "sqs", "error": {"status": 400}, "request": '{"event": 7}'}


def _existing(stack: StoreOnMoto, event_id: str, kind: str) -> None:
    """An item for `event_id` in each state an invalid body must leave as it is."""
    store = stack.store
    if kind == "delivered":
        store.put_result(store.compose_result(event_id, {"status": "delivered", "handle": []}, None))
    elif kind == "edge-rejected":  # Edge's 500, replayable
        fields = {"status": "rejected", "error": {"status": 500}, "request": '{"event": {"xdm": {}}}'}
        store.put_result(store.compose_result(event_id, fields, None))
    elif kind in ("pending", "queued"):
        claim = store.claim(event_id, datastream_id="ds-1", source="webhook", lease_s=30)
        if kind == "queued":
            store.release(event_id, claim.token, "edge unavailable")
    elif kind == "another-invalid-body":
        store.reject_unclaimed(event_id, {**INVALID, "request": '{"event": 8}'}, body_digest="0" * 16)


@pytest.mark.parametrize("kind", ["delivered", "edge-rejected", "pending", "queued", "another-invalid-body"])
def test_an_invalid_body_never_replaces_another_outcome_and_is_kept_beside_it(
    store_on_moto: StoreOnMoto, kind: str
) -> None:
    # GIVEN an eventId that already holds an outcome
    _existing(store_on_moto, "order-7", kind)
    before = _raw(store_on_moto, "order-7")

    # WHEN an invalid body under the same eventId is rejected
    stored = store_on_moto.store.reject_unclaimed("order-7", INVALID, body_digest="a" * 16)

    # THEN the outcome there is untouched (Edge's rejection stays replayable), and the rejection is kept under an id of
    # its own, which the answer names; a queued event is only told where (its own message may be the one refused)
    after = _raw(store_on_moto, "order-7")
    assert after is not None
    note = after.pop("invalidFiling", None)
    assert after == before
    assert note == (stored["eventId"] if kind == "queued" else None)
    assert stored["eventId"] == "order-7#invalid-" + "a" * 16
    kept = _raw(store_on_moto, stored["eventId"])
    assert kept is not None
    assert (kept["status"], kept["rejectedBy"], kept["request"]) == ("rejected", "relay", '{"event": 7}')


def test_an_invalid_body_sent_again_lands_on_its_own_rejection(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an invalid body rejected under its eventId
    first = store_on_moto.store.reject_unclaimed("order-8", INVALID, body_digest="b" * 16)

    # WHEN the same body comes again (a resend, a redelivery)
    again = store_on_moto.store.reject_unclaimed("order-8", INVALID, body_digest="b" * 16)

    # THEN it is the same item, under the eventId itself: no second filing
    assert first["eventId"] == again["eventId"] == "order-8"
    items = store_on_moto.ddb.scan(TableName="t")["Items"]
    assert [i["pk"]["S"] for i in items] == ["EVENT#order-8"]


def test_a_corrected_event_still_takes_over_the_relays_rejection(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an invalid body rejected under its eventId
    store_on_moto.store.reject_unclaimed("order-9", INVALID, body_digest="c" * 16)

    # WHEN the corrected event is claimed under the same eventId
    claim = store_on_moto.store.claim("order-9", datastream_id="ds-1", source="sqs", lease_s=30)

    # THEN it is taken (and will be delivered there)
    assert claim.acquired


def test_a_corrected_event_that_ends_queued_keeps_nothing_of_the_refused_body(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an invalid body rejected under its eventId (the body, with any identities in it, kept in `request`)
    store_on_moto.store.reject_unclaimed(
        "order-10", {**INVALID, "receivedAt": "2026-01-01T00:00:00.000Z"}, body_digest="d" * 16
    )

    # WHEN its corrected resend takes the eventId, and its attempt is given back (Edge unavailable)
    claim = store_on_moto.store.claim("order-10", datastream_id="ds-1", source="webhook", lease_s=30)
    assert claim.acquired and claim.token
    store_on_moto.store.release("order-10", claim.token, "edge unavailable")

    # THEN the waiting item holds the retry, not the old refusal: no refused body (which `relayctl forget` does not
    # reach on a waiting item), no old error, digest or storage time
    item = _raw(store_on_moto, "order-10")
    assert item is not None and item["status"] == "queued"
    assert not {"request", "error", "bodyDigest", "storedAt", "rejectedBy", "receivedAt"} & set(item)


def test_a_refused_body_whose_clearing_failed_is_cleared_by_the_events_next_claim(
    store_on_moto: StoreOnMoto, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_on_moto.store
    # GIVEN an invalid body rejected under its eventId, taken over by its corrected resend whose clearing write failed
    # (DynamoDB throttled it), and whose attempt was then given back
    store.reject_unclaimed("order-11", INVALID, body_digest="e" * 16)
    real = store._update_own_claim

    def refused(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("throttled")

    monkeypatch.setattr(store, "_update_own_claim", refused)
    first = store.claim("order-11", datastream_id="ds-1", source="sqs", lease_s=30)
    monkeypatch.setattr(store, "_update_own_claim", real)
    assert first.acquired and first.token
    store.release("order-11", first.token, "edge unavailable")
    kept = _raw(store_on_moto, "order-11")
    assert kept is not None and kept["status"] == "queued" and "request" in kept  # (what the next claim must clear)

    # WHEN the event is claimed again (its redelivery)
    again = store.claim("order-11", datastream_id="ds-1", source="sqs", lease_s=30)

    # THEN the refusal is cleared then
    assert again.acquired
    item = _raw(store_on_moto, "order-11")
    assert item is not None and item["status"] == "pending"
    assert not {"request", "error", "bodyDigest", "storedAt", "rejectedBy"} & set(item)


def wait_under(store_on_moto: StoreOnMoto, event_id: str, kind: str, *, source: str) -> None:
    """Leave `event_id` waiting under datastream ds-1: `queued` (given back for a retry), or under a claim whose
    holder died (`lapsed-claim`: its lease ran out)."""
    claim = store_on_moto.store.claim(event_id, datastream_id="ds-1", source=source, lease_s=30)
    if kind == "queued":
        store_on_moto.store.release(event_id, claim.token, "edge unavailable")
    else:
        store_on_moto.clock.advance(60)


@pytest.mark.parametrize("kind", ["queued", "lapsed-claim"])
def test_a_waiting_event_is_taken_over_only_for_its_own_datastream(store_on_moto: StoreOnMoto, kind: str) -> None:
    # GIVEN an event waiting under its eventId for datastream ds-1: queued, or claimed by an attempt that died
    store = store_on_moto.store
    wait_under(store_on_moto, "order-6", kind, source="webhook")

    # WHEN the same eventId is claimed for another datastream (a captured webhook request replayed with another
    # `?datastreamId=`, which the signature does not cover)
    other = store.claim("order-6", datastream_id="attacker-ds", source="webhook", lease_s=30)

    # THEN it is not taken, and the waiting event still is, by its own datastream's attempt
    assert not other.acquired
    assert other.existing is not None and other.existing["datastreamId"] == "ds-1"
    assert store.claim("order-6", datastream_id="ds-1", source="webhook", lease_s=30).acquired


@pytest.mark.parametrize("kind", ["queued", "lapsed-claim"])
def test_a_queue_message_takes_its_waiting_event_over_whatever_datastream_it_now_resolves_to(
    store_on_moto: StoreOnMoto, kind: str
) -> None:
    # GIVEN a producer's event waiting under the default datastream ds-1 (its message names none)
    store = store_on_moto.store
    wait_under(store_on_moto, "order-7", kind, source="sqs")

    # WHEN its message comes again after the default datastream was changed to ds-2 (a redeploy)
    again = store.claim("order-7", datastream_id="ds-2", source="sqs", lease_s=30)

    # THEN it is taken (and delivered to ds-2), not stranded as busy until it reaches the dead-letter queue
    assert again.acquired


@pytest.mark.parametrize("kind", ["queued", "lapsed-claim"])
def test_an_event_still_waiting_is_told_where_a_refused_message_under_its_eventid_was_kept(
    store_on_moto: StoreOnMoto, kind: str
) -> None:
    # GIVEN an event waiting under its eventId: queued, or claimed by an attempt that died (lease lapsed)
    store = store_on_moto.store
    wait_under(store_on_moto, "order-5", kind, source="sqs")

    # WHEN a message under its eventId is refused as invalid (its own, say, under a newer rule; or another one)
    stored = store.reject_unclaimed("order-5", INVALID, body_digest="d" * 16)

    # THEN the rejection is kept beside it, and the event is told where (nothing is lost whichever message it was)
    assert stored["eventId"] == "order-5#invalid-" + "d" * 16
    waiting = _raw(store_on_moto, "order-5")
    assert waiting is not None
    assert (waiting["status"], waiting["invalidFiling"]) == (
        "queued" if kind == "queued" else "pending",
        stored["eventId"],
    )
    # AND the event's own message, if it comes, still claims it, and the note goes (the refused one was not its own)
    assert store.claim("order-5", datastream_id="ds-1", source="sqs", lease_s=30).acquired
    claimed = _raw(store_on_moto, "order-5")
    assert claimed is not None and "invalidFiling" not in claimed


def test_a_late_release_by_a_claim_that_was_taken_over_leaves_the_new_holders_result(
    store_on_moto: StoreOnMoto,
) -> None:
    # GIVEN an event claimed by a first invocation whose lease then ran out, taken over and delivered by a second
    store, clock = store_on_moto.store, store_on_moto.clock
    old = store.claim("e1", datastream_id="ds", source="sqs", lease_s=30)
    clock.advance(40)
    new = store.claim("e1", datastream_id="ds", source="sqs", lease_s=30)
    assert old.acquired and new.acquired and old.token != new.token
    store.put_result(store.compose_result("e1", {"status": "delivered", "datastreamId": "ds"}, new.item))

    # WHEN the first invocation, late, gives its claim back
    store.release("e1", old.token, "edge unavailable")

    # THEN the delivered result stands (a resend is answered from it, and Edge is not asked again)
    assert raw_result(store_on_moto, "e1")["status"] == {"S": "delivered"}


def test_a_reuse_rejection_never_replaces_a_delivered_result(store_on_moto: StoreOnMoto) -> None:
    # GIVEN a delivered event under an id (here one a sender chose that looks like the relay's `#reused-` ids)
    store = store_on_moto.store
    claim = store.claim("e9#reused-0123456789abcdef", datastream_id="ds", source="sqs", lease_s=30)
    store.put_result(
        store.compose_result("e9#reused-0123456789abcdef", {"status": "delivered", "datastreamId": "ds"}, claim.item)
    )

    # WHEN a rejection is filed under that id without a claim (as a reused eventId's is)
    store.reject_unclaimed(
        "e9#reused-0123456789abcdef", {"datastreamId": "ds", "source": "sqs", "error": {"title": "x"}}
    )

    # THEN the delivered outcome stands
    assert raw_result(store_on_moto, "e9#reused-0123456789abcdef")["status"] == {"S": "delivered"}


def test_an_invalid_bodys_filing_never_replaces_an_event_whose_own_id_has_its_shape(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an event delivered under an id shaped like the relay's filing of an invalid body under "e9" (a sender can
    # compute the digest of a body it is about to send), and eventId "e9" holding another outcome
    store = store_on_moto.store
    digest = "0123456789abcdef"
    shaped = f"e9#invalid-{digest}"
    for event_id in ("e9", shaped):
        claim = store.claim(event_id, datastream_id="ds", source="sqs", lease_s=30)
        store.put_result(store.compose_result(event_id, {"status": "delivered", "datastreamId": "ds"}, claim.item))
    fields = {"datastreamId": "ds", "source": "sqs", "error": {"title": "Invalid event"}, "request": "{"}

    # WHEN that invalid body arrives under "e9" (a review found its filing written over the delivered event, which a
    # resend could then claim and send to Edge again), twice
    first = store.reject_unclaimed("e9", fields, body_digest=digest)
    second = store.reject_unclaimed("e9", fields, body_digest=digest)

    # THEN the delivered outcome stands, it is still a repeat (never claimed again), and the body is kept under an id
    # of its own beside it (`relayctl rejected --event-id e9` lists it)
    assert raw_result(store_on_moto, shaped)["status"] == {"S": "delivered"}
    assert not store.claim(shaped, datastream_id="ds", source="sqs", lease_s=30).acquired
    for filed in (first, second):
        assert filed["eventId"].startswith(f"{shaped}-") and filed["eventId"] != shaped
        assert raw_result(store_on_moto, filed["eventId"])["status"] == {"S": "rejected"}
    # AND the filing of an ordinary invalid body still lands on one item, however often it comes
    again = [store.reject_unclaimed("e9", fields, body_digest="fedcba9876543210")["eventId"] for _ in range(2)]
    assert again == ["e9#invalid-fedcba9876543210"] * 2


@pytest.mark.parametrize("outcome", ["edge-rejected", "queued"])
def test_a_reuse_filing_never_replaces_an_event_whose_own_id_has_its_shape(
    outcome: str, store_on_moto: StoreOnMoto
) -> None:
    # GIVEN an event whose own eventId has the shape of the relay's filing of a reuse of "e9" (`reused_id`:
    # "<eventId>#reused-<16 hex>" of datastream and identity id, computable without an identity key), which Edge
    # rejected (replayable once Edge is fixed) or which waits in the queue
    store = store_on_moto.store
    shaped = "e9#reused-0123456789abcdef"
    claim = store.claim(shaped, datastream_id="ds", source="sqs", lease_s=30)
    assert claim.token
    if outcome == "edge-rejected":
        edge_problem = {"type": "https://ns.adobe.com/aep/errors/EXEG-0104-422", "status": 422}
        fields = {"status": "rejected", "datastreamId": "ds", "error": edge_problem}
        store.put_result(store.compose_result(shaped, fields, claim.item))
    else:
        store.release(shaped, claim.token, "edge call failed: ConnectTimeout")
    before = raw_result(store_on_moto, shaped)
    reuse = {"datastreamId": "ds", "source": "sqs", "identityId": "p2", "error": {"title": "eventId reused"}}

    # WHEN another identity's event reuses "e9" and is filed there, twice (a review found the event's own outcome
    # replaced by the relay's refusal: an Edge rejection that `replay --all-rejected` then skips, a waiting item)
    filed = [store.reject_unclaimed(shaped, reuse)["eventId"] for _ in range(2)]

    # THEN the event's own outcome stands, and the reuse is kept under an id of its own each time
    assert raw_result(store_on_moto, shaped) == before
    for filed_as in filed:
        assert filed_as.startswith(f"{shaped}-")
        assert raw_result(store_on_moto, filed_as)["status"] == {"S": "rejected"}
    # AND an ordinary reuse filing still lands on one item, however often its event comes
    ordinary = "e8#reused-fedcba9876543210"
    assert [store.reject_unclaimed(ordinary, reuse)["eventId"] for _ in range(2)] == [ordinary] * 2


def test_a_claim_botocore_sent_again_after_its_answer_was_lost_counts_one_attempt(store_on_moto: StoreOnMoto) -> None:
    # GIVEN a redelivered event's claim (`UpdateItem`, not an INSERT) applied by DynamoDB though its answer was lost:
    # boto3's standard retry mode sends the very same request again (read timeouts, dropped connections, 5xx)
    store = store_on_moto.store
    first = store.claim("e1", datastream_id="ds", source="sqs", lease_s=30)
    assert first.token
    store.release("e1", first.token, "edge unavailable")
    real = store_on_moto.ddb.update_item
    sent: list[dict[str, Any]] = []

    def applied_then_sent_again(**kwargs: Any) -> Any:
        if not sent:
            sent.append(kwargs)
            real(**kwargs)  # applied; its answer never came
        return real(**kwargs)  # botocore's retry of the same request (same token) is what the relay sees

    store_on_moto.ddb.update_item = applied_then_sent_again

    # WHEN the event is claimed again (its second attempt)
    claim = store.claim("e1", datastream_id="ds", source="sqs", lease_s=30)

    # THEN it is the second attempt, not the third: in the claim (the result keeps its count) and in the item
    assert sent and claim.acquired and claim.item is not None
    assert claim.item["attempts"] == {"N": "2"}
    assert raw_result(store_on_moto, "e1")["attempts"] == {"N": "2"}


def sent_timestamps(edge: FakeEdge) -> list[str]:
    return [call.request["event"]["xdm"]["timestamp"] for call in edge.calls]


@pytest.mark.parametrize("source", ["webhook", "sqs"])
def test_a_resend_of_an_event_the_relay_stamped_carries_the_first_attempts_time(
    source: Source, store_on_moto: StoreOnMoto
) -> None:
    # GIVEN an event without xdm.timestamp (the relay sets the receive time), whose first attempt Edge did not answer
    # (it may have reached Edge), handed back; then the sender's resend (a webhook retry, a producer's new message)
    # 90 s later, under the same xdm._id
    store, clock = store_on_moto.store, store_on_moto.clock
    edge = FakeEdge(
        EdgeUnavailable("edge call failed: ReadTimeout"), EdgeAnswer(200, {"requestId": "r", "handle": []}, 1)
    )
    relay = Relay(store, edge, clock)  # type: ignore[arg-type]
    doc = {"event": {"xdm": {"_id": "ev-1"}}}

    def attempt(received_at: float) -> Outcome:
        inbound = build_inbound(doc, event_id="ev-1", datastream_id="ds", source=source, received_at=received_at)
        return relay.process(inbound, Deadline(clock, 20), lease_s=25).outcome

    # WHEN both come
    assert attempt(clock.now()) is Outcome.RETRY
    clock.advance(90)
    assert attempt(clock.now()) is Outcome.DELIVERED

    # THEN Edge got one event, one time: the second carries the first attempt's timestamp, not its own receive time
    first, second = sent_timestamps(edge)
    assert second == first


def test_the_first_attempts_time_is_kept_by_a_batch_insert_claim_too(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an SQS event without xdm.timestamp claimed with its batch (an INSERT) and handed back
    store = store_on_moto.store
    person = "p1|ds"
    claimed = store.claim_new([("ev-1", "ds", "sqs", ("2026-01-01T00:00:00.000Z", person), "p1", False)], lease_s=25)[
        "ev-1"
    ]
    assert claimed.acquired and claimed.token and claimed.timestamp == "2026-01-01T00:00:00.000Z"
    store.release("ev-1", claimed.token, "edge unavailable")

    # WHEN a producer's resend (a new message, a later SentTimestamp) claims it, and a sender's own timestamp does
    again = store.claim(
        "ev-1", datastream_id="ds", source="sqs", lease_s=25, stamp=("2026-01-01T00:01:30.000Z", person)
    )
    assert again.token
    store.release("ev-1", again.token, "edge unavailable")
    own = store.claim("ev-1", datastream_id="ds", source="sqs", lease_s=25)

    # THEN the first time is what the resend sends; an event with its own timestamp is told none
    assert again.acquired and again.timestamp == "2026-01-01T00:00:00.000Z"
    assert own.acquired and own.timestamp is None


def test_another_event_reusing_a_waiting_events_id_keeps_its_own_time(store_on_moto: StoreOnMoto) -> None:
    # GIVEN one person's event without xdm.timestamp, tried and waiting (queued) for its retry
    store = store_on_moto.store
    first = store.claim(
        "ev-1", datastream_id="ds", source="sqs", lease_s=25, stamp=("2026-01-01T00:00:00.000Z", "p1|ds")
    )
    assert first.token
    store.release("ev-1", first.token, "edge unavailable")

    # WHEN another person's event under the same xdm._id takes it over before the first is done (a reuse is told only
    # once the first has an outcome)
    other = store.claim(
        "ev-1", datastream_id="ds", source="sqs", lease_s=25, stamp=("2026-01-01T01:00:00.000Z", "p2|ds")
    )

    # THEN it goes with its own time, not the other event's
    assert other.acquired and other.timestamp == "2026-01-01T01:00:00.000Z"


def test_an_event_with_its_own_timestamp_is_sent_as_it_came(store_on_moto: StoreOnMoto) -> None:
    # GIVEN an event whose sender set xdm.timestamp, tried once, then resent with another timestamp
    store, clock = store_on_moto.store, store_on_moto.clock
    edge = FakeEdge(EdgeUnavailable("edge answered 503"), EdgeAnswer(200, {"requestId": "r", "handle": []}, 1))
    relay = Relay(store, edge, clock)  # type: ignore[arg-type]
    for stamp in ("2026-01-01T00:00:00.000Z", "2026-01-01T00:05:00.000Z"):
        doc = {"event": {"xdm": {"_id": "ev-1", "timestamp": stamp}}}
        inbound = build_inbound(doc, event_id="ev-1", datastream_id="ds", source="webhook", received_at=clock.now())
        relay.process(inbound, Deadline(clock, 20), lease_s=25)

    # THEN each attempt sent the sender's own timestamp, untouched
    assert sent_timestamps(edge) == ["2026-01-01T00:00:00.000Z", "2026-01-01T00:05:00.000Z"]


T1, T2, T3 = "2026-01-01T00:00:00.000Z", "2026-01-01T00:01:30.000Z", "2026-01-01T00:03:00.000Z"


def test_every_later_attempt_of_an_event_keeps_its_first_time(store_on_moto: StoreOnMoto) -> None:
    # GIVEN one event without its own timestamp, claimed and handed back three times (each attempt's receive time)
    store = store_on_moto.store
    times = []
    for receive_time in (T1, T2, T3):
        claim = store.claim("ev-1", datastream_id="ds", source="sqs", lease_s=25, stamp=(receive_time, "p1|ds"))
        assert claim.token
        times.append(claim.timestamp)
        store.release("ev-1", claim.token, "edge unavailable")

    # THEN every attempt goes with the first one's time (a third time under one _id would be a third event time)
    assert times == [T1, T1, T1]


def test_the_first_event_keeps_its_time_after_another_event_reusing_its_id_waited(store_on_moto: StoreOnMoto) -> None:
    # GIVEN one person's event, tried and waiting; then another person's under the same _id, tried and waiting too
    store = store_on_moto.store
    for receive_time, whose in ((T1, "p1|ds"), (T2, "p2|ds")):
        claim = store.claim("ev-1", datastream_id="ds", source="sqs", lease_s=25, stamp=(receive_time, whose))
        assert claim.token
        store.release("ev-1", claim.token, "edge unavailable")

    # WHEN the first person's event is tried again
    again = store.claim("ev-1", datastream_id="ds", source="sqs", lease_s=25, stamp=(T3, "p1|ds"))

    # THEN it still goes with its own first time (the other event did not take the time, nor whose it is)
    assert again.timestamp == T1


def test_a_result_is_taken_for_this_attempts_only_with_its_own_storedat(store_on_moto: StoreOnMoto) -> None:
    # GIVEN this attempt's result write, and an item that holds a result of the same status written by another
    # attempt (one that took the event over once this attempt's lease lapsed)
    write = store_on_moto.store.compose_result("ev-1", {"status": "delivered", "datastreamId": "ds"}, None)
    other = {**write.doc, "storedAt": "2000-01-01T00:00:00.000Z"}

    # WHEN / THEN only the item with this write's storedAt is this write (the other's would be answered and counted
    # twice as this attempt's)
    assert store_on_moto.store.holds(write.doc, write)
    assert not store_on_moto.store.holds(other, write)


@pytest.mark.parametrize(
    ("detail", "kept"),
    [(None, {"detail": None}), (7, {"detail": 7}), (["a", "b"], {}), ({"reason": "x"}, {}), ("absent", {})],
    ids=["null", "number", "list", "object", "absent"],
)
def test_a_cut_problem_keeps_a_detail_only_as_edge_sent_it(detail: Any, kept: dict[str, Any]) -> None:
    # GIVEN an Edge problem of 450 KB whose detail is not a string (or is not there)
    problem: dict[str, Any] = {
        "type": "x/EXEG-0201-502",
        "status": 502,
        "title": "T",
        "report": {"blob": noise(450_000)},
    }
    if detail != "absent":
        problem["detail"] = detail

    # WHEN it is stored
    request = {"event": {"xdm": {"_id": "e1"}, "data": {"pad": noise(53_000)}}}  # with it, the item is over the limit
    doc, _ = composed({"status": "rejected", "error": problem, "request": request})

    # THEN what is kept of its detail is Edge's own value or nothing: never a made-up text ("None", a Python repr)
    assert doc["errorTrimmed"] is True
    assert doc["error"] == {"type": "x/EXEG-0201-502", "status": 502, "title": "T", **kept}


def test_a_table_that_does_not_exist_is_named_as_the_setting_to_check(store_on_moto: StoreOnMoto) -> None:
    from relay.errors import StoreUnavailable
    from relay.integrations.store import HandlesStore

    # GIVEN HANDLES_TABLE naming no table (a typo, or another region's table, outside the template)
    store = HandlesStore(store_on_moto.ddb, "t-typo", ttl_days=30, clock=store_on_moto.clock)

    # WHEN an event is claimed, THEN the failure (logged with the event's retry, kept in batch summaries) says which
    # setting to check, not only DynamoDB's error code
    with pytest.raises(StoreUnavailable) as failed:
        store.claim("evt-1", datastream_id="ds-1", source="sqs", lease_s=30)
    assert str(failed.value) == (
        "dynamodb update_item failed: ResourceNotFoundException (no such table: check HANDLES_TABLE and the region)"
    )
    assert failed.value.code == "ResourceNotFoundException"


def test_a_table_the_function_may_not_use_is_named_as_the_setting_to_check() -> None:
    from relay.errors import StoreUnavailable
    from relay.integrations.store import HandlesStore

    from tests.fakes import FakeClock

    class Refusing:
        def update_item(self, **kwargs: Any) -> None:
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "m"}}, "UpdateItem")

    # WHEN an event is claimed on a table the function's role may not write (an IAM gap, outside the template)
    store = HandlesStore(Refusing(), "t", ttl_days=30, clock=FakeClock())
    with pytest.raises(StoreUnavailable) as failed:
        store.claim("evt-1", datastream_id="ds-1", source="sqs", lease_s=30)

    # THEN the reason says what to check
    assert str(failed.value) == (
        "dynamodb update_item failed: AccessDeniedException (check the function's permissions on HANDLES_TABLE)"
    )


def test_a_refused_body_sent_again_keeps_the_time_it_first_came(store_on_moto: StoreOnMoto) -> None:
    # GIVEN a webhook body refused for its datastream alone (the allow-list left the default out), whose sender retries
    # it two hours later (Standard Webhooks senders retry a 4xx too) (review "s31")
    from relay.errors import InvalidEvent
    from relay.models import DEFAULT_NOT_ALLOWED

    relay = Relay(store_on_moto.store, None, store_on_moto.clock)  # type: ignore[arg-type]
    body = '{"event":{"xdm":{"_id":"ord-1"}}}'
    t0 = 1_700_000_000.0
    for received in (t0, t0 + 7200):
        refusal = InvalidEvent([{"path": "datastreamId", "message": DEFAULT_NOT_ALLOWED}])
        relay.reject_invalid(
            "ord-1", datastream_id="ds-1", source="webhook", error=refusal, raw=body, received_at=received
        )

    # WHEN / THEN the refusal keeps the first time: what a replay sends as the event's xdm.timestamp, as a retry of an
    # event that gave none would have been sent
    item = store_on_moto.ddb.get_item(TableName="t", Key=HandlesStore.result_key("ord-1"))["Item"]
    assert item["receivedAt"]["S"] == "2023-11-14T22:13:20.000Z"


TABLE_ARN = "arn:aws:dynamodb:us-east-1:123456789012:table/t"


class AnswersByName:
    """DynamoDB as it may answer a batch request that named the table by its ARN: keyed by the table's name."""

    def __init__(self) -> None:
        self.state = {"pk": {"S": "IDENTITY#o1"}, "sk": {"S": "STATE#ds"}, "version": {"N": "3"}}

    def batch_write_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:  # noqa: N803 (boto3's name)
        (writes,) = RequestItems.values()
        return {"UnprocessedItems": {"t": writes[:1]}}

    def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:  # noqa: N803 (boto3's name)
        return {"Responses": {"t": [self.state]}}


def test_a_table_named_by_its_arn_loses_no_unprocessed_result_and_finds_its_states() -> None:
    # GIVEN HANDLES_TABLE as an ARN (which the relay takes), and answers keyed by the table's name (review "batch":
    # read under the ARN only, an unprocessed result counted as written, its event acknowledged and lost)
    s = HandlesStore(AnswersByName(), TABLE_ARN, ttl_days=30, clock=FakeClock())

    # WHEN results are written and states read
    failed = s.put_results(writes(s, 3))
    states = s.get_states([("o1", "ds")])

    # THEN the unprocessed one is reported (its record redelivered), and the state is the one DynamoDB answered
    assert failed == {"e0": "dynamodb batch_write_item left the item unprocessed"}
    assert states[("o1", "ds")].version == 3
