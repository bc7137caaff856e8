"""relay.integrations.edge.EdgeClient.deliver: Adobe's retry rules within a deadline, on a fake session and clock."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from relay.clock import Deadline
from relay.errors import CredentialsError, EdgeRejected, EdgeUnavailable
from relay.integrations.edge import (
    MAX_ANSWER_BYTES,
    MAX_PROBLEM_TEXT_CHARS,
    EdgeClient,
    _never_sent,
    problem_from,
    request_id_of,
)
from relay.integrations.ims import AccessToken
from relay.runtime import new_http_session
from relay.settings import Settings, load_settings
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from tests.fakes import (
    CREDS,
    WALL_START,
    FakeClock,
    FakeSession,
    FakeTokenProvider,
    Scripted,
    broken_body_response,
    edge_problem,
    make_response,
)

DATASTREAM = "ds-1"
REQUEST = {"event": {"xdm": {"_id": "evt-1", "timestamp": "2023-11-14T22:13:20.000Z"}}}
OK_BODY = {"requestId": "edge-req-1", "handle": [{"type": "identity:result", "payload": []}]}


def settings(**overrides: str) -> Settings:
    env = {
        "HANDLES_TABLE": "handles",
        "DATASTREAM_ID": DATASTREAM,
        "EDGE_AUTH": "none",
        "WEBHOOK_AUTH": "none",
        "EDGE_BASE_URL": "https://edge.adobedc.net",
    }
    return load_settings(env | overrides)


def client(
    session: FakeSession, clock: FakeClock, *, tokens: FakeTokenProvider | None = None, **env: str
) -> EdgeClient:
    return EdgeClient(session, settings(**env), tokens, clock, random.Random(42))  # type: ignore[arg-type]


def ok(status: int = 200, body: dict[str, Any] | None = None) -> requests.Response:
    return make_response(status, body if body is not None else OK_BODY)


def retryable(status: int, retry_after: str | None = None) -> requests.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return make_response(status, {"type": f"https://ns.adobe.com/aep/errors/EXEG-0000-{status}"}, headers=headers)


# -- success -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 207])
def test_deliver_returns_200_and_207_with_attempt_count(status):
    # GIVEN
    clock = FakeClock()
    body = {**OK_BODY, "errors": [{"type": "x", "status": 502}]} if status == 207 else OK_BODY
    session = FakeSession([ok(status, body)])

    # WHEN
    answer = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN
    assert (answer.status, answer.body, answer.attempts, answer.request_id) == (status, body, 1, "edge-req-1")
    assert len(session.calls) == 1
    assert clock.sleeps == []


def test_deliver_posts_the_request_body_and_query_params():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([ok()])

    # WHEN
    client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN
    call = session.calls[0]
    assert call.url == "https://edge.adobedc.net/ee/v2/interact"
    assert call.params is not None
    assert call.params["datastreamId"] == "ds-1"
    assert len(call.params["requestId"]) == 36
    assert json.loads(call.data) == REQUEST
    assert call.data == b'{"event":{"xdm":{"_id":"evt-1","timestamp":"2023-11-14T22:13:20.000Z"}}}'
    assert call.headers == {"Content-Type": "application/json", "Accept": "application/json"}
    assert call.timeout == (2.5, 5.0)  # connect capped at a quarter of the 10 s left


def test_deliver_uses_the_hinted_url_when_a_hint_is_given():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([ok()])

    # WHEN
    client(session, clock).deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))

    # THEN
    assert session.calls[0].url == "https://edge.adobedc.net/ee/or2/v2/interact"


def test_deliver_uses_the_subdomain_hint_template():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([ok()])
    edge = client(
        session,
        clock,
        EDGE_AUTH="ims",  # the authenticated host takes only calls with a token (none are checked here)
        ADOBE_SECRET_ID="adobe-secret",
        EDGE_BASE_URL="https://server.adobedc.net",
        EDGE_HINT_URL_TEMPLATE="https://{hint}.server.adobedc.net/ee/v2/interact",
    )

    # WHEN
    edge.deliver(DATASTREAM, REQUEST, "va6", Deadline(clock, 10))

    # THEN
    assert session.calls[0].url == "https://va6.server.adobedc.net/ee/v2/interact"


SUB_DOMAIN_HINTS = {
    "EDGE_AUTH": "ims",
    "ADOBE_SECRET_ID": "adobe-secret",
    "EDGE_BASE_URL": "https://server.adobedc.net",
    "EDGE_HINT_URL_TEMPLATE": "https://{hint}.server.adobedc.net/ee/v2/interact",
}


def no_connection(kind: str, host: str) -> requests.RequestException:
    """What `requests` raises when no connection could be made (its own wrapping of urllib3's errors): the name did
    not resolve, the connection was refused, or it timed out before it was made."""
    if kind == "connect timeout":
        return requests.ConnectTimeout(MaxRetryError(None, "/ee/v2/interact", ConnectTimeoutError(None, host)))  # type: ignore[arg-type]
    cause = (
        NameResolutionError(host, None, socket.gaierror(-2, "Name or service not known"))  # type: ignore[arg-type]
        if kind == "no such name"
        else NewConnectionError(None, "[Errno 111] Connection refused")  # type: ignore[arg-type]
    )
    return requests.ConnectionError(MaxRetryError(None, "/ee/v2/interact", cause))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["no such name", "refused", "connect timeout"])
def test_a_hinted_host_of_its_own_that_cannot_be_reached_sends_the_event_at_once_to_the_plain_url(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN hints in the host (EDGE_HINT_URL_TEMPLATE's sub-domain form), and a hint whose host cannot be reached: a
    # caller's cluster entry naming no region, or a region down (a review found such an event retried on the dead
    # host until it reached the dead-letter queue, and Edge taken for down)
    clock = FakeClock()
    session = FakeSession([no_connection(kind, "zz9.server.adobedc.net"), ok(), ok()])
    edge = client(session, clock, **SUB_DOMAIN_HINTS)  # type: ignore[arg-type]

    # WHEN an event with that hint is sent, and another one right after
    answer = edge.deliver(DATASTREAM, REQUEST, "zz9", Deadline(clock, 10))
    edge.deliver(DATASTREAM, REQUEST, "zz9", Deadline(clock, 10))

    # THEN the request, which never left, goes at once to the plain URL, the same body; that hint routes no call for a
    # while; Edge is not taken for down, and the log says why
    assert answer.status == 200
    assert [c.url for c in session.calls] == [
        "https://zz9.server.adobedc.net/ee/v2/interact",
        "https://server.adobedc.net/ee/v2/interact",
        "https://server.adobedc.net/ee/v2/interact",
    ]
    assert session.calls[0].data == session.calls[1].data
    assert (clock.sleeps, edge.is_down()) == ([], False)
    assert any("hinted host could not be reached" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("template", "failure"),
    [
        # the hinted path on the plain URL's own host: the plain URL could not reach it either
        ("{base}/ee/{hint}/v2/interact", no_connection("refused", "edge.adobedc.net")),
        # a connection dropped once the request was sent: it may have reached Edge, and is retried where it went
        (SUB_DOMAIN_HINTS["EDGE_HINT_URL_TEMPLATE"], requests.ConnectionError(ProtocolError("Connection aborted."))),
        (SUB_DOMAIN_HINTS["EDGE_HINT_URL_TEMPLATE"], requests.ReadTimeout("read timed out")),
    ],
)
def test_a_hinted_call_that_may_have_been_sent_or_whose_host_is_the_plain_urls_is_retried_there(
    template: str, failure: requests.RequestException
) -> None:
    # GIVEN a hinted call that fails once
    clock = FakeClock()
    session = FakeSession([failure, ok()])
    edge = client(session, clock, **{**SUB_DOMAIN_HINTS, "EDGE_HINT_URL_TEMPLATE": template})  # type: ignore[arg-type]

    # WHEN it is sent
    edge.deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))

    # THEN it is retried on the hinted URL after a backoff, as any failed call
    assert session.calls[0].url == session.calls[1].url != "https://server.adobedc.net/ee/v2/interact"
    assert len(clock.sleeps) == 1


def test_real_connection_failures_are_told_from_calls_that_may_have_been_sent() -> None:
    # GIVEN the relay's own HTTP session, a loopback port nothing listens on, and a server that reads a request and
    # drops the connection
    session = new_http_session(2)
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    dropping = socket.create_server(("127.0.0.1", 0))

    def drop() -> None:
        conn, _ = dropping.accept()
        conn.recv(65536)
        conn.close()

    threading.Thread(target=drop, daemon=True).start()

    def failure(port: int) -> requests.RequestException:
        with pytest.raises(requests.RequestException) as info:
            session.post(f"http://127.0.0.1:{port}/ee/v2/interact", data=b"{}", timeout=(2, 2))
        return info.value

    # WHEN each is called, THEN only the refused connection counts as never sent
    try:
        assert _never_sent(failure(closed_port)) is True
        assert _never_sent(failure(dropping.getsockname()[1])) is False
    finally:
        dropping.close()


def test_a_404_on_the_hinted_url_sends_the_event_at_once_to_the_plain_url_and_pauses_that_hint() -> None:
    # GIVEN a host that answers 404 on hinted paths (as Adobe's server-API code says server.adobedc.net does)
    clock = FakeClock()
    not_found = make_response(404, {"type": "https://ns.adobe.com/aep/errors/EXEG-0404-404", "status": 404})
    session = FakeSession([not_found, ok(), ok(), ok(), not_found, ok(), not_found, ok()])
    edge = client(session, clock)

    # WHEN an event with a live hint is sent
    answer = edge.deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))

    # THEN it is delivered from the plain URL, the same body, without a wait
    assert answer.status == 200
    assert [c.url for c in session.calls] == [
        "https://edge.adobedc.net/ee/or2/v2/interact",
        "https://edge.adobedc.net/ee/v2/interact",
    ]
    assert session.calls[0].data == session.calls[1].data
    assert clock.sleeps == []

    # AND for the next ten minutes that hint routes no call
    edge.deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))
    clock.advance(599)
    edge.deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))
    assert [c.url for c in session.calls[2:]] == ["https://edge.adobedc.net/ee/v2/interact"] * 2

    # AND another hint is tried on its own (one caller's odd cluster entry cannot pause everyone's routing)
    edge.deliver(DATASTREAM, REQUEST, "va6", Deadline(clock, 10))
    assert [c.url for c in session.calls[4:]] == [
        "https://edge.adobedc.net/ee/va6/v2/interact",
        "https://edge.adobedc.net/ee/v2/interact",
    ]

    # AND after the ten minutes the first hint is tried again (and paused again if refused again)
    clock.advance(2)
    edge.deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))
    assert [c.url for c in session.calls[6:]] == [
        "https://edge.adobedc.net/ee/or2/v2/interact",
        "https://edge.adobedc.net/ee/v2/interact",
    ]


def test_three_different_hints_refused_pause_every_hint_and_keep_no_table() -> None:
    # GIVEN a host that answers 404 on every hinted path
    clock = FakeClock()
    not_found = make_response(404, {"type": "https://ns.adobe.com/aep/errors/EXEG-0404-404", "status": 404})
    session = FakeSession([not_found, ok(), not_found, ok(), not_found, ok()] + [ok()] * 51)
    edge = client(session, clock)

    # WHEN three different hints are refused, then fifty more events come with made-up hints
    for hint in ("or2", "va6", "irl1"):
        edge.deliver(DATASTREAM, REQUEST, hint, Deadline(clock, 10))
    for n in range(50):
        edge.deliver(DATASTREAM, REQUEST, f"zz{n}", Deadline(clock, 10))

    # THEN each of those goes to the plain URL in one call, and the client remembers one pause, not fifty
    assert len(session.calls) == 6 + 50
    assert {c.url for c in session.calls[6:]} == {"https://edge.adobedc.net/ee/v2/interact"}
    assert len(edge._hints_refused) == 1

    # AND after the pause, hints route again
    clock.advance(601)
    edge.deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))
    assert session.calls[-1].url == "https://edge.adobedc.net/ee/or2/v2/interact"


def test_a_late_404_from_a_call_in_flight_keeps_every_hint_paused() -> None:
    # GIVEN every hint paused (three different ones refused)
    clock = FakeClock()
    edge = client(FakeSession([ok()] * 3), clock)
    for hint in ("or2", "va6", "irl1"):
        edge._refuse_hint(hint)

    # WHEN a hinted call that was already in flight on another worker comes back 404 too
    edge._refuse_hint("jpn3")

    # THEN every hint stays paused: the next events go to the plain URL, whatever their hint
    for hint in ("or2", "aus3", "jpn3"):
        edge.deliver(DATASTREAM, REQUEST, hint, Deadline(clock, 10))
    assert {c.url for c in edge._session.calls} == {"https://edge.adobedc.net/ee/v2/interact"}  # type: ignore[attr-defined]


def test_hints_refused_at_once_by_many_workers_are_all_counted() -> None:
    # GIVEN many workers whose hinted calls come back 404 at the same moment, three different hints among them
    clock = FakeClock()
    edge = client(FakeSession([]), clock)
    start = threading.Barrier(24)

    def refuse(hint: str) -> None:
        start.wait()
        for _ in range(200):
            edge._refuse_hint(hint)

    # WHEN they all refuse their hints
    threads = [threading.Thread(target=refuse, args=(("or2", "va6", "irl1")[n % 3],)) for n in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # THEN the three different hints paused them all (none of the refusals was lost to another's replacement)
    assert list(edge._hints_refused) == [""]


def test_a_404_on_the_plain_url_is_a_rejection() -> None:
    # GIVEN a 404 where no hint was used
    clock = FakeClock()
    session = FakeSession([make_response(404, {"type": "x", "status": 404}), ok()])

    # WHEN / THEN it is Edge's answer about this event: refused, one call
    with pytest.raises(EdgeRejected) as exc:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))
    assert exc.value.status == 404
    assert len(session.calls) == 1


def test_hint_routing_turned_off_sends_every_call_to_the_plain_url() -> None:
    # GIVEN EDGE_HINT_URL_TEMPLATE=none
    clock = FakeClock()
    session = FakeSession([ok()])

    # WHEN an event with a live hint is sent
    client(session, clock, EDGE_HINT_URL_TEMPLATE="none").deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))

    # THEN
    assert session.calls[0].url == "https://edge.adobedc.net/ee/v2/interact"


def test_deliver_sends_ims_headers_when_tokens_are_set():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([ok()])
    tokens = FakeTokenProvider()

    # WHEN
    client(session, clock, tokens=tokens).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN
    assert session.calls[0].headers == {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Authorization": "Bearer token-1",
        "x-api-key": CREDS.client_id,
        "x-gw-ims-org-id": CREDS.org_id,
    }
    assert tokens.refreshes == []


def test_deliver_uses_a_fresh_request_id_each_attempt_and_the_same_body():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([retryable(503), retryable(502), ok()])

    # WHEN
    answer = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN
    assert answer.attempts == 3
    request_ids = [c.params["requestId"] for c in session.calls if c.params]
    assert len(set(request_ids)) == 3
    assert [c.params["datastreamId"] for c in session.calls if c.params] == ["ds-1", "ds-1", "ds-1"]
    assert len({c.data for c in session.calls}) == 1


# -- not retried ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (500, "EXEG-0001-500"),
        (400, "EXEG-0003-400"),
        (404, "EXEG-0000-404"),
        (413, "EXEG-0112-413"),
        (422, "EXEG-0104-422"),
        (403, "EXEG-0400-403"),  # e.g. a geo restriction: retrying cannot help
    ],
)
def test_deliver_raises_edge_rejected_after_one_call(status, code):
    # GIVEN
    clock = FakeClock()
    session = FakeSession([edge_problem(status, code, title="Nope", detail="because")])

    # WHEN
    with pytest.raises(EdgeRejected) as info:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN
    assert len(session.calls) == 1
    assert clock.sleeps == []
    assert info.value.status == status
    assert info.value.problem == {
        "type": f"https://ns.adobe.com/aep/errors/{code}",
        "status": status,
        "title": "Nope",
        "detail": "because",
        "report": {"requestId": f"req-{code}"},
    }


def test_deliver_wraps_a_non_json_gateway_error():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([make_response(500, text="<html>upstream broke</html>", reason="Internal Server Error")])

    # WHEN
    with pytest.raises(EdgeRejected) as info:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN
    assert info.value.problem == {
        "type": "about:blank",
        "status": 500,
        "title": "Internal Server Error",
        "detail": "<html>upstream broke</html>",
    }


@pytest.mark.parametrize("as_json", [False, True])
def test_a_problem_that_echoes_the_request_headers_keeps_no_credential(as_json: bool) -> None:
    # GIVEN a host (a wrong EDGE_BASE_URL, a proxy's error page) that answers 404 with the request's headers in it
    clock = FakeClock()
    echo = f"no route. headers: Authorization: Bearer token-1; x-api-key: {CREDS.client_id}"
    answer = (
        make_response(404, {"type": "t", "title": echo, "detail": echo, "report": {"seen": [echo]}})
        if as_json
        else make_response(404, text=echo, reason="Not Found")
    )
    session = FakeSession([answer])

    # WHEN an event is sent with an IMS token
    with pytest.raises(EdgeRejected) as info:
        client(session, clock, tokens=FakeTokenProvider()).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN the problem (stored, and answered to a webhook sender) has neither the token nor the API key
    text = json.dumps(info.value.problem)
    assert "token-1" not in text and CREDS.client_id not in text
    assert "Bearer [redacted]; x-api-key: [redacted]" in text


def test_a_long_token_echoed_across_the_detail_cut_leaves_no_part_of_itself() -> None:
    # GIVEN an error page echoing a real-length token (1,180 characters) that starts before the 300-character cut
    token = "eyJhbGciOiJSUzI1NiJ9." + "Q" * 1160
    page = "<html>404 no route. Authorization: Bearer " + token + "</html>"
    answer = make_response(404, text=page, reason="Not Found " + token)

    # WHEN the problem is built with the token to cut out
    problem = problem_from(answer, (token, "client-1"))

    # THEN no run of the token is left, in the detail or the title, and a JSON report's keys are cleaned too
    text = json.dumps(problem)
    assert "QQQQ" not in text and "eyJhbGci" not in text
    assert problem["detail"] == "<html>404 no route. Authorization: Bearer [redacted]</html>"
    keyed = make_response(404, {"type": "t", "title": "T", "report": {"headers": {"Bearer " + token: "client-1"}}})
    assert json.dumps(problem_from(keyed, (token, "client-1"))).count("[redacted]") == 2
    assert "QQQQ" not in json.dumps(problem_from(keyed, (token, "client-1")))


def test_a_long_token_echoed_across_the_cut_of_a_json_problems_type_and_title_leaves_no_part_of_itself() -> None:
    # GIVEN a JSON problem whose type and title echo the token, starting before their 1,000-character cut
    token = "eyJhbGciOiJSUzI1NiJ9." + "Q" * 1160
    echoed = "x" * 900 + " Authorization: Bearer " + token
    answer = make_response(404, {"type": echoed, "title": echoed, "detail": "d"})

    # WHEN the problem is built with the token to cut out
    problem = problem_from(answer, (token, "client-1"))

    # THEN no run of the token is left (it was cut at 1,000 characters before it was redacted)
    text = json.dumps(problem)
    assert "QQQQ" not in text and "eyJhbGci" not in text
    assert problem["title"] == "x" * 900 + " Authorization: Bearer [redacted]"


def test_a_problem_that_is_not_strict_json_is_kept_as_text_that_stays_valid_json():
    # GIVEN an error answer that Python's parser would read, with a NaN in it
    answer = make_response(400, text='{"type": "t", "title": "T", "report": {"score": NaN}}')

    # WHEN / THEN: kept as a problem around its text, which writes out as strict JSON
    problem = problem_from(answer)
    assert (problem["type"], problem["status"]) == ("about:blank", 400)
    assert "NaN" in problem["detail"]
    json.dumps(problem, allow_nan=False)  # raises on a NaN value


def test_problem_from_truncates_detail_and_drops_unknown_fields():
    # GIVEN
    long_text = make_response(502, text="x" * 1000, reason="")
    extra = make_response(400, {"type": "t", "title": "T", "secret": "s", "status": 400})

    # WHEN / THEN
    assert problem_from(long_text) == {"type": "about:blank", "status": 502, "title": "HTTP 502", "detail": "x" * 300}
    assert problem_from(extra) == {"type": "t", "title": "T", "status": 400}


@pytest.mark.parametrize("said", [None, "500", True, 400])
def test_problem_from_takes_the_http_status_whatever_the_body_says(said):
    # GIVEN a 500 whose problem body has no usable status, or a different one (a gateway's body)
    body = {"type": "t", "title": "T"} | ({} if said is None else {"status": said})

    # WHEN / THEN: the stored problem says 500, so the webhook answers 502 (Edge failed), not 422
    assert problem_from(make_response(500, body))["status"] == 500
    # AND the other way round: a 400 is a rejection (422) even if its body claims a 500
    assert problem_from(make_response(400, body | {"status": 500}))["status"] == 400


# -- retried -------------------------------------------------------------------------------------------------------


def test_deliver_429_waits_retry_after_seconds_then_succeeds():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([retryable(429, "2"), ok()])

    # WHEN
    answer = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN
    assert answer.attempts == 2
    assert clock.sleeps == [2.0]


def test_deliver_honours_an_http_date_retry_after():
    # GIVEN a Retry-After 3 s after the fake wall clock
    clock = FakeClock()
    session = FakeSession([retryable(503, formatdate(clock.now() + 3, usegmt=True)), ok()])

    # WHEN
    answer = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN
    assert answer.attempts == 2
    assert clock.sleeps == [3.0]


@pytest.mark.parametrize(
    "failure",
    [
        retryable(502),
        retryable(503),
        retryable(504),
        retryable(408),
        requests.Timeout("read timed out"),
        requests.ConnectionError("refused"),
        # A refusal (or any answer but a 2xx) whose body could not be read: what Edge said is unknown, so it is asked
        # again, as after a dropped connection
        broken_body_response(400, ProtocolError("connection closed in the middle of the body")),
        broken_body_response(422, DecodeError("bad gzip")),
    ],
    ids=["502", "503", "504", "408", "timeout", "connection", "refusal-cut-off", "refusal-undecodable"],
)
def test_deliver_retries_recoverable_failures_with_backoff(failure):
    # GIVEN two failures then success
    clock = FakeClock()
    session = FakeSession([failure, failure, ok()])

    # WHEN
    answer = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN backoff waits are within the jitter bounds of attempts 1 and 2
    assert answer.attempts == 3
    assert len(session.calls) == 3
    assert len(clock.sleeps) == 2
    assert 0.1 <= clock.sleeps[0] <= 0.2
    assert 0.2 <= clock.sleeps[1] <= 0.4


def test_deliver_gives_up_after_edge_max_attempts():
    # GIVEN Edge stays unavailable
    clock = FakeClock()
    session = FakeSession([retryable(503)] * 10)

    # WHEN
    with pytest.raises(EdgeUnavailable) as info:
        client(session, clock, EDGE_MAX_ATTEMPTS="3").deliver(DATASTREAM, REQUEST, None, Deadline(clock, 60))

    # THEN
    assert len(session.calls) == 3
    assert len(clock.sleeps) == 2
    assert info.value.attempts == 3
    assert info.value.reason == "edge answered 503 https://ns.adobe.com/aep/errors/EXEG-0000-503"
    assert info.value.retry_after is None


def test_deliver_gives_up_after_max_attempts_of_timeouts():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([requests.Timeout()] * 5)

    # WHEN
    with pytest.raises(EdgeUnavailable) as info:
        client(session, clock, EDGE_MAX_ATTEMPTS="2").deliver(DATASTREAM, REQUEST, None, Deadline(clock, 60))

    # THEN
    assert len(session.calls) == 2
    assert (info.value.reason, info.value.attempts) == ("edge call failed: Timeout", 2)


# -- an outage: once a call fails through all its attempts, later ones are tried once until Edge answers -------------

OUTAGES: dict[str, Callable[[], requests.Response | BaseException]] = {
    "503": lambda: retryable(503),
    "503 with Retry-After": lambda: retryable(503, "1"),
    "502": lambda: retryable(502),
    "504": lambda: retryable(504),
    "408": lambda: retryable(408),
    "timeout": requests.Timeout,
    "refused": requests.ConnectionError,
}


def deliveries(edge: EdgeClient, session: FakeSession, clock: FakeClock, *scripts: list[Any]) -> list[int | str]:
    """Each script's delivery in turn: its answer's status, or "unavailable", with the calls it made."""
    seen: list[int | str] = []
    for script in scripts:
        session.script.extend(Scripted(s) for s in script)
        before = len(session.calls)
        try:
            seen.append(edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30)).status)
        except EdgeUnavailable:
            seen.append("unavailable")
        except EdgeRejected as exc:
            seen.append(exc.status)
        seen.append(len(session.calls) - before)
        session.script.clear()
    return seen


class AnotherCallWhileWaiting(FakeClock):
    """A clock whose first wait lets another event's delivery run meanwhile (as another worker thread would)."""

    def __init__(self) -> None:
        super().__init__()
        self.meanwhile: Callable[[], Any] | None = None

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        run, self.meanwhile = self.meanwhile, None
        if run is not None:
            run()


@pytest.mark.parametrize("outage", OUTAGES)
def test_once_a_call_fails_all_its_attempts_for_want_of_edge_later_calls_are_tried_once_until_edge_answers(
    outage, caplog
):
    # GIVEN an event that failed all its 5 attempts because Edge is not there
    clock, session = FakeClock(), FakeSession()
    edge = client(session, clock)
    fail = OUTAGES[outage]
    assert deliveries(edge, session, clock, [fail() for _ in range(5)]) == ["unavailable", 5]
    assert sum("edge looks unavailable" in r.getMessage() for r in caplog.records) == 1

    # WHEN later events are sent (Edge fails once more, then answers; then fails once, then answers)
    sleeps = len(clock.sleeps)
    seen = deliveries(edge, session, clock, [fail(), ok()], [ok()], [fail(), ok()])

    # THEN the next one is tried once, without a wait, and handed back; one that Edge answers ends the outage: the
    # one after it is retried as usual
    assert seen == ["unavailable", 1, 200, 1, 200, 2]
    assert len(clock.sleeps) == sleeps + 1
    assert sum("edge looks unavailable" in r.getMessage() for r in caplog.records) == 1  # said once, when it began
    assert any("edge answers again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "answer",
    [
        lambda: ok(),
        lambda: make_response(204, None),
        lambda: edge_problem(400, "EXEG-0104-400"),
        lambda: edge_problem(500, "EXEG-0001-500"),
        lambda: retryable(429, "1"),  # Edge answering, if only to say "later"
    ],
    ids=["200", "204", "400", "500", "429"],
)
def test_any_answer_from_edge_but_an_outage_status_ends_the_outage(answer):
    # GIVEN Edge looked down (a call failed all its attempts), then answered a call
    clock, session = FakeClock(), FakeSession()
    edge = client(session, clock)
    deliveries(edge, session, clock, [retryable(503)] * 5, [answer(), ok()])
    assert not edge.is_down()

    # WHEN the next call meets a 503
    seen = deliveries(edge, session, clock, [retryable(503), ok()])

    # THEN it is retried as usual
    assert seen == [200, 2]


def test_one_event_that_edge_keeps_failing_while_it_answers_others_is_not_an_outage():
    # GIVEN an event Edge answers 503 five times while it delivers another event between its attempts
    clock = AnotherCallWhileWaiting()
    session = FakeSession([retryable(503), ok(), *[retryable(503)] * 4])
    edge = client(session, clock)
    other: list[int] = []
    clock.meanwhile = lambda: other.append(edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30)).status)
    with pytest.raises(EdgeUnavailable) as info:
        edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))
    assert (info.value.attempts, other) == (5, [200])

    # WHEN the next event meets a 503
    seen = deliveries(edge, session, clock, [retryable(503), ok()])

    # THEN it is retried as usual: Edge is there, only that event fails
    assert (edge.is_down(), seen) == (False, [200, 2])


@pytest.mark.parametrize(
    ("first", "hint", "tokens"),
    [
        pytest.param(edge_problem(401, "EXEG-0503-401"), None, True, id="a 401 (expired token, refreshed)"),
        pytest.param(
            make_response(404, {"type": "https://ns.adobe.com/aep/errors/EXEG-0404-404", "status": 404}),
            "or2",
            False,
            id="a 404 on the hinted URL (sent to the plain one)",
        ),
    ],
)
def test_an_answer_that_sends_a_gated_call_again_at_once_ends_the_outage_for_it(first, hint, tokens, caplog):
    # GIVEN Edge looked down when a call started
    clock, session = FakeClock(), FakeSession()
    edge = client(session, clock, tokens=FakeTokenProvider() if tokens else None)
    deliveries(edge, session, clock, [retryable(503)] * 5)

    # WHEN Edge answers it with a 401 (token expired) or a 404 on the hinted URL, then a 503, then accepts it
    session.script.extend(Scripted(r) for r in [first, retryable(503), ok()])
    answer = edge.deliver(DATASTREAM, REQUEST, hint, Deadline(clock, 30))

    # THEN that answer ended the outage (said at INFO; it began at WARNING): the 503 after it was retried as usual
    assert (answer.attempts, edge.is_down()) == (3, False)
    said = {r.getMessage().split(":")[0]: r.levelname for r in caplog.records}
    assert (said["edge looks unavailable"], said["edge answers again"]) == ("WARNING", "INFO")


def test_the_outage_is_forgotten_five_minutes_after_the_last_call_that_gave_up(caplog):
    # GIVEN Edge looked down, and a call tried once 250 s later failed too
    clock, session = FakeClock(), FakeSession()
    edge = client(session, clock)
    deliveries(edge, session, clock, [retryable(503)] * 5)
    clock.advance(250)
    assert deliveries(edge, session, clock, [retryable(503), ok()]) == ["unavailable", 1]

    # WHEN calls come 299 s after that last failure (a record back after the queue's 180 s would), then 300 s after it
    clock.advance(299)
    still = deliveries(edge, session, clock, [retryable(503), ok()])
    clock.advance(300)
    later = deliveries(edge, session, clock, [retryable(503), ok()])

    # THEN the first is still tried once (the failure 250 s in renewed the outage); the next is retried as usual, and
    # its answer is not taken for the end of an outage already forgotten
    assert (still, later) == (["unavailable", 1], [200, 2])
    assert not any("edge answers again" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("moved", ["wall", "monotonic"])
def test_the_outage_is_forgotten_once_either_clock_says_five_minutes_passed(moved: str) -> None:
    # GIVEN Edge looked down
    clock, session = FakeClock(), FakeSession()
    edge = client(session, clock)
    deliveries(edge, session, clock, [retryable(503)] * 5)
    assert edge.is_down()

    # WHEN 300 s pass by one clock only (the wall clock of an environment Lambda froze between invocations, whose
    # monotonic clock may not have moved; or the monotonic clock, the wall clock stepped back)
    if moved == "wall":
        clock._wall += 300
    else:
        clock._mono += 300

    # THEN the outage is forgotten: the next call is retried as usual
    assert not edge.is_down()
    assert deliveries(edge, session, clock, [retryable(503), ok()]) == [200, 2]


def test_a_call_already_retrying_when_edge_starts_to_look_down_keeps_its_retries():
    # GIVEN an event whose first attempt met a 503; while it waits to retry, another event fails all its attempts with
    # no answer from Edge meanwhile
    clock = AnotherCallWhileWaiting()
    session = FakeSession([retryable(503), *[retryable(503)] * 5, retryable(503), ok()])
    edge = client(session, clock)
    other: list[EdgeUnavailable] = []

    def meanwhile() -> None:
        with pytest.raises(EdgeUnavailable) as info:
            edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))
        other.append(info.value)
        assert edge.is_down()  # while the first event waits to retry

    clock.meanwhile = meanwhile

    # WHEN the first event's retry comes
    answer = edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN it was made, failed, and the next one too, which got through (the blip ended): Edge looked down in between,
    # and no longer does
    assert ([e.attempts for e in other], answer.attempts, edge.is_down()) == ([5], 3, False)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(([retryable(429, "0")] * 5, 30), id="five 429s: Edge throttles, it is there"),
        pytest.param(([retryable(503)], 0.1), id="one 503 and no time for another attempt"),
    ],
)
def test_a_call_that_gives_up_otherwise_does_not_make_edge_look_down(first):
    # GIVEN a call that gave up after 429s only, or for want of time after one 503
    script, seconds = first
    clock, session = FakeClock(), FakeSession(list(script))
    edge = client(session, clock)
    with pytest.raises(EdgeUnavailable):
        edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, seconds))

    # WHEN the next call meets a 503
    seen = deliveries(edge, session, clock, [retryable(503), ok()])

    # THEN it is retried as usual
    assert (edge.is_down(), seen) == (False, [200, 2])


class Slots:
    """Edge slots that are free for the first `free` attempts, and then never again before the deadline."""

    def __init__(self, free: int) -> None:
        self.free = free

    def acquire(self, timeout: float | None = None) -> bool:
        self.free -= 1
        return self.free >= 0

    def release(self) -> None:
        pass


@pytest.mark.parametrize(("attempts", "looks_down"), [(2, True), (1, False)])
def test_a_call_that_finds_no_edge_slot_after_unanswered_retries_makes_edge_look_down(attempts, looks_down):
    # GIVEN an event whose attempts Edge leaves unanswered (503) until no Edge slot frees up before its deadline
    clock, session = FakeClock(), FakeSession([retryable(503)] * 5)
    edge = EdgeClient(session, settings(), None, clock, random.Random(42), slots=Slots(attempts))  # type: ignore[arg-type]

    # WHEN it gives up
    with pytest.raises(EdgeUnavailable) as info:
        edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN Edge looks down after a retry that Edge left unanswered, not after a single attempt
    assert (info.value.attempts, edge.is_down()) == (attempts, looks_down)


class AnsweredMeanwhile(FakeSession):
    """A session whose next call lets another event's delivery run first (as another worker thread would)."""

    meanwhile: Callable[[], Any] | None = None

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        run, self.meanwhile = self.meanwhile, None
        if run is not None:
            run()
        return super().send(request, **kwargs)


def test_a_call_that_started_while_edge_looked_down_retries_if_edge_answered_another_meanwhile():
    # GIVEN Edge looked down when an event's call started, and answered another event's call while it was made
    session = AnsweredMeanwhile()
    clock = FakeClock()
    edge = client(session, clock)
    deliveries(edge, session, clock, [retryable(503)] * 5)
    session.script.extend(Scripted(s) for s in [ok(), retryable(503), ok()])
    other: list[int] = []
    session.meanwhile = lambda: other.append(edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30)).status)

    # WHEN that event's call meets a 503
    answer = edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN it is retried as usual: the outage ended while it was made
    assert (other, answer.attempts) == ([200], 2)


def test_a_call_whose_retries_run_out_of_time_before_its_attempts_makes_edge_look_down():
    # GIVEN a webhook's budget (4 s): Edge answers 503 with `Retry-After: 1` to each of 4 attempts, then time is up
    clock, session = FakeClock(), FakeSession([retryable(503, "1")] * 4)
    edge = client(session, clock)
    with pytest.raises(EdgeUnavailable) as info:
        edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 4))
    assert info.value.attempts == 4

    # WHEN the next event meets a 503
    seen = deliveries(edge, session, clock, [retryable(503), ok()])

    # THEN it is tried once: Edge answered nothing for as long as that event's retries lasted
    assert (edge.is_down(), seen) == (True, ["unavailable", 1])


OUTCOMES: dict[str, Callable[[], requests.Response | BaseException]] = {
    "200": lambda: ok(),
    "400": lambda: edge_problem(400, "EXEG-0104-400"),
    "500": lambda: edge_problem(500, "EXEG-0001-500"),
    "429": lambda: retryable(429, "1"),
    "503": lambda: retryable(503, "1"),
    "503, no Retry-After": lambda: retryable(503),
    "timeout": requests.Timeout,
}
NOT_THERE = {"503", "503, no Retry-After", "timeout"}  # the rest are answers
FINAL = {"200", "400", "500"}  # answers that end a call


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.sampled_from([0.0, 1.0, 100.0, 299.0, 301.0]),  # seconds since the previous call ended
            st.lists(st.sampled_from(sorted(OUTCOMES)), min_size=5, max_size=5),  # what Edge does to each attempt
        ),
        min_size=1,
        max_size=12,
    )
)
def test_calls_one_after_another_follow_the_outage_rule(calls):
    """A model of the rule, checked on any sequence of calls (one at a time: no other call answers meanwhile): Edge
    looks down after a call failed its 5 attempts for want of Edge, until an answer or 300 s after the last failure;
    a call that starts while it does makes one attempt if that fails for want of Edge; any other call is retried as
    before the rule (until an answer that ends it, or 5 attempts)."""
    clock, session = FakeClock(), FakeSession()
    edge = client(session, clock)
    down_at: float | None = None  # the model: when a call last gave up with Edge looking down
    for gap, outcomes in calls:
        clock.advance(gap)
        looked_down = down_at is not None and clock.monotonic() - down_at < 300
        assert edge.is_down() == looked_down

        session.script = [Scripted(OUTCOMES[o]()) for o in outcomes]
        try:
            edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))
        except (EdgeUnavailable, EdgeRejected):
            pass
        made = 5 - len(session.script)
        seen = outcomes[:made]

        if looked_down and outcomes[0] in NOT_THERE:
            assert made == 1  # no retry
        else:
            ends = [n + 1 for n, o in enumerate(outcomes) if o in FINAL]
            assert made == min(ends[0] if ends else 5, 5)  # retried as before the rule
        if any(o not in NOT_THERE for o in seen):
            down_at = None  # Edge answered
        elif looked_down or made == 5:
            down_at = clock.monotonic()  # it gave up for want of Edge: Edge looks down (again) from now
        assert edge.is_down() == (down_at is not None)


def test_deliver_retry_after_beyond_the_deadline_raises_without_sleeping():
    # GIVEN a 429 asking for 30 s with 10 s left
    clock = FakeClock()
    session = FakeSession([retryable(429, "30"), ok()])

    # WHEN
    with pytest.raises(EdgeUnavailable) as info:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN
    assert len(session.calls) == 1
    assert clock.sleeps == []
    assert (info.value.retry_after, info.value.attempts) == (30.0, 1)


def test_deliver_does_not_sleep_into_a_retry_it_would_have_no_time_to_make():
    # GIVEN a 429 asking for 10 s with 10.02 s left: the wait fits, an attempt after it (at least 50 ms) does not
    clock = FakeClock()
    session = FakeSession([retryable(429, "10"), ok()])

    # WHEN
    with pytest.raises(EdgeUnavailable) as info:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10.02))

    # THEN it gives up at once (the record is retried later, as Edge asked) rather than sleep the time away
    assert len(session.calls) == 1
    assert clock.sleeps == []
    assert (info.value.retry_after, info.value.attempts) == (10.0, 1)


def test_deliver_with_no_time_left_makes_no_call():
    # GIVEN an exhausted deadline
    clock = FakeClock()
    session = FakeSession([ok()])

    # WHEN
    with pytest.raises(EdgeUnavailable) as info:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 0.01))

    # THEN
    assert session.calls == []
    assert (info.value.reason, info.value.attempts) == ("no time left for an attempt", 0)


def test_deliver_never_waits_or_calls_past_the_deadline():
    # GIVEN slow calls, timeouts that use their whole read timeout, and Retry-After waits, within 12 s
    clock = FakeClock()
    deadline = Deadline(clock, 12)
    start = clock.monotonic()
    session = FakeSession(
        [
            Scripted(retryable(503, "1"), elapsed=0.5),
            Scripted(requests.Timeout(), elapsed=None),
            Scripted(retryable(429, "2"), elapsed=0.4),
            Scripted(requests.Timeout(), elapsed=None),
            Scripted(retryable(502), elapsed=0.2),
            Scripted(ok(), elapsed=0.1),
        ],
        clock=clock,
        deadline=deadline,
    )

    # WHEN
    with pytest.raises(EdgeUnavailable):
        client(session, clock, EDGE_MAX_ATTEMPTS="10").deliver(DATASTREAM, REQUEST, None, deadline)

    # THEN each call's timeouts fit in what was left, and waits plus calls stay within the deadline
    for call in session.calls:
        assert call.remaining is not None
        connect, read = call.timeout
        assert connect <= call.remaining
        assert read <= call.remaining
    assert sum(clock.sleeps) + sum(session.elapsed) <= 12.0 + 1e-9
    assert clock.monotonic() - start <= 12.0 + 1e-9


def test_deliver_connect_plus_read_timeout_fits_in_the_remaining_time():
    # GIVEN the default webhook deadline of 5 s and default timeouts (3.05 s connect, 5 s read)
    clock = FakeClock()
    deadline = Deadline(clock, 5.0)
    session = FakeSession([ok()], clock=clock, deadline=deadline)

    # WHEN
    client(session, clock).deliver(DATASTREAM, REQUEST, None, deadline)

    # THEN the worst case of the one call (connect, then read) ends by the deadline
    connect, read = session.calls[0].timeout
    assert connect + read <= 5.0


def test_deliver_later_attempts_get_shorter_timeouts():
    # GIVEN 20 s at first, then 4 s left after a slow first failure and its 1 s Retry-After
    clock = FakeClock()
    deadline = Deadline(clock, 20.0)
    session = FakeSession(
        [Scripted(retryable(503, "1"), elapsed=15.0), Scripted(ok(), elapsed=0.1)], clock=clock, deadline=deadline
    )

    # WHEN
    client(session, clock).deliver(DATASTREAM, REQUEST, None, deadline)

    # THEN the first call gets the configured timeouts, the second only what is left
    assert session.calls[0].timeout == (3.05, 5.0)
    assert session.calls[1].remaining == 4.0
    connect, read = session.calls[1].timeout
    assert connect <= 3.05
    assert read <= 4.0
    assert clock.sleeps == [1.0]


# -- credentials ---------------------------------------------------------------------------------------------------


def test_deliver_expired_token_refreshes_once_and_retries():
    # GIVEN
    clock = FakeClock()
    tokens = FakeTokenProvider()
    session = FakeSession([edge_problem(401, "EXEG-0503-401"), ok()])

    # WHEN
    answer = client(session, clock, tokens=tokens).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN
    assert answer.attempts == 2
    assert tokens.refreshes == [
        {
            "force_refresh": True,
            "stale": AccessToken("token-1", WALL_START + 3600, CREDS.client_id, CREDS.org_id),
            "min_age_s": 0.0,  # an expired token is replaced whatever its age
        }
    ]
    assert [c.headers["Authorization"] for c in session.calls if c.headers] == ["Bearer token-1", "Bearer token-2"]
    assert clock.sleeps == []


def test_deliver_second_expired_token_is_not_refreshed_again():
    # GIVEN
    clock = FakeClock()
    tokens = FakeTokenProvider()
    session = FakeSession([edge_problem(401, "EXEG-0503-401"), edge_problem(401, "EXEG-0503-401"), ok()])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        client(session, clock, tokens=tokens).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN
    assert len(session.calls) == 2
    assert len(tokens.refreshes) == 1
    assert str(info.value) == "edge refused the credentials: https://ns.adobe.com/aep/errors/EXEG-0503-401"


@pytest.mark.parametrize("code", ["EXEG-0500-401", "EXEG-0502-401", "EXEG-0505-401"])
def test_deliver_a_refused_token_old_enough_is_replaced_once_and_the_call_retried(code):
    # GIVEN Edge refuses a cached token (revoked, or minted before the credential's product profile was fixed)
    clock = FakeClock()
    tokens = FakeTokenProvider()
    session = FakeSession([edge_problem(401, code), make_response(200, {"requestId": "r", "handle": []})])

    # WHEN
    answer = client(session, clock, tokens=tokens).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN a new token was fetched once (only if the refused one is a minute old) and the event delivered with it
    assert answer.status == 200
    assert [c.headers["Authorization"] for c in session.calls if c.headers] == ["Bearer token-1", "Bearer token-2"]
    assert [r["min_age_s"] for r in tokens.refreshes] == [60.0]


@pytest.mark.parametrize("code", ["EXEG-0500-401", "EXEG-0502-401", "EXEG-0505-401"])
def test_deliver_a_refused_fresh_token_is_a_credentials_error_without_asking_ims_again(code):
    # GIVEN Edge refuses a token minted moments ago (a new one would be refused too)
    clock = FakeClock()
    tokens = FakeTokenProvider()
    tokens.age_s = 10
    session = FakeSession([edge_problem(401, code)])

    # WHEN
    with pytest.raises(CredentialsError) as info:
        client(session, clock, tokens=tokens).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN one call, the same token kept, and the credentials problem named
    assert len(session.calls) == 1
    assert tokens.token.value == "token-1"
    assert str(info.value) == f"edge refused the credentials: https://ns.adobe.com/aep/errors/{code}"


def test_deliver_expired_token_without_ims_is_a_credentials_error():
    # GIVEN EDGE_AUTH=none (no token provider)
    clock = FakeClock()
    session = FakeSession([edge_problem(401, "EXEG-0503-401")])

    # WHEN / THEN
    with pytest.raises(CredentialsError):
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))
    assert len(session.calls) == 1


def test_deliver_token_refresh_then_recoverable_failures_still_capped():
    # GIVEN max 3 attempts: the refresh retry counts as one
    clock = FakeClock()
    tokens = FakeTokenProvider()
    session = FakeSession([edge_problem(401, "EXEG-0503-401")] + [retryable(503)] * 5)

    # WHEN
    with pytest.raises(EdgeUnavailable) as info:
        client(session, clock, tokens=tokens, EDGE_MAX_ATTEMPTS="3").deliver(
            DATASTREAM, REQUEST, None, Deadline(clock, 30)
        )

    # THEN
    assert len(session.calls) == 3
    assert info.value.attempts == 3
    assert len(tokens.refreshes) == 1


@pytest.mark.parametrize(
    "header",
    [
        b"\xb2".decode("latin-1"),  # one latin-1 byte that str.isdigit() accepts
        "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",  # a date the parser overflows on
        "0",  # nothing to wait for: backed off, not retried back to back (reference §3.4)
        "Tue, 14 Nov 2023 22:00:00 GMT",  # a date already past
    ],
    ids=["non-ascii-digit", "overflowing-date", "zero", "past-date"],
)
def test_deliver_unusable_retry_after_falls_back_to_backoff(header):
    # GIVEN a 503 whose Retry-After gives no wait the relay can use
    clock = FakeClock()
    session = FakeSession([retryable(503, header), ok()])

    # WHEN
    answer = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN
    assert answer.attempts == 2
    assert 0.1 <= clock.sleeps[0] <= 0.2


# -- calls in flight -------------------------------------------------------------------------------------------------


def test_each_attempt_holds_a_slot_only_while_it_posts():
    # GIVEN one slot, and Edge answering 503 then 200
    slots = threading.BoundedSemaphore(1)
    held: list[bool] = []
    free_while_sleeping: list[bool] = []

    class Observing(FakeClock):
        def sleep(self, seconds: float) -> None:
            taken = slots.acquire(blocking=False)  # free during the backoff: another event may use it
            free_while_sleeping.append(taken)
            if taken:
                slots.release()
            super().sleep(seconds)

    clock = Observing()

    class Observed(FakeSession):
        def post(self, url: str, **kwargs: Any) -> requests.Response:
            held.append(not slots.acquire(blocking=False))  # the slot is taken while the post runs
            return super().post(url, **kwargs)

    session = Observed([retryable(503), ok()])
    edge = EdgeClient(session, settings(), None, clock, random.Random(42), slots=slots)  # type: ignore[arg-type]

    # WHEN
    answer = edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))

    # THEN both attempts held the slot, it was free during the backoff sleep in between, and it was given back
    assert (answer.status, held) == (200, [True, True])
    assert len(clock.sleeps) == 1
    assert free_while_sleeping == [True]
    assert slots.acquire(blocking=False)


def test_slot_is_given_back_when_the_post_fails():
    clock = FakeClock()
    slots = threading.BoundedSemaphore(1)
    session = FakeSession([requests.ConnectionError("reset")], clock=clock)
    edge = EdgeClient(session, settings(EDGE_MAX_ATTEMPTS="1"), None, clock, slots=slots)  # type: ignore[arg-type]
    with pytest.raises(EdgeUnavailable):
        edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 10))
    assert slots.acquire(blocking=False)


def test_no_slot_before_the_deadline_is_a_retry_without_a_call():
    # GIVEN every slot taken by other calls, and 0.15 s left
    clock = FakeClock()
    slots = threading.BoundedSemaphore(1)
    slots.acquire()
    session = FakeSession([ok()])
    edge = EdgeClient(session, settings(), None, clock, slots=slots)  # type: ignore[arg-type]

    # WHEN / THEN: it waits at most the time left (less the minimum an attempt needs), then gives up unsent
    with pytest.raises(EdgeUnavailable) as info:
        edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 0.15))
    assert (info.value.reason, info.value.attempts) == ("no time left for an attempt", 0)
    assert session.calls == []


@pytest.mark.parametrize("status", [200, 207])
@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "<html>ok</html>",
        "[]",
        "null",
        '"ok"',
        "[" * 100_000 + "]" * 100_000,
        # Not JSON either, though Python's parser takes them: kept, they would be written out as `NaN`/`Infinity`
        # in the webhook's answer and the stored handle, which strict parsers (JavaScript's, jq) refuse
        '{"handle": [{"type": "personalization:decisions", "payload": [{"score": NaN}]}]}',
        '{"handle": [], "x": -Infinity}',
        '{"handle": [], "x": 1e999}',
    ],
)
def test_deliver_takes_a_200_or_207_whose_body_is_not_an_object_as_delivered_once(status, text):
    # GIVEN Edge accepted the event but its body cannot be read as an answer
    clock = FakeClock()
    session = FakeSession([make_response(status, text=text)])

    # WHEN
    answer = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN it is delivered (contract §6), without handles, and not sent again
    assert (answer.status, answer.body, answer.attempts, answer.unreadable) == (status, {}, 1, True)
    assert len(session.calls) == 1


@pytest.mark.parametrize("status", [200, 207])
@pytest.mark.parametrize(
    "error",
    [
        ProtocolError("Connection broken: IncompleteRead"),
        DecodeError("Received response with content-encoding: gzip, but failed to decode it."),
        ReadTimeoutError(None, "/ee/v2/interact", "Read timed out."),  # type: ignore[arg-type]
    ],
    ids=["cut-off", "undecodable", "stalled"],
)
def test_an_accepting_answer_whose_body_breaks_off_is_delivered_once_not_sent_again(status, error, caplog):
    # GIVEN Edge's 200 or 207 arrived, but its body broke off, could not be decoded, or stalled (as Adobe's SDKs do,
    # once a 2xx has arrived the event was taken: a second call would be a second hit in Analytics and the data lake)
    clock = FakeClock()
    answer = broken_body_response(status, error)
    session = FakeSession([answer, ok()])

    # WHEN
    got = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN it is delivered, without handles and said unreadable, after one call; the connection is closed, not reused;
    # and the warning names what happened to the body
    assert (got.status, got.body, got.attempts, got.unreadable) == (status, {}, 1, True)
    assert len(session.calls) == 1
    assert answer.raw.closed
    broken = {"cut-off": "ChunkedEncodingError", "undecodable": "ContentDecodingError", "stalled": "ReadTimeout"}
    assert any(
        f"its answer could not be read ({name})" in r.getMessage() for r in caplog.records for name in broken.values()
    )


def test_an_accepting_answer_larger_than_the_relay_reads_is_delivered_without_handles_and_not_read_whole():
    # GIVEN Edge accepts the event with an answer (valid JSON, handles and all) one byte over what the relay reads
    clock = FakeClock()
    head = json.dumps(OK_BODY)[:-1] + ', "pad": "'
    text = head + "x" * (MAX_ANSWER_BYTES - len(head) - 1) + '"}'
    assert len(text) == MAX_ANSWER_BYTES + 1
    answer = make_response(200, text=text)
    session = FakeSession([answer])

    # WHEN
    got = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN it is delivered once, without handles (as an unreadable answer: never sent again), and no more than the
    # limit was read: the rest is left on a connection that is closed, not reused
    assert (got.status, got.body, got.attempts, got.unreadable) == (200, {}, 1, True)
    assert len(session.calls) == 1
    assert len(answer.content) == MAX_ANSWER_BYTES
    assert answer.raw.closed


def test_an_answer_of_exactly_the_size_the_relay_reads_keeps_its_handles():
    # GIVEN an answer exactly as large as the relay reads
    clock = FakeClock()
    head = json.dumps(OK_BODY)[:-1] + ', "pad": "'
    text = head + "x" * (MAX_ANSWER_BYTES - len(head) - 2) + '"}'
    session = FakeSession([make_response(200, text=text)])

    # WHEN
    got = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN it is read whole, handles and all
    assert (got.unreadable, got.body["handle"]) == (False, OK_BODY["handle"])


def test_a_refusal_larger_than_the_relay_reads_is_kept_as_its_beginning() -> None:
    # GIVEN Edge (or a gateway in front of it) refuses the event with a body far over what the relay reads
    clock = FakeClock()
    refusal = make_response(400, text="<html>" + "x" * (2 * MAX_ANSWER_BYTES), reason="Bad Request")
    session = FakeSession([refusal])

    # WHEN
    with pytest.raises(EdgeRejected) as info:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN it is refused once, with a problem made of the body's first characters, and the rest is not read
    assert (info.value.status, info.value.problem["detail"]) == (400, ("<html>" + "x" * 294))
    assert len(session.calls) == 1
    assert len(refusal.content) == MAX_ANSWER_BYTES


def test_an_answer_with_a_byte_that_is_not_utf8_keeps_its_handles():
    # GIVEN Edge's answer has one byte that is not UTF-8 (Latin-1 "é"): requests then reads it in the encoding it
    # detects (or with U+FFFD), rather than refuse it
    clock = FakeClock()
    answer = make_response(
        200,
        content=b'{"requestId": "r-1", "handle": [{"type": "identity:result", "payload": [{"id": "caf\xe9"}]}]}',
    )
    answer.encoding = None
    session = FakeSession([answer])

    # WHEN
    got = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN its handles are kept, not the whole answer taken as unreadable
    assert not got.unreadable
    [handle] = got.body["handle"]
    assert handle["type"] == "identity:result" and handle["payload"][0]["id"].startswith("caf")


@pytest.mark.parametrize(
    ("status", "text", "body"),
    [
        (204, "", {}),
        (200, "", {}),
        (202, '{"requestId": "r-202"}', {"requestId": "r-202"}),
        (201, '{"requestId": "r-201", "handle": []}', {"requestId": "r-201", "handle": []}),
    ],
)
def test_deliver_takes_any_2xx_as_delivered_once(status: int, text: str, body: dict[str, Any]) -> None:
    # GIVEN Edge accepts the event with a 2xx other than 200/207, or with no content (Adobe's SDKs take every 2xx as
    # success, a 204 as success without content)
    clock = FakeClock()
    session = FakeSession([make_response(status, text=text)])

    # WHEN
    answer = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN it is delivered, once; an empty body is not an unreadable one
    assert (answer.status, answer.body, answer.attempts, answer.unreadable) == (status, body, 1, False)
    assert len(session.calls) == 1


def test_a_problem_nested_deeper_than_python_parses_is_still_a_rejection() -> None:
    # GIVEN Edge refuses the event with a body nested too deep to parse
    clock = FakeClock()
    session = FakeSession([make_response(400, text="[" * 100_000 + "]" * 100_000, reason="Bad Request")])

    # WHEN / THEN it is rejected with a generic problem (not an unexpected error, which would retry it)
    with pytest.raises(EdgeRejected) as info:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))
    assert (info.value.status, info.value.problem["title"]) == (400, "Bad Request")


def test_a_problem_too_deep_to_redact_is_still_a_rejection_without_credentials() -> None:
    # GIVEN IMS auth (the token and API key are cut out of problems) and a 4xx problem whose report parses but is
    # nested deeper than redaction goes
    clock = FakeClock()
    report: Any = "Bearer token-1 for " + CREDS.client_id
    for _ in range(900):
        report = {"r": report}
    session = FakeSession([make_response(400, {"type": "t", "title": "Bad", "report": report}, reason="Bad Request")])

    # WHEN / THEN it is rejected (not an unexpected error, which would retry it), with no credential in its problem
    with pytest.raises(EdgeRejected) as info:
        client(session, clock, tokens=FakeTokenProvider()).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))
    assert info.value.status == 400
    assert "token-1" not in json.dumps(info.value.problem) and CREDS.client_id not in json.dumps(info.value.problem)


def nested(depth: int) -> Any:
    doc: Any = "x"
    for _ in range(depth):
        doc = {"n": doc}
    return doc


@pytest.mark.parametrize(("depth", "kept"), [(100, True), (500, False)])
def test_an_answer_nested_deeper_than_it_could_be_kept_and_read_back_is_taken_as_unreadable(
    depth: int, kept: bool
) -> None:
    # GIVEN Edge accepts the event with a personalization payload nested `depth` levels deep
    clock = FakeClock()
    body = {"requestId": "r", "handle": [{"type": "personalization:decisions", "payload": [nested(depth)]}]}
    session = FakeSession([ok(200, body)])

    # WHEN
    answer = client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN a payload of sensible depth is kept; one past MAX_ANSWER_DEPTH is delivered without handles, as any answer
    # the relay cannot keep: stored, it would fail to be read back on a thread with less stack (a webhook's repeat)
    assert answer.status == 200 and answer.unreadable is not kept
    assert answer.body == (body if kept else {})


def test_a_problems_text_and_report_are_kept_to_what_can_be_stored_and_logged() -> None:
    # GIVEN Edge refuses the event with a problem whose type and title are 600 KB, its report nested 500 levels deep
    clock = FakeClock()
    problem = {"type": "t" * 600_000, "title": ["not", "text"], "detail": nested(500), "report": nested(500)}
    session = FakeSession([make_response(400, problem, reason="Bad Request")])

    # WHEN
    with pytest.raises(EdgeRejected) as info:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN the type is cut to MAX_PROBLEM_TEXT_CHARS, a title that is not text is null, the detail and report too deep
    # to keep are left empty
    cut: dict[str, Any] = {
        "type": "t" * MAX_PROBLEM_TEXT_CHARS,
        "title": None,
        "detail": None,
        "report": {},
        "status": 400,
    }
    assert info.value.problem == cut


@pytest.mark.parametrize("value", ["r" * 257, 10**200, 1e200, ["r"], None])
def test_only_a_requestid_that_is_short_text_is_kept(value: Any) -> None:
    assert request_id_of(value) is None
    assert request_id_of("6b2d0a83-f0e5-4c8e-9a26-1d2f8b0c7d11") == "6b2d0a83-f0e5-4c8e-9a26-1d2f8b0c7d11"


def test_deliver_never_follows_a_redirect():
    # GIVEN
    clock = FakeClock()
    session = FakeSession([make_response(307, text="", headers={"Location": "https://elsewhere.example/collect"})])

    # WHEN
    with pytest.raises(EdgeRejected) as info:
        client(session, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN the 3xx is refused like any non-recoverable status (the loopback test shows nothing reaches the target)
    assert info.value.status == 307
    assert [call.allow_redirects for call in session.calls] == [False]


def test_deliver_behind_a_proxy_uses_the_environments_ca_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN a proxy and a CA bundle in the environment (a TLS-inspecting egress proxy), and a transport that records
    from relay.runtime import new_http_session
    from requests.adapters import BaseAdapter

    for name in ("https_proxy", "http_proxy", "HTTP_PROXY", "NO_PROXY", "no_proxy", "CURL_CA_BUNDLE", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # the test's own environment only, whatever the machine's
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corp-proxy-ca.pem")
    seen: list[dict[str, Any]] = []

    class Recording(BaseAdapter):
        def send(self, request: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
            seen.append(kwargs)
            response = make_response(200, OK_BODY)
            response.request = request
            return response

        def close(self) -> None:
            pass

    session = new_http_session(4)
    session.mount("https://", Recording())
    clock = FakeClock()

    # WHEN
    EdgeClient(session, settings(), None, clock).deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN the Edge call verifies with that bundle, as `Session.request` would (the fix: `Session.send` alone would
    # verify with the default bundle); the proxy `send` resolves by itself, checked here only as context
    (kwargs,) = seen
    assert kwargs["verify"] == "/etc/ssl/corp-proxy-ca.pem"
    assert kwargs["proxies"].get("https") == "http://proxy.internal:3128"


@pytest.mark.parametrize(
    "failure", [requests.Timeout("read timed out"), requests.ConnectionError("refused")], ids=["timeout", "refused"]
)
def test_a_call_without_an_answer_counts_as_an_edge_call_and_as_unavailable(
    failure: Exception, emitted: Callable[[], dict[str, list[float]]]
) -> None:
    # GIVEN Edge unreachable: every attempt times out (or is refused)
    clock = FakeClock()
    session = FakeSession([failure] * 3)

    # WHEN an event is sent, 3 attempts at most
    with pytest.raises(EdgeUnavailable):
        client(session, clock, EDGE_MAX_ATTEMPTS="3").deliver(DATASTREAM, REQUEST, None, Deadline(clock, 30))

    # THEN each attempt is an Edge call (the rate alarms' denominator) and an unavailable one (their numerator): the
    # most common outage makes EdgeUnavailableRateAlarm fire instead of leaving it without data
    seen = emitted()
    assert len(seen["EdgeLatency"]) == 3
    assert seen["EdgeUnavailable"] == [1.0, 1.0, 1.0]


# -- http_body.py: a read timeout in the body is said as a timeout (M12) ---------------------------------------------


class _Stalling(requests.Response):
    """A response whose body delivers one chunk, then times out as urllib3 does mid-body."""

    def __init__(self) -> None:
        super().__init__()
        self.status_code = 200
        self.closed_by_reader = False
        self.request = requests.Request("POST", "https://edge.example/ee/v2/interact").prepare()

    def iter_content(self, chunk_size: Any = 1, decode_unicode: bool = False) -> Any:  # type: ignore[override]
        yield b'{"handle": ['
        raise requests.ConnectionError(ReadTimeoutError(None, "/ee/v2/interact", "Read timed out."))  # type: ignore[arg-type]

    def close(self) -> None:
        self.closed_by_reader = True


def test_a_body_that_stops_mid_way_is_a_read_timeout_and_its_connection_is_closed() -> None:
    from relay.integrations.http_body import read_at_most

    resp = _Stalling()

    # WHEN its body is read, THEN the timeout is a requests.ReadTimeout (a Timeout: IMS and Edge tell a wait their
    # caller's deadline cut short, NoTimeLeft, from a peer that is down), not a ConnectionError, and the connection,
    # with the rest of the answer still on it, is not reused
    with pytest.raises(requests.ReadTimeout):
        read_at_most(resp, 1024)
    assert resp.closed_by_reader


@pytest.mark.parametrize(
    "stall",
    [
        # headers 1.5 s into a 2 s budget (within the read timeout the attempt started with: 1.9 s), then nothing
        # more of the body: without the cut, a whole read timeout after the headers (3.4 s)
        {"after_s": 1.5},
        # headers at once, 70,000 bytes of a 200,000-byte body at 1.5 s (more than one 64 KiB read), then nothing
        # more: without the cut between chunks, a whole read timeout after the first chunk (3.4 s)
        {"after_s": 0.0, "body": b"{" + b" " * 69_999, "body_after_s": 1.5, "length": 200_000},
    ],
    ids=["late-headers", "after-the-first-chunk"],
)
@pytest.mark.parametrize("status", [200, 503])
def test_a_body_that_stalls_is_given_up_at_the_deadline(stall: dict[str, Any], status: int) -> None:
    # GIVEN Edge on a loopback socket whose answer's body stalls (a 200: the event was taken; or a 503)
    import time

    from relay.clock import SystemClock
    from relay.runtime import new_http_session

    from tests.fakes import headers_then_stall

    clock = SystemClock()
    with headers_then_stall(**stall, status=b"200 OK" if status == 200 else b"503 Service Unavailable") as port:
        edge = EdgeClient(
            new_http_session(2),
            settings(EDGE_BASE_URL=f"http://127.0.0.1:{port}", EDGE_MAX_ATTEMPTS="1", EDGE_CONNECT_TIMEOUT_MS="100"),
            None,
            clock,
            random.Random(1),
        )

        # WHEN the event is sent
        started = time.monotonic()
        if status == 200:
            answer = edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 2.0))
        else:
            with pytest.raises(EdgeUnavailable):
                edge.deliver(DATASTREAM, REQUEST, None, Deadline(clock, 2.0))
        elapsed = time.monotonic() - started

    # THEN the wait for the body ends with the budget (about 2 s): a batch's last attempt would otherwise run past
    # the Lambda timeout, and the whole batch be sent again. A 200 is delivered, its answer unread; a 503 is retried
    # later
    assert elapsed < 2.7, elapsed
    if status == 200:
        assert (answer.status, answer.body, answer.unreadable) == (200, {}, True)


def test_a_hint_pause_ends_after_ten_minutes_of_either_clock() -> None:
    # GIVEN a hinted URL that answered 404 once (a host that supports hints, on a bad moment)
    clock = FakeClock()
    not_found = make_response(404, {"type": "https://ns.adobe.com/aep/errors/EXEG-0404-404", "status": 404})
    session = FakeSession([not_found, ok(), ok(), ok()])
    edge = client(session, clock)
    edge.deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))

    # WHEN the environment idles frozen between invocations: 3 hours pass on the wall clock, and the monotonic clock
    # (which may not move while Lambda freezes it: undocumented) moves a second
    clock._wall += 3 * 3600
    clock._mono += 1
    edge.deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))

    # THEN the hint routes again (the pause is 10 minutes, not 10 minutes of running time)
    assert session.calls[2].url == "https://edge.adobedc.net/ee/or2/v2/interact"
    # AND a wall clock stepped back does not prolong a pause the monotonic clock has seen through
    edge._refuse_hint("or2")
    clock._wall -= 3600
    clock._mono += 601
    edge.deliver(DATASTREAM, REQUEST, "or2", Deadline(clock, 10))
    assert session.calls[3].url == "https://edge.adobedc.net/ee/or2/v2/interact"


def test_refusals_whose_pause_ended_by_the_wall_clock_do_not_pause_every_hint() -> None:
    # GIVEN two hints refused with a 404, then hours of idle invocations (the monotonic clock barely moving)
    clock = FakeClock()
    not_found = make_response(404, {"type": "https://ns.adobe.com/aep/errors/EXEG-0404-404", "status": 404})
    session = FakeSession([not_found, ok(), not_found, ok(), not_found, ok(), ok()])
    edge = client(session, clock)
    for hint in ("or1", "or2"):
        edge.deliver(DATASTREAM, REQUEST, hint, Deadline(clock, 10))
    clock._wall += 3 * 3600
    clock._mono += 1

    # WHEN a third hint is refused
    edge.deliver(DATASTREAM, REQUEST, "va6", Deadline(clock, 10))

    # THEN the two old refusals, over, do not count towards pausing every hint: the first hint routes again
    edge.deliver(DATASTREAM, REQUEST, "or1", Deadline(clock, 10))
    assert session.calls[-1].url == "https://edge.adobedc.net/ee/or1/v2/interact"
