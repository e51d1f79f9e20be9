"""A run's summary from its ledger rows: one vocabulary of counts, one throughput, the cost.

Every surface (CLI, reports, the results asset, notifications, the API) shows these fields
under these names:

- items: every item of the run's source, valid or not; each has exactly one outcome:
  succeeded, failed, invalid, rejected, skipped, or pending (not finished yet). "failed" is
  an item whose handler failed, never an invalid or rejected one.
- items_per_s: item-phases finished per second divided by the number of phases (items' worth
  of work per second). The summary takes it over the whole run; live progress over a moving
  window, and the run's own figure once it has ended.
- cost/tokens: what the partition has spent up to this run (what options.budget counts);
  run_cost/run_tokens: what this run's own executions spent.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field

from batch_defs.ledger import SOURCE_PHASE, Ledger, RowGroup, run_table, tally_table
from batch_defs.states import ItemStatus

OUTCOMES = ("succeeded", "failed", "invalid", "rejected", "skipped", "pending")
RESULTS_HINT = "batch-defs results {run_id} --status failed,invalid,rejected"


class PhaseCounts(BaseModel):
    """One phase's item-phases by status; pending ones are expected here but not finished."""

    succeeded: int = 0
    failed: int = 0
    invalid: int = 0  # only in the source pseudo-phase
    rejected: int = 0
    skipped: int = 0
    pending: int = 0
    reused: int = 0  # of the above, carried over from earlier runs of the partition

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.invalid + self.rejected + self.skipped

    @property
    def success_rate(self) -> float | None:
        return round(self.succeeded / self.finished, 4) if self.finished else None


class ItemFailure(BaseModel):
    """An item that failed, was invalid or was rejected, and why."""

    item_key: str
    phase: str
    status: ItemStatus
    attempts: int = 0
    error: str | None = None


class RunSummary(BaseModel):
    """A run's outcome; its dict form (`as_dict`) travels between steps and into the ledger."""

    run_id: str
    batch: str | None = None
    partition: str | None = None
    items: int = 0
    succeeded: int = 0
    failed: int = 0
    invalid: int = 0
    rejected: int = 0
    skipped: int = 0
    pending: int = 0
    reused: int = 0  # item-phase rows carried over from earlier runs
    executed: int = 0  # item-phases this run executed itself
    per_phase: dict[str, PhaseCounts] = Field(default_factory=dict)
    started_at: datetime | None = None
    duration_s: float = 0.0
    items_per_s: float = 0.0
    cost: float = 0.0
    tokens: int = 0
    run_cost: float = 0.0
    run_tokens: int = 0
    stop_reason: str | None = None
    tolerated_failures: int | None = None
    failures: list[ItemFailure] = Field(default_factory=list)  # the first ones, source order
    after: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @property
    def counted_failures(self) -> int:
        """failed + invalid + rejected: what tolerated_failures is judged against."""
        return self.failed + self.invalid + self.rejected

    @property
    def within_tolerance(self) -> bool:
        return self.tolerated_failures is None or self.counted_failures <= self.tolerated_failures

    def counts(self) -> dict[str, int]:
        """The outcome counts under their one set of names (pending only while unfinished)."""
        counts = {"items": self.items, **{name: getattr(self, name) for name in OUTCOMES}}
        if not self.pending:
            counts.pop("pending")
        return counts

    def counts_line(self) -> str:
        """`40 items: 35 succeeded, 2 failed, 1 invalid, 1 rejected, 1 skipped`."""
        parts = [f"{n} {name}" for name, n in self.counts().items() if name != "items"]
        return f"{self.items} items: " + ", ".join(parts)

    def cost_line(self) -> str:
        return (f"{self.cost:.6g} spent on the partition ({self.tokens} tokens); this run "
                f"{self.run_cost:.6g} ({self.run_tokens} tokens)")

    def results_hint(self) -> str:
        return RESULTS_HINT.format(run_id=self.run_id)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def summarize_run(ledger: Ledger, run_id: str, failed_examples: int = 10,
                  run: dict[str, Any] | None = None,
                  groups: list[RowGroup] | None = None) -> RunSummary:
    """`run` and `groups` (Ledger.row_groups): the run's batch_run row and row counts when
    the caller has just read them. Every figure comes from aggregate queries, so a summary
    costs about as much at a million items as at ten."""
    run = run or ledger.run(run_id) or {"phases": [], "total_items": 0}
    phases: list[str] = run["phases"]
    groups = ledger.row_groups(run_id) if groups is None else groups
    per_phase, outcomes = classify(ledger, run_id, groups, phases, int(run["total_items"]))
    ran = [g for g in groups if g.phase != SOURCE_PHASE and not g.reused]
    started = float(run.get("started_at") or 0.0)
    finishes = [g.last_finished for g in ran if g.last_finished is not None]
    duration = max(0.0, (max(finishes) if finishes else started) - started)
    executed = sum(g.rows for g in ran)
    spent_cost, spent_tokens = partition_spend(ledger, run_id, run)
    return RunSummary(
        run_id=run_id, batch=run.get("batch"), partition=run.get("partition"),
        items=sum(outcomes.values()), **outcomes,
        reused=sum(g.rows for g in groups if g.reused), executed=executed,
        per_phase=per_phase, duration_s=round(duration, 3),
        started_at=datetime.fromtimestamp(started, UTC) if started else None,
        items_per_s=items_per_second(executed, len(phases), duration),
        cost=round(spent_cost, 6), tokens=spent_tokens,
        run_cost=round(sum(g.cost for g in ran), 6), run_tokens=sum(g.tokens for g in ran),
        stop_reason=run.get("stop_reason"),
        failures=[ItemFailure.model_validate(row)
                  for row in ledger.failure_rows(run_id, failed_examples)],
        after=(run.get("summary") or {}).get("after", {}),
    )


def items_per_second(item_phases: float, phases: int, seconds: float) -> float:
    """THE throughput figure: item-phases finished per second over the number of phases."""
    return round(item_phases / max(1, phases) / seconds, 2) if seconds > 0 else 0.0


def classify(ledger: Ledger, run_id: str, groups: list[RowGroup], phases: list[str],
             total_items: int) -> tuple[dict[str, PhaseCounts], dict[str, int]]:
    """Counts per phase and status, and each item's one outcome.

    An item's outcome is its first status that stops it (failed, rejected, or a skip that
    is not a `when:` condition), else the status of its row in the last phase; an item
    without that is pending. Invalid items never reached a phase. Only the stopping rows
    are read one by one (few in a healthy run); everything else is counted in `groups`.
    """
    order = {phase: i for i, phase in enumerate(phases)}
    first_stop: dict[str, tuple[int, str]] = {}
    for key, phase, status in ledger.stopping_rows(run_id, phases):
        if key not in first_stop or order[phase] < first_stop[key][0]:
            first_stop[key] = (order[phase], status)
    through = Counter[str]()
    if phases:
        for group in groups:
            if group.phase == phases[-1] and group.passes:
                through[group.status] += group.rows
        through -= ledger.passing_statuses(run_id, phases[-1], first_stop)
    outcomes = dict.fromkeys(OUTCOMES, 0)
    for _, status in first_stop.values():
        outcomes[status] += 1
    for status, n in through.items():
        outcomes[status] += n
    source = [g for g in groups if g.phase == SOURCE_PHASE]
    outcomes["invalid"] = sum(g.rows for g in source)  # one source row per item key
    outcomes["pending"] = max(0, total_items - len(first_stop) - sum(through.values()))
    per_phase: dict[str, PhaseCounts] = {}
    if source:
        per_phase[SOURCE_PHASE] = PhaseCounts(invalid=outcomes["invalid"],
                                              reused=sum(g.rows for g in source if g.reused))
    stops_at = Counter(index for index, _ in first_stop.values())
    stopped_before = 0
    for i, phase in enumerate(phases):
        part = [g for g in groups if g.phase == phase]
        counts = Counter[str]()
        for group in part:
            counts[group.status] += group.rows
        per_phase[phase] = PhaseCounts(
            **counts, pending=max(0, total_items - stopped_before - sum(counts.values())),
            reused=sum(g.rows for g in part if g.reused))
        stopped_before += stops_at[i]
    return per_phase, outcomes


def partition_spend(ledger: Ledger, run_id: str, run: dict[str, Any]) -> tuple[float, int]:
    """Cost and tokens of every execution in the run's partition by this run and the runs
    that started before it: the spend a budget counts (rows carried over are not paid twice)."""
    t, r = tally_table.c, run_table.c
    runs = [run_id]
    if run.get("batch") is not None:
        earlier = sa.select(r.run_id).where(r.batch == run["batch"],
                                            r.partition == run["partition"],
                                            r.started_at <= run["started_at"])
        with ledger.engine.connect() as conn:
            runs += [row[0] for row in conn.execute(earlier)]
    query = sa.select(sa.func.coalesce(sa.func.sum(t.cost), 0.0),
                      sa.func.coalesce(sa.func.sum(t.tokens), 0)).where(
        t.run_id.in_(sorted(set(runs))), t.reused.is_(False))
    with ledger.engine.connect() as conn:
        cost, tokens = conn.execute(query).one()
    return float(cost), int(tokens)
