"""In-memory fakes for the relay's unit tests. Each records the calls it gets; none touches the network or sleeps."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import requests
from relay.clock import Deadline
from relay.identity_state import IdentityState
from relay.integrations.credentials import AdobeCredentials
from relay.integrations.edge import EdgeAnswer
from relay.integrations.ims import AccessToken
from relay.integrations.store import Claim, ClaimKey, ResultWrite
from requests.hooks import dispatch_hook
from requests.structures import CaseInsensitiveDict

WALL_START = 1_700_000_000.0  # 2023-11-14T22:13:20Z
MONO_START = 1_000.0


class FakeClock:
    """`relay.clock.Clock` whose `sleep()` advances time instantly and records each wait."""

    def __init__(self, wall: float = WALL_START, mono: float = MONO_START) -> None:
        self._wall = wall
        self._mono = mono
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(max(seconds, 0.0))

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds


def make_response(
    status: int,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    text: str | None = None,
    reason: str | None = None,
    content: bytes | None = None,
) -> requests.Response:
    """A real `requests.Response` with a JSON body (or raw `text`, or raw bytes: `content`), its body still to be read
    as a real answer's is (through `iter_content`, in chunks, or whole by `content`)."""
    resp = requests.Response()
    resp.status_code = status
    resp.reason = reason if reason is not None else {200: "OK", 207: "Multi-Status"}.get(status, "Error")
    resp.encoding = "utf-8"
    resp.headers = CaseInsensitiveDict(headers or {})
    if content is None and text is not None:
        content = text.encode("utf-8")
    elif content is None and body is not None:
        content = json.dumps(body).encode("utf-8")
        resp.headers.setdefault("Content-Type", "application/json")
    resp.raw = io.BytesIO(content or b"")
    return resp


class BrokenBody:
    """A urllib3-like raw body that gives `first` and then fails with `error` (what urllib3 raises when the
    connection closes mid-body, a gzip stream is corrupt, or the body stalls)."""

    def __init__(self, first: bytes, error: Exception) -> None:
        self.first, self.error = first, error
        self.closed = False

    def stream(self, amt: int, decode_content: bool = True) -> Iterator[bytes]:
        yield self.first
        raise self.error

    def close(self) -> None:
        self.closed = True


def broken_body_response(status: int, error: Exception, first: bytes = b'{"requestId": "r-', /) -> requests.Response:
    """A real `requests.Response` whose status and headers arrived but whose body breaks off after `first`."""
    resp = make_response(status, text="")
    resp.headers["Content-Type"] = "application/json"
    resp.raw = BrokenBody(first, error)
    return resp


def edge_problem(status: int, code: str, title: str = "Error", detail: str = "") -> requests.Response:
    """An Edge RFC 7807 problem answer, e.g. `edge_problem(401, "EXEG-0503-401")`."""
    body = {
        "type": f"https://ns.adobe.com/aep/errors/{code}",
        "status": status,
        "title": title,
        "detail": detail,
        "report": {"requestId": f"req-{code}"},
    }
    return make_response(status, body, headers={"Content-Type": "application/problem+json"})


@dataclass
class Scripted:
    """One scripted outcome of `FakeSession.post`: a response or an exception, after `elapsed` simulated seconds.

    `elapsed=None` for an exception means "the call used its whole read timeout" (what a real timeout does).
    """

    outcome: requests.Response | BaseException
    elapsed: float | None = 0.0


@dataclass
class PostCall:
    url: str
    params: dict[str, Any] | None
    data: Any
    headers: dict[str, str] | None
    timeout: Any
    remaining: float | None  # deadline.remaining() when the call started, if the session watches a deadline
    allow_redirects: bool = True


def unprepare(request: requests.PreparedRequest) -> tuple[str, dict[str, str] | None, dict[str, str]]:
    """What a `post` of this prepared request was given: the URL without its query, the query's params, and the
    headers without the Content-Length that preparing added. Refuses anything else, as `Session.send` does."""
    if not isinstance(request, requests.PreparedRequest):
        raise ValueError("You can only send PreparedRequests.")
    parts = urlsplit(str(request.url))
    params = dict(parse_qsl(parts.query)) or None
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    return urlunsplit(parts._replace(query="")), params, headers


class FakeSession:
    """A `requests.Session`-like object whose `post()` plays a script and records every call."""

    trust_env = False  # as the relay's session on Lambda (no proxy configured)

    def __init__(
        self,
        script: Iterable[requests.Response | BaseException | Scripted] = (),
        *,
        clock: FakeClock | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        self.script: list[Scripted] = [s if isinstance(s, Scripted) else Scripted(s) for s in script]
        self.clock = clock
        self.deadline = deadline
        self.calls: list[PostCall] = []
        self.elapsed: list[float] = []

    def prepare_request(self, request: requests.Request) -> requests.PreparedRequest:
        return request.prepare()

    def send(
        self,
        request: requests.PreparedRequest,
        *,
        timeout: Any = None,
        allow_redirects: bool = True,
        stream: bool = False,
    ) -> requests.Response:
        """Like `requests.Session.send`: a PreparedRequest only. Recorded as the `post` it stands for."""
        url, params, headers = unprepare(request)
        return self.post(
            url,
            params=params,
            data=request.body,
            headers=headers,
            timeout=timeout,
            allow_redirects=allow_redirects,
            hooks=request.hooks,
        )

    def post(
        self,
        url: str,
        *,
        params: dict[str, Any] | None = None,
        data: Any = None,
        headers: dict[str, str] | None = None,
        timeout: Any = None,
        allow_redirects: bool = True,
        stream: bool = False,
        hooks: dict[str, Any] | None = None,
    ) -> requests.Response:
        """Plays the next scripted step; an answer goes through the `response` hooks, as `requests` sends it."""
        remaining = self.deadline.remaining() if self.deadline is not None else None
        self.calls.append(PostCall(url, params, data, headers, timeout, remaining, allow_redirects))
        if not self.script:
            raise AssertionError(f"unexpected post #{len(self.calls)} to {url}")
        step = self.script.pop(0)
        elapsed = step.elapsed
        if elapsed is None:
            elapsed = float(timeout[1] if isinstance(timeout, tuple) else timeout or 0.0)
        self.elapsed.append(elapsed)
        if self.clock is not None and elapsed:
            self.clock.advance(elapsed)
        if isinstance(step.outcome, BaseException):
            raise step.outcome
        return dispatch_hook("response", hooks or {}, step.outcome)


CREDS = AdobeCredentials(client_id="client-1", client_secret="s3cret", org_id="ORG1@AdobeOrg", scopes="openid,AdobeID")


class FakeTokenProvider:
    """Duck-typed `ImsTokenProvider`: hands out token-1, token-2, ... (a new one on each forced refresh of the
    current token), each carrying the client id and org of `credentials`."""

    def __init__(self, credentials: AdobeCredentials = CREDS, *, expires_at: float = WALL_START + 3600) -> None:
        self._credentials = credentials
        self._expires_at = expires_at
        self.issued = 1
        self.token = self._mint()
        self.get_calls: list[dict[str, Any]] = []

    def _mint(self) -> AccessToken:
        c = self._credentials
        return AccessToken(f"token-{self.issued}", self._expires_at, c.client_id, c.org_id)

    age_s = 3600.0  # how old the current token is: a refresh asked with a larger `min_age_s` keeps it

    def get(
        self,
        *,
        force_refresh: bool = False,
        stale: AccessToken | None = None,
        deadline: object = None,
        min_age_s: float = 0.0,
    ) -> AccessToken:
        self.get_calls.append({"force_refresh": force_refresh, "stale": stale, "min_age_s": min_age_s})
        if force_refresh and (stale is None or stale == self.token) and self.age_s >= min_age_s:
            self.issued += 1
            self.token = self._mint()
        return self.token

    @property
    def refreshes(self) -> list[dict[str, Any]]:
        return [c for c in self.get_calls if c["force_refresh"]]


class FakeCredentialsStore:
    """Duck-typed `CredentialsStore.adobe()`: returns the next of `versions` on a forced read, records each read."""

    def __init__(self, *versions: AdobeCredentials, error: Exception | None = None) -> None:
        self.versions = list(versions) or [CREDS]
        self.error = error
        self.current = 0
        self.calls: list[bool] = []  # the `force` argument of each adobe() call

    def adobe(self, *, force: bool = False) -> AdobeCredentials:
        self.calls.append(force)
        if self.error is not None:
            raise self.error
        if force and self.current + 1 < len(self.versions):
            self.current += 1
        return self.versions[self.current]


@dataclass
class FakeStore:
    """Duck-typed `HandlesStore` for `Relay`: scripted claims, results and identity state in dicts."""

    claim_result: Claim | Exception = field(default_factory=lambda: Claim(True, token="tok-1"))
    states: dict[tuple[str, str], IdentityState] = field(default_factory=dict)
    claims: list[dict[str, Any]] = field(default_factory=list)
    releases: list[tuple[str, str, str]] = field(default_factory=list)
    retry_after: dict[str, float | None] = field(default_factory=dict)  # the Retry-After given with each release
    finished: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    rejected_unclaimed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    state_reads: list[tuple[str, str]] = field(default_factory=list)
    state_writes: list[tuple[str, str, IdentityState]] = field(default_factory=list)
    stored_at: str = "2023-11-14T22:13:20.000Z"
    batch_writes: list[list[str]] = field(default_factory=list)  # event ids per put_results call
    failing_writes: set[str] = field(default_factory=set)  # put_results fails these
    queued_notes: list[tuple[str, str]] = field(default_factory=list)  # note_queued calls (a webhook's sent message)

    # claim_new: None = every INSERT fails as for an existing item (events are then claimed one by one with `claim`,
    # as scripted); True = every INSERT succeeds; an exception = the whole call raises it
    insert_claims: bool | Exception | None = None
    new_claims: list[list[str]] = field(default_factory=list)  # event ids per claim_new call

    def claim_new(self, events: list[ClaimKey], *, lease_s: float) -> dict[str, Claim]:
        self.new_claims.append([event_id for event_id, *_ in events])
        if isinstance(self.insert_claims, Exception):
            raise self.insert_claims
        acquired = self.insert_claims is True
        return {
            e: Claim(acquired, token=f"new-{e}", item={"attempts": {"N": "1"}} if acquired else None)
            for e, *_ in events
        }

    def claim(
        self,
        event_id: str,
        *,
        datastream_id: str,
        source: str,
        lease_s: float,
        token: str | None = None,
        stamp: tuple[str, str] | None = None,
        owner: str | None = None,
        default_datastream: bool = False,
    ) -> Claim:
        self.claims.append(
            {"event_id": event_id, "datastream_id": datastream_id, "source": source, "lease_s": lease_s, "token": token}
        )
        if isinstance(self.claim_result, Exception):
            raise self.claim_result
        return self.claim_result

    def release(
        self, event_id: str, token: str, reason: str, *, retry_after: float | None = None, marked: bool = False
    ) -> None:
        self.releases.append((event_id, token, reason))
        self.retry_after[event_id] = retry_after

    def note_queued(self, event_id: str, reason: str, by: str) -> None:
        self.queued_notes.append((event_id, reason))

    def compose_result(self, event_id: str, fields: dict[str, Any], claimed: dict[str, Any] | None) -> ResultWrite:
        return ResultWrite(event_id, {"fields": fields}, {**fields, "eventId": event_id, "storedAt": self.stored_at})

    def put_result(self, write: ResultWrite) -> None:
        self.finished.append((write.event_id, write.item["fields"]))

    def put_results(self, writes: list[ResultWrite], deadline: Deadline | None = None) -> dict[str, str]:
        self.batch_writes.append([w.event_id for w in writes])
        for write in writes:
            if write.event_id not in self.failing_writes:
                self.put_result(write)
        return {w.event_id: "scripted write failure" for w in writes if w.event_id in self.failing_writes}

    def reject_unclaimed(
        self, event_id: str, fields: dict[str, Any], *, body_digest: str | None = None
    ) -> dict[str, Any]:
        self.rejected_unclaimed.append((event_id, fields))
        return {**fields, "eventId": event_id, "status": "rejected", "storedAt": self.stored_at}

    def get_state(self, opaque_id: str, datastream_id: str) -> IdentityState:
        self.state_reads.append((opaque_id, datastream_id))
        return self.states.get((opaque_id, datastream_id), IdentityState())

    def get_states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], IdentityState]:
        return {key: self.states.get(key, IdentityState()) for key in keys}

    def update_state(
        self,
        opaque_id: str,
        datastream_id: str,
        current: IdentityState,
        change: Callable[[IdentityState], IdentityState | None],
    ) -> int:
        new = change(current)
        if new is None:
            return 0
        stored = replace(new, version=current.version + 1, stored_version=None, newer_format=False)
        self.states[(opaque_id, datastream_id)] = stored
        self.state_writes.append((opaque_id, datastream_id, stored))
        return 1


@dataclass
class DeliverCall:
    datastream_id: str
    request: dict[str, Any]
    hint: str | None
    deadline: Deadline


class FakeEdge:
    """Duck-typed `EdgeClient`: `deliver()` plays scripted answers (EdgeAnswer) or raises scripted exceptions."""

    def __init__(self, *script: EdgeAnswer | Exception) -> None:
        self.script = list(script)
        self.calls: list[DeliverCall] = []

    def deliver(
        self, datastream_id: str, request: dict[str, Any] | bytes, hint: str | None, deadline: Deadline
    ) -> EdgeAnswer:
        sent = json.loads(request) if isinstance(request, bytes) else request  # the Relay sends encoded JSON
        self.calls.append(DeliverCall(datastream_id, sent, hint, deadline))
        if not self.script:
            raise AssertionError("unexpected Edge call")
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


@contextlib.contextmanager
def headers_then_stall(
    after_s: float, *, body: bytes = b"{", body_after_s: float = 0.0, length: int = 100, status: bytes = b"200 OK"
) -> Iterator[int]:
    """A loopback HTTP server (its port) that reads one request, answers its headers (`status`) `after_s` later (a
    body of `length` bytes), sends `body` `body_after_s` after that, then sends nothing more until the block ends: a
    peer whose body stalls."""
    server = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            time.sleep(after_s)
            conn.sendall(
                b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (status, length)
            )
            time.sleep(body_after_s)
            conn.sendall(body)
            release.wait(10)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        release.set()
        server.close()


__all__ = [
    "CREDS",
    "DeliverCall",
    "FakeClock",
    "FakeCredentialsStore",
    "FakeEdge",
    "headers_then_stall",
    "FakeSession",
    "FakeStore",
    "FakeTokenProvider",
    "PostCall",
    "Scripted",
    "edge_problem",
    "make_response",
    "unprepare",
]
