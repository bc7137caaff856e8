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

The proxy counts requests by operation, faults by kind, and remembers which items had a write refused,
so a soak can report DynamoDB writes per delivered event. Thread-safe; loopback only.
"""

from __future__ import annotations

import http.client
import json
import random
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


@dataclass
class ProxyStats:
    requests: Counter[str] = field(default_factory=Counter)  # by operation, every request received
    forwarded: Counter[str] = field(default_factory=Counter)  # by operation, reached the emulator
    faults: Counter[str] = field(default_factory=Counter)  # by kind
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
            "upstream_errors": self.upstream_errors,
        }


class FaultProxy(LoopbackService):
    """Forward to ``upstream`` (``http://127.0.0.1:<port>``); fail writes at ``rate``. Start/stop or a context."""

    def __init__(
        self,
        upstream: str,
        *,
        rate: float = 0.0,
        seed: int | None = None,
        kinds: tuple[str, ...] = FAULT_KINDS,
        burst_share: float = 0.0,
        burst_length: int = 6,
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
        self.configure(rate=rate, seed=seed, kinds=kinds, burst_share=burst_share, burst_length=burst_length)

    # ---- control -------------------------------------------------------------------------------------------------

    def configure(
        self,
        *,
        rate: float,
        seed: int | None = None,
        kinds: tuple[str, ...] = FAULT_KINDS,
        burst_share: float = 0.0,
        burst_length: int = 6,
    ) -> None:
        if not 0.0 <= rate <= 1.0 or not 0.0 <= burst_share <= 1.0:
            raise ValueError("rate and burst_share must be within [0, 1]")
        bad = [k for k in kinds if k not in FAULT_KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {FAULT_KINDS}")
        with self._lock:
            self._rate = rate
            self._rng = random.Random(seed)
            self._kinds = tuple(kinds)
            self._burst_share = burst_share
            self._burst_length = max(1, int(burst_length))
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
            status, reason, headers, payload = self._forward(body)
        except (OSError, http.client.HTTPException):
            self.owner._forwarded(operation, False)
            self.close_connection = True
            self._reply(502, [("Content-Type", "text/plain")], b"fault proxy: upstream unavailable")
            return
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
