"""The soak test (devtools/soak.py) at a few hundred events: same code as ``make soak``, bounded to < 90 s."""

from __future__ import annotations

import time

import pytest

from devtools.soak import SoakConfig, run_soak

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(150)
def test_small_soak_accounts_for_every_event() -> None:
    cfg = SoakConfig(
        events=300,
        seed=7,
        duplicates=0.08,
        invalid=0.02,
        no_identity=0.02,
        poison=3,
        webhook_senders=8,
        gateway_runtimes=4,
        pollers=2,
        send_timeout=60,
        drain_timeout=60,
        progress=False,
    )
    lines: list[str] = []
    started = time.monotonic()
    report = run_soak(cfg, out=lines.append)
    elapsed = time.monotonic() - started
    table = report.table()
    print(table)

    assert report.missing == [], table
    assert report.other_duplicates == {}, table
    assert report.rejected_without_reason == [], table
    assert report.duplicate_ids_without_one_result == [], table
    assert report.stray_results == [], table
    counts = report.counts
    assert counts["generated"] == 300
    assert counts["duplicate_ids"] > 0
    # Every generated eventId ended in exactly one visible place.
    assert counts["event_ids"] == 300
    assert counts["delivered"] + counts["rejected"] + counts["dlq"] == 300, table
    assert counts["dlq"] == 3, table  # the poison events, and only they (Edge always fails them)
    assert report.unexpected == [], table
    assert counts["queue"] == 0, table  # drained
    # Faults were really injected and the invalid / no-identity events were rejected with their reason.
    assert counts["edge_calls"] > counts["delivered"]
    assert any(r.startswith("validation") for r in counts["reasons"]), table
    assert any("EXEG-0306-400" in r for r in counts["reasons"]), table
    assert elapsed < 90, f"soak took {elapsed:.0f} s\n{table}"
