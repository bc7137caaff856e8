"""relay.integrations.ims.ImsTokenProvider: caching, forced refresh of a stale token, secret re-read on refusal."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import requests
from relay.clock import Deadline
from relay.errors import CredentialsError
from relay.integrations.credentials import AdobeCredentials
from relay.integrations.ims import (
    FAILURE_HOLD_S,
    MAX_IMS_ANSWER_BYTES,
    AccessToken,
    ImsTokenProvider,
    NoTimeLeft,
)

from tests.fakes import (
    CREDS,
    WALL_START,
    FakeClock,
    FakeCredentialsStore,
    FakeSession,
    Scripted,
    broken_body_response,
    make_response,
)

TOKEN_URL = "https://ims-na1.adobelogin.com/ims/token/v3"
ROTATED = AdobeCredentials(client_id="client-2", client_secret="new-s3cret", org_id="ORG1@AdobeOrg", scopes="openid")


def token_response(value: str, expires_in: float = 86399) -> requests.Response:
    return make_response(200, {"access_token": value, "token_type": "bearer", "expires_in": expires_in})


def provider(session: FakeSession, clock: FakeClock, creds: FakeCredentialsStore | None = None) -> ImsTokenProvider:
    return ImsTokenProvider(session, TOKEN_URL, creds or FakeCredentialsStore(), clock)  # type: ignore[arg-type]


def test_ims_get_posts_the_client_credentials_form():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([token_response("tok-A")])

    # WHEN
    token = provider(session, clock).get()

    # THEN
    assert token == AccessToken("tok-A", WALL_START + 86399 - 300, "client-1", "ORG1@AdobeOrg")
    call = session.calls[0]
    assert call.url == TOKEN_URL
    assert call.data == {
        "grant_type": "client_credentials",
        "client_id": CREDS.client_id,
        "client_secret": CREDS.client_secret,
        "scope": CREDS.scopes,
    }
    assert call.timeout == (3.05, 10.0)


def test_ims_token_is_cached_until_expiry_minus_margin():
    # GIVEN a 24 h token: refreshed 300 s before IMS says it expires
    clock = FakeClock()
    session = FakeSession([token_response("tok-A"), token_response("tok-B")])
    tokens = provider(session, clock)

    # WHEN many calls happen before the refresh point
    first = [tokens.get() for _ in range(20)]
    clock.advance(86399 - 300 - 1)
    still = tokens.get()

    # THEN one POST
    assert {t.value for t in first} == {"tok-A"}
    assert still.value == "tok-A"
    assert len(session.calls) == 1

    # WHEN the refresh point is reached
    clock.advance(1)
    fresh = tokens.get()

    # THEN a new POST
    assert fresh == AccessToken("tok-B", WALL_START + 2 * (86399 - 300), "client-1", "ORG1@AdobeOrg")
    assert len(session.calls) == 2


def test_ims_short_token_margin_is_ten_percent():
    # GIVEN a 100 s token
    clock = FakeClock()
    session = FakeSession([token_response("tok-A", 100)])

    # WHEN
    token = provider(session, clock).get()

    # THEN
    assert token.expires_at == WALL_START + 90


def test_ims_force_refresh_with_the_same_stale_token_refreshes_once():
    # GIVEN two callers that both got tok-A and both saw Edge say it expired
    clock = FakeClock()
    session = FakeSession([token_response("tok-A"), token_response("tok-B"), token_response("tok-C")])
    tokens = provider(session, clock)
    stale = tokens.get()

    # WHEN
    first = tokens.get(force_refresh=True, stale=stale)
    second = tokens.get(force_refresh=True, stale=stale)

    # THEN
    assert (first.value, second.value) == ("tok-B", "tok-B")
    assert len(session.calls) == 2


class SlowSession(FakeSession):
    """IMS answers after 0.2 s (real time): long enough that a second caller arrives while the first one waits."""

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        time.sleep(0.2)
        return super().post(url, **kwargs)


def test_ims_force_refresh_from_two_threads_refreshes_once():
    # GIVEN a slow IMS, so that the two threads' refreshes really overlap
    clock = FakeClock()
    session = SlowSession([token_response("tok-A"), token_response("tok-B"), token_response("tok-C")])
    tokens = provider(session, clock)
    stale = tokens.get()
    barrier = threading.Barrier(2)
    results: list[str] = []

    def worker() -> None:
        barrier.wait()
        results.append(tokens.get(force_refresh=True, stale=stale).value)

    # WHEN
    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)

    # THEN
    assert results == ["tok-B", "tok-B"]
    assert len(session.calls) == 2


def test_a_token_edge_refused_is_not_handed_out_while_its_replacement_is_fetched():
    # GIVEN a token Edge refused, and IMS holding its replacement's request until the test lets it answer
    clock = FakeClock()
    answer = threading.Event()

    class HeldSession(FakeSession):
        def post(self, url: str, **kwargs: Any) -> requests.Response:
            if len(self.calls) == 1:  # the second token request: the replacement
                answer.wait(timeout=5)
            return super().post(url, **kwargs)

    session = HeldSession([token_response("tok-A"), token_response("tok-B")])
    tokens = provider(session, clock)
    stale = tokens.get()
    refreshing = threading.Thread(target=lambda: tokens.get(force_refresh=True, stale=stale))
    refreshing.start()
    waited = time.monotonic() + 5
    while tokens._replacing is not stale and time.monotonic() < waited:  # the refresh holds the lock, waiting for IMS
        time.sleep(0.001)
    assert tokens._replacing is stale

    # WHEN another worker asks for a token meanwhile (IMS answers the refresh once it is waiting)
    threading.Timer(0.1, answer.set).start()
    got = tokens.get().value
    refreshing.join(timeout=5)

    # THEN it waits for the new one: the refused one would only be refused again, an Edge call wasted per event
    assert got == "tok-B" and len(session.calls) == 2


def test_ims_force_refresh_without_stale_always_refreshes():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([token_response("tok-A"), token_response("tok-B")])
    tokens = provider(session, clock)
    tokens.get()

    # WHEN
    token = tokens.get(force_refresh=True)

    # THEN
    assert token.value == "tok-B"
    assert len(session.calls) == 2


def test_ims_refused_credentials_reread_the_secret_once():
    # GIVEN IMS refuses the old secret and accepts the rotated one
    clock = FakeClock()
    creds = FakeCredentialsStore(CREDS, ROTATED)
    session = FakeSession([make_response(401, {"error": "invalid_client"}), token_response("tok-A")])

    # WHEN
    token = provider(session, clock, creds).get()

    # THEN the token carries the rotated credential's client id (Edge's x-api-key)
    assert token == AccessToken("tok-A", WALL_START + 86399 - 300, "client-2", "ORG1@AdobeOrg")
    assert creds.calls == [False, True]
    assert [c.data["client_id"] for c in session.calls] == ["client-1", "client-2"]


@pytest.mark.parametrize("status", [400, 401, 403])
def test_ims_still_refused_after_reread_is_a_credentials_error(status):
    # GIVEN
    clock = FakeClock()
    creds = FakeCredentialsStore(CREDS, ROTATED)
    session = FakeSession([make_response(status, {}), make_response(status, {})])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        provider(session, clock, creds).get()

    # THEN
    assert str(info.value) == f"IMS refused the token request (HTTP {status})"
    assert creds.calls == [False, True]
    assert len(session.calls) == 2


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"error": "invalid_client", "error_description": "invalid client_id parameter"}, " invalid_client"),
        ({"error": "invalid_scope"}, " invalid_scope"),
        ({"error": "Bearer s3cret-in-an-odd-answer"}, ""),  # not an OAuth error code: not repeated
        (["not", "an", "object"], ""),
    ],
)
def test_an_ims_refusal_names_its_oauth_error_code_and_nothing_else(body: object, said: str) -> None:
    # GIVEN IMS refusing the credentials (before and after the secret is re-read) with an OAuth error answer
    clock = FakeClock()
    creds = FakeCredentialsStore(CREDS, ROTATED)
    session = FakeSession([make_response(400, body), make_response(400, body)])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        provider(session, clock, creds).get()

    # THEN the reason logged and stored says which refusal it was (a wrong client id is not a wrong scope), and
    # never IMS's free-text description
    assert str(info.value) == f"IMS refused the token request (HTTP 400{said})"


def test_ims_server_error_is_not_a_reason_to_reread_the_secret():
    # GIVEN
    clock = FakeClock()
    creds = FakeCredentialsStore()
    session = FakeSession([make_response(503, {})])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        provider(session, clock, creds).get()

    # THEN
    assert str(info.value) == "IMS refused the token request (HTTP 503)"
    assert creds.calls == [False]


def test_ims_unreachable_is_a_credentials_error_after_one_immediate_second_try():
    # GIVEN IMS cannot be reached at all
    clock = FakeClock()
    session = FakeSession([requests.ConnectionError("refused"), requests.ConnectionError("refused")])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        provider(session, clock).get()

    # THEN it was tried twice, at once (no wait), and that is the error
    assert str(info.value) == "IMS unreachable (ConnectionError)"
    assert len(session.calls) == 2 and clock.sleeps == []


def test_an_ims_200_whose_body_breaks_off_is_unreachable_not_a_token_or_a_refusal():
    # GIVEN IMS answers 200 and its body breaks off (unlike Edge's 2xx, nothing was taken that a retry would repeat)
    from urllib3.exceptions import ProtocolError

    clock = FakeClock()
    session = FakeSession([broken_body_response(200, ProtocolError("cut"))])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        provider(session, clock).get()

    # THEN the failure is the connection's (not "more than N bytes", not a refusal, not a token)
    assert str(info.value) == "IMS unreachable (ChunkedEncodingError)"


def test_a_kept_alive_ims_connection_dropped_while_idle_costs_nothing():
    # GIVEN the pooled connection the far end dropped while the environment was idle (the next request is reset)
    clock = FakeClock()
    session = FakeSession([requests.ConnectionError("Connection reset by peer"), token_response("tok-A")])

    # WHEN a token is needed
    token = provider(session, clock).get()

    # THEN the second try, on a new connection, gets it: no failure held against the next callers
    assert token.value == "tok-A" and len(session.calls) == 2


def test_an_ims_lifetime_beyond_a_day_is_not_believed():
    # GIVEN IMS answers a lifetime in milliseconds (as the deprecated JWT flow did)
    clock = FakeClock()
    session = FakeSession([token_response("tok-A", expires_in=86399000)])

    # WHEN
    token = provider(session, clock).get()

    # THEN the token is kept at most a day (less the refresh margin), not 1,000 days
    assert token.expires_at == clock.now() + 86400 - 300


@pytest.mark.parametrize(
    "answer",
    [
        make_response(200, {"token_type": "bearer"}),
        make_response(200, text="<html>"),
        make_response(200, [1]),
        # a lifetime that would cache the token for ever, or never
        make_response(200, text='{"access_token": "t", "expires_in": 1e400}'),
        make_response(200, text='{"access_token": "t", "expires_in": NaN}'),
        make_response(200, {"access_token": "t", "expires_in": 0}),
        make_response(200, {"access_token": "t", "expires_in": -5}),
        # a token that is not a non-empty string (a null would otherwise be cached as the text "None" for a day)
        make_response(200, {"access_token": None, "token_type": "bearer", "expires_in": 86399}),
        make_response(200, {"access_token": 12345, "token_type": "bearer", "expires_in": 86399}),
        make_response(200, {"access_token": "", "token_type": "bearer", "expires_in": 86399}),
    ],
)
def test_ims_answer_without_a_usable_token_is_a_credentials_error(answer):
    # GIVEN
    clock = FakeClock()
    session = FakeSession([answer])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        provider(session, clock).get()

    # THEN
    assert str(info.value) == "IMS answered without access_token/expires_in"


def test_ims_access_token_repr_hides_the_value():
    # WHEN / THEN
    assert "tok-secret" not in repr(AccessToken("tok-secret", 1.0))


@pytest.mark.parametrize("failure", [make_response(401, {}), make_response(429, {}), requests.ConnectionError("down")])
def test_a_failed_token_fetch_is_held_briefly_so_waiting_workers_do_not_each_ask_ims(failure):
    # GIVEN IMS refuses (or cannot be reached), then would answer
    clock = FakeClock()
    creds = FakeCredentialsStore(CREDS, CREDS)
    session = FakeSession([failure, failure, token_response("tok-A")])
    tokens = provider(session, clock, creds)
    with pytest.raises(CredentialsError) as first:
        tokens.get()
    sent, reads = len(session.calls), len(creds.calls)

    # WHEN the batch's other workers ask within FAILURE_HOLD_S
    for _ in range(31):
        with pytest.raises(CredentialsError) as again:
            tokens.get()
        assert str(again.value) == str(first.value)

    # THEN they got the same error without a request to IMS or a secret read of their own
    assert (len(session.calls), len(creds.calls)) == (sent, reads)
    # AND once the hold is over, the next caller asks IMS again
    clock.advance(FAILURE_HOLD_S + 0.01)
    session.script = [Scripted(token_response("tok-A"))]
    assert tokens.get().value == "tok-A"


def test_a_caller_without_time_left_does_not_hold_back_the_others():
    # GIVEN a caller whose deadline has run out
    clock = FakeClock()
    session = FakeSession([token_response("tok-A")])
    tokens = provider(session, clock)
    with pytest.raises(CredentialsError):
        tokens.get(deadline=Deadline(clock, 0))

    # WHEN / THEN the next caller, with time, gets a token at once
    assert tokens.get(deadline=Deadline(clock, 10)).value == "tok-A"


def test_a_timeout_the_callers_short_deadline_caused_does_not_hold_back_the_next_caller():
    # GIVEN a caller with little time left (a webhook's budget) whose token request times out within it
    clock = FakeClock()
    session = FakeSession([requests.ReadTimeout("slow"), token_response("tok-A")])
    tokens = provider(session, clock)
    with pytest.raises(CredentialsError):
        tokens.get(deadline=Deadline(clock, 2))
    assert session.calls[0].timeout != tokens._timeout  # the deadline had shortened its wait

    # WHEN / THEN the next caller (a batch with time) asks IMS at once, and gets a token
    assert tokens.get(deadline=Deadline(clock, 28)).value == "tok-A"
    assert len(session.calls) == 2


def test_ims_never_follows_a_redirect():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([make_response(307, text="", headers={"Location": "http://elsewhere.example/steal"})])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        provider(session, clock).get()

    # THEN (the loopback test in tests/integration shows the secret reaches no other host)
    assert str(info.value) == "IMS refused the token request (HTTP 307)"
    assert [call.allow_redirects for call in session.calls] == [False]


@pytest.mark.usefixtures("aws")
def test_a_secret_that_cannot_be_read_is_named_with_the_aws_error_code(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a Secrets Manager (in-process moto) without the configured Adobe secret
    import boto3
    from relay.integrations.credentials import CredentialsStore

    monkeypatch.delenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", raising=False)
    store = CredentialsStore(
        boto3.client("secretsmanager"), adobe_secret_id="relay/adobe", webhook_secret_id=None, max_age=300
    )

    # WHEN the relay reads it
    with pytest.raises(CredentialsError) as info:
        store.adobe()

    # THEN the reason says which secret, and why in AWS's words (not found, access denied, KMS, ...)
    assert str(info.value) == "Adobe secret (ADOBE_SECRET_ID) could not be read (ResourceNotFoundException)"


@pytest.mark.usefixtures("aws")
def test_the_identity_key_is_read_once_and_a_short_one_is_refused() -> None:
    import json

    import boto3
    from relay.integrations.credentials import CredentialsStore

    sm = boto3.client("secretsmanager")
    good = sm.create_secret(Name="key", SecretString=json.dumps({"key": "a" * 64}))["ARN"]
    short = sm.create_secret(Name="short", SecretString=json.dumps({"key": "a" * 31}))["ARN"]

    def store(arn: str) -> CredentialsStore:
        return CredentialsStore(sm, adobe_secret_id=None, webhook_secret_id=None, max_age=0, identity_key_secret_id=arn)

    # GIVEN the template's shape of secret
    creds = store(good)
    assert creds.identity_key() == b"a" * 64
    # WHEN it changes (or Secrets Manager fails) later, THEN the environment keeps the key it started with (a new key
    # would orphan every state it keeps), even with no caching at all configured for the other secrets
    sm.put_secret_value(SecretId=good, SecretString=json.dumps({"key": "b" * 64}))
    sm.delete_secret(SecretId=good, ForceDeleteWithoutRecovery=True)
    assert creds.identity_key() == b"a" * 64
    # AND a key too short to be one is a configuration error naming the variable, never used
    with pytest.raises(CredentialsError, match="IDENTITY_KEY_SECRET_ID"):
        store(short).identity_key()


def test_a_refused_token_is_replaced_only_once_it_is_old_enough():
    # GIVEN a token minted now
    clock = FakeClock()
    session = FakeSession([token_response("tok-A"), token_response("tok-B")])
    tokens = provider(session, clock)
    first = tokens.get()

    # WHEN Edge refuses it at once, and again a minute later
    young = tokens.get(force_refresh=True, stale=first, min_age_s=60)
    clock.advance(61)
    old = tokens.get(force_refresh=True, stale=first, min_age_s=60)

    # THEN a token refused as soon as it was minted is kept (a new one would be refused too: no IMS call per event);
    # one a minute old is replaced, once
    assert (young.value, old.value) == ("tok-A", "tok-B")
    assert len(session.calls) == 2


def test_a_refused_token_costs_at_most_one_refresh_a_minute_even_when_refreshing_fails():
    # GIVEN a token an hour old that Edge refuses, and IMS refusing the credentials too (a revoked credential)
    clock = FakeClock()
    session = FakeSession([token_response("tok-A"), *[make_response(401, {"error": "invalid_client"})] * 40])
    creds = FakeCredentialsStore(CREDS, CREDS)
    tokens = provider(session, clock, creds)
    first = tokens.get()
    clock.advance(3600)

    # WHEN events keep arriving for a minute, each asking for a new token after Edge's refusal
    for _ in range(60):
        try:
            tokens.get(force_refresh=True, stale=first, min_age_s=60)
        except CredentialsError:
            pass
        clock.advance(1)

    # THEN IMS was asked once (its refusal makes two POSTs: the secret is re-read once), not every 5 s
    assert len(session.calls) == 1 + 2


def test_an_ims_connection_that_fails_after_a_long_wait_is_not_tried_again():
    # GIVEN IMS drops the connection only after a long wait (its failure, not a dead pooled connection)
    clock = FakeClock()

    class SlowDrop(FakeSession):
        def post(self, *args: Any, **kwargs: Any) -> Any:
            clock.advance(2)
            return super().post(*args, **kwargs)

    session = SlowDrop([requests.ConnectionError("reset"), token_response("tok-A")])

    # WHEN / THEN one attempt only, within the caller's deadline
    with pytest.raises(CredentialsError):
        provider(session, clock).get(deadline=Deadline(clock, 3))
    assert len(session.calls) == 1


def test_has_live_token_says_whether_get_would_answer_from_its_cache() -> None:
    # GIVEN a provider with no token yet
    clock = FakeClock()
    tokens = provider(FakeSession([token_response("tok-A", expires_in=1000)]), clock)
    assert not tokens.has_live_token()

    # WHEN it has fetched one, and later when that one has expired
    token = tokens.get()
    live = tokens.has_live_token()
    clock.advance(token.expires_at - clock.now())

    # THEN it is live until its refresh point (`expires_at`, a margin before IMS's expiry), and not from then on
    assert live
    assert not tokens.has_live_token()


def test_a_token_that_would_lapse_within_the_time_asked_for_is_renewed_now() -> None:
    # GIVEN a cached token 20 s before its refresh point
    clock = FakeClock()
    session = FakeSession([token_response("tok-A", expires_in=1000), token_response("tok-B", expires_in=1000)])
    tokens = provider(session, clock)
    first = tokens.get()
    clock.advance(first.expires_at - clock.now() - 20)

    # WHEN a batch with 30 s left asks for one live that long (its warm-up), and a call asks for one live now
    short = tokens.get(live_for_s=10)
    renewed = tokens.get(live_for_s=30)

    # THEN a token live for 10 s more is kept, one that lapses within 30 s is renewed at once, rather than by an Edge
    # call near the batch's end, whose secret read and token request might not fit in the time left
    assert (short.value, renewed.value) == ("tok-A", "tok-B")
    assert tokens.has_live_token(for_s=30) and len(session.calls) == 2


def test_a_live_token_is_handed_out_while_a_renewal_ahead_holds_the_lock() -> None:
    # GIVEN a live token, and a renewal ahead of a batch in progress (it holds the lock through its secret read)
    clock = FakeClock()
    tokens = provider(FakeSession([token_response("tok-A")]), clock)
    tokens.get()
    tokens._lock.acquire()
    try:
        # WHEN an Edge call asks for a token
        got: list[str] = []
        worker = threading.Thread(target=lambda: got.append(tokens.get().value))
        worker.start()
        worker.join(timeout=2)

        # THEN it gets the live one at once, not after the renewal
        assert got == ["tok-A"]
    finally:
        tokens._lock.release()


def test_tokens_too_short_lived_to_outlast_a_batch_are_not_renewed_for_every_batch() -> None:
    # GIVEN tokens that live 40 s (36 s to their refresh point: shorter than twice a batch's 28 s)
    clock = FakeClock()
    session = FakeSession([token_response(f"tok-{n}", expires_in=40) for n in range(4)])
    tokens = provider(session, clock)
    tokens.get()

    # WHEN three batches, 10 s apart, each ask for one live for their 28 s
    for _ in range(3):
        clock.advance(10)
        tokens.get(live_for_s=28)

    # THEN the first token serves them while it is live: no IMS request per batch
    assert len(session.calls) == 1 and tokens.has_live_token(for_s=28)


def failed_once(clock: FakeClock) -> tuple[ImsTokenProvider, FakeSession]:
    """A provider whose token fetch has just failed (IMS unreachable: held back for FAILURE_HOLD_S)."""
    session = FakeSession([requests.ConnectionError("down"), requests.ConnectionError("down")])
    tokens = provider(session, clock)
    with pytest.raises(CredentialsError):
        tokens.get()
    return tokens, session


def test_a_failure_held_before_the_environment_was_frozen_is_not_held_after_it() -> None:
    # GIVEN a token fetch that failed at the end of an invocation (held back for FAILURE_HOLD_S)
    clock = FakeClock()
    tokens, session = failed_once(clock)

    # WHEN the environment is frozen for a minute: the wall clock moves on, the monotonic clock may not
    clock._wall += 60
    session.script = [Scripted(token_response("tok-A"))]

    # THEN the next invocation's first caller asks IMS again, instead of getting the old failure for its first seconds
    assert tokens.get().value == "tok-A"


def test_a_failure_is_not_held_longer_when_the_wall_clock_steps_back() -> None:
    # GIVEN a failed fetch, held back
    clock = FakeClock()
    tokens, session = failed_once(clock)

    # WHEN the wall clock steps back an hour (a time sync) and the hold's time passes
    clock._wall -= 3600
    clock.advance(FAILURE_HOLD_S + 0.01)
    session.script = [Scripted(token_response("tok-A"))]

    # THEN IMS is asked again
    assert tokens.get().value == "tok-A"


@pytest.mark.parametrize("value", ["abc\r\nX-Injected: 1", "t\u0100ken", "two words", "x" * 16385])
def test_a_token_no_http_header_can_carry_is_refused_not_cached_for_a_day(value: str) -> None:
    # GIVEN IMS answers a token that is not a header value (it would fail every Edge call before Edge could refuse it
    # with the 401 that renews it, for the token's whole day), then a good one
    clock = FakeClock()
    session = FakeSession([token_response(value), token_response("tok-A")])
    tokens = provider(session, clock)

    # WHEN / THEN the first is a credentials error, and the next fetch (once the hold is over) is used
    with pytest.raises(CredentialsError, match="without access_token"):
        tokens.get()
    clock.advance(FAILURE_HOLD_S + 0.01)
    assert tokens.get().value == "tok-A"


def test_an_expiry_too_large_for_a_float_is_a_credentials_error_not_a_crash() -> None:
    tokens = provider(FakeSession([make_response(200, {"access_token": "t", "expires_in": 10**400})]), FakeClock())

    with pytest.raises(CredentialsError, match="without access_token/expires_in"):
        tokens.get()


def test_no_secret_is_read_for_a_token_once_the_time_is_up() -> None:
    # GIVEN a provider with no token, and a caller whose time is up
    clock = FakeClock()
    creds = FakeCredentialsStore()
    tokens = provider(FakeSession([token_response("tok-A")]), clock, creds)

    # WHEN it asks for a token
    with pytest.raises(CredentialsError, match="no time left"):
        tokens.get(deadline=Deadline(clock, 0.01))

    # THEN not even the Adobe secret was read (a read may take seconds the invocation does not have)
    assert creds.calls == []


def test_an_ims_answer_larger_than_any_token_answer_is_not_read_whole_nor_believed() -> None:
    # GIVEN IMS (or whatever answers at its address) sends a token answer with 1 MB of padding
    clock = FakeClock()
    padded = {"access_token": "tok-A", "token_type": "bearer", "expires_in": 86399, "pad": "x" * 1_000_000}
    answer = make_response(200, padded)
    session = FakeSession([answer])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        provider(session, clock).get()

    # THEN no token is taken from it, and no more than the limit was read (the connection is closed, not reused)
    assert str(info.value) == f"IMS answered more than {MAX_IMS_ANSWER_BYTES} bytes"
    assert len(answer.content) == MAX_IMS_ANSWER_BYTES
    assert answer.raw.closed


def test_waiting_for_another_callers_token_request_ends_with_the_callers_deadline() -> None:
    # GIVEN one worker fetching the token from an IMS that holds its answer (each read within its timeout)
    clock = FakeClock()
    answer = threading.Event()

    class HeldSession(FakeSession):
        def post(self, url: str, **kwargs: Any) -> requests.Response:
            answer.wait(timeout=30)
            return super().post(url, **kwargs)

    session = HeldSession([token_response("tok-A")])
    tokens = provider(session, clock)
    fetching = threading.Thread(target=tokens.get)
    fetching.start()
    waited = time.monotonic() + 30
    while not tokens._lock.locked() and time.monotonic() < waited:
        time.sleep(0.001)
    assert tokens._lock.locked(), "the first worker never took the token lock"

    # WHEN another worker, with 0.2 s left, asks for a token meanwhile
    try:
        with pytest.raises(NoTimeLeft):
            tokens.get(deadline=Deadline(clock, 0.2))
    finally:
        answer.set()
        fetching.join(timeout=5)

    # THEN it gave up when its own time was up (not held for the next caller: that is about this caller, not IMS),
    # and the first worker's token is there for the next one
    assert tokens.get().value == "tok-A" and len(session.calls) == 1


def test_a_refresh_that_ends_between_the_lock_free_reads_never_hands_out_the_refused_token() -> None:
    # GIVEN a token Edge refused while its replacement is being fetched, and a caller reading without the lock at the
    # moment the refresh ends (here: as soon as it has read the token, the refresh puts the new one in place)
    clock = FakeClock()
    session = FakeSession([token_response("tok-A")])
    tokens = provider(session, clock)
    stale = tokens.get()
    fresh = AccessToken("tok-B", stale.expires_at + 60, stale.client_id, stale.org_id)

    class EndsMidRead(ImsTokenProvider):
        armed = False

        def __getattribute__(self, name: str) -> Any:
            value = object.__getattribute__(self, name)
            if name == "_token" and object.__getattribute__(self, "armed"):
                self.armed = False
                self.__dict__["_token"], self.__dict__["_replacing"] = fresh, None  # the refresh ends
            return value

    tokens.__class__ = EndsMidRead
    tokens._replacing = stale  # the refresh under way
    tokens.armed = True  # type: ignore[attr-defined]

    # WHEN the caller asks for a token
    got = tokens.get()

    # THEN it gets the replacement, never the token Edge refused (which would cost an Edge call answered 401)
    assert got.value == "tok-B"


# -- credentials.py: the secret cache period (M08) -------------------------------------------------------------------


@pytest.mark.usefixtures("aws")
def test_the_adobe_secret_is_kept_for_its_cache_period_and_a_forced_read_takes_the_rotated_one() -> None:
    import boto3
    from relay.integrations.credentials import CredentialsStore

    sm = boto3.client("secretsmanager")
    doc = {"clientId": "client-1", "clientSecret": "s3cret", "orgId": "ORG@AdobeOrg"}
    arn = sm.create_secret(Name="adobe", SecretString=json.dumps(doc))["ARN"]
    store = CredentialsStore(sm, adobe_secret_id=arn, webhook_secret_id=None, max_age=300)
    calls: list[str] = []
    sm.meta.events.register("before-call.secrets-manager.GetSecretValue", lambda **kw: calls.append("get"))

    # GIVEN the secret read once
    assert store.adobe().client_id == "client-1"
    # WHEN it is rotated within the cache period
    sm.put_secret_value(SecretId=arn, SecretString=json.dumps({**doc, "clientId": "client-2"}))

    # THEN every worker of every batch in the period is answered from the cache: one GetSecretValue, not one per token
    # request (Secrets Manager bills and throttles per call; 32 workers must not make 32 reads)
    assert [store.adobe().client_id for _ in range(5)] == ["client-1"] * 5
    assert calls == ["get"]
    # AND a read forced by IMS's refusal takes the rotated secret at once
    assert store.adobe(force=True).client_id == "client-2"


# -- credentials.py: a secret that is JSON but not an object (M10) ---------------------------------------------------


@pytest.mark.usefixtures("aws")
@pytest.mark.parametrize("value", ["[1, 2]", '"whsec_x"', "42", "null"])
def test_a_secret_that_is_json_but_not_an_object_is_a_configuration_error_naming_the_variable(value: str) -> None:
    import boto3
    from relay.integrations.credentials import CredentialsStore

    sm = boto3.client("secretsmanager")
    arn = sm.create_secret(Name="odd", SecretString=value)["ARN"]
    store = CredentialsStore(sm, adobe_secret_id=arn, webhook_secret_id=arn, max_age=0, identity_key_secret_id=arn)

    # WHEN each reader reads it, THEN a CredentialsError (503 and CredentialsUnavailable / WebhookAuthUnavailable
    # alarms), not an AttributeError (a 503 or redelivery counted as a defect, naming no secret)
    for read, variable in (
        (store.adobe, "ADOBE_SECRET_ID"),
        (store.webhook_secrets, "WEBHOOK_SECRET_ID"),
        (store.identity_key, "IDENTITY_KEY_SECRET_ID"),
    ):
        with pytest.raises(CredentialsError, match=f"{variable}.*not a JSON object"):
            read()


def test_a_refused_token_hours_old_by_the_wall_clock_is_replaced_while_the_monotonic_clock_stood_still() -> None:
    # GIVEN a token fetched, then hours of idle invocations: the wall clock moves, the monotonic clock (which may not
    # move while Lambda freezes the environment: undocumented) barely does
    clock = FakeClock()
    session = FakeSession([token_response("tok-A"), token_response("tok-B")])
    tokens = provider(session, clock)
    first = tokens.get()
    clock._wall += 5 * 3600
    clock._mono += 2

    # WHEN Edge refuses it (a 401: revoked, or minted before its product profile was fixed)
    renewed = tokens.get(force_refresh=True, stale=first, min_age_s=60)

    # THEN it is replaced: it is not "as young as a minute", which would hand it out again to every event until 60 s
    # of running time add up (each redelivery refused: a record in the dead-letter queue after 5 receives)
    assert renewed.value == "tok-B" and len(session.calls) == 2
    # AND one refused as soon as it was minted, by both clocks, is still not asked for again
    assert tokens.get(force_refresh=True, stale=renewed, min_age_s=60).value == "tok-B" and len(session.calls) == 2


def test_a_second_refusal_after_hours_idle_is_replaced_although_the_monotonic_clock_stood_still() -> None:
    # GIVEN a token that Edge refused once and that was replaced (a refusal refresh on record)
    clock = FakeClock()
    session = FakeSession([token_response("tok-A"), token_response("tok-B"), token_response("tok-C")])
    tokens = provider(session, clock)
    first = tokens.get()
    clock.advance(3600)
    second = tokens.get(force_refresh=True, stale=first, min_age_s=60)
    assert second.value == "tok-B"

    # WHEN hours of idle invocations pass (the monotonic clock barely moving) and Edge refuses the replacement
    clock._wall += 5 * 3600
    clock._mono += 2

    # THEN it is replaced too: the last refresh is not "a minute ago" by the wall clock
    assert tokens.get(force_refresh=True, stale=second, min_age_s=60).value == "tok-C"


def test_a_token_answer_that_stalls_after_late_headers_is_given_up_at_the_deadline() -> None:
    # GIVEN IMS on a loopback socket that sends its headers 1.5 s into a 2 s budget, then nothing more of its body
    from relay.clock import SystemClock
    from relay.runtime import new_http_session

    from tests.fakes import headers_then_stall

    clock = SystemClock()
    with headers_then_stall(1.5) as port:
        tokens = ImsTokenProvider(
            new_http_session(2),
            f"http://127.0.0.1:{port}/ims/token/v3",
            FakeCredentialsStore(),  # type: ignore[arg-type]
            clock,
            timeout=(0.1, 10.0),
        )

        # WHEN a token is asked for within that budget
        started = time.monotonic()
        with pytest.raises(CredentialsError):
            tokens.get(deadline=Deadline(clock, 2.0))
        elapsed = time.monotonic() - started

    # THEN the wait ends with the budget (about 2 s), not a whole read timeout after the headers
    assert elapsed < 2.7, elapsed


# -- credentials.py: an Adobe secret pasted with whitespace, and a malformed secret fixed (misconfiguration review) ---


@pytest.mark.usefixtures("aws")
@pytest.mark.parametrize("pad", [" ", "\n", "\r\n", "\t "])
def test_an_adobe_secret_pasted_with_whitespace_around_its_values_is_used_without_it(pad: str) -> None:
    import boto3
    from relay.integrations.credentials import CredentialsStore

    # GIVEN a secret whose values were pasted with a line's end or a space around them (IMS still mints a token for
    # them, but an orgId with a newline is no header value: every Edge call failed before it was sent)
    sm = boto3.client("secretsmanager")
    doc = {"clientId": f"{pad}client-1{pad}", "clientSecret": f"s3cret{pad}", "orgId": f"{pad}ORG@AdobeOrg{pad}"}
    arn = sm.create_secret(Name="adobe", SecretString=json.dumps(doc))["ARN"]

    # WHEN it is read, THEN the values are used without it
    creds = CredentialsStore(sm, adobe_secret_id=arn, webhook_secret_id=None, max_age=300).adobe()
    assert (creds.client_id, creds.client_secret, creds.org_id) == ("client-1", "s3cret", "ORG@AdobeOrg")


@pytest.mark.usefixtures("aws")
@pytest.mark.parametrize(
    ("field", "value"), [("orgId", "ORG @AdobeOrg"), ("orgId", "ORG\x00@AdobeOrg"), ("clientId", "clíent-1")]
)
def test_an_adobe_id_no_header_can_carry_is_a_configuration_error_naming_it_not_an_edge_outage(
    field: str, value: str
) -> None:
    import boto3
    from relay.integrations.credentials import CredentialsStore

    sm = boto3.client("secretsmanager")
    doc = {"clientId": "client-1", "clientSecret": "s3cret", "orgId": "ORG@AdobeOrg", field: value}
    arn = sm.create_secret(Name="adobe", SecretString=json.dumps(doc))["ARN"]

    # WHEN it is read, THEN a CredentialsError (CredentialsUnavailable, the event retried or queued) names the field
    # and not its value; before, the token was minted and every Edge call raised InvalidHeader, counted as Edge down
    with pytest.raises(CredentialsError, match=f"{field} must be visible ASCII") as refused:
        CredentialsStore(sm, adobe_secret_id=arn, webhook_secret_id=None, max_age=300).adobe()
    assert value not in str(refused.value)


@pytest.mark.usefixtures("aws")
@pytest.mark.parametrize("secret", ["", "  \n", None, 7, "absent"])
def test_an_adobe_secret_without_a_client_secret_is_a_configuration_error_naming_it(secret: Any) -> None:
    import boto3
    from relay.integrations.credentials import CredentialsStore

    sm = boto3.client("secretsmanager")
    doc = {"clientId": "client-1", "orgId": "ORG@AdobeOrg", "clientSecret": secret}
    if secret == "absent":
        del doc["clientSecret"]
    arn = sm.create_secret(Name="adobe", SecretString=json.dumps(doc))["ARN"]

    # WHEN it is read, THEN it is refused before IMS is asked (a blank secret only whitespace is no secret)
    with pytest.raises(CredentialsError, match="^Adobe secret lacks clientSecret$"):
        CredentialsStore(sm, adobe_secret_id=arn, webhook_secret_id=None, max_age=300).adobe()


@pytest.mark.usefixtures("aws")
def test_a_secret_that_stays_malformed_is_read_once_per_period_not_per_event() -> None:
    import boto3
    from relay.integrations.credentials import CredentialsStore

    sm = boto3.client("secretsmanager")
    arn = sm.create_secret(Name="adobe", SecretString="not json")["ARN"]
    now = [1000.0]
    store = CredentialsStore(sm, adobe_secret_id=arn, webhook_secret_id=None, max_age=300, monotonic=lambda: now[0])
    reads: list[str] = []
    sm.meta.events.register("before-call.secrets-manager.GetSecretValue", lambda **kw: reads.append("get"))

    # GIVEN a secret read while malformed, and nobody fixing it
    with pytest.raises(CredentialsError):
        store.adobe()
    # WHEN every event of the next minute asks for it (a forced read, as IMS's refusal asks, among them)
    for second in range(60):
        now[0] = 1000.0 + second + 0.5
        for force in (False, False, second == 30):
            with pytest.raises(CredentialsError):
                store.adobe(force=force)

    # THEN it was read again about once per 10 s (and once for the forced read), not per event: a broken secret
    # must not cost a Secrets Manager call per event. Still broken after 5 s, read again by 10 s.
    assert len(reads) == 1 + 5 + 1
    # AND once fixed, it is taken 10 s after the last read found it broken, not 5 s (nor 300 s) after
    now[0], before = 2000.0, len(reads)
    with pytest.raises(CredentialsError):
        store.adobe()  # read again (due), still broken
    sm.put_secret_value(SecretId=arn, SecretString=json.dumps({"clientId": "c", "clientSecret": "s", "orgId": "o"}))
    now[0] += 5
    with pytest.raises(CredentialsError):
        store.adobe()
    now[0] += 5
    assert store.adobe().client_id == "c"
    assert len(reads) == before + 2


@pytest.mark.usefixtures("aws")
@pytest.mark.parametrize("moves", ["monotonic", "wall"])
def test_a_malformed_secret_fixed_within_its_cache_period_is_taken_within_seconds(moves: str) -> None:
    # (by either clock: the wall clock alone moves when Lambda froze the environment between sparse invocations, as
    # a review pointed out; Powertools' own 300 s cache runs on the real clock, which barely moves during the test)
    import boto3
    from relay.integrations.credentials import MALFORMED_REREAD_S, CredentialsStore

    sm = boto3.client("secretsmanager")
    good = {"clientId": "client-1", "clientSecret": "s3cret", "orgId": "ORG@AdobeOrg"}
    adobe = sm.create_secret(Name="adobe", SecretString=json.dumps({**good, "orgId": ""}))["ARN"]
    hooks = sm.create_secret(Name="hooks", SecretString=json.dumps({"secrets": ["whsec_short"]}))["ARN"]
    key = sm.create_secret(Name="key", SecretString=json.dumps({"key": "too short"}))["ARN"]
    now, still = [1000.0], 1000.0
    store = CredentialsStore(
        sm, adobe_secret_id=adobe, webhook_secret_id=hooks, identity_key_secret_id=key, max_age=300,
        monotonic=(lambda: now[0]) if moves == "monotonic" else (lambda: still),
        wall=(lambda: now[0]) if moves == "wall" else (lambda: still),
    )  # fmt: skip
    reads: list[str] = []
    sm.meta.events.register("before-call.secrets-manager.GetSecretValue", lambda **kw: reads.append("get"))
    readers = (store.adobe, store.webhook_secrets, store.identity_key)

    # GIVEN each secret read while malformed (a CredentialsError: events retried or queued, webhooks answered 503)
    for read in readers:
        with pytest.raises(CredentialsError):
            read()
    # WHEN the operator fixes them, well within the 300 s cache period
    sm.put_secret_value(SecretId=adobe, SecretString=json.dumps(good))
    sm.put_secret_value(SecretId=hooks, SecretString=json.dumps({"secrets": ["whsec_" + "QUFB" * 8]}))
    sm.put_secret_value(SecretId=key, SecretString=json.dumps({"key": "k" * 40}))

    # THEN until MALFORMED_REREAD_S has passed the cached values answer (no read per event while a secret is broken)
    now[0] += MALFORMED_REREAD_S - 1
    for read in readers:
        with pytest.raises(CredentialsError):
            read()
    assert len(reads) == 3
    # AND then each is read again once and taken, without waiting for the cache period (nor a redeploy)
    now[0] += 1
    assert store.adobe().org_id == "ORG@AdobeOrg"
    assert store.webhook_secrets() == ["whsec_" + "QUFB" * 8]
    assert store.identity_key() == b"k" * 40
    assert len(reads) == 6
    # AND once good, a secret is kept for its cache period again
    now[0] += 60
    store.adobe(), store.webhook_secrets()
    assert len(reads) == 6
