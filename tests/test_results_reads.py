"""The results asset reads a bounded part of a run's rows (its tables' rows, its charts'
timings): what it shows must be exactly what reading every row showed."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from assets.results import (
    COLUMNS,
    FAILURES_SHOWN,
    TABLE_ROWS,
    ResultRows,
    failures_first,
    item_table,
    phase_checks,
    read_result_rows,
)
from batch_defs.ledger import SOURCE_PHASE, Ledger
from batch_defs.report import duration_histogram, executed, throughput_series
from batch_defs.summary import summarize_run

RUN = "run-1"
ALL_COLUMNS = [*COLUMNS, "started_at", "finished_at", "reused_from"]


def row(phase: str, seq: int, status: str, reused_from: str | None = None) -> dict[str, Any]:
    started = 1000.0 + seq * 0.01
    return {"batch": "b", "partition": "p", "run_id": RUN, "phase": phase,
            "item_key": f"k{seq:04d}", "seq": seq, "status": status, "attempts": 2,
            "started_at": started, "finished_at": started + 0.05 + (seq % 7) * 0.01,
            "duration_s": 0.05 + (seq % 7) * 0.01, "cost": 0.0, "tokens": 0,
            "error": f"bad {seq}" if status in ("failed", "rejected", "invalid") else None,
            "reused_from": reused_from}


@pytest.fixture
def ledger_with_many_failures(unit_ledger: Ledger) -> Ledger:
    """600 items: 20 invalid at the source; in `fetch` every third item fails (more than a
    table's worth), 30 are carried over from an earlier run; in `send` a few are rejected."""
    rows = [row(SOURCE_PHASE, seq, "invalid") for seq in range(0, 600, 30)]
    for seq in range(600):
        if seq % 30 == 0:
            continue
        status = "failed" if seq % 3 == 0 else "succeeded"
        rows.append(row("fetch", seq, status, "run-0" if seq % 20 == 1 else None))
        if status == "succeeded":
            rows.append(row("send", seq, "rejected" if seq % 50 == 1 else "succeeded"))
    unit_ledger.record(rows)
    return unit_ledger


@pytest.mark.unit
def test_bounded_reads_show_what_every_row_showed(ledger_with_many_failures: Ledger) -> None:
    ledger = ledger_with_many_failures
    every = ledger.rows(RUN, columns=ALL_COLUMNS)
    bounded = read_result_rows(ledger, RUN)
    assert len(bounded.shown) < len(every) / 2  # bounded indeed: not every row came back
    # The items table: failures first in source order, then the others; cell for cell.
    assert item_table(bounded.shown) == item_table(every)
    assert (list(failures_first(bounded.shown)["item_key"].head(TABLE_ROWS))
            == list(failures_first(every)["item_key"].head(TABLE_ROWS)))
    # Every phase's check: its first failures and how many more there are.
    summary = summarize_run(ledger, RUN, run={"phases": ["fetch", "send"], "total_items": 600})
    assert summary.per_phase["fetch"].failed > TABLE_ROWS
    checks = phase_checks(summary, ["fetch", "send"], bounded.shown)
    assert checks == phase_checks(summary, ["fetch", "send"], every)
    first_failures = {name: str(meta["first_failures"].value) for name, _, meta in checks}
    failed_fetch = int((every["phase"].eq("fetch") & every["status"].eq("failed")).sum())
    assert failed_fetch > TABLE_ROWS  # more than a table's worth: the count is the tally's
    assert first_failures["fetch_quality"].endswith(f"... {failed_fetch - FAILURES_SHOWN} more")
    # The charts bin the same item-phases: executed ones only (no source rows, no carried).
    assert executed(bounded.timings).equals(bounded.timings)
    assert len(bounded.timings) == len(executed(every))
    assert throughput_series(bounded.timings, 1000.0) == throughput_series(every, 1000.0)
    assert duration_histogram(bounded.timings) == duration_histogram(every)


@pytest.mark.unit
def test_a_run_without_failures_or_rows_reads_empty_parts(unit_ledger: Ledger) -> None:
    empty = read_result_rows(unit_ledger, "no-such-run")
    assert isinstance(empty, ResultRows)
    assert empty.shown.empty and empty.timings.empty
    assert list(empty.shown.columns) == COLUMNS
    unit_ledger.record([row("fetch", seq, "succeeded") for seq in range(150)])
    clean = read_result_rows(unit_ledger, RUN)
    assert list(clean.shown["item_key"]) == [f"k{seq:04d}" for seq in range(TABLE_ROWS)]
    assert len(clean.timings) == 150
    assert isinstance(clean.shown, pd.DataFrame)
