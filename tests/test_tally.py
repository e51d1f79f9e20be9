"""A run's counts come from the tally the ledger's writers keep (batch_tally, revision 0004):
it must always say what a grouped read of every row says, whatever was written, rewritten
(a retried step upserts its rows again) or deleted, by however many writers at once."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_defs.ledger import Ledger, item_table, tally_table
from batch_defs.schema import downgrade, upgrade
from batch_defs.summary import summarize_run
from tests.conftest import fresh_pg_database

Group = tuple[str, str, str | None, bool]


def scanned(ledger: Ledger, run_id: str) -> dict[Group, tuple[int, float, int, float,
                                                             float | None, float | None]]:
    """The reference: every row of the run read and grouped, as row_groups() did before."""
    t = item_table.c
    query = (sa.select(t.phase, t.status, t.skip_cause, t.reused_from.is_not(None),
                       sa.func.count(), sa.func.coalesce(sa.func.sum(t.cost), 0.0),
                       sa.func.coalesce(sa.func.sum(t.tokens), 0),
                       sa.func.coalesce(sa.func.sum(t.duration_s), 0.0),
                       sa.func.min(t.started_at), sa.func.max(t.finished_at))
             .where(t.run_id == run_id)
             .group_by(t.phase, t.status, t.skip_cause, t.reused_from.is_not(None)))
    with ledger.engine.connect() as conn:
        return {(phase, status, cause, bool(reused)): (int(n), float(cost), int(tokens),
                                                       float(work), first, last)
                for phase, status, cause, reused, n, cost, tokens, work, first, last
                in conn.execute(query)}


def tallied(ledger: Ledger, run_id: str) -> dict[Group, tuple[int, float, int, float,
                                                             float | None, float | None]]:
    return {(g.phase, g.status, g.skip_cause, g.reused): (g.rows, g.cost, g.tokens, g.work_s,
                                                          g.first_started, g.last_finished)
            for g in ledger.row_groups(run_id)}


def assert_tally_matches(ledger: Ledger, run_id: str, rewritten: bool) -> None:
    """Counts, cost, tokens and work agree exactly (the values are binary fractions); the
    times agree too unless rows were rewritten, whose earlier times their old group keeps."""
    reference, tally = scanned(ledger, run_id), tallied(ledger, run_id)
    assert tally.keys() == reference.keys()
    for group, (n, cost, tokens, work, first, last) in reference.items():
        t_n, t_cost, t_tokens, t_work, t_first, t_last = tally[group]
        assert (t_n, t_cost, t_tokens, t_work) == (n, cost, tokens, work), group
        if not rewritten:
            assert (t_first, t_last) == (first, last), group
        else:
            assert first is None or (t_first is not None and t_first <= first), group
            assert last is None or (t_last is not None and t_last >= last), group


def item_row(run_id: str, phase: str, key: int, status: str, cause: str | None = None,
             cost: float = 0.0, tokens: int = 0, duration: float | None = 1.0,
             started: float = 100.0, reused_from: str | None = None) -> dict[str, Any]:
    return {"batch": "b", "partition": "p", "run_id": run_id, "phase": phase,
            "item_key": f"k{key}", "seq": key, "status": status, "attempts": 1,
            "started_at": started, "finished_at": started + (duration or 0.0),
            "duration_s": duration, "cost": cost, "tokens": tokens, "skip_cause": cause,
            "reused_from": reused_from}


writes = st.builds(
    item_row, run_id=st.sampled_from(["run-a", "run-b"]),
    phase=st.sampled_from(["_source", "fetch", "send"]), key=st.integers(0, 7),
    status=st.sampled_from(["succeeded", "failed", "skipped", "rejected", "invalid"]),
    cause=st.sampled_from([None, "condition", "handler"]),
    cost=st.sampled_from([0.0, 0.25, 1.5, 3.0]), tokens=st.integers(0, 5),
    duration=st.sampled_from([None, 0.5, 2.0]), started=st.sampled_from([10.0, 20.0, 30.0]),
    reused_from=st.sampled_from([None, "run-0"]))


@pytest.mark.unit
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(writes, min_size=1, max_size=6), min_size=1, max_size=8))
def test_the_tally_agrees_with_every_row_after_any_writes_and_rewrites(
        tmp_path_factory: pytest.TempPathFactory, batches: list[list[dict[str, Any]]]) -> None:
    folder = tmp_path_factory.mktemp("tally")
    with Ledger(f"sqlite:///{folder / 'ledger.db'}") as ledger:
        for batch in batches:
            # One statement may not upsert a key twice (Postgres refuses): the last one wins.
            unique = {(r["run_id"], r["phase"], r["item_key"]): r for r in batch}
            ledger.record(list(unique.values()))
            for run_id in ("run-a", "run-b"):
                assert_tally_matches(ledger, run_id, rewritten=True)


@pytest.mark.unit
def test_a_run_through_the_engine_is_counted_exactly(unit_ledger: Ledger,
                                                     tmp_path: Path) -> None:
    from batch_defs.engine import run_items
    from batch_defs.items import Item
    from tests.conftest import engine_plan

    def handler(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if item["id"] % 7 == 0:
            raise ValueError("sevens fail")
        return {"ok": True}

    plan = engine_plan(unit_ledger, [handler, handler], tmp_path, concurrency=4,
                       on_error="continue")
    run_items(plan, [Item(str(i), i, {"id": i}) for i in range(200)], tmp_path / "spool")
    assert_tally_matches(unit_ledger, "run-1", rewritten=False)
    summary = summarize_run(unit_ledger, "run-1")
    assert (summary.items, summary.failed, summary.succeeded) == (200, 29, 171)


@pytest.mark.unit
def test_deleting_a_partition_deletes_its_counts(unit_ledger: Ledger) -> None:
    unit_ledger.record([item_row("run-a", "fetch", k, "succeeded") for k in range(5)])
    unit_ledger.record([{**item_row("run-c", "fetch", 1, "failed"), "partition": "other"}])
    unit_ledger.delete_partition("b", "p")
    with unit_ledger.engine.connect() as conn:
        left = conn.execute(sa.select(tally_table.c.run_id, tally_table.c.row_count)).all()
    assert left == [("run-c", 1)]
    assert unit_ledger.row_groups("run-a") == []


@pytest.mark.unit
def test_upgrading_counts_the_rows_already_there(tmp_path: Path) -> None:
    """A ledger written before the tally (revision 0003) is counted once by the upgrade,
    and from then on by the triggers."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url) as ledger:
        ledger.record([item_row("run-a", "fetch", k, "succeeded", cost=0.5) for k in range(6)])
        downgrade(ledger.engine, "0003")
        with ledger.engine.begin() as conn:  # rows written by a release without the tally
            conn.execute(item_table.insert(), [
                item_row("run-a", "send", k, "failed", tokens=2) | {"attempts": 1}
                for k in range(3)])
        upgrade(ledger.engine)
        assert_tally_matches(ledger, "run-a", rewritten=False)
        ledger.record([item_row("run-a", "send", 0, "succeeded")])  # a retry, after upgrade
        assert_tally_matches(ledger, "run-a", rewritten=True)
        assert tallied(ledger, "run-a")[("send", "failed", None, False)][0] == 2


@pytest.mark.postgres
def test_concurrent_writers_on_postgres_neither_wait_nor_miscount() -> None:
    """Four connections write and rewrite the same items side by side (each its own shard):
    no deadlock, no lost update, and the sum of the shards is every row's truth."""
    with fresh_pg_database() as url, Ledger(url) as ledger:
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                for round_ in range(40):
                    status = "failed" if (n + round_) % 3 == 0 else "succeeded"
                    ledger.record([item_row("run-a", phase, k, status, cost=0.25 * n,
                                            tokens=n, started=float(round_))
                                   for phase in ("fetch", "send") for k in range(12)])
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in threads)  # none waits forever
        assert not errors, errors
        assert_tally_matches(ledger, "run-a", rewritten=True)
        with ledger.engine.connect() as conn:
            shards = conn.execute(sa.select(sa.func.count(sa.distinct(tally_table.c.shard))))
            assert shards.scalar() > 1  # the writers counted apart
        assert sum(g.rows for g in ledger.row_groups("run-a")) == 24


@pytest.mark.unit
def test_a_summary_reads_no_runs_rows_in_bulk(unit_ledger: Ledger) -> None:
    """Every statement a summary sends finds its batch_item rows through an index on what
    it wants (stopping rows by status, keys by key), never by reading the run's rows: the
    plans are SQLite's own (EXPLAIN QUERY PLAN of each statement as sent)."""
    unit_ledger.start_run("run-a", "b", "p", 40, ["fetch", "send"])
    unit_ledger.record([item_row("run-a", phase, k, "failed" if k == 3 else "succeeded")
                        for phase in ("fetch", "send") for k in range(40)])
    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "batch_item" in statement and not statement.startswith("EXPLAIN"):
            sent.append((statement, parameters))

    sa.event.listen(unit_ledger.engine, "before_cursor_execute", capture)
    try:
        summary = summarize_run(unit_ledger, "run-a")
    finally:
        sa.event.remove(unit_ledger.engine, "before_cursor_execute", capture)
    assert (summary.failed, summary.succeeded) == (1, 39)
    assert sent, "the summary read no item rows at all"
    with unit_ledger.engine.connect() as conn:
        for statement, parameters in sent:
            plan = " | ".join(row[3] for row in conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", parameters))
            assert "SCAN batch_item" not in plan, plan
            assert "(run_id=?)" not in plan and "(run_id=? AND phase=?)" not in plan, plan
