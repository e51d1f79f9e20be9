"""A batch on a Postgres-backed Dagster instance: runs, events and the ledger in Postgres."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from resources.storage import BatchStorageResource, instance_ledger_url
from tests.conftest import inline_items, run_batch, write_batch

pytestmark = [pytest.mark.postgres, pytest.mark.job]


def test_batch_on_postgres_instance(batch_dir: Path, pg_instance: dg.DagsterInstance,
                                    pg_database: str) -> None:
    write_batch(batch_dir, {
        "name": "pg_batch",
        "source": inline_items(200),
        "phases": [
            {"name": "score", "task": "python",
             "params": {"function": "tests.handlers:fail_listed", "fail_keys": [42]}},
            {"name": "publish", "task": "python",
             "params": {"function": "tests.handlers:sleep_ms", "ms": 2}},
        ],
        "options": {"concurrency": 10, "on_error": "continue", "tolerated_failures": 1},
    })
    assert instance_ledger_url(pg_instance) == pg_database
    ledger = BatchStorageResource().ledger(pg_instance)
    queries_before = ledger.queries
    result = run_batch(batch_dir, pg_instance, "pg_batch", partition="nov")
    assert result.success
    ledger_queries = ledger.queries - queries_before

    engine = sa.create_engine(pg_database)
    with engine.connect() as conn:
        by_status = dict(conn.execute(sa.text(
            "select status, count(*) from batch_item where run_id = :r group by status"),
            {"r": result.run_id}).all())
        # The session's Postgres database is shared by the tests: count this job's runs.
        dagster_runs = conn.execute(sa.text(
            "select count(*) from runs where pipeline_name = 'pg_batch'")).scalar()
        error = conn.execute(sa.text(
            "select error from batch_item where status = 'failed' and run_id = :r"),
            {"r": result.run_id}).scalar()
    engine.dispose()
    assert by_status == {"succeeded": 199 + 199, "failed": 1}
    assert error == "ValueError: bad record 42"
    assert dagster_runs == 1
    assert pg_instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
    # Group commit: at most one write per outcome (400 item-phases), and a few dozen
    # statements for the run itself; no reads per item.
    assert ledger_queries <= 400 + 40, ledger_queries

    # A second run of the partition re-runs only the failed item.
    again = run_batch(batch_dir, pg_instance, "pg_batch", partition="nov")
    assert again.success
    rows = ledger.rows(again.run_id)
    fresh = rows[rows["reused_from"].isna()]
    assert sorted(set(fresh["item_key"])) == ["42"]
