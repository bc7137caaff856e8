"""devtools.invoke (`sam local invoke -e` without Docker): what it does outside the local stack's environment, and
how it re-signs a webhook event. Its runs against the stack are in tests/integration/test_events_samples.py."""

from __future__ import annotations

import base64
import json
import time

import pytest
from standardwebhooks.webhooks import Webhook

from devtools.invoke import main, signed
from devtools.stack import EVENTS_DIR

SECRET = "whsec_" + base64.b64encode(b"x" * 32).decode()


def test_without_the_function_environment_it_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HANDLES_TABLE", raising=False)
    assert main([str(EVENTS_DIR / "sqs-batch.json")]) == 2
    assert "paste the export lines `make serve` prints" in capsys.readouterr().err


@pytest.mark.parametrize("as_base64", [False, True])
def test_a_webhook_event_is_signed_again_over_its_body_keeping_its_webhook_id(as_base64: bool) -> None:
    # GIVEN the order sample (placeholder signature), its body as API Gateway sends it
    event = json.loads((EVENTS_DIR / "webhook-order.json").read_text())
    body = event["body"]
    if as_base64:
        event = {**event, "body": base64.b64encode(body.encode()).decode(), "isBase64Encoded": True}

    # WHEN it is signed again
    fresh = signed(event, SECRET)

    # THEN the library verifies the new headers over the body, the webhook-id is the sample's, the body untouched
    headers = fresh["headers"]
    assert headers["webhook-id"] == event["headers"]["webhook-id"]
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    Webhook(SECRET).verify(body, headers, json_parse=False)  # raises if the signature does not match
    assert fresh["body"] == event["body"]


def test_hand_built_webhook_events_the_readme_describes_are_signed_not_a_crash() -> None:
    # GIVEN the order sample made into the two hand-built events whose answers the README describes: a signed body
    # that is not UTF-8 (400 naming the byte), and a body flagged base64 that is not (401)
    event = json.loads((EVENTS_DIR / "webhook-order.json").read_text())
    not_utf8 = b'{"event":{"xdm":{"_id":"inv-nonutf8","x":"\xff"}}}'
    cases = {
        "not-utf8": {**event, "body": base64.b64encode(not_utf8).decode(), "isBase64Encoded": True},
        "not-base64": {**event, "body": "!!!not base64!!!", "isBase64Encoded": True},
    }

    # WHEN each is signed (`make invoke` did not get this far: UnicodeDecodeError, binascii.Error)
    fresh = {name: signed(case, SECRET) for name, case in cases.items()}

    # THEN the first's signature is over its exact bytes, as the relay checks it
    from relay.webhook import _SignedBytes

    headers = fresh["not-utf8"]["headers"]
    _SignedBytes(SECRET).verify(not_utf8.decode("utf-8", "surrogateescape"), headers)  # raises if it does not match
    assert fresh["not-base64"]["headers"]["webhook-signature"].startswith("v1,")
