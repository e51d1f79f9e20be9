"""Shared fixtures: temporary Dagster instances (SQLite or Postgres) and batch folders."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from batch_defs.definitions import build_definitions
from tests import handlers

PROJECT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("BATCH_TEST_PG_URL",
                              "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def _reset_handlers() -> None:
    handlers.reset()


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(dagster_home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as inst:
        yield inst


@pytest.fixture
def batch_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "batches"
    folder.mkdir()
    return folder


def write_batch(folder: Path, spec: dict) -> Path:
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def inline_items(n: int) -> dict:
    return {"type": "inline", "key": "id",
            "items": [{"id": i, "name": f"item {i}"} for i in range(1, n + 1)]}


def run_batch(batch_dir: Path, instance: dg.DagsterInstance, name: str, partition: str = "p1",
              run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    defs = build_definitions([batch_dir])
    if not instance.has_dynamic_partition(name, partition):
        instance.add_dynamic_partitions(name, [partition])
    job = defs.resolve_job_def(name)
    return job.execute_in_process(instance=instance, partition_key=partition,
                                  run_config=run_config or {}, raise_on_error=False)


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty Postgres database, dropped afterwards; yields its URL."""
    name = f"batch_defs_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from batch_defs.ledger import Ledger

        engine = Ledger._engines.pop(url, None)
        if engine is not None:
            engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh Postgres database for this test session."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def pg_instance(tmp_path: Path, pg_database: str,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[dg.DagsterInstance]:
    home = tmp_path / "pg_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "telemetry": {"enabled": False},
        "storage": {"postgres": {"postgres_url": pg_database}},
    }))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.from_config(str(home)) as inst:
        yield inst
