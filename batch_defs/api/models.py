"""What the Python API returns and the REST API sends: typed launches, statuses, items and
analytics (pydantic models, so the OpenAPI document describes them)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class LaunchState(StrEnum):
    """A launch's state: its latest run's (batch_defs.states.RunState), or before any run."""

    CREATED = "created"  # partition and items stored; not started (start=False)
    STARTING = "starting"  # a worker process is starting the run
    QUEUED = "queued"  # submitted; waits for the run coordinator
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def ended(self) -> bool:
        """No run of the launch is going on (it may be started or resumed)."""
        return self in (LaunchState.CREATED, LaunchState.PAUSED, LaunchState.SUCCEEDED,
                        LaunchState.FAILED, LaunchState.CANCELED)


class LaunchInfo(BaseModel):
    """One launch: a partition of a batch, its items and its runs."""

    id: str = Field(description="<batch>.<16 hex digits>: stable for the batch and partition")
    batch: str
    partition: str
    state: LaunchState
    created_at: datetime | None = Field(default=None, description="When the launch was made "
                                        "(or its first run started, for launches of the CLI)")
    items: int | None = Field(default=None, description="Items given with the launch")
    data: str | None = Field(default=None, description="The data file that is the source")
    runs: int = 0
    run_id: str | None = Field(default=None, description="The latest run")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = Field(default=None, description="Why the launch could not start")


class Counts(BaseModel):
    """Items by final outcome (an item counts once, in the phase that decided it)."""

    succeeded: int = 0
    failed: int = 0
    invalid: int = 0
    rejected: int = 0
    skipped: int = 0


class FailureExample(BaseModel):
    item_key: str
    phase: str
    status: str
    error: str | None = None


class RunStatus(BaseModel):
    """Where a launch's run stands: counts per status and phase, progress, cost so far."""

    launch_id: str | None = None
    run_id: str | None = None
    batch: str | None = None
    partition: str | None = None
    state: LaunchState
    dagster_status: str | None = Field(default=None, description="Dagster's run status")
    total_items: int = 0
    items_done: int = Field(default=0, description="Items whose outcome is final")
    counts: Counts = Field(default_factory=Counts)
    per_phase: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="phase -> status -> item rows")
    percent: float = Field(default=0.0, description="Item-phases done, 0 to 100")
    eta_s: float | None = Field(default=None, description="Seconds left at the run's average "
                                "rate so far; null while unknown")
    current_phase: str | None = Field(default=None, description="The first phase that still "
                                      "has items to do")
    cost: float = 0.0
    tokens: int = 0
    duration_s: float = 0.0
    items_per_s: float = 0.0
    stop_reason: str | None = None
    failures: list[FailureExample] = Field(default_factory=list)
    step_failures: list[dict[str, str]] = Field(default_factory=list)
    files: dict[str, Any] = Field(default_factory=dict, description="What the after steps "
                                  "produced: files and counts")

    run_ended: bool = Field(default=False, description="Dagster's status of the run is final: "
                            "its process has stopped (a run is `paused` as soon as it stops "
                            "starting items, and ends once its in-flight items are recorded)")

    @property
    def finished(self) -> bool:
        """The run has ended and says how: succeeded, failed, paused or canceled."""
        return self.run_ended and self.state.ended


class PhaseOutcome(BaseModel):
    """An item's row for one phase."""

    status: str
    attempts: int = 0
    output: Any = None
    error: str | None = None
    duration_s: float | None = None
    cost: float = 0.0
    tokens: int = 0
    attempt_log: list[dict[str, Any]] | None = Field(
        default=None, description="Failed attempts (retries) and a gate's attempts")
    reused_from: str | None = Field(default=None, description="Run whose success this is")


class ItemResult(BaseModel):
    """One item of a run, with its outcome in each phase it reached."""

    key: str
    status: str = Field(description="succeeded, failed, invalid, rejected, skipped or pending")
    phases: dict[str, PhaseOutcome]
    input: Any = Field(default=None, description="The input of a failed item (dead letter)")

    @property
    def output(self) -> Any:
        """What the item's last phase produced."""
        outputs = [p.output for p in self.phases.values() if p.output is not None]
        return outputs[-1] if outputs else None


class Page(BaseModel, Generic[T]):
    """A page of a list; `next_offset` is null on the last page."""

    items: list[T]
    total: int
    offset: int
    limit: int
    next_offset: int | None = None


class PhaseAnalytics(BaseModel):
    phase: str = Field(description="A phase, `_source` (invalid items) or `all`")
    items: int
    succeeded: int
    failed: int
    skipped: int
    rejected: int
    invalid: int
    reused: int
    success_rate: float | None
    avg_s: float | None
    p95_s: float | None
    max_s: float | None
    cost: float
    cost_per_item: float | None
    tokens: int


class Analytics(BaseModel):
    run_id: str
    batch: str | None = None
    partition: str | None = None
    phases: list[PhaseAnalytics]
    total: PhaseAnalytics


class DeleteResult(BaseModel):
    """What deleting a launch removed."""

    batch: str
    partition: str
    runs: int
    item_rows: int
    files: int


class BatchInfo(BaseModel):
    name: str
    description: str = ""
    phases: list[str]
    partitions: int
    problem: str | None = None
