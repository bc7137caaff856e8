"""``make soak``: relay many events through the local stack while Edge and DynamoDB fail, then account for each.

What runs (all on loopback, in this process except moto):

* the Edge/IMS simulator with chaos (429/503 with a small ``Retry-After``, 502, 504, answers slower than the
  relay's read timeout, dropped connections) on about ``--fault-rate`` of the Edge calls;
* moto, behind :mod:`devtools.fault_proxy` which refuses ``--ddb-fault-rate`` of the DynamoDB writes
  (throughput exceeded / internal error, some in bursts as long as botocore's 6 attempts) and answers
  ``--ddb-partial-rate`` of the batch calls in part (unprocessed items and keys, throttled statements);
* the real handler code: a few :class:`relay.runtime.Runtime` objects, one per simulated execution
  environment: a small pool behind the local HTTP API gateway and one per SQS poller;
* webhook senders (threads, signed requests, retrying 409/503/5xx with the same ``webhook-id`` like a
  Standard Webhooks sender) and an SQS producer (``SendMessageBatch``), with deliberate duplicates
  (the same eventId again through either trigger), a few invalid bodies and a few events without a
  primary identity (Edge rejects them with EXEG-0306-400).

After the queue drains, every generated eventId is looked up (its ``EVENT#<id>``/``RESULT`` item, the
dead-letter queue, the queue) and classified. The table printed at the end is what ``docs/soak.md``
records. Exit status 1 when any expectation fails (:attr:`SoakReport.failures`): an event missing, in another state
than its kind's (a valid one not delivered, an invalid one not rejected, a poison one not dead-lettered), with a final
item and a message still in a queue, a rejection without a reason, a duplicated eventId without one final item, a
stray result item, an event still in the queue, a drain that timed out, or Edge answering 200 twice for one event
for a reason other than a lost answer (timeout), a DynamoDB failure after the answer, or an invocation that outlived
the function timeout (a stalled machine: Lambda would have ended it). Those three are expected: at-least-once, under
one ``xdm._id`` (which Profile dedupes; Analytics and the data lake count a repeat again).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import heapq
import json
import logging
import os
import platform
import queue
import random
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import requests

from devtools.fault_proxy import WRITE_OPERATIONS, FaultProxy
from devtools.lambda_context import new_context
from devtools.signing import sign_webhook
from devtools.stack import ROOT, LocalStack, decode_item, stop_on_sigterm

LOG_DIR = ROOT / ".local"
INVALID_EVENT_TYPE_SUFFIX = "/invalid-event"
WEBHOOK_FINAL = frozenset({200, 202, 400, 401, 413, 422, 502})  # a sender stops on these
WEBHOOK_RETRY = frozenset({0, 409, 429, 500, 503, 504})  # ...and retries these later with the same webhook-id


# --------------------------------------------------------------------------------------------------- configuration


@dataclass
class SoakConfig:
    events: int = 10_000
    seed: int = 1
    fault_rate: float = 0.2  # Edge calls answered with a fault by the simulator
    ddb_fault_rate: float = 0.02  # DynamoDB writes refused by the fault proxy
    ddb_burst_share: float = 0.1  # of those, the share that starts a burst on the same item
    ddb_burst_length: int = 6  # the fault and 5 more: botocore's 6 attempts (max_attempts 5 counts retries)
    ddb_partial_rate: float = 0.3  # batch calls (BatchWriteItem, BatchGetItem, BatchExecuteStatement) done in part
    webhook_share: float = 0.5
    duplicates: float = 0.05  # extra sends of an already generated eventId, as a share of `events`
    invalid: float = 0.01  # bodies that are not JSON or have no event.xdm
    no_identity: float = 0.01  # valid bodies without a primary identity (Edge: EXEG-0306-400)
    without_id: float = 0.1  # valid bodies without xdm._id (eventId = webhook-id / SQS messageId)
    poison: int = 5  # valid events Edge always answers 502 for: they must end in the dead-letter queue
    poison_shared_identity: bool = False  # poison events keep a popular identity (shows head-of-line blocking)
    identities: int = 500
    webhook_senders: int = 12
    gateway_runtimes: int = 8  # execution environments behind the gateway (each serializes its webhooks)
    pollers: int = 3  # SQS pollers, one execution environment each
    batch_concurrency: int = 8
    edge_read_timeout_ms: int = 400
    slow_delay: float = 0.8  # > the read timeout: the relay gives up on these answers
    retry_after_max: int = 1
    webhook_max_attempts: int = 40
    drain_timeout: float = 900.0
    send_timeout: float = 1800.0
    progress: bool = True


# --------------------------------------------------------------------------------------------------- the events


@dataclass
class Send:
    """One delivery attempt by a producer (a webhook POST, retried by its sender, or one SQS message)."""

    index: int
    kind: str  # valid | no_primary | poison | invalid_json | invalid_no_xdm
    trigger: str  # webhook | sqs
    body: bytes
    event_id: str | None  # None until SQS assigns the messageId (bodies without xdm._id)
    webhook_id: str | None = None
    duplicate: bool = False
    answers: list[int] = field(default_factory=list)  # webhook statuses, in order
    message_id: str | None = None


def _identity(rng: random.Random, n: int) -> dict[str, Any]:
    """A realistic identityMap for identity ``n``: ECID, hashed email or CRM id as primary, sometimes a second id."""
    flavour = n % 3
    if flavour == 0:
        ecid = f"{(n * 7919 + 12345678901234567) % 10**38:038d}"
        primary = {"ECID": [{"id": ecid, "primary": True, "authenticatedState": "ambiguous"}]}
    elif flavour == 1:
        primary = {"Email_LC_SHA256": [{"id": f"{n:064x}", "primary": True, "authenticatedState": "authenticated"}]}
    else:
        primary = {"CRMID": [{"id": f"crm-{n:06d}", "primary": True, "authenticatedState": "authenticated"}]}
    if rng.random() < 0.3:
        primary.setdefault("Phone", [{"id": f"+1555{n:07d}", "primary": False}])
    return primary


def _valid_body(rng: random.Random, event_id: str | None, identity: dict[str, Any] | None, i: int) -> bytes:
    xdm: dict[str, Any] = {"eventType": rng.choice(("commerce.purchases", "web.webpagedetails.pageViews", "signup"))}
    if event_id is not None:
        xdm["_id"] = event_id
    if identity is not None:
        xdm["identityMap"] = identity
    if rng.random() < 0.5:
        xdm["timestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    if xdm["eventType"] == "commerce.purchases":
        xdm["commerce"] = {"purchases": {"value": 1}, "order": {"priceTotal": round(rng.uniform(5, 500), 2)}}
    doc: dict[str, Any] = {"event": {"xdm": xdm, "data": {"soak": {"n": i}}}}
    if rng.random() < 0.5:
        doc["query"] = {"identity": {"fetch": ["ECID"]}}
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def plan_sends(cfg: SoakConfig) -> list[Send]:
    """The generated events plus their duplicates, shuffled (deterministic for a seed)."""
    rng = random.Random(cfg.seed)
    identities = [_identity(rng, n) for n in range(cfg.identities)]
    sends: list[Send] = []
    for i in range(cfg.events):
        trigger = "webhook" if rng.random() < cfg.webhook_share else "sqs"
        webhook_id = f"msg_soak{cfg.seed}x{i:07d}" if trigger == "webhook" else None
        roll = rng.random()
        if roll < cfg.invalid:
            kind = rng.choice(("invalid_json", "invalid_no_xdm"))
            body = (
                b'{"event": {"xdm": {"_id": "broken' + str(i).encode() + b'"'
                if kind == "invalid_json"
                else json.dumps({"event": {"data": {"n": i}}}).encode()
            )
            sends.append(Send(i, kind, trigger, body, webhook_id, webhook_id))  # eventId: webhook-id / messageId
            continue
        kind = "no_primary" if roll < cfg.invalid + cfg.no_identity else "valid"
        has_id = rng.random() >= cfg.without_id
        event_id = f"soak-{cfg.seed}-{i:07d}" if has_id else None
        identity = None if kind == "no_primary" else identities[int(rng.paretovariate(1.2) * 7) % cfg.identities]
        if kind == "no_primary" and rng.random() < 0.5:  # an identityMap, but nothing marked primary
            identity = {"CRMID": [{"id": f"crm-anon-{i}", "primary": False}]}
        body = _valid_body(rng, event_id, identity, i)
        sends.append(Send(i, kind, trigger, body, event_id or webhook_id, webhook_id))
    # Poison: Edge keeps failing them (a fault rule per xdm._id); after 5 receives they belong in the DLQ.
    valid_with_id = [s for s in sends if s.kind == "valid" and s.event_id and s.event_id.startswith("soak-")]
    for send in rng.sample(valid_with_id, min(cfg.poison, len(valid_with_id))):
        send.kind = "poison"
        if not cfg.poison_shared_identity:  # an identity of its own: see docs/soak.md, head-of-line blocking
            own = {"CRMID": [{"id": f"crm-poison-{send.index}", "primary": True}]}
            send.body = _valid_body(rng, send.event_id, own, send.index)
    # Duplicates: the same eventId (xdm._id) again, through either trigger (a webhook duplicate is a new delivery).
    with_id = [s for s in sends if s.kind in ("valid", "no_primary") and s.event_id and s.event_id.startswith("soak-")]
    for n in range(min(len(with_id), round(cfg.events * cfg.duplicates))):
        original = rng.choice(with_id)
        trigger = "webhook" if rng.random() < cfg.webhook_share else "sqs"
        webhook_id = f"msg_soak{cfg.seed}d{n:07d}" if trigger == "webhook" else None
        sends.append(Send(original.index, original.kind, trigger, original.body, original.event_id, webhook_id, True))
    rng.shuffle(sends)
    return sends


# --------------------------------------------------------------------------------------------------- instrumentation


def _xdm_id(data: Any) -> str | None:
    try:
        doc = json.loads(data)
        value = doc["event"]["xdm"]["_id"]
    except (ValueError, TypeError, KeyError):
        return None
    return value if isinstance(value, str) else None


def _invocation_event_ids(event: dict[str, Any]) -> set[str]:
    """Every id an invocation's events may go to Edge under: ``xdm._id``, else the webhook-id or SQS messageId."""
    ids: set[str] = set()
    records = event.get("Records")
    if isinstance(records, list):  # SQS
        for record in records:
            attr = ((record.get("messageAttributes") or {}).get("eventId") or {}).get("stringValue")
            found = (attr, _xdm_id(record.get("body") or ""), record.get("messageId"))
            ids.update(c for c in found if isinstance(c, str) and c)
        return ids
    body = event.get("body") or ""
    if event.get("isBase64Encoded"):
        body = base64.b64decode(body)
    headers = {str(k).lower(): v for k, v in (event.get("headers") or {}).items()}
    candidates = (_xdm_id(body), headers.get("webhook-id"))
    ids.update(c for c in candidates if isinstance(c, str) and c)
    return ids


class Tracer:
    """What the relay itself saw: Edge answers per xdm._id, and DynamoDB writes that failed after an Edge 200.

    Fed by :class:`TracingSession` (the Runtime's HTTP session) and botocore event hooks on the Runtime's
    DynamoDB client, so it observes the unmodified relay code from outside.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self.client_ok: Counter[str] = Counter()  # Edge 200/207 answers the relay received, per xdm._id
        self.client_errors: Counter[str] = Counter()  # timeouts and connection failures, by exception type
        self.ddb_failed_after_ok: Counter[str] = Counter()  # per xdm._id: a result/state write failed after a 200
        self.ddb_failed_writes: Counter[str] = Counter()  # writes that failed after botocore's retries, by operation
        self._unprocessed: set[str] = set()  # eventIds whose result the last BatchWriteItem with it left unprocessed
        self.results_unprocessed = 0  # results left unprocessed for good: the event's next Edge call came first
        self.overran: Counter[str] = Counter()  # per event id: invocations with it that outlived the function timeout
        self.overran_invocations = 0
        self.longest_invocation = 0.0

    def timed(self, handler: Callable[[dict[str, Any], Any], Any], timeout_s: float) -> Callable[[Any, Any], Any]:
        """``handler``, noting every invocation that ran longer than the function timeout, and the ids it carried.

        Lambda ends such an invocation, and its records come back: an Edge call made again for one of them is the
        at-least-once redelivery the contract allows. Here nothing ends it (threads cannot be stopped), so a stalled
        machine lets its lease lapse while it still works, and the event's next attempt calls Edge again.
        """

        def invoke(event: dict[str, Any], context: Any) -> Any:
            started = time.monotonic()
            try:
                return handler(event, context)
            finally:
                took = time.monotonic() - started
                with self._lock:
                    self.longest_invocation = max(self.longest_invocation, took)
                    if took > timeout_s:
                        self.overran_invocations += 1
                        self.overran.update(_invocation_event_ids(event))

        return invoke

    def edge_call(self, xdm_id: str | None) -> None:
        self._local.last_ok = None
        if xdm_id:
            with self._lock:
                if xdm_id in self._unprocessed:  # its result was never written: the record came back for it
                    self._unprocessed.discard(xdm_id)
                    self.results_unprocessed += 1
                    if self.client_ok.get(xdm_id):
                        self.ddb_failed_after_ok[xdm_id] += 1

    def edge_answer(self, xdm_id: str | None, status: int) -> None:
        if status in (200, 207) and xdm_id:
            self._local.last_ok = xdm_id
            with self._lock:
                self.client_ok[xdm_id] += 1

    def edge_error(self, exc: BaseException) -> None:
        with self._lock:
            self.client_errors[type(exc).__name__] += 1

    def instrument_dynamodb(self, client: Any) -> None:
        client.meta.events.register("before-parameter-build.dynamodb", self._remember_key)
        client.meta.events.register("after-call.dynamodb", self._after_call)

    @staticmethod
    def _remember_key(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        key = params.get("Key") or params.get("Item") or {}
        pk = key.get("pk") if isinstance(key, dict) else None
        context["soak_pk"] = next(iter(pk.values()), "") if isinstance(pk, dict) and pk else ""
        # A BatchWriteItem of results: every event it carries
        writes = [w for ws in (params.get("RequestItems") or {}).values() for w in ws]
        context["soak_batch_pks"] = [str(w["PutRequest"]["Item"]["pk"]["S"]) for w in writes if "PutRequest" in w]

    def _after_call(self, http_response: Any, parsed: dict[str, Any], model: Any, context: Any, **_: Any) -> None:
        if http_response is None or model.name not in WRITE_OPERATIONS:
            return
        if http_response.status_code < 300:
            if model.name == "BatchWriteItem":
                self._note_unprocessed((context or {}).get("soak_batch_pks") or [], parsed)
            return
        if (parsed.get("Error") or {}).get("Code") == "ConditionalCheckFailedException":
            return
        pk = str((context or {}).get("soak_pk", ""))
        last_ok = getattr(self._local, "last_ok", None)
        with self._lock:
            self.ddb_failed_writes[model.name] += 1
            for batch_pk in (context or {}).get("soak_batch_pks") or []:
                event_id = batch_pk.removeprefix("EVENT#")
                if self.client_ok.get(event_id):  # a result written after its Edge 200, in a batch that failed
                    self.ddb_failed_after_ok[event_id] += 1
            if last_ok and (pk == f"EVENT#{last_ok}" or pk.startswith("IDENTITY#")):
                self.ddb_failed_after_ok[last_ok] += 1

    def _note_unprocessed(self, batch_pks: list[str], parsed: dict[str, Any]) -> None:
        """After a BatchWriteItem answered 200: which of its results it left unprocessed (the relay sends those again,
        or fails their records: a result still unprocessed when its event next calls Edge was given up)."""
        left = {
            str(w["PutRequest"]["Item"]["pk"]["S"])
            for writes in (parsed.get("UnprocessedItems") or {}).values()
            for w in writes
            if "PutRequest" in w
        }
        with self._lock:
            for batch_pk in batch_pks:
                event_id = batch_pk.removeprefix("EVENT#")
                if batch_pk in left:
                    self._unprocessed.add(event_id)
                else:
                    self._unprocessed.discard(event_id)


class TracingSession(requests.Session):
    """The relay's Edge/IMS session (``relay.runtime.configure_http_session``), observed."""

    def __init__(self, tracer: Tracer, pool_size: int) -> None:
        from relay.runtime import configure_http_session

        super().__init__()
        self._tracer = tracer
        configure_http_session(self, pool_size)  # exactly the relay's session settings

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        # Every call ends here: the relay sends its Edge calls as prepared requests; IMS's `post` comes through too.
        if "/interact" not in str(request.url):
            return super().send(request, **kwargs)
        xdm_id = _xdm_id(request.body)
        self._tracer.edge_call(xdm_id)
        try:
            resp = super().send(request, **kwargs)
        except requests.RequestException as exc:
            self._tracer.edge_error(exc)
            raise
        self._tracer.edge_answer(xdm_id, resp.status_code)
        return resp


class RuntimePool:
    """Gateway handler: each request takes a free execution environment (a Runtime), like Lambda concurrency."""

    def __init__(self, handlers: list[Callable[[dict[str, Any], Any], Any]], function_timeout: float) -> None:
        self._free: queue.Queue[Callable[[dict[str, Any], Any], Any]] = queue.Queue()
        for handler in handlers:
            self._free.put(handler)
        self._timeout = function_timeout

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        handler = self._free.get()
        try:
            return handler(event, new_context(self._timeout))  # the clock starts when an environment runs it
        finally:
            self._free.put(handler)


# --------------------------------------------------------------------------------------------------- producers


class WebhookSenders:
    """``n`` sender threads POSTing signed webhooks; 409/503/5xx/connection errors are retried later, same id."""

    def __init__(self, url: str, secret: str, sends: list[Send], cfg: SoakConfig) -> None:
        self._url = url + "/events"
        self._secret = secret
        self._fresh = list(reversed(sends))
        self._total = len(sends)
        self._cfg = cfg
        self._retry: list[tuple[float, int, Send]] = []
        self._cond = threading.Condition()
        self._in_flight = 0
        self._seq = 0
        self.done = 0
        self.answers: Counter[int] = Counter()
        self.gave_up: list[Send] = []
        self._threads = [
            threading.Thread(target=self._work, name=f"soak-webhook-{i}", daemon=True)
            for i in range(cfg.webhook_senders)
        ]
        self._deadline = time.monotonic() + cfg.send_timeout

    def start(self) -> WebhookSenders:
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def progress(self) -> float:
        return self.done / self._total if self._total else 1.0

    def _next(self) -> Send | None:
        with self._cond:
            while time.monotonic() < self._deadline:
                now = time.monotonic()
                if self._retry and self._retry[0][0] <= now:
                    job = heapq.heappop(self._retry)[2]
                elif self._fresh:
                    job = self._fresh.pop()
                elif self._retry:
                    self._cond.wait(min(1.0, self._retry[0][0] - now))
                    continue
                elif self._in_flight:
                    self._cond.wait(1.0)
                    continue
                else:
                    return None
                self._in_flight += 1
                return job
            return None

    def _finish(self, job: Send, retry_in: float | None) -> None:
        with self._cond:
            self._in_flight -= 1
            if retry_in is None:
                self.done += 1
            else:
                self._seq += 1
                heapq.heappush(self._retry, (time.monotonic() + retry_in, self._seq, job))
            self._cond.notify_all()

    def _work(self) -> None:
        with requests.Session() as session:
            while (job := self._next()) is not None:
                assert job.webhook_id is not None
                headers = {
                    "content-type": "application/json",
                    **sign_webhook(job.body, self._secret, msg_id=job.webhook_id),
                }
                retry_after = 1.0
                try:
                    resp = session.post(self._url, data=job.body, headers=headers, timeout=(5, 60))
                    status = resp.status_code
                    with contextlib.suppress(TypeError, ValueError):
                        retry_after = min(float(resp.headers.get("Retry-After", "1")), 5.0)
                except requests.RequestException:
                    status = 0
                job.answers.append(status)
                with self._cond:
                    self.answers[status] += 1
                if status in WEBHOOK_FINAL or status not in WEBHOOK_RETRY:
                    self._finish(job, None)
                elif len(job.answers) >= self._cfg.webhook_max_attempts:
                    with self._cond:
                        self.gave_up.append(job)
                    self._finish(job, None)
                else:
                    self._finish(job, retry_after * (0.5 + random.random()))  # jittered, like a real sender


class SqsProducer(threading.Thread):
    """Sends SQS events in batches of 10, paced to keep pace with the webhook senders so both triggers mix."""

    def __init__(self, sqs: Any, queue_url: str, sends: list[Send], pace: Callable[[], float]) -> None:
        super().__init__(name="soak-sqs", daemon=True)
        self._sqs, self._url, self._sends, self._pace = sqs, queue_url, sends, pace
        self.sent = 0
        self.failed: list[Send] = []
        self.stop = threading.Event()

    def run(self) -> None:
        total = len(self._sends)
        for start in range(0, total, 10):
            while total and start / total > self._pace() + 0.02 and not self.stop.wait(0.05):
                pass
            if self.stop.is_set():
                return
            chunk = self._sends[start : start + 10]
            entries = [{"Id": str(n), "MessageBody": s.body.decode("utf-8")} for n, s in enumerate(chunk)]
            for attempt in range(5):
                try:
                    resp = self._sqs.send_message_batch(QueueUrl=self._url, Entries=entries)
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    time.sleep(0.5)
            for ok in resp.get("Successful") or []:
                send = chunk[int(ok["Id"])]
                send.message_id = ok["MessageId"]
                if send.event_id is None:
                    send.event_id = ok["MessageId"]  # contract §2: no xdm._id -> the messageId
                self.sent += 1
            for bad in resp.get("Failed") or []:
                self.failed.append(chunk[int(bad["Id"])])


# --------------------------------------------------------------------------------------------------- the report


@dataclass
class SoakReport:
    rows: list[tuple[str, str]]
    missing: list[str]
    other_duplicates: dict[str, int]
    rejected_without_reason: list[str]
    duplicate_ids_without_one_result: list[str]
    unexpected: list[str]
    stray_results: list[str]
    counts: dict[str, Any]
    in_two_places: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        """What fails the run: every expectation the table states, not only a missing event."""
        checks = [
            (self.missing, "events missing"),
            (self.other_duplicates, "unexplained duplicate Edge calls"),
            (self.unexpected, "events in another state than their kind's"),
            (self.in_two_places, "events with a final item and a message still in a queue"),
            (self.rejected_without_reason, "rejections without a stored reason"),
            (self.duplicate_ids_without_one_result, "duplicated eventIds without one final item"),
            (self.stray_results, "stray result items"),
            (self.counts.get("queue"), "events still in the queue"),
            (not self.counts.get("drained", True), "the queue was not drained in time"),
        ]
        return [what for found, what in checks if found]

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        width = max(len(label) for label, _ in self.rows)
        lines = []
        for label, value in self.rows:
            if label.startswith("--"):
                lines.append(label.ljust(width + 2) + value)
            else:
                lines.append(f"{label.ljust(width)}  {value}")
        return "\n".join(lines)


def _reason(item: dict[str, Any]) -> str | None:
    error = item.get("error")
    if not isinstance(error, dict):
        return None
    etype = str(error.get("type") or "")
    if etype.endswith(INVALID_EVENT_TYPE_SUFFIX):
        paths = sorted({str(e.get("path")) for e in error.get("errors") or [] if isinstance(e, dict)})
        return f"validation ({', '.join(paths)})" if paths else None
    code = etype.rsplit("/", 1)[-1]
    title = str(error.get("title") or "")
    if not code and not title:
        return None
    return f"Edge {code} {title}".strip()


def _drain_queue(sqs: Any, url: str, limit: int) -> list[dict[str, Any]]:
    """Receive (and hide) every message of a queue, at most ``limit``."""
    out: list[dict[str, Any]] = []
    empty = 0
    while len(out) < limit and empty < 2:
        resp = sqs.receive_message(
            QueueUrl=url,
            MaxNumberOfMessages=10,
            VisibilityTimeout=3600,
            WaitTimeSeconds=0,
            MessageAttributeNames=["All"],
            AttributeNames=["All"],
        )
        got = resp.get("Messages") or []
        empty = 0 if got else empty + 1
        out.extend(got)
    return out


def _message_event_id(message: dict[str, Any]) -> str:
    attr = (message.get("MessageAttributes") or {}).get("eventId") or {}
    if attr.get("StringValue"):
        return str(attr["StringValue"])
    return _xdm_id(message.get("Body") or "") or str(message["MessageId"])


def _scan_results(ddb: Any, table: str) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    paginator = ddb.get_paginator("scan")
    for page in paginator.paginate(
        TableName=table,
        FilterExpression="begins_with(pk, :p) AND sk = :r",
        ExpressionAttributeValues={":p": {"S": "EVENT#"}, ":r": {"S": "RESULT"}},
        ConsistentRead=True,
    ):
        for raw in page.get("Items") or []:
            item = decode_item(raw)
            results[str(item["pk"])[len("EVENT#") :]] = item
    return results


def account(
    cfg: SoakConfig,
    sends: list[Send],
    *,
    results: dict[str, dict[str, Any]],
    dlq: list[dict[str, Any]],
    left: list[dict[str, Any]],
    edge_log: list[dict[str, Any]],
    sim_stats: dict[str, Any],
    tracer: Tracer,
    proxy_stats: dict[str, Any],
    webhook_answers: Counter[int],
    gave_up: list[Send],
    unsent: list[Send],
    duration: float,
    drained: bool,
    function_timeout: float,
) -> SoakReport:
    expected: dict[str, str] = {}  # eventId -> kind of its first generated send
    by_trigger: Counter[str] = Counter()
    dup_sends: Counter[str] = Counter()
    duplicate_ids: set[str] = set()
    for send in sends:
        if send.event_id is None:
            continue  # never sent (counted in `unsent`)
        if send.duplicate:
            dup_sends[send.trigger] += 1
            duplicate_ids.add(send.event_id)
            continue
        by_trigger[send.trigger] += 1
        expected.setdefault(send.event_id, send.kind)
    generated = sum(1 for s in sends if not s.duplicate)
    dlq_ids = Counter(_message_event_id(m) for m in dlq)
    left_ids = Counter(_message_event_id(m) for m in left)

    outcome: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    missing: list[str] = []
    no_reason: list[str] = []
    unexpected: list[str] = []
    for event_id, kind in expected.items():
        item = results.get(event_id)
        status = item.get("status") if item else None
        if status in ("delivered", "rejected"):
            assert item is not None
            outcome[status] += 1
            if status == "rejected":
                reason = _reason(item)
                reasons[reason or "(no reason stored)"] += 1
                if reason is None:
                    no_reason.append(event_id)
            want = {"valid": "delivered", "poison": "dlq"}.get(kind, "rejected")
            if status != want:
                unexpected.append(f"{event_id}: {kind} ended {status} ({_reason(item) if item else ''})")
        elif event_id in dlq_ids:
            outcome["dlq"] += 1
            if kind != "poison":
                # What the table says of it tells how it got there: `queued` (handed back, then failed every
                # receive), `pending` (a claim never given back, so each receive found it busy until its lease
                # lapsed), or nothing (never claimed).
                held = f"item {status or 'none'}"
                if item and item.get("lastError"):
                    held += f", lastError {str(item['lastError'])[:120]!r}"
                twin = "; its eventId was also sent again" if event_id in duplicate_ids else ""
                unexpected.append(f"{event_id}: {kind} ended in the dead-letter queue ({held}{twin})")
        elif event_id in left_ids:
            outcome["queue"] += 1
        else:
            outcome["missing"] += 1
            missing.append(f"{event_id} ({kind}; item status {status or 'none'})")
    dup_without_one = [
        e
        for e in sorted(duplicate_ids)
        if results.get(e, {}).get("status") not in ("delivered", "rejected") and e not in dlq_ids and e not in left_ids
    ]
    # An event ends in one state: one with a final item must not also have a message waiting or dead-lettered.
    in_two_places = [
        f"{e}: {results[e]['status']}, and a message in the " + ("dead-letter queue" if e in dlq_ids else "queue")
        for e in expected
        if results.get(e, {}).get("status") in ("delivered", "rejected") and (e in dlq_ids or e in left_ids)
    ]
    stray = sorted(set(results) - set(expected))

    # Edge calls, from the simulator's log; the relay's view from the tracer.
    interact = [e for e in edge_log if "/interact" in str(e.get("path"))]
    ok_by_id: Counter[str] = Counter(str(e["xdm_id"]) for e in interact if e.get("status") in (200, 207))
    faults: Counter[str] = Counter(str(e.get("fault")).removeprefix("chaos:") for e in interact if e.get("fault"))
    dup_timeout = dup_ddb = dup_overran = 0
    other: dict[str, int] = {}
    for xdm_id, oks in ok_by_id.items():
        extra = oks - 1
        if extra <= 0:
            continue
        unseen = max(0, oks - tracer.client_ok.get(xdm_id, 0))  # 200s whose answer the relay never read
        by_timeout = min(extra, unseen)
        rest = extra - by_timeout
        by_ddb = min(rest, tracer.ddb_failed_after_ok.get(xdm_id, 0))
        by_overran = min(rest - by_ddb, tracer.overran.get(xdm_id, 0))
        dup_timeout += by_timeout
        dup_ddb += by_ddb
        dup_overran += by_overran
        if rest - by_ddb - by_overran > 0:
            other[xdm_id] = rest - by_ddb - by_overran
    delivered = outcome["delivered"]

    def per_delivered(n: float) -> str:
        return f"{n / delivered:.2f}" if delivered else "n/a"

    writes = int(proxy_stats.get("write_requests", 0))
    rows: list[tuple[str, str]] = [
        ("events generated", f"{generated}  (webhook {by_trigger['webhook']}, sqs {by_trigger['sqs']})"),
        (
            "  of which invalid / no primary identity / poison (Edge always 502)",
            f"{sum(1 for k in expected.values() if k.startswith('invalid'))} / "
            f"{sum(1 for k in expected.values() if k == 'no_primary')} / "
            f"{sum(1 for k in expected.values() if k == 'poison')}",
        ),
        (
            "duplicates sent (same eventId again)",
            f"{sum(dup_sends.values())}  (webhook {dup_sends['webhook']}, sqs {dup_sends['sqs']}; "
            f"{len(duplicate_ids)} eventIds)",
        ),
        (
            "webhook answers",
            ", ".join(f"{'conn-error' if k == 0 else k}: {v}" for k, v in sorted(webhook_answers.items())) or "-",
        ),
        ("delivered", str(delivered)),
        ("rejected", str(outcome["rejected"])),
        *[(f"  {reason}", str(n)) for reason, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))],
        ("in the dead-letter queue", f"{outcome['dlq']}  ({len(dlq)} messages)"),
        ("still in the queue", f"{outcome['queue']}" + ("" if drained else "  (drain timed out)")),
        ("missing (must be 0)", str(outcome["missing"])),
        ("unexpected outcomes (valid not delivered, invalid not rejected, ...)", str(len(unexpected))),
        ("in two places (a final item and a message in a queue; must be 0)", str(len(in_two_places))),
        ("stray result items (eventId not generated)", str(len(stray))),
        ("Edge calls total", str(len(interact))),
        ("Edge calls per delivered event", per_delivered(len(interact))),
        (
            "duplicate Edge calls (same _id answered 200 twice)",
            str(dup_timeout + dup_ddb + dup_overran + sum(other.values())),
        ),
        ("  after a timeout/dropped answer (expected: at-least-once under one _id)", str(dup_timeout)),
        (
            "  after a DynamoDB write failed past botocore's retries or unprocessed (expected: record redelivered)",
            str(dup_ddb),
        ),
        (
            "  after an invocation outlived the function timeout (Lambda would have ended it; redelivered)",
            str(dup_overran),
        ),
        ("  other (must be 0)", str(sum(other.values()))),
        ("DynamoDB write requests per delivered event", per_delivered(writes)),
        (
            "DynamoDB requests by operation",
            ", ".join(f"{op} {n}" for op, n in sorted((proxy_stats.get("requests") or {}).items())),
        ),
        (
            "faults injected: Edge",
            f"{sum(faults.values())}  (" + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())) + ")",
        ),
        (
            "faults injected: DynamoDB writes",
            f"{proxy_stats.get('faults_total', 0)}  ("
            + ", ".join(f"{k} {v}" for k, v in sorted((proxy_stats.get("faults") or {}).items()))
            + f"; {proxy_stats.get('bursts', 0)} bursts of {cfg.ddb_burst_length})",
        ),
        (
            "faults injected: DynamoDB batch calls done in part (entries left out)",
            f"{proxy_stats.get('partial_total', 0)}  ("
            + ", ".join(
                f"{op} {n} ({(proxy_stats.get('left_out') or {}).get(op, 0)})"
                for op, n in sorted((proxy_stats.get("partial") or {}).items())
            )
            + ")",
        ),
        ("DynamoDB writes failed after botocore's retries", str(sum(tracer.ddb_failed_writes.values()))),
        ("results left unprocessed past the relay's retries (record redelivered)", str(tracer.results_unprocessed)),
        (
            "Edge timeouts/connection errors seen by the relay",
            ", ".join(f"{k} {v}" for k, v in sorted(tracer.client_errors.items())) or "0",
        ),
        ("IMS token requests", str(sim_stats.get("ims_requests", 0))),
        ("webhooks given up by the sender / SQS sends failed", f"{len(gave_up)} / {len(unsent)}"),
        (
            "invocations longer than the function timeout (longest)",
            f"{tracer.overran_invocations}  ({tracer.longest_invocation:.1f} s; timeout {function_timeout:.0f} s)",
        ),
        ("duration", f"{duration:.0f} s ({generated / duration:.1f} events/s)" if duration else "-"),
    ]
    counts = {
        "generated": generated,
        "event_ids": len(expected),
        "delivered": delivered,
        "rejected": outcome["rejected"],
        "dlq": outcome["dlq"],
        "queue": outcome["queue"],
        "missing": outcome["missing"],
        "reasons": dict(reasons),
        "edge_calls": len(interact),
        "dup_timeout": dup_timeout,
        "dup_ddb": dup_ddb,
        "dup_overran": dup_overran,
        "dup_other": sum(other.values()),
        "ddb_writes": writes,
        "ddb_partial": int(proxy_stats.get("partial_total", 0)),
        "duplicate_ids": len(duplicate_ids),
        "gave_up": len(gave_up),
        "drained": drained,
    }
    return SoakReport(rows, missing, other, no_reason, dup_without_one, unexpected, stray, counts, in_two_places)


# --------------------------------------------------------------------------------------------------- the run


@contextlib.contextmanager
def _quiet_function(log_file: IO[str]) -> Iterator[None]:
    """Send the relay's logs (WARNING and up) and any EMF metrics output to ``log_file`` instead of the console."""
    from relay.observability import logger as relay_logger

    saved_stdout = sys.stdout
    std_logger = logging.getLogger(relay_logger.name)
    saved_level = std_logger.level
    handlers = [h for h in std_logger.handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.stream for h in handlers]
    relay_logger.setLevel("WARNING")
    for h in handlers:
        h.setStream(log_file)
    sys.stdout = log_file
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="No application metrics to publish")
            yield
    finally:
        sys.stdout = saved_stdout
        for h, s in zip(handlers, streams, strict=True):
            h.setStream(s)
        std_logger.setLevel(saved_level)


def run_soak(cfg: SoakConfig, out: Callable[[str], None] | None = None) -> SoakReport:
    real_stdout = sys.stdout

    def say(msg: str) -> None:
        if out is not None:
            out(msg)
        elif cfg.progress:
            print(msg, file=real_stdout, flush=True)

    started = time.monotonic()
    sends = plan_sends(cfg)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"soak-{cfg.seed}-{os.getpid()}.log"
    stack = LocalStack(failure_visibility_timeout=1, sim_options={"max_log": 10 * len(sends) + 1000})
    with stack, open(log_path, "w", encoding="utf-8") as log_file:
        proxy = FaultProxy(stack.moto.url).start()
        try:
            return _run(cfg, sends, stack, proxy, log_file, say, started, log_path)
        finally:
            proxy.stop()


def _run(
    cfg: SoakConfig,
    sends: list[Send],
    stack: LocalStack,
    proxy: FaultProxy,
    log_file: IO[str],
    say: Callable[[str], None],
    started: float,
    log_path: Path,
) -> SoakReport:
    stack.apply_env(
        overrides={
            "AWS_ENDPOINT_URL_DYNAMODB": proxy.url,
            "POWERTOOLS_LOG_LEVEL": "WARNING",
            "POWERTOOLS_METRICS_DISABLED": "true",
            "EDGE_READ_TIMEOUT_MS": str(cfg.edge_read_timeout_ms),
            "BATCH_CONCURRENCY": str(cfg.batch_concurrency),
        }
    )
    sys.path.insert(0, str(ROOT / "functions" / "relay"))
    from relay.integrations.aws_clients import build_clients
    from relay.runtime import Runtime
    from relay.settings import load_settings

    settings = load_settings(os.environ)
    tracer = Tracer()

    def new_runtime() -> Runtime:
        clients = build_clients(settings.batch_concurrency + 4)  # the relay's own client factory and config
        tracer.instrument_dynamodb(clients["dynamodb"])
        return Runtime(settings, clients=clients, session=TracingSession(tracer, settings.batch_concurrency))

    res = stack.resources
    timeout = res.function_timeout
    pool = RuntimePool([tracer.timed(new_runtime().handle, timeout) for _ in range(cfg.gateway_runtimes)], timeout)
    gateway = stack.gateway(pool)
    pollers = [stack.poller(tracer.timed(new_runtime().handle, timeout)) for _ in range(cfg.pollers)]
    stack.sim.set_chaos(cfg.fault_rate, seed=cfg.seed, slow_delay=cfg.slow_delay, retry_after_max=cfg.retry_after_max)
    for send in sends:
        if send.kind == "poison" and not send.duplicate and send.event_id:
            stack.sim.add_fault(status=502, match_id=send.event_id)
    proxy.configure(
        rate=cfg.ddb_fault_rate,
        seed=cfg.seed + 1,
        burst_share=cfg.ddb_burst_share,
        burst_length=cfg.ddb_burst_length,
        partial_rate=cfg.ddb_partial_rate,
    )
    webhook_sends = [s for s in sends if s.trigger == "webhook"]
    sqs_sends = [s for s in sends if s.trigger == "sqs"]
    say(
        f"soak: {cfg.events} events (+{len(sends) - cfg.events} duplicates), {len(webhook_sends)} webhook / "
        f"{len(sqs_sends)} sqs sends; Edge faults {cfg.fault_rate:.0%}, DynamoDB write faults {cfg.ddb_fault_rate:.0%},"
        f" batch calls done in part {cfg.ddb_partial_rate:.0%};"
        f" relay logs in {log_path.relative_to(ROOT) if log_path.is_relative_to(ROOT) else log_path}"
    )
    drained = False
    with _quiet_function(log_file):
        for poller in pollers:
            poller.start()
        senders = WebhookSenders(gateway.url, stack.webhook_secret, webhook_sends, cfg).start()
        producer = SqsProducer(stack.sqs, res.queue_url, sqs_sends, lambda: senders.progress)
        producer.start()
        probe = pollers[0]
        deadline = time.monotonic() + cfg.send_timeout + cfg.drain_timeout
        last_report = 0.0
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            sending = producer.is_alive() or not senders.join(0)
            pending = probe.pending()
            now = time.monotonic()
            if now - last_report >= 15:
                last_report = now
                say(
                    f"  {now - started:5.0f} s: webhooks {senders.done}/{len(webhook_sends)}, sqs sent "
                    f"{producer.sent}/{len(sqs_sends)}, queue {pending}, Edge calls "
                    f"{stack.sim.stats().get('interact_requests', 0)}"
                )
            if sending or pending:
                quiet_since = None
                continue
            quiet_since = quiet_since or now
            if now - quiet_since >= 2.0:  # empty twice, 2 s apart: nothing in flight, delayed or invisible
                drained = True
                break
        producer.stop.set()
        stack.stop_triggers()
    duration = time.monotonic() - started
    say(f"  settled after {duration:.0f} s; accounting")
    left = _drain_queue(stack.sqs, res.queue_url, 10 * len(sends))
    dlq = _drain_queue(stack.sqs, res.dlq_url, 10 * len(sends))
    report = account(
        cfg,
        sends,
        results=_scan_results(stack.dynamodb, res.table_name),
        dlq=dlq,
        left=left,
        edge_log=stack.sim.requests_log(),
        sim_stats=stack.sim.stats(),
        tracer=tracer,
        proxy_stats=proxy.stats(),
        webhook_answers=senders.answers,
        gave_up=senders.gave_up,
        unsent=[*producer.failed, *(s for s in sqs_sends if s.message_id is None and s not in producer.failed)],
        duration=duration,
        drained=drained,
        function_timeout=res.function_timeout,
    )
    return report


def describe_machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.soak", description=__doc__.split("\n\n")[0])
    defaults = SoakConfig()
    parser.add_argument("--events", type=int, default=defaults.events)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--fault-rate", type=float, default=defaults.fault_rate, help="Edge faults (0-1)")
    parser.add_argument("--ddb-fault-rate", type=float, default=defaults.ddb_fault_rate, help="DynamoDB write faults")
    parser.add_argument(
        "--ddb-partial-rate",
        type=float,
        default=defaults.ddb_partial_rate,
        help="DynamoDB batch calls answered in part (unprocessed items/keys, throttled statements)",
    )
    parser.add_argument("--webhook-share", type=float, default=defaults.webhook_share)
    parser.add_argument("--duplicates", type=float, default=defaults.duplicates)
    parser.add_argument("--invalid", type=float, default=defaults.invalid)
    parser.add_argument("--no-identity", type=float, default=defaults.no_identity)
    parser.add_argument("--pollers", type=int, default=defaults.pollers)
    parser.add_argument("--webhook-senders", type=int, default=defaults.webhook_senders)
    parser.add_argument(
        "--poison", type=int, default=defaults.poison, help="events Edge always fails (expected in the DLQ)"
    )
    parser.add_argument(
        "--poison-shared-identity",
        action="store_true",
        help="give poison events popular identities (reproduces head-of-line blocking: see docs/soak.md)",
    )
    parser.add_argument("--show", type=int, default=10, help="list at most this many missing/unexpected events")
    args = parser.parse_args(argv)
    cfg = SoakConfig(
        events=args.events,
        seed=args.seed,
        fault_rate=args.fault_rate,
        ddb_fault_rate=args.ddb_fault_rate,
        ddb_partial_rate=args.ddb_partial_rate,
        webhook_share=args.webhook_share,
        duplicates=args.duplicates,
        invalid=args.invalid,
        no_identity=args.no_identity,
        pollers=args.pollers,
        webhook_senders=args.webhook_senders,
        poison=args.poison,
        poison_shared_identity=args.poison_shared_identity,
    )
    stop_on_sigterm()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        report = run_soak(cfg)
    except KeyboardInterrupt:
        return 130
    print()
    print(f"soak run {when}, seed {cfg.seed}, {describe_machine()}")
    print(report.table())
    for title, items in (
        ("missing", report.missing),
        ("unexpected outcomes", report.unexpected),
        ("in two places", report.in_two_places),
        ("other duplicate Edge calls", [f"{k} x{v}" for k, v in report.other_duplicates.items()]),
        ("rejected without a reason", report.rejected_without_reason),
        ("duplicate eventIds without one final result", report.duplicate_ids_without_one_result),
        ("stray result items", report.stray_results),
    ):
        if items:
            print(f"\n{title} ({len(items)}):")
            for line in list(items)[: args.show]:
                print(f"  {line}")
    print("\nPASS" if report.ok else "\nFAIL: " + "; ".join(report.failures))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
