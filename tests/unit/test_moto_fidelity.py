"""The local emulator's PartiQL INSERT behaves as DynamoDB documents it (devtools/moto_fidelity.py): a new key is
inserted, an existing one is refused with `DuplicateItem` and left as it was. Shown in process and over HTTP against the
moto server the local stack and integration tests use; and a test that fails once moto itself behaves so."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.dynamodb.models import dynamodb_backends

from devtools import moto_fidelity
from devtools.moto_server import MotoServer
from devtools.resources import create_handles_table

INSERT = "INSERT INTO \"t\" VALUE {'pk': ?, 'sk': ?, 'status': ?}"


def insert(pk: str, status: str) -> dict[str, Any]:
    return {"Statement": INSERT, "Parameters": [{"S": pk}, {"S": "RESULT"}, {"S": status}]}


def status_of(ddb: Any, pk: str) -> str | None:
    item = ddb.get_item(TableName="t", Key={"pk": {"S": pk}, "sk": {"S": "RESULT"}}).get("Item")
    return item["status"]["S"] if item else None


def check_insert_semantics(ddb: Any) -> None:
    create_handles_table(ddb, "t")
    ddb.put_item(TableName="t", Item={"pk": {"S": "EVENT#done"}, "sk": {"S": "RESULT"}, "status": {"S": "delivered"}})

    answer = ddb.batch_execute_statement(Statements=[insert("EVENT#new", "pending"), insert("EVENT#done", "pending")])

    new, existing = answer["Responses"]
    assert "Error" not in new
    assert existing["Error"]["Code"] == "DuplicateItem"
    assert status_of(ddb, "EVENT#new") == "pending"
    assert status_of(ddb, "EVENT#done") == "delivered"  # not overwritten
    # Other statements still reach moto's own PartiQL
    select = {"Statement": "SELECT * FROM t WHERE pk = 'EVENT#done' AND sk = 'RESULT'"}
    assert ddb.batch_execute_statement(Statements=[select])["Responses"][0]["Item"]["status"] == {"S": "delivered"}


def test_insert_refuses_an_existing_key_in_process(aws: None) -> None:
    check_insert_semantics(boto3.client("dynamodb"))


@pytest.mark.integration
def test_insert_refuses_an_existing_key_on_the_moto_server() -> None:
    with MotoServer() as server:
        ddb = boto3.client(
            "dynamodb",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="y",
        )
        check_insert_semantics(ddb)


def test_moto_itself_still_overwrites_on_insert(aws: None) -> None:
    """When this fails, moto refuses duplicates itself: devtools/moto_fidelity.py can go."""
    ddb = boto3.client("dynamodb")
    create_handles_table(ddb, "t")
    ddb.put_item(TableName="t", Item={"pk": {"S": "EVENT#done"}, "sk": {"S": "RESULT"}, "status": {"S": "delivered"}})
    backend = dynamodb_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]

    literal = "INSERT INTO \"t\" VALUE {'pk': 'EVENT#done', 'sk': 'RESULT', 'status': 'pending'}"

    answer = moto_fidelity.unpatched()(backend, [{"Statement": literal}])

    assert "Error" not in answer[0]

    assert status_of(ddb, "EVENT#done") == "pending"
