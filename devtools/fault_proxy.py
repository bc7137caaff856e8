"""A fault-injecting HTTP proxy between the relay's DynamoDB client and the emulator (soak tests only).

Point boto3 at it with ``AWS_ENDPOINT_URL_DYNAMODB=<proxy.url>`` (boto3's own per-service endpoint
variable) before the runtime builds its clients. Every request is forwarded byte-for-byte over a
keep-alive connection to ``upstream``, except that a configurable fraction of **writes**
(``X-Amz-Target`` PutItem, UpdateItem, DeleteItem, TransactWriteItems, BatchWriteItem, and
BatchExecuteStatement, which the relay uses for INSERTs only) is answered,
without reaching the emulator, with an error shaped like DynamoDB's own:

* HTTP 400 ``ProvisionedThroughputExceededException`` (botocore: a throttling error, retried);
* HTTP 500 ``InternalServerError`` (botocore: a transient error, retried).

A fault starts a **burst** with probability ``burst_share``: the next ``burst_length - 1`` writes to the same
item (``pk``/``sk``) fail too, ``burst_length`` in a row. At the default 6 (the fault and 5 more) that is every
one of botocore's 6 standard-mode attempts (the relay's ``max_attempts`` of 5 counts retries), so the write
fails and the relay's own handling (release the claim, fail the record so it is redelivered) is exercised.
Bursts are keyed by item rather than global because concurrent writers would otherwise share, and dilute, one
burst.

**Partial answers.** Throttled, DynamoDB also answers a batch call 200 with only part of it done. A fraction
``partial_rate`` of the batch requests the proxy did not refuse (``BatchWriteItem``, ``BatchGetItem``,
``BatchExecuteStatement``, reads included) gets such an answer: the proxy picks the entries to leave out (at least one,
and for the two ``Batch*Item`` at least one is kept: DynamoDB refuses a call it can do none of, which the faults above
cover), forwards a request rewritten without them, and merges them into the emulator's answer in DynamoDB's shape:

* ``BatchWriteItem``: added to ``UnprocessedItems`` (``{table: [write request, ...]}``, as in ``RequestItems``);
* ``BatchGetItem``: added to ``UnprocessedKeys`` (``{table: {"Keys": [...], ...}}``, with the table's
  ``ProjectionExpression``, ``ExpressionAttributeNames``, ``ConsistentRead`` and ``AttributesToGet`` as requested);
* ``BatchExecuteStatement``: ``Responses`` keeps the request's order; a statement left out gets
  ``{"TableName": <its table>, "Error": {"Code": "ProvisionedThroughputExceeded" | "ThrottlingError" |
  "InternalServerError", "Message": ...}}`` (``BatchStatementResponse``/``BatchStatementError`` in the DynamoDB API
  reference), the others the emulator's answers, in their places.

The emulator's own unprocessed entries are kept beside the proxy's. The answer's ``x-amz-crc32`` is recomputed
(botocore retries a DynamoDB answer whose body does not match it) and ``Content-Length`` set anew, as for every
forwarded request. The rewritten request still carries the client's SigV4 ``Authorization``, computed over the
original body: moto does not check signatures (only with ``INITIAL_NO_AUTH_ACTION_COUNT`` set, which the local stack
never sets), so it is forwarded as is. Should the emulator's answer not be a 200 the proxy can read, it goes back
untouched when it is an error (the client retries the whole request, the left-out entries with it); a 200 it cannot
merge into is answered 500 ``InternalServerError`` instead, never passed on without the entries left out.

The proxy counts requests by operation, faults by kind, partial answers and the entries they left out by operation,
and remembers which items had a write refused (or left out), so a soak can report DynamoDB writes per delivered event.
Thread-safe; loopback only.
"""

from __future__ import annotations

import binascii
import http.client
import json
import random
import re
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from devtools.loopback import LoopbackHandler, LoopbackService
from devtools.moto_fidelity import insert_shape

WRITE_OPERATIONS = frozenset(
    {"PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems", "BatchWriteItem", "BatchExecuteStatement"}
)
FAULT_KINDS = ("throughput", "internal")
PARTIAL_OPERATIONS = frozenset({"BatchWriteItem", "BatchGetItem", "BatchExecuteStatement"})
# BatchStatementError codes a throttled or failing statement gets (DuplicateItem, ConditionalCheckFailed: the item's)
STATEMENT_ERRORS: dict[str, str] = {
    "ProvisionedThroughputExceeded": "The level of configured provisioned throughput for the table was exceeded. "
    "(injected by the soak's fault proxy)",
    "ThrottlingError": "Throughput exceeds the current capacity of your table or index. (injected by the soak's fault "
    "proxy)",
    "InternalServerError": "Internal server error (injected by the soak's fault proxy)",
}
_STATEMENT_TABLE = re.compile(r'\b(?:INTO|FROM|UPDATE)\s+"([^"]+)"', re.IGNORECASE)
_ERROR_PREFIX = "com.amazonaws.dynamodb.v20120810#"
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer"}
)
_FAULTS: dict[str, tuple[int, str, str]] = {
    "throughput": (
        400,
        "ProvisionedThroughputExceededException",
        "The level of configured provisioned throughput for the table was exceeded. "
        "Consider increasing your provisioning level with the UpdateTable API. (injected by the soak's fault proxy)",
    ),
    "internal": (500, "InternalServerError", "Internal server error (injected by the soak's fault proxy)"),
    # Not retried by botocore: only for `fail_item`, which makes one chosen write fail at once.
    "validation": (400, "ValidationException", "One or more parameter values were invalid (injected)"),
}


def _pk_sk(key: Any) -> str | None:
    if not isinstance(key, dict):
        return None
    parts = [key.get(name) for name in ("pk", "sk")]
    values = [next(iter(p.values()), "") if isinstance(p, dict) and p else "" for p in parts]
    return "|".join(str(v) for v in values)


def item_keys(operation: str, body: bytes) -> list[str]:
    """``pk|sk`` of every item a write touches: one, or each item of a BatchWriteItem or of a batch of INSERTs."""
    if operation == "BatchExecuteStatement":
        try:
            shapes = [insert_shape(s["Statement"], s.get("Parameters") or []) for s in json.loads(body)["Statements"]]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return []
        return [k for shape in shapes if shape and (k := _pk_sk(shape[1])) is not None]
    if operation != "BatchWriteItem":
        key = item_key(operation, body)
        return [key] if key is not None else []
    try:
        items = batch_write_items(json.loads(body))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return []
    keys = [_pk_sk(item) for item in items]
    return [k for k in keys if k is not None]


def batch_write_items(request: dict[str, Any]) -> list[Any]:
    """The item (a put) or key (a delete) of every write in a BatchWriteItem request (None for neither)."""
    return [
        (w.get("PutRequest") or {}).get("Item") or (w.get("DeleteRequest") or {}).get("Key")
        for writes in request["RequestItems"].values()
        for w in writes
    ]


def item_key(operation: str, body: bytes) -> str | None:
    """``pk|sk`` of the item a write touches (the first one for transactions), or None."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    key: Any = doc.get("Key") or doc.get("Item")
    if operation == "TransactWriteItems":
        items = doc.get("TransactItems")
        first: Any = items[0] if isinstance(items, list) and items and isinstance(items[0], dict) else {}
        action: Any = next(iter(first.values()), {}) if first else {}
        key = (action.get("Key") or action.get("Item")) if isinstance(action, dict) else None
    return _pk_sk(key)


def batch_entries(operation: str, request: dict[str, Any]) -> list[tuple[str, Any]]:
    """(table, entry) of every entry of a batch request, in order: a write request (``BatchWriteItem``), a key
    (``BatchGetItem``) or a statement (``BatchExecuteStatement``, table as its text names it, else "")."""
    if operation == "BatchWriteItem":
        return [(table, w) for table, writes in request["RequestItems"].items() for w in writes]
    if operation == "BatchGetItem":
        return [(table, key) for table, spec in request["RequestItems"].items() for key in spec["Keys"]]
    if operation == "BatchExecuteStatement":
        return [(statement_table(s), s) for s in request["Statements"]]
    raise ValueError(f"not a batch operation: {operation}")


def statement_table(statement: Any) -> str:
    """The table a PartiQL statement names (``INSERT INTO "t"``, ``... FROM "t"``, ``UPDATE "t"``), or ""."""
    text = statement.get("Statement") if isinstance(statement, dict) else None
    match = _STATEMENT_TABLE.search(text) if isinstance(text, str) else None
    return match.group(1) if match else ""


def split_batch(operation: str, request: dict[str, Any], left_out: set[int]) -> dict[str, Any]:
    """The request without the entries at positions ``left_out`` (of :func:`batch_entries`): what goes upstream.
    A table left with no entry is left out of ``RequestItems`` (DynamoDB refuses an empty one)."""
    entries = batch_entries(operation, request)
    kept = [entry for n, entry in enumerate(entries) if n not in left_out]
    if operation == "BatchExecuteStatement":
        return {**request, "Statements": [statement for _, statement in kept]}
    if operation == "BatchWriteItem":
        return {**request, "RequestItems": _by_table(kept)}
    specs = request["RequestItems"]
    return {
        **request,
        "RequestItems": {table: {**specs[table], "Keys": keys} for table, keys in _by_table(kept).items()},
    }


def _by_table(entries: list[tuple[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for table, entry in entries:
        out.setdefault(table, []).append(entry)
    return out


def merge_partial(
    operation: str, request: dict[str, Any], left_out: dict[int, str], answer: dict[str, Any]
) -> dict[str, Any]:
    """The upstream ``answer`` to the request without the entries ``left_out`` (position -> the statement error code
    they get; unused for the ``Batch*Item``), as DynamoDB answers the whole ``request`` when it did not do those."""
    entries = batch_entries(operation, request)
    out = dict(answer)
    if operation == "BatchExecuteStatement":
        theirs = iter(answer.get("Responses") or [])
        responses: list[Any] = []
        for n, (table, _) in enumerate(entries):
            code = left_out.get(n)  # None: a statement sent upstream
            if code is None:
                response = next(theirs, None)
                if response is not None:
                    responses.append(response)
                    continue
                code = "InternalServerError"  # the emulator answered fewer statements than it was sent
            error = {"Error": {"Code": code, "Message": STATEMENT_ERRORS.get(code, code)}}
            responses.append({"TableName": table, **error} if table else error)
        out["Responses"] = responses
        return out
    left = _by_table([entry for n, entry in enumerate(entries) if n in left_out])
    if operation == "BatchWriteItem":
        unprocessed_items: dict[str, list[Any]] = {
            t: list(w) for t, w in (answer.get("UnprocessedItems") or {}).items()
        }
        for table, writes in left.items():
            unprocessed_items.setdefault(table, []).extend(writes)
        out["UnprocessedItems"] = unprocessed_items
        return out
    unprocessed_keys: dict[str, Any] = {t: dict(s) for t, s in (answer.get("UnprocessedKeys") or {}).items()}
    for table, keys in left.items():
        spec = unprocessed_keys.get(table)
        if spec is None:
            unprocessed_keys[table] = {**request["RequestItems"][table], "Keys": keys}
        else:
            spec["Keys"] = [*(spec.get("Keys") or []), *keys]
    out["UnprocessedKeys"] = unprocessed_keys
    return out


@dataclass
class PartialPlan:
    """A batch request to answer in part: the body to forward, and which entries (position -> code) it left out."""

    operation: str
    request: dict[str, Any]
    body: bytes
    left_out: dict[int, str]

    def merge(self, payload: bytes) -> bytes | None:
        """The upstream's 200 answer with the entries left out merged in; None if it cannot be read."""
        try:
            answer = json.loads(payload)
            if not isinstance(answer, dict):
                return None
            merged = merge_partial(self.operation, self.request, self.left_out, answer)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return None
        return json.dumps(merged, separators=(",", ":")).encode("utf-8")

    def keys_left_out(self) -> list[str]:
        """``pk|sk`` of the items whose write was left out (a read's keys do not count)."""
        if self.operation == "BatchGetItem":
            return []
        entries = batch_entries(self.operation, self.request)
        keys: list[str | None] = []
        for n in self.left_out:
            entry = entries[n][1]
            if self.operation == "BatchWriteItem":
                keys.append(
                    _pk_sk((entry.get("PutRequest") or {}).get("Item") or (entry.get("DeleteRequest") or {}).get("Key"))
                )
            else:
                shape = insert_shape(entry.get("Statement", ""), entry.get("Parameters") or [])
                keys.append(_pk_sk(shape[1]) if shape else None)
        return [k for k in keys if k is not None]


@dataclass
class ProxyStats:
    requests: Counter[str] = field(default_factory=Counter)  # by operation, every request received
    forwarded: Counter[str] = field(default_factory=Counter)  # by operation, reached the emulator
    faults: Counter[str] = field(default_factory=Counter)  # by kind
    partial: Counter[str] = field(default_factory=Counter)  # by operation, batch requests answered in part
    left_out: Counter[str] = field(default_factory=Counter)  # by operation, the entries those answers left undone
    bursts: int = 0
    upstream_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        writes = sum(n for op, n in self.requests.items() if op in WRITE_OPERATIONS)
        return {
            "requests": dict(self.requests),
            "forwarded": dict(self.forwarded),
            "write_requests": writes,
            "writes_forwarded": sum(n for op, n in self.forwarded.items() if op in WRITE_OPERATIONS),
            "faults": dict(self.faults),
            "faults_total": sum(self.faults.values()),
            "bursts": self.bursts,
            "partial": dict(self.partial),
            "left_out": dict(self.left_out),
            "partial_total": sum(self.partial.values()),
            "upstream_errors": self.upstream_errors,
        }


class FaultProxy(LoopbackService):
    """Forward to ``upstream`` (``http://127.0.0.1:<port>``); fail writes at ``rate``, answer batch requests in part at
    ``partial_rate``. Start/stop or a context."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int | None = None,
        kinds: tuple[str, ...] = FAULT_KINDS,
        burst_share: float = 0.0,
        burst_length: int = 6,
        partial_rate: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        upstream_timeout: float = 30.0,
        keep_bodies: bool = False,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("upstream must be an http:// loopback URL")
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_timeout = upstream_timeout
        self.host = host
        self._requested_port = port
        self._lock = threading.Lock()
        self._stats = ProxyStats()
        self._keep_bodies = keep_bodies
        self._bodies: list[tuple[str, bytes]] = []  # with keep_bodies, every request received: (operation, body)
        self._bursts: dict[str, int] = {}  # item key -> writes still to fail
        self._failed_keys: Counter[str] = Counter()  # item key -> writes refused
        self._scripted: dict[str, list[str]] = {}  # item key -> fault kinds its next writes get (fail_item)
        self.configure(
            rate=rate,
            seed=seed,
            kinds=kinds,
            burst_share=burst_share,
            burst_length=burst_length,
            partial_rate=partial_rate,
        )

    # ---- control -------------------------------------------------------------------------------------------------

    def configure(
        self,
        *,
        rate: float,
        seed: int | None = None,
        kinds: tuple[str, ...] = FAULT_KINDS,
        burst_share: float = 0.0,
        burst_length: int = 6,
        partial_rate: float = 0.0,
    ) -> None:
        if not all(0.0 <= r <= 1.0 for r in (rate, burst_share, partial_rate)):
            raise ValueError("rate, burst_share and partial_rate must be within [0, 1]")
        bad = [k for k in kinds if k not in FAULT_KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}")
        with self._lock:
            self._rate = rate
            self._rng = random.Random(seed)
            self._kinds = tuple(kinds)
            self._burst_share = burst_share
            self._burst_length = max(1, int(burst_length))
            self._partial_rate = partial_rate
            self._bursts.clear()

    def fail_item(self, key: str, kinds: list[str]) -> None:
        """Answer the next writes to the item ``pk|sk`` with these faults, one each, whatever the rate."""
        bad = [k for k in kinds if k not in _FAULTS]
        if bad:
            raise ValueError(f"kinds must be among {tuple(_FAULTS)}")
        with self._lock:
            self._scripted[key] = list(kinds)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return self._stats.as_dict()

    def request_bodies(self, operation: str) -> list[bytes]:
        """With ``keep_bodies``, the bodies of every request of `operation` received (in order), e.g. to tell which
        secret each ``GetSecretValue`` read."""
        with self._lock:
            return [body for op, body in self._bodies if op == operation]

    def failed_keys(self) -> dict[str, int]:
        """Items (``pk|sk``) that had at least one write refused, with how many."""
        with self._lock:
            return dict(self._failed_keys)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = ProxyStats()
            self._failed_keys.clear()
            self._bodies.clear()

    # ---- lifecycle -----------------------------------------------------------------------------------------------

    thread_name = "ddb-fault-proxy"

    def _make_server(self) -> ThreadingHTTPServer:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        server = ThreadingHTTPServer((self.host, self._requested_port), Handler)
        server.request_queue_size = 128
        return server

    # ---- decisions -----------------------------------------------------------------------------------------------

    def _decide(self, operation: str, body: bytes) -> str | None:
        """Count the request; return the fault kind to answer with, or None to forward it.

        Bursts are per item; a BatchWriteItem fails as a whole if any of its items is in a burst, and a burst it
        starts covers all its items."""
        keys = item_keys(operation, body) if operation in WRITE_OPERATIONS else []
        with self._lock:
            self._stats.requests[operation] += 1
            if self._keep_bodies:
                self._bodies.append((operation, body))
            for k in keys:
                if self._scripted.get(k):
                    kind = self._scripted[k].pop(0)
                    self._stats.faults[kind] += 1
                    self._failed_keys[k] += 1
                    return kind
            if operation not in WRITE_OPERATIONS or self._rate <= 0.0 and not self._bursts:
                return None
            bursting = [k for k in keys if self._bursts.get(k, 0) > 0]
            if bursting:
                for k in bursting:
                    if self._bursts[k] == 1:
                        del self._bursts[k]
                    else:
                        self._bursts[k] -= 1
            elif self._rng.random() < self._rate:
                if keys and self._rng.random() < self._burst_share:
                    for k in keys:
                        self._bursts[k] = self._burst_length - 1
                    self._stats.bursts += 1
            else:
                return None
            kind = self._rng.choice(self._kinds)
            self._stats.faults[kind] += 1
            for k in keys:
                self._failed_keys[k] += 1
            return kind

    def _plan_partial(self, operation: str, body: bytes) -> PartialPlan | None:
        """For a batch request that was not refused: at ``partial_rate``, which of its entries to leave out."""
        if operation not in PARTIAL_OPERATIONS or self._partial_rate <= 0.0:
            return None
        try:
            request = json.loads(body)
            count = len(batch_entries(operation, request))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            return None
        keep_one = operation != "BatchExecuteStatement"  # DynamoDB refuses a Batch*Item it can do none of
        if count < (2 if keep_one else 1):
            return None
        with self._lock:
            if self._rng.random() >= self._partial_rate:
                return None
            how_many = self._rng.randint(1, count - 1 if keep_one else count)
            positions = sorted(self._rng.sample(range(count), how_many))
            codes = list(STATEMENT_ERRORS)
            left_out = {n: self._rng.choice(codes) if not keep_one else "" for n in positions}
        forward = split_batch(operation, request, set(left_out))
        return PartialPlan(operation, request, json.dumps(forward, separators=(",", ":")).encode("utf-8"), left_out)

    def _answered_in_part(self, plan: PartialPlan) -> None:
        keys = plan.keys_left_out()
        with self._lock:
            self._stats.partial[plan.operation] += 1
            self._stats.left_out[plan.operation] += len(plan.left_out)
            for k in keys:
                self._failed_keys[k] += 1

    def _forwarded(self, operation: str, ok: bool) -> None:
        with self._lock:
            if ok:
                self._stats.forwarded[operation] += 1
            else:
                self._stats.upstream_errors += 1


class _ProxyHandler(LoopbackHandler):
    owner: FaultProxy
    timeout = 120  # idle keep-alive connections from botocore are closed after this

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self._upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._upstream is not None:
                self._upstream.close()
                self._upstream = None

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = bytearray()
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(chunks)
                chunks += self.rfile.read(size)
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        body = self._read_body()
        target = self.headers.get("X-Amz-Target") or ""
        operation = target.rsplit(".", 1)[-1] if target else f"{self.command} {self.path.split('?', 1)[0]}"
        kind = self.owner._decide(operation, body)
        plan = self.owner._plan_partial(operation, body) if kind is None else None
        if kind is not None:
            status, code, message = _FAULTS[kind]
            payload = json.dumps({"__type": _ERROR_PREFIX + code, "message": message}).encode("utf-8")
            self._reply(
                status,
                [("Content-Type", "application/x-amz-json-1.0"), ("x-amzn-RequestId", uuid.uuid4().hex.upper())],
                payload,
            )
            return
        try:
            status, reason, headers, payload = self._forward(plan.body if plan is not None else body)
        except (OSError, http.client.HTTPException):
            self.owner._forwarded(operation, False)
            self.close_connection = True
            self._reply(502, [("Content-Type", "text/plain")], b"fault proxy: upstream unavailable")
            return
        if plan is not None and status == 200:
            merged = plan.merge(payload)
            self.owner._forwarded(operation, merged is not None)
            if merged is None:  # never pass on a 200 that says nothing of the entries left out
                status, code, message = _FAULTS["internal"]
                merged = json.dumps({"__type": _ERROR_PREFIX + code, "message": message}).encode("utf-8")
                headers, reason = [("Content-Type", "application/x-amz-json-1.0")], "Internal Server Error"
            else:
                self.owner._answered_in_part(plan)
            # botocore checks a DynamoDB answer's body against its x-amz-crc32 (and retries on a mismatch)
            headers = [(k, v) for k, v in headers if k.lower() != "x-amz-crc32"]
            headers.append(("x-amz-crc32", str(binascii.crc32(merged))))
            payload = merged
        else:
            self.owner._forwarded(operation, True)
        self._reply(status, headers, payload, reason)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        headers = [(k, v) for k, v in headers if k.lower() not in ("transfer-encoding", "content-length")]
        headers.append(("Content-Length", str(len(body))))
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed by the emulator
            conn = self._upstream
            if conn is None:
                conn = self._upstream = http.client.HTTPConnection(
                    self.owner.upstream_host, self.owner.upstream_port, timeout=self.owner.upstream_timeout
                )
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders(body)
                resp = conn.getresponse()
                payload = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._upstream = None
                if attempt == 2:
                    raise
                continue
            out = [
                (k, v)
                for k, v in resp.getheaders()
                if k.lower() not in _HOP_BY_HOP and k.lower() not in ("transfer-encoding", "content-length")
            ]
            if resp.will_close:
                conn.close()
                self._upstream = None
            return resp.status, resp.reason, out, payload
        raise AssertionError("unreachable")

    def _reply(self, status: int, headers: list[tuple[str, str]], payload: bytes, reason: str | None = None) -> None:
        try:
            self.send_response_only(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle
