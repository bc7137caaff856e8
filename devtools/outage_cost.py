"""What events cost while Edge fails: the table of README.md "While Edge fails", measured on the local stack.

``python -m devtools.outage_cost`` (``--scenarios 1,4,6`` for a subset) runs each scenario on 100 events of
first-seen identities, at the template's settings, and prints one table. Layout as ``make bench`` (docs/benchmark.md):
this process runs the local stack (Edge simulator in-process, moto as a child process) and a counting proxy in front
of moto (``devtools.bench.proxy_process(..., images=True)``); each scenario runs in a fresh *worker* process that
imports the real handler (``relay.handler.lambda_handler``) and calls it directly, so its stdout (the handler's log
and EMF lines) is the handler's alone. Faults are injected through the simulator's control API (``add_fault``).

Scenarios (Edge answers 50 ms after a request arrives, as in the bench's cost assumptions):

1. Edge answers (baseline).
2. Edge answers 503 with ``Retry-After: 1`` to each record's first call only, then delivers (one receive).
3. Edge answers 503 through the first two receives of each record, then delivers.
4. Edge answers 503 through all 5 receives: every record reaches the dead-letter queue.
5. Edge answers 429 with ``Retry-After: 400`` once per record (the relay postpones the record with
   ``ChangeMessageVisibilityBatch``), then delivers.
6. Webhook events (HTTP API v2, signed as a Standard Webhooks sender does) while Edge answers 503: the handler
   answers 202 and queues them (``SendMessage``); Edge then recovers and the queued messages are delivered through
   the SQS path. The webhook invocations run in ``WEBHOOK_SHARDS`` processes at once, one at a time in each.
7. Edge answers 503 through the first receive of each record, then delivers (the README's row "through the first
   receive").

The 503s of scenarios 3, 4, 6 and 7 carry ``Retry-After: 1`` (``--retry-after``, default 1, as the README's table
was measured; ``--retry-after 0``: none, and the relay waits its own backoff, 0.1-1.6 s, between attempts).

An SQS receive is one invocation with the records still pending: the first with 100 records, each redelivery with
the records the handler returned in ``batchItemFailures`` and ``ApproximateReceiveCount`` + 1; a record still failing
at its 5th receive is counted as dead-lettered (the queue's ``maxReceiveCount``). The first receive's messages are
real messages of the stack's queue (so ``ChangeMessageVisibilityBatch`` finds them), turned into records as
``devtools/poller.py`` does; redeliveries reuse them, not waiting out the visibility timeout.

What is measured: Edge calls (the simulator's counters), DynamoDB requests, write and read units, and the relay's own
SQS and Secrets Manager calls (the counting proxy), the handler's stdout bytes, and the wall time of each invocation.
What is estimated: Lambda duration = that wall time (at the template's MemorySize; local CPU stands in for Graviton);
Lambda's START/END/REPORT lines (``PLATFORM_LOG_BYTES`` per invocation); the event source mapping's SQS requests
(the producer's ``SendMessage`` per SQS event, a ``ReceiveMessage`` per 10 record receives, a ``DeleteMessageBatch``
per 10 records acknowledged). A warm-up event per worker is excluded (the cold start's secret reads and IMS token).
API Gateway ($1.00 per million requests) and its access-log line are not in the webhook row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from devtools.bench import (
    CWL_INGEST_BYTE,
    DDB_RRU,
    DDB_WRU,
    FUNCTION_DIR,
    LAMBDA_ARM_GB_S,
    LAMBDA_REQUEST,
    PLATFORM_LOG_BYTES,
    RECOMMENDED_MB,
    ROOT,
    SECRETS_CALL,
    SQS_REQUEST,
    Bench,
    diff,
    interact_body,
    proxy_counts,
    proxy_process,
    worker_result,
)

EVENTS = 100
MAX_RECEIVES = 5  # the template's RedrivePolicy maxReceiveCount
EDGE_LATENCY = 0.05
# Webhook events are posted by this many worker processes at once, each one invocation at a time as an execution
# environment runs them (the relay serialises webhook invocations on one runtime).
WEBHOOK_SHARDS = 10
SCENARIOS: dict[int, str] = {
    1: "answers (baseline)",
    2: "503 (Retry-After: 1) to each record's first call, then delivers",
    3: "503{ra} for two receives, then delivers",
    4: "503{ra} until the dead-letter queue (5 receives)",
    5: "429 (Retry-After: 400) once per record, postponed, then delivers",
    6: "503{ra} to a webhook (202, queued, delivered later)",
    7: "503{ra} through the first receive, then delivers",
}


def label(scenario: int, retry_after: int) -> str:
    return SCENARIOS[scenario].format(ra=f" (Retry-After: {retry_after})" if retry_after else " (no Retry-After)")


def outage_fault(retry_after: int) -> dict[str, Any]:
    """The 503 of scenarios 3, 4, 6 and 7: with `Retry-After: N`, or none (the relay's own backoff) when 0."""
    return {"status": 503, "retry_after": retry_after or None}


# ============================================================================================ worker


class Worker:
    """One scenario in its own process: the handler on one warm runtime, faults set through the simulator's API."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        sys.path.insert(0, str(FUNCTION_DIR))
        from relay.handler import lambda_handler

        from devtools.edge_sim import SimulatorClient
        from devtools.resources import aws_client

        self.handler: Callable[[dict[str, Any], Any], Any] = lambda_handler
        self.spec = spec
        self.sim = SimulatorClient(spec["sim_url"])
        self.sqs = aws_client("sqs", spec["moto_url"], spec["region"])  # the harness's own calls: not counted
        self.invocations: list[dict[str, Any]] = []
        self.receives = 0  # record receives (a record handed to the handler from SQS)
        self.acknowledged = 0
        self.dead_lettered = 0
        self.webhook_statuses: dict[str, int] = {}

    def context(self) -> Any:
        from devtools.lambda_context import new_context

        return new_context(self.spec["timeout"], memory_limit_in_mb=self.spec["memory_mb"])

    def invoke(self, event: dict[str, Any], kind: str) -> Any:
        t0 = time.perf_counter()
        result = self.handler(event, self.context())
        self.invocations.append({"kind": kind, "wall": time.perf_counter() - t0})
        return result

    # ---------------------------------------------------------------------------------------- SQS

    def send(self, bodies: list[str]) -> None:
        for i in range(0, len(bodies), 10):
            entries = [{"Id": str(j), "MessageBody": b} for j, b in enumerate(bodies[i : i + 10])]
            resp = self.sqs.send_message_batch(QueueUrl=self.spec["queue_url"], Entries=entries)
            if resp.get("Failed"):
                raise RuntimeError(f"send_message_batch failed: {resp['Failed']}")

    def receive(self, n: int) -> list[dict[str, Any]]:
        """``n`` messages of the queue as Lambda SQS records (devtools/poller.py's shape)."""
        from devtools.poller import record_from_message

        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while len(messages) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(messages)} of {n} messages arrived in the queue")
            got = self.sqs.receive_message(
                QueueUrl=self.spec["queue_url"],
                MaxNumberOfMessages=min(10, n - len(messages)),
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
                WaitTimeSeconds=1,
            ).get("Messages")
            messages.extend(got or [])
        return [record_from_message(m, self.spec["queue_arn"], self.spec["region"]) for m in messages]

    def sqs_rounds(self, records: list[dict[str, Any]], before_receive: Callable[[int], None]) -> None:
        """Receive 1..5: invoke with the pending records, redeliver those handed back with their count + 1."""
        try:
            self._rounds(records, before_receive)
        finally:  # the harness's own deletes (uncounted): nothing of this scenario is received again
            for i in range(0, len(records), 10):
                entries = [
                    {"Id": str(j), "ReceiptHandle": r["receiptHandle"]} for j, r in enumerate(records[i : i + 10])
                ]
                self.sqs.delete_message_batch(QueueUrl=self.spec["queue_url"], Entries=entries)

    def _rounds(self, records: list[dict[str, Any]], before_receive: Callable[[int], None]) -> None:
        pending = records
        for receive in range(1, MAX_RECEIVES + 1):
            before_receive(receive)
            for r in pending:
                r["attributes"]["ApproximateReceiveCount"] = str(receive)
            self.receives += len(pending)
            result = self.invoke({"Records": pending}, "sqs")
            failed = {f["itemIdentifier"] for f in (result or {}).get("batchItemFailures") or []}
            self.acknowledged += len(pending) - len(failed)
            pending = [r for r in pending if r["messageId"] in failed]
            if not pending:
                return
        self.dead_lettered = len(pending)

    # ---------------------------------------------------------------------------------------- webhook

    def webhook_event(self, body: str) -> dict[str, Any]:
        from devtools.gateway import build_event
        from devtools.signing import sign_webhook

        headers = {"content-type": "application/json", "user-agent": "outage-cost/1"}
        headers.update(sign_webhook(body, self.spec["webhook_secret"]))
        return build_event(
            method="POST",
            raw_path="/events",
            raw_query="",
            headers=list(headers.items()),
            body=body.encode("utf-8"),
            route_key="POST /events",
            source_ip="203.0.113.10",
        )

    def post(self, body: str) -> int:
        result = self.invoke(self.webhook_event(body), "webhook")
        return int(result.get("statusCode", 0)) if isinstance(result, dict) else 0

    # ---------------------------------------------------------------------------------------- run

    def warm_up(self) -> None:
        """One delivered event on an identity of its own (a webhook one for a webhook shard): the cold start's secret
        reads, IMS token and clients, left out of the counts. Built directly (bench's record shape), not queued: a
        successful record makes no SQS call, and the queue may hold the scenario's messages."""
        from devtools.bench import sqs_batch

        space = self.spec["space"] + 500_000
        tag = uuid.uuid4().hex[:8]
        if self.spec["role"] == "webhook":
            body = json.dumps(interact_body(f"warm-{tag}", self.spec["shard"], space), separators=(",", ":"))
            status = self.post(body)
            if status != 200:
                raise RuntimeError(f"warm-up webhook answered {status}")
        else:
            result = self.invoke(sqs_batch(f"warm-{tag}", 1, range(1), space), "sqs")
            if result.get("batchItemFailures"):
                raise RuntimeError(f"warm-up record failed: {result}")
        self.invocations.clear()

    def snapshot(self) -> tuple[int, dict[str, float], dict[str, Any]]:
        sys.stdout.flush()
        return os.fstat(1).st_size, proxy_counts(self.spec["counts_url"]), self.sim.stats()

    def run(self) -> dict[str, Any]:
        self.warm_up()
        role, scenario, space = self.spec["role"], self.spec["scenario"], self.spec["space"]
        if role == "webhook":  # a shard of scenario 6: its slice of the webhook events, one after another
            ready, go = Path(self.spec["ready"]), Path(self.spec["go"])
            ready.touch()
            while not go.exists():
                time.sleep(0.05)
            sys.stdout.flush()
            out0 = os.fstat(1).st_size
            for i in self.spec["events"]:
                body = json.dumps(interact_body(f"{self.spec['tag']}-{i}", i, space), separators=(",", ":"))
                status = self.post(body)
                self.webhook_statuses[str(status)] = self.webhook_statuses.get(str(status), 0) + 1
            sys.stdout.flush()
            return {
                "invocations": self.invocations,
                "webhook_statuses": self.webhook_statuses,
                "stdout_bytes": os.fstat(1).st_size - out0,
            }
        out0, counts0, edge0 = self.snapshot()
        t0 = time.perf_counter()
        if role == "deliver":  # scenario 6, Edge back: the queued webhook events through the SQS path
            self.sqs_rounds(self.receive(self.spec["queued"]), lambda _: None)
        else:
            ids = [f"oc-{self.spec['tag']}-{i}" for i in range(EVENTS)]
            self.send([json.dumps(interact_body(eid, i, space), separators=(",", ":")) for i, eid in enumerate(ids)])
            records = self.receive(EVENTS)
            for eid in ids:
                if scenario == 2:
                    self.sim.add_fault(match_id=eid, status=503, retry_after=1, times=1)
                elif scenario == 5:
                    self.sim.add_fault(match_id=eid, status=429, retry_after=400, times=1)
            outage = {3: 2, 4: MAX_RECEIVES, 7: 1}.get(scenario, 0)  # receives through which Edge answers 503
            rule: list[str] = []

            def before_receive(receive: int) -> None:
                if outage and receive == 1:
                    rule.append(self.sim.add_fault(**outage_fault(self.spec["retry_after"])))
                if rule and receive == outage + 1:
                    self.sim.remove_fault(rule.pop())

            self.sqs_rounds(records, before_receive)
            for r in rule:
                self.sim.remove_fault(r)
        elapsed = time.perf_counter() - t0
        out1, counts1, edge1 = self.snapshot()
        return {
            "invocations": self.invocations,
            "receives": self.receives,
            "acknowledged": self.acknowledged,
            "dead_lettered": self.dead_lettered,
            "stdout_bytes": out1 - out0,
            "counts": diff(counts1, counts0),
            "edge_calls": edge1["interact_requests"] - edge0["interact_requests"],
            "elapsed": elapsed,
        }


def worker_main(spec_json: str, out_path: str) -> int:
    result = Worker(json.loads(spec_json)).run()
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


# ============================================================================================ pricing and table


def row_for(r: Mapping[str, Any], memory_mb: int) -> dict[str, float]:
    """Per-event measures and $ per million events of one scenario's result."""
    n = r["events"]
    c = r["counts"]
    invocations = len(r["invocations"])
    wall = sum(i["wall"] for i in r["invocations"])
    gb_s = wall / n * memory_mb / 1024
    log_bytes = (r["stdout_bytes"] + PLATFORM_LOG_BYTES * invocations) / n
    relay_sqs = sum(v for k, v in c.items() if k.startswith("amazonsqs."))
    # The event source mapping's requests: the producer's SendMessage (SQS events only: a webhook event arrives by
    # HTTP, and the relay's own SendMessage is counted), a ReceiveMessage per 10 record receives, a DeleteMessageBatch
    # per 10 records acknowledged (a dead-lettered record is moved by SQS, not deleted).
    producer = 0 if r["scenario"] == 6 else n
    sqs = (producer + r["receives"] / 10 + r["acknowledged"] / 10 + relay_sqs) / n
    wru, rru = c.get("ddb.wcu", 0) / n, c.get("ddb.rru", 0) / n
    secrets = c.get("secretsmanager.GetSecretValue", 0) / n
    dollars = {
        "lambda": gb_s * LAMBDA_ARM_GB_S + invocations / n * LAMBDA_REQUEST,
        "dynamodb": wru * DDB_WRU + rru * DDB_RRU,
        "sqs": sqs * SQS_REQUEST,
        "secrets": secrets * SECRETS_CALL,
        "logs": log_bytes * CWL_INGEST_BYTE,
    }
    return {
        "edge": r["edge_calls"] / n,
        "ddb_requests": sum(v for k, v in c.items() if k.startswith("dynamodb.")) / n,
        "wru": wru,
        "rru": rru,
        "sqs": sqs,
        "relay_sqs": relay_sqs / n,
        "log_bytes": log_bytes,
        "ms": wall / n * 1000,
        "gb_s": gb_s,
        "invocations": invocations,
        "dead": r["dead_lettered"],
        **{f"usd_{k}": v * 1e6 for k, v in dollars.items()},
        "usd": sum(dollars.values()) * 1e6,
    }


def print_table(results: Sequence[Mapping[str, Any]], memory_mb: int, elapsed: float) -> None:
    header = (
        "#",
        "while Edge...",
        "Edge calls/ev",
        "DDB req/ev",
        "WRU/ev",
        "RRU/ev",
        "SQS req/ev",
        "log B/ev",
        "Lambda ms/ev",
        "GB-s/M ev",
        "inv",
        "DLQ",
        "$/M ev",
        "(Lambda",
        "DDB",
        "SQS",
        "logs)",
    )
    rows = []
    for r in results:
        x = row_for(r, memory_mb)
        rows.append(
            (
                str(r["scenario"]),
                label(r["scenario"], r["retry_after"]),
                f"{x['edge']:.2f}",
                f"{x['ddb_requests']:.2f}",
                f"{x['wru']:.2f}",
                f"{x['rru']:.2f}",
                f"{x['sqs']:.2f}",
                f"{x['log_bytes']:,.0f}",
                f"{x['ms']:.1f}",
                f"{x['gb_s'] * 1e6:,.0f}",
                str(x["invocations"]),
                str(x["dead"]),
                f"{x['usd']:.2f}",
                f"{x['usd_lambda']:.2f}",
                f"{x['usd_dynamodb']:.2f}",
                f"{x['usd_sqs']:.2f}",
                f"{x['usd_logs']:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = set(range(2, len(header)))
    fmt = lambda row: "  ".join(c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row))  # noqa: E731
    print(fmt(header).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt(row).rstrip())
    print()
    note = (
        f"{EVENTS} events a scenario, first-seen identities, template settings, arm64 at {memory_mb} MB; Edge answers "
        f"in {EDGE_LATENCY * 1000:.0f} ms. Lambda ms = the handler's wall time per event over every invocation (a "
        f"webhook's whole invocation included), priced as Lambda duration. Log bytes = the handler's stdout plus "
        f"{PLATFORM_LOG_BYTES} B of Lambda's lines per invocation. SQS requests = the producer's SendMessage (SQS "
        "events), a ReceiveMessage per 10 record receives, a DeleteMessageBatch per 10 acknowledged (estimated), plus "
        "the relay's own SQS calls (counted). Each worker's warm-up event (secret reads, IMS token) is left out. Not "
        "included: API Gateway ($1.00/M) and its access-log line for webhook events. "
        f"Run took {elapsed:.0f} s; CPU {Bench.cpu_model()}, {os.cpu_count()} cores."
    )
    print(textwrap.fill(note, 120))


# ============================================================================================ orchestration


class Runner:
    """The stack, the counting proxy and the worker processes of one run."""

    def __init__(self, keep_stdout: bool, retry_after: int) -> None:
        self.keep_stdout = keep_stdout
        self.retry_after = retry_after
        self.tmp = ROOT / ".local"
        self.tmp.mkdir(exist_ok=True)
        self.space0 = int(time.time()) % 400_000  # identities new to the simulator and the table

    def spawn(self, spec: Mapping[str, Any]) -> tuple[subprocess.Popen[str], Path]:
        out = self.tmp / f"outage-worker-{uuid.uuid4().hex}.json"
        cmd = [sys.executable, "-m", "devtools.outage_cost", "--worker", json.dumps(spec), "--out", str(out)]
        # Its stdout (the handler's logs and EMF) goes to a file, so the worker can measure what it wrote.
        with out.with_suffix(".stdout").open("wb") as stdout:
            proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True)
        return proc, out

    def collect(self, proc: subprocess.Popen[str], out: Path) -> dict[str, Any]:
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        if not self.keep_stdout:
            out.with_suffix(".stdout").unlink()
        return worker_result(out, proc.returncode, err, "outage")

    def webhook_scenario(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Scenario 6: shards of the webhook events in processes of their own (an execution environment runs one
        invocation at a time, and each holds its invocation through its attempts), all started together once warm;
        then, Edge back, one worker delivers the queued events through the SQS path."""
        shards: list[tuple[subprocess.Popen[str], Path, Path]] = []
        go = self.tmp / f"outage-go-{uuid.uuid4().hex}"
        for k in range(WEBHOOK_SHARDS):
            ready = self.tmp / f"outage-ready-{uuid.uuid4().hex}"
            shard = {**spec, "role": "webhook", "shard": k, "ready": str(ready), "go": str(go)}
            shard["events"] = list(range(k, EVENTS, WEBHOOK_SHARDS))
            proc, out = self.spawn(shard)
            shards.append((proc, out, ready))
        try:
            while not all(ready.exists() for _, _, ready in shards):
                if any(proc.poll() is not None for proc, _, _ in shards):
                    raise RuntimeError("a webhook shard ended before it was ready")
                time.sleep(0.1)
            sys_stats0, counts0 = self.stack.sim.stats(), proxy_counts(self.counter)
            rule = self.stack.sim.add_fault(**outage_fault(spec["retry_after"]))
            t0 = time.perf_counter()
            go.touch()
            parts = [self.collect(proc, out) for proc, out, _ in shards]
            self.stack.sim.remove_fault(rule)
            elapsed = time.perf_counter() - t0
            counts, sim_stats = diff(proxy_counts(self.counter), counts0), self.stack.sim.stats()
        finally:
            go.unlink(missing_ok=True)
            for proc, _, ready in shards:
                ready.unlink(missing_ok=True)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        statuses: dict[str, int] = {}
        for p in parts:
            for k, v in p["webhook_statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        queued = statuses.get("202", 0)
        r: dict[str, Any] = {
            "invocations": [i for p in parts for i in p["invocations"]],
            "stdout_bytes": sum(p["stdout_bytes"] for p in parts),
            "counts": counts,
            "edge_calls": sim_stats["interact_requests"] - sys_stats0["interact_requests"],
            "webhook_statuses": statuses,
            "receives": 0,
            "acknowledged": 0,
            "dead_lettered": 0,
        }
        if queued:
            d = self.collect(*self.spawn({**spec, "role": "deliver", "queued": queued}))
            for key in ("invocations", "stdout_bytes", "edge_calls", "receives", "acknowledged", "dead_lettered"):
                r[key] += d[key]
            r["counts"] = {
                k: r["counts"].get(k, 0) + d["counts"].get(k, 0) for k in set(r["counts"]) | set(d["counts"])
            }
            elapsed += d["elapsed"]
        r["elapsed"] = elapsed
        return r

    def run(self, scenarios: list[int]) -> int:
        from devtools.stack import AWS_OVERRIDES, LocalStack

        log = lambda msg: print(f"# {msg}", file=sys.stderr, flush=True)  # noqa: E731
        started = time.perf_counter()
        results: list[dict[str, Any]] = []
        with LocalStack() as stack, proxy_process(stack.moto.url, images=True) as counter:
            self.stack, self.counter = stack, counter
            res = stack.resources
            memory_mb = RECOMMENDED_MB  # the template's MemorySize (test_template.py checks they agree)
            stack.sim.set_latency(EDGE_LATENCY)
            self.env = {
                **{k: v for k, v in os.environ.items() if k not in AWS_OVERRIDES},
                **stack.env,
                "POWERTOOLS_LOG_LEVEL": "INFO",  # the deployed level
                "AWS_ENDPOINT_URL_DYNAMODB": counter,
                "AWS_ENDPOINT_URL_SECRETS_MANAGER": counter,
                "AWS_ENDPOINT_URL_SQS": counter,
                "PYTHONPATH": os.pathsep.join([str(FUNCTION_DIR), str(ROOT)]),
            }
            self.env.setdefault("PYTHONHASHSEED", "0")
            for scenario in scenarios:
                log(f"scenario {scenario}: {label(scenario, self.retry_after)}")
                spec = {
                    "role": "sqs",
                    "retry_after": self.retry_after,
                    "scenario": scenario,
                    "tag": uuid.uuid4().hex[:8],
                    "space": self.space0 + scenario * 1000,
                    "sim_url": stack.sim.url,
                    "moto_url": stack.moto.url,
                    "counts_url": counter,
                    "region": stack.region,
                    "queue_url": res.queue_url,
                    "queue_arn": res.queue_arn,
                    "webhook_secret": stack.webhook_secret,
                    "timeout": res.function_timeout,
                    "memory_mb": memory_mb,
                }
                r = self.webhook_scenario(spec) if scenario == 6 else self.collect(*self.spawn(spec))
                r.update(scenario=scenario, events=EVENTS, retry_after=self.retry_after)
                log(
                    f"scenario {scenario}: {r['elapsed']:.1f} s, {len(r['invocations'])} invocations, "
                    f"{r['edge_calls']} Edge calls, {r['acknowledged']} acknowledged, "
                    f"{r['dead_lettered']} dead-lettered"
                    + (f", webhook answers {r['webhook_statuses']}" if r.get("webhook_statuses") else "")
                )
                results.append(r)
                stack.sim.clear_faults()
                for url in (res.queue_url, res.dlq_url):
                    stack.sqs.purge_queue(QueueUrl=url)
        print_table(results, memory_mb, time.perf_counter() - started)
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.outage_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(map(str, SCENARIOS)),
        help="comma-separated scenario numbers (default: all): "
        + "; ".join(f"{k} = Edge: {label(k, 1)}" for k in SCENARIOS),
    )
    parser.add_argument(
        "--retry-after",
        type=int,
        default=1,
        metavar="SECONDS",
        help="Retry-After of the outage's 503s in scenarios 3, 4, 6 and 7 (default 1, as the README's table; 0: none, "
        "the relay's own backoff)",
    )
    parser.add_argument("--keep-stdout", action="store_true", help="keep each worker's stdout in .local/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.out)
    try:
        chosen = [int(s) for s in args.scenarios.split(",") if s.strip()]
    except ValueError:
        parser.error("--scenarios takes numbers separated by commas, e.g. 1,4,6")
    if not chosen or any(s not in SCENARIOS for s in chosen):
        parser.error(f"--scenarios: choose among {', '.join(map(str, SCENARIOS))}")
    from devtools.stack import stop_on_sigterm

    stop_on_sigterm()
    return Runner(args.keep_stdout, args.retry_after).run(chosen)


if __name__ == "__main__":
    sys.exit(main())
