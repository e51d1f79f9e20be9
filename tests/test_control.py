"""Run control in process: states as users read them, live and stale runs, leases, pause and
resume, and one configuration of the ledger that ops, CLI, sensors and reports all use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer

from batch_defs import control
from batch_defs.control import ControlError, effective_state
from batch_defs.definitions import build_definitions
from batch_defs.env import RUN_ENV_MARKER
from batch_defs.home import SETTINGS_FILE
from batch_defs.ledger import LeaseHolder, Ledger
from batch_defs.states import RunState
from resources.storage import instance_ledger_url, open_ledger
from tests.conftest import cli, inline_items, run_batch, write_batch
from tests.test_sensors import end_of_run

S = dg.DagsterRunStatus


def run_with(status: dg.DagsterRunStatus, **tags: str) -> dg.DagsterRun:
    return dg.DagsterRun(job_name="j", run_id="r", status=status, tags=tags)


@pytest.mark.unit
def test_leftover_processes_are_found_by_their_run_even_unrecorded(unit_ledger: object) -> None:
    # A run killed between spawning a command and recording it in the ledger: the command's
    # process (marked with the run's id) is still ended, and another run's is left alone.
    def spawn(run_id: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sleep", "300"], start_new_session=True,
                                env={**os.environ, RUN_ENV_MARKER: run_id})

    mine, theirs = spawn("run-killed"), spawn("run-other")
    try:
        assert control.end_leftover_processes(unit_ledger, "run-killed") == 1  # type: ignore
        assert mine.wait(10) == -9
        assert theirs.poll() is None
    finally:
        for process in (mine, theirs):
            process.kill()
            process.wait()


@pytest.mark.unit
def test_a_recorded_process_group_whose_number_was_reused_is_left_alone(
        unit_ledger: Ledger) -> None:
    """Recipe: this machine's pids wrap at 32,768, so a killed run's recorded process group
    may be gone and its number taken by an unrelated new session started since; resuming the
    run must not end that session (seen: a `sleep` of another test ended under -n 3)."""
    stranger = subprocess.Popen(["sleep", "300"], start_new_session=True,
                                env={**os.environ, RUN_ENV_MARKER: "run-other"})
    try:
        unit_ledger.register_process("run-killed", "build", "item-1", control.HOST,
                                     stranger.pid, time.time() - 60)
        assert control.end_leftover_processes(unit_ledger, "run-killed") == 0
        assert stranger.poll() is None
        assert unit_ledger.processes("run-killed") == []  # the record is done with
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.unit
@pytest.mark.parametrize(("status", "recorded", "shown"), [
    (S.STARTED, "running", RunState.RUNNING),
    (S.STARTED, "succeeded", RunState.RUNNING),  # not over yet, whatever the row says
    (S.STARTED, "paused", RunState.PAUSED),  # stopping: pause was asked for
    (S.SUCCESS, "succeeded", RunState.SUCCEEDED),
    (S.SUCCESS, "running", RunState.SUCCEEDED),
    (S.FAILURE, "succeeded", RunState.FAILED),  # Dagster says failed: never "succeeded"
    (S.FAILURE, "running", RunState.FAILED),  # killed: no longer "running"
    (S.FAILURE, "paused", RunState.PAUSED),
    (S.CANCELED, "running", RunState.CANCELED),
    (S.FAILURE, None, RunState.FAILED),
])
def test_a_run_reads_as_dagster_and_the_ledger_agree(status: dg.DagsterRunStatus,
                                                     recorded: str | None,
                                                     shown: RunState) -> None:
    assert effective_state(run_with(status), recorded) is shown


@pytest.mark.unit
def test_live_and_gone_worker_processes() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here = {"batch/host": control.HOST}
    assert control.worker_alive(run_with(S.STARTED, **here, **{"batch/pid": str(os.getpid())}))
    assert control.worker_alive(run_with(S.STARTED, **here,
                                         **{"batch/pid": str(gone.pid)})) is False
    elsewhere = {"batch/host": "another-host", "batch/pid": "1"}
    assert control.worker_alive(run_with(S.STARTED, **elsewhere)) is None  # cannot tell


@pytest.mark.job
def test_a_live_holder_is_named_and_a_gone_one_is_not(instance: dg.DagsterInstance,
                                                      batch_dir: Path) -> None:
    write_batch(batch_dir, {"name": "leased", "source": inline_items(2),
                            "phases": [{"name": "w", "task": "python",
                                        "params": {"function": "tests.handlers:sleep_ms"}}]})
    job = build_definitions([batch_dir]).resolve_job_def("leased")
    live = instance.create_run_for_job(job_def=job, tags={"dagster/partition": "p"})
    with open_ledger(instance) as ledger:
        now = time.time()
        assert control.live_holder(instance, ledger, "leased", "p") is None
        ledger.acquire_lease("leased", "p", live.run_id, control.HOST, os.getpid(),
                             lambda held: True)
        with pytest.raises(ControlError, match=f"is held by run {live.run_id} "
                                               f"\\(pid {os.getpid()} on {control.HOST}"):
            control.wait_for_partition(instance, ledger, "leased", "p", wait=False)
        # The same lease, but its process is gone: no longer a holder.
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        dead = LeaseHolder(live.run_id, control.HOST, gone.pid, now, now)
        assert not control.holder_is_live(instance, dead)


@pytest.mark.job
def test_resume_refuses_a_live_run_and_pause_stops_an_in_process_run(
        instance: dg.DagsterInstance, batch_dir: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"  # calls after the 20th wait for it: the pause lands mid-way
    # 1,000 x 50 ms at concurrency 4: 12 s after the gate opens, for the pause to be seen.
    write_batch(batch_dir, {"name": "pausable", "source": inline_items(1000),
                            "phases": [{"name": "w", "task": "python",
                                        "params": {"function": "tests.handlers:sleep_ms",
                                                   "ms": 50, "gate": str(gate),
                                                   "open_for": 20}}],
                            "options": {"concurrency": 4}})
    job = build_definitions([batch_dir]).resolve_job_def("pausable")
    alive = instance.create_run_for_job(
        job_def=job, tags={"dagster/partition": "p", "batch/pid": str(os.getpid()),
                           "batch/host": control.HOST})
    with (open_ledger(instance) as ledger,
          pytest.raises(ControlError, match="its process is alive; pause or cancel it")):
        control.prepare_resume(instance, ledger, alive.run_id)

    results: list[dg.ExecuteInProcessResult] = []
    worker = threading.Thread(target=lambda: results.append(
        run_batch(batch_dir, instance, "pausable", partition="q")))
    worker.start()
    with open_ledger(instance) as ledger:
        deadline = time.monotonic() + 60
        while not ledger.runs("pausable") or not ledger.counts(ledger.runs("pausable")[-1]
                                                               ["run_id"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        run_id = ledger.runs("pausable")[-1]["run_id"]
        control.pause(instance, ledger, run_id)
        gate.touch()
        worker.join(240)  # the in-flight items end, then collect: a minute on a loaded machine
        (result,) = results
        assert not result.success
        assert ledger.run(run_id)["status"] == RunState.PAUSED
        assert instance.get_run_by_id(run_id).tags["batch/state"] == "paused"
        done = sum(n for (_, status), n in ledger.counts(run_id).items()
                   if status == "succeeded")
        assert 0 < done < 1000  # stopped part-way, with every started item recorded
        plan = control.prepare_resume(instance, ledger, run_id)
        assert (plan.job_name, plan.partition) == ("pausable", "q")


@pytest.mark.cli
def test_one_ledger_configuration_is_used_by_ops_cli_sensors_and_reports(
        cli_env: dict[str, str], batch_dir: Path, tmp_path: Path,
        httpserver: HTTPServer) -> None:
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    home, elsewhere = tmp_path / "configured_home", tmp_path / "elsewhere.db"
    cli_env = {**cli_env, "DAGSTER_HOME": str(home)}
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    (home / SETTINGS_FILE).write_text(f"ledger_url: sqlite:///{elsewhere}\n")
    write_batch(batch_dir, {
        "name": "configured", "source": inline_items(30),
        "phases": [{"name": "w", "task": "python",
                    "params": {"function": "tests.handlers:fail_listed", "fail_keys": [7]}}],
        "options": {"on_error": "continue", "tolerated_failures": 1},
        "notify": {"on": ["success"], "webhook": [httpserver.url_for("/hook")]}})
    ran = cli(cli_env, "run", "configured", "--partition", "p", "--json")
    assert ran.returncode == 0, ran.stderr
    run_id = json.loads(ran.stdout)["run_id"]
    assert elsewhere.exists() and not (home / "batch_ledger.db").exists()
    engine = sa.create_engine(f"sqlite:///{elsewhere}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from batch_item")).scalar() == 30
    engine.dispose()

    status = json.loads(cli(cli_env, "status", run_id, "--json").stdout)
    assert status["failed"] == 1 and status["items"] == 30
    failed = json.loads(cli(cli_env, "results", run_id, "--status", "failed", "--json").stdout)
    assert [row["item_key"] for row in failed] == ["7"]
    report = json.loads(cli(cli_env, "report", run_id, "--format", "json").stdout)
    assert [row["item_key"] for row in report["failures"]] == ["7"] and report["failed"] == 1

    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert instance_ledger_url(inst) == f"sqlite:///{elsewhere}"
        end_of_run(build_definitions([batch_dir]), inst, run_id)
    hook = json.loads(httpserver.log[0][0].get_data())
    assert hook["counts"]["failed"] == 1 and hook["counts"]["succeeded"] == 29


@pytest.mark.unit
def test_a_partition_added_meanwhile_by_another_launch_is_no_error(
        instance: dg.DagsterInstance) -> None:
    """Two launches of one new partition at once both find it missing; the later insert hits
    the storage's unique key (seen: two `batch-defs run` of a new partition started together
    failed with `IntegrityError: UNIQUE constraint failed: dynamic_partitions...`)."""

    class RacedInstance:
        """The instance as the later launch saw it: missing at its look, then added by the
        other launch just before its own insert."""

        def has_dynamic_partition(self, batch: str, key: str) -> bool:
            return instance.has_dynamic_partition(batch, key)

        def add_dynamic_partitions(self, batch: str, keys: list[str]) -> None:
            instance.add_dynamic_partitions(batch, keys)  # the other launch's insert
            raise sa.exc.IntegrityError("INSERT INTO dynamic_partitions", {},
                                        Exception("UNIQUE constraint failed"))

    control.ensure_partition(RacedInstance(), "twice", "p")  # type: ignore[arg-type]
    assert instance.get_dynamic_partitions("twice") == ["p"]

    class Broken(RacedInstance):
        def add_dynamic_partitions(self, batch: str, keys: list[str]) -> None:
            raise RuntimeError("storage down")

    with pytest.raises(RuntimeError, match="storage down"):  # any other failure surfaces
        control.ensure_partition(Broken(), "other", "q")  # type: ignore[arg-type]
