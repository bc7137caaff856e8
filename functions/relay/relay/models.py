"""The inbound interact event: validation at the edge, eventId and datastream resolution (contract §2)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal

from relay import codec
from relay.errors import MAX_ERROR_TEXT, MAX_ERRORS, InvalidEvent, PayloadTooLarge
from relay.identity_state import opaque_identity_id
from relay.settings import DATASTREAM_ID_RE

MAX_BODY_BYTES = 64 * 1024  # Edge's own limit (EXEG-0112-413)
MAX_EVENT_ID_LENGTH = 256
MAX_DEPTH = 64  # levels of nested objects/arrays: far beyond any XDM schema, far below what json.dumps can recurse

Source = Literal["webhook", "sqs"]


@dataclass(frozen=True)
class InboundEvent:
    """A validated event, ready for Edge: `request` already carries the stable `xdm._id` and a timestamp."""

    event_id: str
    datastream_id: str
    source: Source
    request: dict[str, Any]
    received_at: float
    primary_identity: tuple[str, str] | None = field(default=None, repr=False)  # (namespace, id): never log
    identity_key: bytes | None = field(default=None, repr=False, compare=False)  # the deployment's HMAC key
    # `xdm.timestamp` was the relay's (the receive time: the sender gave none); an earlier attempt's then wins
    default_timestamp: bool = False
    # The request named no datastream (`datastream_id` is the deployment's default, which a deploy may change): its
    # eventId's first attempt, if it also named none, is the event it resends (`Relay.process`)
    default_datastream: bool = False

    @property
    def timestamp(self) -> str | None:
        """The `xdm.timestamp` the request carries when the relay set it (else None: the sender's own)."""
        return str(self.request["event"]["xdm"]["timestamp"]) if self.default_timestamp else None

    @property
    def stamp(self) -> tuple[str, str] | None:
        """(`timestamp`, whose it is: the event's opaque identity and datastream) when the relay set it, else None.
        An earlier attempt's time is taken only from the same event: another event reusing its `_id` while it waits
        (a reuse is told only once the first is done) must not be sent with the first one's time."""
        timestamp = self.timestamp
        return None if timestamp is None else (timestamp, f"{self.stored_identity_id}|{self.datastream_id}")

    def with_timestamp(self, timestamp: str) -> InboundEvent:
        """The event with the `xdm.timestamp` an earlier attempt sent under the same `xdm._id` (one event, one time)."""
        event = self.request["event"]
        request = {**self.request, "event": {**event, "xdm": {**event["xdm"], "timestamp": timestamp}}}
        return replace(self, request=request)

    @cached_property
    def identity_id(self) -> str | None:
        """The primary identity's opaque key (hashed once per event), or None without a primary identity."""
        if not self.primary_identity:
            return None
        return opaque_identity_id(*self.primary_identity, key=self.identity_key)

    @property
    def stored_identity_id(self) -> str:
        """`identityId` as a result keeps it: the opaque id, or "" without a primary identity (a repeat must match)."""
        return self.identity_id or ""


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def iso_millis(epoch: float) -> str:
    millis = int(epoch * 1000)  # truncate once, so seconds and milliseconds agree
    return datetime.fromtimestamp(millis // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis % 1000:03d}Z"


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


_ABSENT = object()  # a member the body does not have (`null` is a value: "must be an object, not null")


def _expect_object(errors: list[dict[str, str]], value: Any, path: str) -> bool:
    if value is _ABSENT:
        errors.append({"path": path, "message": "is required"})
        return False
    if not isinstance(value, dict):
        errors.append({"path": path, "message": f"must be an object, not {_type_name(value)}"})
        return False
    return True


# Envelopes AWS services wrap a message in, when a producer routes events through them on the way to the queue: the
# refusal names the setting that delivers the event itself (read from the body's member names, never its values).
_SNS_MEMBERS = frozenset({"Type", "TopicArn", "Message"})
_SNS_MESSAGES = {  # by SNS's `Type` (a fixed word)
    "Notification": "is required: this is an SNS notification; turn on raw message delivery on the topic's "
    "subscription to the queue, so that the queue receives the event itself",
    "SubscriptionConfirmation": "is required: this is an SNS subscription confirmation; confirm the subscription "
    "(with the topic's owner, or its SubscribeURL), with raw message delivery on",
}
_EVENTBRIDGE_MEMBERS = frozenset({"detail-type", "source", "detail"})
_EVENTBRIDGE_MESSAGE = (
    "is required: this is an EventBridge event; send its `detail` (an input transformer or input path on the rule's "
    "target) holding the interact request"
)


def _envelope(doc: dict[str, Any]) -> str | None:
    """What to say of a body without `event` that is an AWS service's envelope, or None."""
    if _SNS_MEMBERS <= doc.keys():
        kind = doc.get("Type")
        return _SNS_MESSAGES.get(kind if isinstance(kind, str) else "", _SNS_MESSAGES["Notification"])
    return _EVENTBRIDGE_MESSAGE if _EVENTBRIDGE_MEMBERS <= doc.keys() else None


def _date_time(value: Any) -> bool:
    """Whether `value` is a date and time as XDM's `timestamp` is (JSON Schema's `date-time`, RFC 3339), with or without
    an offset: not a date alone, a number in a string, or a word, which would only reach Edge to be refused there."""
    if not isinstance(value, str) or not _DATE_TIME.match(value):
        return False
    leap = value[17:19] == "60"  # a leap second (RFC 3339 §5.7), which Python's parser does not take
    text = value[:17] + "59" + value[19:] if leap else value
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" else text)
    except ValueError:
        return False
    utc = moment.astimezone(UTC) if moment.tzinfo else moment
    return not leap or (utc.hour, utc.minute) == (23, 59)  # only the last second of a UTC day can be one


_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}")
TIMESTAMP_MESSAGE = (
    "must be a date and time, as XDM's date-time (RFC 3339: 2026-01-01T00:05:00.000Z; an offset or none)"
)


def _unset(xdm: dict[str, Any], name: str) -> bool:
    """Whether `xdm[name]` is not given: absent, or null or empty as many serializers write an unset member (Adobe's
    mobile SDKs fill in such a timestamp, and set `_id` themselves). The relay fills it in, as when absent."""
    return xdm.get(name) is None or xdm.get(name) == ""


def validate_request(doc: Any) -> list[dict[str, str]]:
    """Return every structural problem of an interact request body, each with its field path (for an AWS service's
    envelope without `event`, that alone: the rest of it is the envelope's, not the event's)."""
    errors: list[dict[str, str]] = []
    if not isinstance(doc, dict):
        return [{"path": "$", "message": f"must be a JSON object, not {_type_name(doc)}"}]
    if "event" not in doc and (envelope := _envelope(doc)) is not None:
        return [{"path": "event", "message": envelope}]
    if _expect_object(errors, doc.get("event", _ABSENT), "event"):
        event = doc["event"]
        if _expect_object(errors, event.get("xdm", _ABSENT), "event.xdm"):
            xdm = event["xdm"]
            if not _unset(xdm, "_id") and not (isinstance(xdm["_id"], str) and len(xdm["_id"]) <= MAX_EVENT_ID_LENGTH):
                message = f"must be a string of 1-{MAX_EVENT_ID_LENGTH} characters"
                errors.append({"path": "event.xdm._id", "message": message})
            elif not _unset(xdm, "_id") and _ID_REFUSED.search(xdm["_id"]):
                # It becomes the queue message's `eventId` attribute, which SQS refuses with these characters.
                message = _ID_REFUSED_MESSAGE
                errors.append({"path": "event.xdm._id", "message": message})
            if not _unset(xdm, "timestamp") and not _date_time(xdm["timestamp"]):
                errors.append({"path": "event.xdm.timestamp", "message": TIMESTAMP_MESSAGE})
            if "identityMap" in xdm:
                _validate_identity_map(errors, xdm["identityMap"])
        if "data" in event:
            _expect_object(errors, event["data"], "event.data")
    for key in ("query", "meta"):
        if key in doc:
            _expect_object(errors, doc[key], key)
    meta = as_dict(doc.get("meta"))
    if "state" in meta and _expect_object(errors, meta["state"], "meta.state"):
        entries = meta["state"].get("entries")
        if entries is not None:
            if not isinstance(entries, list):
                errors.append({"path": "meta.state.entries", "message": "must be an array"})
            else:
                for i, entry in enumerate(entries):
                    if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)):
                        errors.append({"path": f"meta.state.entries[{i}]", "message": "must be an object with a key"})
    return errors


# XDM's AuthenticatedState, as Adobe's Web SDK checks it before sending (alloy `validateIdentityMap.js`: `enumOf`).
AUTHENTICATED_STATES = ("ambiguous", "authenticated", "loggedOut")
# What SQS refuses in a message attribute (the same characters as in a body: it takes #x9, #xA, #xD, #x20-#xD7FF,
# #xE000-#xFFFD and #x10000-#x10FFFF), and so in the eventId attribute a queued event carries.
_ID_REFUSED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ID_REFUSED_MESSAGE = (
    "must not contain control characters other than tab, line feed and carriage return, an unpaired UTF-16 surrogate, "
    "U+FFFE or U+FFFF"
)
# A lone UTF-16 surrogate (`codec.has_lone_surrogate`) is sent on as its escape; only an identity refuses one, whose
# namespace and id key the person's state.
_CUT_CHARACTER = "must not contain an unpaired UTF-16 surrogate (a character cut in half)"
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # written as `.name` in a field path; anything else as `["..."]`
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# What a namespace code looks like ("ECID", "Email", "loyalty_id", "my-ns.v2"). A key that does not (an email address,
# a phone number: an identity put where its namespace belongs) is never repeated in an answer, which would echo a
# person's identity: its field path names its position instead. An identity shaped like a code (a user name such as
# "jane.doe") cannot be told from one, and is repeated.
_NAMESPACE_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


def _namespace_path(namespace: str, position: int) -> str:
    if _PLAIN_KEY.fullmatch(namespace):
        return f"event.xdm.identityMap.{namespace}"
    if _NAMESPACE_CODE.fullmatch(namespace):
        return f"event.xdm.identityMap[{json.dumps(namespace)}]"
    return f"event.xdm.identityMap[<namespace {position}>]"


def _validate_identity_map(errors: list[dict[str, str]], identity_map: Any) -> None:
    if not isinstance(identity_map, dict):
        errors.append({"path": "event.xdm.identityMap", "message": "must be an object"})
        return
    for position, (namespace, items) in enumerate(identity_map.items(), start=1):
        path = _namespace_path(namespace, position)
        if not namespace or _CONTROL.search(namespace):
            # Namespaces are codes ("ECID", "Email"); a control character could also make two identities one key.
            errors.append({"path": path, "message": "must be a non-empty namespace code without control characters"})
            continue
        if codec.has_lone_surrogate(namespace):
            errors.append({"path": path, "message": _CUT_CHARACTER})
            continue
        if not isinstance(items, list):
            errors.append({"path": path, "message": "must be an array of identities"})
            continue
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                errors.append({"path": f"{path}[{i}]", "message": "must be an object"})
                continue
            if not (isinstance(item.get("id"), str) and item["id"]):
                errors.append({"path": f"{path}[{i}].id", "message": "is required and must be a non-empty string"})
            elif codec.has_lone_surrogate(item["id"]):
                errors.append({"path": f"{path}[{i}].id", "message": _CUT_CHARACTER})
            # null passes for both, as in the Web SDK (alloy `validateIdentityMap.js`: its `boolean()` and `enumOf` run
            # behind a null-safe chain); a null `primary` is not primary
            if item.get("primary") is not None and not isinstance(item["primary"], bool):
                errors.append({"path": f"{path}[{i}].primary", "message": "must be a boolean"})
            if item.get("authenticatedState") is not None and item["authenticatedState"] not in AUTHENTICATED_STATES:
                message = "must be one of " + ", ".join(f'"{state}"' for state in AUTHENTICATED_STATES)
                errors.append({"path": f"{path}[{i}].authenticatedState", "message": message})


def primary_identity(xdm: dict[str, Any]) -> tuple[str, str] | None:
    """The identity marked `primary: true` (the first one if several: Edge refuses an event with more than one,
    EXEG-0306-400, and the relay stores that as Edge's rejection, writing no state)."""
    identity_map = xdm.get("identityMap")
    if not isinstance(identity_map, dict):
        return None
    for namespace, items in identity_map.items():
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("primary") is True and isinstance(item.get("id"), str):
                return namespace, item["id"]
    return None


def decode_body(raw: bytes | str, *, limit: int | None = MAX_BODY_BYTES) -> tuple[str, Any]:
    """Enforce the size limit (None: none; an event the relay accepted and queued itself) and parse JSON. Returns
    (text, document)."""
    if not isinstance(raw, bytes | str):  # a malformed record (an SQS body is always a string)
        raise InvalidEvent([{"path": "$", "message": f"body is {_type_name(raw)}, not a string"}])
    data = raw.encode("utf-8", errors="surrogatepass") if isinstance(raw, str) else raw
    if limit is not None and len(data) > limit:
        raise PayloadTooLarge(len(data), limit)
    try:
        # A UTF-8 byte-order mark before the JSON is ignored, as RFC 8259 §8.1 lets a parser do (some senders' writers
        # add one; Python's parser alone would refuse it). What is sent on is the parsed document, without it.
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InvalidEvent([{"path": "$", "message": f"body is not UTF-8 (byte {exc.start})"}]) from None
    if not text.strip():
        raise InvalidEvent([{"path": "$", "message": "body is empty"}])
    repeated: list[_Repeated] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) == len(items):
            return obj
        found = _Repeated(obj)
        seen: set[str] = set()
        found.keys_twice = []
        for key, _ in items:
            if key in seen:
                found.keys_twice.append(key)
            seen.add(key)
        repeated.append(found)
        return found

    try:
        doc = json.loads(text, **codec.STRICT_JSON, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, codec.NotAJsonNumber):
            message = str(exc)
        elif isinstance(exc, json.JSONDecodeError):
            message = f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        elif isinstance(exc, RecursionError):
            message = "body is nested too deeply"
        else:  # Python refuses integers of more than 4,300 digits (a guard against quadratic parsing)
            message = "body has a number with too many digits to read"
        raise InvalidEvent([{"path": "$", "message": message}]) from None
    if repeated:
        # JSON leaves a repeated key's meaning open (RFC 8259 §4): Python keeps the last value, a sender's validator
        # may have checked the first. Refused, naming where, so that what was checked is what Edge would get.
        # Only the paths an answer keeps are spelled out (each can repeat a long ancestor key): the rest are counted.
        total = sum(len(set(found.keys_twice)) for found in repeated)
        paths = itertools.islice(_repeated_paths(doc), MAX_ERRORS)
        errors = [{"path": path[:MAX_ERROR_TEXT], "message": "appears more than once in its object"} for path in paths]
        raise RepeatedKeys(doc, errors, total=total)
    if text.count("{") + text.count("[") > MAX_DEPTH and deeper_than(doc, MAX_DEPTH):
        # It parsed, but sending it on (json.dumps recurses) could fail: refuse it now, with a reason.
        raise InvalidEvent([{"path": "$", "message": f"body is nested more than {MAX_DEPTH} levels deep"}])
    return text, doc


class RepeatedKeys(InvalidEvent):
    """A body that parsed, but with a key twice in one object: refused; `doc` (the last values) still names its
    `xdm._id`, under which the refusal is kept."""

    def __init__(self, doc: Any, errors: list[dict[str, str]], *, total: int) -> None:
        super().__init__(errors, total=total)
        self.doc = doc


class _Repeated(dict[str, Any]):
    """A JSON object in which a key appeared more than once (the last value kept, as `json` does)."""

    keys_twice: list[str]


def _key_path(parent: str, key: str, position: int) -> str:
    """A field path to `key` that never repeats a key that is not a plain name or code (an email address put where a
    namespace belongs, say): its position stands in for it."""
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    if _NAMESPACE_CODE.fullmatch(key):
        return f"{parent or '$'}[{json.dumps(key)}]"
    return f"{parent or '$'}[<key {position}>]"


_Link = tuple[Any, Any, int] | None  # (parent link, key or index, 1-based position among the keys; 0 for an index)


def _path_of(link: _Link) -> str:
    """The field path a chain of links names (built only for the paths reported)."""
    steps: list[tuple[Any, int]] = []
    while link is not None:
        link, step, position = link
        steps.append((step, position))
    path = ""
    for step, position in reversed(steps):
        path = _key_path(path, step, position) if position else f"{path or '$'}[{step}]"
    return path


def _repeated_paths(doc: Any) -> Iterator[str]:
    """The field paths of the repeated keys in `doc`, in document order, as they are asked for. Iterative (no
    recursion), and only containers are visited, each with a link to its parent: a path is spelled out only for a
    repeated key (a hostile body's thousands of leaves under a long key would otherwise each get a copy of it)."""
    stack: list[tuple[Any, _Link]] = [(doc, None)]
    while stack:
        node, link = stack.pop()
        if isinstance(node, dict):
            if isinstance(node, _Repeated):
                positions = {k: n for n, k in enumerate(node, start=1)}
                base = _path_of(link)
                yield from (_key_path(base, k, positions[k]) for k in dict.fromkeys(node.keys_twice))
            children = [
                (v, (link, k, n)) for n, (k, v) in enumerate(node.items(), start=1) if isinstance(v, dict | list)
            ]
        elif isinstance(node, list):
            children = [(v, (link, i, 0)) for i, v in enumerate(node) if isinstance(v, dict | list)]
        else:
            continue
        stack.extend(reversed(children))


def deeper_than(doc: Any, limit: int) -> bool:
    """Whether objects/arrays nest more than `limit` levels (iteratively: no recursion on hostile input)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


# Names the refused datastream (a well-formed id by then, not personal data): the stored rejection is filed under the
# default datastream, so this is where an operator reads which one a request named.
NOT_ALLOWED_DATASTREAM = '"{}" is not one of the datastreams this relay sends to (ALLOWED_DATASTREAM_IDS)'
DEFAULT_NOT_ALLOWED = (
    "is required: the default datastream is not one of those this relay sends to (ALLOWED_DATASTREAM_IDS)"
)
# The answer's detail when the datastream, not the body, is what is wrong (`errors` says how).
DATASTREAM_DETAIL = "the event's datastream is malformed or not one this relay sends to"


# The names the datastream goes by: the contract's, and the spelling Edge takes too (Adobe's Node sample uses it).
DATASTREAM_NAMES = ("datastreamId", "dataStreamId")


def _loose(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


def datastream_name(names: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Which of a webhook's query parameters, or an SQS record's message attributes, names the datastream, or what is
    wrong with them. Any other spelling (`DatastreamId`, `datastreamid`, `datastream_id`, `DATASTREAM-ID`) is refused,
    not taken for absent: that would send the event to the default datastream, which may be another sandbox. Both
    spellings with different values are refused too."""
    given = [name for name in names if isinstance(name, str) and _loose(name) == "datastreamid"]
    odd = [name for name in given if name not in DATASTREAM_NAMES]
    if odd:
        return None, f"is spelled datastreamId (or dataStreamId), not {odd[0]}"
    if len(given) == 2 and names[given[0]] != names[given[1]]:
        return None, "is given twice, as datastreamId and dataStreamId, with different values"
    return (given[0] if given else None), None


def resolve_datastream(candidate: str | None, default: str, allowed: frozenset[str] = frozenset()) -> str:
    """The datastream an event goes to: the one its request named, else `default`. `allowed` (ALLOWED_DATASTREAM_IDS),
    when not empty, is every datastream an event may go to, the default included only if listed: otherwise a replayed
    webhook could reach the default by leaving out the `?datastreamId=` its sender signed the body for."""
    if candidate == "":
        # `?datastreamId=` with nothing after it (a sender's unset template variable): taken for absent, the event
        # would go to the default datastream, which may be another sandbox (as for a misspelled name)
        raise _bad_datastream("is empty: name a datastream, or leave the parameter out for the default")
    if candidate is None:
        if allowed and default not in allowed:
            raise _bad_datastream(DEFAULT_NOT_ALLOWED)
        return default
    if not DATASTREAM_ID_RE.fullmatch(candidate):
        raise _bad_datastream("must be a datastream id (letters, digits, -_:.)")
    if allowed and candidate not in allowed:
        raise _bad_datastream(NOT_ALLOWED_DATASTREAM.format(candidate))
    return candidate


def _bad_datastream(message: str) -> InvalidEvent:
    return InvalidEvent([{"path": "datastreamId", "message": message}], detail=DATASTREAM_DETAIL)


def datastream_for_rejection(candidate: str | None, default: str, allowed: frozenset[str] = frozenset()) -> str:
    """The datastream a rejected body is filed under: the one the request named, even when the body could not be read
    (the datastream does not come from the body); the default when it named none, or none valid or allowed (a field of
    the rejection only: nothing is sent there)."""
    try:
        return resolve_datastream(candidate, default, allowed)
    except InvalidEvent:
        return default


def event_id_for(doc: Any, fallback_id: str) -> str:
    """`event.xdm._id` when present and valid, else the transport's id (webhook-id / SQS messageId). An `_id` holding a
    lone UTF-16 surrogate (a character cut in half) is refused (`validate`), and its refusal could not be kept under
    it: no DynamoDB key holds one. It is kept under the transport's id, which the answer names."""
    try:
        candidate = doc["event"]["xdm"]["_id"]
    except (KeyError, TypeError):
        candidate = None
    if (
        isinstance(candidate, str)
        and 0 < len(candidate) <= MAX_EVENT_ID_LENGTH
        and not codec.has_lone_surrogate(candidate)
    ):
        return candidate
    return bounded_id(fallback_id)


def read_event(
    raw: bytes | str,
    fallback_id: str,
    *,
    datastream: str | None,
    default_datastream: str,
    source: Source,
    received_at: float,
    identity_key: bytes | None,
    limit: int | None = MAX_BODY_BYTES,
    datastream_error: str | None = None,
    allowed_datastreams: frozenset[str] = frozenset(),
) -> InboundEvent:
    """A body as an event, for either trigger: size limit and JSON (`decode_body`), its eventId (contract §2), its
    datastream (`datastream`, as the request named it), validation (`build_inbound`). Raises InvalidEvent carrying in
    `event_id` the id its rejection is kept under: the body's `xdm._id` whenever it can be read (a body over the limit
    too, so its sender finds it by the id it knows), else `fallback_id`. `datastream_error`: why the datastream the
    request named cannot be read (an SQS attribute of the wrong type), refused as such."""
    event_id = fallback_id
    try:
        try:
            _, doc = decode_body(raw, limit=limit)
        except PayloadTooLarge:
            event_id = _event_id_of_oversized(raw, fallback_id)
            raise
        except RepeatedKeys as exc:
            event_id = event_id_for(exc.doc, fallback_id)  # kept where its sender looks for it, as any other refusal
            raise
        event_id = event_id_for(doc, fallback_id)  # before anything else can fail: a rejection is kept by it
        if datastream_error is not None:
            raise InvalidEvent([{"path": "datastreamId", "message": datastream_error}])
        return build_inbound(
            doc,
            event_id=event_id,
            datastream_id=resolve_datastream(datastream, default_datastream, allowed_datastreams),
            source=source,
            received_at=received_at,
            identity_key=identity_key,
            default_datastream=not datastream,
        )
    except InvalidEvent as exc:
        exc.event_id = event_id
        raise


# A body refused as too large is parsed to find its `xdm._id` up to this size (SQS's largest message): a signed
# webhook of some megabytes parsed whole costs seconds of CPU and hundreds of megabytes, to answer a 413.
MAX_OVERSIZED_PARSE_BYTES = 1024 * 1024


def _event_id_of_oversized(raw: bytes | str, fallback_id: str) -> str:
    """The eventId of a body refused as too large (before it was parsed): its `xdm._id` when it is JSON with one, up
    to MAX_OVERSIZED_PARSE_BYTES; else the transport's id."""
    if len(raw) > MAX_OVERSIZED_PARSE_BYTES:  # (characters of a str: at least as many bytes)
        return bounded_id(fallback_id)
    try:
        _, doc = decode_body(raw, limit=None)
    except RepeatedKeys as exc:
        doc = exc.doc  # JSON all the same: it names its xdm._id
    except InvalidEvent:
        return bounded_id(fallback_id)
    return event_id_for(doc, fallback_id)


def bounded_id(value: str) -> str:
    """`value` as an eventId of at most MAX_EVENT_ID_LENGTH characters: itself when short enough, else its start and a
    SHA-256 of the whole, so two long ids that share their first 256 characters stay two events (the same id always
    gives the same eventId, so a retry is still a repeat). A transport id (a `webhook-id`) holding a character SQS
    refuses in the queue message's `eventId` attribute (`_ID_REFUSED`) gets the same form, without those characters:
    kept as it came, such an event could never be queued while Edge is down (503 to every resend)."""
    refused = _ID_REFUSED.search(value) is not None
    if len(value) <= MAX_EVENT_ID_LENGTH and not refused:
        return value
    digest = hashlib.sha256(value.encode("utf-8", errors="surrogatepass")).hexdigest()
    kept = _ID_REFUSED.sub("", value) if refused else value
    return f"{kept[: MAX_EVENT_ID_LENGTH - len(digest) - 1]}~{digest}"


def check_size_as_sent(inbound: InboundEvent) -> None:
    """Refuse (413) an event that fitted Edge's limit as received but not as the relay would send it. A webhook checks
    this before it can answer 202: an event it queued must be deliverable."""
    size = len(codec.dumps(inbound.request).encode("utf-8"))
    if size > MAX_BODY_BYTES:
        raise PayloadTooLarge(size, MAX_BODY_BYTES, as_sent=True)


def build_inbound(
    doc: Any,
    *,
    event_id: str,
    datastream_id: str,
    source: Source,
    received_at: float,
    identity_key: bytes | None = None,
    default_datastream: bool = False,
) -> InboundEvent:
    """Validate `doc` and return the event with `xdm._id` and `xdm.timestamp` filled in (stable across retries).
    `default_datastream`: `InboundEvent.default_datastream`."""
    errors = validate_request(doc)
    if errors:
        raise InvalidEvent(errors)
    request = dict(doc)
    event = dict(request["event"])
    xdm = dict(event["xdm"])
    if _unset(xdm, "_id"):
        xdm["_id"] = event_id
    default_timestamp = _unset(xdm, "timestamp")
    if default_timestamp:
        xdm["timestamp"] = iso_millis(received_at)
    event["xdm"] = xdm
    request["event"] = event
    return InboundEvent(
        event_id=event_id,
        datastream_id=datastream_id,
        source=source,
        request=request,
        received_at=received_at,
        primary_identity=primary_identity(xdm),
        identity_key=identity_key,
        default_timestamp=default_timestamp,
        default_datastream=default_datastream,
    )
