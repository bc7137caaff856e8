"""The benchmark's cost counts CloudWatch Logs ingestion: the bytes the handler wrote per event, measured, and
Lambda's own lines per batch; a run recorded before the bytes were measured is reported as it was."""

from __future__ import annotations

import re
from typing import Any

import pytest

from devtools.bench import BATCH, CWL_INGEST_BYTE, PLATFORM_LOG_BYTES, Bench

# A full run's raw numbers (`.local/bench-last.json`), before the logged bytes were measured.
RUN: dict[str, Any] = {
    "conc": 16, "ideal": 320.0, "tp_moto": 209.4, "dur_moto": 0.0047, "ddb_rps_moto": 18.8, "rss": 60.2,
    "naive_moto": 15.78, "naive_secrets": 1.0189, "naive_puts": 1.0, "tp_stub": 255.1, "dur_stub": 0.0039,
    "ddb_rps_stub": 23.0, "naive_stub": 16.5, "tp_posts": 268.8, "cpu": 0.0013, "cpu1": 0.0013, "floor_cpu": 0.002,
    "floor_rss": 52.4, "cold": 0.312, "floor_cold": 0.267, "offenders": [["relay.integrations", 5.4]],
    "extra_import_ms": 27.1, "ims": 1, "w_first": 1.08, "iw_first": 3.0, "wcu_first": 3.0, "rru_first": 1.0,
    "w_returning": 0.08, "iw_returning": 2.0, "wcu_returning": 2.0, "rru_returning": 1.0, "max_item": 920,
    "events_counted": 500, "secrets": 4.0, "ims_per_k": 2.0, "quick": False,
}  # fmt: skip


def table(capsys: pytest.CaptureFixture[str], run: dict[str, Any]) -> dict[str, list[str]]:
    Bench(quick=False).print_table(run)
    rows = [re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines()]
    return {cells[0]: cells[1:] for cells in rows if cells[0]}


def test_logged_bytes_add_their_ingestion_price_to_the_cost() -> None:
    without = Bench.cost_per_million(0.0035, 1769, 2, 1, 4)
    with_logs = Bench.cost_per_million(0.0035, 1769, 2, 1, 4, log_bytes=20)

    assert with_logs - without == pytest.approx(20 * 1e6 * CWL_INGEST_BYTE) == pytest.approx(0.01)


def test_the_table_shows_the_bytes_per_event_and_adds_their_cost(capsys: pytest.CaptureFixture[str]) -> None:
    cost = "cost $/million events, arm64 1769 MB, vs naive at 512 MB"
    before = table(capsys, RUN)
    # GIVEN a run in which the handler wrote 16.8 bytes per returning-identity event
    after = table(capsys, {**RUN, "log_bytes_returning": 16.8})

    logs = 16.8 + PLATFORM_LOG_BYTES / BATCH
    assert after["context: CloudWatch Logs bytes/event (logs, EMF, Lambda's lines)"][0] == f"{logs:.1f}"
    assert after["CloudWatch Logs share of it: $/million"][0] == f"{logs * 1e6 * CWL_INGEST_BYTE:.3f}"
    assert float(after[cost][0]) == pytest.approx(float(before[cost][0]) + logs * 1e6 * CWL_INGEST_BYTE, abs=0.006)
    # the naive Lambda's cost counts Lambda's lines too
    assert float(after[cost][1]) >= float(before[cost][1])
    # a run from before the bytes were measured: no logs line, the cost as it was printed then
    assert not any("CloudWatch Logs" in k for k in before)
    assert before[cost][0] == "1.96"


def test_the_naive_lambdas_cost_counts_lambdas_own_lines_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the cost function recording what each cost is computed from
    calls: list[float] = []
    real = Bench.cost_per_million

    def recording(*args: Any, **kwargs: Any) -> float:
        calls.append(args[5] if len(args) > 5 else kwargs.get("log_bytes", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(Bench, "cost_per_million", staticmethod(recording))

    # WHEN a run in which the relay wrote 16.8 bytes per event is printed
    table(capsys, {**RUN, "log_bytes_returning": 16.8})

    # THEN the relay's cost counts its bytes and Lambda's lines, the naive Lambda's Lambda's lines alone (it logs
    # nothing of its own)
    assert calls == [pytest.approx(16.8 + PLATFORM_LOG_BYTES / BATCH), pytest.approx(PLATFORM_LOG_BYTES / BATCH)]
