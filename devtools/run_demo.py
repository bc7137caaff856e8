"""``make run``: relay the sample events through the local stack and show what was stored.

Starts the Edge simulator, moto, the local HTTP API gateway and the SQS poller; POSTs each signed
webhook sample; sends each record of ``events/sqs-batch.json`` to the queue; drains it; prints one
row per event and exits 0 only if every sample ended ``delivered``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests

from devtools.stack import EVENTS_DIR, ROOT, LocalStack, stop_on_sigterm

WEBHOOK_SAMPLES = ("webhook-order.json", "webhook-signup.json")
SQS_SAMPLE = "sqs-batch.json"
HTTP_TIMEOUT = (5, 60)
DRAIN_TIMEOUT = 60.0


@dataclass
class Outcome:
    trigger: str
    sample: str
    event_id: str | None = None
    http_status: int | None = None
    item: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str((self.item or {}).get("status") or "missing")

    @property
    def handle_types(self) -> str:
        handles = (self.item or {}).get("handle") or []
        return ",".join(sorted({str(h.get("type")) for h in handles if isinstance(h, dict)})) or "-"


def load_event(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS_DIR / name).read_text(encoding="utf-8"))
    return data


def event_id_of(body: str, fallback: str) -> str:
    """The relay's eventId rule (contract §2): ``xdm._id``, else the webhook-id / SQS messageId."""
    try:
        xdm = json.loads(body)["event"]["xdm"]
        if isinstance(xdm.get("_id"), str) and xdm["_id"]:
            return str(xdm["_id"])
    except (ValueError, KeyError, TypeError):
        pass
    return fallback


def post_webhooks(stack: LocalStack, url: str, session: requests.Session) -> list[Outcome]:
    outcomes = []
    for name in WEBHOOK_SAMPLES:
        sample = load_event(name)
        body: str = sample["body"]
        msg_id = sample["headers"].get("webhook-id")
        headers = {"content-type": "application/json", **stack.sign(body, msg_id=msg_id)}
        outcome = Outcome("webhook", name, event_id=event_id_of(body, headers["webhook-id"]))
        resp = session.post(f"{url}/events", data=body.encode("utf-8"), headers=headers, timeout=HTTP_TIMEOUT)
        outcome.http_status = resp.status_code
        if resp.status_code != 200:
            outcome.problems.append(f"HTTP {resp.status_code}: {resp.text[:300]}")
        else:
            answer = resp.json()
            if answer.get("eventId") != outcome.event_id:
                outcome.problems.append(f"answer eventId {answer.get('eventId')!r} != {outcome.event_id!r}")
        outcomes.append(outcome)
    return outcomes


def send_sqs_samples(stack: LocalStack) -> list[Outcome]:
    outcomes = []
    for record in load_event(SQS_SAMPLE)["Records"]:
        attributes = {}
        for key, attr in (record.get("messageAttributes") or {}).items():
            if "stringValue" in attr:
                attributes[key] = {"DataType": attr["dataType"], "StringValue": attr["stringValue"]}
        msg_id = stack.sqs.send_message(
            QueueUrl=stack.resources.queue_url, MessageBody=record["body"], MessageAttributes=attributes
        )["MessageId"]
        outcomes.append(Outcome("sqs", f"{SQS_SAMPLE}#{record['messageId'][:8]}", event_id_of(record["body"], msg_id)))
    return outcomes


def print_table(outcomes: list[Outcome], out: Callable[[str], None] = print) -> None:
    rows = [("trigger", "eventId", "status", "requestId", "handle types")]
    for o in outcomes:
        item = o.item or {}
        rows.append((o.trigger, o.event_id or "-", o.status, str(item.get("requestId") or "-"), o.handle_types))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        out("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if n == 0:
            out("  ".join("-" * w for w in widths))


@contextmanager
def _function_logs_from(level: str | None) -> Iterator[None]:
    """The function's logs from `level` up, for the run. The relay's logger is made when `devtools.stack` first imports
    the relay, before `apply_env` sets POWERTOOLS_LOG_LEVEL, so the variable alone comes too late; the level it had
    comes back after the run."""
    from relay.observability import logger

    before = logger.log_level
    if level is not None:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def run(handler_factory: Callable[[], Any] | None = None, *, quiet: bool = False, verbose: bool = False) -> int:
    """Run the demo; ``handler_factory`` (called after the env is applied) defaults to the real handler.

    Unless ``verbose``, the function's INFO logs and metrics are silenced so the table stays readable.
    """
    log: Callable[[str], None] = (lambda _msg: None) if quiet else print
    with LocalStack() as stack, _function_logs_from(None if verbose else "WARNING"):
        quiet_function = {"POWERTOOLS_LOG_LEVEL": "WARNING", "POWERTOOLS_METRICS_DISABLED": "true"}
        stack.apply_env(overrides=None if verbose else quiet_function)
        if handler_factory is None:
            sys.path.insert(0, str(ROOT / "functions" / "relay"))
            from relay.handler import lambda_handler

            handler: Any = lambda_handler
        else:
            handler = handler_factory()
        gateway = stack.gateway(handler)
        poller = stack.poller(handler).start()
        log(f"local stack up: gateway {gateway.url}, queue {stack.resources.queue_url}, edge {stack.sim.url}")
        with requests.Session() as session:
            outcomes = post_webhooks(stack, gateway.url, session)
        outcomes += send_sqs_samples(stack)
        poller.drain(DRAIN_TIMEOUT)
        poller.stop()
        for o in outcomes:
            if o.event_id:
                o.item = stack.result_item(o.event_id)
            if o.status != "delivered":
                error = (o.item or {}).get("error")
                o.problems.append(f"stored status {o.status}" + (f": {json.dumps(error)[:300]}" if error else ""))
        left = stack.poller(handler).pending()
        dlq = stack.sqs.get_queue_attributes(
            QueueUrl=stack.resources.dlq_url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"]["ApproximateNumberOfMessages"]
        log("")
        print_table(outcomes, log)
        log("")
        failed = [o for o in outcomes if o.problems or o.status != "delivered"]
        if left or int(dlq):
            log(f"queue not empty after draining: {left} left, {dlq} in the dead-letter queue")
        if failed or left or int(dlq):
            for o in failed:
                log(f"FAILED {o.trigger} {o.sample} ({o.event_id}): " + "; ".join(o.problems))
            return 1
        log(f"all {len(outcomes)} sample events delivered")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.run_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show the function's logs and metrics")
    args = parser.parse_args(argv)
    stop_on_sigterm()
    try:
        return run(verbose=args.verbose)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
