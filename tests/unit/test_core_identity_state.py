"""relay.identity_state: state:store entries and location hints kept per identity (reference §4-§5)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import pytest
from relay.identity_state import (
    MAX_ENTRY_BYTES,
    MAX_HINT_TTL_S,
    MAX_LIFETIME_S,
    MAX_STATE_BYTES,
    SESSION_ENTRY_S,
    IdentityState,
    StoredEntry,
    apply_handles,
    needs_write,
    opaque_identity_id,
    outgoing_entries,
    state_from_item,
    state_to_item,
)

from devtools.edge_sim import FIXTURE_DIR

FIXTURE = FIXTURE_DIR / "send-event-with-identity.json"  # Adobe's answer, kept in the repo
NOW = 1_700_000_000.0
IDENTITY_KEY = "kndctr_5BFE274A5F6980A50A495C08_AdobeOrg_identity"
CLUSTER_KEY = "kndctr_5BFE274A5F6980A50A495C08_AdobeOrg_cluster"
IDENTITY_VALUE = "CiQ0MTg2MTY2NjE5MzE0MDE2MTkzNDI3Njg0NTY1MTE0ODg3Njk4OA=="


def fixture_handles() -> list[dict[str, Any]]:
    return json.loads(FIXTURE.read_text())["handle"]


def store_handle(*items: Any) -> dict[str, Any]:
    return {"type": "state:store", "payload": list(items)}


def hint_handle(*items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "locationHint:result", "payload": list(items)}


# -- opaque ids ----------------------------------------------------------------------------------------------------


def test_opaque_identity_id_is_a_stable_hash_without_the_value():
    # GIVEN
    namespace, value = "Email", "alice@example.com"

    # WHEN
    opaque = opaque_identity_id(namespace, value)

    # THEN
    assert opaque == opaque_identity_id("Email", "alice@example.com")
    assert len(opaque) == 64
    assert all(c in "0123456789abcdef" for c in opaque)
    assert "alice" not in opaque and "example" not in opaque
    assert opaque != opaque_identity_id("Email", "bob@example.com")
    assert opaque != opaque_identity_id("FPID", "alice@example.com")
    # the separator keeps (a, bc) and (ab, c) apart
    assert opaque_identity_id("a", "bc") != opaque_identity_id("ab", "c")


# -- apply_handles -------------------------------------------------------------------------------------------------


def test_apply_handles_stores_fixture_entries_and_hint():
    # GIVEN an empty state and Edge's answer with identity, hint and state:store handles
    handles = fixture_handles()

    # WHEN
    state = apply_handles(IdentityState(), handles, NOW)

    # THEN
    assert state.entries == {
        IDENTITY_KEY: StoredEntry(IDENTITY_VALUE, NOW + 34128000, 34128000, None),
        CLUSTER_KEY: StoredEntry("or2", NOW + 1800, 1800, None),
    }
    assert state.hint == "or2"
    assert state.hint_expires_at == NOW + 1800
    assert state.live_hint(NOW + 1799) == "or2"
    assert state.live_hint(NOW + 1800) is None
    assert state.expires_at() == NOW + 34128000


def test_apply_handles_does_not_mutate_the_old_state():
    # GIVEN
    old = IdentityState(entries={"a": StoredEntry("1", NOW + 100, 100)}, hint="va6", hint_expires_at=NOW + 100)
    before = copy.deepcopy(old)

    # WHEN
    apply_handles(old, fixture_handles(), NOW)

    # THEN
    assert old == before


def test_apply_handles_max_age_zero_or_negative_deletes_the_key():
    # GIVEN
    old = IdentityState(
        entries={
            "a": StoredEntry("1", NOW + 100, 100),
            "b": StoredEntry("2", NOW + 100, 100),
            "c": StoredEntry("3", NOW + 100, 100),
        }
    )
    handles = [store_handle({"key": "a", "value": "", "maxAge": 0}, {"key": "b", "value": "", "maxAge": -1})]

    # WHEN
    new = apply_handles(old, handles, NOW)

    # THEN
    assert new.entries == {"c": StoredEntry("3", NOW + 100, 100)}


def test_apply_handles_ignores_items_without_key_value_or_numeric_max_age():
    # GIVEN
    old = IdentityState(entries={"a": StoredEntry("1", NOW + 100, 100)})
    handles: list[Any] = [
        store_handle(
            {"key": "b", "maxAge": 10},  # no value
            {"value": "v", "maxAge": 10},  # no key
            {"key": "c", "value": "v", "maxAge": "10"},  # maxAge not a number
            {"key": "d", "value": "v", "maxAge": True},  # a bool is not a number here
            "not-an-object",
        ),
        "not-a-handle",
        {"type": "state:store", "payload": {"key": "e", "value": "v", "maxAge": 10}},  # payload not a list
    ]

    # WHEN
    new = apply_handles(old, handles, NOW)

    # THEN
    assert new.entries == {"a": StoredEntry("1", NOW + 100, 100)}


# An entry without `maxAge` is a session entry (Adobe, "Client state management": "When missing, entries should be
# stored only for the current session"; its example sends `..._personalization_sessionId` back).
SESSION_KEY = "kndctr_5BFE274A5F6980A50A495C08_AdobeOrg_personalization_sessionId"


def test_an_entry_without_max_age_is_kept_for_the_session_and_sent_back_without_one():
    # GIVEN an answer with the identity entry and a session entry (no maxAge)
    handles = [
        store_handle(
            {"key": IDENTITY_KEY, "value": IDENTITY_VALUE, "maxAge": 34128000},
            {"key": SESSION_KEY, "value": "0a88f43e-044b-41a6-a4f3-6c2848bbc672"},
        )
    ]

    # WHEN it is folded in, and the identity's next event is sent a minute later
    state = apply_handles(IdentityState(), handles, NOW)
    sent = outgoing_entries(state, [], NOW + 60)

    # THEN the session entry goes back as the Web SDK sends a session cookie: without a maxAge
    assert {"key": SESSION_KEY, "value": "0a88f43e-044b-41a6-a4f3-6c2848bbc672"} in sent
    assert state.entries[SESSION_KEY] == StoredEntry(
        "0a88f43e-044b-41a6-a4f3-6c2848bbc672", NOW + SESSION_ENTRY_S, int(SESSION_ENTRY_S), session=True, set_at=NOW
    )
    assert needs_write(IdentityState(), state, NOW) is True


@pytest.mark.parametrize("given", [{}, {"maxAge": None}])
def test_a_session_entry_replaces_the_entry_of_its_key(given):
    # GIVEN a stored entry, then an answer that sets its key without a lifetime (absent, or null)
    old = IdentityState(entries={"a": StoredEntry("1", NOW + 100, 100)})

    # WHEN
    new = apply_handles(old, [store_handle({"key": "a", "value": "changed", **given})], NOW)

    # THEN
    session = StoredEntry("changed", NOW + SESSION_ENTRY_S, int(SESSION_ENTRY_S), session=True, set_at=NOW)
    assert new.entries == {"a": session}


def test_a_session_lasts_while_the_identity_has_answers_and_ends_after_half_an_hour_without():
    # GIVEN a session entry set at NOW
    state = apply_handles(IdentityState(), [store_handle({"key": SESSION_KEY, "value": "s1"})], NOW)

    # WHEN answers that do not carry it come 20 and 40 minutes later (Edge's session: its hint's 30 minutes)
    for minutes in (20, 40):
        hint = hint_handle({"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": 1800})
        state = apply_handles(state, [hint], NOW + minutes * 60)

    # THEN it is still sent 29 minutes after the last one, and no longer 33 minutes after it (30, and the tenth its
    # extension may go unwritten)
    last = NOW + 40 * 60
    assert [e["key"] for e in outgoing_entries(state, [], last + 29 * 60)] == [SESSION_KEY]
    assert outgoing_entries(state, [], last + SESSION_ENTRY_S * 1.1) == []
    # and once lapsed, an answer does not bring it back
    assert SESSION_KEY not in apply_handles(state, [], last + SESSION_ENTRY_S * 1.1 + 1).entries


def test_a_session_entry_whose_extension_was_not_written_is_still_sent_within_the_session():
    # GIVEN a stored session entry, and an answer 170 s later that extends it without a write (not due yet)
    stored = apply_handles(IdentityState(), [store_handle({"key": SESSION_KEY, "value": "s1"})], NOW)
    later = apply_handles(stored, [], NOW + 170)
    assert needs_write(stored, later, NOW + 170) is False

    # WHEN the identity's next event comes 28 minutes after that answer, with the stored state (review "s31")
    sent = outgoing_entries(stored, [], NOW + 170 + 28 * 60)

    # THEN the entry is sent: its session has not ended
    assert [e["key"] for e in sent] == [SESSION_KEY]


def test_a_session_extension_is_written_only_once_due_like_the_hint():
    # GIVEN a stored session entry
    old = apply_handles(IdentityState(), [store_handle({"key": SESSION_KEY, "value": "s1"})], NOW)

    # WHEN answers without it come a minute later, then 181 s later (a tenth of 1800 s has passed)
    soon, due = NOW + 60, NOW + 181

    # THEN the first extension is not written, the second is
    assert needs_write(old, apply_handles(old, [], soon), soon) is False
    assert needs_write(old, apply_handles(old, [], due), due) is True


def test_an_older_answer_merged_later_does_not_replace_a_newer_session_entry():
    # GIVEN a session entry an answer at NOW + 10 set (another invocation's, written first)
    stored = apply_handles(IdentityState(), [store_handle({"key": SESSION_KEY, "value": "newer"})], NOW + 10)

    # WHEN an answer from NOW, with the value it replaced, is merged onto it after a write conflict
    merged = apply_handles(stored, [store_handle({"key": SESSION_KEY, "value": "older"})], NOW)

    # THEN the newer value stands, with its own expiry
    assert merged.entries[SESSION_KEY] == stored.entries[SESSION_KEY]


def test_an_older_answer_that_set_a_session_entry_after_it_was_set_wins_over_a_later_answer_that_only_went_on():
    # GIVEN a session entry set at NOW, its session extended by an answer at NOW + 20 that did not carry it
    stored = apply_handles(IdentityState(), [store_handle({"key": SESSION_KEY, "value": "v1"})], NOW)
    stored = apply_handles(stored, [], NOW + 20)

    # WHEN an answer from NOW + 10 that gave it a new value is merged onto it after a write conflict
    merged = apply_handles(stored, [store_handle({"key": SESSION_KEY, "value": "v2"})], NOW + 10)

    # THEN that value is the latest Edge gave, and stands; the session still runs from NOW + 20
    assert merged.entries[SESSION_KEY].value == "v2"
    assert merged.entries[SESSION_KEY].expires_at == NOW + 20 + SESSION_ENTRY_S
    # and it is kept as such: read back, an answer older than NOW + 10 does not replace it
    back = state_from_item(json.loads(json.dumps(state_to_item(merged))), 1)
    assert apply_handles(back, [store_handle({"key": SESSION_KEY, "value": "v0"})], NOW + 5).entries == back.entries


def test_a_session_entry_is_stored_and_read_back_as_one():
    # GIVEN
    state = apply_handles(IdentityState(), [store_handle({"key": SESSION_KEY, "value": "s1"})], NOW)

    # WHEN
    item = state_to_item(state)
    back = state_from_item(json.loads(json.dumps(item)), 1)

    # THEN
    assert item["entries"][SESSION_KEY] == {
        "value": "s1",
        "expiresAt": NOW + SESSION_ENTRY_S,
        "maxAge": int(SESSION_ENTRY_S),
        "session": True,
        "setAt": NOW,
    }
    assert back.entries == state.entries


def test_apply_handles_replaces_an_entry_with_the_same_key_and_keeps_attrs():
    # GIVEN
    old = IdentityState(entries={"a": StoredEntry("1", NOW + 100, 100)})
    handles = [store_handle({"key": "a", "value": "2", "maxAge": 50.5, "attrs": {"SameSite": "None"}})]

    # WHEN
    new = apply_handles(old, handles, NOW)

    # THEN
    assert new.entries == {"a": StoredEntry("2", NOW + 50.5, 50, {"SameSite": "None"})}


def test_apply_handles_drops_expired_entries():
    # GIVEN one entry that lapsed before this answer
    old = IdentityState(entries={"old": StoredEntry("x", NOW - 1, 100), "live": StoredEntry("y", NOW + 1, 100)})

    # WHEN
    new = apply_handles(old, [], NOW)

    # THEN
    assert new.entries == {"live": StoredEntry("y", NOW + 1, 100)}


def test_apply_handles_without_edge_network_hint_leaves_the_stored_hint():
    # GIVEN a stored hint and an answer whose hints are for other scopes only
    old = IdentityState(hint="va6", hint_expires_at=NOW + 600)
    handles = [hint_handle({"scope": "Target", "hint": "35", "ttlSeconds": 1800})]

    # WHEN
    new = apply_handles(old, handles, NOW)

    # THEN
    assert (new.hint, new.hint_expires_at) == ("va6", NOW + 600)


def test_apply_handles_takes_the_first_edge_network_hint_only():
    # GIVEN
    handles = [
        hint_handle({"scope": "EdgeNetwork", "hint": "irl1", "ttlSeconds": 900}),
        hint_handle({"scope": "EdgeNetwork", "hint": "va6", "ttlSeconds": 1800}),
    ]

    # WHEN
    new = apply_handles(IdentityState(hint="or2", hint_expires_at=NOW + 10), handles, NOW)

    # THEN
    assert (new.hint, new.hint_expires_at) == ("irl1", NOW + 900)


def test_apply_handles_edge_network_hint_without_ttl_keeps_the_stored_one():
    # GIVEN
    old = IdentityState(hint="va6", hint_expires_at=NOW + 600)
    handles = [hint_handle({"scope": "EdgeNetwork", "hint": "or2"})]

    # WHEN
    new = apply_handles(old, handles, NOW)

    # THEN
    assert (new.hint, new.hint_expires_at) == ("va6", NOW + 600)


def test_apply_handles_clears_a_lapsed_hint():
    # GIVEN a hint that lapsed, and an answer with none
    old = IdentityState(hint="va6", hint_expires_at=NOW - 1)

    # WHEN
    new = apply_handles(old, [], NOW)

    # THEN
    assert (new.hint, new.hint_expires_at) == (None, 0.0)


def test_apply_handles_keeps_the_version():
    # GIVEN
    old = IdentityState(version=7)

    # WHEN / THEN
    assert apply_handles(old, fixture_handles(), NOW).version == 7


# -- outgoing_entries ----------------------------------------------------------------------------------------------


def test_outgoing_entries_sends_live_entries_with_remaining_max_age():
    # GIVEN the fixture state, 100 s later
    state = apply_handles(IdentityState(), fixture_handles(), NOW)

    # WHEN
    entries = outgoing_entries(state, [], NOW + 100)

    # THEN (sorted by key)
    assert entries == [
        {"key": CLUSTER_KEY, "value": "or2", "maxAge": 1700},
        {"key": IDENTITY_KEY, "value": IDENTITY_VALUE, "maxAge": 34127900},
    ]


def test_outgoing_entries_drops_expired_entries():
    # GIVEN the fixture state once the cluster entry has lapsed, a tenth of its lifetime past its expiry included
    state = apply_handles(IdentityState(), fixture_handles(), NOW)

    # WHEN
    entries = outgoing_entries(state, [], NOW + 1800 + 180)

    # THEN
    assert entries == [{"key": IDENTITY_KEY, "value": IDENTITY_VALUE, "maxAge": 34126020}]
    # AND an entry that routes nothing is not sent past its expiry at all
    other = IdentityState(entries={"kndctr_X_AdobeOrg_consent": StoredEntry("in", NOW + 1800, 1800)})
    assert outgoing_entries(other, [], NOW + 1800) == []


@pytest.mark.parametrize("skipped_at", [1, 170, 179])
def test_an_extension_that_was_not_written_does_not_end_the_route_before_edge_does(skipped_at):
    # GIVEN the fixture state written at NOW, and the same answer at NOW + skipped_at, which extends the hint and the
    # cluster entry to NOW + skipped_at + 1800 at Edge but is not due to be written
    stored = apply_handles(IdentityState(), fixture_handles(), NOW)
    later = NOW + skipped_at
    assert needs_write(stored, apply_handles(stored, fixture_handles(), later), later) is False

    # WHEN the identity's next event comes after the stored expiry, before Edge's
    now = NOW + 1800 + skipped_at - 1

    # THEN it is still routed by the hint, and the cluster entry is sent back (the identity entry as always)
    assert stored.route_hint(now) == "or2"
    assert [e["key"] for e in outgoing_entries(stored, [], now)] == [CLUSTER_KEY, IDENTITY_KEY]
    # AND the item lives as long as that (its TTL)
    assert stored.expires_at() >= NOW + 1800 + 180


def test_a_route_is_not_used_past_what_an_unwritten_extension_could_add():
    # GIVEN the fixture state written at NOW (hint and cluster entry for 1800 s)
    stored = apply_handles(IdentityState(), fixture_handles(), NOW)

    # WHEN / THEN a tenth of the lifetime past the stored expiry, neither routes a call any more
    assert stored.route_hint(NOW + 1800 + 179) == "or2"
    assert stored.route_hint(NOW + 1800 + 180) is None
    assert [e["key"] for e in outgoing_entries(stored, [], NOW + 1800 + 180)] == [IDENTITY_KEY]
    # AND a hint stored by an earlier version (no hintTtl) ends with the cluster entry Edge set beside it, whose
    # lifetime is stored: the call never goes to the plain route carrying a cluster entry that names a region
    legacy = replace(stored, hint_ttl=0.0)
    assert (legacy.route_hint(NOW + 1979), legacy.route_hint(NOW + 1980)) == ("or2", None)
    assert CLUSTER_KEY in legacy.sendable_entries(NOW + 1979) and legacy.sendable_entries(NOW + 1980).keys() == {
        IDENTITY_KEY
    }
    # AND without such an entry its lifetime is not known: it ends at its expiry
    alone = replace(legacy, entries={k: e for k, e in legacy.entries.items() if k != CLUSTER_KEY})
    assert (alone.route_hint(NOW + 1799), alone.route_hint(NOW + 1800)) == ("or2", None)


def test_an_answer_that_deletes_a_cluster_entry_in_its_grace_is_written():
    # GIVEN the fixture state written at NOW, its cluster entry past its stored expiry but within its grace
    stored = apply_handles(IdentityState(), fixture_handles(), NOW)
    now = NOW + 1850
    assert CLUSTER_KEY in stored.sendable_entries(now)

    # WHEN Edge's answer deletes it (maxAge 0), with no hint
    deleting = [{"type": "state:store", "payload": [{"key": CLUSTER_KEY, "value": "", "maxAge": 0}]}]
    new = apply_handles(stored, deleting, now)

    # THEN it is gone from the state, and the state is written: the next event must not send it back
    assert CLUSTER_KEY not in new.entries
    assert needs_write(stored, new, now) is True
    assert CLUSTER_KEY not in new.sendable_entries(now + 1)


def test_an_answer_without_a_hint_leaves_a_hint_in_its_grace_as_it_is():
    # GIVEN the fixture state written at NOW, its hint past its stored expiry but within its grace
    stored = apply_handles(IdentityState(), fixture_handles(), NOW)
    now = NOW + 1850

    # WHEN an answer carries no EdgeNetwork hint (nor anything else)
    new = apply_handles(stored, [{"type": "identity:result", "payload": []}], now)

    # THEN the hint still routes until its grace ends, and nothing needs writing
    assert new.route_hint(now) == "or2"
    assert needs_write(stored, new, now) is False


def test_outgoing_entries_caller_entries_win_by_key():
    # GIVEN
    state = apply_handles(IdentityState(), fixture_handles(), NOW)
    caller = [{"key": CLUSTER_KEY, "value": "va6"}, {"key": "mine", "value": "1"}]

    # WHEN
    entries = outgoing_entries(state, caller, NOW)

    # THEN
    assert entries == [
        {"key": IDENTITY_KEY, "value": IDENTITY_VALUE, "maxAge": 34128000},
        {"key": CLUSTER_KEY, "value": "va6"},
        {"key": "mine", "value": "1"},
    ]


def test_outgoing_entries_max_age_is_at_least_one_second():
    # GIVEN an entry with half a second left
    state = IdentityState(entries={"a": StoredEntry("v", NOW + 0.5, 100)})

    # WHEN / THEN
    assert outgoing_entries(state, [], NOW) == [{"key": "a", "value": "v", "maxAge": 1}]


def test_outgoing_entries_empty():
    # WHEN / THEN
    assert outgoing_entries(IdentityState(), [], NOW) == []


# -- needs_write ---------------------------------------------------------------------------------------------------


def stored_fixture_state() -> IdentityState:
    return apply_handles(IdentityState(), fixture_handles(), NOW)


def test_needs_write_for_a_new_identity():
    # GIVEN
    old = IdentityState()
    new = apply_handles(old, fixture_handles(), NOW)

    # WHEN / THEN
    assert needs_write(old, new, NOW) is True


def test_needs_write_false_for_an_early_repeat_of_the_same_answer():
    # GIVEN the same answer 60 s later
    old = stored_fixture_state()
    later = NOW + 60
    new = apply_handles(old, fixture_handles(), later)

    # WHEN / THEN
    assert needs_write(old, new, later) is False


def test_needs_write_true_once_a_tenth_of_the_lifetime_has_passed():
    # GIVEN the same answer 181 s later: a tenth (180 s) of the 1800 s cluster entry's and hint's lifetime has passed
    old = stored_fixture_state()

    # WHEN / THEN
    at_tenth = NOW + 180
    assert needs_write(old, apply_handles(old, fixture_handles(), at_tenth), at_tenth) is False
    later = NOW + 181
    assert needs_write(old, apply_handles(old, fixture_handles(), later), later) is True


def test_needs_write_true_when_only_the_hint_extension_is_due():
    # GIVEN a state with no entries, only a hint
    old = apply_handles(
        IdentityState(), [hint_handle({"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": 1800})], NOW
    )
    answer = [hint_handle({"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": 1800})]

    # WHEN / THEN
    assert needs_write(old, apply_handles(old, answer, NOW + 100), NOW + 100) is False
    assert needs_write(old, apply_handles(old, answer, NOW + 181), NOW + 181) is True


def test_needs_write_true_when_a_value_changes():
    # GIVEN
    old = stored_fixture_state()
    answer = [store_handle({"key": IDENTITY_KEY, "value": "NEW", "maxAge": 34128000})]

    # WHEN / THEN
    assert needs_write(old, apply_handles(old, answer, NOW + 1), NOW + 1) is True


def test_needs_write_true_when_attrs_change():
    # GIVEN
    old = stored_fixture_state()
    answer = [store_handle({"key": IDENTITY_KEY, "value": IDENTITY_VALUE, "maxAge": 34128000, "attrs": {"a": 1}})]

    # WHEN / THEN
    assert needs_write(old, apply_handles(old, answer, NOW + 1), NOW + 1) is True


def test_needs_write_true_when_a_key_is_added():
    # GIVEN
    old = stored_fixture_state()
    answer = [store_handle({"key": "kndctr_X_consent", "value": "general=in", "maxAge": 1000})]

    # WHEN / THEN
    assert needs_write(old, apply_handles(old, answer, NOW + 1), NOW + 1) is True


def test_needs_write_true_when_a_key_is_removed():
    # GIVEN
    old = stored_fixture_state()
    answer = [store_handle({"key": CLUSTER_KEY, "value": "", "maxAge": 0})]

    # WHEN / THEN
    assert needs_write(old, apply_handles(old, answer, NOW + 1), NOW + 1) is True


def test_needs_write_true_when_the_hint_changes():
    # GIVEN
    old = stored_fixture_state()
    answer = [hint_handle({"scope": "EdgeNetwork", "hint": "va6", "ttlSeconds": 1800})]

    # WHEN / THEN
    assert needs_write(old, apply_handles(old, answer, NOW + 1), NOW + 1) is True


def test_needs_write_true_when_edge_shortens_an_entry():
    # GIVEN a 395-day identity entry that Edge now says lives only 60 s more
    old = stored_fixture_state()
    answer = [store_handle({"key": IDENTITY_KEY, "value": IDENTITY_VALUE, "maxAge": 60})]
    later = NOW + 10
    new = apply_handles(old, answer, later)
    assert new.entries[IDENTITY_KEY].expires_at == later + 60

    # WHEN / THEN
    assert needs_write(old, new, later) is True


# -- item round trip -----------------------------------------------------------------------------------------------


def test_state_to_item_and_back_round_trip():
    # GIVEN
    state = IdentityState(
        entries={
            "b": StoredEntry("2", NOW + 1800, 1800, {"SameSite": "None"}),
            "a": StoredEntry("1", NOW + 34128000, 34128000),
        },
        hint="or2",
        hint_expires_at=NOW + 1800,
        version=3,
        hint_ttl=1800,
    )

    # WHEN
    item = state_to_item(state)
    back = state_from_item(json.loads(json.dumps(item)), 3)

    # THEN
    assert item == {
        "entries": {
            "a": {"value": "1", "expiresAt": 1734128000, "maxAge": 34128000},
            "b": {"value": "2", "expiresAt": 1700001800, "maxAge": 1800, "attrs": {"SameSite": "None"}},
        },
        "hint": "or2",
        "hintExpiresAt": 1700001800,
        "hintTtl": 1800,
    }
    assert back == state


@pytest.mark.parametrize(("stored", "read"), [(None, 0.0), ("x", 0.0), (-5, 0.0), (1e400, 0.0), (99999, 7200.0)])
def test_a_stored_hint_lifetime_is_read_within_what_the_relay_keeps(stored, read):
    # GIVEN an item whose hintTtl is missing (written before it was kept), not a number, or out of range (by hand)
    doc = {"entries": {}, "hint": "or2", "hintExpiresAt": int(NOW + 600)} | (
        {} if stored is None else {"hintTtl": stored}
    )

    # WHEN / THEN
    assert state_from_item(doc, 3).hint_ttl == read


def test_state_from_item_tolerates_missing_and_bad_parts():
    # GIVEN
    doc = {"entries": {"ok": {"value": "v", "expiresAt": 5}, "bad": "x", "novalue": {"expiresAt": 5}}, "hint": ""}

    # WHEN
    state = state_from_item(doc, 2)

    # THEN
    assert state == IdentityState(
        entries={"ok": StoredEntry("v", 5.0, 0, None)}, hint=None, hint_expires_at=0.0, version=2
    )
    assert state_from_item({}, 0) == IdentityState()


@pytest.mark.parametrize("later", [181, 1000, 1799])
def test_needs_write_false_for_an_answer_that_does_not_resend_the_entries(later):
    # GIVEN a stored state, and an answer long after with no state:store and no hint (nothing extended)
    old = stored_fixture_state()
    now = NOW + later

    # WHEN / THEN nothing changed, however much of the lifetimes has passed: no write (an unchanged item was
    # rewritten on every event once a tenth of an entry's lifetime had passed)
    new = apply_handles(old, [{"type": "identity:result", "payload": []}], now)
    assert needs_write(old, new, now) is False


# -- what an answer cannot make the relay keep ----------------------------------------------------------------------


@pytest.mark.parametrize("hint", ["or2", "va6", "irl1", "aus3", "JPN3", "a-b"])
def test_apply_handles_keeps_a_plain_hint(hint):
    # WHEN
    new = apply_handles(IdentityState(), [hint_handle({"scope": "EdgeNetwork", "hint": hint, "ttlSeconds": 60})], NOW)

    # THEN
    assert (new.hint, new.hint_expires_at) == (hint, NOW + 60)


@pytest.mark.parametrize(
    "hint",
    ["../../evil", "or2/../x", "or2?x=", "evil.example/x#", "a.b", "or 2", "-or2", "x" * 33, "", 12, {"a": 1}, None],
)
def test_apply_handles_ignores_a_hint_that_is_not_a_plain_name(hint):
    # GIVEN a stored hint, and an answer whose hint would change the URL's path or host
    old = IdentityState(hint="or2", hint_expires_at=NOW + 600)
    handles = [hint_handle({"scope": "EdgeNetwork", "hint": hint, "ttlSeconds": 1800})]

    # WHEN
    new = apply_handles(old, handles, NOW)

    # THEN the stored hint stays, as for an answer without one
    assert (new.hint, new.hint_expires_at) == ("or2", NOW + 600)


def test_state_from_item_drops_a_stored_hint_that_is_not_a_plain_name():
    # GIVEN an item written before hints were checked
    doc = {"entries": {}, "hint": "evil.example/x#", "hintExpiresAt": int(NOW + 600)}

    # WHEN
    state = state_from_item(doc, 3)

    # THEN
    assert state.hint is None
    assert state.live_hint(NOW) is None


def test_apply_handles_caps_the_hint_lifetime():
    # WHEN Edge gives a hint for ten years
    new = apply_handles(
        IdentityState(), [hint_handle({"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": 10 * 365 * 86400})], NOW
    )

    # THEN it is kept for two hours at most
    assert new.hint_expires_at == NOW + MAX_HINT_TTL_S == NOW + 7200


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_apply_handles_ignores_lifetimes_that_are_not_finite(bad):
    # GIVEN an answer parsed from JSON such as `"maxAge": 1e400` (Python reads it as infinity)
    old = IdentityState(entries={"a": StoredEntry("1", NOW + 100, 100)}, hint="or2", hint_expires_at=NOW + 600)
    handles = [
        store_handle({"key": "a", "value": "2", "maxAge": bad}, {"key": "b", "value": "v", "maxAge": bad}),
        hint_handle({"scope": "EdgeNetwork", "hint": "va6", "ttlSeconds": bad}),
    ]

    # WHEN
    new = apply_handles(old, handles, NOW)

    # THEN nothing changes, and the state still serialises
    assert new.entries == old.entries
    assert (new.hint, new.hint_expires_at) == ("or2", NOW + 600)
    assert state_to_item(new)["entries"]["a"]["expiresAt"] == int(NOW + 100)


def test_apply_handles_caps_a_huge_max_age():
    # WHEN
    new = apply_handles(IdentityState(), [store_handle({"key": "a", "value": "v", "maxAge": 1e300})], NOW)

    # THEN the expiry is finite and small enough for a DynamoDB number (38 digits)
    entry = new.entries["a"]
    assert (entry.expires_at, entry.max_age) == (NOW + MAX_LIFETIME_S, MAX_LIFETIME_S)
    assert len(str(state_to_item(new)["entries"]["a"]["expiresAt"])) < 38


@pytest.mark.parametrize("value", [None, 2, 2.5, True, {"x": 1}, ["v"]])
def test_apply_handles_ignores_an_entry_whose_value_is_not_a_string(value):
    # WHEN
    new = apply_handles(IdentityState(), [store_handle({"key": "a", "value": value, "maxAge": 60})], NOW)

    # THEN it is not kept (it would go back to Edge as Python's text of it, "None" or "{'x': 1}")
    assert new.entries == {}


def test_apply_handles_deletes_a_key_without_a_value():
    # GIVEN
    old = IdentityState(entries={"a": StoredEntry("1", NOW + 100, 100)})

    # WHEN
    new = apply_handles(old, [store_handle({"key": "a", "maxAge": 0})], NOW)

    # THEN
    assert new.entries == {}


def test_empty_attrs_do_not_make_every_repeat_a_write():
    # GIVEN an entry stored from an answer with empty attrs, read back from its item
    answer = [store_handle({"key": "a", "value": "v", "maxAge": 3600, "attrs": {}})]
    stored = state_from_item(state_to_item(apply_handles(IdentityState(), answer, NOW)), 1)

    # WHEN the same answer comes a second later
    new = apply_handles(stored, answer, NOW + 1)

    # THEN nothing is due
    assert new.entries["a"].attrs is None
    assert needs_write(stored, new, NOW + 1) is False


def test_apply_handles_ignores_an_entry_over_the_size_of_a_cookie():
    # GIVEN
    big = "v" * MAX_ENTRY_BYTES

    # WHEN
    new = apply_handles(IdentityState(), [store_handle({"key": "a", "value": big, "maxAge": 60})], NOW)

    # THEN
    assert new.entries == {}


def test_an_entry_over_the_size_of_a_cookie_drops_the_one_it_would_replace():
    # GIVEN a stored entry, and an answer replacing it with one too large to keep
    old = IdentityState(entries={"a": StoredEntry("old", NOW + 3600, 3600), "b": StoredEntry("kept", NOW + 60, 60)})
    answer = [store_handle({"key": "a", "value": "v" * MAX_ENTRY_BYTES, "maxAge": 60})]

    # WHEN
    new = apply_handles(old, answer, NOW)

    # THEN neither is kept: the old value is not sent back once Edge has replaced it; the others stay
    assert set(new.entries) == {"b"}


def test_an_entrys_attrs_are_sized_as_sent_not_as_escaped_json():
    # GIVEN an entry just within the size of a cookie, whose attrs hold non-ASCII text (3 bytes per character in the
    # request, 6 as an ASCII JSON escape)
    attrs = {"note": "\u00e9" * 600}
    value = "v" * (
        MAX_ENTRY_BYTES - len("a") - len(json.dumps(attrs, separators=(",", ":"), ensure_ascii=False).encode())
    )

    # WHEN
    new = apply_handles(
        IdentityState(), [store_handle({"key": "a", "value": value, "maxAge": 60, "attrs": attrs})], NOW
    )

    # THEN it is kept
    assert set(new.entries) == {"a"}


def test_apply_handles_keeps_the_longest_lived_entries_within_the_state_limit():
    # GIVEN the identity entry, and an answer with 40 entries of 1 KB that lapse sooner
    old = IdentityState(entries={IDENTITY_KEY: StoredEntry(IDENTITY_VALUE, NOW + 34_128_000, 34_128_000)})
    many = [{"key": f"k{i:02d}", "value": "v" * 1000, "maxAge": 1000 + i} for i in range(40)]

    # WHEN
    new = apply_handles(old, [store_handle(*many)], NOW)

    # THEN the state stays within its limit, the identity entry is kept, and those that lapse first went
    total = sum(len(k) + len(e.value) for k, e in new.entries.items())
    assert total <= MAX_STATE_BYTES
    assert IDENTITY_KEY in new.entries
    kept = sorted(k for k in new.entries if k != IDENTITY_KEY)
    assert kept == [f"k{i:02d}" for i in range(40 - len(kept), 40)]
    assert len(kept) == 16


def test_an_identity_id_with_the_deployments_key_cannot_be_recomputed_without_it() -> None:
    import hashlib
    import hmac

    data = b"Email\x1falice@example.com"
    key = b"k" * 64
    plain = opaque_identity_id("Email", "alice@example.com")
    keyed = opaque_identity_id("Email", "alice@example.com", key=key)
    # Without a key: SHA-256, which anyone can compute for a guessed email.
    assert plain == hashlib.sha256(data).hexdigest()
    # With it: HMAC-SHA256, stable for the deployment, different in another one.
    assert keyed == hmac.new(key, data, hashlib.sha256).hexdigest() != plain
    assert opaque_identity_id("Email", "alice@example.com", key=key) == keyed
    assert opaque_identity_id("Email", "alice@example.com", key=b"j" * 64) != keyed


def test_a_lifetime_too_large_for_a_float_is_capped_not_an_error():
    # GIVEN an answer whose JSON lifetimes are integers too large for a float (`"maxAge": 1000...0`, 400 digits):
    # Edge's JSON is read with integers as Python ints, which only floats' 1e400 turns into infinity
    huge = 10**400
    old = IdentityState(entries={"gone": StoredEntry("1", NOW + 100, 100)})
    handles = [
        store_handle({"key": "a", "value": "v", "maxAge": huge}, {"key": "gone", "value": "", "maxAge": -huge}),
        hint_handle({"scope": "EdgeNetwork", "hint": "va6", "ttlSeconds": huge}),
    ]

    # WHEN
    new = apply_handles(old, handles, NOW)

    # THEN the answer is kept as any other (it used to raise OverflowError, and the whole answer's state was lost):
    # the lifetimes capped, the negative one a delete
    assert new.entries == {"a": StoredEntry("v", NOW + MAX_LIFETIME_S, MAX_LIFETIME_S)}
    assert (new.hint, new.hint_expires_at) == ("va6", NOW + MAX_HINT_TTL_S)
    assert state_from_item(state_to_item(new), 1).entries == new.entries


@pytest.mark.parametrize(("first", "then", "after"), [(1800, 1900, 85), (1800, 2000, 0), (1800, 1700, 100)])
def test_a_changed_cluster_lifetime_is_written_because_it_sets_the_grace(first, then, after):
    # GIVEN the hint and the cluster entry stored with one lifetime, and Edge's next answer `after` s later giving
    # another: the same expiry or an extension not yet due, which alone would not be written
    def answer(ttl: int) -> list[dict[str, Any]]:
        return [
            hint_handle({"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": ttl}),
            store_handle({"key": CLUSTER_KEY, "value": "or2", "maxAge": ttl}),
        ]

    stored = apply_handles(IdentityState(), answer(first), NOW)
    now = NOW + after
    new = apply_handles(stored, answer(then), now)

    # WHEN / THEN it is written: the route's grace is a tenth of the stored lifetime, and with the old one stored the
    # route would end before Edge's (a longer lifetime) or outlive it by more than a tenth (a shorter one)
    assert needs_write(stored, new, now) is True
    edge_expiry = now + then
    assert new.route_hint(edge_expiry - 1) == "or2" and CLUSTER_KEY in new.sendable_entries(edge_expiry - 1)
    assert new.route_hint(edge_expiry + then / 10) is None


def test_the_same_lifetimes_again_are_not_a_change_to_write():
    # GIVEN the fixture state stored, and an item written before the hint's lifetime was kept (taken from the
    # cluster entry beside it)
    stored = apply_handles(IdentityState(), fixture_handles(), NOW)
    legacy = replace(stored, hint_ttl=0.0)

    # WHEN / THEN the same answer a minute later (an extension not yet due) is not written for either
    for old in (stored, legacy):
        assert needs_write(old, apply_handles(old, fixture_handles(), NOW + 60), NOW + 60) is False


def test_expiries_keep_their_fraction_of_a_second_through_the_store():
    # GIVEN an answer received at a fraction of a second: a 5 s entry, and a hint for half a second
    now = NOW + 0.7
    handles = [
        store_handle({"key": "consent", "value": "in", "maxAge": 5}),
        hint_handle({"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": 0.5}),
    ]
    state = apply_handles(IdentityState(), handles, now)

    # WHEN it is stored and read back
    back = state_from_item(json.loads(json.dumps(state_to_item(state))), 1)

    # THEN nothing ends early (whole seconds once ended it up to 1 s before Edge did), and the half-second hint keeps
    # its own lifetime (written as 0, it was read back as unknown, and routed for a tenth of the cluster's)
    assert back.entries["consent"].expires_at == pytest.approx(NOW + 5.7, abs=1e-3)
    assert [e["key"] for e in outgoing_entries(back, [], NOW + 5.5)] == ["consent"]
    assert back.hint_ttl == pytest.approx(0.5) and back.hint_expires_at == pytest.approx(NOW + 1.2, abs=1e-3)
    assert back.route_hint(NOW + 1.5) is None


@pytest.mark.parametrize("changed", ["cluster", "hint"])
def test_either_lifetime_changing_alone_is_written(changed):
    # GIVEN the hint and the cluster entry stored for 1800 s
    def answer(hint_ttl: int, max_age: int) -> list[dict[str, Any]]:
        return [
            hint_handle({"scope": "EdgeNetwork", "hint": "or2", "ttlSeconds": hint_ttl}),
            store_handle({"key": CLUSTER_KEY, "value": "or2", "maxAge": max_age}),
        ]

    stored = apply_handles(IdentityState(), answer(1800, 1800), NOW)

    # WHEN an answer 85 s later changes only one of the two lifetimes
    new = apply_handles(stored, answer(1800, 1900) if changed == "cluster" else answer(1900, 1800), NOW + 85)

    # THEN it is written: each sets its own grace
    assert needs_write(stored, new, NOW + 85) is True


def test_an_entry_stored_without_its_lifetime_is_still_replaced_by_an_answer() -> None:
    # GIVEN an entry from an item written before `maxAge` was kept (read back with a lifetime of 0: its set time cannot
    # be told), live for another hour
    state = IdentityState(entries={"consent": StoredEntry("v-stored", NOW + 3600, 0)})

    # WHEN an answer sets it
    handles = [{"type": "state:store", "payload": [{"key": "consent", "value": "v-new", "maxAge": 1800}]}]
    new = apply_handles(state, handles, NOW)

    # THEN the answer's value is kept (an entry set by a later answer would stand; this one cannot say it was)
    assert new.entries["consent"] == StoredEntry("v-new", NOW + 1800, 1800)
