"""An HTTP answer's body read with a ceiling: a peer's answer is never held in memory past a known size.

`requests` reads a body whole (and decompresses it whole), however large. Edge and IMS are sent with `stream=True`
and a `BodyCap` response hook, which reads their bodies here, in chunks, as `Response.content` would read them
(decoded), up to a limit. The hook runs before `requests` looks at the answer (it reads a redirect's body whole to
free the connection, even when redirects are not followed). The body read is then the response's `content` (`json()`
and `text` read it), so the rest of the code handles a response as before.
"""

from __future__ import annotations

import requests
from urllib3.exceptions import ReadTimeoutError

from relay.clock import Deadline

CHUNK_BYTES = 64 * 1024  # decoded bytes per read; urllib3 decompresses no more than a read asks for
MIN_WAIT_S = 0.01  # the shortest wait for the body once its deadline has passed: what is already received is read


def bound_wait(resp: requests.Response, deadline: Deadline | None) -> None:
    """Make each wait for the body's data end by `deadline`. The read timeout was set on the socket when the request
    was sent, from the time left then: headers that came late would otherwise leave a stalled body the whole read
    timeout again, past the deadline (and a batch past its Lambda timeout). urllib3 sets the socket's timeout anew
    for the connection's next request."""
    sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
    if deadline is None or sock is None:
        return
    wait = max(deadline.remaining(), MIN_WAIT_S)
    current = sock.gettimeout()
    if current is None or wait < current:
        sock.settimeout(wait)


def read_at_most(resp: requests.Response, limit: int, deadline: Deadline | None = None) -> bool:
    """Read `resp`'s body into its `content`: whole (True), or its first `limit` bytes when it is longer (False; the
    connection is then closed, not reused, since the rest of the answer is still on it). Each wait for data ends by
    `deadline` (a peer that sends its data a byte at a time, each within that, can still hold a read longer).

    Raises what reading the body raises (`requests.RequestException`s: a dropped connection, a body cut short or
    compressed wrongly), as `Response.content` does, but a read timeout as `requests.ReadTimeout`; the connection is
    then closed."""
    chunks: list[bytes] = []
    size = 0
    whole = True
    bound_wait(resp, deadline)
    try:
        for chunk in resp.iter_content(CHUNK_BYTES):
            bound_wait(resp, deadline)
            if size + len(chunk) > limit:
                chunks.append(chunk[: limit - size])
                whole = False
                resp.close()
                break
            chunks.append(chunk)
            size += len(chunk)
    except requests.RequestException as exc:
        resp.close()
        # requests reports a read timeout in the body as a ConnectionError (in the headers, as a ReadTimeout): said
        # as the timeout it is, so that callers tell a wait their deadline shortened from a peer that is down.
        if isinstance(exc, requests.ConnectionError) and exc.args and isinstance(exc.args[0], ReadTimeoutError):
            raise requests.ReadTimeout(*exc.args, request=exc.request, response=resp) from exc
        raise
    # What `Response.content` would have cached (requests keeps it in `_content`, as a body read without `stream`):
    # `json()`, `text` and `content` read it as they read any body.
    resp._content = b"".join(chunks)
    return whole


class BodyCap:
    """A `response` hook (one per request) that reads the answer's body with read_at_most; `whole` says how it went.

    With `keep_accepted`, a 2xx whose body cannot be read (cut off, compressed wrongly, stalled past the deadline) is
    returned with an empty body, `broken` naming the failure, instead of raising it: the peer answered that it took the
    request, which a retry would send again."""

    def __init__(self, limit: int, deadline: Deadline | None = None, *, keep_accepted: bool = False) -> None:
        self.limit = limit
        self.deadline = deadline
        self.keep_accepted = keep_accepted
        self.whole = True
        self.broken: str | None = None

    def __call__(self, resp: requests.Response, *args: object, **kwargs: object) -> requests.Response:
        try:
            self.whole = read_at_most(resp, self.limit, self.deadline)
        except requests.RequestException as exc:
            if not (self.keep_accepted and 200 <= resp.status_code < 300):
                raise
            self.whole, self.broken = False, type(exc).__name__
            resp._content = b""
        return resp
