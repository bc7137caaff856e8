"""`POST /events` on the HTTP API (contract §5, §7). Errors map to responses in one table."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from math import floor
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
from standardwebhooks.webhooks import Webhook, hmac_data

from relay.clock import Clock, Deadline
from relay.errors import CredentialsError, InvalidEvent, StoreUnavailable, Unauthorized
from relay.identity_state import IdentityState
from relay.integrations.aws_clients import SQS_WORST_CASE_S
from relay.integrations.credentials import CredentialsStore
from relay.integrations.queue import RetryQueue
from relay.integrations.store import RELAY
from relay.models import (
    DATASTREAM_DETAIL,
    InboundEvent,
    as_dict,
    bounded_id,
    check_size_as_sent,
    datastream_for_rejection,
    datastream_name,
    read_event,
)
from relay.observability import count, logger
from relay.process_event import Outcome, Relay, Result, edge_status_of
from relay.settings import Settings

PROBLEM = "application/problem+json"
NOT_HTTP_API = "not an HTTP API 2.0 event"
_ENQUEUE_RESERVE_S = 0.75  # time kept back from Edge retries to enqueue the event if Edge stays down
# An HTTP API's integration timeout is at most 30 s: past it the sender gets API Gateway's 503, whatever the function
# then does. The Edge attempts end early enough for the fallback (the queue send at its worst, and the writes around
# it) to answer before that, and before the function's own timeout, whatever WEBHOOK_DEADLINE_MS says. (A cold
# start's init phase counts towards API Gateway's 30 s too, unseen here: about half a second for the relay.)
API_GATEWAY_TIMEOUT_S = 30.0
FALLBACK_WORST_S = SQS_WORST_CASE_S + 1.0


def problem(status: int, title: str, detail: str, **extra: Any) -> Response:
    body = {"type": extra.pop("type", "about:blank"), "title": title, "status": status, "detail": detail, **extra}
    headers = {"Retry-After": str(extra.get("retryAfter"))} if "retryAfter" in extra else None
    return Response(status_code=status, content_type=PROBLEM, body=json.dumps(body), headers=headers)


_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # ASCII digits only (`\d` would take other scripts' digits too)
_SIGNATURE_ENTRIES = re.compile(r" |,(?=v[0-9]+[a-z]?,)")  # a space, or a comma joining two header lines


class _SignedBytes(Webhook):
    """The library's check (headers, tolerance, every signature compared in constant time) over a body's bytes as
    received. The library signs text (`f"{id}.{timestamp}.{body}".encode()`), so a body that is not UTF-8 could never
    match: a sender whose signature is right would be told 401 rather than the 400, kept as a rejection, that its body
    deserves. Given the body decoded with `surrogateescape`, this signs exactly its bytes (a test checks that it signs
    any UTF-8 body as the library does)."""

    def sign(self, msg_id: str, timestamp: datetime, data: str) -> str:
        seconds = floor(timestamp.replace(tzinfo=UTC).timestamp())
        signed = f"{msg_id}.{seconds}.".encode() + data.encode("utf-8", "surrogateescape")
        return "v1," + base64.b64encode(hmac_data(self._whsecret, signed)).decode("ascii")


def _well_formed_signature(entry: str) -> bool:
    """`v1,<base64>`: the only entries the library can read without raising."""
    version, _, signature = entry.partition(",")
    if version != "v1" or not signature:
        return False
    try:
        base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def ok(status: int, body: dict[str, Any] | str) -> Response:
    """A JSON answer: `body` as a document, or as its JSON text already encoded."""
    text = body if isinstance(body, str) else json.dumps(body)
    return Response(status_code=status, content_type="application/json", body=text)


# Lambda refuses a response over 6 MB (6,291,456 bytes), as the runtime encodes it: the answer's JSON, escaped again
# as the `body` string of API Gateway's response (a quote becomes 4 characters, an `é` 7). An answer that would pass
# this is answered without the parts the stored result keeps (`relayctl show` reads them), never refused whole.
MAX_RESPONSE_CHARS = 6_000_000
_ANSWER_PARTS = ("handle", "errors", "warnings")


def delivered_body(item: dict[str, Any]) -> dict[str, Any]:
    body = {"eventId": item.get("eventId"), "requestId": item.get("requestId"), "handle": item.get("handle", [])}
    for key in ("errors", "warnings"):
        if item.get(key):
            body[key] = item[key]
    for key in _ANSWER_PARTS:
        # Shed from the stored result to fit DynamoDB's item limit, or stored in an encoding this version does not
        # read (another version's, an item edited by hand): said, not hidden behind an empty list.
        for flag in (f"{key}Omitted", f"{key}Unreadable"):
            if item.get(flag) is True:
                body[flag] = True
    return body


def delivered_response(item: dict[str, Any]) -> Response:
    """The 200 of a delivered event: its handles (and a 207's errors and warnings), unless they would make a response
    larger than Lambda returns; then flagged `<part>Omitted`, as a stored result cut to fit is."""
    body = delivered_body(item)
    text = json.dumps(body)
    # Escaping at most quadruples the text, so only a large one is measured.
    if len(text) * 4 > MAX_RESPONSE_CHARS and len(json.dumps(text)) > MAX_RESPONSE_CHARS - 1000:
        kept = {k: v for k, v in body.items() if k not in _ANSWER_PARTS}
        text = json.dumps({**kept, "handle": [], **{f"{k}Omitted": True for k in _ANSWER_PARTS if k in body}})
    return ok(200, text)


def rejected_response(item: dict[str, Any]) -> Response:
    """A stored rejection as the webhook answer: Edge's own problem fields, mapped per contract §7."""
    error = as_dict(item.get("error"))
    status = edge_status_of(item)
    # Edge's (or a proxy's) problem is kept as it came: a field that is not text is not answered as one.
    extra = {"eventId": item.get("eventId"), "type": _text(error.get("type")) or "about:blank"}
    if error.get("errors"):  # our own validation of a body
        return problem(
            status if status in (400, 413, 422) else 400,
            _text(error.get("title")) or "Invalid event",
            _text(error.get("detail")) or InvalidEvent.detail,
            errors=error["errors"],
            **extra,
        )
    if item.get("errorUnreadable") is True:
        # The problem is stored in an encoding this version does not read (another version's, an item edited by hand):
        # its status, title and detail are unknown, so none is made up. 422: the event was refused for good.
        refuser = "the relay" if item.get("rejectedBy") == RELAY else "Edge"
        return problem(
            422,
            "Event refused",
            f"{refuser} refused this event; its stored problem could not be read",
            errorUnreadable=True,
            **extra,
        )
    answer = 502 if status >= 500 else 422
    title = _text(error.get("title")) or "Edge rejected the event"
    return problem(answer, title, _text(error.get("detail"))[:1000], edgeStatus=status, **extra)


def _text(value: Any) -> str:
    """A problem field as the answer's text: a string as it is, nothing (`null`, absent) as empty, anything else (a
    number, an object: not what RFC 9457 allows) as its JSON."""
    if value is None or isinstance(value, str):
        return value or ""
    return json.dumps(value, ensure_ascii=False, default=str)


class WebhookApp:
    def __init__(
        self,
        settings: Settings,
        relay: Relay,
        credentials: Callable[[], CredentialsStore],
        queue: Callable[[], RetryQueue],
        clock: Clock,
        *,
        identity_key: Callable[[], bytes | None] = lambda: None,
        ahead: Callable[[InboundEvent, Deadline], Callable[[], IdentityState] | None] = lambda inbound, deadline: None,
    ) -> None:
        self._identity_key = identity_key  # the HMAC key of identity ids (None: plain SHA-256)
        # Starts what the event's Edge call needs besides its claim (token, identity state) so that it overlaps the
        # claim; gives what returns the state once the claim is taken (None: `Relay` reads it then).
        self._ahead = ahead
        self._settings = settings
        self._relay = relay
        self._credentials = credentials
        self._queue = queue
        self._clock = clock
        # Never Powertools' debug mode, whatever the environment says: with `POWERTOOLS_DEV` set (documented as "more
        # verbose", so an operator may turn it on to debug) it prints every request whole (signature, body,
        # identities), even an unsigned one, before the relay has checked anything.
        self.app = APIGatewayHttpResolver(debug=False)
        self.app.post("/events")(self._post_events)
        self.app.not_found(self._not_found)  # before the catch-all below: a wrong route is final, not "retry"
        self.app.exception_handler(Exception)(self._unexpected)
        self._context: Any = None
        self._entered = 0.0  # monotonic time this invocation's handling began (API Gateway's clock was running)

    def handle(self, event: dict[str, Any], context: Any) -> dict[str, Any]:
        self._context = context
        self._entered = self._clock.monotonic()
        # Maps API Gateway always sends as objects, given as something else (a hand-built event): Powertools would
        # raise a ValueError from inside the route, taken for a defect.
        maps = ("headers", "queryStringParameters")
        odd = [name for name in maps if not isinstance(event.get(name) or {}, dict)]
        if odd:
            return self._not_http_api(f"{odd[0]} must be an object, as API Gateway sends it", path=odd[0])
        # ... of strings: a number there made the signature check or the datastream's reading raise, taken for a defect
        odd = [name for name in maps if not all(isinstance(v, str) for v in (event.get(name) or {}).values())]
        if odd:
            return self._not_http_api(f"{odd[0]} must map names to strings, as API Gateway sends it", path=odd[0])
        try:
            return self.app.resolve(event, context)
        except (KeyError, TypeError, AttributeError):
            # Fields API Gateway always sends are missing (a hand-built event, e.g. `sam local invoke -e`): say so
            # rather than crash (which API Gateway would answer with a bare 500).
            return self._not_http_api("a field API Gateway always sends is missing")

    @staticmethod
    def _not_http_api(message: str, path: str = "$") -> dict[str, Any]:
        logger.warning(f"not an HTTP API 2.0 event: {message}")
        body = {
            "type": "about:blank",
            "title": "Bad request",
            "status": 400,
            "detail": NOT_HTTP_API,
            "errors": [{"path": path, "message": message}],
        }
        return {"statusCode": 400, "headers": {"Content-Type": PROBLEM}, "body": json.dumps(body)}

    @staticmethod
    def _unauthorized(exc: Unauthorized) -> Response:
        """401: the reason is logged and counted, never answered."""
        count("Unauthorized")
        logger.warning("webhook signature rejected", reason=str(exc))
        return problem(401, "Unauthorized", "missing or invalid webhook signature")

    def _not_found(self, exc: Exception) -> Response:
        return problem(404, "Not found", "the only route is POST /events")

    def _unexpected(self, exc: Exception) -> Response:
        """A defect before the event was claimed: never a 500 or a stack trace. Nothing is stored, so the sender is told
        to retry (it still holds the event); an event that was claimed is handed back by `Relay.process` instead."""
        logger.exception("unexpected error answering a webhook; the sender is asked to retry")
        count("UnexpectedErrors")
        return problem(503, "Service unavailable", "the relay could not take the event; retry", retryAfter=30)

    def _verify(self, raw: bytes, headers: dict[str, str]) -> None:
        if self._settings.webhook_auth == "none":
            return
        try:
            text, webhook = raw.decode("utf-8"), Webhook
        except UnicodeDecodeError:
            # Checked over its bytes: once authenticated, such a body is answered 400 and kept, as any invalid one.
            text, webhook = raw.decode("utf-8", "surrogateescape"), _SignedBytes
        if not _TIMESTAMP.fullmatch(headers.get("webhook-timestamp", "")):
            # The library reads it with float(): "1795842876.999", "1.795842876e9", " 1795842876" or other scripts'
            # digits would pass, signed as their whole seconds. The standard (and openapi.yaml) say integer seconds.
            raise Unauthorized("webhook-timestamp is not whole seconds since the epoch")
        secrets = self._credentials().webhook_secrets()
        # The library stops at the first entry it cannot parse: keep only well-formed ones, so that a malformed entry
        # cannot hide a valid signature after it (several space-separated signatures are allowed). Two header lines
        # reach the function joined by a comma (payload 2.0 joins duplicate headers so): a comma before `v<n>,`
        # starts another entry (base64 has no comma).
        entries = _SIGNATURE_ENTRIES.split(headers.get("webhook-signature", ""))
        well_formed = " ".join(e for e in entries if _well_formed_signature(e))
        if not well_formed:
            # Said as it is: the library would say "Missing required headers" for a header that is there.
            raise Unauthorized("webhook-signature holds no well-formed v1,<base64> signature")
        headers = {**headers, "webhook-signature": well_formed}
        for secret in secrets:
            try:
                webhook(secret).verify(text, headers, json_parse=False)
                return
            except Exception as exc:  # the library raises several types for malformed headers
                reason = type(exc).__name__ + ": " + str(exc)[:80]
        raise Unauthorized(reason)

    def _post_events(self) -> Response:
        event = self.app.current_event
        headers = {k.lower(): v for k, v in (event.headers or {}).items()}
        body = event.get("body") or ""
        if not isinstance(body, str):
            # API Gateway always sends the body as a string; a hand-built event with a JSON object there is a mistake
            # that no retry can mend (told to retry, a sender would only resend it).
            logger.warning("not an HTTP API 2.0 event: the body is not a string", bodyType=type(body).__name__)
            errors = [{"path": "body", "message": "must be a string, as API Gateway sends it"}]
            return problem(400, "Bad request", NOT_HTTP_API, errors=errors)
        if event.get("isBase64Encoded"):
            try:
                raw = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                if self._settings.webhook_auth != "none":
                    # No bytes to check a signature against (API Gateway always sends valid base64): unauthenticated.
                    return self._unauthorized(Unauthorized("body is not the base64 it claims to be"))
                return problem(
                    400,
                    "Invalid body",
                    "body is not valid base64",
                    errors=[{"path": "$", "message": "isBase64Encoded is true but the body is not base64"}],
                )
        else:
            # A text body holding a lone surrogate (only a hand-built event can) keeps it as bytes that are not UTF-8:
            # refused further on as any such body is (a 400 naming the byte, kept as a rejection).
            raw = body.encode("utf-8", "surrogatepass")
        try:
            self._verify(raw, headers)
        except Unauthorized as exc:
            return self._unauthorized(exc)
        except CredentialsError as exc:
            # Every webhook is refused while this lasts, and nothing fails as far as Lambda can tell: counted, so an
            # alarm (WebhookAuthUnavailableAlarm) pages someone.
            count("WebhookAuthUnavailable")
            logger.error("webhook secret unavailable", reason=str(exc))
            return problem(503, "Service unavailable", "the relay cannot verify signatures right now", retryAfter=30)
        received_at = self._clock.now()
        fallback_id = bounded_id(headers.get("webhook-id") or event.request_context.request_id or "")
        query = event.query_string_parameters or {}
        named_as, named_wrong = datastream_name(query)
        named = query.get(named_as) if named_as else None
        event_id = fallback_id
        raw_text = raw.decode("utf-8", errors="replace")
        try:
            key, key_error = self._identity_key(), None
        except CredentialsError as exc:
            key, key_error = None, exc
        try:
            inbound = read_event(
                raw,
                fallback_id,
                datastream=named,
                datastream_error=named_wrong,
                default_datastream=self._settings.datastream_id,
                source="webhook",
                received_at=received_at,
                identity_key=key,
                allowed_datastreams=self._settings.allowed_datastream_ids,
            )
            event_id = inbound.event_id
            check_size_as_sent(inbound)
        except InvalidEvent as error:
            datastream = datastream_for_rejection(
                named, self._settings.datastream_id, self._settings.allowed_datastream_ids
            )
            return self._refuse(error, error.event_id or event_id, datastream, raw_text, received_at)
        if key_error is not None and inbound.primary_identity:
            # Its identity cannot be keyed, so its state can be neither found nor kept: queued as when Edge is down
            # (202), for a batch to deliver once the key can be read (or the dead-letter queue, whose alarm pages).
            # An event without a primary identity needs no key: it goes on as usual.
            logger.warning("identity key unavailable; event will be queued", eventId=event_id, reason=str(key_error))
            count("CredentialsUnavailable")
            return self._answer(Result(Outcome.RETRY, event_id, reason=str(key_error)), inbound)
        remaining = (self._context.get_remaining_time_in_millis() / 1000) if self._context else 30.0
        budget = min(self._settings.webhook_deadline_s, remaining - self._settings.safety_margin_s)
        # API Gateway's 30 s ran while the signature was checked (its secret read) and the event was read, too.
        api_left = API_GATEWAY_TIMEOUT_S - (self._clock.monotonic() - self._entered)
        fallback_by = min(remaining, api_left) - self._settings.safety_margin_s - FALLBACK_WORST_S
        deadline = Deadline(self._clock, min(budget - _ENQUEUE_RESERVE_S, fallback_by))
        state_source = self._ahead(inbound, deadline)
        lease_s = max(remaining, budget) + 5
        result = self._relay.process(inbound, deadline, lease_s=lease_s, state_source=state_source, to_queue=True)
        if result.outcome is Outcome.ELSEWHERE:
            # A request naming no datastream whose eventId's event, which named none either, waits for another one:
            # the default datastream then, which a deploy has changed since (DATASTREAM_ID), and this a resend (the
            # sender's first try was answered 503, or its answer was lost). It is that datastream's event, as its
            # queued message is: delivered there, with its first attempt's time. (A waiting item is taken over by a
            # webhook only for its own datastream: every resend would be answered 409.)
            first = str(result.item["datastreamId"])
            allowed = self._settings.allowed_datastream_ids
            if allowed and first not in allowed:
                message = (
                    f'this event was first taken for "{first}", which is no longer one of the datastreams this relay '
                    "sends to (ALLOWED_DATASTREAM_IDS)"
                )
                refusal = InvalidEvent([{"path": "datastreamId", "message": message}], detail=DATASTREAM_DETAIL)
                return self._refuse(refusal, event_id, first, raw_text, received_at)
            inbound = replace(inbound, datastream_id=first)
            result = self._relay.process(inbound, deadline, lease_s=lease_s, to_queue=True)
        return self._answer(result, inbound)

    def _refuse(
        self, error: InvalidEvent, event_id: str, datastream: str, raw_text: str, received_at: float
    ) -> Response:
        """Keep the refusal of a body the relay will not send (filed under `datastream`) and answer it."""
        try:
            stored = self._relay.reject_invalid(
                event_id, datastream_id=datastream, source="webhook", error=error, raw=raw_text, received_at=received_at
            )
        except StoreUnavailable:
            # A 400 would be final for the sender and nothing would be kept: make it retry instead.
            logger.error("could not store a rejected body; the sender is asked to retry", eventId=event_id)
            count("RetriesScheduled")  # as any event handed back for a retry
            return problem(
                503,
                "Service unavailable",
                "the rejection could not be recorded; retry",
                eventId=event_id,
                retryAfter=5,
            )
        # Its eventId names where the rejection is kept: under an id of its own when the eventId holds another
        # outcome (a delivered event, Edge's rejection, ...), which stays as it was.
        filed_as = stored.get("eventId", event_id)
        return problem(error.status, error.title, error.detail, eventId=filed_as, errors=error.errors)

    def _answer(self, result: Result, inbound: InboundEvent) -> Response:
        item = result.item
        if result.outcome is Outcome.DELIVERED or (
            result.outcome is Outcome.DUPLICATE and item.get("status") == "delivered"
        ):
            return delivered_response(item)
        if result.outcome in (Outcome.REJECTED, Outcome.DUPLICATE):
            return rejected_response(item)
        if result.outcome in (Outcome.BUSY, Outcome.ELSEWHERE):
            # ELSEWHERE here: the item moved to yet another datastream between the two claims (a replay, say)
            return problem(
                409,
                "Conflict",
                "this event is being processed; retry shortly to read its result",
                eventId=result.event_id,
                retryAfter=2,
            )
        # RETRY: Edge (or the store) stayed unavailable; hand the event to the queue.
        why = "the retry queue refused it" if self._settings.retry_queue_url else "no retry queue is configured"
        if result.timestamp:  # the first attempt's time, which this attempt sent too
            inbound = inbound.with_timestamp(result.timestamp)
        try:
            sent = self._queue().send(inbound, delay_s=result.retry_after)
        except Exception:
            # A defect in sending (or in building the client): the item was released as `queued`, so it must still
            # be told that nothing waits in the queue for it, as when the queue refuses.
            logger.exception(
                "unexpected error queueing the event; the sender is asked to retry", eventId=result.event_id
            )
            count("UnexpectedErrors")
            sent, why = False, "it could not be sent to the retry queue"
        if sent:
            if result.given_back and result.by:
                try:
                    self._relay.store.note_queued(result.event_id, result.reason or "", result.by)
                except Exception:
                    # The event is queued: a defect in saying so must not answer 503 (the mark stays; `show` says the
                    # message may be there).
                    logger.exception("unexpected error noting a queued event", eventId=result.event_id)
                    count("UnexpectedErrors")
            count("Queued")
            logger.info("event queued for later delivery", eventId=result.event_id, reason=result.reason)
            return ok(202, {"eventId": result.event_id, "status": "queued"})
        count("QueueFallbackFailed")
        logger.error("event could not be queued; sender must retry", eventId=result.event_id)
        # Said on the item only when nothing was queued for sure: a send whose answer never came may have queued it,
        # and the mark the give-back wrote says just that (`relayctl show`: it may be in the queue, or not).
        if result.given_back and result.by and sent is False:
            self._relay.store.note_not_queued(
                result.event_id,
                f"not queued ({why}; the sender was answered 503): {result.reason}",
                result.reason or "",
                result.by,
            )
        return problem(
            503,
            "Service unavailable",
            "Edge is unavailable and the event could not be queued; retry",
            eventId=result.event_id,
            retryAfter=30,
        )
