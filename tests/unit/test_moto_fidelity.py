"""The local emulator's PartiQL INSERT behaves as DynamoDB documents it (devtools/moto_fidelity.py): a new key is
inserted, an existing one is refused with `DuplicateItem` and left as it was. Shown in process and over HTTP against the
moto server the local stack and integration tests use; and a test that fails once moto itself behaves so.

Its SQS queues take concurrent receives: two that both find a message past `maxReceiveCount` move it to the dead-letter
queue once, and neither fails (moto alone answers the second one 500, stranding what it had received)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from moto.core import DEFAULT_ACCOUNT_ID
from moto.dynamodb.models import dynamodb_backends
from moto.sqs.models import SQSBackend, sqs_backends

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


# ------------------------------------------------------------------------------------------------------------ SQS


class _MeetingPolicy(dict[str, Any]):
    """A redrive policy whose `maxReceiveCount`, read in a receive's scan, makes the first two readers meet (or wait
    1 s): it holds two concurrent receives where each decides to move the message to the dead-letter queue."""

    def __init__(self, policy: dict[str, Any]) -> None:
        super().__init__(policy)
        self.meeting = threading.Barrier(2, timeout=1.0)
        self.met: set[int] = set()

    def __getitem__(self, key: str) -> Any:
        me = threading.get_ident()
        if key == "maxReceiveCount" and me not in self.met:
            self.met.add(me)
            try:
                self.meeting.wait()
            except threading.BrokenBarrierError:
                pass  # the other receive waits for this one to finish (the lock): nothing to meet
        return super().__getitem__(key)


def two_receives_of_a_dead_letter(receive: Callable[..., Any]) -> tuple[list[BaseException], int, int]:
    """Two threads receive at once from a queue whose one message has used up its receives. Returns their exceptions,
    and how many messages the queue and its dead-letter queue then hold."""
    sqs = boto3.client("sqs")
    dlq_url = sqs.create_queue(QueueName="dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = f'{{"deadLetterTargetArn": "{dlq_arn}", "maxReceiveCount": "1"}}'
    url = sqs.create_queue(QueueName="q", Attributes={"RedrivePolicy": redrive})["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="{}")
    handle = sqs.receive_message(QueueUrl=url)["Messages"][0]["ReceiptHandle"]
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=0)  # received once: done
    backend = sqs_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
    queue = backend.get_queue("q")
    assert len(queue._messages) == 1
    queue.redrive_policy = _MeetingPolicy(dict(queue.redrive_policy or {}))

    errors: list[BaseException] = []

    def poll() -> None:
        try:
            receive(backend, "q", 10, 0, 30)
        except Exception as exc:
            errors.append(exc)

    pollers = [threading.Thread(target=poll) for _ in range(2)]
    for poller in pollers:
        poller.start()
    for poller in pollers:
        poller.join(timeout=10)
    return errors, len(queue._messages), len(backend.get_queue("dlq")._messages)


def test_concurrent_receives_move_a_dead_letter_once(aws: None) -> None:
    errors, left, dead = two_receives_of_a_dead_letter(SQSBackend.receive_message)

    assert errors == []
    assert (left, dead) == (0, 1)


def test_moto_itself_still_fails_the_second_of_two_concurrent_receives(aws: None) -> None:
    """When this fails, moto's receives no longer race: the SQS part of devtools/moto_fidelity.py can go."""
    errors, left, dead = two_receives_of_a_dead_letter(moto_fidelity.unlocked_sqs()["receive_message"])

    assert [type(e) for e in errors] == [ValueError]  # `list.remove(x): x not in list`: moto answers 500
    assert (left, dead) == (0, 1)
