"""How JSON documents are kept in DynamoDB attributes.

A document is stored as a compact JSON string (type S). When its JSON is over 1 KiB and zlib makes it smaller, it is
stored compressed instead (type B, zlib of the UTF-8 JSON). Readers accept both, so the choice is invisible: see
`decode_json` and the README's boto3 snippet.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

COMPRESS_OVER_BYTES = 1024


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


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
    value = attribute.get("B", attribute.get("S", attribute.get("N", "")))
    return len(value) if isinstance(value, bytes) else len(str(value).encode("utf-8"))
