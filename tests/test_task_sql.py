"""The `sql` task and `sql_commit`: bound values on SQLite, PostgreSQL and MariaDB, the three
transaction modes, and the shipped migration into PostgreSQL with a poison record."""

from __future__ import annotations

import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from batch_defs.engine import run_items
from batch_defs.items import Item
from batch_defs.ledger import Ledger
from batch_defs.loader import PACKAGE_BATCHES
from batch_defs.tasks import AfterContext, TaskContext, build_after_handler, build_handler
from batch_defs.tasks.sql import SqlError, SqlParams
from batch_defs.tasks.templating import TemplateSecurityError
from resources.database import DatabaseResource
from resources.storage import BatchStorageResource
from tests.conftest import PG_ADMIN_URL, engine_plan, run_batch, write_batch

MARIADB_ADMIN_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
HOSTILE = ["'); drop table people; --", 'Robert"); DELETE FROM people WHERE ("1"="1',
           "x' OR '1'='1", "{{ 7 * 7 }}", "back\\slash; \u00e9\u00e8 \U0001f600",
           "%s %(name)s :name ?"]
TARGET_DDL = (PACKAGE_BATCHES / "data_migration" / "data" / "migration_target.sql").read_text()


# The resources handlers called directly get, as a run would give them (set per test).
RESOURCES: dict[str, DatabaseResource] = {}


@pytest.fixture(autouse=True)
def database() -> Iterator[DatabaseResource]:
    """The resource owning the engines of this test's handlers, disposed at its end (so that
    its databases can be dropped), as a run's teardown does."""
    resource = DatabaseResource()
    RESOURCES["database"] = resource
    yield resource
    resource.dispose()
    RESOURCES.clear()


def context(tmp_path: Path, key: str = "1", phase: str = "load") -> TaskContext:
    return TaskContext(params={}, batch="people", partition="p1", run_id="run-1", phase=phase,
                       key=key, base_dir=tmp_path, output_dir=tmp_path / "out",
                       resources=dict(RESOURCES))


def execute(url: str, *statements: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def people_table(url: str) -> None:
    execute(url, "drop table if exists people",
            "create table people (id integer primary key, name varchar(200) not null, "
            "note varchar(200), score integer, born date)")


def table_rows(url: str, table: str = "people") -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(f"select * from {table} order by 1"))]
    finally:
        engine.dispose()


def table_names(url: str) -> list[str]:
    engine = sa.create_engine(url)
    try:
        return sorted(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def fresh_database(admin_url: str, create: str, drop: str) -> Iterator[str]:
    name = f"batch_sql_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(create.format(name=name)))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(drop.format(name=name)))
        admin.dispose()


@pytest.fixture(scope="module")
def pg_target() -> Iterator[str]:
    yield from fresh_database(PG_ADMIN_URL, 'create database "{name}"',
                              'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="module")
def mariadb_target() -> Iterator[str]:
    yield from fresh_database(MARIADB_ADMIN_URL, "create database `{name}`",
                              "drop database if exists `{name}`")


@pytest.fixture
def sqlite_target(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'target.db'}"


@pytest.mark.unit
def test_params_are_checked_when_the_batch_loads(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="mode upsert needs key_columns"):
        SqlParams.model_validate({"table": "t", "mode": "upsert"})
    with pytest.raises(ValidationError, match=r"key_columns \['id'\] must be in columns"):
        SqlParams.model_validate({"table": "t", "mode": "update", "key_columns": ["id"],
                                  "columns": {"name": "name"}})
    with pytest.raises(ValidationError, match="transaction batch needs `url`"):
        SqlParams.model_validate({"table": "t", "transaction": "batch"})
    with pytest.raises(ValueError, match="setup_sql missing.sql: no such file"):
        build_handler("sql", {"table": "t", "url": "sqlite:///x.db", "setup_sql": "missing.sql"},
                      tmp_path)
    with pytest.raises(ValueError, match="setup_sql ../../etc/x.sql: outside the batch file"):
        build_handler("sql", {"table": "t", "url": "sqlite:///x.db",
                              "setup_sql": "../../etc/x.sql"}, tmp_path)
    with pytest.raises(ValueError, match="columns.name"):
        build_handler("sql", {"table": "t", "url": "sqlite:///x.db",
                              "columns": {"name": "{{ unclosed"}}, tmp_path)


@pytest.mark.unit
def test_insert_upsert_update_delete_on_sqlite(tmp_path: Path, sqlite_target: str) -> None:
    people_table(sqlite_target)
    base = {"table": "people", "url": sqlite_target}
    insert = build_handler("sql", base, tmp_path)
    # Without `columns`, the item fields named like columns are written; others are ignored.
    assert insert({"id": 1, "name": "Ada", "score": 3, "extra": "not a column"},
                  context(tmp_path)) == {"load_rows": 1}
    upsert = build_handler("sql", {**base, "mode": "upsert", "key_columns": ["id"]}, tmp_path)
    upsert({"id": 1, "name": "Ada L.", "score": 4}, context(tmp_path))
    upsert({"id": 2, "name": "Grace", "born": "1906-12-09"}, context(tmp_path, "2"))
    assert table_rows(sqlite_target) == [(1, "Ada L.", None, 4, None),
                                         (2, "Grace", None, None, "1906-12-09")]
    update = build_handler("sql", {**base, "mode": "update", "key_columns": ["id"],
                                   "columns": {"id": "id", "note": "{{ name | upper }}"}},
                           tmp_path)
    update({"id": 2, "name": "grace"}, context(tmp_path, "2"))
    with pytest.raises(SqlError, match="update people: no row with id=9") as missing:
        update({"id": 9, "name": "nobody"}, context(tmp_path, "9"))
    assert missing.value.transient is False  # a retry cannot make the row appear
    delete = build_handler("sql", {**base, "mode": "delete", "key_columns": ["id"]}, tmp_path)
    assert delete({"id": 1, "name": "ignored"}, context(tmp_path)) == {"load_rows": 1}
    assert table_rows(sqlite_target) == [(2, "Grace", "GRACE", None, "1906-12-09")]
    with pytest.raises(SqlError, match=r"insert people: IntegrityError: .*NOT NULL"):
        insert({"id": 3, "note": "no name"}, context(tmp_path, "3"))


@pytest.mark.unit
def test_templates_keep_types_and_are_sandboxed(tmp_path: Path, sqlite_target: str) -> None:
    people_table(sqlite_target)
    params = {"table": "people", "url": sqlite_target,
              "columns": {"id": "{{ n + 100 }}", "name": "{{ first }} {{ last }}",
                          "score": "{{ points }}"}}
    build_handler("sql", params, tmp_path)({"n": 1, "first": "Alan", "last": "Turing",
                                            "points": 7}, context(tmp_path))
    assert table_rows(sqlite_target) == [(101, "Alan Turing", None, 7, None)]
    unsafe = build_handler("sql", {**params, "columns": {"id": "n",
                                                         "name": "{{ ''.__class__ }}"}}, tmp_path)
    with pytest.raises(TemplateSecurityError, match="columns.name: unsafe template"):
        unsafe({"n": 2}, context(tmp_path))
    missing = build_handler("sql", {**params, "columns": {"id": "n", "name": "nom"}}, tmp_path)
    with pytest.raises(ValueError, match="columns.name: the item has no field 'nom'"):
        missing({"n": 3}, context(tmp_path))
    unknown = build_handler("sql", {**params, "columns": {"id": "n", "nickname": "n"}},
                            tmp_path)
    with pytest.raises(ValueError, match="table people has no column 'nickname'"):
        unknown({"n": 4}, context(tmp_path))
    absent = build_handler("sql", {"table": "nope", "url": sqlite_target}, tmp_path)
    with pytest.raises(ValueError, match="table nope does not exist"):
        absent({"id": 1}, context(tmp_path))


@pytest.mark.parametrize("target", [
    "sqlite_target",
    pytest.param("pg_target", marks=pytest.mark.postgres),
    pytest.param("mariadb_target", marks=pytest.mark.integration),
])
def test_hostile_strings_are_bound_and_land_verbatim(target: str, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(target)
    people_table(url)
    base = {"table": "people", "url": url}
    insert = build_handler("sql", {**base, "columns": {"id": "id", "name": "name",
                                                       "note": "{{ note }}"}}, tmp_path)
    for i, text in enumerate(HOSTILE, start=1):
        insert({"id": i, "name": text, "note": text}, context(tmp_path, str(i)))
    # Keys too: a hostile key matches nothing instead of everything.
    update = build_handler("sql", {**base, "mode": "update", "key_columns": ["name"],
                                   "columns": {"name": "name", "score": "score"}}, tmp_path)
    with pytest.raises(SqlError, match="no row with name="):
        update({"name": "x' OR '1'='1' --", "score": 1}, context(tmp_path))
    update({"name": HOSTILE[0], "score": 42}, context(tmp_path))
    upsert = build_handler("sql", {**base, "mode": "upsert", "key_columns": ["id"]}, tmp_path)
    upsert({"id": 3, "name": HOSTILE[2], "note": "changed"}, context(tmp_path, "3"))
    delete = build_handler("sql", {**base, "mode": "delete", "key_columns": ["name"]}, tmp_path)
    delete({"name": "' OR 1=1 --"}, context(tmp_path))
    got = table_rows(url)
    assert [(r[0], r[1]) for r in got] == list(enumerate(HOSTILE, start=1))
    assert [r[2] for r in got] == [t if i != 3 else "changed"
                                   for i, t in enumerate(HOSTILE, start=1)]
    assert [r[3] for r in got] == [42, None, None, None, None, None]
    assert "people" in table_names(url)


@pytest.mark.parametrize("target", [
    "sqlite_target",
    pytest.param("pg_target", marks=pytest.mark.postgres),
    pytest.param("mariadb_target", marks=pytest.mark.integration),
])
def test_chunk_and_batch_transactions_in_every_mode(target: str, tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(target)
    execute(url, "drop table if exists counts",
            "create table counts (id integer primary key, name varchar(20) not null, n integer)",
            "insert into counts values (1, 'old', 0)")
    chunk = build_handler("sql", {"table": "counts", "url": url, "transaction": "chunk",
                                  "mode": "upsert", "key_columns": ["id"]}, tmp_path)
    for i in range(1, 6):
        chunk({"id": i, "name": None if i == 3 else f"n{i}", "n": i}, context(tmp_path, str(i)))
    errors = chunk.finish_chunk([str(i) for i in range(1, 6)])  # type: ignore[attr-defined]
    assert list(errors) == ["3"] and errors["3"].startswith("SqlError: upsert counts: ")
    assert table_rows(url, "counts") == [(1, "n1", 1), (2, "n2", 2), (4, "n4", 4),
                                         (5, "n5", 5)]
    phases = {"insert": [{"id": 10, "name": "ins", "n": 1}],
              "upsert": [{"id": 1, "name": "up", "n": 10}, {"id": 9, "name": "new", "n": 9}],
              "update": [{"id": 2, "name": "upd", "n": 20}],
              "delete": [{"id": 4}]}
    for mode, items in phases.items():
        stage = build_handler("sql", {"table": "counts", "url": url, "transaction": "batch",
                                      "mode": mode, "key_columns": [] if mode == "insert"
                                      else ["id"]}, tmp_path)
        for item in [*items, items[0]]:  # staging the same item twice keeps one row
            stage(item, context(tmp_path, str(item["id"]), phase=mode))
    assert len(table_rows(url, "counts")) == 4  # nothing visible before the commit
    commit = build_after_handler("sql_commit", {"url": url}, tmp_path)
    after = AfterContext({}, "people", "p1", "run-1", {}, tmp_path, tmp_path, list(phases),
                         resources=dict(RESOURCES))
    assert commit(None, after) == {"committed_rows": 5, "committed_tables": ["counts"]}
    assert table_rows(url, "counts") == [(1, "up", 10), (2, "upd", 20), (5, "n5", 5),
                                         (9, "new", 9), (10, "ins", 1)]
    assert not [t for t in table_names(url) if "__stage_" in t]
    assert commit(None, after) == {"committed_rows": 0, "committed_tables": []}


@pytest.mark.unit
def test_chunk_writer_commits_on_finish_and_fails_refused_rows(tmp_path: Path,
                                                               sqlite_target: str) -> None:
    people_table(sqlite_target)
    handler = build_handler("sql", {"table": "people", "url": sqlite_target,
                                    "transaction": "chunk"}, tmp_path)
    for i in (1, 2, 3):
        name = None if i == 2 else f"p{i}"
        assert handler({"id": i, "name": name}, context(tmp_path, str(i))) is None
    assert table_rows(sqlite_target) == []  # held until the chunk ends
    errors = handler.finish_chunk(["1", "2", "3"])  # type: ignore[attr-defined]
    assert list(errors) == ["2"]
    assert errors["2"].startswith("SqlError: insert people: IntegrityError: ")
    assert "NOT NULL" in errors["2"]
    assert table_rows(sqlite_target) == [(1, "p1", None, None, None),
                                         (3, "p3", None, None, None)]
    assert handler.finish_chunk(["1"]) == {}  # type: ignore[attr-defined]


class DeferredWrites:
    """A handler deferring its 'write' to the chunk's end, failing the keys in `bad`; it
    looks at the ledger when the engine calls finish_chunk."""

    def __init__(self, ledger: Ledger, run_id: str, bad: set[str]):
        self.ledger, self.run_id, self.bad = ledger, run_id, bad
        self.rows_before_finish = -1

    def __call__(self, item: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        time.sleep(0.15)  # long enough in all for the sink's periodic flushes to come due
        return {"held": True}

    def finish_chunk(self, keys: list[str]) -> dict[str, str]:
        self.rows_before_finish = len(self.ledger.rows(self.run_id))
        return {key: f"write of {key} refused" for key in keys if key in self.bad}


@pytest.mark.unit
def test_engine_records_deferred_items_only_after_finish_chunk(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    handler = DeferredWrites(ledger, "run-d", {"3", "7"})
    items = [Item(str(i), i, {"id": i}) for i in range(1, 13)]
    report = run_items(engine_plan(ledger, [handler], tmp_path, run_id="run-d", concurrency=2,
                                   on_error="continue", tolerated_failures=5), items, tmp_path)
    assert handler.rows_before_finish == 0  # nothing recorded as done before the write
    recorded = ledger.rows("run-d")
    failed = recorded[recorded["status"] == "failed"]
    assert sorted(failed["item_key"]) == ["3", "7"]
    assert list(failed["error"]) == ["write of 3 refused", "write of 7 refused"]
    assert failed["input"].notna().all()  # the dead-letter payload is kept
    assert (recorded["status"] == "succeeded").sum() == 10 and len(recorded) == 12
    assert report.failed == 2
    # fail_fast: a deferred failure beyond the tolerance stops the batch.
    stopped = run_items(engine_plan(ledger, [DeferredWrites(ledger, "run-e", {"2"})], tmp_path,
                                    run_id="run-e", partition="p2", concurrency=2),
                        items[:4], tmp_path)
    assert stopped.stop is not None
    assert stopped.stop.reason == ("fail_fast: item '2' failed in phase 'phase0': "
                                   "write of 2 refused")
    ledger.close()


def table_spec(url: str, transaction: str, n: int, poison: int | None = None,
               mode: str = "insert") -> dict:
    return {
        "name": "loader",
        "source": {"type": "inline", "key": "id",
                   "items": [{"id": i, "name": None if i == poison else f"name {i}",
                              "note": HOSTILE[i % len(HOSTILE)]} for i in range(1, n + 1)]},
        "phases": [{"name": "load", "task": "sql",
                    "params": {"url": url, "table": "people", "mode": mode,
                               "key_columns": ["id"] if mode != "insert" else [],
                               "transaction": transaction}}],
        "options": {"concurrency": 4, "chunk_size": 10, "on_error": "continue"},
        "after": [{"task": "sql_commit", "params": {"url": url}}],
    }


@pytest.mark.job
def test_chunk_transaction_in_a_job(batch_dir: Path, instance: dg.DagsterInstance,
                                    sqlite_target: str) -> None:
    people_table(sqlite_target)
    write_batch(batch_dir, table_spec(sqlite_target, "chunk", 25, poison=13))
    result = run_batch(batch_dir, instance, "loader")
    assert not result.success  # one failure, none tolerated
    assert [r[0] for r in table_rows(sqlite_target)] == [i for i in range(1, 26) if i != 13]
    recorded = BatchStorageResource().ledger(instance).rows(result.run_id)
    failed = recorded[recorded["status"] == "failed"]
    assert list(failed["item_key"]) == ["13"]
    assert "NOT NULL" in failed["error"].iloc[0]


@pytest.mark.job
def test_batch_transaction_commits_all_or_nothing(batch_dir: Path, instance: dg.DagsterInstance,
                                                  sqlite_target: str) -> None:
    people_table(sqlite_target)
    execute(sqlite_target, "insert into people (id, name) values (1, 'kept as it was')")
    write_batch(batch_dir, table_spec(sqlite_target, "batch", 30, poison=17, mode="upsert"))
    for _ in range(2):  # a failed run, resumed while still failing, stages nothing twice
        failed = run_batch(batch_dir, instance, "loader")
        assert not failed.success
        assert table_rows(sqlite_target) == [(1, "kept as it was", None, None, None)]
        stages = [t for t in table_names(sqlite_target) if t.startswith("people__stage_")]
        assert len(stages) == 1 and len(table_rows(sqlite_target, stages[0])) == 29
    # The data is fixed; the partition runs again: 29 items reused, 1 staged, all committed.
    write_batch(batch_dir, table_spec(sqlite_target, "batch", 30, mode="upsert"))
    fixed = run_batch(batch_dir, instance, "loader")
    assert fixed.success
    got = table_rows(sqlite_target)
    assert [r[0] for r in got] == list(range(1, 31))
    assert got[0][1] == "name 1" and got[16][1] == "name 17"
    assert [r[2] for r in got] == [HOSTILE[i % len(HOSTILE)] for i in range(1, 31)]
    assert not [t for t in table_names(sqlite_target) if "__stage_" in t]
    summary = BatchStorageResource().ledger(instance).run(fixed.run_id)["summary"]
    assert summary["after"]["sql_commit"] == {"committed_rows": 30,
                                              "committed_tables": ["people"]}
    # Once more: everything is reused, nothing is staged, the commit has nothing to do.
    again = run_batch(batch_dir, instance, "loader")
    assert again.success and len(table_rows(sqlite_target)) == 30


def poisoned_legacy(tmp_path: Path, country: str | None = None) -> Path:
    """A copy of the shipped legacy database, record 700 given a country the target refuses."""
    copy = tmp_path / "legacy.db"
    shutil.copy(PACKAGE_BATCHES / "data_migration" / "data" / "legacy.db", copy)
    if country is not None:
        with sqlite3.connect(copy) as conn:
            conn.execute("update legacy_customers set country_code = ? where cust_no = 700",
                         (country,))
        conn.close()
    return copy


def migration_config(source: Path, *overrides: str) -> dict:
    return {"resources": {"run_overrides": {"config": {
        "overrides": [f"source.url=sqlite:///{source}", *overrides]}}}}


@pytest.fixture
def migration_target(pg_target: str, monkeypatch: pytest.MonkeyPatch) -> str:
    execute(pg_target, "drop table if exists migrated_customers")
    monkeypatch.setenv("MIGRATION_TARGET_URL", pg_target)
    return pg_target


@pytest.mark.postgres
@pytest.mark.job
def test_migration_with_poison_record_leaves_target_untouched(
        tmp_path: Path, instance: dg.DagsterInstance, migration_target: str) -> None:
    execute(migration_target, TARGET_DDL,
            "insert into migrated_customers values (1, 'Old One', 'old1@example.com', 'NO', "
            "'2001-01-01', 1.50, true), (2, 'Old Two', 'old2@example.com', 'SE', "
            "'2002-02-02', 2.50, false)")
    before = table_rows(migration_target, "migrated_customers")
    poisoned = poisoned_legacy(tmp_path, country="nor")
    result = run_batch(PACKAGE_BATCHES, instance, "data_migration", partition="poisoned",
                       run_config=migration_config(poisoned))
    assert not result.success
    assert table_rows(migration_target, "migrated_customers") == before
    recorded = BatchStorageResource().ledger(instance).rows(result.run_id, phase="load")
    failed = recorded[recorded["status"] == "failed"]
    assert list(failed["item_key"]) == ["700"]
    assert "value too long for type character(2)" in failed["error"].iloc[0]
    assert (recorded["status"] == "succeeded").sum() == 999
    steps = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert "data_migration_batch.sql_commit" not in steps

    # The 999 good rows wait in the partition's staging table, each once.
    stages = [t for t in table_names(migration_target) if "__stage_" in t]
    assert len(stages) == 1 and len(table_rows(migration_target, stages[0])) == 999


@pytest.mark.postgres
@pytest.mark.job
def test_migration_in_chunk_transactions_commits_all_but_the_poison(
        tmp_path: Path, instance: dg.DagsterInstance, migration_target: str) -> None:
    result = run_batch(PACKAGE_BATCHES, instance, "data_migration", partition="chunked",
                       run_config=migration_config(poisoned_legacy(tmp_path, country="nor"),
                                                   "phases[1].params.transaction=chunk",
                                                   "options.on_error=continue"))
    assert not result.success  # 1 failed item, 0 tolerated; the other rows are committed
    migrated = table_rows(migration_target, "migrated_customers")
    assert len(migrated) == 999 and 700 not in {row[0] for row in migrated}
    recorded = BatchStorageResource().ledger(instance).rows(result.run_id, phase="load")
    assert (recorded["status"] == "succeeded").sum() == 999
    failed = recorded[recorded["status"] == "failed"]
    assert list(failed["item_key"]) == ["700"]
    assert "value too long for type character(2)" in failed["error"].iloc[0]


def constrained_target(url: str) -> None:
    """members: CHECK, UNIQUE and a foreign key to teams; one member exists already."""
    execute(url, "drop table if exists members", "drop table if exists teams",
            "create table teams (id integer primary key, name varchar(50) not null)",
            "insert into teams values (1, 'red'), (2, 'blue')",
            "create table members (id integer primary key, email varchar(100) not null, "
            "team_id integer not null, score integer not null, "
            "constraint score_not_negative check (score >= 0), "
            "constraint members_email_unique unique (email), "
            "constraint members_team_fk foreign key (team_id) references teams (id))",
            "insert into members values (100, 'taken@example.com', 1, 5)")


def member(i: int, bad: bool) -> dict[str, Any]:
    """Item i; `bad` items 4, 7, 9 and 11 break one constraint each (11 repeats 10's email)."""
    email = "taken@example.com" if bad and i == 7 else f"m{i}@example.com"
    return {"id": i, "email": "m10@example.com" if bad and i == 11 else email,
            "team_id": 99 if bad and i == 9 else 1 + i % 2, "score": -1 if bad and i == 4 else i}


def members_spec(url: str, bad: bool) -> dict:
    return {
        "name": "members",
        "source": {"type": "inline", "key": "id", "items": [member(i, bad) for i in range(1, 13)]},
        "phases": [{"name": "load", "task": "sql",
                    "params": {"url": url, "table": "members", "transaction": "batch"}}],
        "options": {"concurrency": 3, "chunk_size": 5, "on_error": "continue"},
        "after": [{"task": "sql_commit", "params": {"url": url}}],
    }


# What each database says about each refused item (constraint names where it gives them).
REFUSALS = {
    "sqlite": {"4": "CHECK constraint failed", "7": "UNIQUE constraint failed: members.email",
               "9": "FOREIGN KEY constraint failed",
               "11": "UNIQUE constraint failed: members.email"},
    "postgresql": {"4": "score_not_negative", "7": "members_email_unique",
                   "9": "members_team_fk", "11": "members_email_unique"},
    "mysql": {"4": "score_not_negative", "7": "members_email_unique", "9": "members_team_fk",
              "11": "members_email_unique"},
}


@pytest.mark.job
@pytest.mark.parametrize("target", [
    "sqlite_target",
    pytest.param("pg_target", marks=pytest.mark.postgres),
    pytest.param("mariadb_target", marks=pytest.mark.integration),
])
def test_commit_refusal_fails_exactly_the_refused_items(target: str, batch_dir: Path,
                                                        instance: dg.DagsterInstance,
                                                        request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(target)
    constrained_target(url)
    before = table_rows(url, "members")
    write_batch(batch_dir, members_spec(url, bad=True))
    failed = run_batch(batch_dir, instance, "members")

    assert not failed.success
    assert table_rows(url, "members") == before  # all or nothing: nothing
    ledger = BatchStorageResource().ledger(instance)
    rows = ledger.rows(failed.run_id).set_index("item_key")
    refused = sorted(rows.index[rows["status"] == "failed"], key=int)
    assert refused == ["4", "7", "9", "11"]
    assert (rows["status"] == "succeeded").sum() == 8
    expected = REFUSALS[sa.make_url(url).get_backend_name()]
    for key, fragment in expected.items():
        error = rows.loc[key, "error"]
        assert error.startswith("SqlError: sql_commit insert members: ") and fragment in error
    (message,) = [e.event_specific_data.error.message for e in failed.all_events
                  if e.event_type_value == "STEP_FAILURE"]
    assert "the target refused the staged rows of 4 items" in message
    assert "load item '4': SqlError: sql_commit insert members: " in message
    assert ledger.run(failed.run_id)["status"] == "failed"
    # The staged rows wait for the next run: 12, each once.
    (stage,) = [t for t in table_names(url) if t.startswith("members__stage_")]
    assert len(table_rows(url, stage)) == 12

    # The data is fixed; the partition runs again: only the refused items run, all commit.
    write_batch(batch_dir, members_spec(url, bad=False))
    fixed = run_batch(batch_dir, instance, "members")
    assert fixed.success
    again = ledger.rows(fixed.run_id)
    assert sorted(again.loc[again["reused_from"].isna(), "item_key"], key=int) == refused
    assert [r[0] for r in table_rows(url, "members")] == [*range(1, 13), 100]
    assert table_rows(url, "members")[3] == (4, "m4@example.com", 1, 4)
    assert not [t for t in table_names(url) if t.startswith("members__stage_")]


@pytest.mark.job
def test_a_refused_row_staged_by_an_earlier_run_is_redone(batch_dir: Path,
                                                          instance: dg.DagsterInstance,
                                                          sqlite_target: str) -> None:
    constrained_target(sqlite_target)
    spec = members_spec(sqlite_target, bad=False)
    items = spec["source"]["items"]
    items[1]["email"] = None  # refused when staged: the run fails before sql_commit
    items[3]["score"] = -1  # staged fine, refused by the target's CHECK at the commit
    write_batch(batch_dir, spec)
    first = run_batch(batch_dir, instance, "members")
    assert not first.success
    items[1]["email"] = "m2@example.com"
    write_batch(batch_dir, spec)
    second = run_batch(batch_dir, instance, "members")  # item 4 is reused from the first run
    assert not second.success
    ledger = BatchStorageResource().ledger(instance)
    for run in (first, second):  # neither run may pass item 4 on as done
        rows = ledger.rows(run.run_id).set_index("item_key")
        assert rows.loc["4", "status"] == "failed"
        assert "CHECK constraint failed" in rows.loc["4", "error"]
    assert ledger.rows(first.run_id).set_index("item_key").loc["4", "error"].endswith(
        f"(found at run {second.run_id})")

    items[3]["score"] = 4
    write_batch(batch_dir, spec)
    third = run_batch(batch_dir, instance, "members")
    assert third.success
    rows = ledger.rows(third.run_id)
    assert list(rows.loc[rows["reused_from"].isna(), "item_key"]) == ["4"]
    assert len(table_rows(sqlite_target, "members")) == 13
