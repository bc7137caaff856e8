"""The domain flow for one event: claim → identity state → Edge → store. No AWS or HTTP details here."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from relay import codec
from relay.clock import Clock, Deadline
from relay.errors import (
    CredentialsError,
    EdgeRejected,
    EdgeUnavailable,
    EventIdReused,
    InvalidEvent,
    PayloadTooLarge,
    StoreUnavailable,
)
from relay.identity_state import (
    IdentityState,
    apply_handles,
    caller_hint,
    needs_write,
    outgoing_entries,
)
from relay.integrations.edge import MIN_ATTEMPT_S, EdgeClient, request_id_of
from relay.integrations.ims import NoTimeLeft
from relay.integrations.store import (
    DEFAULT_DATASTREAM,
    NO_PRIMARY,
    RELAY,
    Claim,
    HandlesStore,
    ResultWrite,
    queue_send_pending,
)
from relay.models import MAX_BODY_BYTES, InboundEvent, as_dict, as_list, iso_millis
from relay.observability import count, logger

INVALID_EVENT_TYPE = "https://github.com/interact-relay/errors/invalid-event"


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # Edge answered 200/207, result stored
    REJECTED = "rejected"  # not to be retried; stored with its reason
    DUPLICATE = "duplicate"  # already done before; `item` is the stored result
    BUSY = "busy"  # another invocation holds a live claim on this event
    RETRY = "retry"  # transient: redeliver / queue; claim released
    # A request naming no datastream whose eventId's event, which named none either, waits for another datastream (the
    # default then): `item` holds it; nothing was written for this attempt (`Relay.process`)
    ELSEWHERE = "elsewhere"


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    event_id: str
    item: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    retry_after: float | None = None
    state: IdentityState | None = None  # the identity's state after this event, when known (batches carry it)
    # With `defer_store`: the result item still to be written (DELIVERED/REJECTED), and the claim's token.
    pending: ResultWrite | None = None
    token: str | None = None
    given_back: bool = False  # RETRY: a claim was taken and given back, and that was written (the item is `queued`)
    by: str | None = None  # RETRY, given back for the retry queue: the claim's token, which its mark carries
    untried: bool = False  # RETRY: no Edge call was made for it (no time left: for the token, a slot, an attempt)
    timestamp: str | None = None  # RETRY: an earlier attempt's xdm.timestamp the event went with (queue it with it)
    note: dict[str, Any] = field(default_factory=dict, compare=False)  # what the "stored" log line adds


def caller_entries(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The `meta.state.entries` the caller sent with the event."""
    meta_state = as_dict(as_dict(request.get("meta")).get("state"))
    return [e for e in as_list(meta_state.get("entries")) if isinstance(e, dict)]


def with_state(request: dict[str, Any], state: IdentityState, now: float) -> dict[str, Any]:
    """The request with the stored entries to send in `meta.state.entries` (the caller's own entries win by key)."""
    meta = as_dict(request.get("meta"))
    meta_state = as_dict(meta.get("state"))
    entries = outgoing_entries(state, caller_entries(request), now)
    if not entries:
        return request
    return {**request, "meta": {**meta, "state": {**meta_state, "entries": entries}}}


def with_state_within_limit(request: dict[str, Any], state: IdentityState, now: float) -> tuple[bytes, int]:
    """The request encoded with as many of the identity's live stored entries as keep it within Edge's limit, and how
    many were left out. Those that lapse first are left out first, as when the entries pass MAX_STATE_BYTES: the
    long-lived identity entry is the last to go, so the identity Edge answers under stays the same. None is left out
    when all fit; all are when even the longest-lived alone does not (the request then goes as received)."""
    full = with_state(request, state, now)
    body = codec.dumps(full).encode("utf-8")
    if len(body) <= MAX_BODY_BYTES or full is request:
        return body, 0
    live = state.sendable_entries(now)
    order = sorted(live, key=lambda key: live[key].expires_at)  # those that lapse first, first

    def without(left_out: int) -> bytes:
        kept = replace(state, entries={key: live[key] for key in order[left_out:]})
        return codec.dumps(with_state(request, kept, now)).encode("utf-8")

    low, high = 1, len(order)  # the fewest left out that fits (leaving all out fits whenever anything can)
    while low < high:
        middle = (low + high) // 2
        if len(without(middle)) <= MAX_BODY_BYTES:
            high = middle
        else:
            low = middle + 1
    return without(low), low


def invalid_problem(error: InvalidEvent) -> dict[str, Any]:
    """The stored `error` of an event the relay refused itself (never sent to Edge)."""
    problem: dict[str, Any] = {"type": INVALID_EVENT_TYPE, "title": error.title, "status": error.status}
    if error.detail != InvalidEvent.detail:
        problem["detail"] = error.detail
    problem["errors"] = error.errors
    return problem


def reused_id(existing: dict[str, Any], inbound: InboundEvent) -> str | None:
    """The id under which to file `inbound` as a reuse of a finished event's eventId, or None if it is a repeat.

    A repeat has the same primary identity and datastream. Results stored before `identityId` was kept are taken as
    repeats (nothing to compare); an event without a primary identity is compared as identity ""."""
    if "identityId" not in existing:
        return None
    mine = inbound.stored_identity_id
    if existing["identityId"] == mine and existing.get("datastreamId") == inbound.datastream_id:
        return None
    # Stable for this event (its redeliveries and resends land on the same item), distinct for each other one.
    digest = hashlib.sha256(f"{inbound.datastream_id}\x1f{mine}".encode()).hexdigest()[:16]
    return f"{inbound.event_id}#reused-{digest}"


def _number(value: Any) -> float:
    """A decoded item's number (0 when it is not one: an item edited by hand)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def edge_status_of(item: dict[str, Any]) -> int:
    error = as_dict(item.get("error"))
    status = error.get("status")
    return status if isinstance(status, int) else 400


class Relay:
    def __init__(self, store: HandlesStore, edge: EdgeClient, clock: Clock) -> None:
        self.store = store
        self.edge = edge
        self.clock = clock

    def prefetch_states(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], IdentityState]:
        """The current state of many identities at once (one call for a whole SQS batch)."""
        return self.store.get_states(keys)

    def reject_invalid(
        self,
        event_id: str,
        *,
        datastream_id: str,
        source: str,
        error: InvalidEvent,
        raw: str | None,
        received_at: float | None = None,
    ) -> dict[str, Any]:
        """Store a body that is not a valid event as `rejected`, with its field errors, the body as received and when
        (`receivedAt`: the `xdm.timestamp` a replay of a body that gave none is sent with), and return it as stored.
        Under its eventId, unless that holds another outcome: then under `<eventId>#invalid-<digest>` (the stored
        `eventId` says which). Counted once stored: a rejection that could not be written is retried, and would be
        counted again."""
        digest = hashlib.sha256(f"{datastream_id}\x1f{raw or ''}".encode("utf-8", "surrogatepass")).hexdigest()[:16]
        stored = self.store.reject_unclaimed(
            event_id,
            {
                "datastreamId": datastream_id,
                "source": source,
                "error": invalid_problem(error),
                "request": raw,
            }
            | ({"receivedAt": iso_millis(received_at)} if received_at is not None else {}),
            body_digest=digest,
        )
        count("Rejected")
        count("RefusedByRelay", 1)
        filed_as = stored.get("eventId", event_id)
        if filed_as == event_id:
            logger.warning("event rejected as invalid", eventId=event_id, errors=len(error.errors))
        else:
            # The eventId already holds another outcome (a delivered or in-flight event, Edge's rejection, or another
            # invalid body): this one is kept beside it.
            logger.warning(
                "event rejected as invalid; its eventId holds another outcome, so it is filed under an id of its own",
                eventId=event_id,
                filedAs=filed_as,
                errors=len(error.errors),
            )
        return stored

    def process(
        self,
        inbound: InboundEvent,
        deadline: Deadline,
        *,
        lease_s: float,
        state: IdentityState | None = None,
        state_source: Callable[[], IdentityState | None] | None = None,
        defer_store: bool = False,
        claim: Claim | None = None,
        to_queue: bool = False,
    ) -> Result:
        """Relay one event. `state`, when given, is the identity's current state (read by the caller for a whole
        batch, or carried from the identity's previous event), which saves reading it again. `state_source`, when
        given (and `state` is not), is asked for it after the claim is taken (a batch's read may still be running).

        With `defer_store`, a DELIVERED or REJECTED result comes back with its item in `pending`, not yet written:
        the caller writes it with others (`store.put_results`) and then calls `stored` or `not_stored`.

        `claim`, when given, is the caller's claim attempt (a batch claims its new events 25 at a time): used as is when
        acquired, else the event is claimed here with its token.

        `to_queue`: the caller (a webhook) sends a RETRY to the retry queue; an event given back says so until the
        caller has sent it (`store.note_queued`), so that an invocation ending in between leaves no false `queued`.

        An event whose request named no datastream (`InboundEvent.default_datastream`), whose eventId belongs to an
        event that named none either but went to another datastream (the default then: a deploy changed it since), is
        that event: a repeat of it if it is finished (or a reuse of its eventId, by its identity), busy while another
        invocation holds it, else (waiting) ELSEWHERE with its item, and nothing is decided here (the caller knows
        whether the event may still go there). One whose first attempt named its datastream is not followed: a
        captured webhook replayed first to another datastream must not take the genuine request with it."""
        event_id = inbound.event_id
        if deadline.remaining() < MIN_ATTEMPT_S:
            # Nothing could be sent in time (a batch whose time ran out): leave the event untouched rather than claim
            # and release it, two writes and a warning for nothing. It is redelivered like any failed record (a claim
            # the batch took for it is given back, so that the redelivery can take it at once).
            reason = "no time left to relay the event"
            if claim is not None and claim.acquired and claim.token:
                try:
                    self.store.release(event_id, claim.token, reason)
                except StoreUnavailable:
                    pass  # the lease expires by itself
            return Result(Outcome.RETRY, event_id, reason=reason, untried=True)
        try:
            if claim is None or not claim.acquired:
                claim = self.store.claim(
                    event_id,
                    datastream_id=inbound.datastream_id,
                    source=inbound.source,
                    lease_s=lease_s,
                    token=claim.token if claim is not None else None,
                    stamp=inbound.stamp,
                    owner=inbound.stored_identity_id,
                    default_datastream=inbound.default_datastream,
                )
        except StoreUnavailable as exc:
            # Nothing was claimed, so nothing to give back; but the operator must see why (a missing table, a
            # throttled one, an IAM gap): the same line and count as any event handed back for a retry.
            logger.warning("event will be retried", eventId=event_id, reason=str(exc))
            count("RetriesScheduled")
            return Result(Outcome.RETRY, event_id, reason=str(exc))
        if not claim.acquired:
            existing = claim.existing or {}
            first = existing.get("datastreamId")
            if (
                inbound.default_datastream
                and existing.get(DEFAULT_DATASTREAM) is True
                and isinstance(first, str)
                and first
                and first != inbound.datastream_id
            ):
                status = existing.get("status")
                if status not in ("delivered", "rejected"):
                    held = status == "pending" and _number(existing.get("leaseUntil")) >= int(self.clock.now())
                    # Its identity's: among those whose events claimed it, or the one a replay of its result names
                    owners = existing.get("claimedBy")
                    mine = (isinstance(owners, list) and (inbound.stored_identity_id or NO_PRIMARY) in owners) or (
                        existing.get("identityId") == inbound.stored_identity_id
                    )
                    if held or not mine:
                        # In flight (not refused while it may be delivered), or waiting for another identity's event
                        # under the same eventId (not taken for it): busy, as for its own datastream.
                        return Result(Outcome.BUSY, event_id, reason="another invocation is processing this event")
                    return Result(Outcome.ELSEWHERE, event_id, item=existing)
                # Compared with it as sent there: a repeat of it, or (another identity's) a reuse of its eventId,
                # filed as the request resolved it (`asked`), where `relayctl rejected --from-datastream` looks
                asked, inbound = inbound, replace(inbound, datastream_id=first)
                filed_as = reused_id(existing, asked) if reused_id(existing, inbound) is not None else None
                if filed_as is not None:
                    return self._reject_reused(asked, filed_as)
            if existing.get("status") in ("delivered", "rejected"):
                filed_as = reused_id(existing, inbound)
                if filed_as is not None:
                    return self._reject_reused(inbound, filed_as)
                count("Duplicates")
                logger.info("repeat of a finished event", eventId=event_id, status=existing.get("status"))
                return Result(Outcome.DUPLICATE, event_id, item=existing, state=state)
            return Result(Outcome.BUSY, event_id, reason="another invocation is processing this event")
        if claim.token is None:
            return Result(Outcome.RETRY, event_id, reason="claim without a token")
        adopted = None
        if claim.timestamp and inbound.timestamp and claim.timestamp != inbound.timestamp:
            # A resend (a webhook sender's, a producer's new message) of an event the relay stamped before: Edge
            # gets the first attempt's time under the same `_id`, not this attempt's receive time (and so does the
            # retry queue, should the webhook fall back to it: `Result.timestamp`).
            adopted = claim.timestamp
            inbound = inbound.with_timestamp(adopted)
        writing: ResultWrite | None = None  # the result being written, once it is
        try:
            if state is None and state_source is not None:
                state = state_source()
            result = self._deliver(inbound, deadline, state, claim.item)
            if defer_store:
                return replace(result, token=claim.token)
            if result.pending is not None:
                writing = result.pending
                self.store.put_result(writing)
            self.stored(result)
            return replace(result, pending=None)
        except (EdgeUnavailable, CredentialsError, StoreUnavailable) as exc:
            retry_after = exc.retry_after if isinstance(exc, EdgeUnavailable) else None
            if isinstance(exc, CredentialsError) and not isinstance(exc, NoTimeLeft):
                # Wrong or unreadable Adobe credentials fail every event until fixed: alarmed on their own
                # (CredentialsUnavailableAlarm) rather than only once the events reach the dead-letter queue. (No time
                # left for the token request is about this event's deadline, not the credentials.)
                count("CredentialsUnavailable")
            given_back = self._give_back(
                event_id, claim.token, str(exc), retry_after, to_queue=to_queue, written=writing
            )
            if given_back is None:  # the result's write was applied after all: it is the outcome
                self.stored(result)
                return replace(result, pending=None)
            untried = isinstance(exc, NoTimeLeft) or (isinstance(exc, EdgeUnavailable) and exc.attempts == 0)
            return Result(
                Outcome.RETRY,
                event_id,
                reason=str(exc),
                retry_after=retry_after,
                given_back=given_back,
                by=claim.token if to_queue else None,
                untried=untried,
                timestamp=adopted,
            )
        except Exception as exc:
            # A defect, not the event's fault: never a 500 or a claim left to time out. The event is retried (and
            # reaches the dead-letter queue if the defect stays); the log has the stack trace, never the response.
            logger.exception("unexpected error; event will be retried", eventId=event_id)
            count("UnexpectedErrors")
            reason = f"unexpected error: {type(exc).__name__}"
            given_back = self._give_back(event_id, claim.token, reason, to_queue=to_queue) is True  # None: not here
            by = claim.token if to_queue else None
            return Result(Outcome.RETRY, event_id, reason=reason, given_back=given_back, by=by, timestamp=adopted)

    def _reject_reused(self, inbound: InboundEvent, filed_as: str) -> Result:
        """Store an event that reuses a finished event's eventId as `rejected`, under an id of its own, and never
        answer it with that other event's result. The store being down makes it a retry, as for any event."""
        try:
            stored = self.store.reject_unclaimed(
                filed_as,
                {
                    "datastreamId": inbound.datastream_id,
                    "source": inbound.source,
                    "identityId": inbound.stored_identity_id,
                    "error": invalid_problem(EventIdReused()),
                    "request": inbound.request,
                },
            )
        except StoreUnavailable as exc:
            logger.warning("event will be retried", eventId=inbound.event_id, reason=str(exc))
            count("RetriesScheduled")
            return Result(Outcome.RETRY, inbound.event_id, reason=str(exc))
        count("Rejected")
        count("RefusedByRelay", 1)
        count("EventIdReused")
        logger.warning("eventId reused for a different event: rejected", eventId=inbound.event_id, filedAs=filed_as)
        return Result(Outcome.REJECTED, filed_as, item=stored)

    def stored(self, result: Result, *, in_batch: bool = False) -> None:
        """Count and log a result whose item is written. In a batch a delivery is logged at DEBUG (the batch logs one
        INFO summary): a line per delivered event would cost more CPU and CloudWatch Logs ingestion than it tells."""
        if result.outcome is Outcome.DELIVERED:
            count("Delivered")
            # One value per message finished, 1 when the relay itself refused it (an invalid body, a datastream not
            # allowed, a reused eventId, too large for Edge) and 0 otherwise: its average is the share the relay
            # refuses, which RelayRefusedRateAlarm watches without the metric math of a sparse numerator. A refused
            # message counts each time it comes (it is refused again); a repeat of a finished event counts nothing.
            count("RefusedByRelay", 0)
            log = logger.debug if in_batch else logger.info
            log("event delivered", eventId=result.event_id, **result.note)
        else:
            count("Rejected")
            refused_here = result.note.get("type") == INVALID_EVENT_TYPE  # the relay's own 413: Edge was not called
            count("RefusedByRelay", 1 if refused_here else 0)
            if not refused_here:
                # Edge refused the event for good (a 3xx, a 4xx other than 401/408/429, a 5xx other than 502-504): a
                # datastream deleted or misconfigured turns every event into one, which EdgeRejectedRateAlarm watches.
                count("EdgeRejected")
            message = "event refused: too large for Edge" if refused_here else "edge rejected the event"
            logger.warning(message, eventId=result.event_id, **result.note)

    def not_stored(self, result: Result, reason: str) -> bool:
        """A deferred result that could not be written: give the claim back so the redelivery can take it at once
        (Edge has the event; the redelivery sends the same `xdm._id` again, and Edge dedupes on it). True when the
        write was applied after all (its answer lost): then it is counted as `stored`, and the record is done."""
        if result.token and self._give_back(result.event_id, result.token, reason, written=result.pending) is None:
            self.stored(result, in_batch=True)
            return True
        return False

    def _give_back(
        self,
        event_id: str,
        token: str,
        reason: str,
        retry_after: float | None = None,
        *,
        to_queue: bool = False,
        written: ResultWrite | None = None,
    ) -> bool | None:
        """Hand the claim back (`queued`): True when that was written; False when it was not (the store down: the
        lease lapses by itself; or the item no longer held the claim). None when the item holds `written` instead,
        the result whose write raised: applied though its answer was lost (the hand-back's refusal carries the item,
        so this costs no read). Then the event is not to be retried."""
        try:
            noted = queue_send_pending(reason) if to_queue else reason
            found = self.store.release(event_id, token, noted, retry_after=retry_after, marked=to_queue)
        except StoreUnavailable:
            found, released = None, False
        else:
            released = found is None or self.store.released(found, noted)
        if found is not None and written is not None and self.store.holds(found, written):
            logger.info("result write reported failed was applied", eventId=event_id, reason=reason)
            return None
        logger.warning("event will be retried", eventId=event_id, reason=reason)
        count("RetriesScheduled")
        return released

    def _deliver(
        self, inbound: InboundEvent, deadline: Deadline, known: IdentityState | None, claimed: dict[str, Any] | None
    ) -> Result:
        now = self.clock.now()
        opaque = inbound.identity_id
        if not opaque:
            state = IdentityState()
        elif known is not None:
            state = known
        else:
            state = self.store.get_state(opaque, inbound.datastream_id)
        body, left_out = with_state_within_limit(inbound.request, state, now)
        if left_out:
            # The event fits Edge's limit, but not with all the identity's stored entries: deliver it with those that
            # fit rather than have Edge refuse it (413). Edge's answer still updates the stored state.
            count("StateNotSent")
            logger.warning(
                "stored state entries left out: the event would be over Edge's size limit",
                eventId=inbound.event_id,
                entriesLeftOut=left_out,
            )
        try:
            if len(body) > MAX_BODY_BYTES:
                # The body fitted, but not with the `_id` and timestamp the relay added (or once re-encoded): Edge
                # would refuse it with a 413, and so would every replay. Refused here, without the call, saying why.
                raise EdgeRejected(413, invalid_problem(PayloadTooLarge(len(body), MAX_BODY_BYTES, as_sent=True)))
            hint = caller_hint(caller_entries(inbound.request)) or state.route_hint(now)
            answer = self.edge.deliver(inbound.datastream_id, body, hint, deadline)
        except EdgeRejected as exc:
            rejected: dict[str, Any] = {
                "status": "rejected",
                "datastreamId": inbound.datastream_id,
                "source": inbound.source,
                "identityId": inbound.stored_identity_id,
                "requestId": request_id_of(as_dict(exc.problem.get("report")).get("requestId")),
                "error": exc.problem,
                "request": inbound.request,
            }
            if inbound.default_timestamp:
                # The request's `xdm.timestamp` is the relay's (the sender gave none): a replay puts it back on the
                # item for a resend of the event to be sent with (`relayctl replay`); a sender's own is its resend's.
                rejected["defaultTimestamp"] = True
            if exc.problem.get("type") == INVALID_EVENT_TYPE:
                rejected["rejectedBy"] = RELAY  # refused here: a corrected resend under the same eventId is processed
            write = self.store.compose_result(inbound.event_id, rejected, claimed)
            return Result(
                Outcome.REJECTED,
                inbound.event_id,
                item=write.doc,
                state=state if opaque else None,
                pending=write,
                note={"status": exc.status, "type": exc.problem.get("type")},
            )
        received = self.clock.now()
        handles = as_list(answer.body.get("handle"))
        after: IdentityState | None = None
        if opaque:
            seen: list[tuple[IdentityState, IdentityState | None]] = []

            def change(current: IdentityState) -> IdentityState | None:
                new = apply_handles(current, handles, received)
                seen.append((current, new if needs_write(current, new, received) else None))
                return seen[-1][1]

            try:
                wrote = self.store.update_state(opaque, inbound.datastream_id, state, change)
                # What is stored now: our write (one version up), or what we read if nothing needed writing (a state in
                # a newer format is shown to `change` and left as it is).
                current, new = seen[-1]
                after = (
                    replace(new, version=max(current.version, 0) + 1, stored_version=None) if wrote and new else current
                )
            except StoreUnavailable as exc:
                # Edge has the event: never send it again for the sake of its state (contract §1).
                count("StateWriteFailed")
                logger.warning("identity state not saved", eventId=inbound.event_id, reason=str(exc))
            except Exception:
                # A defect, or an answer this code cannot fold in: the same rule, Edge has the event.
                count("StateWriteFailed")
                count("UnexpectedErrors")
                logger.exception("identity state not saved: unexpected error", eventId=inbound.event_id)
        fields: dict[str, Any] = {
            "status": "delivered",
            "datastreamId": inbound.datastream_id,
            "source": inbound.source,
            "identityId": inbound.stored_identity_id,
            "requestId": answer.request_id,
            "handle": answer.body.get("handle", []),
        }
        for key in ("errors", "warnings"):
            if answer.body.get(key):
                fields[key] = answer.body[key]
        if answer.unreadable:
            fields["answerUnreadable"] = True
        try:
            write = self.store.compose_result(inbound.event_id, fields, claimed)
        except Exception:
            # A defect, or an answer this code cannot keep: Edge has the event, and asking it again would only
            # duplicate it. Kept as delivered without the answer's content, and said so.
            count("UnexpectedErrors")
            logger.exception(
                "unexpected error: edge answer not kept; stored as delivered without it", eventId=inbound.event_id
            )
            kept = {k: v for k, v in fields.items() if k not in ("handle", "errors", "warnings")}
            write = self.store.compose_result(inbound.event_id, {**kept, "handle": [], "answerNotKept": True}, claimed)
        return Result(
            Outcome.DELIVERED,
            inbound.event_id,
            item=write.doc,
            state=after,
            pending=write,
            note={"edgeStatus": answer.status, "attempts": answer.attempts},
        )
