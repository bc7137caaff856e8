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


def test_the_cli_prints_a_signed_curl_for_a_deployed_stack_reading_the_secret_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io
    import shlex

    from devtools.signing import main

    # GIVEN the stack's webhook secret on standard input (never on the command line)
    secret = new_webhook_secret()
    monkeypatch.setattr("sys.stdin", io.StringIO(secret + "\n"))
    body = '{"event": {"xdm": {"_id": "first-event-2"}}}\n '  # signed byte for byte, its trailing space included

    # WHEN the command is printed
    assert main(["--url", "https://abc.execute-api.eu-west-1.amazonaws.com/events", "--body", body]) == 0

    # THEN it POSTs the body byte for byte to the URL, with headers the relay verifies, and without the secret
    out = capsys.readouterr().out
    argv = shlex.split(out)
    assert argv[:5] == ["curl", "-sS", "-X", "POST", "https://abc.execute-api.eu-west-1.amazonaws.com/events"]
    assert argv[argv.index("--data-binary") + 1] == body
    headers = dict(argv[i + 1].split(": ", 1) for i, a in enumerate(argv) if a == "-H")
    assert headers.pop("content-type") == "application/json"
    assert Webhook(secret).verify(body, headers) == {"event": {"xdm": {"_id": "first-event-2"}}}
    assert secret not in out and secret.removeprefix("whsec_") not in out


def test_the_cli_refuses_anything_but_a_secret_on_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from devtools.signing import main

    monkeypatch.setattr("sys.stdin", io.StringIO('{"secrets": ["whsec_..."]}\n'))
    with pytest.raises(SystemExit) as refused:
        main(["--url", "https://x/events", "--body", "{}"])
    assert refused.value.code == 2
