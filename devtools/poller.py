"""A local stand-in for the Lambda SQS event source mapping (with ReportBatchItemFailures).

It gathers up to ``batch_size`` messages within the batching window, builds the exact SQS event
Lambda sends, invokes the handler with a context whose deadline is the function timeout, and then
acknowledges records as AWS documents for partial batch responses:

* success (``None``, ``{}``, no or empty ``batchItemFailures``): every record is deleted;
* ``batchItemFailures`` listing valid message ids: all other records are deleted, the listed ones
  reappear after the visibility timeout;
* an exception, a timeout, an invalid response, or an ``itemIdentifier`` that is missing, empty or
  not in the batch: nothing is deleted (the whole batch is retried).

Dead-lettering after ``maxReceiveCount`` receives is done by the emulator (moto applies the queue's
RedrivePolicy on receive, like SQS).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devtools.lambda_context import new_context
from devtools.resources import DEFAULT_REGION, aws_client

Handler = Callable[[dict[str, Any], Any], Any]

SQS_RECEIVE_MAX = 10
MAX_INVOKE_PAYLOAD = 6 * 1024 * 1024  # Lambda's synchronous invocation payload limit
RECORD_ATTRIBUTES = (
    "ApproximateReceiveCount",
    "SentTimestamp",
    "SequenceNumber",
    "MessageGroupId",
    "SenderId",
    "MessageDeduplicationId",
    "ApproximateFirstReceiveTimestamp",
    "AWSTraceHeader",
    "DeadLetterQueueSourceArn",
)

logger = logging.getLogger("devtools.poller")


class InvalidBatchResponse(ValueError):
    """The handler's answer is not a valid partial batch response: the whole batch fails."""


@dataclass
class BatchOutcome:
    """What happened to one invocation's batch."""

    message_ids: list[str]
    deleted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    error: str | None = None


def record_from_message(message: dict[str, Any], queue_arn: str, region: str) -> dict[str, Any]:
    """Convert an SQS ``ReceiveMessage`` message into a Lambda SQS event record."""
    attributes = {k: message["Attributes"][k] for k in RECORD_ATTRIBUTES if k in message.get("Attributes", {})}
    msg_attrs: dict[str, Any] = {}
    for name, attr in (message.get("MessageAttributes") or {}).items():
        value: dict[str, Any] = {}
        if "StringValue" in attr:
            value["stringValue"] = attr["StringValue"]
        if "BinaryValue" in attr:
            value["binaryValue"] = base64.b64encode(attr["BinaryValue"]).decode("ascii")
        value["stringListValues"] = list(attr.get("StringListValues") or [])
        value["binaryListValues"] = [base64.b64encode(b).decode("ascii") for b in attr.get("BinaryListValues") or []]
        value["dataType"] = attr["DataType"]
        msg_attrs[name] = value
    record: dict[str, Any] = {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": attributes,
        "messageAttributes": msg_attrs,
        "md5OfBody": message["MD5OfBody"],
    }
    if "MD5OfMessageAttributes" in message:
        record["md5OfMessageAttributes"] = message["MD5OfMessageAttributes"]
    record.update({"eventSource": "aws:sqs", "eventSourceARN": queue_arn, "awsRegion": region})
    return record


def failed_ids(result: Any, batch_ids: list[str]) -> list[str]:
    """The message ids a partial batch response asks to retry.

    Raises
    ------
    InvalidBatchResponse
        When Lambda would treat the batch as a complete failure.
    """
    try:
        json.dumps(result)
    except (TypeError, ValueError) as err:
        raise InvalidBatchResponse(f"response is not JSON: {err}") from err
    if result is None:
        return []
    if not isinstance(result, dict):
        raise InvalidBatchResponse(f"response is a {type(result).__name__}, not an object")
    failures = result.get("batchItemFailures")
    if failures is None:
        return []
    if not isinstance(failures, list):
        raise InvalidBatchResponse("batchItemFailures is not a list")
    known = set(batch_ids)
    ids: list[str] = []
    for item in failures:
        if not isinstance(item, dict) or "itemIdentifier" not in item:
            raise InvalidBatchResponse(f"invalid batch item failure {item!r}")
        ident = item["itemIdentifier"]
        if not isinstance(ident, str) or not ident or ident not in known:
            raise InvalidBatchResponse(f"itemIdentifier {ident!r} is empty or not in the batch")
        if ident not in ids:
            ids.append(ident)
    return ids


class QueuePoller:
    """Poll ``queue_url`` and invoke ``handler`` like the Lambda SQS event source mapping.

    Parameters
    ----------
    handler:
        The Lambda handler (any callable ``(event, context)``).
    sqs:
        A boto3 SQS client, or the emulator's endpoint URL.
    batch_size, batching_window, function_timeout:
        As configured on the event source mapping and the function (read them from the template).
    failure_visibility_timeout:
        When set, failed records are made visible again after this many seconds instead of the
        queue's visibility timeout (keeps redelivery tests fast). This overrides any visibility the
        handler set itself (a record postponed for Edge's `Retry-After`); leave it None to see that.
    report_batch_item_failures:
        ``FunctionResponseTypes: [ReportBatchItemFailures]``; without it a successful invocation
        deletes the whole batch whatever it returns.
    wait_time_seconds:
        Long-poll time of the first ReceiveMessage of a batch.
    """

    def __init__(
        self,
        handler: Handler,
        sqs: Any,
        queue_url: str,
        queue_arn: str,
        *,
        batch_size: int,
        batching_window: float,
        function_timeout: float,
        region: str = DEFAULT_REGION,
        failure_visibility_timeout: int | None = None,
        report_batch_item_failures: bool = True,
        wait_time_seconds: int = 1,
    ) -> None:
        self.handler = handler
        self.sqs = aws_client("sqs", sqs, region) if isinstance(sqs, str) else sqs
        self.queue_url = queue_url
        self.queue_arn = queue_arn
        self.batch_size = batch_size
        self.batching_window = batching_window
        self.function_timeout = function_timeout
        self.region = region
        self.failure_visibility_timeout = failure_visibility_timeout
        self.report_batch_item_failures = report_batch_item_failures
        self.wait_time_seconds = wait_time_seconds
        self.history: list[BatchOutcome] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = threading.Lock()
        # pending() callers waiting for `_busy`: the polling thread lets them in before its next poll. A Lock is not
        # fair, and a thread that releases it and takes it again at once nearly always wins; the soak's progress
        # loop once waited 94 s for one count while this poller long-polled an empty queue over and over.
        self._counting = 0
        self._counted = threading.Condition()

    # ------------------------------------------------------------------------------------ polling

    def _receive(self, wait: int) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.batching_window
        payload = 0
        first = True
        while len(messages) < self.batch_size:
            resp = self.sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(SQS_RECEIVE_MAX, self.batch_size - len(messages)),
                WaitTimeSeconds=wait if first and wait > 0 else 0,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            )
            first = False
            got = resp.get("Messages") or []
            messages.extend(got)
            payload += sum(len(m["Body"].encode("utf-8")) for m in got)
            if payload >= MAX_INVOKE_PAYLOAD or time.monotonic() >= deadline:
                break
            if not got:
                if not messages:
                    break
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return messages

    def poll_once(self, wait_time_seconds: int | None = None) -> int:
        """Receive one batch, invoke the handler once, acknowledge; return the number of records."""
        with self._busy:
            wait = self.wait_time_seconds if wait_time_seconds is None else wait_time_seconds
            messages = self._receive(wait)
            if not messages:
                return 0
            self._invoke(messages)
            return len(messages)

    def _invoke(self, messages: list[dict[str, Any]]) -> None:
        event = {"Records": [record_from_message(m, self.queue_arn, self.region) for m in messages]}
        ids = [m["MessageId"] for m in messages]
        outcome = BatchOutcome(message_ids=ids)
        started = time.monotonic()
        try:
            result = self.handler(event, new_context(self.function_timeout))
            if time.monotonic() - started > self.function_timeout:
                raise TimeoutError(f"invocation exceeded the function timeout ({self.function_timeout}s)")
            outcome.failed = failed_ids(result, ids) if self.report_batch_item_failures else []
        except Exception as err:  # the whole batch is retried, as Lambda does
            logger.warning("batch of %d failed as a whole: %s", len(ids), err, exc_info=True)
            outcome.error = f"{type(err).__name__}: {err}"
            outcome.failed = list(ids)
        failed = set(outcome.failed)
        to_delete = [m for m in messages if m["MessageId"] not in failed]
        outcome.deleted = self._delete(to_delete)
        if self.failure_visibility_timeout is not None:
            self._change_visibility([m for m in messages if m["MessageId"] in failed], self.failure_visibility_timeout)
        self.history.append(outcome)

    def _delete(self, messages: list[dict[str, Any]]) -> list[str]:
        deleted: list[str] = []
        for i in range(0, len(messages), SQS_RECEIVE_MAX):
            chunk = messages[i : i + SQS_RECEIVE_MAX]
            entries = [{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(chunk)]
            resp = self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=entries)
            for ok in resp.get("Successful") or []:
                deleted.append(chunk[int(ok["Id"])]["MessageId"])
            for bad in resp.get("Failed") or []:
                logger.warning("delete failed for %s: %s", chunk[int(bad["Id"])]["MessageId"], bad.get("Message"))
        return deleted

    def _change_visibility(self, messages: list[dict[str, Any]], timeout: int) -> None:
        for i in range(0, len(messages), SQS_RECEIVE_MAX):
            chunk = messages[i : i + SQS_RECEIVE_MAX]
            entries = [
                {"Id": str(n), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": timeout}
                for n, m in enumerate(chunk)
            ]
            self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=entries)

    # ------------------------------------------------------------------------------------ lifecycle

    def pending(self) -> int:
        """Messages visible, in flight or delayed in the queue (SQS's approximate counts).

        Time moves a message only towards visible (delayed or in flight, then visible), so the delayed and in-flight
        counts are read first and the visible count after, in a second request, while none of this poller's receives
        runs. One request for all three can miss a message: moto computes them one after another, and a message
        whose visibility timeout ends in between counts as neither "visible" (read first) nor "not visible".
        """
        with self._counted:
            self._counting += 1
        try:
            with self._busy:
                hidden = self._counts("ApproximateNumberOfMessagesDelayed", "ApproximateNumberOfMessagesNotVisible")
                return hidden + self._counts("ApproximateNumberOfMessages")
        finally:
            with self._counted:
                self._counting -= 1
                self._counted.notify_all()

    def _counts(self, *names: str) -> int:
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=list(names))["Attributes"]
        return sum(int(attrs.get(name, 0)) for name in names)

    def drain(self, timeout: float, *, raise_on_timeout: bool = False) -> None:
        """Process until the queue has no visible, in-flight or delayed messages, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.running:
                time.sleep(0.1)
            elif self.poll_once(wait_time_seconds=0):
                continue
            if self.pending() == 0:
                return
            if not self.running:
                time.sleep(0.1)
        if raise_on_timeout:
            raise TimeoutError(f"queue not drained within {timeout}s ({self.pending()} messages left)")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> QueuePoller:
        if self.running:
            return self
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sqs-poller", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._counted:  # a count asked for meanwhile goes first (bounded: a count is two requests)
                self._counted.wait_for(lambda: self._counting == 0, timeout=5.0)
            try:
                self.poll_once()
            except Exception:
                if self._stop.is_set():
                    break
                logger.exception("poll failed")
                self._stop.wait(1.0)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None

    def __enter__(self) -> QueuePoller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
