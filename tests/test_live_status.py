"""`batch-defs status` of a live run from the ledger alone: the run's engine keeps Dagster's
view of it there (batch_run.live_view), so the command reads one database and imports nothing
of Dagster. Wherever the ledger cannot vouch for the run, Dagster answers as before."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from batch_defs.home import (
    SET_UP_MARK,
    SETTINGS_FILE,
    ledger_url_without_instance,
    sqlite_ledger_url,
)
from batch_defs.ledger import Ledger
from batch_defs.run_status import LIVE_VIEW_MAX_AGE_S, DagsterView, StepFailure, live_status
from batch_defs.states import RunState
from resources.storage import instance_ledger_url, open_ledger
from tests.conftest import PROJECT, run_batch, write_batch

# The status command in a fresh interpreter that says, after it, which of the modules a
# live run's status does without were imported: Dagster, and the spec's models (with the task
# registry), which only batches being loaded need.
HEAVY_MODULES = ("dagster", "batch_defs.spec", "batch_defs.tasks")
STATUS_PROBE = f"""
import sys
from batch_defs.cli import main
try:
    main(sys.argv[1:])
except SystemExit as ended:
    code = ended.code
print("imported:", *[m for m in {HEAVY_MODULES!r} if m in sys.modules], file=sys.stderr)
sys.exit(code)
"""


def live_run(ledger: Ledger, run_id: str = "run-live", **view: Any) -> None:
    """A running run holding its partition, with a fresh view of Dagster's."""
    ledger.start_run(run_id, "b", "p1", total_items=10, phases=["work"])
    taken = ledger.acquire_lease("b", "p1", run_id, "host", 1, lambda held: False)
    assert taken.held_by is None
    ledger.keep_live_view(run_id, DagsterView(**{
        "status": "STARTED", "finished": False, "job": "b", "partition": "p1",
        "step_failures": [StepFailure(step="work_0", error="Failure: chunk 0 broke")],
        **view}).model_dump(mode="json"))


@pytest.mark.unit
def test_a_live_run_is_shown_from_the_view_its_engine_keeps(unit_ledger: Ledger) -> None:
    live_run(unit_ledger)
    shown = live_status(unit_ledger, "run-live")
    assert shown is not None
    assert (shown.status, shown.state, shown.job, shown.partition) == (
        "STARTED", RunState.RUNNING, "b", "p1")
    assert [f.model_dump() for f in shown.step_failures] == [
        {"step": "work_0", "error": "Failure: chunk 0 broke"}]
    assert shown.summary is not None and shown.summary.items == 10
    assert shown.progress is not None and shown.progress["total"] == 10


@pytest.mark.unit
@pytest.mark.parametrize("why", ["old view", "old heartbeat", "paused", "finished view",
                                 "another holder", "no view", "unknown run"])
def test_the_ledger_does_not_answer_for_a_run_it_cannot_vouch_for(unit_ledger: Ledger,
                                                                   why: str) -> None:
    now = time.time()
    view = {"finished view": {"finished": True, "status": "FAILURE"},
            "old view": {"read_at": now - LIVE_VIEW_MAX_AGE_S - 1}}.get(why, {})
    if why == "no view":
        unit_ledger.start_run("run-live", "b", "p1", total_items=10, phases=["work"])
        unit_ledger.acquire_lease("b", "p1", "run-live", "host", 1, lambda held: False)
    elif why != "unknown run":
        live_run(unit_ledger, **view)
    if why == "paused":
        unit_ledger.set_status("run-live", RunState.PAUSED)
    if why == "another holder":
        unit_ledger.release_lease("b", "p1", "run-live")
        unit_ledger.acquire_lease("b", "p1", "run-next", "host", 2, lambda held: False)
    at = now + LIVE_VIEW_MAX_AGE_S + 1 if why == "old heartbeat" else now
    if why == "old heartbeat":  # the view itself is fresh at that time
        unit_ledger.keep_live_view("run-live", DagsterView(
            status="STARTED", finished=False, read_at=at).model_dump(mode="json"))
    assert live_status(unit_ledger, "run-live", now=at) is None


@pytest.mark.unit
def test_the_ledger_is_found_without_dagster_only_where_the_home_says_where(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert ledger_url_without_instance(home) is None  # not set up: nothing to read yet
    (home / SET_UP_MARK).touch()
    assert ledger_url_without_instance(home) == sqlite_ledger_url(home)
    (home / "dagster.yaml").write_text("storage:\n  postgres:\n    postgres_url: x\n")
    assert ledger_url_without_instance(home) is None  # only Dagster reads its storage
    monkeypatch.setenv("LEDGER_DB", "postgresql+psycopg2://u@h/db")
    (home / SETTINGS_FILE).write_text("ledger_url: ${env:LEDGER_DB}\n")
    assert ledger_url_without_instance(home) == "postgresql+psycopg2://u@h/db"


@pytest.mark.unit
def test_without_dagster_the_same_ledger_is_found_as_through_the_instance(
        instance: dg.DagsterInstance) -> None:
    assert ledger_url_without_instance(Path(instance.root_directory)) == (
        instance_ledger_url(instance))


def status_probe(home: Path, batch_dir: Path, run_id: str) -> tuple[dict[str, Any], list[str]]:
    """`status --json` of the run in a fresh interpreter: the report, and the heavy modules
    it imported."""
    env = {"DAGSTER_HOME": str(home), "BATCH_DEFS_PATH": str(batch_dir),
           "PYTHONPATH": str(PROJECT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", STATUS_PROBE, "status", run_id[:8], "--json"],
                          env=env, cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = [line for line in done.stderr.splitlines() if line.startswith("imported:")]
    return json.loads(done.stdout), imported[-1].split()[1:]


@pytest.mark.cli
@pytest.mark.job
def test_status_of_a_live_run_reads_the_ledger_and_of_an_ended_one_dagster(
        batch_dir: Path, dagster_home: Path, instance: dg.DagsterInstance) -> None:
    write_batch(batch_dir, {
        "name": "watched",
        "source": {"type": "inline", "key": "id", "items": [{"id": i} for i in range(60)]},
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.control_handlers:timed", "ms": 200}}],
        "options": {"concurrency": 2},
    })
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(
        result=run_batch(batch_dir, instance, "watched")))
    runner.start()
    try:
        with open_ledger(instance) as ledger:
            deadline = time.monotonic() + 60
            while not (runs := ledger.runs("watched")) or not (
                    ledger.run(runs[0]["run_id"]) or {}).get("live_view"):
                assert time.monotonic() < deadline, "the engine kept no view of the run"
                time.sleep(0.1)
            run_id = runs[0]["run_id"]
        live, imported = status_probe(dagster_home, batch_dir, run_id)
    finally:
        runner.join(120)
    assert outcome["result"].success
    assert imported == []  # neither Dagster nor the spec's models
    assert (live["run_id"], live["status"], live["state"], live["job"], live["partition"]) == (
        run_id, "STARTED", "running", "watched", "p1")
    assert 0 < live["progress"]["done"] < 60 and live["pending"] > 0
    ended, imported = status_probe(dagster_home, batch_dir, run_id)
    assert "dagster" in imported  # the run has ended: Dagster says how
    assert (ended["status"], ended["state"], ended["succeeded"]) == ("SUCCESS", "succeeded", 60)
    assert set(live) == set(ended)  # one shape, whichever answers


@pytest.mark.job
def test_the_lease_keeps_beating_through_a_step_that_runs_no_items(
        batch_dir: Path, instance: dg.DagsterInstance) -> None:
    # An after step (or a long results step) runs no items: the run still lives, and every
    # other process must go on seeing so (status from the ledger, the lease's liveness).
    write_batch(batch_dir, {
        "name": "quiet_end",
        "source": {"type": "inline", "key": "id", "items": [{"id": 1}]},
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.control_handlers:timed"}}],
        "after": [{"task": "python", "params": {
            "function": "tests.control_handlers:watch_lease_for", "seconds": 7,
            "ledger_url": instance_ledger_url(instance)}}],
    })
    from tests import control_handlers

    assert run_batch(batch_dir, instance, "quiet_end").success
    ages = control_handlers.heartbeat_ages
    assert len(ages) >= 20 and min(ages) >= 0  # held all along
    assert max(ages) < LIVE_VIEW_MAX_AGE_S  # and beating: one beat a second
