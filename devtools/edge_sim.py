"""A local simulator of the Adobe Experience Platform Edge Network ``interact`` API and the IMS token endpoint.

Development tooling only, never deployed. Standard library only (``requests`` is imported lazily by
:class:`SimulatorClient`). Behaviour follows ``reference/adobe-edge-api.md`` (§2, §3, §4, §5, §7, §10):

* ``POST /ims/token/v3``: OAuth2 client-credentials stub.
* ``POST /ee/v2/interact`` and ``POST /ee/{hint}/v2/interact``: validation in Edge's order, RFC 7807
  problem bodies, visitors keyed by ECID with ``identity:result``, ``locationHint:result``,
  ``state:store`` and (on request) ``personalization:decisions`` handles.
* ``POST /ee[/{hint}]/v2/collect``: 202 ``{requestId}`` (204 with ``silent=true``).
* ``/_sim/...``: JSON control API (faults, chaos, visitors, tokens, request log, stats), mirrored by the
  Python methods of :class:`EdgeSimulator` and by :class:`SimulatorClient` for another process.

Run it: ``python -m devtools.edge_sim --port 8999 [--latency 0.05] [--no-auth]``; the first line on stdout is
its URL; it serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import copy
import email.utils
import hashlib
import http
import json
import math
import random
import re
import secrets
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

from devtools.loopback import LoopbackHandler, LoopbackService

if TYPE_CHECKING:
    import requests

FIXTURE_DIR = Path(__file__).resolve().parent / "edge_fixtures"
ERROR_TYPE_BASE = "https://ns.adobe.com/aep/errors/"
MAX_BODY_BYTES = 65536
MAX_READ_BYTES = 8 * 1024 * 1024
IDENTITY_MAX_AGE = 34128000
ACCEPTED_CONTENT_TYPES = ("application/json", "text/plain", "application/x-jackson-smile", "text/javascript")
CHAOS_KINDS = ("429", "500", "502", "503", "504", "207", "slow", "drop")
DEFAULT_CHAOS_KINDS = ("429", "503", "502", "504", "slow", "drop")
# Region ids reported in ``x-adobe-edge: <hint>;<region>`` (only ``or2;35`` is documented; others are stable stand-ins).
REGION_IDS = {"or2": 35, "va6": 7, "irl1": 6, "ind1": 8, "jpn3": 9, "sgp3": 10, "aus3": 11}

_EDGE_PATH = re.compile(r"^/ee/(?:(?P<hint>[a-z0-9]+)/)?v2/(?P<action>interact|collect)$")
_IMS_PATH = "/ims/token/v3"

# Problem bodies used for injected faults, by HTTP status (reference §3.1). Edge documents no EXEG code for 429;
# EXEG-0000-429 is a stand-in in the same family as EXEG-0000-503.
# Validation refusals carry a report with the list of what failed (reference §3.2: EXEG-0104-422 "report attached");
# an injected one says it was injected.
VALIDATION_CODES = ("EXEG-0102-400", "EXEG-0104-422")
INJECTED_VALIDATION_ERRORS = ("event.xdm: the request failed the datastream's schema (injected fault)",)
FAULT_PROBLEMS: dict[int, tuple[str, str, str]] = {
    400: ("EXEG-0102-400", "Invalid request", "The request failed validation."),
    401: ("EXEG-0503-401", "Expired token", "The access token has expired. Request a new token and try again."),
    403: ("EXEG-0400-403", "Forbidden", "Requests from this location are not allowed."),
    408: ("EXEG-0109-408", "Empty request body", "The request body is empty."),
    413: ("EXEG-0112-413", "Payload too large", "The request payload exceeds the maximum size of 64 KB."),
    415: ("EXEG-0111-415", "Unsupported media type", "The content type of the request is not supported."),
    422: (
        "EXEG-0104-422",
        "Unprocessable entity",
        "Invalid request (report attached). Please check your request and try again.",
    ),
    429: (
        "EXEG-0000-429",
        "Too many requests",
        "The request rate limit was exceeded. Retry after the delay given in the Retry-After header.",
    ),
    500: (
        "EXEG-0001-500",
        "Request processing error",
        "An unexpected error occurred while processing the request. Do not retry this request.",
    ),
    502: (
        "EXEG-0202-502",
        "Bad gateway",
        "The upstream service returned an invalid response. Try again after some time.",
    ),
    503: (
        "EXEG-0000-503",
        "Service unavailable",
        "The service is temporarily unavailable. Retry after the delay given in the Retry-After header.",
    ),
    504: (
        "EXEG-0200-504",
        "The service call has timed out.",
        "The service call to 'com.adobe.experience.platform' exceeded the allowed time and was canceled. Try again.",
    ),
}

DEFAULT_207_ERROR: dict[str, Any] = {
    "type": ERROR_TYPE_BASE + "EXEG-0201-503",
    "status": 503,
    "title": "The service is temporarily unable to serve this request. Please try again later.",
    "detail": "The service call to 'com.adobe.audiencemanager' failed: the service is temporarily unavailable.",
    "report": {"eventIndex": 0},
}

DEFAULT_WARNING: dict[str, Any] = {
    "type": ERROR_TYPE_BASE + "EXEG-0204-200",
    "status": 200,
    "title": "A warning occurred while calling the 'com.adobe.analytics' service for this request.",
    "report": {"eventIndex": 0, "cause": {"message": "Cannot process 1 event(s).", "code": 202}},
}


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_ECID_RE = re.compile(r"[0-9]{38}")


def _not_json(constant: str) -> Any:
    """NaN, Infinity and -Infinity are Python's, not JSON's (RFC 8259): Edge answers them 400 EXEG-0101."""
    raise ValueError(f"{constant} is not JSON")


def encode_identity_state(ecid: str) -> str:
    """Encode an ECID as the value of the ``kndctr_<org>_identity`` state entry (protobuf field 1, base64)."""
    raw = ecid.encode("utf-8")
    return base64.b64encode(b"\n" + _varint(len(raw)) + raw).decode("ascii")


def decode_identity_state(value: Any) -> str | None:
    """Decode an identity state value (standard or URL-safe base64, padding optional); ``None`` for garbage."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=False)
    except (ValueError, TypeError):
        return None
    if len(raw) < 3 or raw[0] != 0x0A:
        return None
    length, shift, pos = 0, 0, 1
    while pos < len(raw):
        byte = raw[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    else:
        return None
    body = raw[pos:]
    digits = re.match(rb"[0-9]*", body)
    run = digits.group() if digits else b""
    if len(run) == 38 and len(run) > length:
        # Captured Edge values (e.g. the fixture) may carry a length byte shorter than the 38-digit ECID.
        candidate = run
    elif 0 < length <= len(body):
        candidate = body[:length]
    else:
        return None
    try:
        return candidate.decode("utf-8")
    except UnicodeDecodeError:
        return None


def ecid_from_fpid(fpid: str) -> str:
    """Derive a stable 38-digit ECID from an FPID (Edge does this deterministically)."""
    n = int.from_bytes(hashlib.sha256(("fpid:" + fpid).encode("utf-8")).digest(), "big")
    return str(10**37 + n % (9 * 10**37))


def new_ecid() -> str:
    return str(10**37 + secrets.randbelow(9 * 10**37))


def org_cookie_prefix(org_id: str) -> str:
    return "kndctr_" + org_id.replace("@", "_")


def _problem(
    code: str, title: str, detail: str, report: Mapping[str, Any] | None = None, status: int | None = None
) -> dict[str, Any]:
    return {
        "type": ERROR_TYPE_BASE + code,
        "status": status if status is not None else int(code.rsplit("-", 1)[1]),
        "title": title,
        "detail": detail,
        "report": dict(report or {}),
    }


def _retry_after_value(seconds: float, http_date: bool) -> str:
    if http_date:
        return email.utils.formatdate(time.time() + seconds, usegmt=True)
    return str(max(0, math.ceil(seconds)))


def _load_fixture(name: str) -> bytes:
    path = (FIXTURE_DIR / name).resolve()
    if path.parent != FIXTURE_DIR.resolve() or not path.is_file():
        raise ValueError(f"unknown fixture {name!r}")
    return path.read_bytes()


# --------------------------------------------------------------------------------------------------------------------
# State


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    drop: bool = False
    truncate: bool = False  # send the headers and half the body, then close the connection


@dataclass
class _Visitor:
    ecid: str
    hint: str
    hint_ttl: int
    extra_entries: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0
    created: float = field(default_factory=time.time)


@dataclass
class _FaultRule:
    id: str
    status: int | None = None
    match_id: str | None = None
    match_datastream: str | None = None
    match_path: str | None = None
    times: int | None = None
    retry_after: float | None = None
    retry_after_http_date: bool = False
    delay: float = 0.0
    drop: bool = False
    truncate: bool = False
    body: str | None = None
    content_type: str | None = None
    errors: list[dict[str, Any]] | bool | None = None
    warnings: list[dict[str, Any]] | bool | None = None
    fixture: str | None = None
    before_auth: bool = True
    error_code: str | None = None
    hits: int = 0

    def matches(self, path: str, xdm_id: str | None, datastream: str | None) -> bool:
        if self.match_path is not None:
            if self.match_path not in path:
                return False
        elif path == _IMS_PATH:
            return False  # rules without match_path only apply to Edge routes
        if self.match_id is not None and self.match_id != xdm_id:
            return False
        return self.match_datastream is None or self.match_datastream == datastream

    def as_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items()}


@dataclass
class _Chaos:
    rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    kinds: tuple[str, ...] = DEFAULT_CHAOS_KINDS
    slow_delay: float = 1.0
    retry_after_max: int = 1


@dataclass
class _Ctx:
    """What the simulator learned about one Edge request while answering it."""

    path: str
    hint: str | None
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes
    arrived_at: float = 0.0  # wall-clock time the request line was read (the log's "time")
    body: Any = None
    xdm_id: str | None = None
    datastream: str | None = None
    request_id: str = ""
    ecid: str | None = None
    fault: str | None = None
    hint_mismatch: bool = False
    delay: float = 0.0
    extra_errors: list[dict[str, Any]] = field(default_factory=list)
    extra_warnings: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# Simulator


class EdgeSimulator(LoopbackService):
    """Edge Network + IMS simulator on a loopback port. Thread-safe; use as a context manager or start()/stop()."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        client_id: str = "local-client-id",
        client_secret: str = "local-client-secret",
        org_id: str = "5BFE274A5F6980A50A495C08@AdobeOrg",
        datastreams: Iterable[str] = ("ds-local",),
        token_ttl: int = 86399,
        require_auth: bool = True,
        default_hint: str = "or2",
        latency: float = 0.0,
        hint_ttl: int = 1800,
        verbose: bool = False,
        max_log: int = 50000,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.client_id = client_id
        self.client_secret = client_secret
        self.org_id = org_id
        self.datastreams = set(datastreams)
        self.token_ttl = token_ttl
        self.require_auth = require_auth
        self.default_hint = default_hint
        self.hint_ttl = hint_ttl
        self.verbose = verbose
        self._lock = threading.Lock()
        self._latency = self._initial_latency = latency
        self._tokens: dict[str, float] = {}
        self._visitors: dict[str, _Visitor] = {}
        self._faults: list[_FaultRule] = []
        self._chaos = _Chaos()
        self._log: deque[dict[str, Any]] = deque(maxlen=max_log)
        self._counters: dict[str, int] = {}
        self._by_status: dict[int, int] = {}
        self._open_sockets: set[socket.socket] = set()
        self._personalization_payload: list[Any] = []
        view = json.loads(_load_fixture("personalization-view.json"))
        for handle in view.get("handle", []):
            if handle.get("type") == "personalization:decisions":
                self._personalization_payload = handle.get("payload", [])
                break
        self._reset_counters()

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    thread_name = "edge-sim"

    def _make_server(self) -> _Server:
        server = _Server((self.host, self._requested_port), _Handler)
        server.sim = self
        return server

    def _after_shutdown(self) -> None:
        with self._lock:
            sockets = list(self._open_sockets)
            self._open_sockets.clear()
        for sock in sockets:  # close idle keep-alive connections so clients see the server go away
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator not started")
        return int(self._server.server_address[1])

    @property
    def ims_url(self) -> str:
        return self.url + _IMS_PATH

    # ---- control API -------------------------------------------------------------------------------------------

    def issue_token(self, ttl: float | None = None) -> str:
        """Mint an access token directly (as if IMS had issued it)."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.time() + (self.token_ttl if ttl is None else ttl)
        return token

    def expire_tokens(self) -> None:
        """Every token issued so far becomes expired (Edge then answers EXEG-0503-401)."""
        with self._lock:
            for token in self._tokens:
                self._tokens[token] = 0.0

    def add_fault(
        self,
        *,
        status: int | None = None,
        match_id: str | None = None,
        match_datastream: str | None = None,
        times: int | None = None,
        retry_after: float | None = None,
        retry_after_http_date: bool = False,
        delay: float = 0.0,
        drop: bool = False,
        truncate: bool = False,
        body: str | None = None,
        content_type: str | None = None,
        errors: list[dict[str, Any]] | bool | None = None,
        warnings: list[dict[str, Any]] | bool | None = None,
        fixture: str | None = None,
        before_auth: bool = True,
        error_code: str | None = None,
        match_path: str | None = None,
    ) -> str:
        """Add a fault rule; the first matching rule is applied to a request. Returns the rule id.

        ``times`` = how many requests it applies to (None: until removed). ``errors``/``warnings`` = True uses a
        default EXEG-0201-503 error / EXEG-0204-200 warning. ``truncate`` = a 200 cut off in the middle of its body.
        ``before_auth=False`` applies the rule only to requests that passed every validation. ``match_path``
        (substring) targets other routes, e.g. ``/ims/token/v3``.
        """
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        if status is not None and not 100 <= int(status) <= 599:
            raise ValueError("status must be an HTTP status code")
        if fixture is not None:
            _load_fixture(fixture)
        rule = _FaultRule(
            id="f-" + secrets.token_hex(4),
            status=None if status is None else int(status),
            match_id=match_id,
            match_datastream=match_datastream,
            match_path=match_path,
            times=times,
            retry_after=retry_after,
            retry_after_http_date=retry_after_http_date,
            delay=float(delay),
            drop=drop,
            truncate=truncate,
            body=body,
            content_type=content_type,
            errors=errors,
            warnings=warnings,
            fixture=fixture,
            before_auth=before_auth,
            error_code=error_code,
        )
        with self._lock:
            self._faults.append(rule)
        return rule.id

    def remove_fault(self, rule_id: str) -> bool:
        with self._lock:
            before = len(self._faults)
            self._faults = [r for r in self._faults if r.id != rule_id]
            return len(self._faults) != before

    def faults(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.as_dict() for r in self._faults]

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = []

    def set_chaos(
        self,
        rate: float,
        seed: int | None = None,
        kinds: Sequence[str] = DEFAULT_CHAOS_KINDS,
        slow_delay: float = 1.0,
        retry_after_max: int = 1,
    ) -> None:
        """Fail each Edge call with probability ``rate`` (kind chosen uniformly from ``kinds``); 0 turns it off."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        bad = [k for k in kinds if str(k) not in CHAOS_KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {CHAOS_KINDS}, got {bad or list(kinds)}")
        with self._lock:
            self._chaos = _Chaos(
                rate=float(rate),
                rng=random.Random(seed),
                kinds=tuple(str(k) for k in kinds),
                slow_delay=float(slow_delay),
                retry_after_max=int(retry_after_max),
            )

    def set_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency = max(0.0, float(seconds))

    def reset(self, full: bool = False) -> None:
        """Clear faults, chaos, the request log and counters and restore the start-up latency.

        ``full=True`` also forgets visitors and tokens.
        """
        with self._lock:
            self._faults = []
            self._chaos = _Chaos()
            self._latency = self._initial_latency
            self._log.clear()
            self._reset_counters()
            if full:
                self._visitors.clear()
                self._tokens.clear()

    def move_visitor(self, ecid: str, hint: str, *, ttl_seconds: int | None = None) -> None:
        """Future answers for this visitor carry ``hint`` (and ``ttl_seconds`` when given)."""
        if not re.fullmatch(r"[a-z0-9]+", hint):
            raise ValueError("hint must match [a-z0-9]+")
        with self._lock:
            visitor = self._visitor(ecid)
            visitor.hint = hint
            if ttl_seconds is not None:
                visitor.hint_ttl = int(ttl_seconds)

    def queue_state_entries(self, ecid: str, entries: Sequence[Mapping[str, Any]]) -> None:
        """Append extra ``state:store`` items to every answer for this visitor until cleared."""
        items = [dict(e) for e in entries]
        if any("key" not in e for e in items):
            raise ValueError("every entry needs a key")
        with self._lock:
            self._visitor(ecid).extra_entries.extend(items)

    def clear_state_entries(self, ecid: str) -> None:
        with self._lock:
            visitor = self._visitors.get(ecid)
            if visitor is not None:
                visitor.extra_entries = []

    def visitors(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {
                v.ecid: {
                    "hint": v.hint,
                    "hint_ttl": v.hint_ttl,
                    "extra_entries": copy.deepcopy(v.extra_entries),
                    "events": v.events,
                }
                for v in self._visitors.values()
            }

    def requests_log(self) -> list[dict[str, Any]]:
        """Every Edge/IMS request received, oldest first (status 0 = connection dropped without an answer)."""
        with self._lock:
            return copy.deepcopy(list(self._log))

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._counters)
            out["by_status"] = dict(self._by_status)
            return out

    # ---- internals ---------------------------------------------------------------------------------------------

    def _reset_counters(self) -> None:
        self._counters = dict.fromkeys(
            (
                "ims_requests",
                "interact_requests",
                "collect_requests",
                "connections",
                "hint_mismatches",
                "faults_applied",
                "chaos_applied",
                "dropped",
            ),
            0,
        )
        self._by_status = {}

    def _visitor(self, ecid: str) -> _Visitor:
        visitor = self._visitors.get(ecid)
        if visitor is None:
            visitor = self._visitors[ecid] = _Visitor(ecid=ecid, hint=self.default_hint, hint_ttl=self.hint_ttl)
        return visitor

    def _on_connection(self, sock: socket.socket) -> None:
        with self._lock:
            self._counters["connections"] += 1
            self._open_sockets.add(sock)

    def _on_close(self, sock: socket.socket) -> None:
        with self._lock:
            self._open_sockets.discard(sock)

    def _latency_now(self) -> float:
        with self._lock:
            return self._latency

    def _record(self, entry: dict[str, Any], status: int) -> None:
        # caller holds the lock
        entry["status"] = status
        self._log.append(entry)
        self._by_status[status] = self._by_status.get(status, 0) + 1
        if status == 0:
            self._counters["dropped"] += 1

    # ---- IMS ---------------------------------------------------------------------------------------------------

    def _handle_ims(self, query: dict[str, str], headers: dict[str, str], raw: bytes, arrived_at: float) -> _Reply:
        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}
        params = {**query, **form}
        logged = dict(params)
        if "client_secret" in logged:
            logged["client_secret"] = "***"
        entry: dict[str, Any] = {
            "path": _IMS_PATH,
            "hint": None,
            "query": dict(query),
            "headers": headers,
            "body": logged,
            "size": len(raw),
            "xdm_id": None,
            "ecid": None,
            "request_id": None,
            "fault": None,
            "hint_mismatch": False,
            "time": arrived_at,
        }
        with self._lock:
            self._counters["ims_requests"] += 1
            rule = self._take_rule(_IMS_PATH, None, None, before=True)
            reply = self._ims_rule_reply(rule) if rule is not None else None
            if reply is None:
                reply = self._ims_answer(params)
            if rule is not None:
                entry["fault"] = rule.id
                reply.delay += rule.delay
            self._record(entry, 0 if reply.drop else reply.status)
            return reply

    def _ims_rule_reply(self, rule: _FaultRule) -> _Reply | None:
        """An injected IMS failure in IMS's own shape, an OAuth 2.0 error (RFC 6749 §5.2; reference §7), never Edge's
        problem document. A rule with its own body or fixture, a drop or a cut-off answer is served as it says."""
        served_as_set = rule.body is not None or rule.fixture is not None or rule.drop or rule.truncate
        if rule.status is None or rule.status < 400 or served_as_set:
            return self._rule_reply(rule, "")
        error = rule.error_code or (
            "invalid_client" if rule.status == 401 else "invalid_request" if rule.status < 500 else "server_error"
        )
        headers: list[tuple[str, str]] = []
        if rule.retry_after is not None:
            headers.append(("Retry-After", _retry_after_value(rule.retry_after, rule.retry_after_http_date)))
        body = _json_bytes({"error": error, "error_description": "Injected fault."})
        return _Reply(rule.status, body, "application/json", headers)

    def _ims_answer(self, params: dict[str, str]) -> _Reply:
        def oauth_error(status: int, error: str, description: str) -> _Reply:
            return _Reply(status, _json_bytes({"error": error, "error_description": description}))

        grant = params.get("grant_type")
        if not grant:
            return oauth_error(400, "invalid_request", "missing required parameter grant_type")
        if grant != "client_credentials":
            return oauth_error(400, "unsupported_grant_type", f"grant_type {grant!r} is not supported")
        missing = [k for k in ("client_id", "client_secret", "scope") if k not in params]
        if missing:
            return oauth_error(400, "invalid_request", "missing required parameter(s): " + ", ".join(missing))
        if params["client_id"] != self.client_id or params["client_secret"] != self.client_secret:
            return oauth_error(401, "invalid_client", "invalid client credentials")
        token = secrets.token_urlsafe(32)
        self._tokens[token] = time.time() + self.token_ttl
        return _Reply(200, _json_bytes({"access_token": token, "token_type": "bearer", "expires_in": self.token_ttl}))

    # ---- Edge --------------------------------------------------------------------------------------------------

    def _handle_edge(self, path: str, hint: str | None, action: str, ctx: _Ctx) -> _Reply:
        given = ctx.query.get("requestId") or ctx.headers.get("x-request-id") or str(uuid.uuid4())
        ctx.request_id = f"{given}-{secrets.token_hex(8)}"
        try:
            ctx.body = json.loads(ctx.raw, parse_constant=_not_json) if ctx.raw else None
        except (ValueError, UnicodeDecodeError):
            ctx.body = None
        ctx.xdm_id = _xdm_id(ctx.body)
        ctx.datastream = ctx.query.get("datastreamId") or ctx.query.get("dataStreamId") or None
        entry: dict[str, Any] = {
            "path": path,
            "hint": hint,
            "query": dict(ctx.query),
            "headers": ctx.headers,
            "body": ctx.body,
            "size": len(ctx.raw),
            "xdm_id": ctx.xdm_id,
            "ecid": None,
            "request_id": ctx.request_id,
            "fault": None,
            "hint_mismatch": False,
            "time": ctx.arrived_at,
        }
        with self._lock:
            self._counters[f"{action}_requests"] += 1
            reply = self._edge_answer(path, action, ctx)
            entry.update(ecid=ctx.ecid, fault=ctx.fault, hint_mismatch=ctx.hint_mismatch)
            if ctx.hint_mismatch:
                self._counters["hint_mismatches"] += 1
            self._record(entry, 0 if reply.drop else reply.status)
            visitor = self._visitors.get(ctx.ecid) if ctx.ecid else None
            edge_hint = visitor.hint if visitor is not None else (hint or self.default_hint)
        reply.delay += ctx.delay
        if not reply.drop:
            reply.headers.append(("x-adobe-edge", f"{edge_hint};{_region(edge_hint)}"))
        return reply

    def _problem_reply(self, problem: dict[str, Any], headers: list[tuple[str, str]] | None = None) -> _Reply:
        return _Reply(int(problem["status"]), _json_bytes(problem), "application/problem+json", headers or [])

    def _edge_answer(self, path: str, action: str, ctx: _Ctx) -> _Reply:
        """Validate in Edge's order and answer. Caller holds the lock."""
        rid = {"requestId": ctx.request_id}
        # 1. faults and chaos that apply before validation
        reply = self._apply_faults(path, ctx, before=True)
        if reply is not None:
            return reply
        reply = self._apply_chaos(ctx)
        if reply is not None:
            return reply
        # 2. content type
        content_type = ctx.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type not in ACCEPTED_CONTENT_TYPES:
            return self._problem_reply(
                _problem(
                    "EXEG-0111-415",
                    "Unsupported media type",
                    f"The content type '{content_type or '(none)'}' is not supported. "
                    f"Use one of: {', '.join(ACCEPTED_CONTENT_TYPES)}.",
                    rid,
                )
            )
        # 3. authentication
        if self.require_auth:
            reply = self._check_auth(ctx, rid)
            if reply is not None:
                return reply
        # 4. datastream
        if not ctx.datastream:
            return self._problem_reply(
                _problem(
                    "EXEG-0002-400",
                    "Missing datastream ID",
                    "The datastream ID is missing from the request. Add the datastreamId query parameter and try "
                    "again.",
                    rid,
                )
            )
        if ctx.datastream not in self.datastreams:
            return self._problem_reply(
                _problem(
                    "EXEG-0003-400",
                    "Invalid datastream ID",
                    f"The datastream ID '{ctx.datastream}' referenced in your request does not exist. Update the "
                    "request with a valid datastream ID and try again.",
                    rid,
                )
            )
        # 5. body
        if not ctx.raw:
            return self._problem_reply(
                _problem("EXEG-0109-408", "Empty request body", "The request body is empty.", rid)
            )
        if len(ctx.raw) > MAX_BODY_BYTES:
            return self._problem_reply(
                _problem(
                    "EXEG-0112-413",
                    "Payload too large",
                    f"The request payload ({len(ctx.raw)} bytes) exceeds the maximum size of {MAX_BODY_BYTES} bytes.",
                    rid,
                )
            )
        if ctx.body is None:
            return self._problem_reply(
                _problem("EXEG-0101-400", "Malformed request", "The request body could not be parsed as JSON.", rid)
            )
        events: list[Any]
        if action == "collect":
            if not isinstance(ctx.body, dict) or not isinstance(ctx.body.get("events"), list):
                return self._invalid("events", "must be an array of events", rid)
            events = ctx.body["events"]
        else:
            events = [ctx.body.get("event") if isinstance(ctx.body, dict) else None]
            if not isinstance(ctx.body, dict):
                return self._invalid("$", "the request body must be a JSON object", rid)
        for index, event in enumerate(events):
            where = "event" if action == "interact" else f"events[{index}]"
            if not isinstance(event, dict):
                return self._invalid(where, "is required and must be an object", rid)
            if not isinstance(event.get("xdm"), dict):
                return self._invalid(f"{where}.xdm", "is required and must be an object", rid)
        # 6. primary identity: exactly one per event (reference §1.2: "must mark exactly one identity primary: true;
        # otherwise 400 EXEG-0306")
        primaries = [_primary_identity(e["xdm"]) for e in events]
        if any(p is None for p in primaries) or any(_primary_count(e["xdm"]) > 1 for e in events):
            return self._problem_reply(
                _problem(
                    "EXEG-0306-400",
                    "No primary identity set in request (event)",
                    "No primary identity found in the input event. Update the request accordingly to your schema "
                    "and try again.",
                    {"requestId": ctx.request_id, "configId": ctx.datastream, "orgId": self.org_id},
                )
            )
        # faults that apply after validation
        reply = self._apply_faults(path, ctx, before=False)
        if reply is not None:
            return reply
        if action == "collect":
            if ctx.query.get("silent", "").lower() == "true":
                return _Reply(204, b"", None)
            return _Reply(202, _json_bytes({"requestId": ctx.request_id}))
        return self._success(ctx, cast(dict[str, Any], ctx.body))

    def _invalid(self, where: str, message: str, rid: dict[str, Any]) -> _Reply:
        problem = _problem("EXEG-0102-400", "Invalid request", f"The value at path '{where}' {message}.", rid)
        problem["report"]["errors"] = [f"{where}: {message}"]
        return self._problem_reply(problem)

    def _check_auth(self, ctx: _Ctx, rid: dict[str, Any]) -> _Reply | None:
        auth = ctx.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            return self._problem_reply(
                _problem(
                    "EXEG-0500-401",
                    "Unauthorized",
                    "The Authorization header is missing or malformed; expected 'Authorization: Bearer <token>'.",
                    rid,
                )
            )
        expiry = self._tokens.get(token)
        if expiry is None:
            return self._problem_reply(
                _problem("EXEG-0502-401", "Invalid token", "The access token is invalid (bad signature).", rid)
            )
        if time.time() >= expiry:
            return self._problem_reply(
                _problem("EXEG-0503-401", "Expired token", "The access token has expired. Request a new one.", rid)
            )
        api_key = ctx.headers.get("x-api-key")
        if api_key != self.client_id:
            return self._problem_reply(
                _problem(
                    "EXEG-0500-401",
                    "Unauthorized",
                    "The x-api-key header is missing or does not match the client id of the credential.",
                    rid,
                )
            )
        org = ctx.headers.get("x-gw-ims-org-id")
        if org != self.org_id:
            return self._problem_reply(
                _problem(
                    "EXEG-0500-401",
                    "Unauthorized",
                    "The x-gw-ims-org-id header is missing or does not match the organization of the credential.",
                    rid,
                )
            )
        return None

    # ---- faults ------------------------------------------------------------------------------------------------

    def _take_rule(self, path: str, xdm_id: str | None, datastream: str | None, *, before: bool) -> _FaultRule | None:
        for rule in self._faults:
            if rule.before_auth != before or not rule.matches(path, xdm_id, datastream):
                continue
            rule.hits += 1
            if rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    self._faults.remove(rule)
            self._counters["faults_applied"] += 1
            return rule
        return None

    def _apply_faults(self, path: str, ctx: _Ctx, *, before: bool) -> _Reply | None:
        rule = self._take_rule(path, ctx.xdm_id, ctx.datastream, before=before)
        if rule is None:
            return None
        ctx.fault = rule.id
        ctx.delay += rule.delay
        reply = self._rule_reply(rule, ctx.request_id)
        if reply is not None:
            return reply
        # modifiers of a successful answer
        if rule.errors or rule.status == 207:
            errors = rule.errors if isinstance(rule.errors, list) and rule.errors else [DEFAULT_207_ERROR]
            ctx.extra_errors.extend(copy.deepcopy(errors))
        if rule.warnings:
            warnings = rule.warnings if isinstance(rule.warnings, list) else [DEFAULT_WARNING]
            ctx.extra_warnings.extend(copy.deepcopy(warnings))
        return None

    def _rule_reply(self, rule: _FaultRule, request_id: str) -> _Reply | None:
        """The terminal answer a rule gives, or None when it only modifies (delays, 207, warnings) the answer."""
        headers: list[tuple[str, str]] = []
        if rule.retry_after is not None:
            headers.append(("Retry-After", _retry_after_value(rule.retry_after, rule.retry_after_http_date)))
        if rule.drop:
            return _Reply(0, drop=True)
        if rule.truncate:  # a 200 cut off in the middle of its body (a connection lost while the answer is read)
            return _Reply(200, _json_bytes({"requestId": request_id, "handle": []}), truncate=True)
        if rule.fixture is not None:
            fixture_status = json.loads(_load_fixture(rule.fixture)).get("status")
            # An error fixture (an RFC 7807 problem) is served with its own status, as Edge serves it; others as 200.
            status = rule.status or (fixture_status if isinstance(fixture_status, int) else 200)
            ctype = rule.content_type or ("application/json" if status < 400 else "application/problem+json")
            return _Reply(status, _load_fixture(rule.fixture), ctype, headers)
        if rule.body is not None:
            return _Reply(
                rule.status or 502,
                rule.body.encode("utf-8"),
                rule.content_type or "text/html; charset=utf-8",
                headers,
            )
        if rule.status is None or rule.status in (200, 207):
            return None
        code, title, detail = FAULT_PROBLEMS.get(
            rule.status,
            (f"EXEG-0001-{rule.status}", http.HTTPStatus(rule.status).phrase, "Injected fault."),
        )
        if rule.error_code:
            code = rule.error_code
        report: dict[str, Any] = {"requestId": request_id} if request_id else {}
        if rule.status == 422:
            report["orgId"] = self.org_id
        if code in VALIDATION_CODES:  # a validation report (reference §3.2): its list of messages
            report["errors"] = list(INJECTED_VALIDATION_ERRORS)
        problem = _problem(code, title, detail, report, status=rule.status)
        return self._problem_reply(problem, headers)

    def _apply_chaos(self, ctx: _Ctx) -> _Reply | None:
        chaos = self._chaos
        if chaos.rate <= 0.0 or chaos.rng.random() >= chaos.rate:
            return None
        kind = chaos.rng.choice(chaos.kinds)
        self._counters["chaos_applied"] += 1
        ctx.fault = f"chaos:{kind}"
        if kind == "slow":
            ctx.delay += chaos.slow_delay
            return None
        if kind == "drop":
            return _Reply(0, drop=True)
        if kind == "207":
            ctx.extra_errors.append(copy.deepcopy(DEFAULT_207_ERROR))
            return None
        status = int(kind)
        headers: list[tuple[str, str]] = []
        if status in (429, 503):
            seconds = chaos.rng.randint(0, max(0, chaos.retry_after_max))
            headers.append(("Retry-After", _retry_after_value(seconds, chaos.rng.random() < 0.3)))
        code, title, detail = FAULT_PROBLEMS[status]
        return self._problem_reply(_problem(code, title, detail, {"requestId": ctx.request_id}), headers)

    # ---- success -----------------------------------------------------------------------------------------------

    def _resolve_ecid(self, xdm: dict[str, Any], body: dict[str, Any]) -> str:
        identity_key = org_cookie_prefix(self.org_id) + "_identity"
        meta = body.get("meta")
        state = meta.get("state") if isinstance(meta, dict) else None
        entries = state.get("entries") if isinstance(state, dict) else None
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and entry.get("key") == identity_key:
                    ecid = decode_identity_state(entry.get("value"))
                    # The value carries its own ECID (reference §5): one this simulator never issued (real Edge's,
                    # an earlier run's) is a visitor too, as it would be for Edge.
                    if ecid is not None and (ecid in self._visitors or _ECID_RE.fullmatch(ecid)):
                        return ecid
        identity_map = xdm.get("identityMap")
        if isinstance(identity_map, dict):
            for namespace in ("ECID", "FPID"):  # an ECID wins over an FPID
                for item in identity_map.get(namespace) or []:
                    if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]:
                        return item["id"] if namespace == "ECID" else ecid_from_fpid(item["id"])
        return new_ecid()

    def _success(self, ctx: _Ctx, body: dict[str, Any]) -> _Reply:
        xdm = body["event"]["xdm"]
        ecid = self._resolve_ecid(xdm, body)
        visitor = self._visitor(ecid)
        visitor.events += 1
        ctx.ecid = ecid
        ctx.hint_mismatch = ctx.hint is not None and ctx.hint != visitor.hint
        prefix = org_cookie_prefix(self.org_id)
        handles: list[dict[str, Any]] = []
        raw_query = body.get("query")
        query: dict[str, Any] = raw_query if isinstance(raw_query, dict) else {}
        raw_identity = query.get("identity")
        identity_query: dict[str, Any] = raw_identity if isinstance(raw_identity, dict) else {}
        fetch = identity_query.get("fetch")
        if isinstance(fetch, list) and "ECID" in fetch:
            handles.append({"type": "identity:result", "payload": [{"id": ecid, "namespace": {"code": "ECID"}}]})
        handles.append(
            {
                "type": "locationHint:result",
                "payload": [
                    {"scope": "Target", "hint": "35", "ttlSeconds": 1800},
                    {"scope": "AAM", "hint": "9", "ttlSeconds": 1800},
                    {"scope": "EdgeNetwork", "hint": visitor.hint, "ttlSeconds": visitor.hint_ttl},
                ],
            }
        )
        # Each key once, as Edge gives it: a queued entry under a key of the simulator's own (deleting the cluster
        # entry, say) takes its place.
        entries = {
            prefix + "_identity": {
                "key": prefix + "_identity",
                "value": encode_identity_state(ecid),
                "maxAge": IDENTITY_MAX_AGE,
            },
            prefix + "_cluster": {"key": prefix + "_cluster", "value": visitor.hint, "maxAge": visitor.hint_ttl},
        }
        for extra in copy.deepcopy(visitor.extra_entries):
            entries[extra["key"]] = extra
        handles.append({"type": "state:store", "payload": list(entries.values())})
        if "personalization" in query:
            handles.append(
                {
                    "type": "personalization:decisions",
                    "payload": copy.deepcopy(self._personalization_payload),
                    "eventIndex": 0,
                }
            )
        answer: dict[str, Any] = {"requestId": ctx.request_id, "handle": handles}
        if ctx.extra_errors:
            answer["errors"] = ctx.extra_errors
        if ctx.extra_warnings:
            answer["warnings"] = ctx.extra_warnings
        return _Reply(207 if ctx.extra_errors else 200, _json_bytes(answer))

    # ---- control over HTTP -------------------------------------------------------------------------------------

    def _handle_control(self, method: str, path: str, raw: bytes) -> _Reply:
        try:
            args = json.loads(raw) if raw.strip() else {}
            if not isinstance(args, dict):
                raise ValueError("the body must be a JSON object")
            result = self._control(method, path, args)
        except KeyError:
            return _Reply(404, _json_bytes({"error": f"unknown control route {method} {path}"}))
        except (TypeError, ValueError) as exc:
            return _Reply(400, _json_bytes({"error": str(exc)}))
        return _Reply(200, _json_bytes(result))

    def _control(self, method: str, path: str, args: dict[str, Any]) -> Any:
        name = path[len("/_sim/") :].strip("/")
        if method == "GET":
            readers: dict[str, Any] = {
                "health": lambda: {"ok": True, "url": self.url},
                "requests": lambda: {"requests": self.requests_log()},
                "stats": lambda: _stringify_status(self.stats()),
                "visitors": lambda: {"visitors": self.visitors()},
                "faults": lambda: {"faults": self.faults()},
            }
            return readers[name]()
        if method != "POST":
            raise KeyError(name)
        if name == "faults":
            return {"id": self.add_fault(**args)}
        if name == "faults/remove":
            return {"removed": self.remove_fault(str(args["id"]))}
        actions: dict[str, Any] = {
            "faults/clear": self.clear_faults,
            "chaos": self.set_chaos,
            "reset": self.reset,
            "latency": self.set_latency,
            "visitors/move": self.move_visitor,
            "visitors/state": self.queue_state_entries,
            "visitors/state/clear": self.clear_state_entries,
            "tokens/expire": self.expire_tokens,
        }
        if name == "tokens":
            return {"access_token": self.issue_token(**args)}
        actions[name](**args)
        return {"ok": True}


def _stringify_status(stats: dict[str, Any]) -> dict[str, Any]:
    out = dict(stats)
    out["by_status"] = {str(k): v for k, v in stats["by_status"].items()}
    return out


def _xdm_id(body: Any) -> str | None:
    if isinstance(body, dict):
        event = body.get("event")
        if not isinstance(event, dict) and isinstance(body.get("events"), list) and body["events"]:
            event = body["events"][0]
        xdm = event.get("xdm") if isinstance(event, dict) else None
        if isinstance(xdm, dict) and isinstance(xdm.get("_id"), str):
            return cast(str, xdm["_id"])
    return None


def _primary_identity(xdm: dict[str, Any]) -> tuple[str, str] | None:
    identity_map = xdm.get("identityMap")
    if not isinstance(identity_map, dict):
        return None
    for namespace, items in identity_map.items():
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict) and item.get("primary") is True and isinstance(item.get("id"), str):
                    # an identity needs its id (reference §1.2): an empty one names nobody
                    return (namespace, item["id"]) if item["id"] else None
    return None


def _primary_count(xdm: dict[str, Any]) -> int:
    identity_map = xdm.get("identityMap")
    if not isinstance(identity_map, dict):
        return 0
    items = [item for values in identity_map.values() if isinstance(values, list) for item in values]
    return sum(1 for item in items if isinstance(item, dict) and item.get("primary") is True)


def _region(hint: str) -> int:
    return REGION_IDS.get(hint, zlib.crc32(hint.encode()) % 90 + 10)


# --------------------------------------------------------------------------------------------------------------------
# HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    sim: EdgeSimulator

    def server_bind(self) -> None:
        # skip HTTPServer.server_bind's getfqdn() (a reverse DNS lookup) and keep startup instant
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.sim._on_connection(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.sim._on_close(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # client went away (timeouts, resets): expected in fault tests
        super().handle_error(request, client_address)


class _Handler(LoopbackHandler):
    server_version = "EdgeSimulator/1.0"
    timeout = 300  # idle keep-alive connections are closed after this many seconds
    _arrived = 0.0  # when the request line was read (`parse_request`)
    _arrived_at = 0.0  # the same, wall-clock
    _headers_buffer: list[bytes]  # BaseHTTPRequestHandler's: where send_header puts the lines end_headers writes

    @property
    def sim(self) -> EdgeSimulator:
        return cast(_Server, self.server).sim

    def log_message(self, format: str, *args: Any) -> None:
        if self.sim.verbose:
            sys.stderr.write(f"edge-sim {self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(chunks)
                chunks += self.rfile.read(size)
                self.rfile.readline(65537)
                if len(chunks) > MAX_READ_BYTES:
                    return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        if length < 0 or length > MAX_READ_BYTES:
            return None
        return self.rfile.read(length) if length else b""

    def parse_request(self) -> bool:
        # Called as soon as the request line is read: the request has arrived, and the simulator's own work from here
        # on (headers, body, the answer) is part of its latency.
        self._arrived = time.monotonic()
        # The log's "time": when the request came, not when its body had been read. A stall of this thread while
        # reading would otherwise put a call later than it came, and two calls closer than the latency between them.
        self._arrived_at = time.time()
        return super().parse_request()

    def _dispatch(self, method: str) -> None:
        sim = self.sim
        arrived = self._arrived  # latency counts from here: the answer leaves `latency` s after the request came
        split = urlsplit(self.path)
        path = split.path
        try:
            raw = self._read_body()
        except (ValueError, OSError):
            raw = None
        if raw is None:
            self.close_connection = True
            self._send(_Reply(400, _json_bytes({"error": "unreadable request body"})))
            return
        if path.startswith("/_sim/"):
            self._send(sim._handle_control(method, path, raw))
            return
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers = {k.lower(): v for k, v in self.headers.items()}
        match = _EDGE_PATH.match(path)
        if path == _IMS_PATH or match:
            if method != "POST":
                reply = self._not_found(405, "Method not allowed", f"{method} is not allowed on {path}; use POST.")
                reply.headers.append(("Allow", "POST"))
                self._send(reply)
                return
            latency = sim._latency_now()
            if path == _IMS_PATH:
                reply = sim._handle_ims(query, headers, raw, self._arrived_at)
            else:
                assert match is not None
                ctx = _Ctx(
                    path=path, hint=match["hint"], query=query, headers=headers, raw=raw, arrived_at=self._arrived_at
                )
                reply = sim._handle_edge(path, match["hint"], match["action"], ctx)
            if reply.drop or reply.truncate:
                self._pause(arrived, latency + reply.delay)
                self._drop() if reply.drop else self._send(reply)
                return
            # The answer is rendered before the pause and leaves in one write when it ends, so that it leaves
            # `latency` s after the request came, not that plus the time to format it.
            answer = self._render(reply)
            self._pause(arrived, latency + reply.delay)
            self._write(answer)
            return
        self._send(self._not_found(404, "Not found", f"No route for {method} {path}."))

    @staticmethod
    def _not_found(status: int, title: str, detail: str) -> _Reply:
        body = {"type": "about:blank", "status": status, "title": title, "detail": detail}
        return _Reply(status, _json_bytes(body), "application/problem+json")

    @staticmethod
    def _pause(arrived: float, seconds: float) -> None:
        pause = seconds - (time.monotonic() - arrived)  # the simulator's own work is part of it
        if pause > 0:
            time.sleep(pause)

    def _render(self, reply: _Reply) -> bytes:
        """The whole answer, status line to body, as `_send` would write it."""
        self.send_response(reply.status)
        if reply.content_type:
            self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        if self.request_version == "HTTP/0.9":  # no status line, no headers (send_response wrote none)
            return reply.body
        head = b"".join(self._headers_buffer) + b"\r\n"
        self._headers_buffer = []
        return head + reply.body

    def _write(self, answer: bytes) -> None:
        try:
            self.wfile.write(answer)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _send(self, reply: _Reply) -> None:
        answer = self._render(reply)
        if not reply.truncate:
            self._write(answer)
            return
        try:  # the headers and half the body, then the connection closes
            self.wfile.write(answer[: len(answer) - len(reply.body) + len(reply.body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            self.close_connection = True

    def _drop(self) -> None:
        """Close the connection without an answer; SO_LINGER 0 makes it a reset."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------------------------
# Client for a simulator running in another process


class SimulatorClient:
    """Drive a simulator over its ``/_sim`` HTTP API; the same methods as :class:`EdgeSimulator`."""

    def __init__(self, base_url: str, *, timeout: float = 5.0) -> None:
        import requests as _requests

        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session: requests.Session = _requests.Session()

    @property
    def url(self) -> str:
        return self.base_url

    @property
    def ims_url(self) -> str:
        return self.base_url + _IMS_PATH

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> SimulatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, route: str, payload: Mapping[str, Any] | None = None) -> Any:
        resp = self._session.request(
            method,
            f"{self.base_url}/_sim/{route}",
            json=dict(payload) if payload is not None else None,
            timeout=self.timeout,
        )
        if resp.status_code != 200:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text
            if resp.status_code == 400:
                raise ValueError(message)
            resp.raise_for_status()
        return resp.json()

    def health(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._call("GET", "health"))

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll ``/_sim/health`` until the simulator answers (e.g. right after starting its process)."""
        import requests as _requests

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.health()
                return
            except _requests.RequestException:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def issue_token(self, ttl: float | None = None) -> str:
        return str(self._call("POST", "tokens", {"ttl": ttl})["access_token"])

    def expire_tokens(self) -> None:
        self._call("POST", "tokens/expire")

    def add_fault(self, **kwargs: Any) -> str:
        return str(self._call("POST", "faults", kwargs)["id"])

    def remove_fault(self, rule_id: str) -> bool:
        return bool(self._call("POST", "faults/remove", {"id": rule_id})["removed"])

    def faults(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "faults")["faults"])

    def clear_faults(self) -> None:
        self._call("POST", "faults/clear")

    def set_chaos(
        self,
        rate: float,
        seed: int | None = None,
        kinds: Sequence[str] = DEFAULT_CHAOS_KINDS,
        slow_delay: float = 1.0,
        retry_after_max: int = 1,
    ) -> None:
        self._call(
            "POST",
            "chaos",
            {
                "rate": rate,
                "seed": seed,
                "kinds": list(kinds),
                "slow_delay": slow_delay,
                "retry_after_max": retry_after_max,
            },
        )

    def set_latency(self, seconds: float) -> None:
        self._call("POST", "latency", {"seconds": seconds})

    def reset(self, full: bool = False) -> None:
        self._call("POST", "reset", {"full": full})

    def move_visitor(self, ecid: str, hint: str, *, ttl_seconds: int | None = None) -> None:
        self._call("POST", "visitors/move", {"ecid": ecid, "hint": hint, "ttl_seconds": ttl_seconds})

    def queue_state_entries(self, ecid: str, entries: Sequence[Mapping[str, Any]]) -> None:
        self._call("POST", "visitors/state", {"ecid": ecid, "entries": [dict(e) for e in entries]})

    def clear_state_entries(self, ecid: str) -> None:
        self._call("POST", "visitors/state/clear", {"ecid": ecid})

    def visitors(self) -> dict[str, dict[str, Any]]:
        return cast(dict[str, dict[str, Any]], self._call("GET", "visitors")["visitors"])

    def requests_log(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "requests")["requests"])

    def stats(self) -> dict[str, Any]:
        out = cast(dict[str, Any], self._call("GET", "stats"))
        out["by_status"] = {int(k): v for k, v in out["by_status"].items()}
        return out


# --------------------------------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.edge_sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every Edge/IMS answer")
    parser.add_argument("--no-auth", action="store_true", help="accept Edge calls without IMS credentials")
    parser.add_argument("--client-id", default="local-client-id")
    parser.add_argument("--client-secret", default="local-client-secret")
    parser.add_argument("--org-id", default="5BFE274A5F6980A50A495C08@AdobeOrg")
    parser.add_argument("--datastream", action="append", help="known datastream id (repeatable; default ds-local)")
    parser.add_argument("--token-ttl", type=int, default=86399)
    parser.add_argument("--hint", default="or2", help="default EdgeNetwork location hint")
    parser.add_argument("--verbose", action="store_true", help="log every request on stderr")
    args = parser.parse_args(argv)

    sim = EdgeSimulator(
        args.host,
        args.port,
        client_id=args.client_id,
        client_secret=args.client_secret,
        org_id=args.org_id,
        datastreams=args.datastream or ("ds-local",),
        token_ttl=args.token_ttl,
        require_auth=not args.no_auth,
        default_hint=args.hint,
        latency=args.latency,
        verbose=args.verbose,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sim.start()
    print(sim.url, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
