"""Live progress bars and run reports for the CLI, read from the ledger and the instance."""

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

from batch_defs.control import effective_state
from batch_defs.ledger import Ledger
from batch_defs.progress import FINAL_FAILURES, ProgressWindow, format_duration
from batch_defs.secrets import mask
from batch_defs.states import RunState
from batch_defs.summary import summarize_run

REFRESH_S = 0.5


class RunBars:
    """One bar per phase plus a line with throughput (moving window) and ETA."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("[bold]{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
            console=console, transient=False, refresh_per_second=4,
        )
        self.tasks: dict[str, TaskID] = {}
        self.window = ProgressWindow()

    def update(self, run: dict[str, Any], counts: dict[tuple[str, str], int]) -> None:
        phases, total = run["phases"], run["total_items"]
        stopped_before = 0
        for phase in phases:
            if phase not in self.tasks:
                self.tasks[phase] = self.progress.add_task(phase, total=total, detail="")
            ok = counts.get((phase, "succeeded"), 0)
            stopped = sum(counts.get((phase, s), 0) for s in FINAL_FAILURES)
            failed = counts.get((phase, "failed"), 0)
            self.progress.update(self.tasks[phase], completed=ok + stopped + stopped_before,
                                 detail=f"[red]{failed} failed[/red]" if failed else "")
            stopped_before += stopped
        overall = self.window.progress(counts, phases, total)
        eta = format_duration(overall.eta_s) if overall.eta_s is not None else "?"
        per_item = max(1, len(phases))
        line = f"{overall.rate / per_item:.1f} items/s  ETA {eta}"
        if "all" not in self.tasks:
            self.tasks["all"] = self.progress.add_task("all", total=overall.units_total,
                                                       detail="")
        self.progress.update(self.tasks["all"], completed=overall.units_done, detail=line)


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
                bars.update(run, ledger.counts(run["run_id"]))
            if finished:
                return


def follow_run(instance: Any, ledger: Ledger, run_id: str, console: Console) -> None:
    """Bars for any run (another process, the daemon) until Dagster says it has ended."""
    bars = RunBars(console)
    with bars.progress:
        while True:
            dagster_run = instance.get_run_by_id(run_id)
            run = ledger.run(run_id)
            if run is not None:
                bars.update(run, ledger.counts(run_id))
            if dagster_run is None or dagster_run.is_finished:
                return
            time.sleep(REFRESH_S)


def run_report(instance: Any, ledger: Ledger, run_id: str) -> dict[str, Any]:
    dagster_run = instance.get_run_by_id(run_id)
    run = ledger.run(run_id)
    report: dict[str, Any] = summarize_run(ledger, run_id) if run else {"run_id": run_id}
    saved = (run or {}).get("summary") or {}
    report["files"] = {f"{step}.{key}": value for step, produced in saved.get("after", {}).items()
                       for key, value in produced.items()}
    report["status"] = dagster_run.status.value if dagster_run else "UNKNOWN"
    report["job"] = dagster_run.job_name if dagster_run else None
    recorded = run["status"] if run else (dagster_run.tags.get("batch/state")
                                           if dagster_run else None)
    report["state"] = effective_state(dagster_run, recorded).value
    if dagster_run and "partition" not in report:
        report["partition"] = dagster_run.tags.get("dagster/partition")
    report["step_failures"] = step_failures(instance, run_id)
    return report


def step_failures(instance: Any, run_id: str) -> list[dict[str, str]]:
    """Why steps failed (source unreadable, fail-fast, too many failures), from the event log."""
    import dagster as dg

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
        failures.append({"step": record.step_key or "",
                         "error": mask(message.splitlines()[0] if message else "failed")})
    return failures


def _step_failure_table(failures: list[dict[str, str]]) -> list[Table]:
    if not failures:
        return []
    table = Table("step", "error", title="failed steps")
    table.columns[1].overflow = "fold"
    for failure in failures[:10]:
        table.add_row(Text(failure["step"]), Text(failure["error"]))
    return [table]


def render_report(report: dict[str, Any]) -> Group:
    head = Table.grid(padding=(0, 2))
    head.add_column(no_wrap=True)
    head.add_column(overflow="fold")
    head.add_row("run", report["run_id"])
    head.add_row("batch / partition", Text(f"{report.get('batch') or report.get('job')} / "
                                           f"{report.get('partition', '-')}"))
    color = "green" if report["status"] == "SUCCESS" else "red"
    state = f" ({report['state']})" if report.get("state") in (RunState.PAUSED,
                                                               RunState.CANCELED) else ""
    head.add_row("status", f"[{color}]{report['status']}{state}[/{color}]")
    errors = _step_failure_table(report.get("step_failures", []))
    if "items" not in report:
        return Group(head, *errors)
    head.add_row("items", f"{report['items']} ({report['succeeded']} succeeded, "
                          f"{report['failed_items']} failed or invalid, "
                          f"{report['skipped']} skipped, {report['reused']} reused rows)")
    head.add_row("duration", f"{report['duration_s']:.1f}s, {report['items_per_s']} items/s")
    if report["cost"] or report["tokens"]:
        head.add_row("cost", f"{report['cost']} ({report['tokens']} tokens)")
    for name, path in report.get("files", {}).items():
        head.add_row(Text(name), Text(str(path)))
    if report.get("stop_reason"):
        head.add_row("stopped", Text(report["stop_reason"]))
    phases = Table("phase", "succeeded", "failed", "skipped", "invalid", title=None)
    for phase, counts in report["per_phase"].items():
        phases.add_row(phase, *(str(counts.get(s, 0)) for s in
                                ("succeeded", "failed", "skipped", "invalid")))
    parts: list[Any] = [head, phases, *errors]
    if report["failures"]:
        failures = Table("item", "phase", "status", "error", title="first failures")
        failures.columns[3].overflow = "fold"
        for f in report["failures"]:
            failures.add_row(Text(str(f["item_key"])), Text(f["phase"]), f["status"],
                             Text(str(f["error"])))
        parts.append(failures)
        parts.append(f"all rows: batch-defs results {report['run_id']} --status failed")
    return Group(*parts)
