"""The soak's observation of invocations that outlive the function timeout (devtools/soak.py)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from devtools.soak import Tracer


def _body(xdm_id: str | None) -> str:
    xdm: dict[str, Any] = {"eventType": "web.webpagedetails.pageViews"}
    if xdm_id is not None:
        xdm["_id"] = xdm_id
    return json.dumps({"event": {"xdm": xdm}})


def _sqs_event() -> dict[str, Any]:
    return {
        "Records": [
            {"messageId": "m-1", "body": _body("evt-1"), "messageAttributes": {}},
            {"messageId": "m-2", "body": _body(None), "messageAttributes": {}},
            {
                "messageId": "m-3",
                "body": _body(None),
                "messageAttributes": {"eventId": {"stringValue": "evt-3", "dataType": "String"}},
            },
        ]
    }


def _webhook_event(xdm_id: str | None, *, encoded: bool) -> dict[str, Any]:
    body = _body(xdm_id)
    return {
        "headers": {"Webhook-Id": "msg_1"},
        "body": base64.b64encode(body.encode()).decode() if encoded else body,
        "isBase64Encoded": encoded,
    }


def _slow(event: dict[str, Any], context: Any) -> str:
    time.sleep(0.01)
    return "answer"


def test_an_invocation_longer_than_the_timeout_notes_every_id_its_events_may_reach_edge_under() -> None:
    tracer = Tracer()
    invoke = tracer.timed(_slow, 0.0)

    assert invoke(_sqs_event(), None) == "answer"
    assert invoke(_webhook_event(None, encoded=True), None) == "answer"
    assert invoke(_webhook_event("evt-w", encoded=False), None) == "answer"

    assert tracer.overran_invocations == 3
    assert set(tracer.overran) == {"evt-1", "m-1", "m-2", "evt-3", "m-3", "msg_1", "evt-w"}
    assert tracer.overran["msg_1"] == 2
    assert tracer.longest_invocation > 0.0


def test_an_invocation_within_the_timeout_notes_nothing_but_its_length() -> None:
    tracer = Tracer()
    tracer.timed(_slow, 3600.0)(_sqs_event(), None)

    assert tracer.overran_invocations == 0
    assert not tracer.overran
    assert tracer.longest_invocation > 0.0


# ------------------------------------------------------------------------------------------------------ the verdict


def accounted(
    results: dict[str, dict[str, Any]],
    *,
    dlq: tuple[str, ...] = (),
    left: tuple[str, ...] = (),
    kinds: dict[str, str] | None = None,
    duplicated: tuple[str, ...] = (),
    drained: bool = True,
) -> Any:
    """`account()` over three generated events (e1-e3, valid unless `kinds` says otherwise), with the stored items,
    dead-letter messages and messages left in the queue given, and nothing else (no Edge calls, no faults)."""
    from collections import Counter

    from devtools.soak import Send, SoakConfig, account

    kinds = {"e1": "valid", "e2": "valid", "e3": "valid", **(kinds or {})}
    sends = [Send(i, kind, "sqs", b"{}", event_id) for i, (event_id, kind) in enumerate(kinds.items())]
    sends += [Send(len(sends) + i, "valid", "sqs", b"{}", e, duplicate=True) for i, e in enumerate(duplicated)]

    def message(event_id: str) -> dict[str, Any]:
        return {"MessageId": f"m-{event_id}", "Body": "{}", "MessageAttributes": {"eventId": {"StringValue": event_id}}}

    return account(
        SoakConfig(events=3),
        sends,
        results=results,
        dlq=[message(e) for e in dlq],
        left=[message(e) for e in left],
        edge_log=[],
        sim_stats={},
        tracer=Tracer(),
        proxy_stats={},
        webhook_answers=Counter(),
        gave_up=[],
        unsent=[],
        duration=1.0,
        drained=drained,
        function_timeout=30.0,
    )


DELIVERED = {"status": "delivered"}
ALL_DELIVERED = {"e1": DELIVERED, "e2": DELIVERED, "e3": DELIVERED}


def test_a_soak_whose_every_event_is_delivered_passes() -> None:
    report = accounted(ALL_DELIVERED)
    assert (report.ok, report.failures) == (True, [])


@pytest.mark.parametrize(
    ("case", "failure"),
    [
        ({"results": {"e1": DELIVERED, "e2": DELIVERED}}, "events missing"),
        ({"results": {"e1": DELIVERED, "e2": DELIVERED}, "dlq": ("e3",)}, "events in another state than their kind's"),
        ({"results": {**ALL_DELIVERED, "e3": {"status": "rejected"}}}, "events in another state than their kind's"),
        ({"results": {**ALL_DELIVERED, "x9": DELIVERED}}, "stray result items"),
        ({"results": {"e1": DELIVERED, "e2": DELIVERED}, "left": ("e3",)}, "events still in the queue"),
        ({"results": ALL_DELIVERED, "drained": False}, "the queue was not drained in time"),
        (
            {"results": ALL_DELIVERED, "kinds": {"e4": "valid"}, "duplicated": ("e4",)},
            "duplicated eventIds without one final item",
        ),
        ({"results": ALL_DELIVERED, "dlq": ("e2",)}, "events with a final item and a message still in a queue"),
        ({"results": ALL_DELIVERED, "left": ("e2",)}, "events with a final item and a message still in a queue"),
        (
            {"results": {**ALL_DELIVERED, "e3": {"status": "rejected"}}, "kinds": {"e3": "invalid_json"}},
            "rejections without a stored reason",
        ),
    ],
    ids=[
        "missing",
        "valid-in-dlq",
        "valid-rejected",
        "stray",
        "left-in-the-queue",
        "drain-timed-out",
        "duplicated-without-a-final-item",
        "delivered-and-dlq",
        "delivered-and-queued",
        "no-reason",
    ],
)
def test_every_expectation_the_soak_counts_fails_it(case: dict[str, Any], failure: str) -> None:
    # GIVEN a soak's final state with one thing wrong
    # WHEN it is accounted for
    report = accounted(**case)

    # THEN the run fails, naming it (before, only a missing event or an unexplained duplicate failed it)
    assert not report.ok
    assert failure in report.failures, report.failures


# ------------------------------------------------------------------------------------------- results left unprocessed


class _Answer:
    status_code = 200


class _Model:
    name = "BatchWriteItem"


def _batch_answer(tracer: Tracer, pks: list[str], left: list[str]) -> None:
    unprocessed = {"t": [{"PutRequest": {"Item": {"pk": {"S": pk}, "sk": {"S": "RESULT"}}}} for pk in left]}
    parsed = {"UnprocessedItems": unprocessed if left else {}}
    tracer._after_call(_Answer(), parsed, _Model(), {"soak_batch_pks": pks})


def test_a_result_left_unprocessed_for_good_explains_its_events_next_edge_call() -> None:
    # GIVEN two events answered 200 by Edge, whose results a BatchWriteItem left unprocessed
    tracer = Tracer()
    for event_id in ("e1", "e2"):
        tracer.edge_call(event_id)
        tracer.edge_answer(event_id, 200)
    _batch_answer(tracer, ["EVENT#e1", "EVENT#e2"], ["EVENT#e1", "EVENT#e2"])
    # AND the relay's next try wrote e2's
    _batch_answer(tracer, ["EVENT#e2"], [])

    # WHEN both events call Edge again (e1's record redelivered; e2's for another reason)
    tracer.edge_call("e1")
    tracer.edge_call("e2")

    # THEN only e1's repeat is put down to DynamoDB, once
    assert dict(tracer.ddb_failed_after_ok) == {"e1": 1}
    assert tracer.results_unprocessed == 1
    tracer.edge_call("e1")
    assert dict(tracer.ddb_failed_after_ok) == {"e1": 1}
