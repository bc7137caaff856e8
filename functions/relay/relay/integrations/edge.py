"""The Edge Network `interact` client: one event per call, Adobe's retry rules, a deadline on every attempt."""

from __future__ import annotations

import random
import threading
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import NewConnectionError

from relay import codec
from relay.clock import Clock, Deadline, Moment
from relay.errors import CredentialsError, EdgeRejected, EdgeUnavailable
from relay.integrations.http_body import BodyCap
from relay.integrations.ims import ImsTokenProvider
from relay.models import MAX_DEPTH, deeper_than
from relay.observability import count, logger, timing
from relay.retry import RECOVERABLE_STATUSES, backoff, parse_retry_after
from relay.settings import Settings

MIN_ATTEMPT_S = 0.05  # don't start an attempt with less time than this left
REFUSED_TOKEN_MIN_AGE_S = 60.0  # a token Edge refuses is replaced only if older than this (at most one IMS call/min)
# After a hinted URL answers 404, calls with that hint go to the plain URL for this long before it routes one again.
# The docs show the hinted path form only on edge.adobedc.net, and Adobe's Node server-side sample puts the hint in a
# sub-domain of server.adobedc.net instead, while the contract routes by the path form: the relay tries, and falls back.
HINT_ROUTE_PAUSE_S = 600.0
# This many different hints refused within a pause pause them all: the host has no hinted routes, and a caller's
# made-up cluster values must not each cost an Edge call (nor grow the table of paused hints).
HINTS_REFUSED_FOR_ALL = 3
# Once a call has failed through all its attempts (or through its time, after a retry) for want of Edge (no answer,
# or 408/502/503/504) while Edge answered no call of this execution environment, calls that start later are tried
# once each, without retries, until Edge answers any call, or this long after the last such failure (longer than
# the queue's 180 s visibility timeout, so that a record coming back finds it). During an outage each event still gets
# an attempt per receive, but not five, nor the waits between them. One event that Edge keeps failing while it answers
# others is not an outage, and calls already retrying when it starts keep their retries (a blip that ends meanwhile is
# still absorbed).
EDGE_DOWN_MEMORY_S = 300.0
# Failures that say Edge is not there, as opposed to an answer: a 429 is Edge answering (its `Retry-After` is honoured).
OUTAGE_STATUSES = RECOVERABLE_STATUSES - {429}


@dataclass(frozen=True)
class EdgeAnswer:
    status: int  # 200 or 207
    body: dict[str, Any]
    attempts: int
    unreadable: bool = False  # Edge accepted the event but its body was not a JSON object: no handles to keep

    @property
    def request_id(self) -> str | None:
        return request_id_of(self.body.get("requestId"))


# The most of an answer read (decoded): about what a result item (at most 400 KB, compressed) can keep, a thousand
# times a typical Edge answer; small enough that the calls in flight cannot exhaust the function's memory with
# answers (or with a decompression bomb). A larger 2xx is delivered without handles, as an unreadable one.
MAX_ANSWER_BYTES = 2 * 1024 * 1024
MAX_REQUEST_ID_CHARS = 256  # Edge's requestId is a UUID; anything else is kept only if this short
MAX_PROBLEM_TEXT_CHARS = 1000  # a problem's type and title as kept, logged and answered
# An answer nested deeper than this is not kept (far beyond any Edge handle or personalization payload): parsing,
# storing and reading it back recurse, and a thread's stack (a webhook's is deeper than a batch worker's) may not.
MAX_ANSWER_DEPTH = 2 * MAX_DEPTH


def request_id_of(value: Any) -> str | None:
    """Edge's requestId as stored: a string of sensible length, else none (a number could be one DynamoDB refuses,
    a huge string would fill the item)."""
    return value if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_CHARS else None


def _too_deep(resp: requests.Response, doc: Any) -> bool:
    """Whether the answer nests deeper than MAX_ANSWER_DEPTH (counted on the bytes first: a walk only when it might)."""
    content = resp.content
    return content.count(b"{") + content.count(b"[") > MAX_ANSWER_DEPTH and deeper_than(doc, MAX_ANSWER_DEPTH)


def _problem_text(value: Any) -> Any:
    """A problem's `type` or `title` as kept: text cut to MAX_PROBLEM_TEXT_CHARS, a number or null as it is, anything
    else (an object, a list: never Edge's) as null. (`detail` is kept whole, and cut when the item is too large.)"""
    if isinstance(value, str):
        return value[:MAX_PROBLEM_TEXT_CHARS]
    return value if value is None or isinstance(value, int | float) else None


REDACTED = "[redacted]"


def _redact(value: Any, secrets: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, list):
        return [_redact(v, secrets) for v in value]
    if isinstance(value, dict):
        return {_redact(k, secrets): _redact(v, secrets) for k, v in value.items()}
    return value


def _never_sent(exc: requests.RequestException) -> bool:
    """Whether no connection was made for the request: the host's name did not resolve, or the connection was refused
    or timed out before it was made (`requests` wraps urllib3's NewConnectionError, and raises ConnectTimeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    cause = exc.args[0] if exc.args else None
    return isinstance(exc, requests.ConnectionError) and isinstance(getattr(cause, "reason", None), NewConnectionError)


def _json_document(resp: requests.Response) -> Any:
    """An answer's JSON, read strictly (`requests` picks its text encoding); None when it is not JSON (`NaN` too) or is
    nested deeper than Python parses."""
    try:
        return resp.json(**codec.STRICT_JSON)
    except (ValueError, RecursionError):
        return None


def problem_from(resp: requests.Response, redact: tuple[str, ...] = ()) -> dict[str, Any]:
    """Edge's RFC 7807 problem, or a generic one for a gateway's non-JSON answer.

    The problem is stored and may be answered to a webhook sender, so the relay's own credentials (`redact`: the
    access token, the API key) are cut out of it: a wrong host or a proxy error page may echo the request's
    headers back."""
    secrets = tuple(s for s in redact if s)
    doc = _json_document(resp)
    if isinstance(doc, dict) and ("type" in doc or "title" in doc):
        # Redacted before they are cut (as the text below): cut first, a token running past the cut would keep its start
        found = {k: _problem_text(_redact(doc[k], secrets)) for k in ("type", "title") if k in doc}
        found.update({k: doc[k] for k in ("detail", "report") if k in doc})
        for name, empty in (("detail", None), ("report", {})):
            if name in found and _too_deep(resp, found[name]):
                found[name] = empty  # kept, it could not be stored or read back (see MAX_ANSWER_DEPTH)
        # The HTTP status is what the relay acted on (retry, 422 or 502), so it is the one stored and answered: a body
        # that says otherwise (a gateway's, a proxy's) must not turn Edge's 500 into "your event is invalid".
        found["status"] = resp.status_code
        try:
            return _redact(found, secrets) if secrets else found
        except RecursionError:  # a `report` nested deeper than redaction goes: kept as text, below
            pass
    # Cut the credentials out of the whole text before shortening it: shortened first, a token running past the cut
    # would no longer match, and its first part would be kept.
    text, reason = _redact(resp.text, secrets), _redact(resp.reason or "", secrets)
    return {
        "type": "about:blank",
        "status": resp.status_code,
        "title": reason or f"HTTP {resp.status_code}",
        "detail": text[:300],
    }


class EdgeClient:
    def __init__(
        self,
        session: requests.Session,
        settings: Settings,
        tokens: ImsTokenProvider | None,
        clock: Clock,
        rng: random.Random | None = None,
        *,
        slots: threading.Semaphore | None = None,
    ) -> None:
        self._session = session
        self._slots = slots  # bounds the calls in flight (the batch's Edge concurrency); None = unbounded
        self._settings = settings
        self._tokens = tokens
        self._clock = clock
        # backoff jitter only, not security
        self._rng = rng or random.Random()  # nosec B311
        # hint -> when its URL answered 404: it routes no call for HINT_ROUTE_PAUSE_S after that, by both clocks
        # (`Moment`). Per hint, so that one caller's odd cluster entry cannot turn routing off for every visitor; ""
        # pauses them all (HINTS_REFUSED_FOR_ALL).
        self._hints_refused: dict[str, Moment] = {}
        # Refusals come from many workers at once (read-modify-replace). Readers take the table without it: it is
        # replaced whole, never changed in place.
        self._hints_lock = threading.Lock()
        # When a call last gave up for want of Edge, with no answer from Edge since (`EDGE_DOWN_MEMORY_S`). Read and
        # replaced whole by any worker, without a lock: a race may set it just after another call's answer (the next
        # answer clears it) or log a change twice.
        self._down: Moment | None = None
        # Edge's answers other than an outage's, counted: a call that sees it unchanged since it began heard nothing
        # (a count, not a time: two moments may be equal; an increment lost to a race still changes it).
        self._answers = 0

    def is_down(self) -> bool:
        """Whether a call gave up for want of Edge within EDGE_DOWN_MEMORY_S and Edge has answered none since."""
        down = self._down
        return down is not None and down.within(EDGE_DOWN_MEMORY_S, Moment.of(self._clock))

    def _unanswered_since(self, answers: int) -> bool:
        """Whether Edge has answered no call of this environment since its count of answers was `answers`."""
        return self._answers == answers

    def _gave_up_unanswered(self) -> None:
        if not self.is_down():
            logger.warning(
                "edge looks unavailable: each call is now tried once, without retries, until edge answers one",
                forSeconds=EDGE_DOWN_MEMORY_S,
            )
        self._down = Moment.of(self._clock)

    def _answered(self) -> None:
        self._answers += 1
        if self._down is not None:
            if self.is_down():
                logger.info("edge answers again: calls are retried as usual")
            self._down = None

    def _route_plain(self, hint: str, why: str, **fields: Any) -> None:
        """A hinted call goes to the plain URL at once (`why`: the hinted route is not there), and `hint` routes no
        call for a while: counted and logged."""
        self._refuse_hint(hint)
        count("EdgeHintRouteRefused")
        logger.warning(
            f"{why}; calls with this hint go to the plain URL for a while", pauseSeconds=HINT_ROUTE_PAUSE_S, **fields
        )

    def _refuse_hint(self, hint: str) -> None:
        """Pause `hint` (its URL answered 404); pause every hint once several different ones were refused."""
        with self._hints_lock:
            now = Moment.of(self._clock)
            live = {k: at for k, at in self._hints_refused.items() if at.within(HINT_ROUTE_PAUSE_S, now)}
            if "" in live:
                # Every hint is paused already: a 404 from a call that was in flight when they were must not replace
                # that pause with one for its own hint (every other hint would route again).
                return
            live[hint] = now
            if len(live) >= HINTS_REFUSED_FOR_ALL:
                live = {"": now}
            self._hints_refused = live

    def _hint_paused(self, hint: str) -> bool:
        """Whether calls for `hint` go to the plain route for now (it, or every hint, was refused a short while ago)."""
        refused = self._hints_refused  # replaced whole, never changed in place: read without the lock
        if not refused:
            return False
        now = Moment.of(self._clock)
        return any(k in refused and refused[k].within(HINT_ROUTE_PAUSE_S, now) for k in (hint, ""))

    def _headers(self, deadline: Deadline) -> tuple[dict[str, str], Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._tokens is None:
            return headers, None
        token = self._tokens.get(deadline=deadline)
        headers.update(
            {
                "Authorization": f"Bearer {token.value}",
                "x-api-key": token.client_id,
                "x-gw-ims-org-id": token.org_id,
            }
        )
        return headers, token

    def _post(
        self, url: str, params: dict[str, str], body: bytes, headers: dict[str, str], deadline: Deadline
    ) -> tuple[requests.Response, BodyCap] | None:
        """One POST, holding one of the slots for calls in flight; waiting for a slot counts against the deadline.
        The answer, its body read (`BodyCap.whole`: True; its first MAX_ANSWER_BYTES: False; `BodyCap.broken`: a 2xx
        whose body could not be read, kept with an empty body); None when no slot, or not enough time, is left.

        The request is prepared before the slot is taken, so a slot is held only to send and to wait for Edge (and
        `Session.send` of a prepared request skips `Session.request`'s per-call settings merge: about 8 % of the
        relay's CPU per event in the benchmark)."""
        s = self._settings
        cap = BodyCap(MAX_ANSWER_BYTES, deadline, keep_accepted=True)
        prepared = self._session.prepare_request(
            requests.Request("POST", url, params=params, data=body, headers=headers, hooks={"response": cap})
        )
        # With trust_env (a proxy is configured) apply what `Session.request` would take from the environment too:
        # proxies and, behind a TLS-inspecting proxy, REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE.
        env: dict[str, Any] = (
            dict(self._session.merge_environment_settings(prepared.url, {}, None, None, None))
            if self._session.trust_env
            else {}
        )
        if self._slots is not None and not self._slots.acquire(timeout=max(deadline.remaining() - MIN_ATTEMPT_S, 0)):
            return None
        try:
            if deadline.remaining() < MIN_ATTEMPT_S:
                return None
            timeout = deadline.http_timeouts(s.edge_connect_timeout_s, s.edge_read_timeout_s)
            # Never follow a redirect: it would re-send the event (identities, API key) to wherever it points, and
            # that host's answer would be stored as Edge's. A 3xx is refused like any other non-recoverable status.
            # `stream`: the body is read by the hook, up to MAX_ANSWER_BYTES, not whole by `requests`.
            env["stream"] = True
            resp = self._session.send(prepared, timeout=timeout, allow_redirects=False, **env)
            return resp, cap
        finally:
            if self._slots is not None:
                self._slots.release()

    def deliver(
        self, datastream_id: str, request: dict[str, Any] | bytes, hint: str | None, deadline: Deadline
    ) -> EdgeAnswer:
        """Send one event (a request, or its JSON already encoded); retry only what Adobe calls recoverable, within
        `deadline`.

        Raises EdgeRejected (not to be retried), EdgeUnavailable (retry later) or CredentialsError (retry later).
        """
        s = self._settings
        # A hint routes the call unless routing is off or its URL answered 404 a short while ago.
        hinted = bool(hint and s.edge_hint_url_template is not None and not self._hint_paused(hint))
        url = s.hinted_url(hint) if hint and hinted else s.interact_url
        body = request if isinstance(request, bytes) else codec.dumps(request).encode("utf-8")
        attempt, refreshed = 0, False
        reason, retry_after = "no time left for an attempt", None
        answers_before = self._answers
        gated = self.is_down()  # Edge looked down when this call started: one attempt, unless Edge answers meanwhile
        unanswered = False  # the last attempt failed for want of Edge

        def give_up(attempts: int, *, for_good: bool = False) -> EdgeUnavailable:
            """Giving up: when the last attempt failed for want of Edge and Edge answered no call of this environment
            since this one began, Edge looks down from now on (or still does), if this call gave up for good (its
            attempts spent, or one made while Edge looked down) or for want of time after a retry (one failed attempt
            that finds no time for another says nothing)."""
            if unanswered and (for_good or attempts >= 2) and self._unanswered_since(answers_before):
                self._gave_up_unanswered()
            return EdgeUnavailable(reason, retry_after=retry_after, attempts=attempts)

        while True:
            attempt += 1
            remaining = deadline.remaining()
            if remaining < MIN_ATTEMPT_S:
                raise give_up(attempt - 1)
            headers, token = self._headers(deadline)
            remaining = deadline.remaining()  # the token request may have used some of it
            if remaining < MIN_ATTEMPT_S:
                raise give_up(attempt - 1)
            params = {"datastreamId": datastream_id, "requestId": str(uuid.uuid4())}
            started = self._clock.monotonic()
            try:
                answered = self._post(url, params, body, headers, deadline)
            except requests.RequestException as exc:  # timeouts, refused or dropped connections, a non-2xx cut off
                if hinted and _never_sent(exc) and urlsplit(url).hostname != urlsplit(s.interact_url).hostname:
                    # A hinted host of its own (EDGE_HINT_URL_TEMPLATE's sub-domain form) that cannot be reached at
                    # all: its name does not resolve (a caller's cluster entry naming no region), or it refuses or
                    # times out the connection (a region down). The request never left: the same event at once on
                    # the plain URL, as after a 404, and that hint routes no call for a while. Not on the plain
                    # URL's own host, which the plain URL could not reach either.
                    timing("EdgeLatency", (self._clock.monotonic() - started) * 1000)
                    self._route_plain(str(hint), "edge's hinted host could not be reached", reason=type(exc).__name__)
                    hinted, url = False, s.interact_url
                    continue
                reason, retry_after, unanswered = f"edge call failed: {type(exc).__name__}", None, True
                # An attempt without an answer is an Edge call too, and the most common outage: timed (so the latency
                # shows it and the rate alarms count it as a call) and counted as unavailable.
                timing("EdgeLatency", (self._clock.monotonic() - started) * 1000)
                count("EdgeUnavailable")
            else:
                if answered is None:  # no slot freed up, or no time left, before the deadline
                    raise give_up(attempt - 1)
                timing("EdgeLatency", (self._clock.monotonic() - started) * 1000)
                resp, cap = answered
                status = resp.status_code
                unanswered = status in OUTAGE_STATUSES
                if not unanswered:
                    self._answered()
                if 200 <= status < 300:
                    if not resp.content and cap.broken is None:  # a 204, as Adobe's SDKs take it: no content
                        return EdgeAnswer(status, {}, attempt)
                    doc = _json_document(resp) if cap.whole else None
                    if isinstance(doc, dict) and not _too_deep(resp, doc):
                        return EdgeAnswer(status, doc, attempt)
                    # 200 and 207 mean delivered (contract §6), as does any 2xx for Adobe's SDKs, whatever the body,
                    # even one that broke off (their SDKs never send an event again once its 2xx arrived): sending it
                    # again would only duplicate the event. Kept as delivered without handles, and said so.
                    count("EdgeAnswerUnreadable")
                    logger.warning(
                        f"edge accepted the event but its answer could not be read ({cap.broken})"
                        if cap.broken is not None
                        else "edge accepted the event but its answer is not a JSON object"
                        if cap.whole
                        else f"edge accepted the event but its answer is larger than {MAX_ANSWER_BYTES} bytes",
                        status=status,
                    )
                    return EdgeAnswer(status, {}, attempt, unreadable=True)
                else:
                    problem = problem_from(resp, (token.value, token.client_id) if token is not None else ())
                    code = str(problem.get("type", ""))
                    if status == 401 and self._tokens and token is not None and not refreshed:
                        refreshed = True
                        # Expired (EXEG-0503): refresh once and retry at once. Refused otherwise (revoked, or minted
                        # before the credential's product profile or scopes were fixed): the same, once the token is
                        # old enough that a new one may differ; a cached token would otherwise be refused until it
                        # expired, up to a day, in every warm environment.
                        expired = "EXEG-0503" in code
                        fresh = self._tokens.get(
                            force_refresh=True,
                            stale=token,
                            deadline=deadline,
                            min_age_s=0.0 if expired else REFUSED_TOKEN_MIN_AGE_S,
                        )
                        if expired or fresh != token:
                            logger.info("edge refused the token, refreshed", attempt=attempt, expired=expired)
                            continue
                    if status == 401:
                        raise CredentialsError(f"edge refused the credentials: {code or status}")
                    if status == 404 and hinted:
                        # The hinted route does not exist on this host (not the event's fault): the same event at
                        # once on the plain URL, and no hint routes a call for a while. The hint is still kept.
                        self._route_plain(str(hint), "edge answered 404 on the hinted URL")
                        hinted, url = False, s.interact_url
                        continue
                    if status not in RECOVERABLE_STATUSES:
                        raise EdgeRejected(status, problem)
                    count("EdgeThrottled" if status == 429 else "EdgeUnavailable")
                    reason = f"edge answered {status} {code}".strip()
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), self._clock.now())
            # Its attempts spent, or Edge looked down when this call started and has answered nothing since: no retry
            # (in an outage, each event then costs one attempt per receive, not five and the waits between).
            if (unanswered and gated and self.is_down()) or attempt >= s.edge_max_attempts:
                raise give_up(attempt, for_good=True)
            wait = retry_after if retry_after is not None else backoff(attempt, rng=self._rng)
            if wait + MIN_ATTEMPT_S > deadline.remaining():
                raise give_up(attempt)
            count("EdgeRetries")
            logger.info("edge call will be retried", attempt=attempt, reason=reason, wait_s=round(wait, 3))
            self._clock.sleep(wait)
