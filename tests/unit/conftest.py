"""Fixtures shared by the unit tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from moto import mock_aws


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process moto (DynamoDB's condition semantics, SQS) with dummy credentials and no endpoint override."""
    for name, value in {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_SQS", "AWS_ENDPOINT_URL_DYNAMODB"):
        monkeypatch.delenv(name, raising=False)
    from devtools import moto_fidelity

    moto_fidelity.install()  # DynamoDB's PartiQL INSERT semantics, SQS safe for concurrent receives (module says why)
    with mock_aws():
        yield


@pytest.fixture
def emitted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], dict[str, list[float]]]]:
    """The relay's metrics recorded since the test started (name -> values): those already written out (a batch writes
    its set before its last result write, or when a metric reaches 100 values) and those the next flush would emit."""
    from relay import observability
    from relay.observability import metrics

    written: dict[str, list[float]] = {}
    write = observability._write_metric_set

    def recording() -> None:
        for name, metric in metrics.metric_set.items():
            written.setdefault(name, []).extend(metric["Value"])
        write()

    monkeypatch.setattr(observability, "_write_metric_set", recording)
    metrics.clear_metrics()

    def seen() -> dict[str, list[float]]:
        held = {name: list(m["Value"]) for name, m in metrics.metric_set.items()}
        return {name: written.get(name, []) + held.get(name, []) for name in {*written, *held}}

    yield seen
    metrics.clear_metrics()


@dataclass
class StoreOnMoto:
    ddb: Any  # the boto3 DynamoDB client
    store: Any  # relay.integrations.store.HandlesStore on table "t"
    clock: Any  # tests.fakes.FakeClock, the store's clock


@pytest.fixture
def store_on_moto(aws: None) -> StoreOnMoto:
    """The real HandlesStore (DynamoDB's condition semantics) on the template's table, in in-process moto."""
    import boto3
    from relay.integrations.store import HandlesStore

    from devtools.resources import create_handles_table
    from tests.fakes import FakeClock

    ddb = boto3.client("dynamodb")
    create_handles_table(ddb, "t")
    clock = FakeClock()
    return StoreOnMoto(ddb, HandlesStore(ddb, "t", ttl_days=30, clock=clock), clock)


FUNCTION_DIR = Path(__file__).resolve().parents[2] / "functions" / "relay"


def fresh_interpreter(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a new Python with only the function's code on its path and `env` as its whole environment (what
    a cold start sees: nothing imported, no variable set but these)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(FUNCTION_DIR), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
