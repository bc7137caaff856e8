"""Webhook signing and the Lambda context stand-in."""

from __future__ import annotations

import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from devtools.lambda_context import new_context
from devtools.signing import new_webhook_secret, sign_webhook


def test_signed_webhooks_verify_with_standard_webhooks() -> None:
    secret = new_webhook_secret()
    assert secret.startswith("whsec_")
    headers = sign_webhook(b'{"a":1}', secret, msg_id="msg_1")
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify('{"a":1}', headers) == {"a": 1}


def test_signatures_depend_on_the_secret_and_expire() -> None:
    secret = new_webhook_secret()
    with pytest.raises(WebhookVerificationError):
        Webhook(new_webhook_secret()).verify("{}", sign_webhook("{}", secret))
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify("{}", sign_webhook("{}", secret, timestamp=int(time.time()) - 600))


def test_lambda_context_counts_down_from_the_timeout() -> None:
    ctx = new_context(2.0)
    assert ctx.function_name == "interact-relay-local"
    assert ctx.invoked_function_arn.endswith(":function:interact-relay-local")
    assert len(ctx.aws_request_id) == 36
    assert 1500 < ctx.get_remaining_time_in_millis() <= 2000
    assert new_context(2.0).aws_request_id != ctx.aws_request_id
    assert new_context(-1).get_remaining_time_in_millis() == 0
