"""Every sample in events/ (the files `sam local invoke -e` takes) through the real Lambda entry point,
`relay.handler.lambda_handler`, against the local stack: each ends delivered. Webhook samples are re-signed with the
stack's secret (their placeholder signatures cannot verify); their bodies and webhook-ids are kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from devtools.lambda_context import new_context
from devtools.run_demo import event_id_of
from devtools.stack import DATASTREAM_ID, EVENTS_DIR, LocalStack

pytestmark = pytest.mark.integration

SAMPLES = sorted(EVENTS_DIR.glob("*.json"))


def test_events_dir_has_webhook_and_sqs_samples() -> None:
    kinds = {("sqs" if "Records" in json.loads(p.read_text()) else "webhook") for p in SAMPLES}
    assert kinds == {"sqs", "webhook"}


def edge_requests(stack: LocalStack, event_id: str) -> list[dict[str, Any]]:
    return [r for r in stack.sim.requests_log() if r["path"].endswith("/interact") and r["xdm_id"] == event_id]


def assert_delivered(stack: LocalStack, event_id: str, source: str, body: dict[str, Any]) -> dict[str, Any]:
    """The stored result of `event_id` is delivered, with the handles of Edge's one answer to `body`."""
    item = stack.result_item(event_id)
    assert item is not None, event_id
    [call] = edge_requests(stack, event_id)
    assert (item["status"], item["eventId"], item["source"], item["datastreamId"]) == (
        "delivered",
        event_id,
        source,
        DATASTREAM_ID,
    )
    assert item["requestId"] == call["request_id"]
    # the identity was asked for (query.identity.fetch: ECID), so it is in the handles
    assert [h["type"] for h in item["handle"]] == ["identity:result", "locationHint:result", "state:store"]
    # Edge got the sample's body, with xdm._id set to the eventId
    sent = copy.deepcopy(body)
    sent["event"]["xdm"]["_id"] = event_id
    assert call["body"] == sent
    return item


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_event_is_delivered_by_the_real_handler(clean_stack: LocalStack, path: Path) -> None:
    stack = clean_stack
    from relay.handler import lambda_handler  # after the stack applied the function's environment

    event = json.loads(path.read_text())
    if "Records" in event:
        # GIVEN an SQS sample, as the event source mapping delivers it
        records = event["Records"]

        # WHEN the handler gets it
        answer = lambda_handler(event, new_context(30))

        # THEN every record is acknowledged and delivered (eventId: xdm._id, else the messageId)
        assert answer == {"batchItemFailures": []}
        for record in records:
            body = json.loads(record["body"])
            event_id = event_id_of(record["body"], record["messageId"])
            assert_delivered(stack, event_id, "sqs", body)
    else:
        # GIVEN a webhook sample re-signed with the stack's secret (same body, same webhook-id)
        msg_id = event["headers"]["webhook-id"]
        event["headers"].update(stack.sign(event["body"], msg_id=msg_id))

        # WHEN the handler gets it
        answer = lambda_handler(event, new_context(30))

        # THEN 200 with the delivered result (eventId: the webhook-id, the body has no xdm._id)
        body = json.loads(event["body"])
        item = assert_delivered(stack, msg_id, "webhook", body)
        assert (answer["statusCode"], answer["headers"]["Content-Type"]) == (200, "application/json")
        assert json.loads(answer["body"]) == {
            "eventId": msg_id,
            "requestId": item["requestId"],
            "handle": item["handle"],
        }


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_devtools_invoke_runs_a_sample_as_sam_local_invoke_would(
    clean_stack: LocalStack, path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the function's environment (what `make serve` prints), and a sample as shipped (placeholder signature)
    from devtools.invoke import main

    # WHEN it is invoked the way the README says, without Docker
    assert main([str(path)]) == 0

    # THEN the function's answer is printed: every record acknowledged, or the webhook's 200 (re-signed with the
    # stack's secret, read from its Secrets Manager), and Edge got each event
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    event = json.loads(path.read_text())
    if "Records" in event:
        assert answer == {"batchItemFailures": []}
        ids = [event_id_of(r["body"], r["messageId"]) for r in event["Records"]]
    else:
        assert answer["statusCode"] == 200, answer
        ids = [event["headers"]["webhook-id"]]
        assert json.loads(answer["body"])["eventId"] == ids[0]
    for event_id in ids:
        assert stack_status(clean_stack, event_id) == "delivered"


def stack_status(stack: LocalStack, event_id: str) -> str | None:
    item = stack.result_item(event_id)
    return None if item is None else str(item["status"])
