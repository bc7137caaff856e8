"""Credentials across many invocations of one execution environment (issue 2, item 4; contract §4, §6): the secret is
read once per cache period (counted by a proxy in front of moto) and the IMS token once per token lifetime (counted
by the Edge simulator)."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from relay.runtime import Runtime
from relay.settings import load_settings

from devtools.edge_sim import new_ecid
from devtools.fault_proxy import FaultProxy
from devtools.lambda_context import new_context
from devtools.signing import new_webhook_secret, sign_webhook
from devtools.stack import LocalStack
from tests.fakes import FakeClock

pytestmark = pytest.mark.integration


def new_runtime(clock: Any = None, **overrides: str) -> Runtime:
    return Runtime(load_settings({**os.environ, **overrides}), clock=clock)


def real_time_clock() -> FakeClock:
    """A fake clock that starts at the real time, so stored timestamps and leases stay realistic."""
    return FakeClock(wall=time.time(), mono=time.monotonic())


def event_body(event_id: str) -> str:
    xdm = {"_id": event_id, "identityMap": {"ECID": [{"id": new_ecid(), "primary": True}]}}
    return json.dumps({"event": {"xdm": xdm}})


def sqs_event(stack: LocalStack, *event_ids: str) -> dict[str, Any]:
    now_ms = str(int(time.time() * 1000))
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": "rh",
                "body": event_body(event_id),
                "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": now_ms},
                "messageAttributes": {},
                "md5OfBody": "0" * 32,
                "eventSource": "aws:sqs",
                "eventSourceARN": stack.resources.queue_arn,
                "awsRegion": stack.region,
            }
            for event_id in event_ids
        ]
    }


def interact_calls(stack: LocalStack) -> list[dict[str, Any]]:
    return [r for r in stack.sim.requests_log() if r["path"].endswith("/interact")]


def ims_calls(stack: LocalStack) -> list[dict[str, Any]]:
    return [r for r in stack.sim.requests_log() if r["path"] == "/ims/token/v3"]


def tokens_used(stack: LocalStack) -> list[str]:
    return [r["headers"]["authorization"] for r in interact_calls(stack)]


@pytest.fixture
def webhook_secret_restored(clean_stack: LocalStack) -> Iterator[LocalStack]:
    """The session stack; the webhook secret's value is put back after the test changes it."""
    sm, secret_id = clean_stack.secretsmanager, clean_stack.resources.webhook_secret_id
    original = sm.get_secret_value(SecretId=secret_id)["SecretString"]
    yield clean_stack
    sm.put_secret_value(SecretId=secret_id, SecretString=original)


# ---------------------------------------------------------------------------------------------------------- IMS token


def test_ims_token_is_requested_once_over_50_invocations(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN one execution environment
    runtime = new_runtime()

    # WHEN it handles 50 invocations of one event each
    ids = [f"evt-{uuid.uuid4()}" for _ in range(50)]
    answers = [runtime.handle(sqs_event(stack, event_id), new_context(30)) for event_id in ids]

    # THEN every event was delivered with one token, requested once, as the form IMS expects
    assert answers == [{"batchItemFailures": []}] * 50
    assert all(stack.result(event_id)["status"] == "delivered" for event_id in ids)
    stats = stack.sim.stats()
    assert (stats["ims_requests"], stats["interact_requests"]) == (1, 50)
    assert len(set(tokens_used(stack))) == 1
    [ims] = ims_calls(stack)
    assert (ims["status"], ims["body"]) == (
        200,
        {
            "grant_type": "client_credentials",
            "client_id": stack.sim.client_id,
            "client_secret": "***",  # the simulator masks it in its log
            "scope": stack.adobe_secret["scopes"],
        },
    )


def test_ims_token_is_requested_again_only_when_its_lifetime_ends(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN one execution environment on a clock the test moves, and IMS tokens living 86399 s
    # (the relay refreshes 5 minutes before expiry: after 86099 s; a batch renews ahead a token whose refresh point
    # falls within its own time, here 30 s less the 2 s safety margin)
    clock = real_time_clock()
    runtime = new_runtime(clock)
    assert stack.sim.token_ttl == 86399

    # WHEN it handles events at t=0, t=86069 s (the refresh point 30 s away) and t=86072 s (27 s away), then once more
    def deliver() -> None:
        assert runtime.handle(sqs_event(stack, f"evt-{uuid.uuid4()}"), new_context(30)) == {"batchItemFailures": []}

    deliver()
    clock.advance(86069)
    deliver()
    ims_before_expiry = stack.sim.stats()["ims_requests"]
    clock.advance(3)
    deliver()
    deliver()

    # THEN a second token was requested only once the first one's lifetime would end within a batch, and reused
    assert ims_before_expiry == 1
    assert stack.sim.stats()["ims_requests"] == 2
    used = tokens_used(stack)
    assert used[0] == used[1] != used[2] == used[3]
    assert all(r["status"] == 200 for r in interact_calls(stack))


def test_expired_token_answer_refreshes_the_token_exactly_once(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN an execution environment holding a token
    runtime = new_runtime()
    assert runtime.handle(sqs_event(stack, f"evt-{uuid.uuid4()}"), new_context(30)) == {"batchItemFailures": []}
    assert stack.sim.stats()["ims_requests"] == 1

    # WHEN Edge expires every token it issued, and three more events arrive
    stack.sim.expire_tokens()
    ids = [f"evt-{uuid.uuid4()}" for _ in range(3)]
    answers = [runtime.handle(sqs_event(stack, event_id), new_context(30)) for event_id in ids]

    # THEN the first of them got EXEG-0503-401, the token was refreshed once and the call retried once
    assert answers == [{"batchItemFailures": []}] * 3
    assert stack.sim.stats()["ims_requests"] == 2
    first = [r for r in interact_calls(stack) if r["xdm_id"] == ids[0]]
    assert [r["status"] for r in first] == [401, 200]
    assert first[0]["headers"]["authorization"] != first[1]["headers"]["authorization"]
    # AND the later events used the new token without asking IMS again
    later = [r for r in interact_calls(stack) if r["xdm_id"] in ids[1:]]
    assert [r["status"] for r in later] == [200, 200]
    assert {r["headers"]["authorization"] for r in later} == {first[1]["headers"]["authorization"]}
    assert all(stack.result(event_id)["status"] == "delivered" for event_id in ids)


def test_a_token_edge_stops_accepting_is_replaced_once_not_kept_until_it_expires(clean_stack: LocalStack) -> None:
    stack = clean_stack
    # GIVEN a warm execution environment holding a token a few minutes old
    clock = real_time_clock()
    runtime = new_runtime(clock)
    assert runtime.handle(sqs_event(stack, f"evt-{uuid.uuid4()}"), new_context(30)) == {"batchItemFailures": []}
    clock.advance(300)

    # WHEN Edge no longer knows that token (revoked: refused with a 401 other than "expired"), and events arrive
    stack.sim.reset(full=True)
    ids = [f"evt-{uuid.uuid4()}" for _ in range(3)]
    answers = [runtime.handle(sqs_event(stack, event_id), new_context(30)) for event_id in ids]

    # THEN the first one's refusal got one new token and a retry; all three were delivered, with one IMS request
    assert answers == [{"batchItemFailures": []}] * 3
    assert stack.sim.stats()["ims_requests"] == 1
    first = [r for r in interact_calls(stack) if r["xdm_id"] == ids[0]]
    assert [r["status"] for r in first] == [401, 200]  # EXEG-0502-401: the simulator never issued that token
    assert first[0]["headers"]["authorization"] != first[1]["headers"]["authorization"]


# ---------------------------------------------------------------------------------------------------------- secrets


def test_webhook_secret_is_read_once_per_cache_period(webhook_secret_restored: LocalStack) -> None:
    stack = webhook_secret_restored
    # GIVEN an execution environment caching secrets for 5 s (real time: Powertools' cache uses the system clock)
    max_age = 5.0
    runtime = new_runtime(SECRETS_MAX_AGE_SECONDS=str(int(max_age)))
    gateway = stack.gateway(runtime.handle)
    old = stack.webhook_secret
    new = new_webhook_secret()

    def post(secret: str) -> int:
        body = event_body(f"evt-{uuid.uuid4()}")
        headers = {"content-type": "application/json", **sign_webhook(body, secret)}
        return requests.post(f"{gateway.url}/events", data=body, headers=headers, timeout=30).status_code

    # The secret is read during this post: after `before`, before `after`. The cache period counts from the read.
    before = time.monotonic()
    assert post(old) == 200  # reads the secret: {old, second}
    after = time.monotonic()

    # WHEN the secret is rotated in Secrets Manager to a new value that no longer lists the old secret
    stack.secretsmanager.put_secret_value(
        SecretId=stack.resources.webhook_secret_id, SecretString=json.dumps({"secrets": [new]})
    )

    # THEN within the cache period the cached value is still used: old accepted, new refused
    cached = (post(old), post(new))
    assert time.monotonic() - before < max_age, "the cache period ran out before the checks; the machine is too slow"
    assert cached == (200, 401)
    # AND once the period is over the secret is read again: new accepted, old refused
    time.sleep(max(0.0, max_age + 0.2 - (time.monotonic() - after)))
    assert (post(new), post(old)) == (200, 401)


def test_adobe_secret_is_not_read_again_while_cached(clean_stack: LocalStack) -> None:
    stack = clean_stack
    sm, secret_id = stack.secretsmanager, stack.resources.adobe_secret_id
    original = sm.get_secret_value(SecretId=secret_id)["SecretString"]
    try:
        # GIVEN an execution environment that read the Adobe secret and got a token
        runtime = new_runtime()
        assert runtime.handle(sqs_event(stack, f"evt-{uuid.uuid4()}"), new_context(30)) == {"batchItemFailures": []}

        # WHEN the secret is replaced by one IMS would refuse, the token expires, and another event arrives
        sm.put_secret_value(SecretId=secret_id, SecretString=json.dumps({**json.loads(original), "clientSecret": "x"}))
        stack.sim.expire_tokens()
        event_id = f"evt-{uuid.uuid4()}"
        answer = runtime.handle(sqs_event(stack, event_id), new_context(30))
    finally:
        sm.put_secret_value(SecretId=secret_id, SecretString=original)

    # THEN the token refresh used the cached credentials (default cache period 300 s): no re-read, IMS accepted them
    assert answer == {"batchItemFailures": []}
    assert [r["status"] for r in ims_calls(stack)] == [200, 200]
    assert stack.result(event_id)["status"] == "delivered"


def test_rotated_adobe_secret_is_re_read_once_when_ims_refuses_the_cached_one(clean_stack: LocalStack) -> None:
    stack = clean_stack
    sm, secret_id = stack.secretsmanager, stack.resources.adobe_secret_id
    original = sm.get_secret_value(SecretId=secret_id)["SecretString"]
    old_client_secret = stack.sim.client_secret
    try:
        # GIVEN an execution environment that cached the Adobe secret and holds a token
        runtime = new_runtime()
        assert runtime.handle(sqs_event(stack, f"evt-{uuid.uuid4()}"), new_context(30)) == {"batchItemFailures": []}

        # WHEN the credential is rotated (IMS and Secrets Manager) and the token expires
        stack.sim.client_secret = "rotated-client-secret"
        sm.put_secret_value(
            SecretId=secret_id,
            SecretString=json.dumps({**json.loads(original), "clientSecret": "rotated-client-secret"}),
        )
        stack.sim.expire_tokens()
        event_id = f"evt-{uuid.uuid4()}"
        answer = runtime.handle(sqs_event(stack, event_id), new_context(30))
    finally:
        stack.sim.client_secret = old_client_secret
        sm.put_secret_value(SecretId=secret_id, SecretString=original)

    # THEN IMS refused the cached secret once, the secret was re-read, and the event was delivered
    assert answer == {"batchItemFailures": []}
    assert [r["status"] for r in ims_calls(stack)] == [200, 401, 200]
    assert stack.result(event_id)["status"] == "delivered"


def test_secrets_manager_is_read_once_per_secret_per_cache_period_over_many_invocations(
    clean_stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN one execution environment whose Secrets Manager calls go through a proxy that counts them (over HTTP, to
    # moto), caching secrets for 12 s
    stack = clean_stack
    with FaultProxy(stack.moto.url, keep_bodies=True) as counting:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", counting.url)
        runtime = new_runtime(SECRETS_MAX_AGE_SECONDS="12")
        gateway = stack.gateway(runtime.handle)

        names = {
            stack.resources.adobe_secret_id: "adobe",
            stack.resources.webhook_secret_id: "webhook",
            stack.resources.identity_key_secret_id: "identity key",
        }

        def reads() -> Counter[str]:
            """GetSecretValue calls so far, per secret."""
            ids = (json.loads(body)["SecretId"] for body in counting.request_bodies("GetSecretValue"))
            return Counter(names.get(i, i) for i in ids)

        def post() -> int:
            body = event_body(f"evt-{uuid.uuid4()}")
            headers = {"content-type": "application/json", **sign_webhook(body, stack.webhook_secret)}
            return requests.post(f"{gateway.url}/events", data=body, headers=headers, timeout=30).status_code

        # WHEN 10 SQS batches and 10 webhooks are handled within the cache period
        started = time.monotonic()
        for n in range(10):
            assert runtime.handle(sqs_event(stack, f"evt-{uuid.uuid4()}"), new_context(30)) == {"batchItemFailures": []}
            assert post() == 200
            if n == 0:
                all_read = time.monotonic()  # every secret has been read (and its period started) by now
        took = time.monotonic() - started
        assert took < 12.0, f"the cache period ran out before the checks ({took:.1f} s); the machine is too slow"

        # THEN each of the three secrets (Adobe credentials, webhook secret, identity key) was read once
        first = reads()
        assert first == {"adobe": 1, "webhook": 1, "identity key": 1}
        # AND once the period is over, the webhook secret is read again once, and the Adobe secret once when a token
        # is next needed (here Edge refuses the token as expired); the identity key never changes: it is read once per
        # execution environment
        time.sleep(max(0.0, 12.2 - (time.monotonic() - all_read)))
        stack.sim.expire_tokens()
        for _ in range(5):
            assert runtime.handle(sqs_event(stack, f"evt-{uuid.uuid4()}"), new_context(30)) == {"batchItemFailures": []}
            assert post() == 200
        assert reads() - first == Counter({"adobe": 1, "webhook": 1})
