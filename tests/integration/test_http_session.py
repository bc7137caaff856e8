"""The relay's HTTP session, against a loopback server: no cookie crosses from one event's answer to the next."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from relay.runtime import new_http_session

from devtools.loopback import LoopbackHandler, LoopbackService


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
