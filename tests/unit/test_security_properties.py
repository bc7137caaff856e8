"""Hostile input against `POST /events` (issue 6): property-based tests and the Standard Webhooks vectors.

The real `WebhookApp`, `Relay` and `EdgeClient` run over fakes (no sockets): an in-memory store, a session that
answers every Edge call 200, fixed webhook secrets. Properties:

* any request (bytes, text, JSON of any shape, deep nesting, huge bodies, garbage base64, random headers and
  query strings) gets an answer from the documented set, never 500 and never an exception;
* an unsigned or badly signed request never reaches the relay: nothing is claimed, stored or sent to Edge;
* a signed request whose body is not a valid event is stored `rejected` and never sent to Edge;
* no answer carries a webhook secret, the Adobe client secret or the access token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relay.clock import SystemClock
from relay.errors import CredentialsError
from relay.integrations.credentials import check_webhook_secrets
from relay.integrations.edge import EdgeClient
from relay.process_event import Relay
from relay.settings import load_settings
from relay.webhook import WebhookApp, _SignedBytes
from standardwebhooks.webhooks import Webhook

from devtools.gateway import build_event
from devtools.signing import sign_webhook
from tests.fakes import CREDS, FakeStore, FakeTokenProvider, make_response, unprepare

# Fixed test secrets (32 bytes each, base64): the current one and the one being rotated in.
SECRET_CURRENT = "whsec_" + base64.b64encode(b"interact-relay-current-secret-01").decode()
SECRET_NEXT = "whsec_" + base64.b64encode(b"interact-relay-rotated-secret-02").decode()
SECRET_WRONG = "whsec_" + base64.b64encode(b"interact-relay-attacker-secret03").decode()
SECRETS = [SECRET_CURRENT, SECRET_NEXT]

DOCUMENTED = {200, 202, 400, 401, 409, 413, 422, 502, 503}
PROBLEM_JSON = "application/problem+json"
SENSITIVE = [SECRET_CURRENT, SECRET_NEXT, SECRET_CURRENT[6:], SECRET_NEXT[6:], CREDS.client_secret, "token-1"]

ENV = {
    "HANDLES_TABLE": "handles",
    "DATASTREAM_ID": "ds-default",
    "ADOBE_SECRET_ID": "adobe",
    "WEBHOOK_SECRET_ID": "webhook",
    "EDGE_BASE_URL": "https://edge.example.test",
}
MAX_EXAMPLES = 150

# --------------------------------------------------------------------------------------------------- fakes


class OkSession:
    """Answers every Edge call 200 with a small handle; records each call."""

    trust_env = False

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        return request.prepare()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        url, params, headers = unprepare(request)
        return self.post(url, params=params, data=request.body, headers=headers, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        self.calls.append({"url": url, **kwargs})
        return make_response(200, {"requestId": "edge-req-1", "handle": [{"type": "identity:result", "payload": []}]})


class FakeWebhookCredentials:
    def __init__(self, secrets: list[str]) -> None:
        self.secrets = secrets

    def webhook_secrets(self, *, force: bool = False) -> list[str]:
        return list(self.secrets)


class FakeQueue:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.delays: list[float | None] = []  # each send's delay_s (Edge's Retry-After)

    def send(self, inbound: Any, *, delay_s: float | None = None) -> bool:
        self.sent.append(inbound)
        self.delays.append(delay_s)
        return True


class SpyRelay(Relay):
    """The real Relay, recording whether anything reached it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.processed: list[Any] = []
        self.rejected: list[str] = []

    def process(self, inbound: Any, deadline: Any, *, lease_s: float, state: Any = None, **kwargs: Any) -> Any:
        self.processed.append(inbound)
        return super().process(inbound, deadline, lease_s=lease_s, state=state, **kwargs)

    def reject_invalid(self, event_id: str, **kwargs: Any) -> dict[str, Any]:
        self.rejected.append(event_id)
        return super().reject_invalid(event_id, **kwargs)


@dataclass
class Harness:
    app: WebhookApp
    relay: SpyRelay
    store: FakeStore
    session: OkSession
    queue: FakeQueue
    answers: list[dict[str, Any]] = field(default_factory=list)

    def call(self, event: dict[str, Any]) -> dict[str, Any]:
        answer = self.app.handle(event, None)
        self.answers.append(answer)
        return answer

    @property
    def reached_relay(self) -> bool:
        return bool(self.relay.processed or self.relay.rejected or self.store.claims or self.store.finished)


def harness(secrets: list[str] | None = None) -> Harness:
    settings_ = load_settings(ENV)
    clock = SystemClock()
    session = OkSession()
    store = FakeStore()
    edge = EdgeClient(session, settings_, FakeTokenProvider(), clock)  # type: ignore[arg-type]
    relay = SpyRelay(store, edge, clock)
    queue = FakeQueue()
    creds = FakeWebhookCredentials(secrets or SECRETS)
    app = WebhookApp(settings_, relay, lambda: creds, lambda: queue, clock)  # type: ignore[arg-type,return-value]
    return Harness(app, relay, store, session, queue)


def http_event(
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    query: str = "",
    content_type: str = "application/json",
) -> dict[str, Any]:
    """The HTTP API 2.0 event API Gateway builds for this request."""
    pairs = [("content-type", content_type), *(headers or {}).items()]
    return build_event(
        method="POST",
        raw_path="/events",
        raw_query=query,
        headers=pairs,
        body=body,
        route_key="POST /events",
        source_ip="203.0.113.7",
    )


def check_answer(answer: Any) -> dict[str, Any]:
    """A well-formed, documented answer with a JSON body that leaks nothing."""
    assert isinstance(answer, dict), answer
    status = answer["statusCode"]
    assert status in DOCUMENTED, answer
    assert status != 500
    headers = {k.lower(): v for k, v in (answer.get("headers") or {}).items()}
    body = json.loads(answer["body"])
    assert isinstance(body, dict)
    if status >= 400:
        assert headers.get("content-type") == PROBLEM_JSON, answer
        assert {"type", "title", "status", "detail"} <= set(body), body
        assert body["status"] == status
        assert "Traceback" not in answer["body"]
    else:
        assert headers.get("content-type") == "application/json", answer
    if status in (409, 503):
        assert headers.get("retry-after", "").isdigit(), answer
    for secret in SENSITIVE:
        assert secret not in answer["body"], "an answer leaked a secret"
        assert all(secret not in str(v) for v in headers.values())
    return body


# ---------------------------------------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)
identity_maps = st.dictionaries(
    st.sampled_from(["ECID", "FPID", "Email", "CRMID"]),
    st.lists(
        st.fixed_dictionaries(
            {"id": st.text(min_size=1, max_size=40)},
            optional={"primary": st.booleans(), "authenticatedState": st.sampled_from(["ambiguous", "authenticated"])},
        ),
        min_size=1,
        max_size=3,
    ),
    max_size=3,
)
valid_events = st.fixed_dictionaries(
    {
        "event": st.fixed_dictionaries(
            {
                "xdm": st.fixed_dictionaries(
                    {},
                    optional={
                        # any text SQS can carry as the eventId attribute (ids with other control characters, a
                        # lone surrogate, U+FFFE or U+FFFF are refused: test_core_models; the utf-8 codec leaves
                        # surrogates out)
                        "_id": st.text(
                            st.characters(
                                codec="utf-8",
                                min_codepoint=0x20,
                                exclude_characters="\ufffe\uffff",
                                include_characters="\t\n\r",
                            ),
                            min_size=1,
                            max_size=64,
                        ),
                        # free-form text may hold a lone surrogate (a character cut in half): sent on as its escape
                        "name": st.text(st.sampled_from(["a", "\u00e9", "\ud83d", "\ude00", "\U0001f600"]), max_size=6),
                        "timestamp": st.just("2024-01-01T00:00:00.000Z"),
                        "identityMap": identity_maps,
                        "eventType": st.text(max_size=20),
                        "commerce": json_values,
                    },
                )
            },
            optional={"data": st.dictionaries(st.text(max_size=12), json_values, max_size=4)},
        )
    },
    optional={
        "query": st.dictionaries(st.text(max_size=12), json_values, max_size=3),
        "meta": st.dictionaries(st.text(max_size=12), json_values, max_size=3),
        "extra": json_values,
    },
)


def nested(depth: int, *, inside_event: bool) -> bytes:
    core = "[" * depth + "]" * depth
    text = '{"event":{"xdm":{},"data":{"deep":' + core + "}}}" if inside_event else core
    return text.encode()


def huge(size: int) -> bytes:
    return b'{"event":{"xdm":{"blob":"' + b"x" * size + b'"}}}'


any_bodies = st.one_of(
    st.binary(max_size=3000),
    st.text(max_size=2000).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    valid_events.map(lambda v: json.dumps(v).encode()),
    st.builds(nested, st.integers(1, 20000), inside_event=st.booleans()),
    st.integers(65_400, 66_000).map(huge),
    st.sampled_from([b"", b" ", b"null", b"[]", b"{}", b'{"event":null}', b'{"event":{"xdm":[]}}', b"\xff\xfe"]),
)
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF), max_size=80)
random_headers = st.dictionaries(
    st.one_of(
        st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"]), st.from_regex(r"[a-z-]{1,20}")
    ),
    header_text,
    max_size=5,
)
query_strings = st.one_of(
    st.just(""),
    st.text(max_size=60),
    st.builds(lambda v: "datastreamId=" + v, st.text(max_size=140)),
    st.sampled_from(["datastreamId=ds-other", "datastreamId=", "datastreamId=a&datastreamId=b", "datastreamId=%00"]),
)

PROPERTY_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------------------------------------- properties


@PROPERTY_SETTINGS
@given(
    body=any_bodies,
    headers=random_headers,
    query=query_strings,
    base64_mode=st.sampled_from(["gateway", "true-valid", "true-garbage", "false"]),
    content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream", ""]),
)
def test_unsigned_requests_never_reach_the_relay(
    body: bytes, headers: dict[str, str], query: str, base64_mode: str, content_type: str
) -> None:
    h = harness()
    event = http_event(body, headers, query=query, content_type=content_type)
    if base64_mode == "true-valid":
        event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
    elif base64_mode == "true-garbage":
        event["body"], event["isBase64Encoded"] = body.decode("latin-1") + "*%$", True
    elif base64_mode == "false":
        event["body"], event["isBase64Encoded"] = body.decode("utf-8", errors="replace"), False
    answer = check_answer(h.call(event))
    assert answer["status"] in (400, 401)  # 400 only for a body that is not even base64
    assert not h.reached_relay
    assert h.session.calls == [] and h.queue.sent == []


@PROPERTY_SETTINGS
@given(body=any_bodies, query=query_strings, use_base64=st.booleans(), rotated=st.booleans())
def test_signed_requests_get_documented_answers_and_invalid_ones_never_reach_edge(
    body: bytes, query: str, use_base64: bool, rotated: bool
) -> None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return  # a Standard Webhooks signature is over text; covered by the unsigned property
    h = harness()
    event = http_event(body, sign_webhook(text, SECRET_NEXT if rotated else SECRET_CURRENT), query=query)
    if use_base64:
        event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
    answer_raw = h.call(event)
    answer = check_answer(answer_raw)
    status = answer_raw["statusCode"]
    assert status in (200, 400, 413), answer
    if status == 200:
        assert len(h.session.calls) == 1 and len(h.relay.processed) == 1
        assert h.store.rejected_unclaimed == []
    else:
        # Refused before Edge: stored as rejected (with the validation errors), never sent.
        assert h.session.calls == [] and h.relay.processed == []
        assert h.store.claims == [] and h.store.finished == []
        assert [e for e, _ in h.store.rejected_unclaimed] == [answer["eventId"]]
        assert answer["errors"] and all({"path", "message"} <= set(e) for e in answer["errors"])
        if status == 413 and len(body) <= 64 * 1024:
            # It fitted as received, not with the `_id` and timestamp the relay fills in: refused on arrival all the
            # same (an event answered 202 must be deliverable), saying it was measured as sent.
            assert answer["errors"][0]["message"].startswith("as sent to Edge")


@PROPERTY_SETTINGS
@given(doc=valid_events, query=st.sampled_from(["", "datastreamId=ds-other"]))
def test_signed_valid_events_are_delivered_once_with_a_stable_id(doc: dict[str, Any], query: str) -> None:
    h = harness()
    text = json.dumps(doc)
    headers = sign_webhook(text, SECRET_CURRENT)
    answer = check_answer(h.call(http_event(text.encode(), headers, query=query)))
    assert answer["eventId"] == doc["event"]["xdm"].get("_id", headers["webhook-id"])
    (call,) = h.session.calls
    sent = json.loads(call["data"])
    assert sent["event"]["xdm"]["_id"] == answer["eventId"]
    assert call["params"]["datastreamId"] == ("ds-other" if query else "ds-default")


# ----------------------------------------------------------------------------- Standard Webhooks vectors


def v1(secret: str, msg_id: str, timestamp: int, body: str | bytes) -> str:
    """The standard's signature, computed here apart from the library: HMAC-SHA256 over `id.timestamp.body`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    raw = body.encode() if isinstance(body, str) else body
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + raw, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def test_signer_matches_the_standard_webhooks_reference_vector() -> None:
    # The specification's own example (standard-webhooks/spec, libraries' test suites).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    msg_id, ts, payload = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, '{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert v1(secret, msg_id, ts, payload) == expected
    assert sign_webhook(payload, secret, msg_id=msg_id, timestamp=ts)["webhook-signature"] == expected


BODY = '{"event": {"xdm": {"_id": "vector-1", "eventType": "commerce.purchases"}}}'
ARABIC_INDIC = str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")
MSG_ID = "msg_vector"


def vector_headers(name: str, now: int) -> tuple[str, dict[str, str]]:
    """(body to send, headers) for each named case."""
    good = v1(SECRET_CURRENT, MSG_ID, now, BODY)

    def signed_at(ts: int) -> dict[str, str]:  # a correct signature, but made at `ts`
        return {
            "webhook-id": MSG_ID,
            "webhook-timestamp": str(ts),
            "webhook-signature": v1(SECRET_CURRENT, MSG_ID, ts, BODY),
        }

    base = {"webhook-id": MSG_ID, "webhook-timestamp": str(now), "webhook-signature": good}
    cases: dict[str, tuple[str, dict[str, str]]] = {
        "valid": (BODY, base),
        "rotated-secret": (BODY, {**base, "webhook-signature": v1(SECRET_NEXT, MSG_ID, now, BODY)}),
        "several-signatures-one-valid": (
            BODY,
            {**base, "webhook-signature": f"{v1(SECRET_WRONG, MSG_ID, now, BODY)} v1,AAAA {good}"},
        ),
        # entries with bad base64, two commas and no comma, and a double space, ahead of a valid one
        "malformed-entries-before-a-valid-one": (BODY, {**base, "webhook-signature": f"v1,abcde v1,a,b  v9 {good}"}),
        # two `webhook-signature` lines (a sender, or a proxy that splits the header): API Gateway's payload 2.0
        # joins duplicate headers with commas
        "two-signature-lines-joined": (
            BODY,
            {**base, "webhook-signature": f"{v1(SECRET_WRONG, MSG_ID, now, BODY)},{good}"},
        ),
        # a valid v1 line, then a line of another scheme (Standard Webhooks' asymmetric `v1a`), joined the same way
        "valid-line-then-a-v1a-line-joined": (BODY, {**base, "webhook-signature": f"{good},v1a,AAAA"}),
        "wrong-secret": (BODY, {**base, "webhook-signature": v1(SECRET_WRONG, MSG_ID, now, BODY)}),
        "tampered-body": (BODY.replace("purchases", "refunds"), base),
        "tampered-id": (BODY, {**base, "webhook-id": "msg_other"}),
        "tampered-timestamp": (BODY, {**base, "webhook-timestamp": str(now - 1)}),
        "timestamp-6-min-old": (
            BODY,
            {
                **base,
                "webhook-timestamp": str(now - 360),
                "webhook-signature": v1(SECRET_CURRENT, MSG_ID, now - 360, BODY),
            },
        ),
        "timestamp-6-min-future": (
            BODY,
            {
                **base,
                "webhook-timestamp": str(now + 360),
                "webhook-signature": v1(SECRET_CURRENT, MSG_ID, now + 360, BODY),
            },
        ),
        "timestamp-not-a-number": (BODY, {**base, "webhook-timestamp": "yesterday"}),
        # signed at `now`, which the library (float(), then whole seconds) would take each of these for
        "timestamp-with-a-fraction": (BODY, {**base, "webhook-timestamp": f"{now}.999"}),
        "timestamp-with-an-exponent": (BODY, {**base, "webhook-timestamp": f"{now / 1e9!r}e9"}),
        "timestamp-padded": (BODY, {**base, "webhook-timestamp": f" {now}\t"}),
        "timestamp-in-other-digits": (BODY, {**base, "webhook-timestamp": str(now).translate(ARABIC_INDIC)}),
        "missing-id": (BODY, {k: v for k, v in base.items() if k != "webhook-id"}),
        "missing-timestamp": (BODY, {k: v for k, v in base.items() if k != "webhook-timestamp"}),
        "missing-signature": (BODY, {k: v for k, v in base.items() if k != "webhook-signature"}),
        "no-headers": (BODY, {}),
        "v2-signature-only": (BODY, {**base, "webhook-signature": "v2," + good.split(",", 1)[1]}),
        "signature-without-comma": (BODY, {**base, "webhook-signature": good.replace(",", "")}),
        "signature-bad-base64": (BODY, {**base, "webhook-signature": "v1,!!!not-base64!!!"}),
        "signature-empty": (BODY, {**base, "webhook-signature": ""}),
        "signature-truncated": (BODY, {**base, "webhook-signature": good[:-8]}),
    }
    return cases[name]


ACCEPTED = [
    "valid",
    "rotated-secret",
    "several-signatures-one-valid",
    "malformed-entries-before-a-valid-one",
    "two-signature-lines-joined",
    "valid-line-then-a-v1a-line-joined",
]
REFUSED = [
    "wrong-secret",
    "tampered-body",
    "tampered-id",
    "tampered-timestamp",
    "timestamp-6-min-old",
    "timestamp-6-min-future",
    "timestamp-not-a-number",
    "timestamp-with-a-fraction",
    "timestamp-with-an-exponent",
    "timestamp-padded",
    "timestamp-in-other-digits",
    "missing-id",
    "missing-timestamp",
    "missing-signature",
    "no-headers",
    "v2-signature-only",
    "signature-without-comma",
    "signature-bad-base64",
    "signature-empty",
    "signature-truncated",
]


@pytest.mark.parametrize("case", ACCEPTED)
def test_signature_vectors_accepted(case: str) -> None:
    h = harness()
    body, headers = vector_headers(case, int(time.time()))
    answer = check_answer(h.call(http_event(body.encode(), headers)))
    assert h.answers[-1]["statusCode"] == 200, answer
    assert answer["eventId"] == "vector-1"
    assert len(h.session.calls) == 1


@pytest.mark.parametrize("case", REFUSED)
def test_signature_vectors_refused(case: str) -> None:
    h = harness()
    body, headers = vector_headers(case, int(time.time()))
    answer = check_answer(h.call(http_event(body.encode(), headers)))
    assert h.answers[-1]["statusCode"] == 401, answer
    assert answer["title"] == "Unauthorized" and answer["detail"] == "missing or invalid webhook signature"
    assert not h.reached_relay and h.session.calls == []


@pytest.mark.parametrize("case", ["v2-signature-only", "signature-without-comma", "signature-empty"])
def test_a_signature_header_with_nothing_readable_is_logged_as_such(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The sample events' placeholder signature, for one: the log once said "Missing required headers" (the library's
    # words once the unreadable entries were dropped), which sent the reader to look for a header that was there
    h = harness()
    body, headers = vector_headers(case, int(time.time()))
    with caplog.at_level(logging.WARNING):
        h.call(http_event(body.encode(), headers))
    assert h.answers[-1]["statusCode"] == 401
    [line] = [r for r in caplog.records if r.getMessage() == "webhook signature rejected"]
    assert line.reason == "webhook-signature holds no well-formed v1,<base64> signature"  # type: ignore[attr-defined]


def test_signature_with_a_secret_that_was_rotated_out_is_refused() -> None:
    h = harness(secrets=[SECRET_NEXT])  # the old secret was removed from the list
    body, headers = vector_headers("valid", int(time.time()))
    check_answer(h.call(http_event(body.encode(), headers)))
    assert h.answers[-1]["statusCode"] == 401 and not h.reached_relay


def test_timestamps_within_tolerance_are_accepted() -> None:
    now = int(time.time())
    for skew in (-290, 290):
        h = harness()
        headers = {
            "webhook-id": MSG_ID,
            "webhook-timestamp": str(now + skew),
            "webhook-signature": v1(SECRET_CURRENT, MSG_ID, now + skew, BODY),
        }
        check_answer(h.call(http_event(BODY.encode(), headers)))
        assert h.answers[-1]["statusCode"] == 200, skew


def test_signature_is_checked_on_the_raw_bytes_not_a_reparsed_body() -> None:
    # Same JSON document, different bytes (whitespace): the signature over the compact form does not match.
    h = harness()
    compact = json.dumps(json.loads(BODY), separators=(",", ":"))
    headers = sign_webhook(compact, SECRET_CURRENT)
    check_answer(h.call(http_event(BODY.encode(), headers)))
    assert h.answers[-1]["statusCode"] == 401 and not h.reached_relay


# ------------------------------------------------------------ regressions (bugs found here, since fixed)


LATIN_1_BODY = '{"event": {"xdm": {"_id": "latin-1", "note": "caf\u00e9"}}}'.encode("latin-1")  # é as one byte
# API Gateway hands a body of a type it does not take for text (no Content-Type, application/octet-stream, a form) to
# the function as base64, its bytes intact; the local gateway does the same (`devtools.gateway.is_text_content`).
BINARY = "application/octet-stream"


def test_a_correctly_signed_body_that_is_not_utf8_is_a_400_kept_as_a_rejection() -> None:
    # GIVEN a body in Latin-1, signed over its bytes as the standard defines (once answered 401: the library signs
    # text, so no signature over such a body could match, and the sender was sent to check a secret that was right)
    h = harness()
    now = int(time.time())
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": str(now)}
    signature = v1(SECRET_CURRENT, MSG_ID, now, LATIN_1_BODY)

    # WHEN it is posted
    answer = check_answer(
        h.call(http_event(LATIN_1_BODY, {**headers, "webhook-signature": signature}, content_type=BINARY))
    )

    # THEN it is the 400 any invalid body gets, naming the first byte that is not UTF-8 (the é), kept as a rejection
    assert LATIN_1_BODY[49:50] == b"\xe9"
    assert h.answers[-1]["statusCode"] == 400, answer
    assert answer["errors"] == [{"path": "$", "message": "body is not UTF-8 (byte 49)"}]
    assert h.relay.rejected == [MSG_ID] and h.session.calls == []


@pytest.mark.parametrize("signed_with", ["wrong-secret", "text-replacing-the-byte", "another-timestamp"])
def test_a_body_that_is_not_utf8_still_needs_its_signature(signed_with: str) -> None:
    # GIVEN the same Latin-1 body, its signature wrong in three ways
    h = harness()
    now = int(time.time())
    signature = {
        "wrong-secret": v1(SECRET_WRONG, MSG_ID, now, LATIN_1_BODY),
        "text-replacing-the-byte": v1(SECRET_CURRENT, MSG_ID, now, LATIN_1_BODY.decode("utf-8", "replace")),
        "another-timestamp": v1(SECRET_CURRENT, MSG_ID, now - 1, LATIN_1_BODY),
    }[signed_with]
    headers = {"webhook-id": MSG_ID, "webhook-timestamp": str(now), "webhook-signature": signature}

    # WHEN it is posted
    check_answer(h.call(http_event(LATIN_1_BODY, headers, content_type=BINARY)))

    # THEN 401, and nothing reached the relay
    assert h.answers[-1]["statusCode"] == 401 and not h.reached_relay


@pytest.mark.parametrize("body", [BODY, '{"name": "café ☕ 𝄞", "id": "\\ud800"}', ""])
def test_the_byte_signer_signs_any_utf8_body_as_the_library_does(body: str) -> None:
    # The signer used for bodies that are not UTF-8 must be the library's own on every body the library can sign
    when = datetime.fromtimestamp(1_700_000_000, tz=UTC)
    for msg_id in (MSG_ID, "msg_ünïcode"):
        assert _SignedBytes(SECRET_CURRENT).sign(msg_id, when, body) == Webhook(SECRET_CURRENT).sign(msg_id, when, body)


def test_lone_surrogate_escape_is_sent_on_as_its_escape_but_refused_in_an_identity() -> None:
    # A character cut in half in free-form XDM (as JavaScript's JSON.stringify writes one) is delivered, the escape
    # unchanged in what Edge gets (once refused as "cannot be sent on as UTF-8": codec.dumps writes it as its escape)
    h = harness()
    body = '{"event": {"xdm": {"_id": "surrogate-1", "name": "\\ud800"}}}'
    answer = h.app.handle(http_event(body.encode(), sign_webhook(body, SECRET_CURRENT)), None)
    assert answer["statusCode"] == 200
    assert [b'"name":"\\ud800"' in call["data"] for call in h.session.calls] == [True]
    # In an identity it is a 400 naming the id, and nothing is sent
    h = harness()
    body = '{"event": {"xdm": {"_id": "surrogate-2", "identityMap": {"Email": [{"id": "a\\ud800", "primary": true}]}}}}'
    answer = h.app.handle(http_event(body.encode(), sign_webhook(body, SECRET_CURRENT)), None)
    assert answer["statusCode"] == 400
    assert json.loads(answer["body"])["errors"][0]["path"] == "event.xdm.identityMap.Email[0].id"
    assert h.session.calls == []


def test_garbage_base64_is_unauthenticated_or_with_signatures_off_a_400_with_errors() -> None:
    event = http_event(BODY.encode(), {})
    event["body"], event["isBase64Encoded"] = "***not base64***", True
    # no bytes to check a signature against: 401
    h = harness()
    assert check_answer(h.call(event))["status"] == 401
    # with signatures off (another authorizer in front): 400 with the reason
    h = harness()
    h.app._settings = load_settings({**ENV, "WEBHOOK_AUTH": "none"})
    answer = check_answer(h.call(event))
    assert answer["status"] == 400
    assert answer.get("errors")


def test_a_text_body_holding_a_lone_surrogate_is_refused_as_not_utf8_and_kept() -> None:
    # GIVEN a hand-built HTTP API event (API Gateway never sends one) whose text body holds a lone surrogate, with
    # signatures off (another authorizer in front)
    h = harness()
    h.app._settings = load_settings({**ENV, "WEBHOOK_AUTH": "none"})
    event = http_event(BODY.encode(), {"webhook-id": MSG_ID})
    event["body"], event["isBase64Encoded"] = '{"event": {"xdm": {"note": "\ud83d"}}}', False

    # WHEN it is posted
    answer = check_answer(h.call(event))

    # THEN it is the 400 any body that is not UTF-8 gets, naming the byte, and it is kept as a rejection (a review
    # found it answered "isBase64Encoded is true but the body is not base64", and nothing stored)
    assert h.answers[-1]["statusCode"] == 400
    assert answer["errors"] == [{"path": "$", "message": "body is not UTF-8 (byte 28)"}]  # the surrogate's first
    assert h.relay.rejected == [MSG_ID] and h.session.calls == []


@pytest.mark.parametrize("key_bytes", [24, 32, 64])
def test_webhook_secrets_of_24_to_64_random_bytes_are_accepted(key_bytes: int) -> None:
    secrets = [SECRET_CURRENT, "whsec_" + base64.b64encode(bytes(range(key_bytes))).decode()]
    assert check_webhook_secrets(secrets) == secrets


@pytest.mark.parametrize(
    "bad",
    [
        "whsec_QQ",  # one byte: the library would take it, and a signature could be forged in 256 tries
        "whsec_!!QQ!!",  # characters the library would silently drop
        "whsec_abcde",  # not base64 at all
        "changeme",  # no whsec_ prefix
        "whsec_" + base64.b64encode(bytes(23)).decode(),  # 23 bytes
        "whsec_" + base64.b64encode(bytes(65)).decode(),  # 65 bytes
        "",
        42,
    ],
)
def test_a_weak_or_malformed_webhook_secret_is_a_configuration_error_that_does_not_echo_it(bad: Any) -> None:
    # WHEN / THEN: a CredentialsError (the webhook answers 503 and logs an ERROR, not a 401 like an attack would)
    with pytest.raises(CredentialsError) as info:
        check_webhook_secrets([SECRET_CURRENT, bad])
    assert str(info.value) == 'webhook secret 2 of 2 is not "whsec_" + base64 of 24 to 64 random bytes'


@pytest.mark.parametrize("doc", [None, [], "whsec_x", {"a": 1}])
def test_a_webhook_secret_document_without_a_list_of_secrets_is_a_configuration_error(doc: Any) -> None:
    with pytest.raises(CredentialsError):
        check_webhook_secrets(doc)


# -- webhook.py: an unreadable webhook secret is answered without its reason (M30) ----------------------------------


def test_an_unreadable_webhook_secret_is_answered_without_the_reason_the_log_keeps() -> None:
    from devtools.signing import sign_webhook
    from tests.unit.test_security_properties import SECRETS, check_answer, harness, http_event

    h = harness()
    reason = "webhook secret (WEBHOOK_SECRET_ID) could not be read (AccessDeniedException) arn:aws:secretsmanager:x"

    def unreadable(*, force: bool = False) -> list[str]:
        raise CredentialsError(reason)

    h.app._credentials().webhook_secrets = unreadable  # type: ignore[method-assign]
    body = b'{"event": {}}'

    # WHEN an unauthenticated caller's request arrives while the secret cannot be read
    answer = h.app.handle(http_event(body, sign_webhook(body, SECRETS[0], msg_id="msg-1")), None)

    # THEN it is told to retry, and nothing about the deployment's secrets, IAM or ARNs (logged for the operator)
    doc = check_answer(answer)
    assert (answer["statusCode"], doc["detail"]) == (503, "the relay cannot verify signatures right now")
    for leak in ("WEBHOOK_SECRET_ID", "AccessDenied", "arn:aws"):
        assert leak not in answer["body"]
