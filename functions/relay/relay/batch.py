"""SQS batches (contract §8): records of different identities run concurrently, records of one identity in order,
and the answer lists exactly the records to redeliver (`ReportBatchItemFailures`).

Powertools' BatchProcessor runs records one after another; Edge latency dominates, so this module keeps its
response format but runs identity groups on a bounded thread pool.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from relay.clock import Deadline
from relay.errors import InvalidEvent, StoreUnavailable
from relay.identity_state import IdentityState
from relay.models import Source, build_inbound, decode_body, event_id_for, resolve_datastream
from relay.observability import logger
from relay.process_event import Outcome, Relay
from relay.settings import Settings

HOLD_BACK_RECEIVES = 3  # of maxReceiveCount 5: later receives are processed even if an earlier record failed


Carry = IdentityState | None  # an identity's state as stored, carried from one record of the group to the next


@dataclass
class _Item:
    message_id: str
    group: str
    # Takes the identity's known state; returns (acknowledged?, state after). Not acknowledged = redeliver.
    run: Callable[[Carry], tuple[bool, Carry]]
    receive_count: int = 1
    state_key: tuple[str, str] | None = None  # (opaque identity id, datastream) for events with a primary identity


def _attr(record: dict[str, Any], name: str) -> str | None:
    attr = (record.get("messageAttributes") or {}).get(name) or {}
    value = attr.get("stringValue")
    return value if isinstance(value, str) else None


class BatchRunner:
    def __init__(self, settings: Settings, relay: Relay, executor: ThreadPoolExecutor) -> None:
        self._settings = settings
        self._relay = relay
        self._executor = executor

    def _prepare(self, record: dict[str, Any], deadline: Deadline, lease_s: float) -> _Item:
        message_id = str(record.get("messageId", ""))
        raw = record.get("body") or ""
        try:
            receive_count = int((record.get("attributes") or {}).get("ApproximateReceiveCount", 1))
        except (TypeError, ValueError):
            receive_count = 1
        source: Source = "webhook" if _attr(record, "relaySource") == "webhook" else "sqs"
        try:
            sent_ms = float((record.get("attributes") or {}).get("SentTimestamp", 0)) / 1000
        except (TypeError, ValueError):
            sent_ms = 0
        received_at = sent_ms or self._relay.clock.now()  # stable across redeliveries: same default timestamp
        # A replayed or re-queued event names its original eventId; otherwise the messageId is the fallback.
        fallback_id = _attr(record, "eventId") or message_id
        event_id = fallback_id
        datastream = self._settings.datastream_id
        try:
            datastream = resolve_datastream(_attr(record, "datastreamId"), self._settings.datastream_id)
            text, doc = decode_body(raw)
            event_id = event_id_for(doc, fallback_id)
            inbound = build_inbound(
                doc, event_id=event_id, datastream_id=datastream, source=source, received_at=received_at
            )
        except InvalidEvent as exc:
            ds, eid, error = datastream, event_id, exc  # `exc` is unbound after the except block

            def reject(carry: Carry) -> tuple[bool, Carry]:
                self._relay.reject_invalid(eid, datastream_id=ds, source=source, error=error, raw=raw)
                return True, carry

            return _Item(message_id, f"event:{eid}", reject, receive_count)
        key = (inbound.identity_id, inbound.datastream_id) if inbound.identity_id else None
        group = f"identity:{key[1]}:{key[0]}" if key else f"event:{event_id}"

        def process(carry: Carry) -> tuple[bool, Carry]:
            result = self._relay.process(inbound, deadline, lease_s=lease_s, state=carry)
            ok = result.outcome in (Outcome.DELIVERED, Outcome.REJECTED, Outcome.DUPLICATE)
            return ok, result.state  # unknown after a failure: the next record reads it afresh

        return _Item(message_id, group, process, receive_count, key)

    def run(self, event: dict[str, Any], deadline: Deadline, lease_s: float) -> dict[str, Any]:
        records = event.get("Records") or []
        groups: dict[str, list[_Item]] = {}
        for record in records:
            item = self._prepare(record, deadline, lease_s)
            groups.setdefault(item.group, []).append(item)

        # One BatchGetItem for every identity of the batch instead of one GetItem per event; each identity's state is
        # then carried through its records in memory (they run in order on one worker).
        keys = [item.state_key for items in groups.values() for item in items[:1] if item.state_key]
        try:
            known = self._relay.prefetch_states(keys) if keys else {}
        except StoreUnavailable as exc:
            logger.warning("identity states not prefetched; reading them per event", reason=str(exc))
            known = {}

        def run_group(items: list[_Item]) -> list[str]:
            failed: list[str] = []
            carry: Carry = known.get(items[0].state_key) if items[0].state_key else None
            for item in items:
                # Keep one identity's order: once one fails, the rest wait for its redelivery too. But only for the
                # first receives: a record that keeps failing must not drag healthy ones into the dead-letter queue.
                if failed and item.receive_count < HOLD_BACK_RECEIVES:
                    failed.append(item.message_id)
                    continue
                try:
                    ok, carry = item.run(carry)
                except StoreUnavailable as exc:
                    logger.warning("record will be redelivered", messageId=item.message_id, reason=str(exc))
                    ok = False
                except Exception:
                    logger.exception("unexpected error; record will be redelivered", messageId=item.message_id)
                    ok = False
                if not ok:
                    carry = None
                if not ok:
                    failed.append(item.message_id)
            return failed

        futures = [self._executor.submit(run_group, items) for items in groups.values()]
        failed = {mid for future in futures for mid in future.result()}
        # Same order as the batch, each failed record once.
        ordered = [r.get("messageId") for r in records if r.get("messageId") in failed]
        return {"batchItemFailures": [{"itemIdentifier": mid} for mid in dict.fromkeys(ordered)]}
