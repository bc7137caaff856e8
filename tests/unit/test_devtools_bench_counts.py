"""The benchmark's counting proxy bills a batch of INSERT claims as DynamoDB does: each statement one item write when
the request is accepted (a refused INSERT too), nothing when the whole request is refused (throttled)."""

from __future__ import annotations

import json

import pytest

from devtools.bench import CountingProxy

INSERT = "INSERT INTO \"t\" VALUE {'pk': ?, 'sk': ?, 'status': ?}"


def batch_of_inserts(n: int) -> bytes:
    statements = [
        {"Statement": INSERT, "Parameters": [{"S": f"EVENT#{i}"}, {"S": "RESULT"}, {"S": "pending"}]} for i in range(n)
    ]
    return json.dumps({"Statements": statements}).encode()


@pytest.mark.parametrize(("status", "item_writes"), [(200, 25), (400, 0)])
def test_a_batch_of_inserts_is_one_write_request_and_an_item_write_per_accepted_statement(
    status: int, item_writes: int
) -> None:
    proxy = CountingProxy("http://127.0.0.1:9", images=False)
    answer = json.dumps({"Responses": [{"TableName": "t"}] * 25}).encode() if status == 200 else b"{}"

    proxy._count("DynamoDB_20120810", "BatchExecuteStatement", batch_of_inserts(25), {}, status, answer, [])

    assert proxy.counts["ddb.write_requests"] == 1
    assert proxy.counts["ddb.item_writes"] == item_writes
    assert proxy.counts["ddb.wcu"] == item_writes  # images off: each item at the 1-unit minimum
