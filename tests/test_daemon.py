"""Runs queued through a real dagster-daemon on a Postgres instance respect the run limits."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
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
BATCHES = ("alpha", "beta", "gamma")


@pytest.fixture
def daemon_home(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    batch_dir = tmp_path / "batches"
    batch_dir.mkdir()
    for name in BATCHES:
        write_batch(batch_dir, {
            "name": name,
            "source": {"type": "inline", "key": "id",
                       "items": [{"id": i} for i in range(1, 11)]},
            "phases": [{"name": "work", "task": "python",
                        "params": {"function": "tests.handlers:sleep_ms", "ms": 1000}}],
            # 5 s of items: long beside the moment between two runs dequeued together starting.
            "options": {"concurrency": 2},
        })
    home = tmp_path / "home"
    home.mkdir()
    with fresh_pg_database() as url:
        # Two runs at once in all, one per batch: SUBMITS test both limits.
        config = queued_instance_config(url, max_concurrent_runs=2)
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "DAGSTER_HOME": str(home), "BATCH_DEFS_PATH": str(batch_dir),
               "PYTHONPATH": str(PROJECT)}
        with running_daemon(home, env, tmp_path / "daemon.log"):
            yield home, env


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in edges:  # an end at the same instant as a start is counted first
        running += change
        peak = max(peak, running)
    return peak


# Submitted in this order, the second alpha run is refused by the per-batch limit while a run
# slot is free, and gamma by the two-run limit while alpha and beta both run.
SUBMITS = (("alpha", "p1"), ("alpha", "p2"), ("beta", "p1"), ("gamma", "p1"))


def test_submitted_runs_respect_both_run_limits(
        daemon_home: tuple[Path, dict[str, str]]) -> None:
    home, env = daemon_home
    run_ids = []
    for name, partition in SUBMITS:
        submit = cli(env, "submit", name, "--partition", partition, timeout_s=180)
        assert submit.returncode == 0, submit.stderr
        run_ids.append(submit.stdout.strip())  # stdout is the run id alone
    with dg.DagsterInstance.from_config(str(home)) as instance:
        deadline = time.monotonic() + 300
        while True:
            records = instance.get_run_records(dg.RunsFilter(run_ids=run_ids))
            if len(records) == len(SUBMITS) and all(r.dagster_run.is_finished for r in records):
                break
            assert time.monotonic() < deadline, [r.dagster_run.status for r in records]
            time.sleep(1)
    assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
    intervals = {r.dagster_run.run_id: (r.start_time, r.end_time) for r in records}
    assert all(start and end for start, end in intervals.values())
    everything = list(intervals.values())
    assert max_overlap(everything) == 2  # runs did overlap, never more than 2
    for name in BATCHES:
        mine = [intervals[r.dagster_run.run_id] for r in records
                if r.dagster_run.job_name == name]
        assert max_overlap(mine) == 1  # one run per batch at a time
    alpha = sorted(intervals[run_id] for run_id in run_ids[:2])
    assert alpha[1][0] >= alpha[0][1]  # the second alpha run waited for the first
