"""Runs queued through a real dagster-daemon on a Postgres instance respect the run limits."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
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
def daemon_home(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], Path]]:
    batch_dir = tmp_path / "batches"
    batch_dir.mkdir()
    gate = tmp_path / "gate"  # items wait until it exists: the first runs hold their slots
    for name in BATCHES:
        write_batch(batch_dir, {
            "name": name,
            "source": {"type": "inline", "key": "id", "items": [{"id": i} for i in range(4)]},
            "phases": [{"name": "work", "task": "python",
                        "params": {"function": "tests.handlers:sleep_ms", "ms": 50,
                                   "gate": str(gate)}}],
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
        try:
            with running_daemon(home, env, tmp_path / "daemon.log"):
                yield home, env, gate
        finally:
            gate.touch()  # a held run must not outlive the test


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, change in edges:  # an end at the same instant as a start is counted first
        running += change
        peak = max(peak, running)
    return peak


# In this order, the second alpha run is passed over by the per-batch limit while a run slot
# is free, and gamma is held by the two-run limit while alpha and beta both run.
SUBMITS = (("alpha", "p1"), ("alpha", "p2"), ("beta", "p1"), ("gamma", "p1"))
DEQUEUE_INTERVALS_WATCHED = 3


def statuses(instance: dg.DagsterInstance, run_ids: list[str]) -> list[dg.DagsterRunStatus]:
    runs = {r.dagster_run.run_id: r.dagster_run.status
            for r in instance.get_run_records(dg.RunsFilter(run_ids=run_ids))}
    return [runs[run_id] for run_id in run_ids]


def wait_for(instance: dg.DagsterInstance, run_ids: list[str],
             done: Callable[[list[dg.DagsterRunStatus]], bool]) -> list[dg.DagsterRunStatus]:
    deadline = time.monotonic() + 300
    while not done(now := statuses(instance, run_ids)):
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
    return now


def test_submitted_runs_respect_both_run_limits(
        daemon_home: tuple[Path, dict[str, str], Path]) -> None:
    home, env, gate = daemon_home
    run_ids = []
    for name, partition in SUBMITS:
        submit = cli(env, "submit", name, "--partition", partition, timeout_s=180)
        assert submit.returncode == 0, submit.stderr
        run_ids.append(submit.stdout.strip())  # stdout is the run id alone
    started, queued = dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.QUEUED
    with dg.DagsterInstance.from_config(str(home)) as instance:
        wait_for(instance, run_ids, lambda now: now[0] == now[2] == started)
        # The held runs keep both slots: however long the daemon looks, the others wait.
        time.sleep(DEQUEUE_INTERVALS_WATCHED * 1.0)  # dequeue_interval_seconds: 1
        assert statuses(instance, run_ids) == [started, queued, started, queued]
        gate.touch()
        final = wait_for(instance, run_ids, lambda now: all(
            s in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE) for s in now))
        assert set(final) == {dg.DagsterRunStatus.SUCCESS}
        records = instance.get_run_records(dg.RunsFilter(run_ids=run_ids))
    intervals = {r.dagster_run.run_id: (r.start_time, r.end_time) for r in records}
    assert all(start and end for start, end in intervals.values())
    assert max_overlap(list(intervals.values())) == 2  # runs did overlap, never more than 2
    for name in BATCHES:
        mine = [intervals[r.dagster_run.run_id] for r in records
                if r.dagster_run.job_name == name]
        assert max_overlap(mine) == 1  # one run per batch at a time
    alpha = sorted(intervals[run_id] for run_id in run_ids[:2])
    assert alpha[1][0] >= alpha[0][1]  # the second alpha run waited for the first
