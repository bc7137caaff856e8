"""The relay's HTTP session, against loopback servers: no cookie crosses from one event's answer to the next, and no
redirect is followed (by the Edge call or the IMS token request)."""

from __future__ import annotations

import gzip
import json
import threading
import tracemalloc
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from relay.clock import Deadline, SystemClock
from relay.errors import CredentialsError, EdgeRejected
from relay.integrations.credentials import AdobeCredentials
from relay.integrations.edge import MAX_ANSWER_BYTES, EdgeClient
from relay.integrations.ims import ImsTokenProvider, NoTimeLeft
from relay.runtime import new_http_session
from relay.settings import load_settings

from devtools.loopback import LoopbackHandler, LoopbackService

EDGE_HOST = "https://edge.adobedc.net"  # EDGE_AUTH=none takes the unauthenticated host (never called here)


class CookieServer(LoopbackService):
    """Answers every request with a Set-Cookie (as an identity service might) and records the Cookie it received."""

    thread_name = "cookie-server"

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def _make_server(self) -> ThreadingHTTPServer:
        seen = self.seen

        class Handler(LoopbackHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                seen.append(self.headers.get("Cookie"))
                body = b"{}"
                self.send_response(200)
                self.send_header("Set-Cookie", f"FPID=person-{len(seen)}; Path=/")
                self.send_header("Set-Cookie", "kndctr_ORG_AdobeOrg_identity=abc; Path=/")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return ThreadingHTTPServer((self.host, 0), Handler)


@pytest.fixture
def cookie_server() -> Iterator[tuple[str, list[str | None]]]:
    with CookieServer() as server:
        yield server.url, server.seen


def test_cookies_from_one_answer_are_never_sent_with_the_next_request(
    cookie_server: tuple[str, list[str | None]],
) -> None:
    url, seen = cookie_server
    session = new_http_session(4)
    for _ in range(3):
        assert session.post(f"{url}/ee/v2/interact", data=b"{}", timeout=5).status_code == 200
    assert seen == [None, None, None]
    assert len(session.cookies) == 0


class RecordingServer(LoopbackService):
    """Records every request (method, path, headers, body) and answers each with `status`, `headers` and `body`."""

    thread_name = "recording-server"

    def __init__(self, status: int = 200, headers: dict[str, str] | None = None, body: bytes = b"{}") -> None:
        self.answer = (status, headers or {}, body)
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []

    def _make_server(self) -> ThreadingHTTPServer:
        service = self

        class Handler(LoopbackHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                service.seen.append((self.command, self.path, dict(self.headers), data))
                status, headers, body = service.answer
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

        return ThreadingHTTPServer((self.host, 0), Handler)


def edge_client(base_url: str) -> EdgeClient:
    env = {
        "HANDLES_TABLE": "handles",
        "DATASTREAM_ID": "ds-1",
        "EDGE_AUTH": "none",
        "EDGE_BASE_URL": EDGE_HOST,
        "WEBHOOK_AUTH": "none",
    }
    return EdgeClient(new_http_session(4), load_settings({**env, "EDGE_BASE_URL": base_url}), None, SystemClock())


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_edge_redirect_is_refused_and_never_followed(status: int) -> None:
    # GIVEN an "Edge" that redirects to another host, which would answer 200 with a hint of its own
    hint = {"type": "locationHint:result", "payload": [{"scope": "EdgeNetwork", "hint": "x", "ttlSeconds": 1800}]}
    foreign = json.dumps({"requestId": "not-edge", "handle": [hint]}).encode()
    with RecordingServer(200, {"Content-Type": "application/json"}, foreign) as other:
        with RecordingServer(status, {"Location": f"{other.url}/collect"}, b"") as edge:
            client = edge_client(edge.url)
            event = {
                "event": {"xdm": {"_id": "e1", "identityMap": {"Email": [{"id": "a@example.com", "primary": True}]}}}
            }

            # WHEN
            with pytest.raises(EdgeRejected) as caught:
                client.deliver("ds-1", event, None, Deadline(SystemClock(), 5))

            # THEN the event went to Edge once and nowhere else; the redirect is a rejection, not a delivery
            assert caught.value.status == status
            assert len(edge.seen) == 1
            assert other.seen == []


def test_ims_redirect_never_sends_the_client_secret_elsewhere() -> None:
    # GIVEN an "IMS" that redirects the token request to another host
    with RecordingServer(
        200, {"Content-Type": "application/json"}, b'{"access_token":"t","expires_in":86400}'
    ) as other:
        with RecordingServer(307, {"Location": f"{other.url}/steal"}, b"") as ims:
            creds = AdobeCredentials(client_id="c", client_secret="CLIENT-SECRET", org_id="O@AdobeOrg", scopes="openid")

            class Credentials:
                def adobe(self, *, force: bool = False) -> AdobeCredentials:
                    return creds

            tokens = ImsTokenProvider(new_http_session(4), f"{ims.url}/ims/token/v3", Credentials(), SystemClock())  # type: ignore[arg-type]

            # WHEN
            with pytest.raises(CredentialsError) as caught:
                tokens.get()

            # THEN
            assert "307" in str(caught.value)
            assert len(ims.seen) == 1
            assert other.seen == []


def test_a_compressed_edge_answer_that_would_expand_past_the_limit_is_not_read_into_memory() -> None:
    # GIVEN an "Edge" whose 200 answer is 64 KB of gzip that expands to 64 MB of JSON (a decompression bomb)
    pad = 64 * 1024 * 1024
    bomb = gzip.compress(b'{"requestId": "r-1", "handle": [], "pad": "' + b"x" * pad + b'"}', compresslevel=9)
    ok = json.dumps({"requestId": "r-2", "handle": [{"type": "identity:result", "payload": []}]}).encode()
    event = {"event": {"xdm": {"_id": "e1", "identityMap": {"Email": [{"id": "a@example.com", "primary": True}]}}}}
    with RecordingServer(200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, bomb) as edge:
        client = edge_client(edge.url)

        # WHEN the relay's client takes that answer, while Python's allocations are traced
        tracemalloc.start()
        try:
            answer = client.deliver("ds-1", event, None, Deadline(SystemClock(), 10))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

        # THEN it is delivered without handles (as any answer the relay cannot keep), having held a few MB at most,
        # not the 64 MB the answer expands to
        assert (answer.status, answer.body, answer.unreadable) == (200, {}, True)
        assert peak < 4 * MAX_ANSWER_BYTES
        # AND the next call on the same session, whose connection was closed with the rest unread, is read as usual
        edge.answer = (200, {"Content-Type": "application/json"}, ok)
        assert client.deliver("ds-1", event, None, Deadline(SystemClock(), 10)).request_id == "r-2"
        assert len(edge.seen) == 2


class StallingServer(LoopbackService):
    """Answers a token request with its headers and the first bytes of its body, then stalls (while `stall` is set)
    until the test ends; once `stall` is cleared, answers whole."""

    thread_name = "stalling-server"

    def __init__(self) -> None:
        self.stall = threading.Event()
        self.stall.set()
        self.released = threading.Event()
        self.requests = 0

    def _make_server(self) -> ThreadingHTTPServer:
        service = self
        body = b'{"access_token": "tok-A", "token_type": "bearer", "expires_in": 86399}'

        class Handler(LoopbackHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                service.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if service.stall.is_set():
                    self.wfile.write(body[:10])
                    self.wfile.flush()
                    service.released.wait(timeout=10)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        return ThreadingHTTPServer((self.host, 0), Handler)


def test_an_ims_answer_stalled_past_a_callers_deadline_is_that_callers_and_not_held_for_the_next() -> None:
    # GIVEN an IMS that sends its answer's headers at once and then stalls in the body
    creds = AdobeCredentials(client_id="c", client_secret="s", org_id="O@AdobeOrg", scopes="openid")

    class Credentials:
        def adobe(self, *, force: bool = False) -> AdobeCredentials:
            return creds

    with StallingServer() as ims:
        try:
            tokens = ImsTokenProvider(new_http_session(4), f"{ims.url}/ims/token/v3", Credentials(), SystemClock())  # type: ignore[arg-type]

            # WHEN a caller with 1 s left asks for a token
            with pytest.raises(NoTimeLeft):
                tokens.get(deadline=Deadline(SystemClock(), 1))

            # THEN its wait, cut short by its deadline, is not held against the next caller, who asks IMS again
            ims.stall.clear()
            assert tokens.get(deadline=Deadline(SystemClock(), 10)).value == "tok-A"
            assert ims.requests == 2
        finally:
            ims.released.set()


def test_a_redirect_with_a_body_that_would_expand_past_the_limit_is_not_read_into_memory() -> None:
    # GIVEN an "Edge" answering 302 with a gzip body that expands to 64 MB (requests reads a redirect's body whole to
    # free its connection, even when redirects are not followed)
    bomb = gzip.compress(b"x" * 64 * 1024 * 1024, compresslevel=9)
    headers = {"Location": "http://127.0.0.1:9/elsewhere", "Content-Encoding": "gzip", "Content-Type": "text/html"}
    event = {"event": {"xdm": {"_id": "e1", "identityMap": {"Email": [{"id": "a@example.com", "primary": True}]}}}}
    with RecordingServer(302, headers, bomb) as edge:
        client = edge_client(edge.url)

        # WHEN the relay's client takes that answer, while Python's allocations are traced
        tracemalloc.start()
        try:
            with pytest.raises(EdgeRejected) as caught:
                client.deliver("ds-1", event, None, Deadline(SystemClock(), 10))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    # THEN it is refused as any redirect is, having held a few MB at most
    assert caught.value.status == 302
    assert peak < 4 * MAX_ANSWER_BYTES
