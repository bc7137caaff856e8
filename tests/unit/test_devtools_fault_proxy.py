"""The soak's DynamoDB fault proxy: which items a refused write touched (so the soak can explain a repeat Edge call)."""

from __future__ import annotations

import json

from devtools.fault_proxy import FaultProxy, item_keys


def key(pk: str) -> dict[str, dict[str, str]]:
    return {"pk": {"S": pk}, "sk": {"S": "RESULT"}}


BATCH = json.dumps(
    {
        "RequestItems": {
            "t": [{"PutRequest": {"Item": {**key("EVENT#a"), "status": {"S": "delivered"}}}}]
            + [{"PutRequest": {"Item": key("EVENT#b")}}]
        }
    }
).encode()


def test_item_keys_of_a_single_write_and_of_a_batch():
    assert item_keys("UpdateItem", json.dumps({"TableName": "t", "Key": key("EVENT#x")}).encode()) == ["EVENT#x|RESULT"]
    assert item_keys("BatchWriteItem", BATCH) == ["EVENT#a|RESULT", "EVENT#b|RESULT"]
    assert item_keys("BatchWriteItem", b"not json") == []


def test_a_refused_batch_write_records_every_item_and_a_burst_covers_them_all():
    # GIVEN every write refused, and every fault starting a burst of 3
    proxy = FaultProxy("http://127.0.0.1:1", rate=1.0, seed=1, burst_share=1.0, burst_length=3)

    # WHEN a batch write is decided
    assert proxy._decide("BatchWriteItem", BATCH) is not None

    # THEN both of its items are recorded as refused
    assert proxy.failed_keys() == {"EVENT#a|RESULT": 1, "EVENT#b|RESULT": 1}
    # AND with no new faults, the burst still fails the next 2 writes of either item, then stops
    proxy._rate = 0.0
    single = json.dumps({"TableName": "t", "Item": key("EVENT#b")}).encode()
    assert [proxy._decide("PutItem", single) is not None for _ in range(3)] == [True, True, False]
