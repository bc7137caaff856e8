"""Concurrent updates of one identity's state from two handler instances lose no entry (issue 3, contract §9).

The store writes state with a conditional put on the version it read and, when that fails, re-reads and merges.
moto server does not make a conditional write atomic against concurrent requests, so racing two writers against it
would test moto: these tests make the interleaving deterministic instead. The first orders the two writers by hand;
the second runs real threads, serializing only the DynamoDB calls (a `HandlesStore` subclass whose `_call` holds a
shared lock, as DynamoDB serializes writes to one item) and lining both writers up on the same version every round.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from relay.identity_state import IdentityState, apply_handles, opaque_identity_id
from relay.integrations.store import HandlesStore
from relay.runtime import Runtime
from relay.settings import load_settings

from devtools.stack import DATASTREAM_ID, LocalStack
from tests.fakes import FakeClock

pytestmark = pytest.mark.integration

T0 = 1_750_000_000.0
MAX_AGE = 3600


@pytest.fixture
def runtimes(clean_stack: LocalStack) -> Iterator[Callable[[], Runtime]]:
    """Fresh handler instances (each with its own boto3 clients) on one fake clock."""
    clock = FakeClock(wall=T0)
    made: list[Runtime] = []

    def make() -> Runtime:
        runtime = Runtime(load_settings(os.environ), clock=clock)
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        if "session" in runtime.__dict__:
            runtime.session.close()


def store_change(key: str, seen: list[int] | None = None) -> Callable[[IdentityState], IdentityState | None]:
    """The change one Edge answer makes: a `state:store` entry `key` (records the version it was applied to)."""

    def change(current: IdentityState) -> IdentityState | None:
        if seen is not None:
            seen.append(current.version)
        handle = {"type": "state:store", "payload": [{"key": key, "value": f"v-{key}", "maxAge": MAX_AGE}]}
        return apply_handles(current, [handle], T0)

    return change


def new_identity() -> str:
    return opaque_identity_id("CRMID", f"crm-race-{uuid.uuid4().hex}")


def test_a_writer_that_lost_the_race_rereads_and_merges_so_both_entries_survive(
    runtimes: Callable[[], Runtime],
) -> None:
    # GIVEN two handler instances and one identity whose state item holds `seed` (version 1)
    first, second = runtimes().store, runtimes().store
    opaque = new_identity()
    assert first.update_state(opaque, DATASTREAM_ID, IdentityState(), store_change("seed")) == 1
    # AND the first instance has read version 1
    read_by_first = first.get_state(opaque, DATASTREAM_ID)
    assert (read_by_first.version, sorted(read_by_first.entries)) == (1, ["seed"])

    # WHEN the second instance writes `from_second` first (version 2)
    read_by_second = second.get_state(opaque, DATASTREAM_ID)
    assert second.update_state(opaque, DATASTREAM_ID, read_by_second, store_change("from_second")) == 1
    # AND the first then writes `from_first` on the version-1 state it had read
    applied_to: list[int] = []
    writes = first.update_state(opaque, DATASTREAM_ID, read_by_first, store_change("from_first", applied_to))

    # THEN its conditional write failed, it re-read version 2 and merged its entry onto it
    assert writes == 1
    assert applied_to == [1, 2]
    final = second.get_state(opaque, DATASTREAM_ID)
    assert final.version == 3
    assert {k: e.value for k, e in final.entries.items()} == {
        "seed": "v-seed",
        "from_second": "v-from_second",
        "from_first": "v-from_first",
    }


class SerializedStore(HandlesStore):
    """The project's store with every DynamoDB call under one lock shared by all instances (so moto's conditional
    checks behave atomically, as DynamoDB's do), counting the conditional writes that failed."""

    lock = threading.Lock()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conflicts = 0

    def _call(self, op: str, **kwargs: Any) -> Any:
        with self.lock:
            try:
                return super()._call(op, **kwargs)
            except ClientError:
                self.conflicts += 1
                raise


def serialized_store(runtime: Runtime) -> SerializedStore:
    s = runtime.settings
    return SerializedStore(
        runtime.clients["dynamodb"], s.handles_table, ttl_days=s.result_ttl_days, clock=runtime.clock
    )


def test_two_instances_writing_one_identity_from_threads_lose_no_entry(runtimes: Callable[[], Runtime]) -> None:
    # GIVEN two handler instances, each on its own thread with its own store, and one new identity
    stores = [serialized_store(runtimes()), serialized_store(runtimes())]
    opaque = new_identity()
    rounds = 10
    read_done = threading.Barrier(2, timeout=20)
    round_done = threading.Barrier(2, timeout=20)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        store = stores[n]
        try:
            for i in range(rounds):
                # both read the same version, then both write: every round one of them must lose and merge
                current = store.get_state(opaque, DATASTREAM_ID)
                read_done.wait()
                assert store.update_state(opaque, DATASTREAM_ID, current, store_change(f"t{n}-{i}")) == 1
                round_done.wait()
        except BaseException as exc:
            errors.append(exc)
            read_done.abort()
            round_done.abort()

    # WHEN each thread adds 10 distinct keys at the same time as the other
    threads = [threading.Thread(target=writer, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    # THEN all 20 keys are in the state, after 20 writes, and 10 of them had to re-read and merge
    assert errors == []
    final = stores[0].get_state(opaque, DATASTREAM_ID)
    assert sorted(final.entries) == sorted(f"t{n}-{i}" for n in (0, 1) for i in range(rounds))
    assert final.version == 2 * rounds
    assert stores[0].conflicts + stores[1].conflicts == rounds
