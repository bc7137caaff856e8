"""How JSON documents are kept in DynamoDB attributes.

A document is stored as a compact JSON string (type S). It is stored compressed instead (type B, zlib of the UTF-8
JSON) when zlib makes it smaller and either the document is over 1 KiB or its item would otherwise be over one write
unit (`fit_write_unit`: DynamoDB bills each started KB of an item written). Readers accept both, so the choice is
invisible: see `decode_json` and the README's boto3 snippet.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from typing import Any

COMPRESS_OVER_BYTES = 1024
WRITE_UNIT_BYTES = 1024  # DynamoDB bills a write one unit per started KB of the item


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def has_lone_surrogate(value: str) -> bool:
    """Whether `value` holds a lone UTF-16 surrogate: a character cut in half, which JSON's `"\\ud83d"` parses to."""
    return not value.isascii() and _SURROGATE.search(value) is not None


def text(value: str) -> str:
    """`value`, with any lone UTF-16 surrogate written as its `\\uXXXX` escape, so that it can be encoded as UTF-8.
    JSON's `"\\ud83d"` parses to one, and an Edge answer may carry one (an offer cut in the middle of an emoji)."""
    if not has_lone_surrogate(value):
        return value
    return _SURROGATE.sub(_escape, value)


def dumps(value: Any) -> str:
    """Compact JSON, non-ASCII text as is. A lone surrogate can only be inside a string, so writing it as its JSON
    escape (`text`) gives the same JSON value, in text that UTF-8 can carry."""
    return text(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


class NotAJsonNumber(ValueError):
    """`NaN`, `Infinity` (which Python's parser accepts but JSON does not) or a number too large for a float. Its text
    is what a sender of such a body is answered (400)."""


def _not_json(name: str) -> Any:
    raise NotAJsonNumber(f"body is not JSON: {name} is not a JSON value")


def _finite(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):  # 1e400 is JSON, but reads as infinity, which could only be sent on as `Infinity`
        raise NotAJsonNumber(f"body has a number too large to read: {number[:40]}")
    return value


# `json.loads` arguments for JSON as RFC 8259 has it: Python's parser also takes `NaN` and `Infinity`, and reads `1e999`
# as infinity, none of which `dumps` could write back as JSON (it would write `NaN`, which strict parsers, such as
# JavaScript's, refuse). Parsing with them raises NotAJsonNumber (a ValueError) on those. Inbound bodies and Edge's
# answers are both read with them.
STRICT_JSON: dict[str, Any] = {"parse_constant": _not_json, "parse_float": _finite}


def encode_json(value: Any) -> dict[str, Any]:
    """A low-level DynamoDB AttributeValue holding `value`."""
    text = dumps(value).encode("utf-8")
    if len(text) > COMPRESS_OVER_BYTES:
        packed = zlib.compress(text, 6)
        if len(packed) < len(text):
            return {"B": packed}
    return {"S": text.decode("utf-8")}


def decode_json(attribute: dict[str, Any]) -> Any:
    if "B" in attribute:
        return json.loads(zlib.decompress(attribute["B"]).decode("utf-8"))
    return json.loads(attribute["S"])


def attribute_size(attribute: dict[str, Any]) -> int:
    """DynamoDB's size of a value of the kinds this code writes (S, B, N, BOOL); a number is counted as if none of
    its digits were trimmed (an upper bound: DynamoDB counts a byte per two significant digits, plus one)."""
    if "BOOL" in attribute:
        return 1
    if "N" in attribute:
        return (len(str(attribute["N"]).lstrip("-").replace(".", "")) + 1) // 2 + 1
    value = attribute.get("B", attribute.get("S", ""))
    return len(value) if isinstance(value, bytes) else len(str(value).encode("utf-8"))


def item_size(item: dict[str, Any]) -> int:
    """DynamoDB's size of an item: its attribute names and values."""
    return sum(len(name.encode("utf-8")) + attribute_size(value) for name, value in item.items())


def fit_write_unit(item: dict[str, Any], documents: tuple[str, ...]) -> dict[str, Any]:
    """`item`, with its JSON documents among `documents` compressed, largest first, while it is over one write unit
    and zlib makes the document smaller. A typical Edge answer then costs one write unit instead of two."""
    size = item_size(item)
    if size <= WRITE_UNIT_BYTES:
        return item
    item = dict(item)
    strings = [name for name in documents if "S" in item.get(name, {})]
    for name in sorted(strings, key=lambda n: -len(item[n]["S"])):
        text = item[name]["S"].encode("utf-8")
        packed = zlib.compress(text, 6)
        if len(packed) < len(text):
            item[name] = {"B": packed}
            size -= len(text) - len(packed)
            if size <= WRITE_UNIT_BYTES:
                break
    return item
