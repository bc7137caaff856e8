"""relay.retry (Retry-After parsing, backoff bounds) and relay.codec (DynamoDB JSON attributes)."""

from __future__ import annotations

import random
import zlib
from email.utils import formatdate

import pytest
from relay import codec
from relay.retry import MAX_RETRY_AFTER_S, RECOVERABLE_STATUSES, backoff, parse_retry_after

NOW = 1_700_000_000.0

# -- retry ---------------------------------------------------------------------------------------------------------


def test_recoverable_statuses_are_adobes():
    # THEN
    assert RECOVERABLE_STATUSES == frozenset({408, 429, 502, 503, 504})


@pytest.mark.parametrize(("header", "seconds"), [("2", 2.0), ("1", 1.0), (" 120 ", 120.0), ("3600", 3600.0)])
def test_parse_retry_after_seconds(header, seconds):
    # WHEN / THEN
    assert parse_retry_after(header, NOW) == seconds


def test_parse_retry_after_caps_seconds():
    # WHEN / THEN
    assert MAX_RETRY_AFTER_S == 3600.0
    assert parse_retry_after("86400", NOW) == 3600.0


def test_parse_retry_after_http_date_is_relative_to_now():
    # GIVEN a date 7 s after "now"
    header = formatdate(NOW + 7, usegmt=True)

    # WHEN / THEN
    assert header == "Tue, 14 Nov 2023 22:13:27 GMT"
    assert parse_retry_after(header, NOW) == 7.0
    assert parse_retry_after(header, NOW + 5) == 2.0


@pytest.mark.parametrize("header", ["0", "000", formatdate(NOW - 30, usegmt=True), formatdate(NOW, usegmt=True)])
def test_parse_retry_after_zero_or_a_past_date_is_none(header):
    # A 0 or a date not in the future says nothing to wait for: like Adobe's mobile SDKs (a Retry-After above 0, else
    # their default interval), the caller then backs off rather than retrying back to back (reference §3.4).
    # WHEN / THEN
    assert parse_retry_after(header, NOW) is None


def test_parse_retry_after_http_date_far_ahead_is_capped():
    # GIVEN
    header = formatdate(NOW + 86400, usegmt=True)

    # WHEN / THEN
    assert parse_retry_after(header, NOW) == 3600.0


def test_parse_retry_after_http_date_without_zone_is_utc():
    # GIVEN an asctime-style date (no zone)
    header = "Tue Nov 14 22:13:30 2023"

    # WHEN / THEN
    assert parse_retry_after(header, NOW) == 10.0


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "   ",
        "soon",
        "-5",
        "1.5",
        "2 seconds",
        "Tue, 99 Foo 2023",
        # numbers past any datetime: the date parser raises OverflowError, not ValueError
        "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
        "01 Jan 2024 99999999999999999999:00:00 GMT",
    ],
)
def test_parse_retry_after_garbage_is_none(header):
    # WHEN / THEN
    assert parse_retry_after(header, NOW) is None


def test_parse_retry_after_non_ascii_digits_are_none():
    # GIVEN a header byte 0xB2 as http.client decodes it (latin-1)
    header = b"\xb2".decode("latin-1")

    # WHEN / THEN
    assert parse_retry_after(header, NOW) is None


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [(1, 0.1, 0.2), (2, 0.2, 0.4), (3, 0.4, 0.8), (5, 1.6, 3.2), (6, 2.5, 5.0), (20, 2.5, 5.0)],
)
def test_backoff_jitter_between_half_and_full_ceiling(attempt, low, high):
    # GIVEN
    rng = random.Random(1234)

    # WHEN
    waits = [backoff(attempt, rng=rng) for _ in range(200)]

    # THEN
    assert all(low <= w <= high for w in waits)
    assert min(waits) < low + (high - low) * 0.1
    assert max(waits) > high - (high - low) * 0.1


def test_backoff_honours_base_and_cap():
    # GIVEN an rng that always picks the top of the range
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    # WHEN / THEN
    assert backoff(1, base=1.0, cap=10.0, rng=Top()) == 1.0
    assert backoff(4, base=1.0, cap=10.0, rng=Top()) == 8.0
    assert backoff(5, base=1.0, cap=10.0, rng=Top()) == 10.0


# -- codec ---------------------------------------------------------------------------------------------------------


def test_codec_small_document_is_a_compact_string():
    # GIVEN
    doc = {"handle": [{"type": "state:store", "payload": [{"key": "k", "value": "é"}]}]}

    # WHEN
    attr = codec.encode_json(doc)

    # THEN
    assert attr == {"S": '{"handle":[{"type":"state:store","payload":[{"key":"k","value":"é"}]}]}'}
    assert codec.decode_json(attr) == doc
    assert codec.attribute_size(attr) == len(attr["S"].encode("utf-8"))


def test_codec_exactly_the_threshold_stays_a_string():
    # GIVEN a list whose compact JSON is exactly 1024 bytes
    doc = ["a" * 1020]
    assert len(codec.dumps(doc)) == 1024

    # WHEN
    attr = codec.encode_json(doc)

    # THEN
    assert attr == {"S": codec.dumps(doc)}


def test_codec_big_compressible_document_becomes_binary_and_decodes_back():
    # GIVEN
    doc = {
        "handle": [
            {"type": "personalization:decisions", "payload": [{"id": i, "html": "<p>x</p>" * 20}]} for i in range(50)
        ]
    }
    text = codec.dumps(doc).encode("utf-8")

    # WHEN
    attr = codec.encode_json(doc)

    # THEN
    assert list(attr) == ["B"]
    assert attr["B"] == zlib.compress(text, 6)
    assert len(attr["B"]) < len(text)
    assert codec.decode_json(attr) == doc
    assert codec.attribute_size(attr) == len(attr["B"])


def test_codec_big_document_stays_a_string_when_zlib_does_not_shrink_it(monkeypatch):
    # GIVEN a big document and a compressor that cannot make it smaller
    doc = ["a" * 2000]
    monkeypatch.setattr(codec.zlib, "compress", lambda data, level: data + b"!")

    # WHEN
    attr = codec.encode_json(doc)

    # THEN
    assert attr == {"S": codec.dumps(doc)}
    assert codec.decode_json(attr) == doc


@pytest.mark.parametrize("size", [10, 3000])
def test_codec_keeps_a_lone_surrogate_as_its_json_escape(size: int) -> None:
    # GIVEN a document holding a lone UTF-16 surrogate (JSON's "\\ud83d" parses to one: an Edge answer may carry it),
    # small or big enough to be compressed
    doc = {"content": "hi \ud83d", "text": "caf\u00e9 \U0001f600", "pad": "x" * size}

    # WHEN it is stored and read back
    attr = codec.encode_json(doc)

    # THEN it is the same value (the surrogate, which UTF-8 cannot carry, is written as its JSON escape; the other
    # non-ASCII text as is)
    assert codec.decode_json(attr) == doc
    text = attr["S"] if "S" in attr else zlib.decompress(attr["B"]).decode("utf-8")
    assert "\\ud83d" in text and "caf\u00e9 \U0001f600" in text


def test_codec_writes_non_ascii_text_as_is_when_it_can() -> None:
    assert codec.dumps({"t": "caf\u00e9 \U0001f600"}) == '{"t":"caf\u00e9 \U0001f600"}'


def test_codec_attribute_size_of_a_number_counts_a_byte_per_two_digits_plus_one():
    # WHEN / THEN: DynamoDB's rule, without trimming zeroes (an upper bound)
    assert codec.attribute_size({"N": "1700000000"}) == 6
    assert codec.attribute_size({"N": "-12.5"}) == 3
    assert codec.attribute_size({"BOOL": True}) == 1


def test_codec_item_size_adds_names_and_values():
    # WHEN / THEN
    assert codec.item_size({"pk": {"S": "EVENT#é"}, "v": {"N": "12"}, "b": {"B": b"xyz"}}) == 2 + 8 + 1 + 2 + 1 + 3


def _handles(n: int) -> list[dict[str, object]]:
    """Compressible handles, `n` of them: about 135 bytes of JSON each."""
    entries = [{"key": f"kndctr_{i}_identity", "value": "CiY" * 20} for i in range(n)]
    return [{"type": "state:store", "payload": [entry]} for entry in entries]


def test_fit_write_unit_leaves_an_item_within_one_unit_alone():
    # GIVEN an item of well under 1 KB
    item = {"pk": {"S": "EVENT#1"}, "handle": codec.encode_json(_handles(2))}

    # WHEN / THEN: the very same item, the document still a string
    assert codec.fit_write_unit(item, ("handle",)) is item


def test_fit_write_unit_compresses_a_document_whose_item_would_take_two_units():
    # GIVEN a document under 1 KiB (so `encode_json` keeps it a string) in an item over 1 KB
    doc = _handles(7)
    assert len(codec.dumps(doc)) <= codec.COMPRESS_OVER_BYTES
    item = {"pk": {"S": "EVENT#1"}, "handle": codec.encode_json(doc), "requestId": {"S": "r" * 300}}
    assert codec.item_size(item) > codec.WRITE_UNIT_BYTES

    # WHEN
    fitted = codec.fit_write_unit(item, ("handle",))

    # THEN the document is zlib JSON that decodes to the same document, the item fits one unit, the rest is unchanged
    assert "B" in fitted["handle"]
    assert codec.decode_json(fitted["handle"]) == doc
    assert codec.item_size(fitted) <= codec.WRITE_UNIT_BYTES
    assert {k: v for k, v in fitted.items() if k != "handle"} == {k: v for k, v in item.items() if k != "handle"}
    assert "S" in item["handle"]  # the given item is not changed


def test_fit_write_unit_compresses_the_largest_document_first_and_stops_once_it_fits():
    # GIVEN two documents: a large one and a small one, together over 1 KB
    handle, warnings = codec.encode_json(_handles(7)), codec.encode_json(_handles(1))
    item = {"pk": {"S": "EVENT#1"}, "handle": handle, "warnings": warnings}
    assert codec.item_size(item) > codec.WRITE_UNIT_BYTES

    # WHEN
    fitted = codec.fit_write_unit(item, ("handle", "warnings"))

    # THEN only the large one was needed
    assert "B" in fitted["handle"]
    assert fitted["warnings"] == item["warnings"]


def test_fit_write_unit_keeps_a_string_that_zlib_cannot_shrink(monkeypatch):
    # GIVEN an item over 1 KB and a compressor that cannot make its document smaller
    item = {"pk": {"S": "EVENT#1"}, "handle": codec.encode_json(_handles(7)), "requestId": {"S": "r" * 300}}
    assert codec.item_size(item) > codec.WRITE_UNIT_BYTES
    monkeypatch.setattr(codec.zlib, "compress", lambda data, level: data + b"!")

    # WHEN / THEN: two units rather than a bigger item
    assert codec.fit_write_unit(item, ("handle",)) == item
