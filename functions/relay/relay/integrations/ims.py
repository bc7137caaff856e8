"""Adobe IMS OAuth server-to-server tokens, cached per execution environment until shortly before expiry."""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field

import requests

from relay.clock import Clock, Deadline, Moment
from relay.errors import CredentialsError
from relay.integrations.credentials import AdobeCredentials, CredentialsStore
from relay.integrations.http_body import BodyCap

_OAUTH_ERROR = re.compile(r"[a-z_]{1,40}")
_BEARER_TOKEN = re.compile(r"[\x21-\x7e]{1,16384}")  # visible ASCII, as a header value
FAILURE_HOLD_S = 5.0  # after a failed fetch, callers get its error for this long instead of asking IMS again
QUICK_FAILURE_S = 1.0  # a connection failure this fast is a dead pooled connection, worth one immediate retry
# The most of an IMS answer read: a token answer is a few KB (its token at most 16 KB, as _BEARER_TOKEN allows).
MAX_IMS_ANSWER_BYTES = 64 * 1024
MAX_TOKEN_LIFETIME_S = 86400.0  # IMS tokens live 24 h: a larger expires_in (e.g. milliseconds) is not believed


class NoTimeLeft(CredentialsError):
    """The caller's deadline left no time for the token request: about that caller, not about IMS."""


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float  # wall clock
    client_id: str = ""  # the credential the token was minted for: Edge wants it as x-api-key
    org_id: str = ""


def _oauth_error(resp: requests.Response) -> str:
    """The `error` code of an OAuth error answer: a short, fixed word, safe to log (never `error_description`)."""
    try:
        code = resp.json().get("error")
    except (ValueError, AttributeError):
        return ""
    return code if isinstance(code, str) and _OAUTH_ERROR.fullmatch(code) else ""


def _require_time(deadline: Deadline | None) -> None:
    if deadline is not None and deadline.remaining() < 0.05:
        raise NoTimeLeft("no time left to request an IMS token")


class ImsTokenProvider:
    """`get()` returns a live token. A refused credential makes it re-read the secret once (rotation)."""

    def __init__(
        self,
        session: requests.Session,
        token_url: str,
        credentials: CredentialsStore,
        clock: Clock,
        *,
        timeout: tuple[float, float] = (3.05, 10.0),
    ) -> None:
        self._session = session
        self._url = token_url
        self._credentials = credentials
        self._clock = clock
        self._timeout = timeout
        self._token: AccessToken | None = None
        # When the last refresh was asked because the token was refused with `min_age_s` (successful or not): a refused
        # token, or a refresh that failed, must not start another refresh within `min_age_s`. Ages count by both clocks
        # (`Moment`): a token hours old must not count as seconds old, refused on every event of idle invocations.
        self._last_refusal_refresh: Moment | None = None
        self._token_at = Moment(0.0, 0.0)  # when the current token was fetched
        self._token_life = 0.0  # seconds from the current token's fetch to its refresh point
        self._replacing: AccessToken | None = None  # a token Edge refused, while its replacement is being fetched
        self._lock = threading.Lock()
        # (when, reason) of the last failed fetch, held FAILURE_HOLD_S by both clocks (`Moment`): the 32 workers of a
        # batch that all need a token must not send IMS (and Secrets Manager) 32 requests one after another, each
        # waiting its turn, when IMS refuses or is down.
        self._failure: tuple[Moment, str] | None = None

    def has_live_token(self, *, for_s: float = 0.0) -> bool:
        """Whether `get(live_for_s=for_s)` would answer from its cache (no lock: a hint, for deciding whether to
        fetch ahead)."""
        return self._is_live(self._token, for_s)

    def _is_live(self, token: AccessToken | None, live_for_s: float) -> bool:
        return token is not None and token.expires_at > self._clock.now() + self._ahead(live_for_s)

    def _ahead(self, live_for_s: float) -> float:
        """How long ahead a token must stay live: `live_for_s`, unless tokens live too briefly for that to mean
        anything but a new token per batch (then only live now)."""
        return live_for_s if live_for_s < self._token_life / 2 else 0.0

    def get(
        self,
        *,
        force_refresh: bool = False,
        stale: AccessToken | None = None,
        deadline: Deadline | None = None,
        min_age_s: float = 0.0,
        live_for_s: float = 0.0,
    ) -> AccessToken:
        """A live token, one still live `live_for_s` from now (a batch's warm-up asks for one that outlives the
        batch, so that no renewal, with its secret read, falls at the batch's end). `force_refresh` replaces `stale`
        (the token Edge refused), unless another caller already did, or unless it is younger than `min_age_s`: a
        token refused as soon as it was minted would only be refused again, and each event must not cost an IMS
        request."""
        # `_replacing` is read before `_token` (a refresh sets them in the other order: `_replacing`, then `_token`,
        # then `_replacing` back to None), so a refresh that succeeds between the two reads cannot hand out the refused
        # one. (After a failed refresh the refused token is handed out again, here as under the lock: Edge's next 401
        # on it asks for another refresh, at most once a minute: edge.REFUSED_TOKEN_MIN_AGE_S.)
        replacing = self._replacing
        token = self._token
        if token is not None and not force_refresh and token is not replacing and self._is_live(token, live_for_s):
            return token  # the common case, without the lock: a renewal ahead holds it while this one is live
        # Waiting for another caller's fetch counts against this caller's deadline: a token request IMS answers slowly
        # (each read within its timeout) must not hold every worker of a batch past theirs.
        if not self._lock.acquire(timeout=-1 if deadline is None else deadline.remaining()):
            raise NoTimeLeft("no time left waiting for the IMS token another call is fetching")
        try:
            token = self._token
            moment = Moment.of(self._clock)
            now = moment.wall
            refused = force_refresh and (stale is None or stale == token)
            if token and refused and min_age_s:
                last = self._last_refusal_refresh
                if self._token_at.within(min_age_s, moment) or (last is not None and last.within(min_age_s, moment)):
                    refused = False
                else:
                    self._last_refusal_refresh = moment
            # A refresh forced by a refused token only replaces the token that was refused.
            if token and not refused:
                if token.expires_at > now + self._ahead(live_for_s):
                    return token
            if self._failure is not None and self._failure[0].within(FAILURE_HOLD_S, moment):
                raise CredentialsError(self._failure[1])
            self._replacing = token if refused else None
            try:
                self._token = self._fetch(deadline)
                self._token_at = Moment.of(self._clock)
                self._token_life = self._token.expires_at - self._clock.now()
            except NoTimeLeft:
                raise
            except CredentialsError as exc:
                self._failure = (Moment.of(self._clock), str(exc))
                raise
            finally:
                self._replacing = None
            self._failure = None
            return self._token
        finally:
            self._lock.release()

    def _fetch(self, deadline: Deadline | None) -> AccessToken:
        _require_time(deadline)  # not even the secret read (it may take seconds)
        creds = self._credentials.adobe()
        refused = self._request(creds, deadline)
        if isinstance(refused, AccessToken):
            return refused
        if refused[0] in (400, 401, 403):  # refused credentials: the secret may have been rotated; re-read it once
            creds = self._credentials.adobe(force=True)
            refused = self._request(creds, deadline)
            if isinstance(refused, AccessToken):
                return refused
        status, code = refused
        raise CredentialsError(f"IMS refused the token request (HTTP {status}{' ' + code if code else ''})")

    def _request(self, creds: AdobeCredentials, deadline: Deadline | None) -> AccessToken | tuple[int, str]:
        """The token, or IMS's refusal: its status and OAuth error code (`invalid_client`, `invalid_scope`, ...)."""
        timeout = self._timeout
        _require_time(deadline)  # the token request counts against the invocation's budget too
        if deadline is not None:
            timeout = deadline.http_timeouts(*self._timeout)
        for attempt in (1, 2):
            if attempt == 2 and deadline is not None:
                timeout = deadline.http_timeouts(*self._timeout)  # what the first attempt left
            started = self._clock.monotonic()
            cap = BodyCap(MAX_IMS_ANSWER_BYTES, deadline)
            try:
                resp = self._session.post(
                    self._url,
                    data={
                        "grant_type": "client_credentials",
                        "client_id": creds.client_id,
                        "client_secret": creds.client_secret,
                        "scope": creds.scopes,
                    },
                    timeout=timeout,
                    allow_redirects=False,  # a redirect would re-send the client secret to wherever it points
                    stream=True,  # read by the hook, up to MAX_IMS_ANSWER_BYTES
                    hooks={"response": cap},
                )
                break
            except requests.Timeout as exc:
                if timeout != self._timeout:
                    # A wait the caller's deadline shortened says nothing about IMS: not held against the next caller
                    # (a webhook's short budget must not make the next batch's every token request fail for seconds).
                    raise NoTimeLeft(f"IMS did not answer within the time left ({type(exc).__name__})") from None
                raise CredentialsError(f"IMS unreachable ({type(exc).__name__})") from None
            except requests.ConnectionError as exc:
                # The token is requested about once a day: its kept-alive connection is the one most likely to have
                # been dropped by the far end (or a NAT) while the environment sat idle. Such a connection fails at
                # once: then once more, at once. A failure after a long wait is IMS's, and is not repeated.
                quick = self._clock.monotonic() - started < QUICK_FAILURE_S
                if attempt == 1 and quick and (deadline is None or deadline.remaining() >= 0.05):
                    continue
                raise CredentialsError(f"IMS unreachable ({type(exc).__name__})") from None
            except requests.RequestException as exc:
                raise CredentialsError(f"IMS unreachable ({type(exc).__name__})") from None
        if resp.status_code != 200:
            return resp.status_code, _oauth_error(resp)
        if not cap.whole:
            raise CredentialsError(f"IMS answered more than {MAX_IMS_ANSWER_BYTES} bytes")
        try:
            doc = resp.json()
            value, expires_in = doc["access_token"], float(doc["expires_in"])
            # A null would be cached as the token "None" for a day; a value no HTTP header can carry would fail every
            # Edge call for a day, and Edge, never reached, would never refuse it with the 401 that renews it.
            if not (isinstance(value, str) and _BEARER_TOKEN.fullmatch(value)):
                raise ValueError("access_token")
            if not (math.isfinite(expires_in) and expires_in > 0):
                raise ValueError("expires_in")
        except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: an integer too large for a float
            raise CredentialsError("IMS answered without access_token/expires_in") from None
        expires_in = min(expires_in, MAX_TOKEN_LIFETIME_S)
        # Refresh 5 minutes (or 10% of a short lifetime) before IMS says the token expires.
        margin = min(300.0, expires_in * 0.1)
        return AccessToken(value, self._clock.now() + expires_in - margin, creds.client_id, creds.org_id)
