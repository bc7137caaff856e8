"""The soak's observation of invocations that outlive the function timeout (devtools/soak.py)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

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
