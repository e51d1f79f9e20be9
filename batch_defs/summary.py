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

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from pydantic import BaseModel, Field

from batch_defs.ledger import SOURCE_PHASE, Ledger, item_table, run_table
from batch_defs.states import FAILURE_STATUSES, ItemStatus, SkipCause

if TYPE_CHECKING:
    import pandas as pd

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
                  run: dict[str, Any] | None = None) -> RunSummary:
    """`run`: the run's batch_run row when the caller has just read it. Counted in the
    database (a few aggregate queries): a run of a million items is never in memory here."""
    run = run or ledger.run(run_id) or {"phases": [], "total_items": 0}
    phases: list[str] = run["phases"]
    per_phase, outcomes = classify_in_ledger(ledger, run_id, phases, int(run["total_items"]))
    t = item_table.c
    executed = sa.and_(t.run_id == run_id, t.phase != SOURCE_PHASE, t.reused_from.is_(None))
    ran_query = sa.select(sa.func.count(), sa.func.max(t.finished_at),
                          sa.func.coalesce(sa.func.sum(t.cost), 0.0),
                          sa.func.coalesce(sa.func.sum(t.tokens), 0)).where(executed)
    reused_query = sa.select(sa.func.count()).where(t.run_id == run_id,
                                                    t.reused_from.is_not(None))
    failures_query = (sa.select(t.item_key, t.phase, t.status, t.attempts, t.error)
                      .where(t.run_id == run_id, t.status.in_(FAILURE_STATUSES))
                      .order_by(t.seq, t.id).limit(failed_examples))
    with ledger.engine.connect() as conn:
        executed_n, last_finished, run_cost, run_tokens = conn.execute(ran_query).one()
        reused = int(conn.execute(reused_query).scalar() or 0)
        failures = conn.execute(failures_query).all()
    started = float(run.get("started_at") or 0.0)
    finished = float(last_finished) if last_finished is not None else started
    duration = max(0.0, finished - started)
    spent_cost, spent_tokens = partition_spend(ledger, run_id, run)
    return RunSummary(
        run_id=run_id, batch=run.get("batch"), partition=run.get("partition"),
        items=sum(outcomes.values()), **outcomes,
        reused=reused, executed=int(executed_n),
        per_phase=per_phase, duration_s=round(duration, 3),
        started_at=datetime.fromtimestamp(started, UTC) if started else None,
        items_per_s=items_per_second(int(executed_n), len(phases), duration),
        cost=round(spent_cost, 6), tokens=spent_tokens,
        run_cost=round(float(run_cost), 6), run_tokens=int(run_tokens),
        stop_reason=run.get("stop_reason"),
        failures=[ItemFailure(item_key=str(key), phase=str(phase), status=ItemStatus(status),
                              attempts=int(attempts or 0), error=error)
                  for key, phase, status, attempts, error in failures],
        after=(run.get("summary") or {}).get("after", {}),
    )


def classify_in_ledger(ledger: Ledger, run_id: str, phases: list[str], total_items: int
                       ) -> tuple[dict[str, PhaseCounts], dict[str, int]]:
    """What classify() says of the run's rows, counted by the database: one row per phase
    and status, and one per kind of item outcome."""
    t = item_table.c
    per_status = (sa.select(t.phase, t.status, sa.func.count(),
                            sa.func.count(t.reused_from))
                  .where(t.run_id == run_id).group_by(t.phase, t.status))
    index = sa.case({phase: i for i, phase in enumerate(phases)}, value=t.phase, else_=-1)
    passes = sa.or_(t.status == ItemStatus.SUCCEEDED.value,
                    sa.and_(t.status == ItemStatus.SKIPPED.value,
                            t.skip_cause == SkipCause.CONDITION.value))
    last = len(phases) - 1
    # Per item: the first phase that stopped it and how, else its last phase's pass.
    items = (sa.select(sa.func.min(sa.case((~passes, index))).label("stop_index"),
                       sa.func.max(sa.case((~passes, t.status))).label("stop_status"),
                       sa.func.max(sa.case((sa.and_(passes, index == last), t.status)))
                       .label("through"))
             .where(t.run_id == run_id, t.phase.in_(list(phases)))
             .group_by(t.item_key).subquery())
    kinds = (sa.select(items.c.stop_index, items.c.stop_status, items.c.through,
                       sa.func.count())
             .group_by(items.c.stop_index, items.c.stop_status, items.c.through))
    invalid_query = sa.select(sa.func.count(sa.distinct(t.item_key))).where(
        t.run_id == run_id, t.phase == SOURCE_PHASE)
    with ledger.engine.connect() as conn:
        by_status = conn.execute(per_status).all()
        by_kind = conn.execute(kinds).all() if phases else []
        invalid = int(conn.execute(invalid_query).scalar() or 0)
    outcomes = {name: 0 for name in OUTCOMES}
    stopped_before = [0] * (len(phases) + 1)  # items stopped in a phase before phase i
    finished = 0
    for stop_index, stop_status, through, n in by_kind:
        if stop_index is not None:
            outcomes[str(stop_status)] += int(n)
            for later in range(int(stop_index) + 1, len(phases) + 1):
                stopped_before[later] += int(n)
            finished += int(n)
        elif through is not None:
            outcomes[str(through)] += int(n)
            finished += int(n)
    outcomes["invalid"] = invalid
    outcomes["pending"] = max(0, total_items - finished)
    counts: dict[str, dict[str, int]] = {}
    reused: dict[str, int] = {}
    for phase, status, n, reused_n in by_status:
        counts.setdefault(phase, {})[str(status)] = int(n)
        reused[phase] = reused.get(phase, 0) + int(reused_n)
    per_phase: dict[str, PhaseCounts] = {}
    if SOURCE_PHASE in counts:
        per_phase[SOURCE_PHASE] = PhaseCounts(invalid=sum(counts[SOURCE_PHASE].values()),
                                              reused=reused[SOURCE_PHASE])
    for i, phase in enumerate(phases):
        found = counts.get(phase, {})
        expected = total_items - stopped_before[i]
        per_phase[phase] = PhaseCounts(**found, pending=max(0, expected - sum(found.values())),
                                       reused=reused.get(phase, 0))
    return per_phase, outcomes


def items_per_second(item_phases: float, phases: int, seconds: float) -> float:
    """THE throughput figure: item-phases finished per second over the number of phases."""
    return round(item_phases / max(1, phases) / seconds, 2) if seconds > 0 else 0.0


def classify(rows: pd.DataFrame, phases: list[str],
             total_items: int) -> tuple[dict[str, PhaseCounts], dict[str, int]]:
    """Counts per phase and status, and each item's one outcome.

    An item's outcome is its first status that stops it (failed, rejected, or a skip that
    is not a `when:` condition), else the status of its row in the last phase; an item
    without that is pending. Invalid items never reached a phase.
    """
    source = rows[rows["phase"] == SOURCE_PHASE]
    work = rows[rows["phase"].isin(phases)]
    index = work["phase"].map({phase: i for i, phase in enumerate(phases)})
    passes = (work["status"] == ItemStatus.SUCCEEDED) | (
        (work["status"] == ItemStatus.SKIPPED) & (work["skip_cause"] == SkipCause.CONDITION))
    stopped = work[~passes].assign(index=index[~passes]).sort_values("index")
    stopped = stopped.drop_duplicates("item_key")
    through = work[passes & (index == len(phases) - 1)] if phases else work.iloc[0:0]
    through = through[~through["item_key"].isin(stopped["item_key"])]
    outcomes = {name: 0 for name in OUTCOMES}
    for status, n in stopped["status"].value_counts().items():
        outcomes[str(status)] += int(n)
    for status, n in through["status"].value_counts().items():
        outcomes[str(status)] += int(n)
    outcomes["invalid"] = int(source["item_key"].nunique())
    outcomes["pending"] = max(0, total_items - len(stopped) - len(through))
    per_phase: dict[str, PhaseCounts] = {}
    if len(source):
        per_phase[SOURCE_PHASE] = PhaseCounts(invalid=len(source),
                                              reused=int(source["reused_from"].notna().sum()))
    for i, phase in enumerate(phases):
        part = work[work["phase"] == phase]
        counts = {str(s): int(n) for s, n in part["status"].value_counts().items()}
        expected = total_items - int((stopped["index"] < i).sum())
        per_phase[phase] = PhaseCounts(**counts, pending=max(0, expected - len(part)),
                                       reused=int(part["reused_from"].notna().sum()))
    return per_phase, outcomes


def partition_spend(ledger: Ledger, run_id: str, run: dict[str, Any]) -> tuple[float, int]:
    """Cost and tokens of every execution in the run's partition by this run and the runs
    that started before it: the spend a budget counts (rows carried over are not paid twice)."""
    t, r = item_table.c, run_table.c
    runs = [run_id]
    if run.get("batch") is not None:
        earlier = sa.select(r.run_id).where(r.batch == run["batch"],
                                            r.partition == run["partition"],
                                            r.started_at <= run["started_at"])
        with ledger.engine.connect() as conn:
            runs += [row[0] for row in conn.execute(earlier)]
    query = sa.select(sa.func.coalesce(sa.func.sum(t.cost), 0.0),
                      sa.func.coalesce(sa.func.sum(t.tokens), 0)).where(
        t.run_id.in_(sorted(set(runs))), t.reused_from.is_(None))
    with ledger.engine.connect() as conn:
        cost, tokens = conn.execute(query).one()
    return float(cost), int(tokens)
