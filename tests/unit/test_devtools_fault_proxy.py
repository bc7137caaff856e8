"""The soak's DynamoDB fault proxy: which items a refused write touched (so the soak can explain a repeat Edge call),
and batch calls answered in part as throttled DynamoDB answers them (unprocessed items and keys, statement errors)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from relay.identity_state import IdentityState
from relay.integrations.store import HandlesStore, decode_item

from devtools.fault_proxy import STATEMENT_ERRORS, FaultProxy, item_keys, merge_partial, split_batch
from devtools.moto_server import MotoServer
from devtools.resources import aws_client
from tests.fakes import FakeClock


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


# ------------------------------------------------------------------------------------- partial answers to batch calls


def test_a_batch_write_left_in_part_comes_back_as_unprocessed_items_in_the_requests_shape():
    # GIVEN a BatchWriteItem over two tables, with extra request fields
    a = [{"PutRequest": {"Item": key(f"EVENT#a{n}")}} for n in range(3)]
    b = [{"DeleteRequest": {"Key": key("EVENT#b0")}}]
    request = {"RequestItems": {"t": a, "u": b}, "ReturnConsumedCapacity": "NONE"}

    # WHEN the 2nd and 4th writes are left out
    forwarded = split_batch("BatchWriteItem", request, {1, 3})
    answer = merge_partial(
        "BatchWriteItem", request, {1: "", 3: ""}, {"UnprocessedItems": {"t": [a[2]]}, "ConsumedCapacity": []}
    )

    # THEN only the others go upstream (a table left with none is dropped), the other fields kept
    assert forwarded == {"RequestItems": {"t": [a[0], a[2]]}, "ReturnConsumedCapacity": "NONE"}
    # AND the answer lists them as unprocessed beside what the emulator left itself, the rest of it kept
    assert answer == {"UnprocessedItems": {"t": [a[2], a[1]], "u": b}, "ConsumedCapacity": []}


def test_a_batch_get_left_in_part_carries_each_tables_read_options_into_unprocessed_keys():
    spec = {"ConsistentRead": True, "ProjectionExpression": "#p, sk", "ExpressionAttributeNames": {"#p": "pk"}}
    request = {"RequestItems": {"t": {"Keys": [key("I#0"), key("I#1"), key("I#2")], **spec}}}

    forwarded = split_batch("BatchGetItem", request, {0, 2})
    answer = merge_partial("BatchGetItem", request, {0: "", 2: ""}, {"Responses": {"t": [key("I#1")]}})

    assert forwarded == {"RequestItems": {"t": {"Keys": [key("I#1")], **spec}}}
    assert answer == {
        "Responses": {"t": [key("I#1")]},
        "UnprocessedKeys": {"t": {"Keys": [key("I#0"), key("I#2")], **spec}},
    }
    # the emulator's own unprocessed keys of that table are kept, ours added to them
    own = merge_partial("BatchGetItem", request, {0: ""}, {"UnprocessedKeys": {"t": {"Keys": [key("I#2")], **spec}}})
    assert own["UnprocessedKeys"] == {"t": {"Keys": [key("I#2"), key("I#0")], **spec}}


def test_a_batch_of_statements_left_in_part_answers_every_statement_in_the_requests_order():
    statements = [{"Statement": "INSERT INTO \"t\" VALUE {'pk': ?}", "Parameters": [{"S": f"E{n}"}]} for n in range(4)]
    request = {"Statements": statements}

    forwarded = split_batch("BatchExecuteStatement", request, {0, 2})
    theirs = [{"TableName": "t"}, {"TableName": "t", "Error": {"Code": "DuplicateItem", "Message": "dup"}}]
    left_out = {0: "ThrottlingError", 2: "ProvisionedThroughputExceeded"}
    answer = merge_partial("BatchExecuteStatement", request, left_out, {"Responses": theirs})

    assert forwarded == {"Statements": [statements[1], statements[3]]}
    assert [r.get("Error", {}).get("Code") for r in answer["Responses"]] == [
        "ThrottlingError",
        None,
        "ProvisionedThroughputExceeded",
        "DuplicateItem",
    ]
    assert answer["Responses"][0] == {
        "TableName": "t",
        "Error": {"Code": "ThrottlingError", "Message": STATEMENT_ERRORS["ThrottlingError"]},
    }
    # an emulator answering fewer statements than it was sent: the missing ones failed, never taken as done
    short = merge_partial("BatchExecuteStatement", request, left_out, {"Responses": theirs[:1]})
    assert short["Responses"][3]["Error"]["Code"] == "InternalServerError"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def through(moto: MotoServer, request: pytest.FixtureRequest) -> Iterator[tuple[FaultProxy, Any, Any, str]]:
    """A proxy answering every batch request in part, a boto3 client through it, one straight to moto, a new table."""
    table = "t" + str(abs(hash(request.node.name)) % 10**8)
    direct = aws_client("dynamodb", moto.url)
    direct.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("pk", "sk")],
        BillingMode="PAY_PER_REQUEST",
    )
    with FaultProxy(moto.url, seed=3, partial_rate=1.0) as proxy:
        yield proxy, aws_client("dynamodb", proxy.url), direct, table


def stored(direct: Any, table: str) -> set[str]:
    return {item["pk"]["S"] for item in direct.scan(TableName=table, ConsistentRead=True)["Items"]}


def test_a_batch_write_answered_in_part_over_http_writes_exactly_what_it_does_not_return(through):
    proxy, ddb, direct, table = through
    writes = [{"PutRequest": {"Item": key(f"EVENT#{n}")}} for n in range(10)]

    answer = ddb.batch_write_item(RequestItems={table: writes})

    left = [w["PutRequest"]["Item"]["pk"]["S"] for w in answer["UnprocessedItems"][table]]
    assert 1 <= len(left) <= 9
    assert stored(direct, table) == {f"EVENT#{n}" for n in range(10)} - set(left)
    # one request: botocore found the rewritten answer's x-amz-crc32 right (a mismatch is retried)
    stats = proxy.stats()
    assert stats["requests"] == {"BatchWriteItem": 1}
    assert (stats["partial"], stats["left_out"]) == ({"BatchWriteItem": 1}, {"BatchWriteItem": len(left)})
    assert set(proxy.failed_keys()) == {f"{pk}|RESULT" for pk in left}


def test_a_batch_get_answered_in_part_over_http_returns_the_rest_as_unprocessed_keys(through):
    proxy, ddb, direct, table = through
    for n in range(6):
        direct.put_item(TableName=table, Item={**key(f"I#{n}"), "v": {"N": str(n)}})
    keys = [key(f"I#{n}") for n in range(6)]

    answer = ddb.batch_get_item(
        RequestItems={
            table: {
                "Keys": keys,
                "ConsistentRead": True,
                "ProjectionExpression": "pk, #v",
                "ExpressionAttributeNames": {"#v": "v"},
            }
        }
    )

    got = {item["pk"]["S"] for item in answer["Responses"].get(table, [])}
    unprocessed = answer["UnprocessedKeys"][table]
    assert {k["pk"]["S"] for k in unprocessed["Keys"]} | got == {f"I#{n}" for n in range(6)}
    assert not got & {k["pk"]["S"] for k in unprocessed["Keys"]} and got
    assert {k: v for k, v in unprocessed.items() if k != "Keys"} == {
        "ConsistentRead": True,
        "ProjectionExpression": "pk, #v",
        "ExpressionAttributeNames": {"#v": "v"},
    }
    assert proxy.stats()["partial"] == {"BatchGetItem": 1}
    assert proxy.failed_keys() == {}  # a read refuses no write


def test_statements_answered_in_part_over_http_fail_alone_in_place_and_are_not_run(through):
    proxy, ddb, direct, table = through
    direct.put_item(TableName=table, Item=key("EVENT#0"))  # its INSERT is a DuplicateItem, unless left out
    statement = f"INSERT INTO \"{table}\" VALUE {{'pk': ?, 'sk': ?}}"
    statements = [{"Statement": statement, "Parameters": list(key(f"EVENT#{n}").values())} for n in range(8)]

    responses = ddb.batch_execute_statement(Statements=statements)["Responses"]

    assert len(responses) == 8
    throttled = {n for n, r in enumerate(responses) if r.get("Error", {}).get("Code") in STATEMENT_ERRORS}
    assert throttled and all(responses[n]["TableName"] == table for n in throttled)
    assert stored(direct, table) == {"EVENT#0"} | {f"EVENT#{n}" for n in range(1, 8) if n not in throttled}
    for n, response in enumerate(responses):
        if n not in throttled:
            assert ("Error" in response) == (n == 0), response  # the emulator's own answer, in its place
            assert response.get("Error", {}).get("Code", "DuplicateItem") == "DuplicateItem"
    assert proxy.stats()["left_out"] == {"BatchExecuteStatement": len(throttled)}


def test_the_relays_store_loses_nothing_to_partial_answers(through):
    # GIVEN every batch call of the relay's store answered in part
    proxy, ddb, direct, table = through
    store = HandlesStore(ddb, table, ttl_days=30, clock=FakeClock())
    events = [f"e{n}" for n in range(30)]

    # WHEN it claims 30 new events in a batch
    claims = store.claim_new([(e, "ds", "sqs", None, "", False) for e in events], lease_s=60)

    # THEN a claim whose INSERT was throttled is taken neither as acquired nor as someone else's: claiming it alone
    # (with the token tried) takes it
    not_acquired = [e for e, c in claims.items() if not c.acquired]
    assert not_acquired and all(c.existing is None for c in claims.values())
    for e in not_acquired:
        claim = store.claim(e, datastream_id="ds", source="sqs", lease_s=60, token=claims[e].token)
        assert claim.acquired, e
        claims[e] = claim

    # WHEN their results are written and 30 identities' states read
    failed = store.put_results([store.compose_result(e, {"status": "delivered"}, claims[e].item) for e in events])
    states = store.get_states([(f"o{n}", "ds") for n in range(30)])

    # THEN every result is written (or reported not written, its record then redelivered): none lost in between
    for e in set(events) - set(failed):
        item = direct.get_item(TableName=table, Key=HandlesStore.result_key(e), ConsistentRead=True)["Item"]
        assert decode_item(item)["status"] == "delivered", e
    # AND the states read are the ones asked for (new identities: empty); a key still unprocessed after the store's
    # tries is absent, never taken as read (its caller reads it alone: `get_states`' contract)
    assert set(states) <= {(f"o{n}", "ds") for n in range(30)}
    assert all(state == IdentityState() for state in states.values())
    assert proxy.stats()["partial"].keys() == {"BatchExecuteStatement", "BatchWriteItem", "BatchGetItem"}
