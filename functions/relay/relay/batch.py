"""SQS batches (contract §8): records of different identities run concurrently, records of one identity in order,
and the answer lists exactly the records to redeliver (`ReportBatchItemFailures`).

Powertools' BatchProcessor runs records one after another; Edge latency dominates, so this module keeps its
response format but runs identity groups on a bounded thread pool.

Result items are written 25 at a time (`BatchWriteItem`) rather than one `PutItem` each: the same write units, a
twenty-fifth of the requests, and so a fraction of the CPU a Lambda spends signing and parsing DynamoDB calls. A
record is acknowledged only once its result is written; one whose write fails gives its claim back and is
redelivered (Edge dedupes on the unchanged `xdm._id`).

A record sent back because Edge asked for a `Retry-After` that outlasts the queue's visibility timeout (counted from
the receive) is kept invisible that long (up to 15 minutes), as are the later records of its identity that wait for
it: it comes back when Edge said, not sooner, and so does not use up its receives before the dead-letter queue. A
shorter `Retry-After` leaves the visibility alone: a shorter one would only reach the dead-letter queue sooner in an
outage.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

from relay.clock import Deadline
from relay.errors import CredentialsError, InvalidEvent, StoreUnavailable
from relay.identity_state import IdentityState
from relay.integrations.aws_clients import SQS_WORST_CASE_S
from relay.integrations.edge import MIN_ATTEMPT_S
from relay.integrations.queue import (
    MAX_RETRY_DELAY_S,
    RELAY_DEFAULT_TIMESTAMP,
    RELAY_SENT_TIMESTAMP,
    RELAY_SOURCE,
    RetryQueue,
)
from relay.integrations.store import BATCH_WRITE_SIZE, CLAIM_INSERT_SIZE, UNPROCESSED, Claim, ClaimKey
from relay.models import (
    MAX_BODY_BYTES,
    Source,
    datastream_for_rejection,
    datastream_name,
    read_event,
)
from relay.observability import count, logger, write_metrics_now
from relay.process_event import Outcome, Relay, Result
from relay.settings import Settings

HELD_BACK = "held back behind an earlier record of its identity"  # a record's reason in the batch summary
HOLD_BACK_RECEIVES = 3  # of maxReceiveCount 5: later receives are processed even if an earlier record failed
# The next 25 groups are claimed once at most this many claimed groups wait for a worker: claims stay ahead of the
# workers (a group never waits for its claim in the steady state) without claiming events the batch may never reach.
CLAIM_AHEAD = 8
# SQS counts a record's visibility timeout from its receive, which comes before the handler starts: by the event source
# mapping's batching window (1 s in the template) and the invoke. A record on its first receive says when that was
# (`ApproximateFirstReceiveTimestamp`); otherwise the batch is taken as received this long before the handler began.
RECEIVE_SLACK_S = 2.0


Carry = IdentityState | None  # an identity's state as stored, carried from one record of the group to the next
StateSource = Callable[[], Carry]  # the group's first state: from the batch's BatchGetItem, once it has answered


@dataclass
class Done:
    ok: bool  # acknowledged (once `result.pending`, if any, is written); False = redeliver
    carry: Carry = None  # the identity's state after the record
    result: Result | None = None
    reason: str = "sent back unread (its own log line says why)"  # why it is redelivered, when `result` does not say

    def why(self) -> str:
        if self.result is not None:
            return self.result.reason or self.result.outcome.value
        return self.reason


# What a record does: from its identity's state (carried, or where to get it) and the batch's claim attempt, if any.
Run = Callable[[Carry, StateSource | None, Claim | None], Done]


@dataclass
class _Item:
    message_id: str
    event_id: str
    group: str
    run: Run
    receive_count: int = 1
    state_key: tuple[str, str] | None = None  # (opaque identity id, datastream) for events with a primary identity
    twins: list[str] = field(default_factory=list)  # later records of the batch with the same event
    # What makes a later record with the same eventId a repeat of this one: the same datastream and primary identity.
    # One for another identity or datastream is another event (stored `#reused-` once this one is finished).
    same_event: tuple[str, str, str] | None = None
    invalid: bool = False  # a body the relay refuses itself (stored `rejected`, never sent to Edge)
    claim_key: ClaimKey | None = None  # of an event to relay, first received: the batch may claim it
    claim: Claim | None = None  # the batch's claim attempt (first records of groups), set before the group runs


class _ResultWrites:
    """Results waiting for their write. The worker whose result fills a chunk of 25 writes it, so writes overlap
    the other workers' Edge calls; `flush` writes what is left at the end of the batch."""

    def __init__(self, relay: Relay, deadline: Deadline) -> None:
        self._relay = relay
        # The final write sends unprocessed results again while this allows. A worker writing a full chunk mid-batch
        # does not wait as long (it has the rest of its identity's records to run): what DynamoDB still leaves
        # unprocessed goes back among the results waiting, for a later write.
        self._deadline = deadline
        self._lock = threading.Lock()
        self._waiting: list[tuple[str, Result]] = []
        self.failed: set[str] = set()  # message ids

    def add(self, message_id: str, result: Result) -> None:
        with self._lock:
            self._waiting.append((message_id, result))
            if len(self._waiting) < BATCH_WRITE_SIZE:
                return
            chunk, self._waiting = self._waiting, []
        self._write(chunk, None)

    def flush(self) -> None:
        with self._lock:
            chunk, self._waiting = self._waiting, []
        if chunk:
            self._write(chunk, self._deadline)

    def _write(self, chunk: list[tuple[str, Result]], deadline: Deadline | None) -> None:
        try:
            failed = self._relay.store.put_results([r.pending for _, r in chunk if r.pending is not None], deadline)
        except Exception:
            logger.exception("unexpected error writing results; records will be redelivered")
            count("UnexpectedErrors")
            failed = {r.event_id: "results not written" for _, r in chunk}
        later = [(mid, r) for mid, r in chunk if failed.get(r.event_id) == UNPROCESSED] if deadline is None else []
        if later:
            with self._lock:
                self._waiting.extend(later)
            chunk = [(mid, r) for mid, r in chunk if failed.get(r.event_id) != UNPROCESSED]
        for message_id, result in chunk:
            reason = failed.get(result.event_id)
            try:
                if reason is None:
                    self._relay.stored(result, in_batch=True)
                elif self._relay.not_stored(result, reason):
                    reason = None  # written after all (the write's answer was lost): the record is done
            except Exception:
                # A defect counting, logging or giving back one result must not leave the chunk's others unsettled:
                # each is acknowledged or redelivered as its write went (a claim not given back lapses by itself).
                logger.exception("unexpected error settling a written result", eventId=result.event_id)
                count("UnexpectedErrors")
            if reason is not None:
                with self._lock:
                    self.failed.add(message_id)


def _redeliver(carry: Carry, _: StateSource | None, __: Claim | None) -> Done:
    return Done(False, carry)


def _message_id(record: dict[str, Any]) -> str:
    """The record's messageId as a string ("" for a malformed record without one: Lambda then retries the batch)."""
    value = record.get("messageId") if isinstance(record, dict) else None
    return value if isinstance(value, str) else ""


def _epoch_ms(value: Any) -> float | None:
    """Seconds since the epoch from a millisecond timestamp attribute, or None when it is not a plausible one."""
    try:
        seconds = float(value) / 1000
    except (TypeError, ValueError):
        return None
    return seconds if 0 < seconds < 1e11 else None  # (NaN is not either)


def _received_before(records: list[dict[str, Any]], now: float) -> float:
    """How long before `now` (the wall clock) the batch was received, by what its records say (their first receive,
    for those on it), else RECEIVE_SLACK_S; never more than the longest visibility timeout SQS allows (a clock off)."""
    seen = [RECEIVE_SLACK_S]
    for record in records:
        attributes = record.get("attributes") if isinstance(record, dict) else None
        if not isinstance(attributes, dict) or str(attributes.get("ApproximateReceiveCount")) != "1":
            continue
        first = _epoch_ms(attributes.get("ApproximateFirstReceiveTimestamp"))
        if first is not None:
            seen.append(now - first)
    return min(max(seen), 43200.0)


def _attrs(record: dict[str, Any]) -> dict[str, Any]:
    """The record's message attributes (none for a hand-built record whose `messageAttributes` is not an object)."""
    attrs = record.get("messageAttributes")
    return attrs if isinstance(attrs, dict) else {}


def _attr(record: dict[str, Any], name: str) -> str | None:
    attr = _attrs(record).get(name)
    value = attr.get("stringValue") if isinstance(attr, dict) else None
    return value if isinstance(value, str) else None


def _datastream_attr(record: dict[str, Any]) -> tuple[str | None, str | None]:
    """The `datastreamId` attribute's value (`dataStreamId` too: `datastream_name`), and what is wrong with it when it
    is not a String attribute (contract §2). A Binary or Number one is refused, not taken for absent: that would send
    the event to the default datastream, which may be another sandbox. (A hand-built record without `dataType` counts
    as String.)"""
    attrs = _attrs(record)
    name, wrong = datastream_name(attrs)
    attr = attrs.get(name) if name is not None else None
    if wrong is not None or name is None or not isinstance(attr, dict):
        return None, wrong
    data_type = attr.get("dataType", "String")
    if not isinstance(data_type, str) or data_type.partition(".")[0] != "String":
        shown = data_type.partition(".")[0][:20] if isinstance(data_type, str) else type(data_type).__name__
        return None, f"must be a String message attribute, not {shown}"
    return _attr(record, name), None


class BatchRunner:
    def __init__(
        self,
        settings: Settings,
        relay: Relay,
        executor: ThreadPoolExecutor,
        queue: Callable[[], RetryQueue] | None = None,
        identity_key: Callable[[], bytes | None] = lambda: None,
        warm: Callable[[Deadline], None] | None = None,
    ) -> None:
        self._settings = settings
        self._relay = relay
        self._executor = executor
        self._queue = queue  # built only when a record has to be postponed (no SQS client on the common path)
        self._identity_key = identity_key  # the HMAC key of identity ids (None: plain SHA-256)
        # What the Edge calls will need and may not have yet (the IMS token), fetched on a worker once the records
        # are read: its round trips then overlap the claims and the state read.
        self._warm = warm

    def _prepare(
        self,
        record: dict[str, Any],
        deadline: Deadline,
        lease_s: float,
        key: bytes | None,
        key_error: CredentialsError | None = None,
    ) -> _Item:
        message_id = _message_id(record)
        raw = record.get("body") or ""
        try:
            receive_count = int((record.get("attributes") or {}).get("ApproximateReceiveCount", 1))
        except (TypeError, ValueError):
            receive_count = 1
        # The relay's own messages (a webhook event it queued, a replay, a redrive by relayctl) say so in `relaySource`,
        # and name the eventId and the send time of the event they carry. A producer's message is keyed by its
        # messageId (contract §2) whatever attributes it has: an `eventId` attribute of its own (say "order.created")
        # must not make distinct events repeats of one another.
        relays = _attr(record, RELAY_SOURCE)
        source: Source = "webhook" if relays == "webhook" else "sqs"
        first_sent = _epoch_ms(_attr(record, RELAY_SENT_TIMESTAMP)) if relays else None
        sent_s = first_sent or _epoch_ms((record.get("attributes") or {}).get("SentTimestamp"))
        received_at = sent_s or self._relay.clock.now()  # stable across redeliveries and redrives: same timestamp
        # A replayed or re-queued event names its original eventId; otherwise the messageId is the fallback.
        named_id = _attr(record, "eventId") if relays else None
        fallback_id = named_id or message_id
        named, named_wrong = _datastream_attr(record)
        try:
            inbound = read_event(
                raw,
                fallback_id,
                datastream=named,
                datastream_error=named_wrong,
                allowed_datastreams=self._settings.allowed_datastream_ids,
                default_datastream=self._settings.datastream_id,
                source=source,
                received_at=received_at,
                identity_key=key,
                # A webhook event the relay queued itself passed the size check on arrival, measured as it would be
                # sent (`_id` and timestamp included); its raw body is not checked again (it was answered 202).
                limit=None if source == "webhook" else MAX_BODY_BYTES,
            )
        except InvalidEvent as exc:
            ds = datastream_for_rejection(named, self._settings.datastream_id, self._settings.allowed_datastream_ids)
            eid, error = exc.event_id or fallback_id, exc  # `exc` is unbound after the except block

            def reject(carry: Carry, _: StateSource | None, __: Claim | None) -> Done:
                self._relay.reject_invalid(
                    eid, datastream_id=ds, source=source, error=error, raw=raw, received_at=received_at
                )
                return Done(True, carry)

            return _Item(message_id, eid, f"invalid:{message_id}", reject, receive_count, invalid=True)
        if relays and _attr(record, RELAY_DEFAULT_TIMESTAMP) == "true" and not inbound.default_timestamp:
            # A webhook event the relay queued with the time it set: still the relay's (its first attempt's is kept).
            inbound = replace(inbound, default_timestamp=True)
        event_id = inbound.event_id
        if key_error is not None and inbound.primary_identity:
            # Its identity cannot be keyed, so its state can be neither found nor kept: untouched, it comes back (and,
            # if this lasts, reaches the dead-letter queue, whose alarm pages someone). Others go on as usual.
            logger.warning(
                "identity key unavailable; record will be redelivered", eventId=event_id, reason=str(key_error)
            )
            count("RetriesScheduled")
            count("CredentialsUnavailable")
            return _Item(message_id, event_id, f"nokey:{message_id}", _redeliver, receive_count)
        state_key = (inbound.identity_id, inbound.datastream_id) if inbound.identity_id else None
        group = f"identity:{state_key[1]}:{state_key[0]}" if state_key else f"event:{event_id}"

        def process(carry: Carry, first_state: StateSource | None, claim: Claim | None) -> Done:
            result = self._relay.process(
                inbound,
                deadline,
                lease_s=lease_s,
                state=carry,
                state_source=first_state,
                defer_store=True,
                claim=claim,
            )
            ok = result.outcome in (Outcome.DELIVERED, Outcome.REJECTED, Outcome.DUPLICATE)
            return Done(ok, result.state, result)  # state unknown after a failure: the next record reads it afresh

        same_event = (event_id, inbound.datastream_id, inbound.stored_identity_id)
        # A first receive of an event from the sender is most likely new: claimed with the batch (`_claim_firsts`).
        # A redelivery, a replay or an event the webhook queued (their items exist) would only fail the INSERT.
        fresh = receive_count <= 1 and source == "sqs" and named_id is None
        claim_key = (
            (
                event_id,
                inbound.datastream_id,
                source,
                inbound.stamp,
                inbound.stored_identity_id,
                inbound.default_datastream,
            )
            if fresh
            else None
        )
        return _Item(
            message_id, event_id, group, process, receive_count, state_key, same_event=same_event, claim_key=claim_key
        )

    def run(self, event: dict[str, Any], deadline: Deadline, lease_s: float) -> dict[str, Any]:
        began = self._relay.clock.monotonic()
        records = event.get("Records") or []
        before = _received_before(records, self._relay.clock.now()) if isinstance(records, list) else RECEIVE_SLACK_S
        try:
            key, key_error = self._identity_key(), None
        except CredentialsError as exc:
            key, key_error = None, exc
        groups: dict[str, list[_Item]] = {}
        firsts: dict[tuple[str, str, str] | str, _Item] = {}
        for n, record in enumerate(records):
            try:
                item = self._prepare(record, deadline, lease_s, key, key_error)
            except Exception:
                # A defect reading one record must not fail its batch-mates: this one is redelivered (and reaches
                # the dead-letter queue if the defect stays).
                message_id = _message_id(record)
                logger.exception("unexpected error reading a record; it will be redelivered", messageId=message_id)
                count("UnexpectedErrors")
                item = _Item(message_id, f"unreadable:{n}", f"unreadable:{n}", _redeliver)
            # An invalid body shares no one's fate, nor anyone its own: a corrected resend under the same eventId, in
            # this very batch, must still be delivered. Both then run on their own, which the store keeps safe (a
            # relay rejection never replaces a pending or delivered result, and a claim may take one over).
            first = item if item.invalid else firsts.setdefault(item.same_event or item.event_id, item)
            if first is not item:
                # The same event twice in one batch: the later record shares the first one's fate (its result is
                # not written yet, so claiming it again would only find the first one's live claim).
                first.twins.append(item.message_id)
                # They share the hold-back too: a copy on a late receive must not be kept waiting behind an earlier
                # record of its identity, or it reaches the dead-letter queue though its event is still in the queue.
                first.receive_count = max(first.receive_count, item.receive_count)
                count("Duplicates")
                logger.info("repeat of an event in the same batch", eventId=item.event_id, messageId=item.message_id)
                continue
            groups.setdefault(item.group, []).append(item)
        writes = _ResultWrites(self._relay, deadline)
        # Only for a batch with a record that may call Edge: invalid bodies, repeats and records sent back unread
        # (no identity key) must not wait for a token they will not use.
        may_call_edge = any(not i.invalid and i.run is not _redeliver for items in groups.values() for i in items)
        warming = self._executor.submit(self._warm, deadline) if self._warm is not None and may_call_edge else None

        # One BatchGetItem for every identity of the batch instead of one GetItem per event; each identity's state is
        # then carried through its records in memory (they run in order on one worker). The read runs on a worker
        # while the batch takes its claims: a group waits for it only when its first record is about to call Edge.
        keys = [item.state_key for items in groups.values() for item in items[:1] if item.state_key]

        def prefetch() -> dict[tuple[str, str], IdentityState]:
            try:
                return self._relay.prefetch_states(keys) if keys else {}
            except StoreUnavailable as exc:
                logger.warning("identity states not prefetched; reading them per event", reason=str(exc))
            except Exception:
                # A defect must not fail the batch (the workers are already claiming and calling Edge): each event
                # then reads its own state, so only one that cannot fails.
                logger.exception("unexpected error prefetching identity states; reading them per event")
                count("UnexpectedErrors")
            return {}

        states = self._executor.submit(prefetch)

        started = threading.Condition()
        n_started = 0  # groups a worker has taken up (under `started`)

        def run_group(items: list[_Item]) -> list[tuple[str, float | None]]:
            """The group's records to redeliver, each with how long Edge asked it to wait (None: not said)."""
            nonlocal n_started
            with started:
                n_started += 1
                started.notify()
            failed: list[tuple[str, float | None]] = []
            # The longest wait Edge asked for among the group's failures so far: a record held back comes back with
            # the last of the records it waits for, not only the first (one on a late receive is tried, and may be
            # asked to wait longer).
            longest: float | None = None
            carry: Carry = None
            key = items[0].state_key
            source: StateSource | None = (lambda: states.result().get(key)) if key else None
            for item in items:
                # Keep one identity's order: once one fails, the rest wait for its redelivery too. But only for the
                # first receives: a record that keeps failing must not drag healthy ones into the dead-letter queue.
                if failed and item.receive_count < HOLD_BACK_RECEIVES:
                    failed.append((item.message_id, longest))  # it comes back with the records it waits for
                    redelivered_because.append(HELD_BACK)
                    untried.append(item.message_id)
                    continue
                try:
                    done = item.run(carry, source, item.claim)
                except StoreUnavailable as exc:
                    logger.warning("record will be redelivered", messageId=item.message_id, reason=str(exc))
                    count("RetriesScheduled")
                    done = Done(False, reason=str(exc))
                except Exception:
                    logger.exception("unexpected error; record will be redelivered", messageId=item.message_id)
                    count("UnexpectedErrors")
                    done = Done(False, reason="unexpected error")
                label = ("rejected" if item.invalid else "ok") if done.ok else "failed"
                outcomes.append(done.result.outcome.value if done.result else label)
                carry = done.carry if done.ok else None
                source = None  # from here on the carry is the state (None after a failure: read it afresh)
                if not done.ok:
                    asked = done.result.retry_after if done.result else None
                    failed.append((item.message_id, asked))
                    if asked is not None:
                        longest = asked if longest is None else max(longest, asked)
                    redelivered_because.append(done.why())
                    if done.result is not None and done.result.untried:
                        untried.append(item.message_id)
                elif done.result is not None and done.result.pending is not None:
                    writes.add(item.message_id, done.result)
            return failed

        outcomes: list[str] = []  # list.append is atomic: the workers share it
        # Why each record was sent back, counted in the batch's summary line: some reasons (no time left, a claim
        # another invocation holds, a record waiting for an earlier one of its identity) have no line of their own.
        redelivered_because: list[str] = []
        untried: list[str] = []  # records sent back without an Edge call (counted: each return is a receive)
        # Longest groups first: a group's records run one after another, so a long one started late would keep the
        # whole batch waiting on it while the other workers sit idle. The sort is stable: batch order otherwise.
        ordered_groups = sorted(groups.values(), key=len, reverse=True)
        # Each group's first record is claimed with 24 others in one request (`claim_new`); a group starts once its
        # claim is answered. The first 25 start at once; the next 25 are claimed while they call Edge, once few
        # claimed groups are left waiting for a worker, and not once the time is up (such a group is never tried, so
        # its claim would be two writes for nothing).
        chunks = [ordered_groups[n : n + CLAIM_INSERT_SIZE] for n in range(0, len(ordered_groups), CLAIM_INSERT_SIZE)]
        futures: list[Future[list[tuple[str, float | None]]]] = []
        claimed: set[str] = set()
        for chunk in chunks:
            with started:
                started.wait_for(lambda: n_started >= len(futures) - CLAIM_AHEAD)
            if deadline.remaining() >= MIN_ATTEMPT_S:
                self._claim_firsts(chunk, lease_s, claimed)
            futures.extend(self._executor.submit(run_group, items) for items in chunk)
        # Every group is waited for, even after one has failed: none may run on into the next invocation.
        wait(futures)
        delays: dict[str, float | None] = {}
        for future, items in zip(futures, (items for chunk in chunks for items in chunk), strict=True):
            try:
                delays.update(future.result())
            except Exception:
                # A defect outside a record's own run (which is guarded): the whole group comes back, in its order.
                # A result of it already written makes its redelivery a repeat, answered from the stored result.
                logger.exception("unexpected error running an identity's records; they will be redelivered")
                count("UnexpectedErrors")
                redelivered_because.extend("unexpected error" for _ in items)
                delays.update((item.message_id, None) for item in items)
        # No read left running into the next invocation (each is done unless no group needed it): Lambda would freeze
        # it, and it would resume, or fail, in another invocation.
        pending: list[Future[Any]] = [states] if warming is None else [states, warming]
        wait(pending)
        # The Edge calls' metrics are written before the last writes, which may take the client's worst case: an
        # invocation that times out there (a DynamoDB stall) runs no `finally`, and its metrics would be lost just when
        # the alarms need them. The rest are written at the end, as usual.
        write_metrics_now()
        writes.flush()
        for mid in writes.failed:
            delays.setdefault(mid, None)
        for item in firsts.values():
            if item.message_id in delays:
                delays.update((twin, delays[item.message_id]) for twin in item.twins)
        failed = set(delays)
        self._postpone(records, delays, deadline, elapsed=before + self._relay.clock.monotonic() - began)
        # Same order as the batch, each failed record once.
        ordered = [mid for r in records if (mid := _message_id(r)) in failed]
        # Sent back without an attempt: each such return still counts as a receive, towards the dead-letter queue.
        if untried:
            count("RecordsNotTried", len(untried))
        # A WARNING when records go back: the runbook's dead-letter procedure reads why here (most reasons have no
        # line of their own), and it allows LogLevel WARNING. A batch that sent nothing back says so at INFO.
        (logger.warning if ordered else logger.info)(
            "batch done",
            records=len(records),
            redelivered=len(set(ordered)),
            writesFailed=len(writes.failed),
            outcomes=dict(Counter(outcomes)),
            redeliveredBecause=dict(Counter(redelivered_because)),
        )
        return {"batchItemFailures": [{"itemIdentifier": mid} for mid in dict.fromkeys(ordered)]}

    def _claim_firsts(self, groups: list[list[_Item]], lease_s: float, claimed: set[str]) -> None:
        """Claim the first record of each group in one `BatchExecuteStatement` (a new event's claim; any other record
        is claimed by its worker, as are these when this fails, or when there is only one). An eventId twice in the
        batch (another identity's event reusing it) is claimed once here: DynamoDB refuses two statements on one item
        in a batch."""
        firsts: list[tuple[_Item, ClaimKey]] = []
        for items in groups:
            item = items[0]
            if item.claim_key is not None and item.event_id not in claimed:
                claimed.add(item.event_id)
                firsts.append((item, item.claim_key))
        if len(firsts) < 2:
            return  # one claim is one request either way, and UpdateItem's answers a repeat with the stored result
        try:
            claims = self._relay.store.claim_new([key for _, key in firsts], lease_s=lease_s)
        except Exception:
            logger.exception("unexpected error claiming a batch's events; they are claimed one by one")
            count("UnexpectedErrors")
            return
        for item, _ in firsts:
            item.claim = claims.get(item.event_id)

    def _postpone(
        self, records: list[dict[str, Any]], delays: dict[str, float | None], deadline: Deadline, *, elapsed: float
    ) -> None:
        """Keep records whose `Retry-After` outlasts the queue's visibility timeout invisible that long instead.
        Not when the invocation may not outlast a slow SQS call: the answer matters more (they then come back at the
        queue's timeout). SQS counts that timeout from the receive, and Edge its wait from its answer, up to the
        receive's `elapsed` seconds later: a wait a little shorter than the timeout may still outlast it."""
        floor = self._settings.queue_visibility_timeout_s
        later: dict[str, int] = {}
        for mid, delay in delays.items():
            # No wait asked (0): left to the queue's timeout, unless the receive looks older than the timeout, when it
            # is shown again at once; a record held back behind it comes back no sooner only so (its wait counts the
            # waits asked, not the timeout left), so this stays, clock skew and all
            seconds = min(math.ceil(delay), MAX_RETRY_DELAY_S) if delay is not None else 0
            if seconds + elapsed > floor:
                later[mid] = seconds
        if not later or self._queue is None:
            return

        def time_for_a_call() -> bool:  # each SQS call may take the client's worst case
            # The invocation's time left, past the batch's deadline too (`remaining()` stops at 0: with a margin of 4 s
            # or more it would always seem to have the time once the deadline had passed).
            return deadline.left() + self._settings.safety_margin_s >= SQS_WORST_CASE_S

        if not time_for_a_call():
            logger.warning("no time left to postpone records; they return at the queue's timeout", records=len(later))
            return
        # Last records first: should the time for SQS calls run out, the records left at the queue's timeout are the
        # batch's first ones, which come back sooner than those held back behind them, never a record sooner than the
        # one of its identity it waits for. (An entry SQS refuses comes back at the timeout whatever its place.)
        chosen = [(r, later[mid]) for r in reversed(records) if (mid := _message_id(r)) in later]
        postponed = self._queue().postpone(chosen, time_for_a_call=time_for_a_call)
        if postponed:
            count("RetriesPostponed", postponed)
            logger.info("records postponed as Edge asked", records=postponed, maxDelaySeconds=max(later.values()))
