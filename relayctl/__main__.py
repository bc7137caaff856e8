"""relayctl: find out what happened to an event, list rejections, replay them, redrive the dead-letter queue, and
forget a person (erase what the table keeps about one identity).

Resources come from flags, from the environment (HANDLES_TABLE, QUEUE_URL, DLQ_URL) or from a deployed stack's
outputs (`--stack interact-relay`). AWS endpoints and credentials are boto3's own (AWS_PROFILE, AWS_ENDPOINT_URL...).
"""

from __future__ import annotations

import argparse
import collections
import getpass
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
)
from relay.errors import CredentialsError, InvalidEvent
from relay.identity_state import opaque_identity_id
from relay.integrations.credentials import CredentialsStore
from relay.integrations.queue import RELAY_SENT_TIMESTAMP, RELAY_SOURCE, message_body, sqs_text
from relay.integrations.store import QUEUE_SEND_PENDING, RELAY, HandlesStore, decode_item
from relay.models import DEFAULT_NOT_ALLOWED, MAX_BODY_BYTES, as_dict, as_list, bounded_id, iso_millis, read_event
from relay.process_event import INVALID_EVENT_TYPE
from relay.settings import DATASTREAM_ID_RE


@dataclass(frozen=True)
class Targets:
    table_name: str | None  # None only for a command that needs no table (`redrive`)
    queue_url: str | None
    dlq_url: str | None
    identity_key_secret: str | None = None
    identity_key_source: str | None = None  # where `identity_key_secret` came from, as the operator gave it

    @property
    def table(self) -> str:
        if not self.table_name:
            raise SystemExit(_NO_TABLE)
        return self.table_name


_NO_TABLE = "relayctl: no table: pass --table, --stack or set HANDLES_TABLE"


def _client(service: str) -> Any:
    """A boto3 client in the shell's region as the AWS CLI reads it: `AWS_REGION` first (boto3 itself reads only
    `AWS_DEFAULT_REGION`, so the README's `export AWS_REGION=...` would leave relayctl in another region than the CLI
    commands beside it, or in none), then `AWS_DEFAULT_REGION`, then the profile's."""
    return boto3.client(service, region_name=os.environ.get("AWS_REGION") or None)


def _targets(args: argparse.Namespace, *, needs_table: bool = True) -> Targets:
    table, queue, dlq = args.table, args.queue_url, args.dlq_url
    key_secret = getattr(args, "identity_key_secret", None)
    key_source = "--identity-key-secret" if key_secret else None
    if args.stack:
        outputs = _client("cloudformation").describe_stacks(StackName=args.stack)["Stacks"][0].get("Outputs", [])
        found = {o["OutputKey"]: o["OutputValue"] for o in outputs}
        table = table or found.get("TableName")
        queue = queue or found.get("QueueUrl")
        dlq = dlq or found.get("DeadLetterQueueUrl")
        if not key_secret and found.get("IdentityKeySecretArn"):
            key_secret, key_source = found["IdentityKeySecretArn"], f"stack {args.stack}'s IdentityKeySecretArn output"
    table = table or os.environ.get("HANDLES_TABLE")
    if needs_table and not table:
        raise SystemExit(_NO_TABLE)
    if not key_secret and os.environ.get("IDENTITY_KEY_SECRET_ID"):
        key_secret, key_source = os.environ["IDENTITY_KEY_SECRET_ID"], "IDENTITY_KEY_SECRET_ID"
    return Targets(
        table,
        queue or os.environ.get("QUEUE_URL") or os.environ.get("RETRY_QUEUE_URL"),
        dlq or os.environ.get("DLQ_URL"),
        key_secret,
        key_source,
    )


_NO_DLQ = "give --dlq-url or --stack, or set DLQ_URL"
_DEAD_LETTERED = "failed every receive its queue allows (maxReceiveCount): redrive it once the cause is fixed"
_NOT_SEARCHED = f"not searched ({_NO_DLQ}): it may be there"  # `deadLetterQueue` when show could not look
_PEEK_HIDE_S = 30  # how long `show` hides the dead-letter messages it has read (it shows them again when done)
# Long polling: a short-poll receive asks only some of SQS's servers and may answer empty while messages wait (AWS
# documents these "false empty responses", more likely on a small queue such as a dead-letter queue), which `show`
# and `redrive` would take for the end of the queue.
_LONG_POLL_S = 1


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _shown(text: Any) -> str:
    """Text from the table (an eventId, a reason) for a line of plain output, with what is not printable (a line
    break, a bidi override) escaped: an eventId is the sender's to choose, and must not forge or rewrite the lines an
    operator reads."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode() for c in text)


_PEEK_LIMIT = 1000  # dead-letter messages `show` reads looking for an event


def _peek_dlq(sqs: Any, dlq_url: str, event_id: str, limit: int = _PEEK_LIMIT) -> dict[str, Any] | None:
    """Look for an event among the first `limit` dead-letter messages without consuming any. Each receive hides what
    it read for a while (with 0, the same first messages would come back on every receive), and everything read is
    made visible again before returning."""
    handles: list[str] = []
    try:
        while len(handles) < limit:
            msgs = sqs.receive_message(
                QueueUrl=dlq_url,
                MaxNumberOfMessages=10,
                VisibilityTimeout=_PEEK_HIDE_S,
                MessageAttributeNames=["All"],
                AttributeNames=["All"],
                WaitTimeSeconds=_LONG_POLL_S,
            ).get("Messages", [])
            if not msgs:
                return None
            handles += [msg["ReceiptHandle"] for msg in msgs]  # all of them: the loop below may return early
            for msg in msgs:
                attrs = msg.get("MessageAttributes") or {}
                # The relay reads an `eventId` attribute only on its own messages (`relaySource`), as here.
                attr = attrs.get("eventId", {}).get("StringValue") if RELAY_SOURCE in attrs else None
                if event_id in (msg["MessageId"], attr, _xdm_id(msg["Body"])):
                    return {
                        "messageId": msg["MessageId"],
                        "receiveCount": msg.get("Attributes", {}).get("ApproximateReceiveCount"),
                    }
        return None
    finally:
        try:
            _show_again(sqs, dlq_url, handles)
        except (ClientError, BotoCoreError):
            pass  # they show again on their own after _PEEK_HIDE_S; what the search found stands


def _show_again(sqs: Any, queue_url: str, handles: list[str]) -> None:
    """Make received messages visible again at once."""
    for start in range(0, len(handles), 10):
        entries = [
            {"Id": str(i), "ReceiptHandle": h, "VisibilityTimeout": 0}
            for i, h in enumerate(handles[start : start + 10])
        ]
        sqs.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)


def _xdm_id(body: str) -> Any:
    """The `event.xdm._id` of a message body, or None (a leading byte-order mark ignored, as the relay ignores it)."""
    try:
        return json.loads(body.removeprefix("\ufeff"))["event"]["xdm"]["_id"]
    except (ValueError, KeyError, TypeError):
        return None


def _get(ddb: Any, table: str, event_id: str) -> dict[str, Any] | None:
    item = ddb.get_item(TableName=table, Key=HandlesStore.result_key(event_id), ConsistentRead=True).get("Item")
    return decode_item(item) if item else None


def _find(ddb: Any, table: str, given: str) -> tuple[str, dict[str, Any] | None]:
    """The eventId an event is kept under, and its result: `given` as it is (an id an answer named, a filing beside a
    long eventId), else as the relay keys a webhook-id or messageId over 256 characters (`bounded_id`)."""
    # DynamoDB refuses a key over 2,048 bytes, reads included: such an id can only be kept shortened
    doc = _get(ddb, table, given) if len(f"EVENT#{given}".encode("utf-8", "surrogatepass")) <= 2048 else None
    if doc is None and (bounded := bounded_id(given)) != given:
        return bounded, _get(ddb, table, bounded)
    return given, doc


_CONDITION_FAILED = "ConditionalCheckFailedException"
_SQS_MAX_RETENTION_S = 14 * 86400  # the longest any SQS queue keeps a message (a dead letter: from its first send)
# The id under which the relay files a refused body beside another outcome (`store.reject_unclaimed`)
_INVALID_FILING = re.compile(r"#invalid-[0-9a-f]{16}(?:-[0-9a-f]{12})?$")


def _epoch_ms_of(stamp: Any) -> int | None:
    """Milliseconds since the epoch of a stored ISO-8601 time (`receivedAt`), or None when there is none to read."""
    if not isinstance(stamp, str):
        return None
    try:
        return round(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _aws_code(exc: ClientError | BotoCoreError) -> str:
    return str(exc.response.get("Error", {}).get("Code")) if isinstance(exc, ClientError) else type(exc).__name__


def _explain(doc: dict[str, Any], now: float) -> str | None:
    """What a `pending` or `queued` item means for the operator (the raw fields do not say it)."""
    detail = _explain_waiting(doc, now)
    filing = doc.get("invalidFiling")
    if detail and filing and doc.get("status") in ("queued", "pending"):
        # A replay's message refused (for a datastream ALLOWED_DATASTREAM_IDS leaves out, say) is fixed there and
        # replayed again; a sender's or a redelivery's, by a corrected event
        fix = (
            "fix what it says (`relayctl show` it), then replay this event again"
            if _replay_mark(doc)
            else "send a corrected event under this eventId"
        )
        detail += (
            f"; but a message under this eventId was refused as invalid and kept as {filing}: if that was this "
            f"event's own message (a replay or a redelivery refused under a newer rule), nothing more is coming for "
            f"it, so {fix}"
        )
    return detail


def _replay_mark(doc: dict[str, Any]) -> bool:
    """Whether a waiting item is a replay's mark not tried since: an attempt that claims it writes a lease, one that
    gives the event back writes `lastError`, which the mark removes."""
    return bool(doc.get("replayedAt")) and not doc.get("leaseUntil") and "lastError" not in doc


def _explain_waiting(doc: dict[str, Any], now: float) -> str | None:
    status, lease = doc.get("status"), doc.get("leaseUntil")
    if status == "pending" and isinstance(lease, int | float):
        until = iso_millis(float(lease))
        if lease > now:
            return f"in flight: an attempt holds it until {until}"
        return (
            f"an attempt stopped without an outcome (its invocation ended; lease lapsed {until}): the next delivery "
            "takes it over, when its queue message comes back (sqs) or the sender resends (webhook)"
        )
    if status == "queued" and str(doc.get("lastError", "")).startswith("not queued"):
        return "nothing is queued for it: the webhook sender was answered 503 and must resend"
    if status == "queued" and str(doc.get("lastError", "")).startswith(QUEUE_SEND_PENDING):
        return (
            "its send to the retry queue was never confirmed (its invocation ended, or SQS did not answer): it may be "
            "in the queue, or not, and then the webhook sender (answered 503, or 5xx by API Gateway) must resend; "
            "either one delivers it"
        )
    touched = [t for t in (_epoch_ms_of(doc.get("updatedAt")), _epoch_ms_of(doc.get("replayedAt"))) if t]
    # (a replay mark not tried since still holds its request: replaying it again sends it, however old it is)
    if status == "queued" and not _replay_mark(doc) and touched and now - max(touched) / 1000 > _SQS_MAX_RETENTION_S:
        return (
            "its last attempt was longer ago than SQS keeps any message (14 days, from when it was first sent; the "
            "dead-letter queue too): nothing is left to deliver it, and the sender must send it again"
        )
    if status == "queued" and _replay_mark(doc):
        return (
            f"waiting in the queue for its next attempt (replayed at {doc['replayedAt']}; if that replay said it "
            "failed, nothing was sent: replay it again, a second copy on the queue would do no harm)"
        )
    if status == "queued":
        return "waiting in the queue for its next attempt"
    return None


def _hidden_by_others(sqs: Any, dlq_url: str) -> str | None:
    """What to say of dead-letter messages another reader (another `show`, a `redrive`, a console poll) holds hidden,
    which no search can see until they show again; None when there are none. Read before this command's own search
    hides any: SQS's count is approximate and lags, and would otherwise count those too."""
    try:
        attrs = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["ApproximateNumberOfMessagesNotVisible"])
        hidden = int(attrs["Attributes"]["ApproximateNumberOfMessagesNotVisible"])
    except (ClientError, BotoCoreError, KeyError, ValueError):
        return None  # the search itself says what it can
    if hidden <= 0:
        return None
    return (
        f"about {hidden} dead-letter message(s) were being read by another command (show, redrive) and could not be "
        "searched: run show again in a minute"
    )


def cmd_show(args: argparse.Namespace) -> int:
    t = _targets(args)
    ddb = _client("dynamodb")
    found = 0
    sqs = _client("sqs") if t.dlq_url else None  # one client for every search (building one takes tens of ms)
    hidden = _hidden_by_others(sqs, t.dlq_url) if t.dlq_url else None
    for given in args.event_ids:
        event_id, doc = _find(ddb, t.table, given)
        if doc is not None:
            if not args.full:
                doc.pop("request", None)
            detail = _explain(doc, time.time())
            if detail:
                doc["detail"] = detail
            # Events sent under the same eventId for another identity or datastream, or with an invalid body, are
            # kept beside this one: say where to look (finding them takes a scan).
            doc["otherFilings"] = f"relayctl rejected --event-id {event_id} lists any <eventId>#reused-/#invalid- items"
            # The relay's own rejection can stand over an event whose message is still around: relays before the
            # tenth landing stored an invalid body's rejection over a queued event. Look for it too.
            waiting = doc.get("status") in ("queued", "pending") or doc.get("rejectedBy") == RELAY
            if waiting and t.dlq_url:
                where, unsearched = _search_dlq(sqs, t.dlq_url, event_id)
                if unsearched:
                    doc["deadLetterQueue"] = unsearched
                elif where:
                    doc.update(status="dead-lettered", detail=_DEAD_LETTERED)
                    doc.update(where)
                elif hidden:
                    doc["deadLetterQueue"] = hidden
            elif waiting:
                doc["deadLetterQueue"] = _NOT_SEARCHED
            _print(doc)
            found += 1
            continue
        where, unsearched = _search_dlq(sqs, t.dlq_url, event_id) if t.dlq_url else (None, None)
        if where:
            _print({"eventId": event_id, "status": "dead-lettered", "detail": _DEAD_LETTERED, **where})
            found += 1
        else:
            readable = " it could read" if hidden else ""
            looked = (
                f"not among the first {_PEEK_LIMIT:,} messages of the dead-letter queue{readable}"
                if t.dlq_url
                else f"the dead-letter queue not searched ({_NO_DLQ})"
            )
            unknown = {
                "eventId": event_id,
                "status": "unknown",
                "detail": f"no result stored under this id, and {looked}: not received yet, or waiting in the "
                "queue for its first attempt. An event is kept under its xdm._id; only one without an xdm._id "
                "is kept under its webhook-id or SQS messageId",
            }
            if unsearched:
                unknown["detail"] = f"no result stored under this id; {unsearched}"
                unknown["deadLetterQueue"] = unsearched
            elif not t.dlq_url:
                unknown["deadLetterQueue"] = _NOT_SEARCHED
            elif hidden:
                unknown["deadLetterQueue"] = hidden
            _print(unknown)
    return 0 if found == len(args.event_ids) else 1


def _search_dlq(sqs: Any, dlq_url: str, event_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """`_peek_dlq`, and what to say when the search could not be made (a role that may read the table but not the
    queue): the result already read is still shown."""
    try:
        return _peek_dlq(sqs, dlq_url, event_id), None
    except (ClientError, BotoCoreError) as exc:
        return None, f"the dead-letter queue could not be searched ({_aws_code(exc)})"


def _all_items(ddb: Any, operation: str, table: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Every item a `scan` or `query` (`operation`) with `kwargs` finds, raw, all pages (boto3's paginator)."""
    pages = ddb.get_paginator(operation).paginate(TableName=table, **kwargs)
    return [item for page in pages for item in page.get("Items", [])]


def _scan_rejected(
    ddb: Any, table: str, event_id: str | None = None, *, stranded: bool = False, since: str | None = None
) -> list[dict[str, Any]]:
    """Rejected results, without their stored `request` (never shown; a replay reads the event again); with
    `event_id`, only that eventId's and those filed beside it (`<eventId>#reused-...`, `<eventId>#invalid-...`: other
    events sent under it). `stranded`: also replays marked `queued` whose message was never sent (see `_replay_plan`:
    a replay stopped between its mark and its send, by an error or an interrupt), whenever they were stored (the run
    that marked one had chosen it). `since` (`_since`): only rejections stored from then on."""
    kwargs: dict[str, Any] = {
        "FilterExpression": "begins_with(pk, :p) AND #s = :r",
        "ExpressionAttributeNames": {"#s": "status"},
        "ExpressionAttributeValues": {":p": {"S": "EVENT#"}, ":r": {"S": "rejected"}},
    }
    if stranded:
        kwargs["FilterExpression"] = (
            "begins_with(pk, :p) AND (#s = :r OR (#s = :q AND attribute_exists(replayedAt) AND "
            "attribute_not_exists(leaseUntil) AND attribute_not_exists(lastError)))"
        )
        kwargs["ExpressionAttributeValues"][":q"] = {"S": "queued"}
    if event_id is not None:
        kwargs["FilterExpression"] = "(pk = :id OR begins_with(pk, :reused) OR begins_with(pk, :invalid)) AND #s = :r"
        kwargs["ExpressionAttributeValues"] = {
            ":id": {"S": f"EVENT#{event_id}"},
            ":reused": {"S": f"EVENT#{event_id}#reused-"},
            ":invalid": {"S": f"EVENT#{event_id}#invalid-"},
            ":r": {"S": "rejected"},
        }
    # Not decoded (decompressed) only to be dropped: at scale, the requests are most of what a scan reads.
    items = [
        decode_item({k: v for k, v in i.items() if k != "request"}) for i in _all_items(ddb, "scan", table, **kwargs)
    ]
    if since is not None:  # storedAt is always iso_millis (UTC, milliseconds): as text, it sorts as the time does
        items = [d for d in items if d.get("status") != "rejected" or str(d.get("storedAt", "")) >= since]
    return sorted(items, key=lambda d: str(d.get("storedAt", "")))


def _reason(doc: dict[str, Any]) -> str:
    """The problem's code and title; for a refusal with field errors (the relay's own), the first one too, which says
    what to fix (e.g. a `datastreamId` the allowed list leaves out), cut at 100 characters."""
    error = as_dict(doc.get("error"))
    code = str(error.get("type", "")).rsplit("/", 1)[-1]
    reason = f"{code}: {error.get('title', '')}".strip(": ")
    errors = as_list(error.get("errors"))
    first = as_dict(errors[0]) if errors else {}
    if first.get("message"):
        detail = f"{first.get('path') or '(body)'}: {first['message']}"
        if len(detail) > 100:
            detail = detail[:97] + "..."
        # The relay keeps 50 errors and says how many more there were in a last one ("and 30 more errors")
        cut = (
            re.fullmatch(r"and ([0-9]+) more errors?", str(as_dict(errors[-1]).get("message", ""))) if errors else None
        )
        others = len(errors) - 1 + (int(cut[1]) - 1 if cut and len(errors) > 1 else 0)
        more = f"; {others} more" if others > 0 else ""
        reason += f" ({detail}{more})"
    return reason


def cmd_rejected(args: argparse.Namespace) -> int:
    event_id = bounded_id(args.event_id) if args.event_id else None
    rows = _scan_rejected(_client("dynamodb"), _targets(args).table, event_id, since=args.since)
    since = f" since {args.since}" if args.since else ""
    if args.json:
        _print([{k: v for k, v in r.items() if k != "request"} for r in rows])
        return 0
    print(f"{'storedAt':<25} {'eventId':<40} {'source':<8} reason")
    # The newest: what an operator answering an alarm is looking for (_scan_rejected sorts them by storedAt, so the
    # latest is printed last, next to the prompt).
    shown = rows[-args.limit :]  # --limit is at least 1
    for r in shown:
        print(
            f"{_shown(r.get('storedAt', '')):<25} {_shown(r.get('eventId', '')):<40} {_shown(r.get('source', '')):<8} "
            f"{_shown(_reason(r))}"
        )
    if len(shown) < len(rows):
        print(
            f"showing the newest {len(shown)} of {len(rows)} rejected event(s){since}: --limit N to list more, "
            "--json for all"
        )
    else:
        print(f"{len(rows)} rejected event(s){since}")
    return 0


def _refused_by_relay(doc: dict[str, Any]) -> bool:
    """Whether the relay refused the event itself (said by `rejectedBy`, or by its problem's type when the item is
    older than that attribute or its problem is unreadable), not Edge."""
    return doc.get("rejectedBy") == RELAY or as_dict(doc.get("error")).get("type") == INVALID_EVENT_TYPE


def _refused_for_its_datastream(doc: dict[str, Any]) -> bool:
    """Whether the relay refused the event only because the default datastream was not in `ALLOWED_DATASTREAM_IDS`
    (it named none), under the event's own id: the deployment's fault, not the event's (a typo in the list), which
    `replay --to-datastream` may send on once that is fixed. Not an event that named a datastream left out of the list
    (perhaps on purpose), nor a malformed one."""
    errors = as_dict(doc.get("error")).get("errors")
    return (
        isinstance(errors, list)
        and bool(errors)
        and all(
            isinstance(e, dict) and e.get("path") == "datastreamId" and e.get("message") == DEFAULT_NOT_ALLOWED
            for e in errors
        )
        # not a body filed beside another outcome (`<eventId>#invalid-<digest>`); a sender's own "ORDER#1001" is one
        and isinstance(doc.get("eventId"), str)
        and _INVALID_FILING.search(doc["eventId"]) is None
    )


def _replay_body(request: Any) -> str:
    """The message a replay sends: the relay's own queue encoding (compact JSON, or the body's text as it came), with
    the characters SQS refuses (U+FFFE, U+FFFF) escaped."""
    return sqs_text(request) if isinstance(request, str) else message_body(request)


def _refusal_ahead(doc: dict[str, Any], datastream: str | None) -> str | None:
    """What the relay would refuse in the replayed message (its checks, as a batch runs them, with any datastream
    allowed: relayctl does not know `ALLOWED_DATASTREAM_IDS`), or None: a body that is not an event under today's
    rules is refused again, filed beside the mark, and nothing more comes for it."""
    target = datastream or doc.get("datastreamId")
    webhook = doc.get("source") == "webhook"
    try:
        read_event(
            _replay_body(doc["request"]),
            str(doc.get("eventId", "")),
            datastream=str(target) if target else None,
            default_datastream=str(target or "default"),
            source="webhook" if webhook else "sqs",
            received_at=time.time(),
            identity_key=None,
            limit=None if webhook else MAX_BODY_BYTES,  # as the batch checks a replayed message
        )
    except InvalidEvent as exc:
        first = as_dict(exc.errors[0]) if exc.errors else {}
        return f"{first.get('path') or '$'}: {first.get('message') or exc.detail}"
    return None


def _refused_since_note(doc: dict[str, Any]) -> str:
    """For a replay mark the relay refused a message under (`invalidFiling`: most likely the replayed message itself,
    for a datastream `ALLOWED_DATASTREAM_IDS` leaves out), what to say beside "queued": sent again, it is refused again
    unless that was fixed. Else nothing."""
    if doc.get("status") != "queued" or not doc.get("invalidFiling"):
        return ""
    return (
        f" (the last replay's message was refused, kept as {doc['invalidFiling']}: `relayctl show` it for why; this "
        "one is refused too unless that is fixed)"
    )


def _replay_plan(doc: dict[str, Any] | None, datastream: str | None = None) -> str | None:
    """Why an event cannot be replayed (read-only: `--dry-run` reports the same), or None if it can. `datastream`:
    the one `--to-datastream` names, to which an event the relay refused for its datastream alone may go."""
    if doc is None:
        return "not found"
    status = doc.get("status")
    # A replay whose send failed and whose mark could not be put back is left `queued` with nothing queued (no lease:
    # never claimed since): it may be sent again. Sending one that is also in the queue is harmless (one claim wins).
    # Tried since (the relay gave it back: `lastError`, which the mark removes), it is waiting for its message.
    stranded = status == "queued" and _replay_mark(doc)
    if status != "rejected" and not stranded:
        return f"skipped: status is {status}"
    error = as_dict(doc.get("error"))
    if _refused_by_relay(doc) and not (datastream and _refused_for_its_datastream(doc)):
        # The relay refused the event itself (its body, its datastreamId, its size, or an eventId already used for
        # another event): the same message would be refused again, or sent to the default datastream in place of
        # the one it named. The sender must send a corrected event; the stored problem says what to correct.
        why = error.get("detail") or "send a corrected one"
        return f"skipped: the relay refused it itself ({error.get('title') or 'invalid event'}): {why}"
    if doc.get("requestUnreadable"):
        return "skipped: its stored request cannot be read (written by another version of the relay?)"
    if doc.get("request") is None:
        return "skipped: the original request was too large to keep"
    if (refusal := _refusal_ahead(doc, datastream)) is not None:
        return f"skipped: the relay would refuse it ({refusal}); the sender must send a corrected event"
    return None


def replay_event(
    ddb: Any,
    sqs: Any,
    table: str,
    queue_url: str,
    event_id: str,
    doc: dict[str, Any] | None = None,
    datastream: str | None = None,
) -> str:
    """Mark a rejected event `queued` and send its original request to the queue. Returns what happened. `doc` is its
    result when the caller has just read it (the marks below are conditioned on what it holds). `datastream`: send it
    there instead of the datastream it was rejected in (a wrong DATASTREAM_ID since fixed)."""
    if doc is None:
        doc = _get(ddb, table, event_id)
    skip = _replay_plan(doc, datastream)
    if skip is not None or doc is None:  # (_replay_plan says "not found" for None)
        return skip or "not found"
    request = doc["request"]
    # `queued` first: the relay claims only a queued (or new) event, so the mark must be there before the message.
    stamp = {"S": iso_millis(time.time())}
    was = {"S": str(doc.get("status"))}
    # What putting the mark back restores: a stranded replay keeps its earlier `replayedAt` (which is what makes it
    # replayable); a rejected event had none.
    earlier = doc.get("replayedAt") if was["S"] == "queued" else None

    def mark(update: str, condition: str, extra: dict[str, Any] | None = None) -> None:  # :was <-> `queued`, at :now
        values = {":q": {"S": "queued"}, ":was": was, ":now": stamp, **(extra or {})}
        ddb.update_item(
            TableName=table,
            Key=HandlesStore.result_key(event_id),
            UpdateExpression=update,
            ConditionExpression=condition,
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues=values,
        )

    # Sent to another datastream, the item says so: a webhook's event is taken over only for the datastream it holds
    # (store.claim), so the replayed message would be refused as busy on every receive. Put back with the mark.
    old_ds = doc.get("datastreamId")
    moved = datastream is not None and datastream != old_ds
    also_set, also_values = (", datastreamId = :ds", {":ds": {"S": datastream}}) if moved else ("", {})
    # The `xdm.timestamp` the relay gave the event (`defaultTimestamp`: the sender gave none; its stored request holds
    # it, and a result keeps none of its claim's), for the datastream it now goes to: a resend of the event, which may
    # take the marked item over before the replayed message does, is then sent with it too, as the replayed request
    # is, not with its own receive time (`store.claim`). A sender's own time is not: its resend carries its own.
    xdm = as_dict(as_dict(request).get("event")).get("xdm") if isinstance(request, dict) else None
    sent_time, who = as_dict(xdm).get("timestamp"), doc.get("identityId")
    timed = doc.get("defaultTimestamp") is True and isinstance(sent_time, str) and isinstance(who, str)
    if timed:
        also_set += ", xdmTimestamp = :ts0, xdmTimestampOf = :of"
        also_values.update({":ts0": {"S": str(sent_time)}, ":of": {"S": f"{who}|{datastream or old_ds or ''}"}})
    try:
        mark(
            f"SET #s = :q, replayedAt = :now{also_set} REMOVE lastError",
            "#s = :was AND attribute_not_exists(leaseUntil)",
            also_values,
        )
    except (ClientError, BotoCoreError) as exc:
        # Our own mark, whose answer was lost goes on: boto3 sent it again and it found `queued` (a refused
        # condition), or every attempt's answer was lost (an error). Anything else changed it meanwhile, or the mark
        # failed: this event's line says so, and the next events are still tried.
        refused = isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") == _CONDITION_FAILED
        try:
            now = _get(ddb, table, event_id) or {}
        except (ClientError, BotoCoreError):
            # Marked or not, unknown: a replay named by its id goes again (a stranded mark is replayable).
            return f"failed: not marked ({_aws_code(exc)}): run `{_again(event_id, datastream)}` again"
        if (now.get("status"), now.get("replayedAt"), "leaseUntil" in now) != ("queued", stamp["S"], False):
            return (
                "skipped: changed meanwhile" if refused else f"failed: not marked ({_aws_code(exc)}); still {was['S']}"
            )
    body = _replay_body(request)
    attrs = {
        "eventId": {"DataType": "String", "StringValue": event_id},
        RELAY_SOURCE: {"DataType": "String", "StringValue": str(doc.get("source") or "sqs")},
    }
    if datastream or doc.get("datastreamId"):
        attrs["datastreamId"] = {"DataType": "String", "StringValue": str(datastream or doc["datastreamId"])}
    received = _epoch_ms_of(doc.get("receivedAt"))
    if received is not None:
        # A body the relay refused was kept as received, without the `xdm.timestamp` it gave one that had none: the
        # relay sends it with its first receive time, as a retry or a redrive is, not the replay's (contract §2).
        attrs[RELAY_SENT_TIMESTAMP] = {"DataType": "Number", "StringValue": str(received)}
    try:
        sqs.send_message(QueueUrl=queue_url, MessageBody=body, MessageAttributes=attrs)
    except (ClientError, BotoCoreError) as exc:
        # Nothing was queued: put the mark back, so the event stays listed as it was and can be replayed again.
        reason = _aws_code(exc)
        try:
            # What the mark changed goes back: the status, `replayedAt` (kept by a stranded replay, else none) and the
            # datastream (none for an item that had none).
            sets, removes, values = ["#s = :was"], [], {}
            if earlier is not None:
                sets.append("replayedAt = :old")
                values[":old"] = {"S": str(earlier)}
            else:
                removes.append("replayedAt")
            if moved and old_ds:
                sets.append("datastreamId = :oldds")
                values[":oldds"] = {"S": str(old_ds)}
            elif moved:
                removes.append("datastreamId")
            for name in ("xdmTimestamp", "xdmTimestampOf") if timed else ():
                if isinstance(doc.get(name), str):
                    sets.append(f"{name} = :old{name}")
                    values[f":old{name}"] = {"S": str(doc[name])}
                else:
                    removes.append(name)
            update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
            mark(update, "#s = :q AND replayedAt = :now", values)
        except (ClientError, BotoCoreError):
            return f"failed: not sent ({reason}), and left marked queued: run `{_again(event_id, datastream)}` again"
        return f"failed: not sent to the queue ({reason}); still {was['S']}"
    return "queued" + _refused_since_note(doc)


def _again(event_id: str, datastream: str | None) -> str:
    """The command that finishes a replay left unfinished: with its `--to-datastream`, without which an event the relay
    refused only for its datastream is skipped, as any refusal of the relay's own."""
    return f"relayctl replay {event_id}" + (f" --to-datastream {datastream}" if datastream else "")


def cmd_replay(args: argparse.Namespace) -> int:
    t = _targets(args)
    if not t.queue_url:
        raise SystemExit("relayctl: no queue: pass --queue-url, --stack or set QUEUE_URL")
    ids = list(args.event_ids)
    if not ids and not args.all_rejected:
        raise SystemExit("relayctl: name event ids or pass --all-rejected")
    if args.from_datastream is not None and not args.all_rejected:
        raise SystemExit("relayctl: --from-datastream picks among --all-rejected: pass that too")
    if args.since is not None and not args.all_rejected:
        raise SystemExit("relayctl: --since picks among --all-rejected: pass that too")
    if args.all_rejected and args.to_datastream and args.from_datastream is None:
        # Every datastream's rejections (schema errors in healthy datastreams too) would all go to one.
        raise SystemExit("relayctl: --all-rejected with --to-datastream needs --from-datastream (the one to move from)")
    ddb, sqs = _client("dynamodb"), _client("sqs")
    if args.all_rejected:
        # Edge's rejections only: the relay's own (a body that is not an event) can only be fixed by the sender. And
        # the replays an earlier run left marked but not sent (stopped between the two), so that running the same
        # command again finishes an interrupted one.
        rows = _scan_rejected(ddb, t.table, stranded=True, since=args.since)
        ids += [
            str(r["eventId"])
            for r in rows
            if (not _refused_by_relay(r) or (args.to_datastream and _refused_for_its_datastream(r)))
            # A stranded replay of this very command holds the datastream it was moved to: finished all the same.
            and (
                args.from_datastream in (None, r.get("datastreamId"))
                or (r.get("status") != "rejected" and args.to_datastream == r.get("datastreamId"))
            )
        ]
    if not ids:
        # Nothing to do is not a mistake: a second run right after the first finds its events queued or delivered.
        print("no Edge-rejected events to replay")
        return 0
    failures = done = 0
    unique = list(dict.fromkeys(ids))
    try:
        for given in unique:
            # Found as `show` finds it: an event without an xdm._id is kept under its webhook-id or messageId,
            # shortened when over 256 characters.
            event_id, doc = _find(ddb, t.table, given)
            if args.dry_run:
                outcome = _replay_plan(doc, args.to_datastream) or "would replay" + _refused_since_note(doc or {})
            else:
                outcome = replay_event(ddb, sqs, t.table, t.queue_url, event_id, doc, args.to_datastream)
            # Exit 1 when a named event is not (or, with --dry-run, would not be) replayed; each line says why.
            failures += not outcome.startswith(("queued", "would replay"))
            done += 1
            print(f"{_shown(event_id)}: {_shown(outcome)}")
    except KeyboardInterrupt:
        print(
            f"interrupted after {done} of {len(unique)} event(s): run the same command again to go on (an event "
            "stopped between its mark and its send is replayed again by name, or by --all-rejected)",
            file=sys.stderr,
        )
        return 130
    verb = "would replay" if args.dry_run else "replayed"
    # On stderr: stdout keeps one line per event, for scripts.
    print(f"{verb} {done - failures} of {len(unique)} event(s); {failures} not (each line says why)", file=sys.stderr)
    return 1 if failures else 0


_SQS_MAX_ATTRIBUTES = 10  # message attributes SQS takes on one message


def _account_and_name(queue_url: str) -> tuple[str, str] | None:
    """A queue's account and name from its URL (`https://sqs.<region>.amazonaws.com/<account>/<name>`), or None."""
    parts = urlsplit(queue_url.strip()).path.strip("/").split("/")
    return (parts[-2], parts[-1]) if len(parts) >= 2 else None


def _from(message: dict[str, Any], source: tuple[str, str] | None) -> bool:
    """Whether a dead letter came from the queue of `source` (its account and name): SQS names the queue that moved it
    (`arn:aws:sqs:<region>:<account>:<name>`). A message without the name (as one an emulator moved), or a queue URL
    that does not say, counts as the relay's."""
    arn = (message.get("Attributes") or {}).get("DeadLetterQueueSourceArn")
    return arn is None or source is None or tuple(arn.split(":")[-2:]) == source


def _moved(message: dict[str, Any]) -> dict[str, Any] | None:
    """The attributes of a dead-letter message's copy on the queue (a new message: a new messageId and SentTimestamp).
    It is marked as the relay's own (`relaySource`), so that the relay reads the eventId and the send time it keeps:
    a producer's message was keyed by its messageId, and its default `xdm.timestamp` was its SentTimestamp."""
    # As SendMessage takes them: a received attribute may also hold the (reserved, empty) list values.
    attrs = {
        name: {k: v for k, v in value.items() if k in ("DataType", "StringValue", "BinaryValue")}
        for name, value in (message.get("MessageAttributes") or {}).items()
    }
    if RELAY_SOURCE not in attrs:  # a producer's message: whatever `eventId` attribute it had was not its key
        attrs[RELAY_SOURCE] = {"DataType": "String", "StringValue": "sqs"}
        attrs["eventId"] = {"DataType": "String", "StringValue": message["MessageId"]}
    sent = (message.get("Attributes") or {}).get("SentTimestamp")
    if RELAY_SENT_TIMESTAMP not in attrs and sent and len(attrs) < _SQS_MAX_ATTRIBUTES:
        # Without it (no room left), only a body without xdm.timestamp gets the copy's send time as its default.
        attrs[RELAY_SENT_TIMESTAMP] = {"DataType": "Number", "StringValue": str(sent)}
    if len(attrs) <= _SQS_MAX_ATTRIBUTES:
        return attrs
    # A producer's message with 9 or 10 attributes has no room for the two that keep its eventId. One whose body
    # names its xdm._id needs neither; any other, moved anyway, would be another event (keyed by its new messageId),
    # sent to Edge under another xdm._id.
    given = _xdm_id(message["Body"])
    named = isinstance(given, str) and given != ""  # (an empty one, as a null, the relay takes for absent)
    return {name: attrs[name] for name in (message.get("MessageAttributes") or {})} if named else None


# What one SendMessageBatch may carry, all its messages together (bodies and attributes): 256 KiB, the limit of
# every queue until SQS raised it to 1 MiB in 2025 (a queue's own MaximumMessageSize may still say less).
_SQS_BATCH_PAYLOAD = 256 * 1024


def _payload(entry: dict[str, Any]) -> int:
    """An entry's size as SQS counts it: the body, and each attribute's name, type and value."""
    size = len(entry["MessageBody"].encode("utf-8"))
    for name, attr in (entry.get("MessageAttributes") or {}).items():
        value = attr.get("StringValue")
        data = value.encode("utf-8") if isinstance(value, str) else attr.get("BinaryValue") or b""
        size += len(name.encode("utf-8")) + len(attr.get("DataType", "").encode("utf-8")) + len(data)
    return size


def _by_payload(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The entries in order, in batches whose payloads together stay within _SQS_BATCH_PAYLOAD (a larger message on
    its own: SQS then takes it if the queue takes a message that large)."""
    groups: list[list[dict[str, Any]]] = []
    size = 0
    for entry in entries:
        n = _payload(entry)
        if not groups or size + n > _SQS_BATCH_PAYLOAD:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


def _same_queue(a: str, b: str) -> bool:
    """Whether two queue URLs name the same queue, as an operator may type them (spaces around, a trailing slash, the
    legacy `queue.amazonaws.com` host or the current `sqs.<region>.amazonaws.com`): by their path, `/<account>/<name>`.
    (Two queues of one name and account in different regions compare equal: the relay's two are in one region.)"""
    return urlsplit(a.strip()).path.rstrip("/") == urlsplit(b.strip()).path.rstrip("/")


def cmd_redrive(args: argparse.Namespace) -> int:
    t = _targets(args, needs_table=False)  # it moves messages between the queues: the table is never read
    if not (t.queue_url and t.dlq_url):
        raise SystemExit("relayctl: redrive needs --queue-url and --dlq-url (or --stack)")
    if _same_queue(t.queue_url, t.dlq_url):
        # Each message would be sent back to the queue it came from (and, its copy being new, read and sent again up
        # to --max times).
        raise SystemExit(
            f"relayctl: --queue-url and --dlq-url name the same queue ({t.dlq_url.strip()}): redrive moves messages "
            "from the dead-letter queue to the relay's queue; pass the relay's queue as --queue-url"
        )
    sqs = _client("sqs")
    # The queue whose dead letters these should be: SQS lets any queue of the account name this dead-letter queue as
    # its own (the template sets no RedriveAllowPolicy: it would need the queue's ARN, a dependency cycle), and a
    # message another queue dead-lettered here is not the relay's to send on. Told by its account and name, from the
    # queue's URL (a dead-letter queue takes messages from its own region only): no call, no permission more.
    source = _account_and_name(t.queue_url)
    moved, failed = 0, False
    kept: dict[str, str] = {}  # messageId -> receipt handle of a message left in the dead-letter queue
    # Every message read and not moved (left behind, not sent, or in hand when a call failed): shown again at the end,
    # so that `show` and a second redrive find them at once rather than a minute later.
    held: dict[str, str] = {}
    try:
        while moved < args.max:
            msgs = sqs.receive_message(
                QueueUrl=t.dlq_url,
                MaxNumberOfMessages=min(10, args.max - moved),
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["SentTimestamp", "DeadLetterQueueSourceArn"],
                VisibilityTimeout=60,
                WaitTimeSeconds=_LONG_POLL_S,
            ).get("Messages", [])
            held.update((m["MessageId"], m["ReceiptHandle"]) for m in msgs)
            if not msgs or all(m["MessageId"] in kept for m in msgs):
                break  # empty, or back to the messages it leaves behind: one pass is done
            foreign = {m["MessageId"] for m in msgs if not _from(m, source)}
            copies = [(str(i), m, None if m["MessageId"] in foreign else _moved(m)) for i, m in enumerate(msgs)]
            for _, m, attrs in copies:
                if m["MessageId"] in foreign and m["MessageId"] not in kept:
                    print(
                        f"{m['MessageId']}: left in the dead-letter queue: another queue dead-lettered it "
                        f"({(m.get('Attributes') or {}).get('DeadLetterQueueSourceArn')}), not the relay's "
                        f"{t.queue_url.strip()}; a queue that names this dead-letter queue as its own sends its "
                        "failures here"
                    )
                elif attrs is None and m["MessageId"] not in kept:
                    print(
                        f"{m['MessageId']}: left in the dead-letter queue: it has too many message attributes for "
                        f"the two that keep its eventId (SQS takes {_SQS_MAX_ATTRIBUTES}); send it again with fewer, "
                        "or with an xdm._id"
                    )
                if attrs is None:
                    kept[m["MessageId"]] = m["ReceiptHandle"]
            entries = [
                {"Id": i, "MessageBody": m["Body"], "MessageAttributes": a} for i, m, a in copies if a is not None
            ]
            if not entries:
                continue  # those read are hidden for a minute: the next receive reads others
            ok: set[str] = set()
            send_error: Exception | None = None
            for group in _by_payload(entries):
                try:
                    sent = sqs.send_message_batch(QueueUrl=t.queue_url, Entries=group)
                except (ClientError, BotoCoreError) as exc:
                    send_error = exc  # what earlier groups sent is deleted from the DLQ below, then this is raised
                    break
                ok |= {s["Id"] for s in sent.get("Successful", [])}
            done = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs) if str(i) in ok]
            deleted = 0
            if done:  # delete only what reached the queue: a failed send stays in the DLQ
                try:
                    answer = sqs.delete_message_batch(QueueUrl=t.dlq_url, Entries=done)
                except (ClientError, BotoCoreError):
                    # Sent, then not deleted: say so before the error ends the command (a rerun makes more copies).
                    print(
                        f"{len(done)} message(s) sent to the queue but not deleted from the dead-letter queue: "
                        "they are on both (the relay takes the second copy for a repeat); moved before them: "
                        f"{moved}"
                    )
                    raise
                gone = {d["Id"] for d in answer.get("Successful", [])}
                deleted = len(gone)
                for i, m in enumerate(msgs):
                    if str(i) in gone:
                        held.pop(m["MessageId"], None)
            moved += deleted
            if send_error is not None:
                raise send_error
            if deleted < len(done):
                print(
                    f"{len(done) - deleted} message(s) sent to the queue but not deleted from the dead-letter queue: "
                    "they are on both (the relay takes the second copy for a repeat)"
                )
                failed = True
                break
            if len(done) < len(entries):
                print(f"{len(entries) - len(done)} message(s) could not be sent; left in the dead-letter queue")
                failed = True
                break
    except KeyboardInterrupt:  # the messages in hand are shown again below (`finally`)
        print(
            f"interrupted after moving {moved} message(s): run it again to go on; the batch in hand (up to 10) may "
            "now be on both queues (the relay takes the second copy for a repeat)",
            file=sys.stderr,
        )
        return 130
    finally:
        _show_again(sqs, t.dlq_url, list(held.values()))
    print(f"moved {moved} message(s) from the dead-letter queue to the queue")
    if moved >= args.max and not failed:
        left = _approximate_messages(sqs, t.dlq_url)
        if left:
            print(f"stopped at --max {args.max}: about {left} message(s) left in the dead-letter queue; run it again")
    return 1 if failed or kept else 0


def _approximate_messages(sqs: Any, queue_url: str) -> int:
    """What SQS says is still visible in a queue (0 when it cannot be read: only a hint for the operator)."""
    try:
        attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])
        return int(attrs.get("Attributes", {}).get("ApproximateNumberOfMessages", 0))
    except (ClientError, BotoCoreError, ValueError):
        return 0


_JSON_ESCAPE = re.compile(r"\\u(?:([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|([0-9a-fA-F]{4}))")


def _unescape(match: re.Match[str]) -> str:
    """A `\\uXXXX` escape (or a surrogate pair of them) as its character; an escaped quote or backslash stays as it is
    written, so that it never ends or starts a string in the text searched."""
    high, low, single = match.groups()
    if single is None:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
    code = int(single, 16)
    return match.group(0) if code in (0x22, 0x5C) else chr(code)


def _mentions(request: Any, identity: str) -> bool:
    """Whether a stored request (its raw text, or the parsed event) holds `identity` as a JSON string value, however
    the sender escaped it (`alice\\u0040example.com` is alice@example.com too)."""
    text = request if isinstance(request, str) else json.dumps(request, ensure_ascii=False)
    unescaped = _JSON_ESCAPE.sub(_unescape, text)
    needles = (json.dumps(identity, ensure_ascii=False), json.dumps(identity))
    return any(n in t for n in needles for t in (text, unescaped))


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object read as its list of pairs (a key written twice kept twice)."""


def _pairs(value: Any) -> list[tuple[Any, Any]]:
    """An object's (key, value) pairs, every one of them (a refused body may repeat a key), else none."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, _Pairs):
        return list(value)
    return []


def _is(value: Any, identity: str) -> bool:
    """Whether a value read from a request is `identity`: the same string, or a whole number written as its digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) == identity
    return value == identity


def _names(request: Any, namespace: str, identity: str) -> bool:
    """Whether a stored request carries `identity` under `namespace` in an identity map (`{namespace: [{"id": ...}]}`,
    or a malformed `{namespace: {"id": ...}}`, `{namespace: "..."}` or `{namespace: [...]}` of bare values, anywhere
    in it, a repeated key included; an id sent as a JSON number counts as its digits), also inside a string value that
    is JSON itself (an SNS notification's `Message`, a body JSON-encoded twice). A stored text that is not JSON counts
    when it holds both as JSON strings, or when it is JSON cut off and, read as far as it goes (`_repaired`), carries
    the identity as above; a string value inside a body that starts as JSON and is cut off (an SNS `Message`) counts
    only the second way: free text inside a body (another person's note) may quote both."""
    stack = [request]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if node is request or _starts_as_json(node):
                text = node.removeprefix("\ufeff")
                try:
                    stack.append(_json(text))
                except (ValueError, RecursionError):
                    cut = _repaired(text)
                    if cut is not None:
                        stack.append(cut)
                    if node is request and _mentions(node, namespace) and _mentions(node, identity):
                        return True
            continue
        for key, value in _pairs(node):
            if key == namespace:
                # The usual `[{"id": ...}]`, and the shapes a body refused for its identity map may have instead:
                # `{"id": ...}`, a bare value, or `[...]` of bare values. The namespace key anchors each.
                items = value if isinstance(value, list) and not isinstance(value, _Pairs) else [value]
                if any(
                    _is(item, identity) or any(k == "id" and _is(v, identity) for k, v in _pairs(item))
                    for item in items
                ):
                    return True
            stack.append(value)
        if isinstance(node, list) and not isinstance(node, _Pairs):
            stack.extend(node)
    return False


def _json(text: str) -> Any:
    """A stored body read as JSON: every key kept (`_Pairs`), numbers as the text they were sent as (an id sent as a
    JSON number matches its digits), and not strict (a raw tab inside a string does not hide what is around it)."""
    return json.loads(text, object_pairs_hook=_Pairs, parse_int=str, parse_float=str, strict=False)


_MAX_REPAIR_DEPTH = 256  # a cut body is read no deeper (the relay refuses more than 64 levels anyway)
_REPAIR_TRIES = 2  # the last value end, and the one before (the last string may be a key the cut left alone)
_SCALAR_END = frozenset(' \t\r\n,:]}"')


def _repaired(text: str) -> Any:
    """JSON cut off (a refused body, an SNS `Message`), read as far as it goes: its prefix up to the last whole value
    (or the one before, when the last string is a key the cut left without its colon), its open brackets closed; None
    when neither parses, as for a body that is wrong before its end (then it is not a cut one). A number or literal
    touching the end is not whole (`12` may be `1234`), nor is a string the cut went through, except one that holds
    JSON itself (an SNS `Message` cut in the middle: closed, and read as a cut body in turn). Strings keep their
    escapes as JSON reads them, so an escaped quote inside a note never becomes a key."""
    closers: list[str] = []
    # Where the last values ended, with the brackets then open: a key is dropped once its colon shows it is one.
    ends: collections.deque[tuple[int, str]] = collections.deque(maxlen=_REPAIR_TRIES + 1)
    in_string = escaped = in_scalar = whole = False
    opened = 0  # where the string being read began
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string, whole = False, not closers
                ends.append((i + 1, "".join(reversed(closers))))
            continue
        if in_scalar and ch in _SCALAR_END:
            in_scalar, whole = False, not closers
            ends.append((i, "".join(reversed(closers))))
        if whole and ch not in " \t\r\n":
            return None  # a whole document, then more (`{...} and a word`): wrong after its end, not cut
        if ch == '"':
            in_string, opened = True, i
        elif ch in "{[":
            if len(closers) == _MAX_REPAIR_DEPTH:
                break  # read no deeper: what came before is searched, as if the body ended here
            closers.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if closers:
                closers.pop()
            whole = not closers
            ends.append((i + 1, "".join(reversed(closers))))
        elif ch == ":":
            if ends:
                ends.pop()  # the string before it was a key, not a value
        elif ch not in " \t\r\n,":
            in_scalar = True
    tries = [text[:end] + close for end, close in reversed(ends)][:_REPAIR_TRIES]
    if in_string and _starts_as_json(_string_head(text[opened:])):
        # Cut inside a string that holds JSON: closed where it was cut (less up to 5 characters: an escape cut in two),
        # before the whole values. Its text is then read as a cut body of its own.
        close = '"' + "".join(reversed(closers))
        tries[:0] = [text[: len(text) - k] + close for k in range(6)]
    for attempt in tries:
        try:
            return _json(attempt)
        except (ValueError, RecursionError):
            continue
    return None


def _starts_as_json(text: str) -> bool:
    """Whether a string looks like JSON text (an object, an array, or a string: a body encoded once more), a byte-order
    mark and white space before it aside."""
    return text.lstrip(" \t\r\n\ufeff")[:1] in ("{", "[", '"')


def _string_head(raw: str) -> str:
    """The first characters of a JSON string literal cut off (`raw` starts at its opening quote), decoded: what the
    string holds begins with them."""
    head = raw[:64]
    for k in range(6):  # less up to 5 characters: an escape cut in two
        try:
            decoded = json.loads(head[: len(head) - k] + '"', strict=False)
        except ValueError:
            continue
        return decoded if isinstance(decoded, str) else ""
    return ""


def _identity_value(given: str) -> str:
    """The identity value `forget` searches for: `--id VALUE` as given, or with `--id -` the one line on standard input
    (its line ending dropped), which keeps a person's data out of the shell history and the process list."""
    if given != "-":
        return given
    if sys.stdin is None or sys.stdin.closed:  # `relayctl ... --id - <&-`
        raise SystemExit("relayctl: --id -: standard input is closed: pipe the identity value in, or pass --id VALUE")
    if sys.stdin.isatty():
        # Typed at a terminal: asked for, and not echoed (the screen, a recorded session, are logs too).
        value = getpass.getpass("identity value (not shown): ")
        more = ""
    else:
        value = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
        more = sys.stdin.read()  # anything after that line would be a second value: one erasure per run
    if not value or more.strip():
        held = "more than one line" if value else "an empty value"
        raise SystemExit(f"relayctl: --id -: standard input must hold the identity value on one line (it held {held})")
    return value


def cmd_forget(args: argparse.Namespace) -> int:
    """Delete what the table keeps about one identity: its state items (every datastream), the results of its events
    (found by their keyed `identityId`), and rejected requests that carry it under its namespace (scanned). Exits 1
    when events of this identity (or claimed by an older version, whose items do not say whose) are still waiting,
    or when nothing was found."""
    identity = _identity_value(args.id)
    t = _targets(args)
    key: bytes | None = None
    if t.identity_key_secret and args.no_identity_key:
        # An erasure under the wrong ids finds nothing and says "nothing found": refuse to guess which one is wrong.
        raise SystemExit(
            f"relayctl: --no-identity-key, but an identity key secret is named ({t.identity_key_source}): drop one, "
            "or the ids searched for may not be the table's"
        )
    if t.identity_key_secret:
        # The function's own reader of the key, with its checks: the same bytes, or a clear refusal.
        credentials = CredentialsStore(
            _client("secretsmanager"),
            adobe_secret_id=None,
            webhook_secret_id=None,
            max_age=0,
            identity_key_secret_id=t.identity_key_secret,
            identity_key_label=f"identity key secret {t.identity_key_secret} ({t.identity_key_source})",
        )
        try:
            key = credentials.identity_key()
        except CredentialsError as exc:
            raise SystemExit(f"relayctl: {exc}") from None
    elif not args.no_identity_key:
        raise SystemExit(
            "relayctl: no identity key: pass --identity-key-secret or --stack, or set IDENTITY_KEY_SECRET_ID "
            "(--no-identity-key for a deployment without one, whose ids are plain SHA-256)"
        )
    opaque = opaque_identity_id(args.namespace, identity, key=key)
    ddb = _client("dynamodb")
    # Strongly consistent reads (twice the read units of a scan): an erasure must find every item written before it
    # started, not miss one that an eventually consistent read had not caught up with yet.
    #
    # A waiting event's item keeps the keyed id of each identity whose event claimed it (`claimedBy`), not its
    # request: this person's are stored again once finished. Read first: one delivered while the reads below run is
    # then either reported here or found by them (its state and result are read after it was seen waiting), never
    # neither.
    waiting = _all_items(
        ddb,
        "scan",
        t.table,
        FilterExpression="begins_with(pk, :e) AND (#s = :q OR #s = :p)",
        ExpressionAttributeNames={"#s": "status"},
        ExpressionAttributeValues={":e": {"S": "EVENT#"}, ":q": {"S": "queued"}, ":p": {"S": "pending"}},
        ConsistentRead=True,
    )
    states = _all_items(  # one per datastream
        ddb,
        "query",
        t.table,
        KeyConditionExpression="pk = :pk",
        ExpressionAttributeValues={":pk": {"S": f"IDENTITY#{opaque}"}},
        ConsistentRead=True,
    )
    results = _all_items(
        ddb,
        "scan",
        t.table,
        FilterExpression="identityId = :id",
        ExpressionAttributeValues={":id": {"S": opaque}},
        ConsistentRead=True,
    )
    # Rejected requests kept under another identity (the person as a secondary identity, or a body refused before
    # any identity was read) are read, and deleted when they carry this one under this namespace.
    refused: list[dict[str, Any]] = []
    unreadable: list[dict[str, Any]] = []  # a request this relayctl cannot decode: whose it is cannot be told
    for item in _all_items(
        ddb,
        "scan",
        t.table,
        FilterExpression="begins_with(pk, :e) AND #s = :r AND attribute_exists(#req) AND NOT identityId = :id",
        ExpressionAttributeNames={"#s": "status", "#req": "request"},
        ExpressionAttributeValues={":e": {"S": "EVENT#"}, ":r": {"S": "rejected"}, ":id": {"S": opaque}},
        ConsistentRead=True,
    ):
        doc = decode_item(item)
        if doc.get("requestUnreadable"):
            unreadable.append(item)
        elif _names(doc.get("request"), args.namespace, identity):
            refused.append(item)
    # A result still waiting when read (its claim held by a delivery in flight) is left to that delivery.
    doomed = states + [i for i in results if i.get("status", {}).get("S") not in ("queued", "pending")] + refused
    verb = "would delete" if args.dry_run else "deleted"
    left: list[dict[str, Any]] = []
    for item in doomed:
        if not args.dry_run and not _delete_as_read(ddb, t.table, item):
            # Taken since it was read (a corrected resend's claim, a replay): deleting it now could delete a live
            # claim, and another delivery of the event would then claim it too. Left to that attempt.
            left.append(item)
            print(f"left {_shown(item['pk']['S'])} {_shown(item['sk']['S'])}: taken by a new attempt since it was read")
            continue
        print(f"{verb} {_shown(item['pk']['S'])} {_shown(item['sk']['S'])}")
    refused = [i for i in refused if i not in left]
    deleted_results = len(doomed) - len(left) - len(states) - len(refused)
    # A result of this identity that was finished when the waiting items were read and waiting when the results
    # were (a replay, a corrected resend took it meanwhile) is this identity's waiting event, as one left is.
    seen = {(i["pk"]["S"], i["sk"]["S"]) for i in waiting}
    became_waiting = [
        i
        for i in results
        if i.get("status", {}).get("S") in ("queued", "pending") and (i["pk"]["S"], i["sk"]["S"]) not in seen
    ]
    mine, unknown, others = _whose_waiting(waiting, left + became_waiting, opaque, args.namespace, identity)
    print(
        f"{verb} {len(states)} state item(s), {deleted_results} result(s), "
        f"{len(refused)} refused body(ies); {len(mine)} of this identity's event(s) waiting, {len(unknown)} whose "
        f"cannot be told, {others} of other identities. Not reached: messages still in the queues, and the table's "
        "point-in-time recovery (35 days)."
    )
    for item in mine:
        print(f"waiting {_shown(item['pk']['S'])} {_shown(item['sk']['S'])}: this identity's, queued or in flight")
    if mine:
        print(
            f"{len(mine)} event(s) of this identity are still queued or in flight: each stores it again once "
            "finished. Run forget again once they are (relayctl show <eventId>)."
        )
    if unknown:
        print(
            f"{len(unknown)} event(s) still queued or in flight were taken by an older version of the relay, whose "
            "items do not say whose they are: any of them may store this identity once finished. Run forget again "
            "once they are (one no message will take, a webhook event whose sender never resent it, waits for its "
            "expiry, RESULT_TTL_DAYS)."
        )
    for item in unreadable:
        print(
            f"left {_shown(item['pk']['S'])} {_shown(item['sk']['S'])}: its stored request cannot be read (written by "
            "another version of the relay, or edited by hand), so whether it names this identity cannot be told: "
            "check it by hand"
        )
    if not doomed and not unreadable and not mine:
        print(
            f"nothing found for that value under {args.namespace}: the namespace and the value must be spelled "
            "exactly as the events carried them (letter case included)"
        )
    return 1 if mine or unknown or unreadable or not doomed else 0


def _whose_waiting(
    waiting: list[dict[str, Any]], left: list[dict[str, Any]], opaque: str, namespace: str, identity: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """This identity's waiting items (and `left`: its results a new attempt took since they were read), the waiting
    items whose owner cannot be told, and how many are other identities'. A waiting item is this identity's when a
    claim of this identity took it (`claimedBy`, a set: an event of another identity reusing the eventId adds itself
    beside it), when it is this identity's result marked for a replay (`identityId` with `replayedAt`), when its
    first attempt's time is this identity's (`xdmTimestampOf`), or when it still holds a request naming it (a
    replayed rejection, or a refusal a resend took over and did not clear yet). One with none of these marks was
    claimed by an older relay.
    Another identity's event could still name this one as a secondary identity: kept only in a request Edge refuses,
    which the next forget finds, never in a state or a result's key."""
    mine: dict[tuple[str, str], dict[str, Any]] = {}
    unknown: list[dict[str, Any]] = []
    others = 0
    for item in waiting:
        owners = set(item.get("claimedBy", {}).get("SS", ()))
        # `identityId` on a waiting item is its owner's only when a replay marked a result of theirs (the claim that
        # takes it adds itself to `claimedBy`); a refusal another event took over keeps it until its clean-up write.
        owner = item.get("identityId", {}).get("S") if "replayedAt" in item else None
        first = item.get("xdmTimestampOf", {}).get("S", "")
        if (
            opaque in owners
            or owner == opaque
            or first.startswith(f"{opaque}|")
            or _names(decode_item(item).get("request"), namespace, identity)  # read only when the marks do not tell
        ):
            mine[(item["pk"]["S"], item["sk"]["S"])] = item
        elif not owners and owner is None:
            unknown.append(item)
        else:
            others += 1
    for item in left:
        mine.setdefault((item["pk"]["S"], item["sk"]["S"]), item)
    return list(mine.values()), unknown, others


def _delete_as_read(ddb: Any, table: str, item: dict[str, Any]) -> bool:
    """Delete `item` if it still holds the outcome read (its `status` and `storedAt`): False when it changed meanwhile,
    even to another outcome of the same status (another body refused under the same id, say, which is not this
    identity's). A state item (no `status`) is deleted whatever changed: whoever wrote it, it is this identity's."""
    key = {"pk": item["pk"], "sk": item["sk"]}
    status = item.get("status")
    if status is None:
        ddb.delete_item(TableName=table, Key=key)
        return True
    stored_at = item.get("storedAt")
    same = "storedAt = :at" if stored_at is not None else "attribute_not_exists(storedAt)"
    try:
        ddb.delete_item(
            TableName=table,
            Key=key,
            ConditionExpression=f"#s = :s AND {same}",
            ExpressionAttributeNames={"#s": "status"},
            ExpressionAttributeValues={":s": status, **({":at": stored_at} if stored_at is not None else {})},
            ReturnValuesOnConditionCheckFailure="ALL_OLD",
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == _CONDITION_FAILED:
            # No item: gone, by this very delete, applied though its answer was lost (boto3 sent it again).
            return "Item" not in exc.response
        raise
    return True


def _datastream_id(value: str) -> str:
    """A datastream id as the relay takes one (an SQS `datastreamId` attribute it would refuse is refused here)."""
    if not DATASTREAM_ID_RE.fullmatch(value):
        raise argparse.ArgumentTypeError("must be a datastream id (letters, digits, -_:.)")
    return value


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


_AGO = re.compile(r"(\d{1,6})([mhd])")
_AGO_S = {"m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> str:
    """An argparse type: a time ago (`30m`, `2h`, `7d`) or an ISO 8601 time (`2026-11-30T09:00Z`; UTC when it names
    no offset), as the `storedAt` text of that moment (iso_millis), which later ones sort after."""
    text = text.strip()
    ago = _AGO.fullmatch(text)
    if ago:
        at = time.time() - int(ago[1]) * _AGO_S[ago[2]]
    else:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a time ago (30m, 2h, 7d) nor an ISO 8601 time (2026-11-30T09:00Z)"
            ) from None
        at = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    return iso_millis(max(at, 0.0))  # no event is stored before 1970 (and iso_millis writes no earlier year)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayctl", description=" ".join(__doc__.split("\n\n")[0].split()) if __doc__ else None
    )
    parser.add_argument(
        "--stack", help="read TableName/QueueUrl/DeadLetterQueueUrl/IdentityKeySecretArn from this stack's outputs"
    )
    parser.add_argument("--table", help="results table (default: $HANDLES_TABLE)")
    parser.add_argument("--queue-url", help="the relay's queue (default: $QUEUE_URL or $RETRY_QUEUE_URL)")
    parser.add_argument("--dlq-url", help="the dead-letter queue (default: $DLQ_URL)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text)  # in the list, and atop `relayctl <name> --help`

    show = command("show", "an event's outcome: delivered, rejected (with reason), queued, dead-lettered")
    show.add_argument(
        "event_ids",
        nargs="+",
        metavar="EVENT_ID",
        help="an eventId: xdm._id, else the webhook-id header, else the SQS messageId",
    )
    show.add_argument("--full", action="store_true", help="include the stored request")
    show.set_defaults(func=cmd_show)
    rej = command("rejected", "list rejected events with their reasons")
    rej.add_argument(
        "--limit",
        type=_positive_int,
        default=100,
        help="list at most this many, the newest (default: 100; --json lists all)",
    )
    rej.add_argument(
        "--since",
        type=_since,
        help="only those stored since then: a time ago (30m, 2h, 7d) or an ISO 8601 time (2026-11-30T09:00Z; UTC "
        "unless it names an offset)",
    )
    rej.add_argument("--json", action="store_true", help="every one as JSON, without the stored requests")
    rej.add_argument(
        "--event-id", help="only this eventId's rejection and the events filed beside it (#reused-, #invalid-)"
    )
    rej.set_defaults(func=cmd_rejected)
    rep = command("replay", "send rejected events through the relay again (after a fix)")
    rep.add_argument("event_ids", nargs="*", metavar="EVENT_ID", help="the rejected events to send again")
    rep.add_argument(
        "--all-rejected", action="store_true", help="every event Edge rejected (not those the relay refused itself)"
    )
    rep.add_argument(
        "--to-datastream",
        type=_datastream_id,
        metavar="DATASTREAM_ID",
        help="send them to this datastream instead of the one Edge rejected them in (e.g. after fixing a wrong "
        "DATASTREAM_ID; with --all-rejected, name --from-datastream too); events the relay refused because the "
        "default datastream was left out of ALLOWED_DATASTREAM_IDS are then replayed too",
    )
    rep.add_argument(
        "--from-datastream",
        type=_datastream_id,
        metavar="DATASTREAM_ID",
        help="with --all-rejected: only those rejected in this datastream",
    )
    rep.add_argument(
        "--since",
        type=_since,
        help="with --all-rejected: only those stored since then (a time ago: 30m, 2h, 7d; or an ISO 8601 time, UTC "
        "unless it names an offset), e.g. the rejections of an incident, not older ones a replay would not fix",
    )
    rep.add_argument("--dry-run", action="store_true", help="say what a replay would do, send nothing")
    rep.set_defaults(func=cmd_replay)
    red = command("redrive", "move dead-letter messages back to the queue")
    red.add_argument("--max", type=_positive_int, default=1000, help="move at most this many (default: 1000)")
    red.set_defaults(func=cmd_redrive)
    fgt = command("forget", "erase what the table keeps about one identity (a person's erasure request)")
    fgt.add_argument("--namespace", required=True, help='its identityMap namespace as sent, e.g. "Email", "CRMID"')
    fgt.add_argument(
        "--id",
        required=True,
        metavar="VALUE",
        help='the identity value; "-" reads it from standard input (one line): prefer this for personal data, which '
        "on the command line is kept in the shell history and shown in the process list",
    )
    fgt.add_argument("--identity-key-secret", help="the identity key secret (default: $IDENTITY_KEY_SECRET_ID)")
    fgt.add_argument("--no-identity-key", action="store_true", help="the deployment has no identity key")
    fgt.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    fgt.set_defaults(func=cmd_forget)
    return parser


# botocore's errors for a client that cannot be set up on this machine (AWS was never called), and what to set.
_CREDENTIALS_HINT = "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; or log in: aws sso login"
_CLIENT_SETUP: tuple[tuple[type[BotoCoreError], str], ...] = (
    (NoRegionError, "set AWS_REGION or AWS_DEFAULT_REGION, or a profile with a region: AWS_PROFILE"),
    (NoCredentialsError, _CREDENTIALS_HINT),
    (PartialCredentialsError, _CREDENTIALS_HINT),
    (ProfileNotFound, "check AWS_PROFILE against `aws configure list-profiles`"),
)

_SIGPIPE_STATUS = 128 + 13  # what a shell reports for a process SIGPIPE ended


def _stdout_closed() -> int:
    """End (the caller says so on stderr) when the reader of stdout has gone (`relayctl rejected --json | head`).
    The recipe of the Python docs (https://docs.python.org/3/library/signal.html#note-on-sigpipe): point stdout at
    devnull, so that the interpreter's final flush of what is still buffered does not fail again, and exit. The
    recipe exits 1, which is relayctl's "not found / not all done": it exits 141 instead, as a shell reports a
    process SIGPIPE ended."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (replaced in-process): nothing to redirect
        pass
    finally:
        os.close(devnull)
    return _SIGPIPE_STATUS


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # as the recipe does: a closed pipe fails here, in the try, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # Said on stderr: a command stopped by it part-way (`forget`, `redrive`) may have done part of its work, and
        # 141 hides its own exit status. Unless stderr is gone too (`2>&-`, or `2>&1 | head`: the same closed pipe).
        try:
            if sys.stderr is not None:
                print(
                    f"relayctl: {args.command}: stopped, its output was closed (run it again to see or finish)",
                    file=sys.stderr,
                )
        except (OSError, ValueError):
            pass
        return _stdout_closed()
    except (ClientError, BotoCoreError) as exc:
        hint = next((hint for kind, hint in _CLIENT_SETUP if isinstance(exc, kind)), None)
        if hint:  # no region, no credentials, an unknown profile: a setup to fix here, not a refusal by AWS
            print(f"relayctl: AWS client not configured: {exc} ({hint})", file=sys.stderr)
        else:  # a wrong table or queue, or missing access: one line, not a traceback
            print(f"relayctl: AWS refused the call: {_aws_code(exc)}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
