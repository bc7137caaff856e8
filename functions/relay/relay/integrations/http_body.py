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

CHUNK_BYTES = 64 * 1024  # decoded bytes per read; urllib3 decompresses no more than a read asks for


def read_at_most(resp: requests.Response, limit: int) -> bool:
    """Read `resp`'s body into its `content`: whole (True), or its first `limit` bytes when it is longer (False; the
    connection is then closed, not reused, since the rest of the answer is still on it).

    Raises what reading the body raises (`requests.RequestException`s: a dropped connection, a body cut short or
    compressed wrongly), as `Response.content` does, but a read timeout as `requests.ReadTimeout`; the connection is
    then closed."""
    chunks: list[bytes] = []
    size = 0
    whole = True
    try:
        for chunk in resp.iter_content(CHUNK_BYTES):
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
    """A `response` hook (one per request) that reads the answer's body with read_at_most; `whole` says how it went."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.whole = True

    def __call__(self, resp: requests.Response, *args: object, **kwargs: object) -> requests.Response:
        self.whole = read_at_most(resp, self.limit)
        return resp
