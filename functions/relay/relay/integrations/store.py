"""DynamoDB layout of contract §9: one result item per event (also its idempotency claim) and one state item per
(identity, datastream). Low-level client, JSON documents encoded by `relay.codec`."""

from __future__ import annotations

import math
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from relay import codec
from relay.clock import Clock, Deadline
from relay.errors import StoreUnavailable
from relay.identity_state import STATE_FORMAT, IdentityState, state_from_item, state_to_item
from relay.models import iso_millis
from relay.observability import count, logger

RELAY = "relay"  # `rejectedBy` of an event the relay refused itself (never sent to Edge)
MAX_ITEM_BYTES = 380_000  # below DynamoDB's 400 KB item limit, with room for names and numbers
MAX_ERROR_BYTES = 16 * 1024  # an Edge problem kept whole up to this; cut to its essentials when the item is too big
_FLAG_BYTES = 20  # an `...Omitted`/`errorTrimmed` flag's name and value
_JSON_FIELDS = ("handle", "errors", "warnings", "error", "request")
_ALWAYS_KEPT = frozenset({"status", "eventId", "datastreamId", "source", "storedAt"})
STATE_WRITE_ATTEMPTS = 8
BATCH_WRITE_SIZE = 25  # DynamoDB's BatchWriteItem limit
BATCH_ATTEMPTS = 4  # for items DynamoDB leaves unprocessed (throttling), with backoff 50, 100, 200 ms
# Results still unprocessed after those are sent again while the batch's deadline leaves this much after the wait
# (their records would otherwise go back to the queue and, delivered already, to Edge again): backoff doubling to 1 s.
UNPROCESSED_RESERVE_S = 1.0
UNPROCESSED_MAX_WAIT_S = 1.0
UNPROCESSED = "dynamodb batch_write_item left the item unprocessed"  # put_results' reason for such a result
_MULTI_TABLE_OPS = frozenset({"batch_write_item", "batch_get_item", "batch_execute_statement"})  # tables named inside
CLAIM_INSERT_SIZE = 25  # DynamoDB's BatchExecuteStatement limit
# The attributes a claim sets on a new event's item, in the order of `claim_new`'s INSERT parameters.
_CLAIM_FIELDS = (
    "pk", "sk", "status", "leaseUntil", "claimToken", "eventId", "datastreamId", "source", "expiresAt", "updatedAt",
    "attempts",
)  # fmt: skip


# What an operator checks when DynamoDB's refusal is about the table, not the item or the load: said in the line the
# event's retry logs (and the item keeps), beside the error code.
_SETTING_HINTS = {
    "ResourceNotFoundException": " (no such table: check HANDLES_TABLE and the region)",
    "AccessDeniedException": " (check the function's permissions on HANDLES_TABLE)",
}


@dataclass(frozen=True)
class Claim:
    acquired: bool
    token: str | None = None
    existing: dict[str, Any] | None = None  # the stored item (decoded) when not acquired
    item: dict[str, Any] | None = None  # what the result keeps of the claimed item (raw attributes) when acquired
    # When acquired: the `xdm.timestamp` the relay gave the event's first attempt (`xdmTimestamp`), which every
    # attempt of the same event sends (one `_id`, one time), or None when the relay set none (the sender's own)
    timestamp: str | None = None


@dataclass(frozen=True)
class ResultWrite:
    """A final result item, composed and ready to be written (now, or with other results in one batch)."""

    event_id: str
    item: dict[str, Any]  # raw DynamoDB attributes, the whole item
    doc: dict[str, Any]  # what was stored, as plain JSON (without the keys)


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


def decode_item(item: dict[str, Any]) -> dict[str, Any]:
    """A result item as plain JSON (what the README's snippet does)."""
    out: dict[str, Any] = {}
    for name, attr in item.items():
        if name in _JSON_FIELDS:
            try:
                out[name] = codec.decode_json(attr)
            except (KeyError, TypeError, ValueError, RecursionError, zlib.error):
                # Not the encoding this version writes (another version's, or an item edited by hand): what the item
                # says of the event (its status, identity, datastream) still decides a repeat, not a failure on
                # every attempt until the dead-letter queue.
                out[f"{name}Unreadable"] = True
        elif "S" in attr:
            out[name] = attr["S"]
        elif "N" in attr:
            number = float(attr["N"])
            out[name] = int(number) if number.is_integer() else number
        elif "BOOL" in attr:
            out[name] = attr["BOOL"]
    return out


# In a claim's `claimedBy` (a string set, which holds no empty string) for an event without a primary identity.
NO_PRIMARY = "-"

# What `claim_new` takes for each event: its eventId, datastreamId and source, `InboundEvent.stamp`, and whose it is
# (`InboundEvent.stored_identity_id`).
ClaimKey = tuple[str, str, str, tuple[str, str] | None, str, bool]
# `defaultDatastream` on an event's item: its first attempt named no datastream (kept from that first claim, and by
# its result), so that a later request naming none is taken for the same event whatever the default is then
DEFAULT_DATASTREAM = "defaultDatastream"


# `lastError` of a webhook event given back to go to the retry queue, until the message is sent (`note_queued`): left
# by an invocation that ended in between, it tells that no message may be waiting for it.
QUEUE_SEND_PENDING = "queue send pending"


def queue_send_pending(reason: str) -> str:
    """The `lastError` a webhook's give-back writes (`reason` marked QUEUE_SEND_PENDING), and its notes then match."""
    return f"{QUEUE_SEND_PENDING}: {reason}"


def _format_of(item: dict[str, Any]) -> int:
    """The state item's `stateFormat` (1 when absent: every item written before it existed is format 1)."""
    attribute = item.get("stateFormat")
    try:
        return int(attribute["N"]) if isinstance(attribute, dict) else 1
    except (KeyError, ValueError):
        return 1


UNREADABLE_VERSION = -1  # a state item with no readable `version`: written over on the condition that it has none


def _last_error(reason: str) -> dict[str, str]:
    """`lastError` as stored: its first 500 characters, writable as UTF-8 (Edge's text can hold a lone surrogate)."""
    return {"S": codec.text(reason[:500])}


class HandlesStore:
    def __init__(self, client: Any, table: str, *, ttl_days: int, clock: Clock) -> None:
        self._ddb = client
        self._table = table
        self._ttl_s = ttl_days * 86400
        self._clock = clock

    @staticmethod
    def result_key(event_id: str) -> dict[str, Any]:
        return {"pk": {"S": f"EVENT#{event_id}"}, "sk": {"S": "RESULT"}}

    @staticmethod
    def state_key(opaque_id: str, datastream_id: str) -> dict[str, Any]:
        return {"pk": {"S": f"IDENTITY#{opaque_id}"}, "sk": {"S": f"STATE#{datastream_id}"}}

    def _call(self, op: str, **kwargs: Any) -> Any:
        try:
            if op not in _MULTI_TABLE_OPS:
                kwargs["TableName"] = self._table
            return getattr(self._ddb, op)(**kwargs)
        except ClientError as exc:
            if _conditional_failed(exc):
                raise
            code = exc.response.get("Error", {}).get("Code")
            hint = _SETTING_HINTS.get(code or "", "")
            raise StoreUnavailable(f"dynamodb {op} failed: {code}{hint}", code=code) from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"dynamodb {op} failed: {type(exc).__name__}") from None

    # -- results and claims -------------------------------------------------------------------------------------

    def claim_new(self, events: list[ClaimKey], *, lease_s: float) -> dict[str, Claim]:
        """Claim many events at once, 25 per `BatchExecuteStatement` of PartiQL `INSERT`s: one request instead of 25
        `UpdateItem`s, the same write units, and a twenty-fifth of the CPU a Lambda spends signing and parsing them.

        `events` are (eventId, datastreamId, source, `InboundEvent.stamp`, `InboundEvent.stored_identity_id`: whose
        it is, kept in the claim's `claimedBy`, see `claim`; `InboundEvent.default_datastream`). An `INSERT`
        creates the item or, when one exists, fails with `DuplicateItem` and leaves it alone: so only events never
        seen before are claimed here. The answer has a
        `Claim` for each event: acquired, or not yet (a repeat, a retry, a lapsed claim to take over, or a statement
        or request that failed), with the token tried, to be claimed with `claim(..., token=...)`, which decides
        (and, should an INSERT have been written though its answer was lost, recognises its own token)."""
        now = self._clock.now()
        updated = {"S": iso_millis(now)}
        claims: dict[str, Claim] = {}

        def statement(fields: tuple[str, ...]) -> str:
            return f'INSERT INTO "{self._table}" VALUE {{' + ", ".join(f"'{name}': ?" for name in fields) + "}"

        owned = (*_CLAIM_FIELDS, "claimedBy", DEFAULT_DATASTREAM)
        plain, stamped = statement(owned), statement((*owned, "xdmTimestamp", "xdmTimestampOf"))
        for start in range(0, len(events), CLAIM_INSERT_SIZE):
            chunk = events[start : start + CLAIM_INSERT_SIZE]
            tokens = [uuid.uuid4().hex for _ in chunk]
            statements = [
                {
                    "Statement": stamped if own else plain,
                    "Parameters": [
                        *self.result_key(event_id).values(),
                        {"S": "pending"},
                        {"N": str(int(now + lease_s) + 1)},
                        {"S": token},
                        {"S": event_id},
                        {"S": datastream_id},
                        {"S": source},
                        {"N": str(int(now) + self._ttl_s)},
                        updated,
                        {"N": "1"},
                        {"SS": [owner or NO_PRIMARY]},
                        {"BOOL": defaulted},
                        *([{"S": own[0]}, {"S": own[1]}] if own else []),
                    ],
                }
                for (event_id, datastream_id, source, own, owner, defaulted), token in zip(chunk, tokens, strict=True)
            ]
            try:
                answers = self._call("batch_execute_statement", Statements=statements).get("Responses") or []
            except (StoreUnavailable, ClientError) as exc:
                # Nothing lost: each event is then claimed on its own (which fails the same way if the table is down).
                logger.warning("claims not batched; claiming one by one", events=len(chunk), reason=str(exc))
                answers = []
            for n, ((event_id, _, _, own, _, defaulted), token) in enumerate(zip(chunk, tokens, strict=True)):
                inserted = n < len(answers) and isinstance(answers[n], dict) and "Error" not in answers[n]
                item = (
                    {"attempts": {"N": "1"}, "updatedAt": updated, DEFAULT_DATASTREAM: {"BOOL": defaulted}}
                    if inserted
                    else None
                )
                first = own[0] if inserted and own else None
                claims[event_id] = Claim(inserted, token=token, item=item, timestamp=first)
        return claims

    def claim(
        self,
        event_id: str,
        *,
        datastream_id: str,
        source: str,
        lease_s: float,
        token: str | None = None,
        stamp: tuple[str, str] | None = None,
        owner: str | None = None,
        default_datastream: bool = False,
    ) -> Claim:
        """Take the event: create or take over its item unless it is done or another holder's lease is live (a claim
        with `token` is its own: see `claim_new`). `stamp`: `InboundEvent.stamp`, the `xdm.timestamp` the relay gave
        this attempt and whose event it is; the first attempt's is kept on the item, and the claim answers it
        (`Claim.timestamp`) to the same event. `owner`: `InboundEvent.stored_identity_id`, added to the item's
        `claimedBy` (a set: another identity's event reusing the eventId while this one waits adds itself, and the
        first is still named), so that `relayctl forget` tells this person's waiting events from others'; the result
        that replaces the claim drops it. `default_datastream`: `InboundEvent.default_datastream`, kept on the item
        from the event's first claim (`DEFAULT_DATASTREAM`)."""
        now = self._clock.now()
        token = token or uuid.uuid4().hex
        updated = {"S": iso_millis(now)}
        # A waiting event (queued, or under a lapsed claim) is taken over by a webhook attempt only for its own
        # datastream: the webhook's `?datastreamId=` is not covered by the signature, and a captured request replayed
        # to another datastream must neither reach it nor leave the genuine event to be filed as a reuse (it is busy
        # instead). Not for the queue's messages (IAM-trusted): one without a datastreamId attribute resolves to the
        # default datastream on each receive, and must not be stranded when that default changes.
        own = " AND (datastreamId = :ds OR attribute_not_exists(datastreamId))" if source == "webhook" else ""
        first_time, claimed_by = "", ""
        more_values: dict[str, dict[str, Any]] = {}
        if stamp:
            first_time = (
                ", xdmTimestamp = if_not_exists(xdmTimestamp, :ts), xdmTimestampOf = if_not_exists(xdmTimestampOf, :of)"
            )
            more_values.update({":ts": {"S": stamp[0]}, ":of": {"S": stamp[1]}})
        if owner is not None:
            claimed_by = ", claimedBy :owner"
            more_values[":owner"] = {"SS": [owner or NO_PRIMARY]}
        try:
            resp = self._call(
                "update_item",
                Key=self.result_key(event_id),
                UpdateExpression=(
                    "SET #s = :pending, leaseUntil = :lease, claimToken = :tok, eventId = :id, datastreamId = :ds, "
                    f"#src = if_not_exists(#src, :src), #dflt = if_not_exists(#dflt, :dflt), expiresAt = :exp, "
                    f"updatedAt = :now{first_time} "
                    f"ADD attempts :one{claimed_by} REMOVE invalidFiling"
                ),
                # A new event, one sent back for a retry, one whose holder's lease ran out, or one the relay itself
                # refused (never sent to Edge): a corrected resend under the same eventId must not be a "repeat".
                ConditionExpression=(
                    f"attribute_not_exists(pk) OR (#s = :queued{own}) OR (#s = :pending AND leaseUntil < :t{own}) "
                    "OR (#s = :rejected AND rejectedBy = :relay) OR (#s = :pending AND claimToken = :tok)"
                ),
                ExpressionAttributeNames={"#s": "status", "#src": "source", "#dflt": DEFAULT_DATASTREAM},
                ExpressionAttributeValues={
                    ":pending": {"S": "pending"},
                    ":queued": {"S": "queued"},
                    ":rejected": {"S": "rejected"},
                    ":relay": {"S": RELAY},
                    ":lease": {"N": str(int(now + lease_s) + 1)},
                    ":t": {"N": str(int(now))},
                    ":tok": {"S": token},
                    ":id": {"S": event_id},
                    ":ds": {"S": datastream_id},
                    ":src": {"S": source},
                    ":dflt": {"BOOL": default_datastream},
                    ":exp": {"N": str(int(now) + self._ttl_s)},
                    ":now": updated,
                    ":one": {"N": "1"},
                    **more_values,
                },
                # The whole old item (nothing for a new event, a webhook's usual case): its attempt count; its token,
                # to tell our own write whose answer was lost (an INSERT, or this request sent again) from another
                # claim; and whether it still holds a refusal of the relay's own to clear (`rejectedBy`).
                ReturnValues="ALL_OLD",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            old = exc.response.get("Item") or self.get_result_item(event_id) or {}
            existing = decode_item(old)
            if "SS" in old.get("claimedBy", {}):  # whose events claimed it (`decode_item` leaves sets out)
                existing["claimedBy"] = sorted(old["claimedBy"]["SS"])
            return Claim(False, existing=existing)
        before = resp.get("Attributes") or {}
        attempts = int(before["attempts"]["N"]) + 1 if "attempts" in before else 1
        if before.get("claimToken", {}).get("S") == token:
            # Our own write, applied though its answer was lost: the batch's INSERT (`token` given), or this very
            # `UpdateItem` when boto3 sent it again after a read timeout, a dropped connection or a 5xx (the token is
            # new, so no other write holds it). The same attempt, not another: the claim added one; put the count
            # back (rare: a lost answer), so that a release keeps the right count too.
            attempts -= 1
            try:
                self._update_own_claim(event_id, token, "SET attempts = :n", {":n": {"N": str(attempts)}})
            except StoreUnavailable:
                pass  # only a count: the result written over the claim sets it anyway
        if "rejectedBy" in before:
            # A refusal of the relay's own, taken over by a corrected resend: it goes now, not with the result (this
            # attempt may end queued). The refused body (identities included) would otherwise stay on a waiting item,
            # where `relayctl forget` does not delete and `show` would present the old refusal as current; and so
            # would the refused event's `identityId`, another person's maybe (this claim is in `claimedBy`).
            # `rejectedBy` goes last, with them: should this write fail (or the invocation end first), the next claim
            # of the event finds it still there and clears them then.
            try:
                self._update_own_claim(
                    event_id,
                    token,
                    "REMOVE rejectedBy, #req, #err, bodyDigest, storedAt, identityId, receivedAt",
                    {},
                    {"#req": "request", "#err": "error"},
                )
            except StoreUnavailable:
                pass  # the next claim clears them, or the result replaces the item
        # What the item now holds that the result keeps (the rest of the claim is replaced by the result).
        first_default = before.get(DEFAULT_DATASTREAM, {"BOOL": default_datastream})
        item = {"attempts": {"N": str(attempts)}, "updatedAt": updated, DEFAULT_DATASTREAM: first_default}
        timestamp = None
        if stamp:
            first, of = before.get("xdmTimestamp", {}).get("S"), before.get("xdmTimestampOf", {}).get("S")
            timestamp = first if first and of == stamp[1] else stamp[0]
        return Claim(True, token=token, item=item, timestamp=timestamp)

    def get_result_item(self, event_id: str) -> dict[str, Any] | None:
        resp = self._call("get_item", Key=self.result_key(event_id), ConsistentRead=True)
        item = resp.get("Item")
        return item if item else None

    def get_result(self, event_id: str) -> dict[str, Any] | None:
        item = self.get_result_item(event_id)
        return decode_item(item) if item else None

    def compose_result(self, event_id: str, fields: dict[str, Any], claimed: dict[str, Any] | None) -> ResultWrite:
        """The whole result item that replaces the claim: `fields`, plus what the claim counted (`attempts`, its
        `updatedAt`). The lease, the last error and a replayed rejection's `error`/`request` are left behind."""
        now = self._clock.now()
        doc = {**fields, "eventId": event_id, "storedAt": iso_millis(now)}
        values = self._encode(doc)
        if "errorTrimmed" in values or any(name.endswith("Omitted") for name in values):
            # Cut to fit the item: the sender is answered what is stored, as a repeat of the event would be (the
            # whole answer could be more than a Lambda answer may hold).
            doc = decode_item(values)
        item = {
            **(claimed or {}),
            **self.result_key(event_id),
            **values,
            "expiresAt": {"N": str(int(now) + self._ttl_s)},
        }
        return ResultWrite(event_id, codec.fit_write_unit(item, _JSON_FIELDS), doc)

    def put_result(self, write: ResultWrite) -> None:
        """Write one result now (a webhook's): one PutItem over the claim."""
        self._call("put_item", Item=write.item)

    def put_results(self, writes: list[ResultWrite], deadline: Deadline | None = None) -> dict[str, str]:
        """Write many results with `BatchWriteItem`, 25 per request: one request instead of 25, the same write
        units. Items DynamoDB leaves unprocessed (throttling) are sent again with backoff, for as long as `deadline`
        allows (else BATCH_ATTEMPTS times); an error (after botocore's own retries) fails the items not yet written,
        except a validation error, after which they are written one by one. Returns {eventId: reason} for the
        results not written."""
        failed: dict[str, str] = {}
        for start in range(0, len(writes), BATCH_WRITE_SIZE):
            chunk = {w.item["pk"]["S"]: w for w in writes[start : start + BATCH_WRITE_SIZE]}
            request = {self._table: [{"PutRequest": {"Item": w.item}} for w in chunk.values()]}
            left, error = self._until_processed("batch_write_item", request, "UnprocessedItems", deadline=deadline)
            # Read under whatever key DynamoDB answers with (the request names one table, by name or by ARN: an
            # answer keyed otherwise must not make an unprocessed result look written)
            unwritten = [
                chunk[w["PutRequest"]["Item"]["pk"]["S"]] for left_writes in left.values() for w in left_writes
            ]
            if error is not None and error.code == "ValidationException" and len(unwritten) > 1:
                # One malformed item refuses the whole request: write these item by item, so that only that item's
                # record is redelivered (and not 24 healthy ones with it, to the DLQ at last).
                failed.update(self._put_one_by_one(unwritten))
                continue
            reason = str(error) if error else UNPROCESSED
            failed.update({w.event_id: reason for w in unwritten})
        return failed

    def _until_processed(
        self,
        op: str,
        request: dict[str, Any],
        unprocessed: str,
        on_answer: Callable[[dict[str, Any]], None] | None = None,
        *,
        deadline: Deadline | None = None,
    ) -> tuple[dict[str, Any], StoreUnavailable | None]:
        """Call a batch operation, then again with what DynamoDB left unprocessed (throttling), BATCH_ATTEMPTS times,
        waiting 50, 100, 200 ms between, and with a `deadline` on, waiting up to 1 s, while it leaves
        UNPROCESSED_RESERVE_S after the wait (as AWS advises: retry unprocessed items with exponential backoff);
        `on_answer` sees each answer. Returns what is still to do ({} when done) and the error that stopped it, if
        any (after botocore's own retries)."""
        attempt = 0
        while True:
            if attempt:
                wait = min(0.05 * 2 ** (attempt - 1), UNPROCESSED_MAX_WAIT_S)
                if attempt >= BATCH_ATTEMPTS and (
                    deadline is None or deadline.remaining() < wait + UNPROCESSED_RESERVE_S
                ):
                    break
                self._clock.sleep(wait)
            attempt += 1
            try:
                resp = self._call(op, RequestItems=request)
            except StoreUnavailable as exc:
                return request, exc
            if on_answer is not None:
                on_answer(resp)
            request = resp.get(unprocessed) or {}
            if not request:
                break
        return request, None

    def _put_one_by_one(self, writes: list[ResultWrite]) -> dict[str, str]:
        failed: dict[str, str] = {}
        for write in writes:
            try:
                self.put_result(write)
            except StoreUnavailable as exc:
                failed[write.event_id] = str(exc)
        return failed

    def _encode(self, doc: dict[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, value in doc.items():
            if value is None:
                continue
            if name in _JSON_FIELDS:
                values[name] = codec.encode_json(value)
            elif isinstance(value, bool):
                values[name] = {"BOOL": value}
            elif isinstance(value, int | float):
                values[name] = {"N": str(value)}
            else:
                values[name] = {"S": codec.text(str(value))}  # Edge's requestId, say, may hold a lone surrogate
        size = codec.item_size(values)
        if size <= MAX_ITEM_BYTES:
            return values

        # Over DynamoDB's limit: keep the outcome and shed the rest, least useful first. Edge's problem is cut to its
        # type, status, title and the start of its detail before the request goes (a rejection with its request can
        # still be replayed); then the request, then 207 errors/warnings, then the handles. Each is marked as cut.
        def shed(name: str) -> None:
            nonlocal size
            size -= codec.attribute_size(values.pop(name)) - _FLAG_BYTES
            values[f"{name}Omitted"] = {"BOOL": True}

        error = doc.get("error")
        if isinstance(error, dict) and "error" in values and codec.attribute_size(values["error"]) > MAX_ERROR_BYTES:
            kept = {k: error[k] for k in ("type", "status", "title") if k in error}
            detail = error.get("detail")
            if isinstance(detail, str):
                kept["detail"] = detail[:1000]
            elif "detail" in error and (detail is None or isinstance(detail, int | float | bool)):
                kept["detail"] = detail  # as Edge sent it (a made-up text, "None" or a Python repr, would not be)
            size -= codec.attribute_size(values["error"])
            values["error"] = codec.encode_json(kept)
            size += codec.attribute_size(values["error"]) + _FLAG_BYTES
            values["errorTrimmed"] = {"BOOL": True}
        # A plain field (a requestId, say) is never this large from Edge itself: shed before what Edge meant to keep.
        for name in [n for n in values if n not in _JSON_FIELDS and n not in _ALWAYS_KEPT]:
            if size > MAX_ITEM_BYTES and codec.attribute_size(values[name]) > MAX_ERROR_BYTES:
                shed(name)
        for name in ("request", "errors", "warnings", "handle"):
            if size > MAX_ITEM_BYTES and name in values:
                shed(name)
        # Still over (many large fields): shed the largest of the rest, never what says what became of the event. An
        # item DynamoDB refuses would send the event to Edge again on every retry.
        for name in sorted(values, key=lambda n: codec.attribute_size(values[n]), reverse=True):
            if size <= MAX_ITEM_BYTES:
                break
            if name not in _ALWAYS_KEPT:
                shed(name)
        return values

    def release(
        self, event_id: str, token: str, reason: str, *, retry_after: float | None = None, marked: bool = False
    ) -> dict[str, Any] | None:
        """Give the event back (status `queued`) so a retry can claim it at once; only our own claim. With the
        `Retry-After` Edge gave (seconds), so a user can tell when the next attempt comes. None when given back; else
        the item as found, which no longer holds the claim (another holder's, or a result: see `holds`). `marked`: a
        webhook's give-back for the retry queue (`reason` is its QUEUE_SEND_PENDING mark), whose notes must land on
        this attempt's mark only, not on another attempt's with the same reason: the item keeps the claim's token as
        `queueSendBy` until then."""
        values = {
            ":queued": {"S": "queued"},
            ":r": _last_error(reason),
            ":now": {"S": iso_millis(self._clock.now())},
        }
        set_part, remove_part = "SET #s = :queued, lastError = :r, updatedAt = :now", "REMOVE leaseUntil, claimToken"
        if marked:
            set_part += ", queueSendBy = :tok"  # (`:tok` is the claim's token: `_update_own_claim` sets it)
        else:
            remove_part += ", queueSendBy"  # an earlier attempt's mark, which this record replaces
        if retry_after is None:
            remove_part += ", retryAfterSeconds"  # no stale wait from an earlier attempt
        else:
            set_part += ", retryAfterSeconds = :ra"
            values[":ra"] = {"N": str(math.ceil(retry_after))}  # parse_retry_after never gives a negative wait
        return self._update_own_claim(event_id, token, f"{set_part} {remove_part}", values, names={"#s": "status"})

    @staticmethod
    def holds(found: dict[str, Any], write: ResultWrite) -> bool:
        """Whether an item as read (decoded) is this result: its write was applied, though the relay saw it fail
        (every answer of boto3's attempts lost: a read timeout, a dropped connection, a 5xx after the write)."""
        return bool(found) and all(found.get(name) == write.doc.get(name) for name in ("status", "storedAt"))

    @staticmethod
    def released(found: dict[str, Any], reason: str) -> bool:
        """Whether an item as read (decoded) is the event given back with `reason`: the hand-back was applied, and
        boto3 sent it again after its answer was lost (the second one's condition then finds no claim)."""
        return (
            found.get("status") == "queued"
            and "claimToken" not in found
            and found.get("lastError") == _last_error(reason)["S"]
        )

    def _update_own_claim(
        self,
        event_id: str,
        token: str,
        expression: str,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """Update the event's item only while it holds our claim (`token`): None when updated, else the item as found.
        Raises StoreUnavailable when DynamoDB cannot be reached."""
        return self._update_if(event_id, expression, "claimToken = :tok", {**values, ":tok": {"S": token}}, names)

    def _update_if(
        self,
        event_id: str,
        expression: str,
        condition: str,
        values: dict[str, Any],
        names: dict[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """Update the event's item only while `condition` holds; otherwise someone else's outcome stands and nothing
        is written. None when updated, else the item as found (decoded; {} when there is none). Raises
        StoreUnavailable when DynamoDB cannot be reached."""
        extra = {"ExpressionAttributeNames": names} if names else {}
        try:
            self._call(
                "update_item",
                Key=self.result_key(event_id),
                UpdateExpression=expression,
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
                ReturnValuesOnConditionCheckFailure="ALL_OLD",  # no extra read: DynamoDB's refusal carries the item
                **extra,
            )
        except ClientError as exc:  # the condition no longer holds (`_call` raises no other ClientError)
            return decode_item(exc.response.get("Item") or {})
        return None

    def note_queued(self, event_id: str, reason: str, by: str) -> None:
        """Say on a webhook's `queued` item that its retry-queue message was sent: the QUEUE_SEND_PENDING mark it was
        given back with (by the claim whose token is `by`) becomes the plain reason (taken again meanwhile: that
        attempt's record stands). Should the store be down, the mark stays: `relayctl show` then says the message may
        or may not be queued."""
        self._over_own_mark(event_id, reason, by, "SET lastError = :r REMOVE queueSendBy", {":r": _last_error(reason)})

    def note_not_queued(self, event_id: str, reason: str, given_back_with: str, by: str) -> None:
        """Say on a `queued` item that nothing is queued for it (the retry queue refused the webhook's fallback): the
        next attempt is the sender's resend, not a queue message, so no `retryAfterSeconds` promise is left. Only
        over this attempt's own QUEUE_SEND_PENDING mark (`given_back_with` is its reason): an attempt that took the
        event meanwhile, and whatever it queued, keep their record, even when given back with the same reason (`by`,
        the claim's token, tells them apart). Should the store be down too, the 503 still tells."""
        self._over_own_mark(
            event_id,
            given_back_with,
            by,
            "SET lastError = :r, updatedAt = :now REMOVE retryAfterSeconds, queueSendBy",
            {":r": _last_error(reason), ":now": {"S": iso_millis(self._clock.now())}},
        )

    def _over_own_mark(
        self, event_id: str, given_back_with: str, by: str, expression: str, values: dict[str, Any]
    ) -> None:
        """Update a webhook's `queued` item while it still holds the QUEUE_SEND_PENDING mark its give-back wrote."""
        try:
            self._update_if(
                event_id,
                expression,
                "#s = :queued AND lastError = :pending AND queueSendBy = :by",
                {
                    ":queued": {"S": "queued"},
                    ":pending": _last_error(queue_send_pending(given_back_with)),
                    ":by": {"S": by},
                    **values,
                },
                {"#s": "status"},
            )
        except StoreUnavailable:
            pass

    def reject_unclaimed(
        self, event_id: str, fields: dict[str, Any], *, body_digest: str | None = None
    ) -> dict[str, Any]:
        """Store a `rejected` outcome for a body that never became an event, and return it as stored (its `eventId`
        says where).

        With `body_digest` (a body the relay found invalid) it never replaces another item: a delivered, in-flight or
        queued event, Edge's own rejection (which can be replayed once Edge is fixed), or the relay's rejection of
        another body. It is then filed under `<eventId>#invalid-<digest>` instead, where a resend of the same body
        lands on the same item (under the same condition: should an event's own eventId have that shape, its outcome
        stands, and the body goes under `<eventId>#invalid-<digest>-<random>`). An event still waiting there
        (`queued`, or `pending` with a lapsed lease) is told so (`invalidFiling`): the refused message may have been
        its own (a replay or a redelivery refused under a newer rule), and then nothing more is coming for it; if it
        was another one, the event is delivered when its own message comes. Without a digest (an eventId reuse, filed
        under `<eventId>#reused-<digest>`) it replaces only an earlier filing of the same reuse; a delivered or
        in-flight item there stands (nothing is filed), anything else keeps its outcome and the reuse goes under
        `<eventId>#reused-<digest>-<random>`."""
        extra = {"bodyDigest": body_digest} if body_digest else {}
        write = self.compose_result(event_id, {**fields, **extra, "status": "rejected", "rejectedBy": RELAY}, None)
        if body_digest:
            condition = "attribute_not_exists(pk) OR (#s = :rejected AND rejectedBy = :relay AND bodyDigest = :digest)"
            values = {":rejected": {"S": "rejected"}, ":relay": {"S": RELAY}, ":digest": {"S": body_digest}}
        else:
            # An eventId reused by another event, filed under `<eventId>#reused-<digest of its datastream and
            # identity>`: only an earlier filing of that same event is replaced (its redelivery). An event whose own
            # eventId has that shape keeps its outcome, as above: a sender can compute the digest without an identity
            # key, or of an event without a primary identity.
            condition = (
                "attribute_not_exists(pk) OR (#s = :rejected AND rejectedBy = :relay AND identityId = :who "
                "AND datastreamId = :ds)"
            )
            values = {
                ":rejected": {"S": "rejected"},
                ":relay": {"S": RELAY},
                ":who": {"S": str(fields.get("identityId", ""))},
                ":ds": {"S": str(fields.get("datastreamId", ""))},
            }

        def put(item: dict[str, Any]) -> dict[str, Any] | None:
            """Write `item` under the condition: None when written, else the item that stands there."""
            try:
                replaced = self._call(
                    "put_item",
                    Item=item,
                    ConditionExpression=condition,
                    ExpressionAttributeNames={"#s": "status"},
                    ExpressionAttributeValues=values,
                    ReturnValues="ALL_OLD",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                ).get("Attributes")
            except ClientError as exc:
                return exc.response.get("Item") or {}
            first = (replaced or {}).get("receivedAt", {}).get("S")
            if first and "receivedAt" in item and "bodyDigest" in item and first < item["receivedAt"]["S"]:
                # The same body sent again (a sender's retry): the refusal keeps when it first came, the time a
                # replay sends it with. A second write, for a resent refusal only.
                try:
                    self._call(
                        "update_item",
                        Key={"pk": item["pk"], "sk": item["sk"]},
                        UpdateExpression="SET receivedAt = :first",
                        ConditionExpression="bodyDigest = :digest",
                        ExpressionAttributeValues={":first": {"S": first}, ":digest": item["bodyDigest"]},
                    )
                except ClientError:
                    pass  # replaced meanwhile (a corrected resend took the eventId over): nothing to keep
            return None

        def put_beside(filed_as: str) -> ResultWrite:
            """Under `filed_as` with a random suffix: a new id, nothing there to keep."""
            beside = self.compose_result(f"{filed_as}-{uuid.uuid4().hex[:12]}", write.doc, None)
            self._call("put_item", Item=beside.item)
            return beside

        standing = put(write.item)
        if standing is None:
            return write.doc
        if not body_digest:
            if standing.get("status", {}).get("S") in ("delivered", "pending"):
                # Its filing was replayed and delivered (or is being sent): this redelivery is that event, whose
                # outcome stands (or an event whose own eventId has that shape, delivered: nothing is filed over it).
                return write.doc
            return put_beside(event_id).doc
        write = self.compose_result(f"{event_id}#invalid-{body_digest}", write.doc, None)
        # Under the same condition: an event whose own eventId has that very shape (only ever on purpose: the digest
        # is of this body) keeps its outcome, and this body goes under an id of its own.
        if put(write.item) is not None:
            write = put_beside(write.event_id)
        self._note_invalid_filing(event_id, write.event_id)
        return write.doc

    def _note_invalid_filing(self, event_id: str, filed_as: str) -> None:
        """Tell an event still waiting under `event_id` (queued, or a lapsed claim) that a message under its eventId
        was refused and kept as `filed_as`. Best effort: the rejection itself is stored either way."""
        values = {
            ":f": {"S": filed_as},
            ":queued": {"S": "queued"},
            ":pending": {"S": "pending"},
            ":t": {"N": str(int(self._clock.now()))},
        }
        try:
            self._update_if(
                event_id,
                "SET invalidFiling = :f",
                "#s = :queued OR (#s = :pending AND leaseUntil < :t)",
                values,
                {"#s": "status"},
            )
        except StoreUnavailable:
            pass  # the filing is kept regardless (not waiting any more: nothing to tell)

    # -- identity state -----------------------------------------------------------------------------------------

    def get_state(self, opaque_id: str, datastream_id: str) -> IdentityState:
        resp = self._call("get_item", Key=self.state_key(opaque_id, datastream_id), ConsistentRead=True)
        item = resp.get("Item")
        return self._state_of(item) if item else IdentityState()

    @staticmethod
    def _state_of(item: dict[str, Any]) -> IdentityState:
        """The state an item holds. One that cannot be read (damaged, or written by hand) counts as empty, at its
        version, so the identity's next write replaces it: it must not fail every event of that identity, nor
        every batch it is in."""
        attribute = item.get("version")
        stored = attribute.get("N") if isinstance(attribute, dict) else None  # None: missing, or not a number
        try:
            version = int(stored or "")
        except ValueError:
            version = UNREADABLE_VERSION
        if version < 1:
            # The item is there, its version one the relay never writes: the next write must match it as it is.
            version = UNREADABLE_VERSION
        else:
            stored = None
        if _format_of(item) > STATE_FORMAT:
            return IdentityState(version=version, stored_version=stored, newer_format=True)
        try:
            doc = codec.decode_json(item["state"]) if "state" in item else {}
            return replace(state_from_item(doc, version), stored_version=stored)
        except Exception as exc:
            logger.error(
                "unexpected error: identity state unreadable; the next write replaces it", reason=type(exc).__name__
            )
            count("UnexpectedErrors")
            return IdentityState(version=version, stored_version=stored)

    def get_states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], IdentityState]:
        """Many identities' states in `BatchGetItem`s of 100 (strongly consistent): one call for a whole SQS batch
        instead of one per event. Keys DynamoDB leaves unprocessed after a few tries are simply absent (callers
        then read them one by one)."""
        found: dict[tuple[str, str], IdentityState] = {}

        def take(resp: dict[str, Any]) -> None:
            for item in (i for items in (resp.get("Responses") or {}).values() for i in items):  # (one table: any key)
                opaque = item["pk"]["S"].removeprefix("IDENTITY#")
                datastream = item["sk"]["S"].removeprefix("STATE#")
                found[(opaque, datastream)] = self._state_of(item)

        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 100):
            chunk = unique[start : start + 100]
            request = {self._table: {"Keys": [self.state_key(o, d) for o, d in chunk], "ConsistentRead": True}}
            left, error = self._until_processed("batch_get_item", request, "UnprocessedKeys", take)
            if error is not None:
                raise error
            if not left:
                for key in chunk:
                    found.setdefault(key, IdentityState())  # read and absent: a new identity
        return found

    def update_state(
        self,
        opaque_id: str,
        datastream_id: str,
        current: IdentityState,
        change: Callable[[IdentityState], IdentityState | None],
    ) -> int:
        """Apply `change` with optimistic concurrency: a conditional put on the version read, re-read on conflict.

        `change` returns None when nothing needs writing. Returns the number of writes made (0 or 1).
        """
        state = current
        for _ in range(STATE_WRITE_ATTEMPTS):
            if state.newer_format:
                # Left to the version that wrote it (see IdentityState.newer_format): this event's answer is not kept
                # in it. Said once per event, counted with the states not sent. `change` is shown the state as read
                # (its answer ignored), so that a caller that carries what `change` saw carries this state, not one
                # read before another version wrote it.
                change(state)
                logger.warning("identity state written in a newer format; left as it is", stateFormat="newer")
                count("StateNotSent")
                return 0
            new = change(state)
            if new is None:
                return 0
            now = self._clock.now()
            item = {
                **self.state_key(opaque_id, datastream_id),
                "state": codec.encode_json(state_to_item(new)),
                "version": {"N": str(max(state.version, 0) + 1)},
                "stateFormat": {"N": str(STATE_FORMAT)},
                "updatedAt": {"S": iso_millis(now)},
                # Never in the past beyond DynamoDB's reach: TTL ignores items expired over five years ago.
                "expiresAt": {"N": str(int(max(new.expires_at(), now)) + 1)},
            }
            item = codec.fit_write_unit(item, ("state",))
            extra: dict[str, Any]
            if state.version == 0:
                condition, extra = "attribute_not_exists(pk)", {}
            elif state.version == UNREADABLE_VERSION and state.stored_version is not None:  # a number, not ours
                condition, extra = "version = :v", {"ExpressionAttributeValues": {":v": {"N": state.stored_version}}}
            elif state.version == UNREADABLE_VERSION:  # an item whose version is missing or not a number
                condition = (
                    "attribute_exists(pk) AND (attribute_not_exists(version) OR NOT attribute_type(version, :n))"
                )
                extra = {"ExpressionAttributeValues": {":n": {"S": "N"}}}
            else:
                condition, extra = "version = :v", {"ExpressionAttributeValues": {":v": {"N": str(state.version)}}}
            try:
                self._call("put_item", Item=item, ConditionExpression=condition, **extra)
                return 1
            except ClientError:
                state = self.get_state(opaque_id, datastream_id)  # someone else wrote: merge onto theirs
        raise StoreUnavailable("identity state kept changing under concurrent writers")
