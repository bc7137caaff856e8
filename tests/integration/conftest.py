"""Fixtures for integration tests: one local stack (Edge simulator + moto + resources) per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.stack import LocalStack

# Failed SQS records reappear after this many seconds instead of the template's visibility timeout,
# so redelivery and dead-letter tests take seconds. Pass failure_visibility_timeout=None to
# stack.poller(...) to get the queue's real visibility timeout.
FAILURE_VISIBILITY_TIMEOUT = 1


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    """A started :class:`LocalStack` with the function's environment applied for the whole session."""
    with LocalStack(failure_visibility_timeout=FAILURE_VISIBILITY_TIMEOUT) as local, pytest.MonkeyPatch.context() as mp:
        local.apply_env(mp)
        yield local


@pytest.fixture
def clean_stack(stack: LocalStack) -> Iterator[LocalStack]:
    """The session stack with simulator faults/records cleared and the table and queues emptied.

    Gateways and pollers the test obtains from ``stack.gateway()``/``stack.poller()`` are stopped after it.
    """
    stack.reset()
    yield stack
    stack.stop_triggers()
