"""relay.models: body decoding, request validation with field paths, eventId, building the inbound event."""

from __future__ import annotations

import copy
import json
import tracemalloc
from typing import Any

import pytest
from relay import codec
from relay.errors import InvalidEvent, PayloadTooLarge
from relay.models import (
    MAX_BODY_BYTES,
    build_inbound,
    datastream_for_rejection,
    decode_body,
    event_id_for,
    iso_millis,
    primary_identity,
    read_event,
    resolve_datastream,
    validate_request,
)

RECEIVED_AT = 1_700_000_000.5  # 2023-11-14T22:13:20.500Z
AS_RECEIVED = (
    "(Edge's own limit), counted on the body as received: compact UTF-8 JSON (no indentation, no \\u escapes for "
    "other scripts) is smaller"
)
TIMESTAMP_MESSAGE = (
    "must be a date and time, as XDM's date-time (RFC 3339: 2026-01-01T00:05:00.000Z; an offset or none)"
)


def body_of_size(size: int) -> bytes:
    """A valid JSON object of exactly `size` bytes."""
    skeleton = b'{"event":{"xdm":{}},"pad":""}'
    raw = skeleton[:-2] + b"x" * (size - len(skeleton)) + b'"}'
    assert len(raw) == size
    return raw


# -- decode_body ---------------------------------------------------------------------------------------------------


def test_decode_body_accepts_exactly_the_limit():
    # GIVEN a body of exactly 64 KiB
    raw = body_of_size(65536)

    # WHEN
    text, doc = decode_body(raw)

    # THEN
    assert MAX_BODY_BYTES == 65536
    assert len(text) == 65536
    assert doc["event"] == {"xdm": {}}
    assert doc["pad"] == "x" * (65536 - 29)


def test_decode_body_refuses_one_byte_over_the_limit():
    # GIVEN
    raw = body_of_size(65537)

    # WHEN
    with pytest.raises(PayloadTooLarge) as info:
        decode_body(raw)

    # THEN
    assert info.value.status == 413
    assert info.value.title == "Payload too large"
    assert info.value.errors == [
        {"path": "$", "message": "body is 65537 bytes; the limit is 65536 bytes " + AS_RECEIVED}
    ]


def test_decode_body_counts_utf8_bytes_not_characters_of_a_str():
    # GIVEN a str whose 21846 characters are 65538 UTF-8 bytes
    text = '{"a":"' + "\u20ac" * 21844 + '"}'

    # WHEN / THEN
    with pytest.raises(PayloadTooLarge) as info:
        decode_body(text)
    assert info.value.errors[0]["message"] == "body is 65540 bytes; the limit is 65536 bytes " + AS_RECEIVED


def test_decode_body_refuses_non_utf8():
    # GIVEN latin-1 bytes
    raw = b'{"a":"caf\xe9"}'

    # WHEN
    with pytest.raises(InvalidEvent) as info:
        decode_body(raw)

    # THEN
    assert info.value.status == 400
    assert info.value.errors == [{"path": "$", "message": "body is not UTF-8 (byte 9)"}]


@pytest.mark.parametrize("raw", [b"", b"   \n\t", ""])
def test_decode_body_refuses_an_empty_body(raw):
    # WHEN
    with pytest.raises(InvalidEvent) as info:
        decode_body(raw)

    # THEN
    assert info.value.errors == [{"path": "$", "message": "body is empty"}]


def test_decode_body_reports_where_the_json_breaks():
    # GIVEN
    raw = b'{"event": {"xdm": {}},\n  "meta": }'

    # WHEN
    with pytest.raises(InvalidEvent) as info:
        decode_body(raw)

    # THEN
    assert info.value.errors == [{"path": "$", "message": "body is not JSON: Expecting value at line 2 column 11"}]


@pytest.mark.parametrize(
    ("raw", "paths"),
    [
        # two identityMaps: a validator keeping the first saw alice, Python keeps the last (mallory)
        (
            '{"event":{"xdm":{"identityMap":{"Email":[{"id":"alice@example.com","primary":true}]},'
            '"identityMap":{"Email":[{"id":"mallory@example.com","primary":true}]}}}}',
            ["event.xdm.identityMap"],
        ),
        ('{"event":{"xdm":{}},"event":{"xdm":{}}}', ["event"]),
        ('{"event":{"xdm":{"a":[{"id":1,"id":2}],"b":1,"b":1}}}', ["event.xdm.b", "event.xdm.a[0].id"]),
        ('{"x":{"my-ns.v2":1,"my-ns.v2":2}}', ['x["my-ns.v2"]']),
    ],
)
def test_decode_body_refuses_a_key_repeated_in_an_object_naming_where(raw: str, paths: list[str]) -> None:
    with pytest.raises(InvalidEvent) as exc:
        decode_body(raw)
    assert sorted(e["path"] for e in exc.value.errors) == sorted(paths)
    assert {e["message"] for e in exc.value.errors} == {"appears more than once in its object"}


def test_naming_a_repeated_key_costs_little_memory_whatever_the_body_nests_under_long_keys() -> None:
    # GIVEN a 64 KiB body with a repeated key and, under a 32,000-character key, thousands of containers (a path per
    # container would copy that key thousands of times: half a gigabyte)
    long_key = "a" * 32_000
    body = '{"x":1,"x":1,"' + long_key + '":[' + ",".join(["[]"] * 7_000) + "]}"
    assert len(body) < MAX_BODY_BYTES

    # WHEN it is read (peak memory traced, not timed)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidEvent) as exc:
            decode_body(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # THEN the repeated key is named, and the reading stayed within a few megabytes
    assert exc.value.errors == [{"path": "x", "message": "appears more than once in its object"}]
    assert peak < 20 * 1024 * 1024, peak


@pytest.mark.parametrize("objects", [2_300, 9_000], ids=["64-KiB", "oversized"])
def test_many_repeated_keys_under_a_long_key_are_counted_and_only_the_first_named(objects: int) -> None:
    # GIVEN thousands of objects that each repeat a key, under a 32,000-character key (each path would copy it): a
    # body within the limit, and one over it (parsed whole, to find the xdm._id its refusal is kept under)
    body = '{"event":{"xdm":{"_id":"e1"}},"' + "a" * 32_000 + '":[' + ",".join(['{"x":0,"x":0}'] * objects) + "]}"

    # WHEN it is read (peak memory traced, not timed)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidEvent) as exc:
            read_event(
                body, "m", datastream=None, default_datastream="ds", source="sqs", received_at=0, identity_key=None
            )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # THEN it is kept under its xdm._id; within the limit, the first 50 are named (cut) and the rest counted; and the
    # reading stayed within a few tens of megabytes (paths for all of them: hundreds, up to gigabytes)
    assert exc.value.event_id == "e1"
    if len(body) <= MAX_BODY_BYTES:
        assert len(exc.value.errors) == 51
        assert exc.value.errors[-1] == {"path": "$", "message": f"and {objects - 50} more errors"}
        assert all(len(e["path"]) <= 300 for e in exc.value.errors)
    else:
        assert isinstance(exc.value, PayloadTooLarge)
    assert peak < 40 * 1024 * 1024, peak


def test_an_oversized_body_with_a_repeated_key_is_still_kept_under_its_xdm_id() -> None:
    # GIVEN a body over the limit that also repeats a key
    body = '{"event":{"xdm":{"_id":"order-42","a":1,"a":2}},"pad":"' + "p" * MAX_BODY_BYTES + '"}'

    # WHEN / THEN it is refused for its size, and kept where its sender looks for it
    with pytest.raises(PayloadTooLarge) as exc:
        read_event(
            body, "msg-1", datastream=None, default_datastream="ds", source="sqs", received_at=0, identity_key=None
        )
    assert exc.value.event_id == "order-42"


def test_a_body_far_over_the_limit_is_not_parsed_and_kept_under_its_transport_id() -> None:
    # GIVEN a signed body of some megabytes (API Gateway and Lambda pass up to about 6 MB), of many small objects:
    # parsed whole to find its xdm._id, it cost seconds of CPU and hundreds of megabytes (review "security")
    body = '{"event":{"xdm":{"_id":"order-42"}},"pad":[' + ",".join(["{}"] * 600_000) + "]}"

    # WHEN it is read (peak memory traced, not timed)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge) as exc:
            read_event(
                body,
                "webhook-1",
                datastream=None,
                default_datastream="ds",
                source="webhook",
                received_at=0,
                identity_key=None,
            )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # THEN it is refused for its size without being parsed: kept under the id of its transport (the webhook-id)
    assert exc.value.event_id == "webhook-1"
    assert peak < 10 * 1024 * 1024, peak


def test_a_repeated_key_that_is_not_a_name_is_named_by_its_position_never_echoed() -> None:
    # GIVEN an identity put where its namespace belongs, twice
    raw = '{"event":{"xdm":{"identityMap":{"ECID":[],"alice@example.com":[],"alice@example.com":[]}}}}'

    # WHEN / THEN the error names its position in the object, not the person
    with pytest.raises(InvalidEvent) as exc:
        decode_body(raw)
    assert exc.value.errors == [
        {"path": "event.xdm.identityMap[<key 2>]", "message": "appears more than once in its object"}
    ]
    assert "alice" not in json.dumps(exc.value.errors)


def test_decode_body_returns_text_and_document():
    # GIVEN
    raw = b'{"event":{"xdm":{"_id":"e-1"}}}'

    # WHEN
    text, doc = decode_body(raw)

    # THEN
    assert text == '{"event":{"xdm":{"_id":"e-1"}}}'
    assert doc == {"event": {"xdm": {"_id": "e-1"}}}


# -- validate_request ----------------------------------------------------------------------------------------------


def test_validate_request_accepts_a_full_request():
    # GIVEN
    doc = {
        "event": {
            "xdm": {
                "_id": "e-1",
                "timestamp": "2023-11-14T22:13:20.000Z",
                "identityMap": {"FPID": [{"id": "fp-1", "primary": True}], "ECID": [{"id": "123"}]},
            },
            "data": {"k": 1},
        },
        "query": {"personalization": {}},
        "meta": {"state": {"entries": [{"key": "k", "value": "v"}]}},
    }

    # WHEN / THEN
    assert validate_request(doc) == []


@pytest.mark.parametrize(
    ("doc", "errors"),
    [
        ([], [{"path": "$", "message": "must be a JSON object, not array"}]),
        ("x", [{"path": "$", "message": "must be a JSON object, not string"}]),
        ({}, [{"path": "event", "message": "is required"}]),
        ({"event": None}, [{"path": "event", "message": "must be an object, not null"}]),
        ({"event": 3}, [{"path": "event", "message": "must be an object, not number"}]),
        ({"event": {}}, [{"path": "event.xdm", "message": "is required"}]),
        ({"event": {"xdm": []}}, [{"path": "event.xdm", "message": "must be an object, not array"}]),
        ({"event": {"xdm": "x"}}, [{"path": "event.xdm", "message": "must be an object, not string"}]),
        ({"event": {"xdm": True}}, [{"path": "event.xdm", "message": "must be an object, not boolean"}]),
        (
            {"event": {"xdm": {"_id": "x" * 257}}},
            [{"path": "event.xdm._id", "message": "must be a string of 1-256 characters"}],
        ),
        (
            {"event": {"xdm": {"timestamp": 1700000000}}},
            [{"path": "event.xdm.timestamp", "message": TIMESTAMP_MESSAGE}],
        ),
        # a string, but not a time: it said "ISO-8601" and sent it to Edge as it was
        *(
            (
                {"event": {"xdm": {"timestamp": bad}}},
                [{"path": "event.xdm.timestamp", "message": TIMESTAMP_MESSAGE}],
            )
            for bad in (
                "yesterday",
                "1700000000",
                "2026-01-01",
                "20260101T050000Z",
                "2026-13-01T00:00:00Z",
                "2026-01-01T12:34:60Z",  # a leap second is 23:59:60 (review "late")
            )
        ),
        ({"event": {"xdm": {}, "data": []}}, [{"path": "event.data", "message": "must be an object, not array"}]),
        ({"event": {"xdm": {}}, "query": "x"}, [{"path": "query", "message": "must be an object, not string"}]),
        # Present but null: an optional member is not "required", and a null is not a missing member
        ({"event": {"xdm": {}}, "meta": None}, [{"path": "meta", "message": "must be an object, not null"}]),
        (
            {"event": {"xdm": {}}, "meta": {"state": None}},
            [{"path": "meta.state", "message": "must be an object, not null"}],
        ),
        ({"event": {"xdm": {}, "data": None}}, [{"path": "event.data", "message": "must be an object, not null"}]),
        ({"event": {"xdm": None}}, [{"path": "event.xdm", "message": "must be an object, not null"}]),
    ],
)
def test_validate_request_names_the_bad_field(doc, errors):
    # WHEN / THEN
    assert validate_request(doc) == errors


def test_validate_request_checks_identity_map_shapes():
    # GIVEN every wrong identityMap shape at once
    doc = {
        "event": {
            "xdm": {
                "identityMap": {
                    "FPID": {"id": "x"},
                    "ECID": ["x", {"id": ""}, {"id": "ok", "primary": "yes"}, {"primary": True}],
                }
            }
        }
    }

    # WHEN
    errors = validate_request(doc)

    # THEN
    assert errors == [
        {"path": "event.xdm.identityMap.FPID", "message": "must be an array of identities"},
        {"path": "event.xdm.identityMap.ECID[0]", "message": "must be an object"},
        {"path": "event.xdm.identityMap.ECID[1].id", "message": "is required and must be a non-empty string"},
        {"path": "event.xdm.identityMap.ECID[2].primary", "message": "must be a boolean"},
        {"path": "event.xdm.identityMap.ECID[3].id", "message": "is required and must be a non-empty string"},
    ]


@pytest.mark.parametrize(
    "raw", [b'\xef\xbb\xbf{"event":{"xdm":{"_id":"e-1"}}}', '\ufeff{"event":{"xdm":{"_id":"e-1"}}}']
)
def test_a_byte_order_mark_before_the_json_is_ignored(raw: bytes | str) -> None:
    # (RFC 8259 §8.1: a parser may ignore one; a webhook body is bytes, an SQS body a string)
    _, doc = decode_body(raw)
    assert doc == {"event": {"xdm": {"_id": "e-1"}}}


@pytest.mark.parametrize("raw", [b'{"event":{"xdm":{}}}\xef\xbb\xbf', b"\xef\xbb\xbf\xef\xbb\xbf{}", b"\xef\xbb\xbf"])
def test_a_byte_order_mark_anywhere_else_or_alone_is_still_refused(raw: bytes) -> None:
    with pytest.raises(InvalidEvent):
        decode_body(raw)


def test_a_null_primary_passes_and_is_not_primary() -> None:
    # GIVEN an identity with `primary: null` (the Web SDK lets it through, as a null authenticatedState) beside the
    # primary one
    xdm = {
        "identityMap": {"Email": [{"id": "a@example.com", "primary": None}], "CRMID": [{"id": "c-1", "primary": True}]}
    }

    # THEN it is valid, and the primary identity is the one marked true
    assert validate_request({"event": {"xdm": xdm}}) == []
    assert primary_identity(xdm) == ("CRMID", "c-1")


@pytest.mark.parametrize("state", ["ambiguous", "authenticated", "loggedOut", None])
def test_validate_request_accepts_each_authenticated_state(state: str | None) -> None:
    # GIVEN an identity with one of XDM's authenticated states (or null, which the Web SDK lets through too)
    doc = {"event": {"xdm": {"identityMap": {"Email": [{"id": "a@example.com", "authenticatedState": state}]}}}}

    # WHEN / THEN
    assert validate_request(doc) == []


@pytest.mark.parametrize("state", ["Authenticated", "logged_out", "", 1, True, ["authenticated"]])
def test_validate_request_refuses_an_authenticated_state_xdm_does_not_have(state: Any) -> None:
    # GIVEN an identity whose authenticatedState is not one of XDM's three (Adobe's Web SDK refuses it too)
    doc = {"event": {"xdm": {"identityMap": {"Email": [{"id": "a@example.com", "authenticatedState": state}]}}}}

    # WHEN
    errors = validate_request(doc)

    # THEN one error at its path, naming the three, and the identity is not repeated
    assert errors == [
        {
            "path": "event.xdm.identityMap.Email[0].authenticatedState",
            "message": 'must be one of "ambiguous", "authenticated", "loggedOut"',
        }
    ]
    assert "a@example.com" not in json.dumps(errors)


def test_validate_request_identity_map_must_be_an_object():
    # GIVEN
    doc = {"event": {"xdm": {"identityMap": [{"id": "x"}]}}}

    # WHEN / THEN
    assert validate_request(doc) == [{"path": "event.xdm.identityMap", "message": "must be an object"}]


@pytest.mark.parametrize(
    ("meta", "errors"),
    [
        ({"state": []}, [{"path": "meta.state", "message": "must be an object, not array"}]),
        ({"state": {"entries": {"k": "v"}}}, [{"path": "meta.state.entries", "message": "must be an array"}]),
        (
            {"state": {"entries": [{"key": "a", "value": "1"}, {"value": "2"}, "k", {"key": 3}]}},
            [
                {"path": "meta.state.entries[1]", "message": "must be an object with a key"},
                {"path": "meta.state.entries[2]", "message": "must be an object with a key"},
                {"path": "meta.state.entries[3]", "message": "must be an object with a key"},
            ],
        ),
        ({"state": {"domain": "example.com"}}, []),
    ],
)
def test_validate_request_checks_meta_state_entries(meta, errors):
    # GIVEN
    doc = {"event": {"xdm": {}}, "meta": meta}

    # WHEN / THEN
    assert validate_request(doc) == errors


def test_validate_request_collects_errors_from_several_places():
    # GIVEN
    doc = {"event": {"xdm": {"timestamp": 1}, "data": 1}, "query": [], "meta": {"state": {"entries": 1}}}

    # WHEN / THEN
    assert validate_request(doc) == [
        {"path": "event.xdm.timestamp", "message": TIMESTAMP_MESSAGE},
        {"path": "event.data", "message": "must be an object, not number"},
        {"path": "query", "message": "must be an object, not array"},
        {"path": "meta.state.entries", "message": "must be an array"},
    ]


# -- event ids, datastreams, identities ----------------------------------------------------------------------------


def test_event_id_for_prefers_xdm_id():
    # GIVEN
    doc = {"event": {"xdm": {"_id": "evt-42"}}}

    # WHEN / THEN
    assert event_id_for(doc, "msg-1") == "evt-42"


@pytest.mark.parametrize(
    "doc",
    [{"event": {"xdm": {}}}, {"event": {"xdm": {"_id": ""}}}, {"event": {"xdm": {"_id": 7}}}, [], "x", {"event": 1}],
)
def test_event_id_for_falls_back_to_the_transport_id(doc):
    # WHEN / THEN
    assert event_id_for(doc, "webhook-id-1") == "webhook-id-1"


def test_event_id_for_bounds_a_long_fallback_without_merging_two_ids():
    # GIVEN two long transport ids that share their first 256 characters
    first, second = "m" * 300 + "1", "m" * 300 + "2"

    # WHEN / THEN each becomes 256 characters: its start and a SHA-256 of the whole, so they stay two events
    a, b = event_id_for({}, first), event_id_for({}, second)
    assert len(a) == len(b) == 256 and a.startswith("m" * 191 + "~")
    assert a != b and event_id_for({}, first) == a
    assert event_id_for({}, "m" * 256) == "m" * 256


def test_resolve_datastream_default_and_override():
    # WHEN / THEN
    assert resolve_datastream(None, "ds-default") == "ds-default"
    assert resolve_datastream("ds:other.1", "ds-default") == "ds:other.1"


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-01-01T00:05:00.000Z",
        "2026-01-01T00:05:00Z",
        "2026-01-01T00:05:00.123456+02:00",
        "2026-01-01T00:05:00-0500",
        "2026-01-01T00:05:00",
        "2026-01-01t00:05:00z",
        "2016-12-31T23:59:60Z",  # a leap second (RFC 3339 §5.7)
        "1990-12-31T15:59:60-08:00",  # the same, with an offset (RFC 3339 §5.8's example)
    ],
)
def test_an_iso_8601_date_time_is_taken_as_given(stamp: str) -> None:
    assert validate_request({"event": {"xdm": {"timestamp": stamp}}}) == []


@pytest.mark.parametrize("given", [None, ""])
def test_an_id_or_timestamp_given_as_null_or_empty_is_taken_for_absent(given: str | None) -> None:
    # GIVEN an event whose sender's serializer writes unset members as null (Jackson, System.Text.Json, pydantic) or
    # empty: Adobe's mobile SDKs fill in a null or empty timestamp, and set `_id` themselves (review "validation")
    doc = {
        "event": {"xdm": {"_id": given, "timestamp": given, "identityMap": {"FPID": [{"id": "f", "primary": True}]}}}
    }

    # WHEN it is read
    inbound = read_event(
        json.dumps(doc),
        "wh-1",
        datastream=None,
        default_datastream="ds",
        source="webhook",
        received_at=RECEIVED_AT,
        identity_key=None,
    )

    # THEN it is the event without them: the transport's id, the receive time (the relay's, kept across retries)
    xdm = inbound.request["event"]["xdm"]
    assert (inbound.event_id, xdm["_id"]) == ("wh-1", "wh-1")
    assert (xdm["timestamp"], inbound.default_timestamp) == ("2023-11-14T22:13:20.500Z", True)


def test_an_empty_datastream_is_refused_not_taken_for_absent() -> None:
    # GIVEN `?datastreamId=` with nothing after it (a sender's unset template variable, say): taken for absent, the
    # event would go to the default datastream, which may be another sandbox (as for a misspelled name)
    with pytest.raises(InvalidEvent) as info:
        resolve_datastream("", "ds-default")

    # THEN it is refused naming the field
    assert info.value.errors == [
        {"path": "datastreamId", "message": "is empty: name a datastream, or leave the parameter out for the default"}
    ]


def test_resolve_datastream_keeps_to_the_allowed_ones_when_they_are_listed() -> None:
    allowed = frozenset({"ds-a", "ds-default"})
    assert resolve_datastream("ds-a", "ds-default", allowed) == "ds-a"
    assert resolve_datastream("ds-default", "ds-default", allowed) == "ds-default"
    assert resolve_datastream(None, "ds-default", allowed) == "ds-default"
    # The default only if listed: a replay could otherwise reach it by leaving out the signed request's datastream
    for named in (None, "", "ds-default"):
        with pytest.raises(InvalidEvent) as refused:
            resolve_datastream(named, "ds-default", frozenset({"ds-a"}))
        assert refused.value.errors[0]["path"] == "datastreamId"
    with pytest.raises(InvalidEvent) as info:
        resolve_datastream("ds-b", "ds-default", allowed)
    assert info.value.errors == [
        {
            "path": "datastreamId",
            "message": '"ds-b" is not one of the datastreams this relay sends to (ALLOWED_DATASTREAM_IDS)',
        }
    ]
    assert datastream_for_rejection("ds-b", "ds-default", allowed) == "ds-default"


@pytest.mark.parametrize("candidate", ["../etc", "abc\n", " abc", "abc ", "ds\u00e9", "x" * 129])
def test_resolve_datastream_refuses_a_malformed_id(candidate: str) -> None:
    # WHEN (a final newline too: `$` alone would let it through)
    with pytest.raises(InvalidEvent) as info:
        resolve_datastream(candidate, "ds-default")

    # THEN
    assert info.value.errors == [{"path": "datastreamId", "message": "must be a datastream id (letters, digits, -_:.)"}]


def test_primary_identity_picks_the_first_primary():
    # GIVEN
    xdm = {
        "identityMap": {
            "ECID": [{"id": "ecid-1"}],
            "FPID": [{"id": "fp-0", "primary": False}, {"id": "fp-1", "primary": True}],
            "Email": [{"id": "a@example.com", "primary": True}],
        }
    }

    # WHEN / THEN
    assert primary_identity(xdm) == ("FPID", "fp-1")


@pytest.mark.parametrize(
    "xdm",
    [
        {},
        {"identityMap": []},
        {"identityMap": {"ECID": [{"id": "e"}]}},
        {"identityMap": {"ECID": [{"id": "e", "primary": "true"}]}},
        {"identityMap": {"ECID": {"id": "e", "primary": True}}},
    ],
)
def test_primary_identity_none_without_a_primary(xdm):
    # WHEN / THEN
    assert primary_identity(xdm) is None


# -- build_inbound -------------------------------------------------------------------------------------------------


def test_build_inbound_sets_id_and_timestamp_when_absent_without_mutating_input():
    # GIVEN
    doc = {
        "event": {"xdm": {"eventType": "web.webpagedetails.pageViews"}, "data": {"a": 1}},
        "meta": {"m": 1},
    }
    before = copy.deepcopy(doc)

    # WHEN
    inbound = build_inbound(doc, event_id="msg-1", datastream_id="ds-1", source="sqs", received_at=RECEIVED_AT)

    # THEN
    assert inbound.request == {
        "event": {
            "xdm": {
                "eventType": "web.webpagedetails.pageViews",
                "_id": "msg-1",
                "timestamp": "2023-11-14T22:13:20.500Z",
            },
            "data": {"a": 1},
        },
        "meta": {"m": 1},
    }
    assert doc == before
    assert (inbound.event_id, inbound.datastream_id, inbound.source, inbound.received_at) == (
        "msg-1",
        "ds-1",
        "sqs",
        RECEIVED_AT,
    )
    assert inbound.primary_identity is None


def test_build_inbound_keeps_id_and_timestamp_the_caller_gave():
    # GIVEN
    doc = {
        "event": {
            "xdm": {
                "_id": "evt-1",
                "timestamp": "2020-01-01T00:00:00Z",
                "identityMap": {"FPID": [{"id": "fp-1", "primary": True}]},
            }
        }
    }

    # WHEN
    inbound = build_inbound(doc, event_id="evt-1", datastream_id="ds-1", source="webhook", received_at=RECEIVED_AT)

    # THEN
    assert inbound.request["event"]["xdm"]["_id"] == "evt-1"
    assert inbound.request["event"]["xdm"]["timestamp"] == "2020-01-01T00:00:00Z"
    assert inbound.primary_identity == ("FPID", "fp-1")


def test_build_inbound_raises_every_validation_error():
    # GIVEN
    doc = {"event": {"xdm": []}, "query": 1}

    # WHEN
    with pytest.raises(InvalidEvent) as info:
        build_inbound(doc, event_id="e", datastream_id="ds", source="sqs", received_at=RECEIVED_AT)

    # THEN
    assert info.value.errors == [
        {"path": "event.xdm", "message": "must be an object, not array"},
        {"path": "query", "message": "must be an object, not number"},
    ]


def test_build_inbound_output_is_json_serialisable_and_stable():
    # GIVEN the same document processed twice (a redelivery with the same received time)
    doc: dict[str, Any] = {"event": {"xdm": {}}}

    # WHEN
    a = build_inbound(doc, event_id="m", datastream_id="ds", source="sqs", received_at=RECEIVED_AT)
    b = build_inbound(doc, event_id="m", datastream_id="ds", source="sqs", received_at=RECEIVED_AT)

    # THEN
    assert json.dumps(a.request) == json.dumps(b.request)


@pytest.mark.parametrize(
    ("epoch", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000.0, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.25, "2023-11-14T22:13:20.250Z"),
    ],
)
def test_iso_millis_formats_utc_with_milliseconds(epoch, text):
    # WHEN / THEN
    assert iso_millis(epoch) == text


def test_iso_millis_never_rounds_into_the_next_second():
    # GIVEN a receive time 0.12 µs before a whole second (time.time() can return this)
    epoch = 1_700_000_000.99999988

    # WHEN / THEN
    assert iso_millis(epoch) == "2023-11-14T22:13:20.999Z"


def test_field_errors_are_capped_so_a_hostile_body_cannot_make_a_huge_rejection() -> None:
    # GIVEN a validation that found 200 errors with very long paths
    from relay.errors import MAX_ERROR_TEXT, MAX_ERRORS, InvalidEvent

    error = InvalidEvent([{"path": "x" * 5000, "message": f"bad {n}"} for n in range(200)])

    # THEN the first MAX_ERRORS are kept, cut to MAX_ERROR_TEXT characters, and one more entry says how many are left
    assert len(error.errors) == MAX_ERRORS + 1
    assert all(len(e["path"]) <= MAX_ERROR_TEXT for e in error.errors)
    assert error.errors[-1] == {"path": "$", "message": f"and {200 - MAX_ERRORS} more errors"}
    assert error.errors[0]["message"] == "bad 0"


def test_a_body_nested_deeper_than_the_limit_is_refused_before_it_can_fail_later() -> None:
    # GIVEN bodies nested exactly MAX_DEPTH levels, and one level more (json.loads takes ~990 levels; json.dumps,
    # which sends the event on, may not)
    from relay.models import MAX_DEPTH, decode_body

    def nested(levels: int) -> str:
        return '{"event":' + '{"a":' * (levels - 2) + "{}" + "}" * (levels - 2) + "}"

    # WHEN / THEN
    assert decode_body(nested(MAX_DEPTH))[1]["event"]
    with pytest.raises(InvalidEvent) as info:
        decode_body(nested(MAX_DEPTH + 1))
    assert info.value.errors == [{"path": "$", "message": f"body is nested more than {MAX_DEPTH} levels deep"}]
    with pytest.raises(InvalidEvent):
        decode_body("[" * 900 + "]" * 900)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"event": {"xdm": {"v": NaN}}}', "body is not JSON: NaN is not a JSON value"),
        ('{"event": {"xdm": {"v": Infinity}}}', "body is not JSON: Infinity is not a JSON value"),
        ('{"event": {"xdm": {"v": -Infinity}}}', "body is not JSON: -Infinity is not a JSON value"),
        ('{"event": {"xdm": {"v": 1e400}}}', "body has a number too large to read: 1e400"),
    ],
)
def test_decode_body_refuses_numbers_that_could_only_go_on_as_invalid_json(raw, message):
    # WHEN (Python's parser takes these; sent on, they would be `NaN`/`Infinity`, which is not JSON)
    with pytest.raises(InvalidEvent) as info:
        decode_body(raw)

    # THEN
    assert info.value.errors == [{"path": "$", "message": message}]


def test_decode_body_keeps_ordinary_numbers():
    # WHEN
    _, doc = decode_body('{"event": {"xdm": {"a": 1.5, "b": -2e-3, "c": 1e308, "d": 7}}}')

    # THEN
    assert doc["event"]["xdm"] == {"a": 1.5, "b": -0.002, "c": 1e308, "d": 7}


def test_decode_body_without_a_limit_takes_a_large_body():
    # GIVEN (an event the relay queued itself, back from the queue)
    raw = body_of_size(70_000)

    # WHEN
    text, _ = decode_body(raw, limit=None)

    # THEN
    assert len(text) == 70_000


def test_identity_namespace_that_is_not_a_plain_name_is_quoted_in_field_paths():
    # GIVEN
    doc = {"event": {"xdm": {"identityMap": {"a.b": [{"id": ""}], "Email": [{"id": 3}]}}}}

    # WHEN
    errors = validate_request(doc)

    # THEN
    assert errors == [
        {"path": 'event.xdm.identityMap["a.b"][0].id', "message": "is required and must be a non-empty string"},
        {"path": "event.xdm.identityMap.Email[0].id", "message": "is required and must be a non-empty string"},
    ]


@pytest.mark.parametrize("namespace", ["", "Email\x1fx", "Ema\nil"])
def test_identity_namespace_that_is_empty_or_has_control_characters_is_refused(namespace):
    # GIVEN ("Email\x1fx" + "y" and "Email" + "x\x1fy" would otherwise share one identity-state key)
    doc = {"event": {"xdm": {"identityMap": {namespace: [{"id": "y", "primary": True}]}}}}

    # WHEN
    errors = validate_request(doc)

    # THEN
    assert errors == [
        {
            "path": "event.xdm.identityMap[<namespace 1>]",
            "message": "must be a non-empty namespace code without control characters",
        }
    ]


@pytest.mark.parametrize("namespace", ["alice@example.com", "+15551234567", "5551234567", "Alice Smith", "é" * 3])
def test_an_identity_put_where_its_namespace_belongs_is_never_repeated_in_a_field_path(namespace: str) -> None:
    # GIVEN a sender that keyed the identityMap by the identity itself, and a second, broken entry under it
    doc = {"event": {"xdm": {"identityMap": {"ECID": [{"id": "x"}], namespace: [{"id": 3}]}}}}

    # WHEN
    errors = validate_request(doc)

    # THEN the error names the namespace's position, not the namespace
    assert errors == [
        {"path": "event.xdm.identityMap[<namespace 2>][0].id", "message": "is required and must be a non-empty string"}
    ]
    assert namespace not in json.dumps(errors, ensure_ascii=False)


@pytest.mark.parametrize(
    "event_id",
    ["ord-1\u0001", "ord-1\u001f", "ord-1\u000b", "ord-1\ud83d", "ord-1\udc00", "ord-1\uffff", "ord-1\ufffe"],
)
def test_an_xdm_id_sqs_could_not_carry_is_refused(event_id):
    # WHEN (the id becomes the queue message's eventId attribute, which SQS refuses with these characters)
    errors = validate_request({"event": {"xdm": {"_id": event_id}}})

    # THEN
    message = (
        "must not contain control characters other than tab, line feed and carriage return, an unpaired UTF-16 "
        "surrogate, U+FFFE or U+FFFF"
    )
    assert errors == [{"path": "event.xdm._id", "message": message}]


@pytest.mark.parametrize("event_id", ["order-42 \u00e9 \U0001f600", "ord-1\t2", "ord-1\n", "ord-1\r\n"])
def test_an_xdm_id_sqs_can_carry_passes(event_id):
    # (an SQS attribute takes what a message body takes: #x9, #xA, #xD and #x20 up, but for surrogates, U+FFFE, U+FFFF)
    assert validate_request({"event": {"xdm": {"_id": event_id}}}) == []


def test_a_lone_surrogate_outside_the_identities_passes_and_is_sent_as_its_escape():
    # GIVEN a body whose free-form data holds a character cut in half (JSON.stringify writes one as "\ud83d")
    text, doc = decode_body(b'{"event":{"xdm":{"_id":"e-1","name":"abc\\ud83d"},"data":{"t":"\\udc00x"}}}')

    # THEN it is read, and what the relay sends (codec.dumps) carries it as the same escape
    assert validate_request(doc) == []
    assert doc["event"]["xdm"]["name"] == "abc\ud83d"
    assert codec.dumps(doc) == text


@pytest.mark.parametrize(
    ("identity_map", "path"),
    [
        ({"Email": [{"id": "ab\ud83d", "primary": True}]}, "event.xdm.identityMap.Email[0].id"),
        ({"Email": [{"id": "x"}, {"id": "\udc00"}]}, "event.xdm.identityMap.Email[1].id"),
        ({"ECID": [{"id": "1"}], "Em\ud83d": [{"id": "x"}]}, "event.xdm.identityMap[<namespace 2>]"),
    ],
)
def test_an_identity_holding_a_lone_surrogate_is_refused_at_its_path(identity_map, path):
    # (a namespace and an id key the person's state: a character cut in half would make another person of them)
    errors = validate_request({"event": {"xdm": {"identityMap": identity_map}}})
    assert errors == [
        {"path": path, "message": "must not contain an unpaired UTF-16 surrogate (a character cut in half)"}
    ]


@pytest.mark.parametrize(
    ("envelope", "said"),
    [
        (
            {
                "Type": "Notification",
                "MessageId": "m-1",
                "TopicArn": "arn:aws:sns:us-east-1:123456789012:orders",
                "Message": '{"event": {"xdm": {"_id": "e1"}}}',
                "Timestamp": "2026-11-29T10:00:00.000Z",
            },
            "raw message delivery",
        ),
        (
            {"version": "0", "detail-type": "Order placed", "source": "shop", "detail": {"event": {"xdm": {}}}},
            "EventBridge event",
        ),
        (
            {
                "Type": "SubscriptionConfirmation",
                "TopicArn": "arn:aws:sns:us-east-1:123456789012:orders",
                "Message": "You have chosen to subscribe to the topic",
                "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
            },
            "confirm the subscription",
        ),
    ],
)
def test_an_event_wrapped_in_an_aws_envelope_is_refused_with_the_setting_that_unwraps_it(
    envelope: dict[str, Any], said: str
) -> None:
    # GIVEN a producer's event that reached the queue inside an SNS notification or an EventBridge event
    # WHEN it is validated
    errors = validate_request(envelope)

    # THEN it is refused at `event`, with the setting that delivers the event itself (and nothing of its values)
    assert [e["path"] for e in errors] == ["event"]
    assert said in errors[0]["message"] and "is required" in errors[0]["message"]
    assert "orders" not in errors[0]["message"] and "shop" not in errors[0]["message"]


def test_a_request_whose_members_look_like_an_envelope_besides_its_event_is_validated_as_usual() -> None:
    # GIVEN an interact request that also carries members an envelope has (a sender's own metadata)
    doc = {"event": {"xdm": {"_id": "e1"}}, "Type": "Notification", "TopicArn": "t", "Message": "m"}

    # WHEN / THEN it is a request like any other
    assert validate_request(doc) == []


def test_a_stamp_names_the_event_it_belongs_to_by_its_person_and_datastream() -> None:
    # GIVEN two events under one _id and datastream, each without xdm.timestamp, for two different people
    def inbound(person: str, datastream: str = "ds") -> Any:
        doc = {"event": {"xdm": {"_id": "ev-1", "identityMap": {"CRMID": [{"id": person, "primary": True}]}}}}
        return build_inbound(doc, event_id="ev-1", datastream_id=datastream, source="sqs", received_at=1.0)

    # WHEN / THEN their stamps say whose they are: an earlier attempt's time is taken only by the same event
    assert inbound("p1").stamp[1] != inbound("p2").stamp[1]
    assert inbound("p1").stamp[1] != inbound("p1", "ds-2").stamp[1]
    assert inbound("p1").stamp == inbound("p1").stamp
