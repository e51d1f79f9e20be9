"""A run's status as the CLI and the API show it, built from the ledger and Dagster's view
of the run. This module imports nothing of Dagster: a live run's engine keeps Dagster's view
in the ledger (batch_run.live_view), so `batch-defs status` of a live run reads one database.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from batch_defs.ledger import Ledger
from batch_defs.progress import ProgressWindow, read_progress
from batch_defs.states import RunState
from batch_defs.summary import RunSummary, summarize_run

# A live view or lease heartbeat older than this is not trusted: the run may have ended (or
# died) since, and only Dagster can say how. The engine writes both about every second.
LIVE_VIEW_MAX_AGE_S = 5.0
# Dagster's run statuses (DagsterRunStatus values) that end a run, and the state they mean
# where the ledger has no word of its own.
ENDED_STATES = {"SUCCESS": RunState.SUCCEEDED, "FAILURE": RunState.FAILED,
                "CANCELED": RunState.CANCELED}


class StepFailure(BaseModel):
    step: str
    error: str


class DagsterView(BaseModel):
    """What Dagster says of a run, as its status needs it."""

    status: str  # Dagster's run status: QUEUED, STARTED, SUCCESS, FAILURE, CANCELED, ...
    finished: bool
    job: str | None = None
    partition: str | None = None  # the run's dagster/partition tag
    state_tag: str | None = None  # the run's batch/state tag
    step_failures: list[StepFailure] = Field(default_factory=list)
    read_at: float = Field(default_factory=time.time)


class RunStatus(BaseModel):
    """A run as the CLI and the API show it: Dagster's status, the batch's state, the summary
    (one vocabulary of counts), live progress while it runs, files and failed steps."""

    run_id: str
    status: str  # Dagster's run status: QUEUED, STARTED, SUCCESS, FAILURE, CANCELED, ...
    state: RunState
    job: str | None = None
    partition: str | None = None
    summary: RunSummary | None = None
    progress: dict[str, Any] | None = None  # done, total, percent, eta_s, phase, line
    files: dict[str, str] = Field(default_factory=dict)
    step_failures: list[StepFailure] = Field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Flat: the summary's fields beside the run's (what `status --json` prints)."""
        data = self.summary.as_dict() if self.summary else {}
        data.update(self.model_dump(mode="json", exclude={"summary"}))
        if self.summary:
            data["partition"] = self.summary.partition or self.partition
        return data


def resolved_state(status: str | None, finished: bool, recorded: str | None) -> RunState:
    """A run's state as the user should read it: the ledger's (or the tag's) word, except
    that nothing Dagster marks failed or canceled is ever shown as succeeded or running.
    `status` is Dagster's run status (None: Dagster has no such run)."""
    state = RunState(recorded) if recorded in set(RunState) else None
    if status is None:
        return state or RunState.RUNNING
    if not finished:
        return state if state in (RunState.PAUSED, RunState.CANCELED) else RunState.RUNNING
    ended = ENDED_STATES.get(status, RunState.FAILED)
    if ended is RunState.SUCCEEDED:
        return state if state in (RunState.SUCCEEDED, RunState.PAUSED) else ended
    if state in (RunState.PAUSED, RunState.CANCELED):
        return state
    return ended


def build_status(ledger: Ledger, run_id: str, view: DagsterView | None,
                 run: dict[str, Any] | None = None) -> RunStatus:
    """The run's status from its ledger rows and Dagster's view of it (None: no such run in
    Dagster); `run` when the caller has just read the run's ledger row."""
    run = run or ledger.run(run_id)
    groups = ledger.row_groups(run_id) if run else []  # one read for summary and progress
    summary = summarize_run(ledger, run_id, run=run, groups=groups) if run else None
    saved = (run or {}).get("summary") or {}
    if summary is not None and saved.get("tolerated_failures") is not None:
        summary.tolerated_failures = saved["tolerated_failures"]
    recorded = run["status"] if run else (view.state_tag if view else None)
    progress = None
    if run is not None:
        live = read_progress(ledger, run_id, ProgressWindow(), run, groups)
        progress = live.as_dict() if live else None
    return RunStatus(
        run_id=run_id, status=view.status if view else "UNKNOWN",
        state=resolved_state(view.status if view else None, view.finished if view else False,
                             recorded),
        job=view.job if view else None,
        partition=(run or {}).get("partition") or (view.partition if view else None),
        summary=summary, progress=progress,
        files={f"{step}.{key}": str(value) for step, produced in saved.get("after", {}).items()
               for key, value in produced.items()},
        step_failures=view.step_failures if view else [])


def live_status(ledger: Ledger, run_id: str, now: float | None = None) -> RunStatus | None:
    """The status of a run that is running right now, from the ledger alone; None when the
    ledger cannot vouch for it (the run has ended, is not running, or its engine has not
    checked in for LIVE_VIEW_MAX_AGE_S): then only Dagster can say."""
    now = time.time() if now is None else now
    run = ledger.run(run_id)
    if run is None or run["status"] != RunState.RUNNING or not run.get("live_view"):
        return None
    view = DagsterView.model_validate(run["live_view"])
    holder = ledger.lease_holder(run["batch"], run["partition"])
    if (view.finished or holder is None or holder.run_id != run_id
            or now - holder.heartbeat_at > LIVE_VIEW_MAX_AGE_S
            or now - view.read_at > LIVE_VIEW_MAX_AGE_S):
        return None
    return build_status(ledger, run_id, view, run)


def status_without_dagster(prefix: str) -> RunStatus | None:
    """live_status() of the run that `prefix` names, found through DAGSTER_HOME's files
    alone; None wherever that cannot answer (the home's ledger is in storage only Dagster
    knows, no single ledger run has that prefix, the run is not live)."""
    from batch_defs.home import home_path, ledger_url_without_instance

    url = ledger_url_without_instance(home_path())
    if url is None:
        return None
    with Ledger(url) as ledger:
        matches = ledger.run_ids_starting(prefix)
        return live_status(ledger, matches[0]) if len(matches) == 1 else None
