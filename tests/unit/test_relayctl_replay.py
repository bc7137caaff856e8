"""relayctl replay on fakes: what it refuses to replay (the happy path runs against moto in the integration tests)."""

from __future__ import annotations

from typing import Any

from relay import codec
from relay.process_event import INVALID_EVENT_TYPE

from relayctl.__main__ import replay_event


class Recorder:
    """A DynamoDB or SQS client that serves one item and records every other call."""

    def __init__(self, item: dict[str, Any] | None = None) -> None:
        self.item = item
        self.calls: list[str] = []

    def get_item(self, **kwargs: Any) -> dict[str, Any]:
        return {"Item": self.item} if self.item else {}

    def __getattr__(self, name: str) -> Any:
        def call(**kwargs: Any) -> dict[str, Any]:
            self.calls.append(name)
            return {}

        return call


def test_replay_refuses_an_event_the_relay_itself_found_invalid() -> None:
    # GIVEN an event the relay rejected itself (a bad body or datastreamId), not Edge
    item = {
        "pk": {"S": "EVENT#order-42"},
        "sk": {"S": "RESULT"},
        "status": {"S": "rejected"},
        "eventId": {"S": "order-42"},
        "error": codec.encode_json({"type": INVALID_EVENT_TYPE, "title": "Invalid event", "status": 400}),
        "request": codec.encode_json('{"event": {}}'),
    }
    ddb, sqs = Recorder(item), Recorder()

    # WHEN it is replayed
    outcome = replay_event(ddb, sqs, "t", "https://sqs.example/q", "order-42")

    # THEN nothing changes and nothing is sent: the same message would be refused again (or go to the wrong
    # datastream); the sender has to send a corrected event
    assert outcome == "skipped: the relay found the event itself invalid; send a corrected one"
    assert (ddb.calls, sqs.calls) == ([], [])
