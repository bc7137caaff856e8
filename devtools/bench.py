"""``make bench``: throughput, CPU, cold start, DynamoDB economy and cost of the relay on the local stack.

Prints ONE table of ratios, each measured against a baseline or floor run in the same invocation (absolute numbers
are context only: the machine is shared and noisy). docs/benchmark.md explains every line.

Layout: this process runs the local stack (Edge simulator in-process, moto as a child process) and a counting proxy
in front of moto. Everything measured runs in a separate *worker* process (``--worker``), so a worker's CPU time
and peak memory are those of the handler (or baseline) alone: the simulator, moto and the proxy are elsewhere.

Workers:

* ``relay``: the real handler (``relay.handler.lambda_handler``) on one warm runtime, fed SQS events of 100 records
  built directly (the shape ``devtools/poller.py`` builds), one invocation after another.
* ``naive``: what a straightforward Lambda does per event: read the secret, ``requests.post`` on a new connection,
  ``put_item``; sequential.
* ``floor``: the least any relay must do per event: one POST on a reused session and one ``put_item``.
* cold start: ``python -c`` children (relay: import the handler and handle one SQS record; floor: import boto3 and
  requests, create the dynamodb and secretsmanager clients, read the secret, get a token, POST, put_item). Both run
  from bytecode, as deployed: the relay from a copy of its code compiled the way ``make build`` compiles it, the
  floor's packages as pip installed them.
"""

from __future__ import annotations

import argparse
import base64
import compileall
import http.client
import json
import math
import os
import py_compile
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from devtools.fault_proxy import batch_write_items
from devtools.loopback import LoopbackHandler, LoopbackService
from devtools.moto_fidelity import insert_shape

ROOT = Path(__file__).resolve().parent.parent
FUNCTION_DIR = ROOT / "functions" / "relay"
BATCH = 100
EDGE_LATENCY = 0.05
RESULTS = ROOT / ".local" / "bench-last.json"  # raw numbers of the last run; `--report` prints them again

# Prices, us-east-1, as published (checked 2026-11); docs/benchmark.md cites the pages.
LAMBDA_ARM_GB_S = 0.0000133334  # https://aws.amazon.com/lambda/pricing/
LAMBDA_REQUEST = 0.20 / 1e6
DDB_WRU = 0.625 / 1e6  # https://aws.amazon.com/dynamodb/pricing/on-demand/
DDB_RRU = 0.125 / 1e6
SQS_REQUEST = 0.40 / 1e6  # https://aws.amazon.com/sqs/pricing/ (standard queue, beyond the free tier)
SECRETS_CALL = 0.05 / 10_000  # https://aws.amazon.com/secrets-manager/pricing/
CWL_INGEST_BYTE = 0.50 / 1e9  # https://aws.amazon.com/cloudwatch/pricing/ (Logs, Standard, per GB ingested; GB as 10^9)
# Lambda's own START, END and REPORT lines per invocation in the template's (default) Text log format: 71 + 52 + about
# 144 bytes (REPORT adds "Init Duration" on a cold start, and a line for X-Ray when tracing is on).
PLATFORM_LOG_BYTES = 267
# SQS requests per event with the template's BatchSize 100: the producer's SendMessage (1), the event source
# mapping's ReceiveMessage (10 messages each: 0.1) and DeleteMessageBatch (10 entries each: 0.1).
SQS_REQUESTS_PER_EVENT = 1 + 0.1 + 0.1
LAMBDA_MB_PER_VCPU = 1769  # Lambda allocates one full vCPU at 1,769 MB, proportionally below
RECOMMENDED_MB = 1769  # the template's MemorySize (tests/unit/test_template.py checks they agree)

SAMPLE_BODY = json.loads(
    json.loads((ROOT / "events" / "sqs-batch.json").read_text(encoding="utf-8"))["Records"][0]["body"]
)


# ============================================================================================ events


def ecid(ident: int, space: int) -> str:
    return f"{space:06d}{ident:032d}"


def interact_body(event_id: str, ident: int, space: int) -> dict[str, Any]:
    body = json.loads(json.dumps(SAMPLE_BODY))
    xdm = body["event"]["xdm"]
    xdm["_id"] = event_id
    xdm["identityMap"] = {"ECID": [{"id": ecid(ident, space), "authenticatedState": "ambiguous", "primary": True}]}
    return body


def sqs_record(body: dict[str, Any]) -> dict[str, Any]:
    """A Lambda SQS event record (the shape devtools/poller.py's record_from_message builds)."""
    text = json.dumps(body, separators=(",", ":"))
    now_ms = str(int(time.time() * 1000))
    return {
        "messageId": str(uuid.uuid4()),
        "receiptHandle": base64.b64encode(uuid.uuid4().bytes).decode("ascii"),
        "body": text,
        "attributes": {
            "ApproximateReceiveCount": "1",
            "SentTimestamp": now_ms,
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": now_ms,
        },
        "messageAttributes": {},
        "md5OfBody": "0" * 32,
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:bench",
        "awsRegion": "us-east-1",
    }


def sqs_batch(prefix: str, n: int, idents: range, space: int) -> dict[str, Any]:
    """``n`` records, record i for identity ``idents[i % len(idents)]``; eventIds ``<prefix>-<i>``."""
    return {"Records": [sqs_record(interact_body(f"{prefix}-{i}", idents[i % len(idents)], space)) for i in range(n)]}


# ============================================================================================ counting proxy


def _attr_size(value: Mapping[str, Any]) -> int:
    """DynamoDB's size of one AttributeValue (wire JSON), per the developer guide's item-size rules."""
    ((kind, v),) = value.items()
    if kind == "S":
        return len(v.encode("utf-8"))
    if kind == "B":  # base64 on the wire; bytes once boto3 has decoded it
        return len(v) if isinstance(v, bytes) else len(base64.b64decode(v))
    if kind == "N":
        digits = len(v.lstrip("-").replace(".", "").lstrip("0")) or 1
        return (digits + 1) // 2 + 1
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "M":
        return 3 + sum(len(k.encode("utf-8")) + _attr_size(x) + 1 for k, x in v.items())
    if kind == "L":
        return 3 + sum(_attr_size(x) + 1 for x in v)
    if kind in ("SS", "NS", "BS"):
        return sum(_attr_size({kind[0]: x}) for x in v)
    return 0


def item_size(item: Mapping[str, Any] | None) -> int:
    return sum(len(k.encode("utf-8")) + _attr_size(v) for k, v in (item or {}).items())


class CountingProxy(LoopbackService):
    """A loopback HTTP proxy in front of moto that counts AWS API calls and DynamoDB capacity units.

    ``ddb.write_requests`` counts write API calls, ``ddb.item_writes`` the items they wrote (a BatchWriteItem of 25
    writes 25 items; DynamoDB bills each like a PutItem). Each item written consumes ceil(max(before, after) / 1 KB)
    WCU (the larger of the item images, as DynamoDB bills PutItem/UpdateItem); the proxy reads both images with its
    own uncounted GetItem. A read consumes
    ceil(size / 4 KB) RRU (strongly consistent), half that when eventually consistent. ``GET /_bench/counts``
    returns the counters (workers snapshot them around their phases).
    """

    # BatchExecuteStatement: the relay sends INSERTs only (claims of new events), each statement billed as one write
    WRITE_OPS = ("PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "BatchExecuteStatement")

    def __init__(self, upstream: str, *, images: bool = True, stub_dynamodb: bool = False) -> None:
        self.upstream = urlsplit(upstream)
        self.images = images
        self.stub_dynamodb = stub_dynamodb
        self.lock = threading.Lock()
        self.counts: dict[str, float] = {}
        self.items: dict[str, Any] = {}  # the stub's table
        self.local = threading.local()

    thread_name = "bench-proxy"

    def _make_server(self) -> ThreadingHTTPServer:
        proxy = self

        class Handler(LoopbackHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/_bench/counts":
                    with proxy.lock:
                        body = json.dumps(proxy.counts).encode()
                    self._reply(200, {"Content-Type": "application/json"}, body)
                else:
                    self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

            def _reply(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                target = self.headers.get("X-Amz-Target", "")
                service, _, op = target.partition(".")
                ddb = service.startswith("DynamoDB")
                if ddb and proxy.stub_dynamodb:  # answers at once, every write accepted, items kept in memory
                    status, resp_headers, body = (
                        200,
                        {"Content-Type": "application/x-amz-json-1.0"},
                        proxy.stub(op, raw),
                    )
                    proxy._count(service, op, raw, headers, status, body, [])
                    self._reply(status, resp_headers, body)
                    return
                before = proxy._images(raw, headers) if ddb and op in proxy.WRITE_OPS and proxy.images else []
                status, resp_headers, body = proxy.send(method, self.path, raw, headers)
                proxy._count(service, op, raw, headers, status, body, before)
                self._reply(status, resp_headers, body)

        server = ThreadingHTTPServer((self.host, 0), Handler)
        server.request_queue_size = 128
        return server

    def stub(self, op: str, raw: bytes) -> bytes:
        """The stub's answer: PutItem and BatchWriteItem items are kept (no condition is checked) and served to GetItem
        and BatchGetItem, so a returning identity's state is found as it would be in DynamoDB; anything else is
        answered `{}` (an UpdateItem claim is accepted and returns no attributes)."""
        req = json.loads(raw or b"{}")

        def key(k: Mapping[str, Any]) -> str:
            return f"{k['pk']['S']}|{k['sk']['S']}"

        with self.lock:
            if op == "PutItem":
                self.items[key(req["Item"])] = req["Item"]
            elif op == "BatchWriteItem":
                for writes in req["RequestItems"].values():
                    for w in writes:
                        if "PutRequest" in w:
                            self.items[key(w["PutRequest"]["Item"])] = w["PutRequest"]["Item"]
            elif op == "BatchExecuteStatement":  # the relay's claims: each INSERT accepted
                shapes = [insert_shape(s["Statement"], s.get("Parameters") or []) for s in req["Statements"]]
                answers = [{"TableName": shape[0]} if shape else {} for shape in shapes]
                return json.dumps({"Responses": answers}).encode()
            elif op == "GetItem":
                item = self.items.get(key(req["Key"]))
                return json.dumps({"Item": item} if item else {}).encode()
            elif op == "BatchGetItem":
                found = {
                    table: [self.items[key(k)] for k in spec["Keys"] if key(k) in self.items]
                    for table, spec in req["RequestItems"].items()
                }
                return json.dumps({"Responses": found, "UnprocessedKeys": {}}).encode()
        return b"{}"

    def send(self, method: str, path: str, raw: bytes, headers: Mapping[str, str]) -> tuple[int, dict[str, str], bytes]:
        conn = getattr(self.local, "conn", None)
        for attempt in (1, 2):
            if conn is None:
                conn = self.local.conn = http.client.HTTPConnection(
                    self.upstream.hostname or "127.0.0.1", self.upstream.port, timeout=30
                )
            try:
                conn.request(method, path, body=raw, headers=dict(headers))
                resp = conn.getresponse()
                return resp.status, dict(resp.getheaders()), resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = self.local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _written_keys(raw: bytes) -> tuple[str, list[dict[str, Any]]]:
        """(table, keys of the items) a DynamoDB write request touches."""
        req = json.loads(raw)
        if "Statements" in req:
            inserts = [insert_shape(s["Statement"], s.get("Parameters") or []) for s in req["Statements"]]
            if not inserts or None in inserts:
                raise ValueError("not a batch of INSERTs")
            found = [shape for shape in inserts if shape is not None]
            return found[0][0], [{k: item[k] for k in ("pk", "sk")} for _, item in found]
        if "RequestItems" in req:
            ((table, _),) = req["RequestItems"].items()
            return table, [{k: item[k] for k in ("pk", "sk")} for item in batch_write_items(req)]
        return req["TableName"], [req.get("Key") or {k: req["Item"][k] for k in ("pk", "sk")}]

    def _images(self, raw: bytes, headers: Mapping[str, str]) -> list[int]:
        """Sizes of the items a DynamoDB write request touches, read now (uncounted)."""
        try:
            table, keys = self._written_keys(raw)
        except (ValueError, KeyError, TypeError):
            return []
        sizes = []
        for key in keys:
            get = json.dumps({"TableName": table, "Key": key, "ConsistentRead": True}).encode()
            hdrs = {**headers, "X-Amz-Target": "DynamoDB_20120810.GetItem", "Content-Length": str(len(get))}
            try:
                status, _, body = self.send("POST", "/", get, hdrs)
                sizes.append(item_size(json.loads(body).get("Item")) if status == 200 else 0)
            except (ValueError, KeyError, TypeError):
                sizes.append(0)
        return sizes

    def _count(
        self,
        service: str,
        op: str,
        raw: bytes,
        headers: Mapping[str, str],
        status: int,
        body: bytes,
        before: list[int],
    ) -> None:
        name = f"{service.split('_')[0].lower() or 'other'}.{op or 'other'}"
        units: dict[str, float] = {name: 1}
        if service.startswith("DynamoDB") and op in self.WRITE_OPS:
            after = self._images(raw, headers) if self.images and not self.stub_dynamodb else []
            try:
                touched = len(self._written_keys(raw)[1])
                unprocessed = json.loads(body).get("UnprocessedItems") or {} if status == 200 else {}
                left = sum(len(v) for v in unprocessed.values())
            except (ValueError, KeyError, TypeError, AttributeError):
                touched, left = 1, 0
            # Items billed. A batch: none for a refused request (throttled), each INSERT of a BatchExecuteStatement
            # (DuplicateItem or not), a BatchWriteItem's items but its unprocessed ones. A single write: 1, even when
            # it failed (a failed conditional write is billed, and the proxy cannot tell it from a throttled one).
            batch = op in ("BatchWriteItem", "BatchExecuteStatement")
            if status != 200:
                written = 0
            else:
                written = touched if op == "BatchExecuteStatement" else touched - left
            sizes = [max(b, a) for b, a in zip(before or [0] * touched, after or [0] * touched, strict=False)]
            units["ddb.write_requests"] = 1
            units["ddb.item_writes"] = written if batch else 1
            billed = sizes[:written] if batch else sizes[: max(written, 1)]
            units["ddb.wcu"] = sum(max(1, math.ceil(size / 1024)) for size in billed)
            units["ddb.max_item_bytes"] = 0
            if status != 200:
                units["ddb.failed_writes"] = 1
            with self.lock:
                self.counts["ddb.max_item_bytes"] = max(self.counts.get("ddb.max_item_bytes", 0), *after, 0)
        elif service.startswith("DynamoDB") and op == "GetItem":
            try:
                size = item_size(json.loads(body).get("Item"))
                consistent = bool(json.loads(raw).get("ConsistentRead"))
            except ValueError:
                size, consistent = 0, True
            units["ddb.read_requests"] = 1
            units["ddb.rru"] = max(1, math.ceil(size / 4096)) * (1 if consistent else 0.5)
        elif service.startswith("DynamoDB") and op == "BatchGetItem":
            # Priced like one GetItem per key: a found item by its size, a missing one at the minimum.
            try:
                tables = json.loads(raw).get("RequestItems", {})
                found = [i for items in json.loads(body).get("Responses", {}).values() for i in items]
                keys = sum(len(t.get("Keys", [])) for t in tables.values())
                consistent = all(t.get("ConsistentRead") for t in tables.values())
            except ValueError:
                tables, found, keys, consistent = {}, [], 0, True
            per_item = [max(1, math.ceil(item_size(i) / 4096)) for i in found] + [1] * max(keys - len(found), 0)
            units["ddb.read_requests"] = 1
            units["ddb.rru"] = sum(per_item) * (1 if consistent else 0.5)
        with self.lock:
            for k, v in units.items():
                if k != "ddb.max_item_bytes":
                    self.counts[k] = self.counts.get(k, 0) + v


def proxy_main(upstream: str, images: bool, stub: bool) -> int:
    """Run a CountingProxy until SIGTERM; the first stdout line is its URL."""
    import signal

    proxy = CountingProxy(upstream, images=images, stub_dynamodb=stub).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(proxy.url, flush=True)
    while not stop.wait(0.5):
        pass
    proxy.stop()
    return 0


@contextmanager
def proxy_process(upstream: str, *, images: bool = False, stub: bool = False) -> Iterator[str]:
    """A CountingProxy in its own process (its CPU is not the worker's), yielding its URL."""
    cmd = [sys.executable, "-m", "devtools.bench", "--proxy", upstream]
    cmd += ["--images"] if images else []
    cmd += ["--stub-dynamodb"] if stub else []
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError("proxy did not start")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def proxy_counts(url: str) -> dict[str, float]:
    import requests

    return dict(requests.get(f"{url}/_bench/counts", timeout=10).json())


def diff(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


# ============================================================================================ workers


def _relay_worker(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(FUNCTION_DIR))
    from relay.handler import lambda_handler

    from devtools.lambda_context import new_context

    space = spec["space"]
    idents = range(spec.get("identities", BATCH))
    out: dict[str, Any] = {"phases": {}}
    counts_url = spec.get("counts_url")
    tag = uuid.uuid4().hex[:8]
    for name, n_batches in spec["phases"]:
        snap = proxy_counts(counts_url) if counts_url else {}
        sys.stdout.flush()
        out0 = os.fstat(1).st_size  # the handler's log and EMF lines, as CloudWatch Logs would ingest them
        walls, failures = [], 0
        cpu0 = time.process_time()
        for b in range(n_batches):
            event = sqs_batch(f"{tag}-{name}-{b}", BATCH, idents, space)
            t0 = time.perf_counter()
            result = lambda_handler(event, new_context(30))
            walls.append(time.perf_counter() - t0)
            failures += len(result.get("batchItemFailures") or [])
        phase = {"cpu": time.process_time() - cpu0, "walls": walls, "events": n_batches * BATCH, "failures": failures}
        sys.stdout.flush()
        phase["stdout_bytes"] = os.fstat(1).st_size - out0
        if counts_url:
            phase["counts"] = diff(proxy_counts(counts_url), snap)
        out["phases"][name] = phase
    return out


def _edge_headers(token: str | None, secret: Mapping[str, str]) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers.update(
            {"Authorization": f"Bearer {token}", "x-api-key": secret["clientId"], "x-gw-ims-org-id": secret["orgId"]}
        )
    return headers


def _ims_token(post: Callable[..., Any], secret: Mapping[str, str]) -> str:
    resp = post(
        os.environ["IMS_TOKEN_URL"],
        data={
            "grant_type": "client_credentials",
            "client_id": secret["clientId"],
            "client_secret": secret["clientSecret"],
            "scope": secret["scopes"],
        },
        timeout=10,
    )
    resp.raise_for_status()
    return str(resp.json()["access_token"])


def _simple_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``naive`` (new connection + secret read per event) or ``floor`` (reused session, nothing else)."""
    import boto3
    import requests

    naive = spec["kind"] == "naive"
    ddb = boto3.client("dynamodb")
    sm = boto3.client("secretsmanager")
    table, url = os.environ["HANDLES_TABLE"], os.environ["EDGE_BASE_URL"] + "/ee/v2/interact"
    secret = json.loads(sm.get_secret_value(SecretId=os.environ["ADOBE_SECRET_ID"])["SecretString"])
    session = requests.Session()
    token = _ims_token(session.post, secret)  # once: even the naive baseline caches its token
    space, tag = spec["space"], uuid.uuid4().hex[:8]

    def one(i: int) -> None:
        body = interact_body(f"{tag}-{spec['kind']}-{i}", i % BATCH, space)
        if naive:
            secret_now = json.loads(sm.get_secret_value(SecretId=os.environ["ADOBE_SECRET_ID"])["SecretString"])
            post: Callable[..., Any] = requests.post  # a new connection per event
        else:
            secret_now, post = secret, session.post
        resp = post(
            url,
            params={"datastreamId": os.environ["DATASTREAM_ID"], "requestId": str(uuid.uuid4())},
            data=json.dumps(body, separators=(",", ":")).encode(),
            headers=_edge_headers(token, secret_now),
            timeout=(3, 10),
        )
        answer = resp.json()
        ddb.put_item(
            TableName=table,
            Item={
                "pk": {"S": f"EVENT#{body['event']['xdm']['_id']}"},
                "sk": {"S": "RESULT"},
                "status": {"S": "delivered" if resp.status_code == 200 else "rejected"},
                "handle": {"S": json.dumps(answer.get("handle", []), separators=(",", ":"))},
            },
        )

    for i in range(spec.get("warm", 5)):
        one(-1 - i)
    n = spec["events"]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        one(i)
    return {"phases": {"run": {"cpu": time.process_time() - cpu0, "walls": [time.perf_counter() - t0], "events": n}}}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries that over from before exec."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _posts_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """``posts``: the harness's own ceiling. BATCH_CONCURRENCY threads that only POST each batch's 100 events to Edge
    over the relay's own session settings (no claim, no state, no result): what any relay could reach on this machine
    and simulator."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    conc = int(os.environ.get("BATCH_CONCURRENCY", "16"))
    sm = boto3.client("secretsmanager")
    secret = json.loads(sm.get_secret_value(SecretId=os.environ["ADOBE_SECRET_ID"])["SecretString"])
    from relay.runtime import new_http_session

    session = new_http_session(conc)  # the relay's own session: pool, no environment scan, no retries
    headers = _edge_headers(_ims_token(session.post, secret), secret)
    url, tag = os.environ["EDGE_BASE_URL"] + "/ee/v2/interact", uuid.uuid4().hex[:8]

    def one(i: int, b: int) -> None:
        body = interact_body(f"{tag}-posts-{b}-{i}", i, spec["space"])
        resp = session.post(
            url,
            params={"datastreamId": os.environ["DATASTREAM_ID"]},
            data=json.dumps(body, separators=(",", ":")).encode(),
            headers=headers,
            timeout=(3, 10),
        )
        resp.json()

    walls = []
    with ThreadPoolExecutor(conc) as pool:
        for b in range(spec["warm"] + spec["batches"]):
            t0 = time.perf_counter()
            list(pool.map(lambda i, b=b: one(i, b), range(BATCH)))
            if b >= spec["warm"]:
                walls.append(time.perf_counter() - t0)
    return {"phases": {"run": {"walls": walls, "events": len(walls) * BATCH}}}


def worker_result(out: Path, returncode: int, stderr: str, kind: str) -> dict[str, Any]:
    """What a worker process wrote to `out` (deleted once read), or its stderr's end when it failed."""
    if returncode != 0:
        raise RuntimeError(f"{kind} worker failed: {stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    out.unlink()
    return result


def worker_main(kind: str, spec_json: str, out_path: str) -> int:
    spec = json.loads(spec_json)
    spec["kind"] = kind
    workers = {"relay": _relay_worker, "posts": _posts_worker}
    result = workers.get(kind, _simple_worker)(spec)
    result["maxrss_mb"] = peak_rss_mb()
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ============================================================================================ cold start

COLD_RELAY = """
import sys, time, json
from relay.handler import lambda_handler
class Context:
    def get_remaining_time_in_millis(self):
        return 30000
r = lambda_handler(json.loads(sys.argv[1]), Context())
t = time.time()
assert not r["batchItemFailures"], r
print("BENCH", t, file=sys.stderr)
"""

# The floor: only boto3 and requests, the clients an SQS event needs, and the same first calls.
COLD_FLOOR = """
import sys, time, os, json, uuid
import boto3, requests
ddb = boto3.client("dynamodb"); sm = boto3.client("secretsmanager")
s = requests.Session()
secret = json.loads(sm.get_secret_value(SecretId=os.environ["ADOBE_SECRET_ID"])["SecretString"])
tok = s.post(os.environ["IMS_TOKEN_URL"], data={"grant_type": "client_credentials", "client_id": secret["clientId"],
    "client_secret": secret["clientSecret"], "scope": secret["scopes"]}, timeout=10).json()["access_token"]
body = {"event": {"xdm": {"_id": sys.argv[1], "eventType": "web.webpagedetails.pageViews", "identityMap": {"ECID":
    [{"id": "%06d%032d" % (int(sys.argv[2]), 0), "primary": True}]}, "timestamp": "2026-01-01T00:00:30.000Z"}}}
r = s.post(os.environ["EDGE_BASE_URL"] + "/ee/v2/interact", params={"datastreamId": os.environ["DATASTREAM_ID"]},
    data=json.dumps(body), headers={"Content-Type": "application/json", "Authorization": "Bearer " + tok,
    "x-api-key": secret["clientId"], "x-gw-ims-org-id": secret["orgId"]}, timeout=10)
ddb.put_item(TableName=os.environ["HANDLES_TABLE"], Item={"pk": {"S": "EVENT#" + sys.argv[1]}, "sk": {"S": "RESULT"},
    "handle": {"S": json.dumps(r.json()["handle"])}})
t = time.time()
print("BENCH", t, file=sys.stderr)
"""


def cold_start(env: Mapping[str, str], code: str, space: int, *, importtime: bool = False) -> tuple[float, str]:
    """Seconds from spawning ``python`` to the first event handled; stderr (for -X importtime)."""
    event_id = uuid.uuid4().hex
    arg = json.dumps(sqs_batch(event_id, 1, range(1), space)) if code is COLD_RELAY else event_id
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-c", code, arg, str(space)]
    t0 = time.time()
    proc = subprocess.run(cmd, env=dict(env), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    match = re.search(r"^BENCH ([0-9.]+)$", proc.stderr, re.M)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"cold start child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return float(match.group(1)) - t0, proc.stderr


def compiled_function(dest: Path) -> Path:
    """A copy of the relay's code with its bytecode, as `make build` ships it (checked-hash: sam build alone ships
    sources, and Lambda's /var/task is read-only, so the runtime could not cache what it compiles). Without it, the
    relay's cold start here would compile its own modules whenever the machine sets PYTHONDONTWRITEBYTECODE, and
    reuse a cache its earlier runs wrote when it does not, while the floor's packages always come with pip's."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(FUNCTION_DIR / "relay", dest / "relay", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if not compileall.compile_dir(dest, quiet=1, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH):
        raise RuntimeError(f"could not compile {dest}")
    return dest


def import_offenders(relay_err: str, floor_err: str, top: int = 8) -> tuple[list[tuple[str, float]], float]:
    """What the relay's cold start imports that the floor's does not: self time (ms) summed per package
    (first two dotted components), biggest first, and the total. Self times add up; cumulative ones overlap."""

    def parse(text: str) -> dict[str, float]:
        mods: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
            if m:
                mods[m.group(3)] = int(m.group(1)) / 1000
        return mods

    floor_mods, relay_mods = parse(floor_err), parse(relay_err)
    groups: dict[str, float] = {}
    for mod, ms in relay_mods.items():
        if mod in floor_mods:
            continue
        parts = mod.split(".")
        key = ".".join(parts[:3] if parts[0] == "aws_lambda_powertools" else parts[:2])
        groups[key] = groups.get(key, 0) + ms
    ranked = sorted(groups.items(), key=lambda kv: -kv[1])
    return ranked[:top], sum(groups.values())


# ============================================================================================ orchestration


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.space = int(time.time()) % 900_000  # identities of this run are new to the simulator and the table
        self.tmp = ROOT / ".local"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {**os.environ, **self.stack_env, **overrides}
        env["PYTHONPATH"] = os.pathsep.join([str(FUNCTION_DIR), str(ROOT)])
        env.setdefault("PYTHONHASHSEED", "0")
        return env

    def worker(self, kind: str, spec: dict[str, Any], **env: str) -> dict[str, Any]:
        out = self.tmp / f"bench-worker-{uuid.uuid4().hex}.json"
        spec = {"space": self.space, **spec}
        cmd = [sys.executable, "-m", "devtools.bench", "--worker", kind, "--spec", json.dumps(spec), "--out", str(out)]
        # Its stdout (logs, EMF) goes to a file, so the relay worker can measure what it wrote.
        with out.with_suffix(".stdout").open("wb") as stdout:
            proc = subprocess.run(
                cmd,
                env=self.env(**env),
                cwd=ROOT,
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
                timeout=600,
                check=False,
            )
        out.with_suffix(".stdout").unlink()
        return worker_result(out, proc.returncode, proc.stderr, kind)

    def run(self) -> int:
        from contextlib import ExitStack

        from devtools.stack import LocalStack

        reps = 1 if self.quick else 3
        log = lambda msg: print(f"# {msg}", file=sys.stderr, flush=True)  # noqa: E731
        with LocalStack() as stack, ExitStack() as procs:
            # moto answers every request with `Connection: close`; real AWS keeps connections open. Every worker
            # reaches moto through a keep-alive proxy in its own process, so no one pays a TCP connect per call.
            fwd = procs.enter_context(proxy_process(stack.moto.url))
            stub = procs.enter_context(proxy_process(stack.moto.url, stub=True))
            counter = procs.enter_context(proxy_process(stack.moto.url, images=True))
            self.stack_env = {
                **stack.env,
                "POWERTOOLS_LOG_LEVEL": "INFO",  # the deployed level; the relay worker counts its stdout (logs, EMF)
                "AWS_ENDPOINT_URL_DYNAMODB": fwd,
                "AWS_ENDPOINT_URL_SECRETS_MANAGER": fwd,
            }
            sim = stack.sim
            conc = int(self.stack_env.get("BATCH_CONCURRENCY", "16"))
            r: dict[str, Any] = {"conc": conc, "ideal": conc / EDGE_LATENCY}

            # 1. throughput (Edge answers after 50 ms): relay and naive interleaved, DynamoDB = moto and = a stub.
            sim.set_latency(EDGE_LATENCY)
            tp_batches = 3 if self.quick else 5
            runs: dict[str, list[float]] = {}
            for i in range(reps):
                for where, ddb in (("moto", fwd), ("stub", stub)):
                    log(f"throughput {i + 1}/{reps}, DynamoDB {where}")
                    spec = {"phases": [["warm", 1], ["tp", tp_batches]], "counts_url": ddb}
                    w = self.worker("relay", spec, AWS_ENDPOINT_URL_DYNAMODB=ddb)
                    ph = w["phases"]["tp"]
                    assert ph["failures"] == 0, ph
                    wall = sum(ph["walls"])
                    runs.setdefault(f"tp_{where}", []).append(ph["events"] / wall)
                    runs.setdefault(f"dur_{where}", []).append(statistics.median(ph["walls"]) / BATCH)
                    runs.setdefault(f"ddb_rps_{where}", []).append(
                        sum(v for k, v in ph["counts"].items() if k.startswith("dynamodb.")) / wall
                    )
                    runs.setdefault("rss", []).append(w["maxrss_mb"])
                    naive_spec = {"events": 30 if self.quick else 50, "warm": 3}
                    before = {**proxy_counts(fwd), **{f"ddb:{k}": v for k, v in proxy_counts(ddb).items()}}
                    n = self.worker("naive", naive_spec, AWS_ENDPOINT_URL_DYNAMODB=ddb)["phases"]["run"]
                    after = {**proxy_counts(fwd), **{f"ddb:{k}": v for k, v in proxy_counts(ddb).items()}}
                    runs.setdefault(f"naive_{where}", []).append(n["events"] / n["walls"][0])
                    if where == "stub":  # the harness's ceiling, next to the relay's stub run
                        p = self.worker("posts", {"warm": 1, "batches": tp_batches})["phases"]["run"]
                        runs.setdefault("tp_posts", []).append(p["events"] / sum(p["walls"]))
                    # Its calls, counted by the proxies (warm-up events included), not assumed.
                    calls, sent = diff(after, before), naive_spec["events"] + naive_spec["warm"]
                    runs.setdefault("naive_secrets", []).append(calls.get("secretsmanager.GetSecretValue", 0) / sent)
                    runs.setdefault("naive_puts", []).append(calls.get("ddb:dynamodb.PutItem", 0) / sent)
            for k, v in runs.items():
                r[k] = max(v) if k == "rss" else statistics.median(v)

            # 2. CPU per event (Edge answers at once): relay (pool 16, pool 1) and the floor, interleaved.
            sim.set_latency(0)
            cpu_batches = 3 if self.quick else 5
            for i in range(reps):
                log(f"cpu {i + 1}/{reps}")
                spec = {"phases": [["warm", 1], ["cpu", cpu_batches]]}
                ph = self.worker("relay", spec)["phases"]["cpu"]
                runs.setdefault("cpu", []).append(ph["cpu"] / ph["events"])
                ph = self.worker("relay", spec, BATCH_CONCURRENCY="1")["phases"]["cpu"]
                runs.setdefault("cpu1", []).append(ph["cpu"] / ph["events"])
                f = self.worker("floor", {"events": cpu_batches * BATCH, "warm": 20})
                runs.setdefault("floor_cpu", []).append(f["phases"]["run"]["cpu"] / f["phases"]["run"]["events"])
                runs.setdefault("floor_rss", []).append(f["maxrss_mb"])
            for k in ("cpu", "cpu1", "floor_cpu"):
                r[k] = statistics.median(runs[k])
            r["floor_rss"] = max(runs["floor_rss"])

            # 3. cold start, interleaved, median of >= 5 each (Edge answers at once).
            cold_n = 3 if self.quick else 7
            env = self.env()
            env["PYTHONPATH"] = os.pathsep.join([str(compiled_function(self.tmp / "bench-function")), str(ROOT)])
            env.pop("PYTHONPYCACHEPREFIX", None)  # it would send both children to a cache of their own, empty
            cold_start(env, COLD_FLOOR, self.space)  # warm the page cache for both
            cold_start(env, COLD_RELAY, self.space)
            relay_cold, floor_cold = [], []
            for i in range(cold_n):
                log(f"cold start {i + 1}/{cold_n}")
                relay_cold.append(cold_start(env, COLD_RELAY, self.space)[0])
                floor_cold.append(cold_start(env, COLD_FLOOR, self.space)[0])
            r["cold"], r["floor_cold"] = statistics.median(relay_cold), statistics.median(floor_cold)
            _, relay_imports = cold_start(env, COLD_RELAY, self.space, importtime=True)
            _, floor_imports = cold_start(env, COLD_FLOOR, self.space, importtime=True)
            r["offenders"], r["extra_import_ms"] = import_offenders(relay_imports, floor_imports)

            # 4. DynamoDB, Secrets Manager and IMS calls, through the counting proxy (item images read).
            log("counts")
            ims0 = sim.stats()["ims_requests"]
            w = self.worker(
                "relay",
                {
                    "phases": [["first", 1], ["returning", 2 if self.quick else 4]],
                    "counts_url": counter,
                    "space": self.space + 1,
                },  # identities never seen before
                AWS_ENDPOINT_URL_DYNAMODB=counter,
                AWS_ENDPOINT_URL_SECRETS_MANAGER=counter,
            )
            r["ims"] = sim.stats()["ims_requests"] - ims0
            ph = w["phases"]
            total = sum(p["events"] for p in ph.values())
            secrets = 0.0
            for name, p in ph.items():
                assert p["failures"] == 0, p
                c, n = p["counts"], p["events"]
                secrets += c.get("secretsmanager.GetSecretValue", 0)
                r[f"w_{name}"] = c.get("ddb.write_requests", 0) / n
                r[f"iw_{name}"] = c.get("ddb.item_writes", 0) / n
                r[f"wcu_{name}"] = c.get("ddb.wcu", 0) / n
                r[f"rru_{name}"] = c.get("ddb.rru", 0) / n
                r[f"log_bytes_{name}"] = p["stdout_bytes"] / n
            r["max_item"] = proxy_counts(counter).get("ddb.max_item_bytes", 0)
            r["events_counted"] = total
            r["secrets"] = secrets / total * 1000
            r["ims_per_k"] = r["ims"] / total * 1000
        r["quick"] = self.quick
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(r, indent=1), encoding="utf-8")
        self.print_table(r)
        return 0

    # ---------------------------------------------------------------------------------------- report

    @staticmethod
    def lambda_duration(r: Mapping[str, Any], memory_mb: int) -> float:
        """Modelled Lambda duration per event at ``memory_mb`` (seconds).

        The longer of: the Edge-bound time (ceil(100 / pool) rounds of 50 ms per batch of 100) and the relay's CPU
        per event stretched by the vCPU share of that memory (1 vCPU at 1,769 MB; one Python process cannot use
        more than one vCPU, the GIL). Local CPU stands in for Graviton's.
        """
        edge_bound = math.ceil(BATCH / r["conc"]) * EDGE_LATENCY / BATCH
        share = min(memory_mb, LAMBDA_MB_PER_VCPU) / LAMBDA_MB_PER_VCPU
        return max(edge_bound, r["cpu"] / share)

    @staticmethod
    def cost_per_million(
        duration_s: float, memory_mb: int, wru: float, rru: float, secrets_per_k: float, log_bytes: float = 0
    ) -> float:
        lam = duration_s * memory_mb / 1024 * LAMBDA_ARM_GB_S + LAMBDA_REQUEST / BATCH
        other = (
            wru * DDB_WRU + rru * DDB_RRU + SQS_REQUESTS_PER_EVENT * SQS_REQUEST + secrets_per_k / 1000 * SECRETS_CALL
        )
        return 1e6 * (lam + other + log_bytes * CWL_INGEST_BYTE)

    def print_table(self, r: dict[str, Any]) -> None:
        rows: list[tuple[str, ...]] = []

        def row(measure: str, relay: float, base: float | None, fmt: str, target: str, ok: bool | None) -> None:
            ratio = relay / base if base else None
            rows.append(
                (
                    measure,
                    format(relay, fmt),
                    "-" if base is None else format(base, fmt),
                    "-" if ratio is None else f"{ratio:.3f}" if ratio < 1 else f"{ratio:.2f}",
                    target,
                    "-" if ok is None else ("PASS" if ok else "FAIL"),
                )
            )

        for where, label in (("moto", "moto"), ("stub", "stub answering at once")):
            tp = r[f"tp_{where}"]
            row(
                f"throughput events/s vs ideal {r['conc']}/50 ms, DynamoDB {label}",
                tp,
                r["ideal"],
                ".0f",
                ">= 0.80",
                tp / r["ideal"] >= 0.80,
            )
            row(
                f"throughput events/s vs naive, DynamoDB {label}",
                tp,
                r[f"naive_{where}"],
                ".1f",
                ">= 10",
                tp / r[f"naive_{where}"] >= 10,
            )
        if "tp_posts" in r:  # runs before this line was added have no ceiling
            row(
                f"  context: a client that only POSTs ({r['conc']} threads, batches of 100) vs ideal",
                r["tp_posts"],
                r["ideal"],
                ".0f",
                "-",
                None,
            )
            row("  context: relay (stub) vs that client", r["tp_stub"], r["tp_posts"], ".0f", "-", None)
        row("  context: DynamoDB requests/s moto sustained (relay run)", r["ddb_rps_moto"], None, ".0f", "-", None)
        row(
            "CPU ms/event, Edge at once, pool 16 vs floor (1 POST + 1 put_item)",
            r["cpu"] * 1e3,
            r["floor_cpu"] * 1e3,
            ".2f",
            "<= 1.5",
            r["cpu"] / r["floor_cpu"] <= 1.5,
        )
        row("  context: CPU ms/event with BATCH_CONCURRENCY=1", r["cpu1"] * 1e3, r["floor_cpu"] * 1e3, ".2f", "-", None)
        row(
            "cold start to first event handled, ms vs floor",
            r["cold"] * 1e3,
            r["floor_cold"] * 1e3,
            ".0f",
            "<= 1.3",
            r["cold"] / r["floor_cold"] <= 1.3,
        )
        row("  context: import self-time the floor does not spend, ms", r["extra_import_ms"], None, ".0f", "-", None)
        # Write requests = API calls (a BatchWriteItem of 25 results is one); item writes = what DynamoDB bills
        # (every item of a BatchWriteItem is billed like its own PutItem). Both are shown; the target reads on both.
        for name, label in (("returning", "returning identity"), ("first", "first-seen identity")):
            row(f"DynamoDB write requests/event, {label}", r[f"w_{name}"], None, ".2f", "<= 2", r[f"w_{name}"] <= 2)
            row(f"DynamoDB item writes/event, {label}", r[f"iw_{name}"], None, ".2f", "<= 2", r[f"iw_{name}"] <= 2)
        for name, label in (("returning", "returning"), ("first", "first-seen")):
            row(
                f"DynamoDB WCU/event vs item writes, {label}",
                r[f"wcu_{name}"],
                r[f"iw_{name}"],
                ".2f",
                "= 1.00",
                r[f"wcu_{name}"] <= r[f"iw_{name}"] + 1e-9,
            )
        row("  context: RRU/event returning | first-seen", r["rru_returning"], r["rru_first"], ".2f", "-", None)
        row("  context: largest item written, bytes", r["max_item"], None, ".0f", "-", None)
        row(
            f"Secrets Manager reads/1,000 events ({r['events_counted']} events, 1 cold start) vs naive",
            r["secrets"],
            r["naive_secrets"] * 1000,
            ".2f",
            "-",
            None,
        )
        row("IMS token requests/1,000 events (same run)", r["ims_per_k"], None, ".2f", "-", None)
        row("peak memory of the handler process, MB vs floor", r["rss"], r["floor_rss"], ".0f", "< 512", r["rss"] < 512)
        # The smallest memory at which the model stops being CPU-bound (capped at one vCPU: the GIL).
        edge_bound = math.ceil(BATCH / r["conc"]) * EDGE_LATENCY / BATCH
        knee = int(min(max(math.ceil(r["cpu"] / edge_bound * LAMBDA_MB_PER_VCPU / 64) * 64, 128), LAMBDA_MB_PER_VCPU))
        d512, drec = self.lambda_duration(r, 512), self.lambda_duration(r, RECOMMENDED_MB)
        naive_d = 1 / r["naive_moto"]
        row(
            f"Lambda duration ms/event at {RECOMMENDED_MB} MB (model) vs naive at 512 MB",
            drec * 1e3,
            naive_d * 1e3,
            ".2f",
            "-",
            None,
        )
        wru, rru = r["wcu_returning"], r["rru_returning"]
        # CloudWatch Logs: what the handler wrote per event (returning identities) and Lambda's lines per batch. Runs
        # from before it was measured have no such number, and their cost leaves the logs out.
        platform = PLATFORM_LOG_BYTES / BATCH
        logs = r["log_bytes_returning"] + platform if "log_bytes_returning" in r else 0.0
        crec = self.cost_per_million(drec, RECOMMENDED_MB, wru, rru, r["secrets"], logs)
        # The naive Lambda's measured duration, Secrets Manager reads and PutItems (one small item each: 1 WRU); it
        # logs nothing of its own.
        naive_logs = platform if logs else 0.0
        cnaive = self.cost_per_million(naive_d, 512, r["naive_puts"], 0, r["naive_secrets"] * 1000, naive_logs)
        row(f"cost $/million events, arm64 {RECOMMENDED_MB} MB, vs naive at 512 MB", crec, cnaive, ".2f", "-", None)
        if logs:
            row("  context: CloudWatch Logs bytes/event (logs, EMF, Lambda's lines)", logs, None, ".1f", "-", None)
            row("  CloudWatch Logs share of it: $/million", 1e6 * logs * CWL_INGEST_BYTE, None, ".3f", "-", None)
        row(
            f"  Lambda share of it: $/million at {RECOMMENDED_MB} MB | at 512 MB",
            1e6 * (drec * RECOMMENDED_MB / 1024 * LAMBDA_ARM_GB_S + LAMBDA_REQUEST / BATCH),
            1e6 * (d512 * 0.5 * LAMBDA_ARM_GB_S + LAMBDA_REQUEST / BATCH),
            ".3f",
            "-",
            None,
        )
        row(
            f"  Lambda duration ms/event at {RECOMMENDED_MB} MB vs 512 MB (model)",
            drec * 1e3,
            d512 * 1e3,
            ".2f",
            "-",
            None,
        )
        row("  context: smallest memory at which the model is Edge-bound, MB", knee, None, ".0f", "-", None)

        header = ("measure", "relay", "baseline/floor", "ratio", "target", "pass")
        widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
        print("  ".join(h.ljust(widths[i]) for i, h in enumerate(header)).rstrip())
        print("  ".join("-" * w for w in widths))
        for x in rows:
            print("  ".join(c.ljust(widths[i]) for i, c in enumerate(x)).rstrip())
        print()
        print("cold start: imports the floor does not need (self time ms, summed per package, one -X importtime run):")
        for mod, ms in r["offenders"]:
            print(f"  {ms:7.1f}  {mod}")
        print(
            f"\n{'quick' if self.quick else 'full'} run; medians of interleaved relay/baseline worker processes; "
            f"CPU {self.cpu_model()}, {os.cpu_count()} cores shared. Absolute numbers are context only."
        )

    @staticmethod
    def cpu_model() -> str:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches and repetitions (about a minute)")
    parser.add_argument("--report", action="store_true", help="print the table of the last run again")
    parser.add_argument("--worker", choices=("relay", "naive", "floor", "posts"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--proxy", help=argparse.SUPPRESS)
    parser.add_argument("--images", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stub-dynamodb", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.proxy:
        return proxy_main(args.proxy, args.images, args.stub_dynamodb)
    if args.report:
        if not RESULTS.exists():
            print(f"no previous run to report ({RESULTS.relative_to(ROOT)} is kept by `make bench`)", file=sys.stderr)
            return 1
        bench = Bench(quick=False)
        raw = json.loads(RESULTS.read_text(encoding="utf-8"))
        bench.quick = bool(raw.get("quick"))
        bench.print_table(raw)
        return 0
    if args.worker:
        return worker_main(args.worker, args.spec, args.out)
    from devtools.stack import stop_on_sigterm

    stop_on_sigterm()
    return Bench(args.quick).run()


if __name__ == "__main__":
    sys.exit(main())
