"""The local SQS event source mapping against a real moto server, with stub handlers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.moto_server import MotoServer
from devtools.poller import InvalidBatchResponse, QueuePoller, failed_ids
from devtools.resources import LocalResources, aws_client, create_resources

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def res(moto: MotoServer, request: pytest.FixtureRequest) -> LocalResources:
    prefix = "t" + str(abs(hash(request.node.name)) % 10**8)
    return create_resources(moto.url, adobe_secret={"clientId": "x"}, webhook_secret={"secrets": []}, prefix=prefix)


@pytest.fixture
def sqs(moto: MotoServer) -> Any:
    return aws_client("sqs", moto.url)


class Recorder:
    """A stub handler recording events and answering with a scripted response."""

    def __init__(self, answer: Any = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.contexts: list[Any] = []
        self.answer = answer

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        self.events.append(event)
        self.contexts.append(context)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer(event) if callable(self.answer) else self.answer


def make_poller(handler: Any, sqs: Any, res: LocalResources, **kw: Any) -> QueuePoller:
    opts: dict[str, Any] = {
        "batch_size": res.batch_size,
        "batching_window": 0,
        "function_timeout": res.function_timeout,
        "failure_visibility_timeout": 0,
        "wait_time_seconds": 0,
    }
    opts.update(kw)
    return QueuePoller(handler, sqs, res.queue_url, res.queue_arn, **opts)


def send(sqs: Any, res: LocalResources, bodies: list[str]) -> list[str]:
    return [sqs.send_message(QueueUrl=res.queue_url, MessageBody=b)["MessageId"] for b in bodies]


def visible_bodies(sqs: Any, url: str) -> list[str]:
    resp = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0)
    return sorted(m["Body"] for m in resp.get("Messages", []))


def test_poller_builds_the_lambda_sqs_event(sqs: Any, res: LocalResources) -> None:
    # GIVEN a message with a String and a Binary attribute
    msg_id = sqs.send_message(
        QueueUrl=res.queue_url,
        MessageBody='{"event":{"xdm":{}}}',
        MessageAttributes={
            "datastreamId": {"DataType": "String", "StringValue": "ds-1"},
            "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01"},
        },
    )["MessageId"]
    handler = Recorder()
    # WHEN the poller runs once
    assert make_poller(handler, sqs, res).poll_once() == 1
    # THEN the record has exactly the shape Lambda sends
    (record,) = handler.events[0]["Records"]
    assert record["messageId"] == msg_id
    assert record["body"] == '{"event":{"xdm":{}}}'
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == res.queue_arn
    assert record["awsRegion"] == "us-east-1"
    assert set(record["attributes"]) >= {
        "ApproximateReceiveCount",
        "SentTimestamp",
        "SenderId",
        "ApproximateFirstReceiveTimestamp",
    }
    assert record["attributes"]["ApproximateReceiveCount"] == "1"
    assert record["messageAttributes"]["datastreamId"] == {
        "stringValue": "ds-1",
        "stringListValues": [],
        "binaryListValues": [],
        "dataType": "String",
    }
    assert record["messageAttributes"]["blob"]["binaryValue"] == "AAE="
    assert len(record["md5OfBody"]) == 32
    assert handler.contexts[0].get_remaining_time_in_millis() <= res.function_timeout * 1000
    # AND the successful record is deleted
    assert visible_bodies(sqs, res.queue_url) == []


def test_poller_deletes_all_but_the_listed_failures(sqs: Any, res: LocalResources) -> None:
    # GIVEN three messages and a handler failing the second
    ids = send(sqs, res, ["a", "b", "c"])
    handler = Recorder({"batchItemFailures": [{"itemIdentifier": ids[1]}]})
    poller = make_poller(handler, sqs, res)
    # WHEN it runs once
    assert poller.poll_once() == 3
    # THEN only the listed record is redelivered
    assert poller.history[-1].failed == [ids[1]]
    assert sorted(poller.history[-1].deleted) == sorted([ids[0], ids[2]])
    assert visible_bodies(sqs, res.queue_url) == ["b"]


@pytest.mark.parametrize(
    "answer",
    [
        RuntimeError("boom"),
        {"batchItemFailures": [{"itemIdentifier": ""}]},
        {"batchItemFailures": [{"itemIdentifier": "not-in-batch"}]},
        {"batchItemFailures": [{"id": "x"}]},
        {"batchItemFailures": "nope"},
        "not an object",
    ],
    ids=["raises", "empty-id", "unknown-id", "bad-key", "not-a-list", "not-an-object"],
)
def test_poller_retries_the_whole_batch_on_failure(sqs: Any, res: LocalResources, answer: Any) -> None:
    # GIVEN two messages and a handler that fails as a whole
    send(sqs, res, ["a", "b"])
    poller = make_poller(Recorder(answer), sqs, res)
    # WHEN it runs once
    poller.poll_once()
    # THEN nothing is deleted
    assert poller.history[-1].deleted == []
    assert visible_bodies(sqs, res.queue_url) == ["a", "b"]


@pytest.mark.parametrize("answer", [None, {}, {"batchItemFailures": []}, {"batchItemFailures": None}])
def test_poller_treats_empty_responses_as_success(sqs: Any, res: LocalResources, answer: Any) -> None:
    send(sqs, res, ["a", "b"])
    poller = make_poller(Recorder(answer), sqs, res)
    poller.poll_once()
    assert visible_bodies(sqs, res.queue_url) == []


def test_failed_ids_rejects_unserialisable_responses() -> None:
    with pytest.raises(InvalidBatchResponse):
        failed_ids({"batchItemFailures": [], "x": object()}, ["m"])


def test_poller_gathers_batches_larger_than_ten(sqs: Any, res: LocalResources) -> None:
    # GIVEN more messages than one ReceiveMessage returns
    send(sqs, res, [str(i) for i in range(25)])
    handler = Recorder()
    poller = make_poller(handler, sqs, res, batch_size=20, batching_window=1)
    # WHEN it runs once
    assert poller.poll_once() == 20
    # THEN one invocation carried 20 records
    assert len(handler.events[0]["Records"]) == 20
    poller.drain(timeout=10)
    assert sum(len(e["Records"]) for e in handler.events) == 25


def test_poller_dead_letters_after_max_receive_count(sqs: Any, res: LocalResources) -> None:
    # GIVEN a message that always fails
    send(sqs, res, ["poison"])
    handler = Recorder(
        lambda event: {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in event["Records"]]}
    )
    poller = make_poller(handler, sqs, res)
    # WHEN the poller drains the queue
    poller.drain(timeout=20, raise_on_timeout=True)
    # THEN it was tried maxReceiveCount times and then moved to the DLQ
    counts = [e["Records"][0]["attributes"]["ApproximateReceiveCount"] for e in handler.events]
    assert res.max_receive_count is not None
    assert counts == [str(n) for n in range(1, res.max_receive_count + 1)]
    assert visible_bodies(sqs, res.dlq_url) == ["poison"]


def test_poller_background_thread_processes_messages(sqs: Any, res: LocalResources) -> None:
    handler = Recorder()
    with make_poller(handler, sqs, res, wait_time_seconds=1) as poller:
        send(sqs, res, [json.dumps({"n": 1})])
        poller.drain(timeout=10, raise_on_timeout=True)
        assert poller.running
    assert not poller.running
    assert [r["body"] for e in handler.events for r in e["Records"]] == ['{"n": 1}']


def test_poller_without_failure_override_keeps_the_queue_visibility_timeout(sqs: Any, res: LocalResources) -> None:
    # GIVEN a failing record and the template's (long) visibility timeout
    send(sqs, res, ["a"])
    poller = make_poller(Recorder(RuntimeError("x")), sqs, res, failure_visibility_timeout=None)
    poller.poll_once()
    started = time.monotonic()
    # THEN the record stays in flight
    assert visible_bodies(sqs, res.queue_url) == []
    assert poller.pending() == 1
    assert time.monotonic() - started < res.visibility_timeout


class OneMessageTurningVisible:
    """An SQS stand-in that, like moto, computes the requested counts one after another in a fixed order (visible
    first), with one in-flight message whose visibility timeout ends after ``turns_at`` counts have been computed."""

    ORDER = (
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesDelayed",
        "ApproximateNumberOfMessagesNotVisible",
    )

    def __init__(self, turns_at: int) -> None:
        self.turns_at = turns_at
        self.computed = 0

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:  # noqa: N803
        attrs: dict[str, str] = {}
        for name in (n for n in self.ORDER if n in AttributeNames):
            visible = self.computed >= self.turns_at
            self.computed += 1
            counts = {self.ORDER[0]: int(visible), self.ORDER[1]: 0, self.ORDER[2]: int(not visible)}
            attrs[name] = str(counts[name])
        return {"Attributes": attrs}


@pytest.mark.parametrize("turns_at", range(5))
def test_pending_counts_a_message_whose_visibility_timeout_ends_while_counting(turns_at: int) -> None:
    # GIVEN a message in flight whose visibility timeout ends between any two of the counts (or not at all)
    sqs = OneMessageTurningVisible(turns_at)
    arn = "arn:aws:sqs:us-east-1:123456789012:q"
    poller = QueuePoller(Recorder(), sqs, "q", arn, batch_size=10, batching_window=0, function_timeout=30)
    # THEN pending() still counts it, so drain() cannot stop while it is about to come back
    assert poller.pending() >= 1


class EmptyQueueLongPolling:
    """An SQS stand-in for an empty queue whose receives each wait a little, like a long poll; counts are 0."""

    def __init__(self) -> None:
        self.receives = 0
        self.receives_at_count: list[int] = []

    def receive_message(self, **_: Any) -> dict[str, Any]:
        self.receives += 1
        time.sleep(0.2)  # long beside a thread switch, so the receives counted below are the poller's, not noise
        return {}

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict[str, Any]:  # noqa: N803
        self.receives_at_count.append(self.receives)
        return {"Attributes": dict.fromkeys(AttributeNames, "0")}


def test_a_count_asked_for_while_the_poller_polls_waits_for_at_most_the_poll_under_way() -> None:
    # GIVEN a background poller receiving from an empty queue without pause (a Lock is not fair: the polling thread
    # took it back at once, and a count once waited 94 s in the soak)
    sqs = EmptyQueueLongPolling()
    arn = "arn:aws:sqs:us-east-1:123456789012:q"
    poller = QueuePoller(Recorder(), sqs, "q", arn, batch_size=10, batching_window=0, function_timeout=30)
    with poller:
        while sqs.receives < 3:  # polling under way
            time.sleep(0.01)
        for _ in range(3):
            asked_at = sqs.receives
            # WHEN a count is asked for
            assert poller.pending() == 0
            # THEN it ran right after the receive under way when it was asked (one more if the poller began one
            # between reading `asked_at` and asking)
            assert sqs.receives_at_count[-1] - asked_at <= 2
