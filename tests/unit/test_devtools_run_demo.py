"""``make run``'s flow with a stub handler that stores results the way the contract describes."""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable
from typing import Any

import boto3
import pytest

from devtools import run_demo
from devtools.stack import decode_item

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def stub_factory(status: str = "delivered") -> Callable[[], Any]:
    """A handler storing a result per event: JSON-string handles for webhooks, zlib bytes for SQS."""

    def factory() -> Any:
        ddb = boto3.client("dynamodb")  # from the env the stack applied
        table = os.environ["HANDLES_TABLE"]

        def store(event_id: str, handle: Any, compressed: bool) -> None:
            raw = json.dumps(handle)
            value = {"B": zlib.compress(raw.encode())} if compressed else {"S": raw}
            item = {"pk": {"S": f"EVENT#{event_id}"}, "sk": {"S": "RESULT"}, "status": {"S": status}}
            ddb.put_item(TableName=table, Item={**item, "requestId": {"S": "rid-" + event_id}, "handle": value})

        def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
            handle = [{"type": "identity:result", "payload": []}]
            if "Records" in event:
                for record in event["Records"]:
                    xdm = json.loads(record["body"])["event"]["xdm"]
                    store(xdm.get("_id") or record["messageId"], handle, compressed=True)
                return {"batchItemFailures": []}
            event_id = event["headers"]["webhook-id"]
            store(event_id, handle, compressed=False)
            return {"statusCode": 200, "body": json.dumps({"eventId": event_id, "handle": handle})}

        return handler

    return factory


def test_run_demo_exits_0_when_every_sample_is_delivered(capsys: pytest.CaptureFixture[str]) -> None:
    from relay.observability import logger

    # (and without --verbose, the function's INFO logs are off while it runs, then back as they were)
    info_on: list[bool] = []

    def factory() -> Any:
        inner = stub_factory()()

        def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
            info_on.append(logger.log_level <= logging.INFO)
            return inner(event, context)

        return handler

    level = logger.log_level
    assert run_demo.run(factory) == 0
    out = capsys.readouterr().out
    assert "all 5 sample events delivered" in out
    assert out.count("identity:result") == 5
    assert "sqs-order-ORD-2026-0002" in out
    assert info_on and not any(info_on)
    assert logger.log_level == level


def test_run_demo_exits_1_and_says_why_when_a_sample_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo.run(stub_factory("rejected")) == 1
    assert "FAILED webhook webhook-order.json" in capsys.readouterr().out


def test_decode_item_reads_string_and_compressed_json() -> None:
    handle = [{"type": "state:store", "payload": [{"key": "k", "value": "v", "maxAge": 10}]}]
    as_string = {"pk": {"S": "EVENT#1"}, "handle": {"S": json.dumps(handle)}, "expiresAt": {"N": "5"}}
    as_bytes = {"pk": {"S": "EVENT#1"}, "handle": {"B": zlib.compress(json.dumps(handle).encode())}}
    assert decode_item(as_string) == {"pk": "EVENT#1", "handle": handle, "expiresAt": 5}
    assert decode_item(as_bytes)["handle"] == handle
