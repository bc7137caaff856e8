"""The outage-cost harness prices what it measured as README.md "While Edge fails" says: Lambda time at the template's
memory size, Lambda's own log lines per invocation, and the event source mapping's SQS requests (no producer send for
a webhook event, no delete for a dead-lettered record)."""

from __future__ import annotations

from typing import Any

import pytest

from devtools.bench import LAMBDA_ARM_GB_S, LAMBDA_REQUEST, PLATFORM_LOG_BYTES, SQS_REQUEST
from devtools.outage_cost import row_for


def result(scenario: int, **overrides: Any) -> dict[str, Any]:
    base = {
        "scenario": scenario,
        "events": 100,
        "counts": {"ddb.wcu": 300, "ddb.rru": 100, "dynamodb.BatchWriteItem": 4},
        "invocations": [{"wall": 1.0}, {"wall": 0.5}],
        "stdout_bytes": 5_000,
        "receives": 200,
        "acknowledged": 100,
        "edge_calls": 250,
        "dead_lettered": 0,
    }
    return base | overrides


def test_a_scenario_is_priced_per_event_from_its_wall_time_counts_and_log_bytes():
    row = row_for(result(4), 1024)

    assert row["edge"] == 2.5
    assert row["ms"] == pytest.approx(15.0)  # 1.5 s of invocations over 100 events
    assert row["gb_s"] == pytest.approx(0.015)  # at 1 GB
    assert row["log_bytes"] == pytest.approx((5_000 + 2 * PLATFORM_LOG_BYTES) / 100)
    assert (row["wru"], row["rru"], row["ddb_requests"]) == (3, 1, 0.04)
    # SQS: the producer's send, a receive request per 10 record receives, a delete request per 10 acknowledged
    assert row["sqs"] == pytest.approx(1 + 0.2 + 0.1)
    assert row["usd_lambda"] == pytest.approx((0.015 * LAMBDA_ARM_GB_S + 0.02 * LAMBDA_REQUEST) * 1e6)
    assert row["usd"] == pytest.approx(sum(v for k, v in row.items() if k.startswith("usd_")))


def test_a_webhook_event_has_no_producer_send_and_a_dead_letter_no_delete():
    sqs_event = row_for(result(4), 1024)
    webhook_event = row_for(result(6), 1024)
    dead_lettered = row_for(result(4, acknowledged=0, dead_lettered=100), 1024)

    assert sqs_event["sqs"] - webhook_event["sqs"] == pytest.approx(1)
    assert sqs_event["sqs"] - dead_lettered["sqs"] == pytest.approx(0.1)
    assert sqs_event["usd_sqs"] == pytest.approx(sqs_event["sqs"] * SQS_REQUEST * 1e6)
