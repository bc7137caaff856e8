"""Behaviour behind the benchmark's numbers (issue 5), shown without timing anything.

* Records of one identity reach Edge one after another, in batch order, while records of different identities are
  in flight at the same time (read from the simulator's request log, with Edge answering slowly), never more than
  BATCH_CONCURRENCY of them.
* One execution environment keeps one connection to Edge/IMS across invocations.
* A returning identity's delivered event costs at most 2 DynamoDB item writes (counted by a loopback proxy), and an
  SQS batch writes its results with one BatchWriteItem per 25 events.
* Each item written for a typical Edge answer (the simulator's, and Adobe's real ones) fits one write unit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relay.handler import new_runtime
from relay.runtime import Runtime
from relay.settings import load_settings

from devtools.bench import CountingProxy, interact_body, item_size, sqs_record
from devtools.lambda_context import new_context
from devtools.stack import LocalStack

FIXTURES = Path(__file__).resolve().parents[2] / "devtools" / "edge_fixtures"
LATENCY = 0.2  # long enough that "in flight at once" and "one after another" cannot be confused


def batch(records: list[tuple[str, int]], space: int) -> dict[str, Any]:
    """An SQS event with one record per (eventId, identity)."""
    return {"Records": [sqs_record(interact_body(event_id, ident, space)) for event_id, ident in records]}


def edge_calls(stack: LocalStack) -> list[dict[str, Any]]:
    return [e for e in stack.sim.requests_log() if e["path"].endswith("/v2/interact")]


def ecid_of(entry: dict[str, Any]) -> str:
    return str(entry["body"]["event"]["xdm"]["identityMap"]["ECID"][0]["id"])


@pytest.fixture
def runtime(clean_stack: LocalStack) -> Runtime:
    """A fresh execution environment (its own session, clients and pool)."""
    return new_runtime()


def test_one_identity_in_order_while_identities_overlap(clean_stack: LocalStack, runtime: Runtime) -> None:
    clean_stack.sim.set_latency(LATENCY)
    # Three identities, three events each, interleaved in the batch as a queue would deliver them.
    records = [(f"order-{ident}-{n}", ident) for n in range(3) for ident in range(3)]
    result = runtime.handle(batch(records, space=901), new_context(30))
    assert result == {"batchItemFailures": []}

    calls = edge_calls(clean_stack)
    assert sorted(e["xdm_id"] for e in calls) == sorted(event_id for event_id, _ in records)
    by_identity: dict[str, list[dict[str, Any]]] = {}
    for entry in sorted(calls, key=lambda e: e["time"]):
        by_identity.setdefault(ecid_of(entry), []).append(entry)
    assert len(by_identity) == 3
    for entries in by_identity.values():
        ident = entries[0]["xdm_id"].split("-")[1]
        # batch order within the identity ...
        assert [e["xdm_id"] for e in entries] == [f"order-{ident}-{n}" for n in range(3)]
        # ... and each call starts only after the previous one was answered (the simulator held it LATENCY s).
        for before, after in zip(entries, entries[1:], strict=False):
            assert after["time"] - before["time"] >= LATENCY * 0.9
    # Different identities overlap: every identity's first call arrived while the others' first calls were held.
    firsts = [entries[0]["time"] for entries in by_identity.values()]
    assert max(firsts) - min(firsts) < LATENCY


def test_edge_calls_in_flight_never_exceed_batch_concurrency(clean_stack: LocalStack) -> None:
    # GIVEN BATCH_CONCURRENCY=2: 2 Edge calls in flight at most, on twice as many worker threads
    runtime = Runtime(load_settings({**os.environ, "BATCH_CONCURRENCY": "2"}))
    assert runtime.workers == 4
    clean_stack.sim.set_latency(LATENCY)

    # WHEN a batch of 6 identities runs
    records = [(f"slots-{i}", i) for i in range(6)]
    assert runtime.handle(batch(records, space=907), new_context(30)) == {"batchItemFailures": []}

    # THEN the calls came 2 at a time: each call started only after the one two places before it was answered
    starts = sorted(e["time"] for e in edge_calls(clean_stack))
    assert len(starts) == 6
    for earlier, later in zip(starts, starts[2:], strict=False):
        assert later - earlier >= LATENCY * 0.9
    # AND 2 did run at once (the first two started together)
    assert starts[1] - starts[0] < LATENCY / 2


def test_one_connection_reused_across_invocations(clean_stack: LocalStack, runtime: Runtime) -> None:
    clean_stack.sim.set_latency(0)
    assert clean_stack.sim.stats()["connections"] == 0
    for n in range(3):
        result = runtime.handle(batch([(f"conn-{n}", 7)], space=902), new_context(30))
        assert result == {"batchItemFailures": []}
        stats = clean_stack.sim.stats()
        # IMS (first invocation only) and every Edge call went over the one keep-alive connection.
        assert stats["connections"] == 1, stats
    assert stats["ims_requests"] == 1
    assert stats["interact_requests"] == 3


@pytest.fixture
def counted(clean_stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingProxy]:
    """A counting proxy between the relay and moto's DynamoDB."""
    proxy = CountingProxy(clean_stack.moto.url, images=False).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", proxy.url)
    try:
        yield proxy
    finally:
        proxy.stop()


def counts(proxy: CountingProxy) -> dict[str, float]:
    """A snapshot of the proxy's counters (API calls by name, `ddb.item_writes`, ...)."""
    with proxy.lock:
        return dict(proxy.counts)


def writes(proxy: CountingProxy) -> float:
    """Items written (what DynamoDB bills): one per PutItem/UpdateItem, one per item of a BatchWriteItem."""
    return counts(proxy).get("ddb.item_writes", 0)


def delivered(stack: LocalStack, event_ids: list[str]) -> int:
    return sum(1 for e in event_ids if (stack.result_item(e) or {}).get("status") == "delivered")


def test_returning_identity_costs_at_most_two_writes(clean_stack: LocalStack, counted: CountingProxy) -> None:
    runtime = new_runtime()  # built after the endpoint points at the proxy
    first = [(f"ret-a-{i}", i) for i in range(5)]
    assert runtime.handle(batch(first, space=903), new_context(30)) == {"batchItemFailures": []}
    before = writes(counted)
    again = [(f"ret-b-{i}", i) for i in range(5)] + [(f"ret-c-{i}", i) for i in range(5)]
    assert runtime.handle(batch(again, space=903), new_context(30)) == {"batchItemFailures": []}
    ids = [event_id for event_id, _ in again]
    assert delivered(clean_stack, ids) == len(ids)
    assert writes(counted) - before <= 2 * len(ids)


def write_requests(proxy: CountingProxy) -> float:
    """Write API requests (PutItem, UpdateItem, BatchWriteItem, BatchExecuteStatement, ...), failed ones included."""
    return counts(proxy).get("ddb.write_requests", 0)


def test_first_seen_identity_costs_at_most_two_write_requests(clean_stack: LocalStack, counted: CountingProxy) -> None:
    runtime = new_runtime()
    records = [(f"new-{i}", i) for i in range(5)]
    assert runtime.handle(batch(records, space=904), new_context(30)) == {"batchItemFailures": []}
    assert delivered(clean_stack, [e for e, _ in records]) == len(records)
    # the 5 claims in one BatchExecuteStatement, each new identity's state created with a conditional PutItem, the 5
    # results in one BatchWriteItem: 7 requests for 5 events
    assert write_requests(counted) == 1 + 5 + 1
    assert write_requests(counted) <= 2 * len(records)
    # which write 3 items per event (claim, state, result): 3 write units each, as the benchmark reports
    assert writes(counted) == 3 * len(records)


def test_a_batch_reads_every_identity_state_with_one_call(clean_stack: LocalStack, counted: CountingProxy) -> None:
    # GIVEN 10 identities already seen once (their state items exist)
    runtime = new_runtime()
    first = [(f"read-a-{i}", i) for i in range(10)]
    assert runtime.handle(batch(first, space=905), new_context(30)) == {"batchItemFailures": []}
    before = counts(counted)

    # WHEN they return, two events each, in one batch
    again = [(f"read-{n}-{i}", i) for n in ("b", "c") for i in range(10)]
    assert runtime.handle(batch(again, space=905), new_context(30)) == {"batchItemFailures": []}

    # THEN their states were read with one BatchGetItem (no GetItem per event), each identity's second event used the
    # state carried from its first, and each delivered event cost 2 writes (claim + result)
    after = counts(counted)
    assert delivered(clean_stack, [e for e, _ in again]) == 20
    assert after.get("dynamodb.BatchGetItem", 0) - before.get("dynamodb.BatchGetItem", 0) == 1
    assert after.get("dynamodb.GetItem", 0) - before.get("dynamodb.GetItem", 0) == 0
    assert after["ddb.item_writes"] - before["ddb.item_writes"] == 2 * 20
    # with the 20 results in one BatchWriteItem and the 10 first events' claims in one BatchExecuteStatement (each
    # second event is claimed on its own when its turn comes): 12 write requests, not 40
    assert after["dynamodb.BatchWriteItem"] - before.get("dynamodb.BatchWriteItem", 0) == 1
    assert after["dynamodb.BatchExecuteStatement"] - before.get("dynamodb.BatchExecuteStatement", 0) == 1
    assert after["ddb.write_requests"] - before["ddb.write_requests"] == 1 + 10 + 1
    # and the carried state is right: each second event sent its identity's entries to the hinted path
    calls = {e["xdm_id"]: e for e in edge_calls(clean_stack)}
    for i in range(10):
        assert calls[f"read-c-{i}"]["hint"] == "or2"
        keys = {entry["key"] for entry in calls[f"read-c-{i}"]["body"]["meta"]["state"]["entries"]}
        assert any(k.endswith("_identity") for k in keys)


def test_a_batch_writes_its_results_25_to_a_request(clean_stack: LocalStack, counted: CountingProxy) -> None:
    # GIVEN 30 identities already seen once
    runtime = new_runtime()
    first = [(f"bw-a-{i}", i) for i in range(30)]
    assert runtime.handle(batch(first, space=906), new_context(30)) == {"batchItemFailures": []}
    before = counts(counted)

    # WHEN they return in one batch
    again = [(f"bw-b-{i}", i) for i in range(30)]
    assert runtime.handle(batch(again, space=906), new_context(30)) == {"batchItemFailures": []}

    # THEN the 30 results went in 2 BatchWriteItem requests (25 + 5), and no result was written on its own
    after = counts(counted)
    assert after["dynamodb.BatchWriteItem"] - before["dynamodb.BatchWriteItem"] == 2
    assert after.get("dynamodb.PutItem", 0) - before.get("dynamodb.PutItem", 0) == 0
    # AND the 30 claims went in 2 BatchExecuteStatement requests of INSERTs (25 + 5), none on its own
    assert after["dynamodb.BatchExecuteStatement"] - before["dynamodb.BatchExecuteStatement"] == 2
    assert after.get("dynamodb.UpdateItem", 0) - before.get("dynamodb.UpdateItem", 0) == 0
    # AND every result is stored delivered, with the claim's attempt count and without its lease
    for event_id, _ in again:
        item = clean_stack.result_item(event_id)
        assert item is not None
        assert (item["status"], item["attempts"]) == ("delivered", 1)
        assert not {"leaseUntil", "claimToken"} & set(item)


def raw_item(stack: LocalStack, pk: str, sk: str) -> dict[str, Any]:
    resp = stack.dynamodb.get_item(
        TableName=stack.resources.table_name, Key={"pk": {"S": pk}, "sk": {"S": sk}}, ConsistentRead=True
    )
    item: dict[str, Any] = resp["Item"]
    return item


@pytest.mark.parametrize(
    "fixture",
    [
        None,
        "send-event.json",
        "send-event-with-identity.json",
        "personalization-view.json",
        "personalization-form-based.json",
    ],
)
def test_each_item_written_fits_one_write_unit_on_a_typical_answer(
    clean_stack: LocalStack, runtime: Runtime, fixture: str | None
) -> None:
    """DynamoDB bills a write `ceil(max(item before, item after) / 1 KB)` units: every item the relay writes for a
    typical answer stays within 1 KB by DynamoDB's item-size rules (compact JSON, zlib where it is smaller), so each
    write costs one unit. The answers: the simulator's own, and real Edge answers from Adobe's Web SDK tests."""
    # GIVEN Edge answers a first-seen identity's event, then its next one, with this answer
    records = [("size-1", 7), ("size-2", 7)]
    for event_id, _ in records:
        if fixture is not None:
            clean_stack.sim.add_fault(match_id=event_id, fixture=fixture)
    # WHEN both are relayed (two invocations: the second finds the stored state)
    for one in records:
        assert runtime.handle(batch([one], space=907), new_context(30)) == {"batchItemFailures": []}

    # THEN every result and the identity's state item are each at most 1 KB, and what is stored is Edge's answer
    # exactly, however it is encoded
    sizes = {}
    for event_id, _ in records:
        stored = clean_stack.result(event_id)
        assert stored["status"] == "delivered"
        if fixture is not None:
            answer = json.loads((FIXTURES / fixture).read_text(encoding="utf-8"))
            assert stored["handle"] == answer["handle"]
        sizes[event_id] = item_size(raw_item(clean_stack, f"EVENT#{event_id}", "RESULT"))
    table = clean_stack.resources.table_name
    states = clean_stack.dynamodb.scan(
        TableName=table, FilterExpression="begins_with(pk, :p)", ExpressionAttributeValues={":p": {"S": "IDENTITY#"}}
    )["Items"]
    assert len(states) == 1
    sizes["state"] = item_size(states[0])
    assert all(0 < size <= 1024 for size in sizes.values()), sizes
