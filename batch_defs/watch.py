"""Live progress bars and run status for the CLI, read from the ledger and the instance."""

from __future__ import annotations

import threading
import time
from typing import Any

from rich.console import Console, Group
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from batch_defs.ledger import Ledger
from batch_defs.progress import PhaseTally, ProgressWindow, read_counts
from batch_defs.run_status import RunStatus, build_status
from batch_defs.states import RunState
from batch_defs.summary import RunSummary

REFRESH_S = 0.5
PHASE_COLUMNS = ("succeeded", "failed", "invalid", "rejected", "skipped", "pending")


class RunBars:
    """One bar per phase plus an `all` bar with the progress line (moving window, ETA)."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
            console=console, transient=False, refresh_per_second=4,
        )
        self.tasks: dict[str, TaskID] = {}
        self.window = ProgressWindow()

    def update(self, ledger: Ledger, run: dict[str, Any]) -> None:
        phases, total = run["phases"], run["total_items"]
        counts = read_counts(ledger, run["run_id"], phases)
        stopped_before = 0
        for phase in phases:
            tally = counts.phases.get(phase, PhaseTally())
            if phase not in self.tasks:
                self.tasks[phase] = self.progress.add_task(phase, total=total, detail="")
            failed = tally.statuses.get("failed", 0)
            self.progress.update(self.tasks[phase], completed=tally.rows + stopped_before,
                                 detail=f"[red]{failed} failed[/red]" if failed else "")
            stopped_before += tally.stops
        overall = self.window.progress(counts, phases, total, run.get("started_at"))
        if "all" not in self.tasks:
            self.tasks["all"] = self.progress.add_task("all", total=overall.total_items,
                                                       detail="")
        self.progress.update(self.tasks["all"], total=overall.total_items,
                             completed=overall.done, detail=overall.line())


def _find_run(ledger: Ledger, batch: str, partition: str, since: float) -> dict | None:
    runs = [r for r in ledger.runs(batch)
            if r["partition"] == partition and r["started_at"] >= since - 1]
    return ledger.run(runs[-1]["run_id"]) if runs else None


def watch_run(ledger: Ledger, batch: str, partition: str, launched: float,
              done: threading.Event, console: Console) -> None:
    """Bars for the run this process is executing, until `done` is set."""
    bars = RunBars(console)
    run = None
    with bars.progress:
        while True:
            finished = done.wait(REFRESH_S)
            run = run or _find_run(ledger, batch, partition, launched)
            if run is not None:
                bars.update(ledger, run)
            if finished:
                return


def follow_run(instance: Any, ledger: Ledger, run_id: str, console: Console) -> None:
    """Bars for any run (another process, the daemon) until Dagster says it has ended; a run
    still in the queue says so (and why it may stay there) instead of a blank screen."""
    from batch_defs.control import daemon_running

    waiting = None
    while ledger.run(run_id) is None:
        dagster_run = instance.get_run_by_id(run_id)
        if dagster_run is None or dagster_run.is_finished:
            return
        status = dagster_run.status.value.lower()
        if status != waiting:
            waiting = status
            hint = ("" if status != "queued" or daemon_running(instance) else
                    ": no dagster-daemon is running for this instance, so it stays queued "
                    "until one starts (`make ui` or `dagster-daemon run`)")
            console.print(Text(f"run {run_id[:8]} is {status}{hint}"))
        time.sleep(REFRESH_S)
    bars = RunBars(console)
    with bars.progress:
        while True:
            dagster_run = instance.get_run_by_id(run_id)
            run = ledger.run(run_id)
            if run is not None:
                bars.update(ledger, run)
            if dagster_run is None or dagster_run.is_finished:
                return
            time.sleep(REFRESH_S)


def run_status(instance: Any, ledger: Ledger, run_id: str) -> RunStatus:
    from batch_defs.control import dagster_view  # Dagster: not for a live run's status

    return build_status(ledger, run_id, dagster_view(instance, run_id))


def run_report(instance: Any, ledger: Ledger, run_id: str) -> dict[str, Any]:
    """The run's status as plain data (reports build on it)."""
    return run_status(instance, ledger, run_id).as_dict()


def _step_failure_table(failures: list[dict[str, str]]) -> list[Table]:
    if not failures:
        return []
    table = Table("step", "error", title="failed steps")
    table.columns[1].overflow = "fold"
    for failure in failures[:10]:
        table.add_row(Text(failure["step"]), Text(failure["error"]))
    return [table]


def render_report(report: dict[str, Any]) -> Group:
    """`status`'s output from RunStatus.as_dict(): summary, phases, first failures, hint."""
    head = Table.grid(padding=(0, 2))
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")
    head.add_row("run", report["run_id"])
    head.add_row("batch / partition", Text(f"{report.get('batch') or report.get('job')} / "
                                           f"{report.get('partition') or '-'}"))
    color = "green" if report["status"] == "SUCCESS" else "red"
    state = f" ({report['state']})" if report.get("state") in (RunState.PAUSED,
                                                               RunState.CANCELED) else ""
    head.add_row("status", f"[{color}]{report['status']}{state}[/{color}]")
    errors = _step_failure_table(report.get("step_failures", []))
    if "items" not in report:
        return Group(head, *errors)
    summary = RunSummary.model_validate(report)
    head.add_row("items", Text(summary.counts_line()))
    progress = report.get("progress") or {}
    if summary.pending and progress:
        head.add_row("progress", Text(progress["line"]))
    head.add_row("duration", f"{summary.duration_s:.1f}s, {summary.items_per_s:.1f} items/s")
    if summary.cost or summary.tokens:
        head.add_row("cost", Text(summary.cost_line()))
    for name, path in report.get("files", {}).items():
        head.add_row(Text(name), Text(str(path)))
    if summary.stop_reason:
        head.add_row("stopped", Text(summary.stop_reason))
    phases = Table("phase", *PHASE_COLUMNS, title=None)
    for phase, counts in summary.per_phase.items():
        phases.add_row(Text(phase), *(str(getattr(counts, s)) for s in PHASE_COLUMNS))
    parts: list[Any] = [head, phases, *errors]
    if summary.failures:
        failures = Table("item", "phase", "status", "attempts", "error",
                         title="first failed, invalid and rejected items")
        failures.columns[4].overflow = "fold"
        for f in summary.failures:
            failures.add_row(Text(f.item_key), Text(f.phase), f.status.value, str(f.attempts),
                             Text(str(f.error or "")))
        parts.append(failures)
        parts.append(Text(f"all of them: {summary.results_hint()}"))
    return Group(*parts)
