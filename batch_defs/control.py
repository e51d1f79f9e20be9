"""Run control: who holds a partition, whether a run is alive, its true state, pause/cancel/resume.

The CLI, the ops and the sensors all decide these things here, so that every door behaves alike.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import dagster as dg
import psutil

from batch_defs.env import RUN_ENV_MARKER
from batch_defs.ledger import LeaseHolder, Ledger, StopRequest
from batch_defs.run_status import DagsterView, StepFailure, resolved_state
from batch_defs.secrets import mask
from batch_defs.states import RunState, StopKind

if TYPE_CHECKING:
    from batch_defs.rollback import RollbackReport
    from batch_defs.spec import BatchSpec

HOST = socket.gethostname()
# A holder on another host that has not beaten for this long is taken to be gone.
LEASE_TTL_S = 60.0
class ControlError(RuntimeError):
    """A request about a run that cannot be carried out; the message says why and what to do."""


def ensure_partition(instance: dg.DagsterInstance, batch: str, key: str) -> None:
    """Add the batch's dynamic partition unless it exists, before any item runs. Two launches
    of one new partition at once both find it missing: the later add fails on the storage's
    unique key, and the partition is there, which is all either launch needs."""
    if instance.has_dynamic_partition(batch, key):
        return
    try:
        instance.add_dynamic_partitions(batch, [key])
    except Exception:
        if not instance.has_dynamic_partition(batch, key):
            raise


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_alive(run: dg.DagsterRun) -> bool | None:
    """Whether the process executing a CLI run still exists: None when we cannot tell
    (another host, or a run launched by the daemon, which Dagster's run monitoring watches)."""
    pid, host = run.tags.get("batch/pid"), run.tags.get("batch/host")
    if not pid or host != HOST:
        return None
    return pid_alive(int(pid))


def holder_is_live(instance: dg.DagsterInstance, holder: LeaseHolder) -> bool:
    """A lease stands while its run has not ended in Dagster and its process lives (same
    host), or has beaten recently (another host, where we cannot see its process)."""
    run = instance.get_run_by_id(holder.run_id)
    if run is None or run.is_finished:
        return False
    if holder.host == HOST:
        return pid_alive(holder.pid)
    return time.time() - holder.heartbeat_at < LEASE_TTL_S


def group_members(pgid: int, started_at: float, run_id: str) -> list[int]:
    """Processes of process group `pgid` started since `started_at`, if the group is the one
    an item of `run_id` began: one of them carries the run's marker. Pids wrap (at 32,768
    here), so a group that is gone may have left its number to an unrelated session started
    since, which the start time alone cannot tell apart."""
    members, ours = [], False
    for process in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["create_time"] >= started_at - 1:
                members.append(process.pid)
                ours = ours or process.environ().get(RUN_ENV_MARKER) == run_id
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members if ours else []


def marked_processes(run_id: str) -> list[psutil.Process]:
    """This host's processes started for run `run_id` (by RUN_ENV_MARKER), this one aside."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get(RUN_ENV_MARKER) == run_id:
                found.append(process)
    return found


def end_leftover_processes(ledger: Ledger, run_id: str) -> int:
    """End the child processes a run's items started and left running (a killed run's shell
    commands and what they started); returns how many processes were ended."""
    ended: set[int] = set()
    for record in ledger.processes(run_id):
        if record.host != HOST:
            continue  # another machine's processes are that machine's to end
        members = group_members(record.pgid, record.started_at, run_id)
        if members:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pgid, signal.SIGKILL)
            ended.update(members)
        ledger.unregister_process(record.id)
    for process in marked_processes(run_id):  # unrecorded or outside their group
        if process.pid not in ended:  # a group's member not yet gone is counted once
            with contextlib.suppress(psutil.Error):
                process.kill()
                ended.add(process.pid)
    return len(ended)


def take_over(instance: dg.DagsterInstance, ledger: Ledger, holder: LeaseHolder) -> int:
    """Clean up after a run that died holding a partition, before its items run again: its
    child processes ended, its Dagster run and ledger row marked failed. Returns how many
    processes were ended."""
    ended = end_leftover_processes(ledger, holder.run_id)
    run = instance.get_run_by_id(holder.run_id)
    if run is None:
        return ended
    if not run.is_finished and holder.host == HOST and not pid_alive(holder.pid):
        instance.report_run_failed(run, f"process {holder.pid} is gone; its partition was "
                                        "taken over by another run")
        run = instance.get_run_by_id(holder.run_id) or run
    if run.is_finished:
        reconcile(instance, ledger, run)
    return ended


def describe_holder(holder: LeaseHolder, batch: str, partition: str) -> str:
    since = datetime.fromtimestamp(holder.acquired_at).strftime("%Y-%m-%d %H:%M:%S")
    return (f"partition {partition!r} of batch {batch!r} is held by run {holder.run_id} "
            f"(pid {holder.pid} on {holder.host}, since {since}); wait for it to end "
            f"(--wait) or stop it: batch-defs cancel {holder.run_id[:8]}")


def live_holder(instance: dg.DagsterInstance, ledger: Ledger, batch: str,
                partition: str) -> LeaseHolder | None:
    holder = ledger.lease_holder(batch, partition)
    return holder if holder and holder_is_live(instance, holder) else None


def wait_for_partition(instance: dg.DagsterInstance, ledger: Ledger, batch: str, partition: str,
                       wait: bool, on_wait: Callable[[LeaseHolder], None] | None = None,
                       poll_s: float = 1.0) -> None:
    """Return once no live run holds the partition; without `wait`, raise ControlError naming
    the run that holds it."""
    announced = False
    while (holder := live_holder(instance, ledger, batch, partition)) is not None:
        if not wait:
            raise ControlError(describe_holder(holder, batch, partition))
        if on_wait and not announced:
            on_wait(holder)
            announced = True
        time.sleep(poll_s)


def daemon_running(instance: dg.DagsterInstance) -> bool:
    """Whether a dagster-daemon is heartbeating for this instance (it launches queued runs)."""
    try:
        statuses = instance.get_daemon_statuses(["QUEUED_RUN_COORDINATOR"])
    except Exception:  # an instance without daemon storage: no daemon either
        return False
    return any(status.healthy for status in statuses.values())


def effective_state(run: dg.DagsterRun | None, recorded: str | None) -> RunState:
    """run_status.resolved_state() of a Dagster run (None: Dagster has no such run)."""
    return resolved_state(run.status.value if run else None, bool(run and run.is_finished),
                          recorded)


def reconcile(instance: dg.DagsterInstance, ledger: Ledger, run: dg.DagsterRun) -> RunState:
    """Make the ledger row and the `batch/state` tag of an ended run agree with Dagster."""
    recorded = ledger.run(run.run_id)
    state = effective_state(run, recorded["status"] if recorded else run.tags.get("batch/state"))
    if recorded and recorded["status"] != state:
        ledger.set_status(run.run_id, state)
    if run.tags.get("batch/state") not in (None, state.value) or recorded:
        instance.add_run_tags(run.run_id, {"batch/state": state.value})
    return state


def resolve_run(instance: dg.DagsterInstance, prefix: str) -> dg.DagsterRun:
    """A run by its id or a unique prefix of it (the UI and `list` show 8 characters)."""
    run = instance.get_run_by_id(prefix)
    if run is not None:
        return run
    matches = [r for r in instance.get_runs(filters=dg.RunsFilter(), limit=500)
               if r.run_id.startswith(prefix)]
    if len(matches) != 1:
        raise ControlError(f"no run {prefix!r}" if not matches
                           else f"run id {prefix!r} is ambiguous")
    return matches[0]


def active_run(instance: dg.DagsterInstance, prefix: str) -> dg.DagsterRun:
    run = resolve_run(instance, prefix)
    if run.is_finished:
        raise ControlError(f"run {run.run_id} has already ended ({run.status.value})")
    return run


def pause(instance: dg.DagsterInstance, ledger: Ledger, prefix: str) -> dg.DagsterRun:
    """Stop starting items; in-flight items finish and are recorded; resume continues."""
    run = active_run(instance, prefix)
    ledger.request_stop(run.run_id, StopRequest(StopKind.PAUSED,
                                                "paused: requested with batch-defs pause"))
    return run


def cancel(instance: dg.DagsterInstance, ledger: Ledger, prefix: str, grace_s: float,
           poll_s: float = 0.5) -> dg.DagsterRun:
    """Stop starting items, give in-flight ones `grace_s`, then end the run by force."""
    run = active_run(instance, prefix)
    if run.status == dg.DagsterRunStatus.QUEUED:
        instance.run_coordinator.cancel_run(run.run_id)
        return instance.get_run_by_id(run.run_id) or run
    ledger.request_stop(run.run_id, StopRequest(StopKind.CANCELED,
                                                "canceled: requested with batch-defs cancel"))
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not _finished(instance, run.run_id):
        time.sleep(poll_s)
    if not _finished(instance, run.run_id):
        if worker_alive(run):
            os.kill(int(run.tags["batch/pid"]), 9)
        else:
            instance.run_launcher.terminate(run.run_id)
    run = instance.get_run_by_id(run.run_id) or run
    if run.status != dg.DagsterRunStatus.CANCELED:
        instance.report_run_canceled(run, "canceled with batch-defs cancel")
    ledger.set_status(run.run_id, RunState.CANCELED)
    instance.add_run_tags(run.run_id, {"batch/state": RunState.CANCELED.value})
    run = instance.get_run_by_id(run.run_id) or run
    finish_rollback_on_cancel(instance, ledger, run)
    return run


def finish_rollback_on_cancel(instance: dg.DagsterInstance, ledger: Ledger,
                              run: dg.DagsterRun) -> RollbackReport | None:
    """With `options.rollback_on: cancel`, undo what the canceled run did: its own steps
    start that when they see the cancel; this completes it if the grace period ended it."""
    from batch_defs.loader import SpecError, find_batch

    try:
        declared = find_batch(run.job_name).spec.options.rollback_on
    except SpecError:
        return None
    if "cancel" not in declared or ledger.run(run.run_id) is None:
        return None
    return rollback(instance, ledger, run.run_id)


def _finished(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is None or run.is_finished


@dataclass(frozen=True)
class ResumePlan:
    """What `resume` re-executes: the ended run, its job and partition."""

    run: dg.DagsterRun
    job_name: str
    partition: str


def prepare_resume(instance: dg.DagsterInstance, ledger: Ledger, prefix: str) -> ResumePlan:
    """Check that a run can be resumed, ending it first if its process is gone (a stale run),
    and make its ledger row stop saying `running` or `succeeded`."""
    run = resolve_run(instance, prefix)
    if not run.is_finished:
        alive = worker_alive(run)
        if alive is not False:
            raise ControlError(f"run {run.run_id} is {run.status.value}"
                               + (" and its process is alive" if alive else "")
                               + "; pause or cancel it first")
        instance.report_run_failed(run, f"process {run.tags['batch/pid']} is gone; "
                                        "marked failed by batch-defs resume")
        run = instance.get_run_by_id(run.run_id) or run
    partition = run.tags.get("dagster/partition")
    if not partition:
        raise ControlError(f"run {run.run_id} has no partition")
    reconcile(instance, ledger, run)
    end_leftover_processes(ledger, run.run_id)  # before its items run again
    return ResumePlan(run, run.job_name, partition)


def failure_message(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """Why a run failed, in the words of the step that failed it (a dg.Failure's
    description), or the error's message."""
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        event = record.dagster_event
        data = event.step_failure_data if event else None
        if data is None:
            continue
        if data.user_failure_data and data.user_failure_data.description:
            return data.user_failure_data.description
        if data.error:
            return data.error.message.strip().splitlines()[0]
    return None


def dagster_view(instance: dg.DagsterInstance, run_id: str) -> DagsterView | None:
    """What Dagster says of the run now (None: no such run)."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return None
    return DagsterView(status=run.status.value, finished=run.is_finished, job=run.job_name,
                       partition=run.tags.get("dagster/partition"),
                       state_tag=run.tags.get("batch/state"),
                       step_failures=step_failures(instance, run_id))


def step_failures(instance: dg.DagsterInstance, run_id: str) -> list[StepFailure]:
    """Why steps failed (source unreadable, fail-fast, too many failures), from the event log."""
    failures = []
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        event = record.dagster_event
        data = event.step_failure_data if event else None
        if data and data.user_failure_data and data.user_failure_data.description:
            message = data.user_failure_data.description  # a dg.Failure's own words
        elif data and data.error:
            message = f"{data.error.cls_name}: {data.error.message.strip()}"
        else:
            message = "failed"
        failures.append(StepFailure(step=record.step_key or "",
                                    error=mask(message.splitlines()[0] if message else "failed")))
    return failures


# Live changes and compensation (batch-defs set / rollback)

def change_settings(instance: dg.DagsterInstance, ledger: Ledger, prefix: str,
                    assignments: Sequence[str]) -> tuple[dg.DagsterRun, dict[str, Any]]:
    """Change a running batch (options.concurrency, options.tolerated_failures,
    phases.NAME.rate): stored for its engine, which applies them within about a second.
    Returns the run and the changes now in force."""
    from batch_defs.loader import SpecError, find_batch
    from batch_defs.settings import SettingsError, parse_changes

    run = active_run(instance, prefix)
    try:
        spec = find_batch(run.job_name).spec
    except SpecError:
        spec = None  # the batch file changed or went away: check the keys only
    try:
        values = parse_changes(assignments, spec)
    except SettingsError as exc:
        raise ControlError(str(exc)) from exc
    try:
        now = ledger.change_settings(run.run_id, values, by="batch-defs set")
    except KeyError:
        raise ControlError(f"run {run.run_id} has not started its items yet (it is "
                           f"{run.status.value}); try again once it runs") from None
    changes = ", ".join(f"{key}={value}" for key, value in values.items())
    instance.report_engine_event(f"batch-defs set {changes}", run)
    return run, now


def rollback(instance: dg.DagsterInstance, ledger: Ledger, prefix: str,
             concurrency: int | None = None, log: Any = None) -> RollbackReport:
    """Run the `undo` of every item whose phase succeeded in an ended run, last phase first,
    each effect once (batch_defs/rollback.py), in this process."""
    from batch_defs.rollback import RollbackBusyError, RollbackPlan, rollback_run

    run = resolve_run(instance, prefix)
    if not run.is_finished:
        raise ControlError(f"run {run.run_id} is {run.status.value}; cancel it first "
                           f"(batch-defs cancel {run.run_id[:8]}), then roll it back")
    spec, partition = rollback_spec(instance, ledger, run)
    holder = live_holder(instance, ledger, spec.name, partition)
    if holder is not None:
        raise ControlError(f"run {holder.run_id} is working on partition {partition!r} now; "
                           "roll back once it has ended")
    with run_resources(instance, run, spec) as resources:
        plan = RollbackPlan(spec=spec, ledger=ledger, run_id=run.run_id, partition=partition,
                            base_dir=resources["base_dir"], output_dir=resources["output_dir"],
                            resources=resources["resources"], concurrency=concurrency,
                            wait=False, **({"log": log} if log is not None else {}))
        try:
            report = rollback_run(plan)
        except RollbackBusyError as exc:
            raise ControlError(str(exc)) from exc
    instance.report_engine_event(f"batch-defs rollback: {report.line()}", run)
    return report


def rollback_spec(instance: dg.DagsterInstance, ledger: Ledger,
                  run: dg.DagsterRun) -> tuple[BatchSpec, str]:
    """The run's effective spec (its --data and --set) and partition, checked for undo."""
    from batch_defs.loader import find_batch, with_overrides

    partition = run.tags.get("dagster/partition")
    if not partition or ledger.run(run.run_id) is None:
        raise ControlError(f"run {run.run_id} ran no items: nothing to roll back")
    overrides = run_overrides(run)
    spec = with_overrides(find_batch(run.job_name).spec, overrides.get("data"),
                          overrides.get("overrides", []))
    if not any(phase.undo for phase in spec.phases):
        raise ControlError(f"batch {spec.name!r} declares no `undo:` on any phase: nothing "
                           "can be rolled back")
    return spec, partition


def run_resource_config(run: dg.DagsterRun) -> dict[str, Any]:
    """The `resources:` section of the run's config."""
    config: dict[str, Any] = dict(run.run_config or {})
    return dict(config.get("resources") or {})


def run_overrides(run: dg.DagsterRun) -> dict[str, Any]:
    return dict(run_resource_config(run).get("run_overrides", {}).get("config", {}))


@contextmanager
def run_resources(instance: dg.DagsterInstance, run: dg.DagsterRun,
                  spec: BatchSpec) -> Iterator[dict[str, Any]]:
    """The undo tasks' Dagster resources as the run had them (its run config), the batch's
    folder and its output folder, outside any run."""
    from batch_defs.definitions import shared_resources
    from batch_defs.loader import find_batch
    from batch_defs.rollback import undo_resource_keys
    from resources.storage import BatchStorageResource

    shared = shared_resources()
    keys = undo_resource_keys(spec)
    configured = run_resource_config(run)
    storage = BatchStorageResource(**configured.get("batch_storage", {}).get("config", {}))
    with dg.build_resources({key: shared[key] for key in keys}, instance=instance,
                            resource_config={k: v for k, v in configured.items()
                                             if k in keys}) as built:
        yield {"resources": {key: getattr(built, key) for key in keys},
               "base_dir": find_batch(run.job_name).base_dir,
               "output_dir": storage.output_root(instance, spec.name)}
