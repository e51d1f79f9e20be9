"""The ledger schema is versioned: revisions build exactly what ledger.py declares, a ledger
written by release 1 upgrades in place on first use, and concurrent first uses agree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from batch_defs.ledger import Ledger, metadata
from batch_defs.schema import (
    RELEASE_1,
    VERSION_TABLE,
    alembic_head,
    downgrade,
    head_revision,
    upgrade,
)
from batch_defs.states import ItemStatus
from tests.conftest import fresh_pg_database

RELEASE_1_LEDGER = Path(__file__).parent / "data" / "ledger_release1.db"


def schema_differences(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        # Dagster's own tables may share the database: compare only the ledger's.
        return [d for d in compare_metadata(context, metadata)
                if not (d[0] == "remove_table" and d[1].name not in metadata.tables)]


@pytest.mark.unit
def test_revisions_build_what_ledger_py_declares_on_sqlite(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    upgrade(engine)
    assert schema_differences(engine) == []
    engine.dispose()


@pytest.mark.postgres
def test_revisions_build_what_ledger_py_declares_on_postgres() -> None:
    with fresh_pg_database() as url:
        engine = sa.create_engine(url)
        upgrade(engine)
        assert schema_differences(engine) == []
        downgrade(engine, RELEASE_1)  # and back: every revision can be undone
        upgrade(engine)
        assert schema_differences(engine) == []
        engine.dispose()


@pytest.mark.unit
def test_the_head_revision_the_code_expects_is_the_newest_script() -> None:
    # Opening a ledger compares its stored revision with HEAD_REVISION, not with what
    # Alembic would find by loading every script: the two must never drift apart.
    assert head_revision() == alembic_head()


@pytest.mark.unit
def test_a_release_1_ledger_is_upgraded_and_read(tmp_path: Path) -> None:
    copy = tmp_path / "ledger.db"
    shutil.copy(RELEASE_1_LEDGER, copy)
    with Ledger(f"sqlite:///{copy}") as ledger:  # upgraded on first use
        with ledger.engine.connect() as conn:
            revision = conn.execute(sa.text(f"select version_num from {VERSION_TABLE}")).scalar()
        assert revision == head_revision()
        (listed,) = ledger.runs()
        run = ledger.run(listed["run_id"])
        assert run is not None and run["phases"] == ["first", "second"]
        rows = ledger.rows(run["run_id"])
        assert sorted(rows["status"]) == ["failed", "invalid", "succeeded", "succeeded",
                                          "succeeded", "succeeded"]
        assert rows["skip_cause"].isna().all() and rows["branch"].isna().all()
        # The old rows keep working as the checkpoint: a new run reuses their successes.
        found = ledger.known_outcomes(run["batch"], run["partition"], "next-run",
                                      run["phases"], list(rows["item_key"]))
        assert len(found) == 4 and {o.status for o in found.values()} == {ItemStatus.SUCCEEDED}
        assert all(o.other_run and o.run_id == run["run_id"] for o in found.values())
    engine = sa.create_engine(f"sqlite:///{copy}")
    assert schema_differences(engine) == []
    engine.dispose()


@pytest.mark.unit
def test_five_processes_opening_a_new_ledger_at_once_all_succeed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    code = ("import sys; from batch_defs.ledger import Ledger; "
            "Ledger(sys.argv[1]).close(); print('ok')")
    workers = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(5)]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert [w.returncode for w in workers] == [0] * 5, [err for _, err in outputs]
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        versions = conn.execute(sa.text(f"select version_num from {VERSION_TABLE}")).all()
    assert versions == [(head_revision(),)]
    engine.dispose()
