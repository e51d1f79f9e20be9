"""Priorities through a real dagster-daemon: a high-priority run queued last starts first."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.conftest import (
    PROJECT,
    cli,
    fresh_pg_database,
    queued_instance_config,
    running_daemon,
    write_batch,
)

pytestmark = [pytest.mark.daemon, pytest.mark.postgres]


@pytest.fixture
def one_run_at_a_time(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], Path]]:
    """A Postgres instance whose queue starts one run at a time, with its daemon running."""
    batch_dir = tmp_path / "batches"
    batch_dir.mkdir()
    marker = tmp_path / "release"
    one = {"type": "inline", "key": "id", "items": [{"id": 1}]}
    write_batch(batch_dir, {"name": "blocker", "source": one, "phases": [
        {"name": "hold", "task": "python",
         "params": {"function": "tests.control_handlers:hold_until_file",
                    "marker": str(marker)}}]})
    for name, priority in (("routine", 0), ("vip", 3)):
        write_batch(batch_dir, {"name": name, "source": one, "priority": priority, "phases": [
            {"name": "work", "task": "python",
             "params": {"function": "tests.control_handlers:scored"}}]})
    home = tmp_path / "home"
    home.mkdir()
    with fresh_pg_database() as url:
        config = queued_instance_config(url)
        config["concurrency"]["runs"] = {"max_concurrent_runs": 1}
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "DAGSTER_HOME": str(home), "BATCH_DEFS_PATH": str(batch_dir),
               "PYTHONPATH": str(PROJECT)}
        with running_daemon(home, env, tmp_path / "daemon.log"):
            try:
                yield home, env, marker
            finally:
                marker.touch()  # a held run must not outlive the test


def submit(env: dict[str, str], *args: str) -> str:
    done = cli(env, "submit", *args, timeout_s=180)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_high_priority_run_queued_last_starts_first(
        one_run_at_a_time: tuple[Path, dict[str, str], Path]) -> None:
    home, env, marker = one_run_at_a_time
    with dg.DagsterInstance.from_config(str(home)) as instance:
        blocker = submit(env, "blocker", "--partition", "p1")
        deadline = time.monotonic() + 120
        while instance.get_run_by_id(blocker).status != dg.DagsterRunStatus.STARTED:  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.5)
        with ThreadPoolExecutor(2) as pool:  # both queued before the last one
            routine_at = pool.submit(submit, env, "routine", "--partition", "p1")  # 0
            vip_at = pool.submit(submit, env, "vip", "--partition", "p1")  # `priority: 3`
            routine, vip = routine_at.result(), vip_at.result()
        urgent = submit(env, "routine", "--partition", "p2", "--priority", "5")  # queued last
        queued = {run_id: instance.get_run_by_id(run_id) for run_id in (routine, vip, urgent)}
        assert {run.status for run in queued.values()} == {dg.DagsterRunStatus.QUEUED}  # type: ignore[union-attr]
        assert queued[urgent].tags["dagster/priority"] == "5"  # type: ignore[union-attr]
        assert queued[vip].tags["dagster/priority"] == "3"  # type: ignore[union-attr]
        marker.touch()
        ids = [blocker, routine, vip, urgent]
        while True:
            records = instance.get_run_records(dg.RunsFilter(run_ids=ids))
            if len(records) == 4 and all(r.dagster_run.is_finished for r in records):
                break
            assert time.monotonic() < deadline + 120, [r.dagster_run.status for r in records]
            time.sleep(0.5)
    assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
    started = {r.dagster_run.run_id: r.start_time for r in records}
    order = sorted(ids, key=lambda run_id: started[run_id])  # type: ignore[arg-type, return-value]
    assert order == [blocker, urgent, vip, routine]
