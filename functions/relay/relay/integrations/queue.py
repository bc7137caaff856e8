"""The retry queue: where a webhook event goes when Edge is unavailable (contract §7, 202), and where an SQS record
Edge asked to be retried later waits out its `Retry-After`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from relay import codec
from relay.models import InboundEvent
from relay.observability import logger

# Edge's Retry-After is honoured up to 15 minutes on both paths: SQS's longest DelaySeconds for a webhook event that
# falls back to the queue, and the same bound for the visibility of an SQS record sent back.
MAX_RETRY_DELAY_S = 900
# The message attributes of the relay's own messages (and relayctl's): `relaySource` marks one, and only then are its
# `eventId` and this one read. This one keeps the `SentTimestamp` of the message an event first came in, which a
# redriven copy (a new message) would otherwise lose: its default `xdm.timestamp` must not change.
RELAY_SENT_TIMESTAMP = "relaySentTimestamp"
RELAY_SOURCE = "relaySource"
# On the relay's own message of an event whose `xdm.timestamp` the relay set (the sender gave none): the body carries
# that time, and reading it back the time is still the relay's, so the event's first attempt's time is adopted over
# it (`InboundEvent.stamp`, the claim's `xdmTimestamp`), as for a resend.
RELAY_DEFAULT_TIMESTAMP = "relayDefaultTimestamp"
_VISIBILITY_BATCH = 10  # ChangeMessageVisibilityBatch takes at most 10 entries


def queue_url_for(source_arn: str, known_url: str | None) -> str | None:
    """The URL of the queue an SQS record came from (`eventSourceARN` = arn:PARTITION:sqs:REGION:ACCOUNT:NAME):
    the configured retry queue's URL when it is that queue (the template wires them so), else the standard one."""
    parts = source_arn.split(":")
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sqs" or not all(parts[3:]):
        return None
    partition, region, account, name = parts[1], parts[3], parts[4], parts[5]
    if known_url and known_url.rstrip("/").split("/")[-2:] == [account, name]:
        return known_url
    domain = "amazonaws.com.cn" if partition == "aws-cn" else "amazonaws.com"
    return f"https://sqs.{region}.{domain}/{account}/{name}"


# The only characters compact UTF-8 JSON can hold raw that SQS refuses in a message (it allows #x9, #xA, #xD,
# #x20-#xD7FF, #xE000-#xFFFD, #x10000-#x10FFFF; JSON escapes the other controls, and lone surrogates never get here).
_SQS_REFUSED = str.maketrans({"\ufffe": "\\ufffe", "\uffff": "\\uffff"})


def message_body(request: dict[str, Any]) -> str:
    """The request as an SQS message body: the request as received, with `_id`/timestamp set, as compact UTF-8 JSON
    (escaping all non-ASCII would triple an emoji, and could push an accepted event past 64 KiB), with the two
    characters SQS refuses written as JSON escapes (they can only occur inside strings)."""
    return sqs_text(codec.dumps(request))


def sqs_text(text: str) -> str:
    """JSON text with the two characters SQS refuses in a message written as JSON escapes: the same document, since in
    JSON they can only stand inside strings (a body kept as the text it came as, which `relayctl replay` sends)."""
    return text.translate(_SQS_REFUSED)


class RetryQueue:
    def __init__(self, client: Any, queue_url: str | None) -> None:
        self._sqs = client
        self._url = queue_url

    def send(self, inbound: InboundEvent, *, delay_s: float | None = None) -> bool | None:
        """Enqueue the prepared request (stable `xdm._id`). True when sent; False when not (no queue, or SQS refused
        it: a 4xx); None when it may have been: no answer came (a timeout, a dropped connection) or SQS failed (a
        5xx), and SQS may have queued it all the same. Logged with why: the caller only knows the outcome."""
        if not self._url:
            logger.error("no retry queue: RETRY_QUEUE_URL is not set", eventId=inbound.event_id)
            return False
        try:
            self._sqs.send_message(
                QueueUrl=self._url,
                MessageBody=message_body(inbound.request),
                DelaySeconds=math.ceil(min(max(delay_s or 0, 0), MAX_RETRY_DELAY_S)),
                MessageAttributes={
                    "datastreamId": {"DataType": "String", "StringValue": inbound.datastream_id},
                    RELAY_SOURCE: {"DataType": "String", "StringValue": inbound.source},
                    "eventId": {"DataType": "String", "StringValue": inbound.event_id},
                    **(
                        {RELAY_DEFAULT_TIMESTAMP: {"DataType": "String", "StringValue": "true"}}
                        if inbound.default_timestamp
                        else {}
                    ),
                },
            )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code") or "ClientError"
            if int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 400) >= 500:
                logger.warning("the retry queue failed; the event may be queued", eventId=inbound.event_id, reason=code)
                return None
            logger.warning("the retry queue refused the event", eventId=inbound.event_id, reason=str(code))
            return False
        except BotoCoreError as exc:
            logger.warning("the retry queue could not be reached", eventId=inbound.event_id, reason=type(exc).__name__)
            return None
        return True

    def postpone(
        self, records: list[tuple[dict[str, Any], int]], *, time_for_a_call: Callable[[], bool] | None = None
    ) -> int:
        """Keep received SQS records invisible for the given seconds instead of the queue's visibility timeout
        (`ChangeMessageVisibilityBatch`, 10 to a call). Returns how many were postponed. A record that could not be
        postponed only comes back at the queue's own timeout, so failures are logged, never raised."""
        by_queue: dict[str, list[dict[str, Any]]] = {}
        for record, seconds in records:
            url = queue_url_for(str(record.get("eventSourceARN") or ""), self._url)
            handle = record.get("receiptHandle")
            if url is None or not handle:
                continue
            entry = {"Id": str(len(by_queue.get(url, []))), "ReceiptHandle": handle, "VisibilityTimeout": seconds}
            by_queue.setdefault(url, []).append(entry)
        done = 0
        for url, entries in by_queue.items():
            for start in range(0, len(entries), _VISIBILITY_BATCH):
                chunk = entries[start : start + _VISIBILITY_BATCH]
                if time_for_a_call is not None and not time_for_a_call():
                    # Each call may take the SQS client's worst case: stop while the invocation can still answer.
                    logger.warning(
                        "no time left to postpone more records; they return at the queue's timeout",
                        records=len(entries) - start,
                    )
                    return done
                try:
                    failed = self._sqs.change_message_visibility_batch(QueueUrl=url, Entries=chunk).get("Failed") or []
                    reason = str(failed[0].get("Code", "")) if failed else ""
                except (ClientError, BotoCoreError) as exc:
                    failed, reason = chunk, type(exc).__name__
                if failed:
                    logger.warning(
                        "records not postponed; they return at the queue's visibility timeout",
                        records=len(failed),
                        reason=reason,
                    )
                done += len(chunk) - len(failed)
        return done
