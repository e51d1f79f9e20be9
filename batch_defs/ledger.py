"""The item ledger: one row per (run, phase, item) with status, attempts, output, error and cost.

It is the checkpoint: a phase skips items already succeeded in the partition and reuses their
stored outputs. Writes are batched by the caller (`record` takes many rows in one statement).
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from batch_defs.states import FAILURE_STATUSES, ItemStatus, RunState, SkipCause, StopKind

if TYPE_CHECKING:
    import pandas as pd  # rows() imports it: commands that read no rows skip 0.5 s

SOURCE_PHASE = "_source"  # rows for items rejected before any phase ran (status invalid)
STATUSES = tuple(ItemStatus)

metadata = sa.MetaData()

item_table = sa.Table(
    "batch_item",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("batch", sa.String(128), nullable=False),
    sa.Column("partition", sa.String(255), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("phase", sa.String(128), nullable=False),
    sa.Column("item_key", sa.String(512), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("input", sa.Text),  # kept for failed items only: the dead-letter payload
    sa.Column("output", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("attempt_log", sa.Text),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("duration_s", sa.Float),
    sa.Column("cost", sa.Float, nullable=False, default=0.0),
    sa.Column("tokens", sa.Integer, nullable=False, default=0),
    sa.Column("reused_from", sa.String(64)),  # run whose result this row carries over
    sa.Column("worker", sa.String(128)),  # host:pid of the process that ran the item
    sa.Column("skip_cause", sa.String(16)),  # SkipCause of a skipped row
    sa.Column("branch", sa.String(128)),  # the route case that ran the item, if routed
    sa.UniqueConstraint("run_id", "phase", "item_key", name="uq_batch_item_run_phase_key"),
    sa.Index("ix_batch_item_partition", "batch", "partition", "phase", "item_key"),
    sa.Index("ix_batch_item_run_status", "run_id", "status"),
)
# A failed, invalid or rejected row: what summaries, checks and failure lists pick out.
FAILING_ROW = item_table.c.status.in_([status.value for status in FAILURE_STATUSES])

# What a run's rows add up to, per group of row_groups() and per writing connection (`shard`):
# kept by triggers on batch_item (revision 0004), so counting a run costs the same at a million
# rows as at ten. A Postgres connection adds to its own shard, so concurrent writers never wait
# on one another's counts; a shard may go below zero (a row counted in one shard and rewritten
# from another), and only the sum over shards means anything.
tally_table = sa.Table(
    "batch_tally",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("phase", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), primary_key=True),
    sa.Column("skip_cause", sa.String(16), primary_key=True),  # '' for rows without one
    sa.Column("reused", sa.Boolean, primary_key=True),
    sa.Column("shard", sa.BigInteger, primary_key=True),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Column("cost", sa.Float, nullable=False),
    sa.Column("tokens", sa.BigInteger, nullable=False),
    sa.Column("work_s", sa.Float, nullable=False),
    sa.Column("first_started", sa.Float),
    sa.Column("last_finished", sa.Float),
)

run_table = sa.Table(
    "batch_run",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("batch", sa.String(128), nullable=False),
    sa.Column("partition", sa.String(255), nullable=False),
    sa.Column("parent_run_id", sa.String(64)),
    sa.Column("total_items", sa.Integer, nullable=False),
    sa.Column("phases", sa.Text, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("status", sa.String(16), nullable=False, default="running"),
    sa.Column("stop_kind", sa.String(16)),  # StopKind; stop_reason says it in words
    sa.Column("stop_reason", sa.Text),
    sa.Column("summary", sa.Text),
    sa.Column("settings", sa.Text),  # JSON: changes made to the running batch (batch-defs set)
    sa.Column("live_view", sa.Text),  # JSON: Dagster's view of a live run (run_status.py)
)

# Token buckets of rate limits shared by phases, runs and processes (`limits:` in a spec).
limit_table = sa.Table(
    "batch_limit",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("rate_per_s", sa.Float, nullable=False),
    sa.Column("capacity", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("state", sa.Text),  # JSON: adaptive backoff state
)

# Child processes items started (shell task): a resume ends those a killed run left behind.
process_table = sa.Table(
    "batch_process",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("phase", sa.String(128), nullable=False),
    sa.Column("item_key", sa.String(512), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pgid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Index("ix_batch_process_run", "run_id"),
)

# Which run holds a partition: one live run per partition, whichever door launched it.
lease_table = sa.Table(
    "batch_lease",
    metadata,
    sa.Column("batch", sa.String(128), primary_key=True),
    sa.Column("partition", sa.String(255), primary_key=True),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("acquired_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)

_queries: Counter[str] = Counter()  # statements sent per ledger URL by this process

effect_table = sa.Table(
    "batch_effect",
    metadata,
    sa.Column("idempotency_key", sa.String(1024), primary_key=True),
    sa.Column("value", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
)

HEAVY_COLUMNS = ("input", "output", "attempt_log")
ITEM_COLUMNS = [c.name for c in item_table.columns if c.name != "id"]
# Every column but the JSON ones, which are most of the memory of a large run.
LIGHT_COLUMNS = [c for c in ITEM_COLUMNS if c not in HEAVY_COLUMNS]
_UPDATED_ON_CONFLICT = [c for c in ITEM_COLUMNS if c not in ("run_id", "phase", "item_key")]


@dataclass(frozen=True)
class StopRequest:
    """Why a batch stops starting items: the kind (a type) and the reason (for people)."""

    kind: StopKind
    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class RunSnapshot:
    """What a step needs to know about its run before starting items, read in one query."""

    exists: bool = False  # the run has its batch_run row
    stop: StopRequest | None = None
    counted_failures: int = 0  # items failed, invalid or rejected so far in the run
    spent_cost: float = 0.0  # in the whole partition, across runs
    spent_tokens: int = 0


@dataclass(frozen=True)
class LeaseHolder:
    """The run that holds a partition, and where it runs."""

    run_id: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float


@dataclass(frozen=True)
class KnownOutcome:
    """An item's outcome for a phase that a run can build on: its own (any status), or a
    success of an earlier run of the partition (`other_run`), which it reuses."""

    status: ItemStatus
    output: Any
    skip_cause: SkipCause | None
    run_id: str  # the run that executed it
    other_run: bool
    branch: str | None = None  # the route case that ran it


@dataclass(frozen=True)
class LimitRow:
    """A shared limit's bucket as stored: tokens (negative: calls already promised a later
    start), the current rate (lowered by back-offs), and its JSON state (ceiling, holders,
    back-off history)."""

    name: str
    tokens: float
    rate_per_s: float
    capacity: float
    updated_at: float
    state: dict[str, Any]


@dataclass(frozen=True)
class UndoTarget:
    """An item whose phase succeeded in a run, to be undone once: `executed_by` is the run
    whose execution made the effect (the run itself, or the one it reused the success of)."""

    item_key: str
    seq: int
    executed_by: str
    output: Any


UNDO_RUN_PREFIX = "undo-"  # undo rows: run_id = undo-<run that made the effect>
UNDO_PHASE_SUFFIX = ":undo"  # phase = <phase>:undo


def undo_run_id(executed_by: str) -> str:
    return f"{UNDO_RUN_PREFIX}{executed_by}"


def undo_phase(phase: str) -> str:
    return f"{phase}{UNDO_PHASE_SUFFIX}"


@dataclass(frozen=True)
class LeaseTake:
    """What taking a partition's lease came to: ours (both None), held by a live run, or ours
    after replacing a run that is gone."""

    held_by: LeaseHolder | None = None
    replaced: LeaseHolder | None = None


@dataclass(frozen=True)
class ProcessRecord:
    """A child process group an item started; removed when the process has ended."""

    id: int
    run_id: str
    phase: str
    item_key: str
    host: str
    pgid: int
    started_at: float  # the group leader's start time, to tell it from a reused pid


@dataclass(frozen=True)
class PartitionRuns:
    """A partition's runs in the ledger: how many, when the first started, the latest's row."""

    batch: str
    partition: str
    runs: int
    first_started_at: float
    latest: dict[str, Any]


@dataclass(frozen=True)
class ItemPage:
    """One page of a run's items (in source order) with each item's final status and rows."""

    total: int  # items matching the filter, in all pages
    items: list[tuple[str, str]]  # (item key, final status) on this page
    rows: pd.DataFrame  # every row of those items (their phases), in source order


@dataclass(frozen=True)
class RowGroup:
    """A run's rows that share phase, status, skip cause and whether they were carried over
    from an earlier run: the unit of every count in a run's summary."""

    phase: str
    status: str
    skip_cause: str | None
    reused: bool
    rows: int
    cost: float
    tokens: int
    work_s: float  # summed durations
    first_started: float | None
    last_finished: float | None

    @property
    def passes(self) -> bool:
        """The item goes on to its next phase (see `passes_row`)."""
        return self.status == ItemStatus.SUCCEEDED or (
            self.status == ItemStatus.SKIPPED and self.skip_cause == SkipCause.CONDITION)


def passes_row() -> Any:
    """SQL: an item row after which the item goes on (it succeeded, or a `when:` condition
    skipped it); any other row stops the item there."""
    t = item_table.c
    return sa.or_(t.status == ItemStatus.SUCCEEDED.value,
                  sa.and_(t.status == ItemStatus.SKIPPED.value,
                          t.skip_cause == SkipCause.CONDITION.value))


def stopping_skip() -> Any:
    """SQL: a skip that stops its item (by its handler or a dependency, not a `when:`)."""
    t = item_table.c
    return sa.and_(t.status == ItemStatus.SKIPPED.value,
                   sa.func.coalesce(t.skip_cause, "") != SkipCause.CONDITION.value)


def stops_row() -> Any:
    """SQL: the opposite of `passes_row`, written as one status list (and a test of those
    rows alone) so that the (run_id, status) index finds the few stopping rows of a large run
    without reading the rest: with an OR of the two cases, SQLite read every row of the run's
    phases (0.2 s at a million)."""
    t = item_table.c
    stopping = [s.value for s in ItemStatus if s is not ItemStatus.SUCCEEDED]
    condition_skip = sa.and_(t.status == ItemStatus.SKIPPED.value,
                             sa.func.coalesce(t.skip_cause, "") == SkipCause.CONDITION.value)
    return sa.and_(t.status.in_(stopping), sa.not_(condition_skip))


@dataclass(frozen=True)
class DeletedRows:
    """What deleting a partition took out of the ledger."""

    run_ids: list[str]
    items: int
    effects: int


class LedgerWriteError(RuntimeError):
    """Outcomes the ledger could not store even one by one; the step must fail."""


def to_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str, separators=(",", ":"))


class Ledger:
    """Access to the ledger tables in one database; safe to share between threads.

    A Ledger owns its engine (connection pool): whoever opens one closes it (`close()`, or use
    it as a context manager); the batch_storage resource does so once per run.
    """

    def __init__(self, url: str):
        self.url = url
        self.engine = _create_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def queries(self) -> int:
        """Statements sent to this database by this process so far (for benchmarks)."""
        return _queries[self.url]

    def _insert(self, table: sa.Table) -> Any:
        # The dialect's own insert (for on_conflict), imported for the database in use only:
        # `status` of a live run on SQLite need not load the Postgres dialect.
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects import postgresql

            return postgresql.insert(table)
        from sqlalchemy.dialects import sqlite

        return sqlite.insert(table)

    def start_run(self, run_id: str, batch: str, partition: str, total_items: int,
                  phases: Sequence[str], parent_run_id: str | None = None) -> None:
        """Create the run's row unless it exists (re-executed steps call this again)."""
        stmt = self._insert(run_table).values(
            run_id=run_id, batch=batch, partition=partition, parent_run_id=parent_run_id,
            total_items=total_items, phases=json.dumps(list(phases)), started_at=time.time(),
            status="running",
        ).on_conflict_do_nothing(index_elements=["run_id"])
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def set_total_items(self, run_id: str, total_items: int) -> None:
        """The run's item count, once a fan-out that streamed has counted its source (the
        run started with an upper bound of it)."""
        with self.engine.begin() as conn:
            conn.execute(run_table.update().where(run_table.c.run_id == run_id)
                         .values(total_items=total_items))

    def record(self, rows: Sequence[Mapping[str, Any]]) -> set[str]:
        """Upsert finished item rows in one statement (a step retry may write a row again).

        The ledger never refuses what it is given: text is made storable first, and if the
        database still rejects the statement, rows are written one by one, a row that fails
        alone being stored as a failure that says why (so a re-run redoes the item). Returns
        the keys stored that way; raises LedgerWriteError only if even that fails.
        """
        if not rows:
            return set()
        prepared = [_row(r) for r in rows]
        try:
            self._upsert(prepared)
            return set()
        except sa.exc.SQLAlchemyError:
            return self._record_one_by_one(prepared)

    @functools.cached_property
    def _upsert_rows(self) -> Any:
        """The item upsert, built once: building it costs more than a group commit's write."""
        stmt = self._insert(item_table)
        return stmt.on_conflict_do_update(
            index_elements=["run_id", "phase", "item_key"],
            set_={c: stmt.excluded[c] for c in _UPDATED_ON_CONFLICT},
        )

    def _upsert(self, rows: list[dict[str, Any]]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self._upsert_rows, rows)

    def _record_one_by_one(self, rows: list[dict[str, Any]]) -> set[str]:
        degraded: set[str] = set()
        lost: list[str] = []
        for row in rows:
            try:
                self._upsert([row])
                continue
            except sa.exc.SQLAlchemyError as exc:
                problem = _first_line(exc)
            try:
                self._upsert([_unstorable(row, problem)])
                degraded.add(row["item_key"])
            except sa.exc.SQLAlchemyError as exc:
                lost.append(f"{row['item_key']!r} ({_first_line(exc)})")
        if lost:
            raise LedgerWriteError(f"the ledger could not store the outcome of {len(lost)} "
                                   f"item(s): {', '.join(lost[:5])}")
        return degraded

    def known_outcomes(self, batch: str, partition: str, run_id: str, phases: Sequence[str],
                       keys: Sequence[str]) -> dict[tuple[int, str], KnownOutcome]:
        """(phase index, key) -> what `run_id` can build on for these items: its own rows,
        else successes (and `when:` skips) of earlier runs of the partition."""
        t = item_table.c
        undo = item_table.alias("undo")
        index = {phase: i for i, phase in enumerate(phases)}
        undone = sa.exists().where(
            undo.c.run_id == sa.literal(UNDO_RUN_PREFIX) + sa.func.coalesce(t.reused_from,
                                                                            t.run_id),
            undo.c.phase == t.phase + sa.literal(UNDO_PHASE_SUFFIX),
            undo.c.item_key == t.item_key, undo.c.status == ItemStatus.SUCCEEDED.value)
        # A success whose effect a rollback undid is not reusable: the item runs again.
        reusable = sa.or_(sa.and_(t.status == ItemStatus.SUCCEEDED.value, ~undone),
                          sa.and_(t.status == ItemStatus.SKIPPED.value,
                                  t.skip_cause == SkipCause.CONDITION.value))
        found: dict[tuple[int, str], KnownOutcome] = {}
        for start in range(0, len(keys), 900):
            query = (sa.select(t.phase, t.item_key, t.run_id, t.reused_from, t.status, t.output,
                               t.skip_cause, t.branch)
                     .where(t.batch == batch, t.partition == partition,
                            t.phase.in_(list(phases)), t.item_key.in_(keys[start:start + 900]),
                            sa.or_(t.run_id == run_id, reusable))
                     .order_by(t.id))
            with self.engine.connect() as conn:
                for (phase, key, row_run, reused_from, status, output, cause,
                     branch) in conn.execute(query):
                    slot = (index[phase], key)
                    own = row_run == run_id
                    if slot in found and not own and not found[slot].other_run:
                        continue  # this run's own outcome wins over earlier runs'
                    found[slot] = KnownOutcome(
                        ItemStatus(status), json.loads(output) if output else None,
                        SkipCause(cause) if cause else None,
                        row_run if own else (reused_from or row_run), not own, branch)
        return found

    def run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(run_table).where(run_table.c.run_id == run_id)).first()
        if row is None:
            return None
        run = dict(row._mapping)
        run["phases"] = json.loads(run["phases"])
        run["summary"] = json.loads(run["summary"]) if run["summary"] else None
        run["live_view"] = json.loads(run["live_view"]) if run["live_view"] else None
        return run

    def run_ids_starting(self, prefix: str, limit: int = 2) -> list[str]:
        """Ids of runs in the ledger that start with `prefix` (at most `limit`)."""
        query = (sa.select(run_table.c.run_id)
                 .where(run_table.c.run_id.startswith(prefix, autoescape=True)).limit(limit))
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def keep_live_view(self, run_id: str, view: Mapping[str, Any]) -> None:
        """Store Dagster's view of the live run (run_status.DagsterView as JSON)."""
        with self.engine.begin() as conn:
            conn.execute(run_table.update().where(run_table.c.run_id == run_id)
                         .values(live_view=to_json(view)))

    def runs(self, batch: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(run_table).order_by(run_table.c.started_at)
        if batch:
            query = query.where(run_table.c.batch == batch)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def request_stop(self, run_id: str, stop: StopRequest) -> None:
        """Record the first stop of a run; later ones do not replace it."""
        with self.engine.begin() as conn:
            conn.execute(run_table.update().where(run_table.c.run_id == run_id,
                                                  run_table.c.stop_kind.is_(None))
                         .values(stop_kind=stop.kind.value, stop_reason=stop.reason))

    def run_state(self, run_id: str) -> RunSnapshot:
        """What a step needs to know before starting items, in one query."""
        t, r = item_table.c, run_table.c
        failed = (sa.select(sa.func.count(sa.distinct(t.item_key)))
                  .where(t.run_id == run_id, FAILING_ROW)
                  .scalar_subquery())
        # Spend counts every execution in the partition, whichever run paid for it, so a
        # resumed batch does not get its budget afresh.
        paid = (t.batch == r.batch, t.partition == r.partition, t.reused_from.is_(None))
        cost = sa.select(sa.func.coalesce(sa.func.sum(t.cost), 0.0)).where(*paid)
        tokens = sa.select(sa.func.coalesce(sa.func.sum(t.tokens), 0)).where(*paid)
        query = sa.select(r.stop_kind, r.stop_reason, failed, cost.scalar_subquery(),
                          tokens.scalar_subquery()).where(r.run_id == run_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return RunSnapshot()
        stop = StopRequest(StopKind(row[0]), row[1] or row[0]) if row[0] else None
        return RunSnapshot(True, stop, int(row[2]), float(row[3]), int(row[4]))

    def stop_request(self, run_id: str) -> StopRequest | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(run_table.c.stop_kind, run_table.c.stop_reason)
                               .where(run_table.c.run_id == run_id)).first()
        return StopRequest(StopKind(row[0]), row[1] or row[0]) if row and row[0] else None

    def set_status(self, run_id: str, status: RunState,
                   only_if: Sequence[RunState] = ()) -> None:
        """Set a run's state; with `only_if`, only when it is currently one of those."""
        query = run_table.update().where(run_table.c.run_id == run_id)
        if only_if:
            query = query.where(run_table.c.status.in_([s.value for s in only_if]))
        with self.engine.begin() as conn:
            conn.execute(query.values(status=status.value))

    def finish_run(self, run_id: str, status: RunState, summary: Mapping[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(run_table.update().where(run_table.c.run_id == run_id).values(
                status=status.value, finished_at=time.time(), summary=to_json(summary)))

    def save_summary(self, run_id: str, summary: Mapping[str, Any]) -> None:
        """Keep the summary while the run goes on (after steps, results): not yet its end."""
        with self.engine.begin() as conn:
            conn.execute(run_table.update().where(run_table.c.run_id == run_id)
                         .values(summary=to_json(summary)))

    # The partition lease: one live run per (batch, partition), whichever door launched it.

    def lease_holder(self, batch: str, partition: str) -> LeaseHolder | None:
        t = lease_table.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.run_id, t.host, t.pid, t.acquired_at, t.heartbeat_at)
                               .where(t.batch == batch, t.partition == partition)).first()
        return LeaseHolder(*row) if row else None

    def acquire_lease(self, batch: str, partition: str, run_id: str, host: str, pid: int,
                      is_live: Callable[[LeaseHolder], bool]) -> LeaseTake:
        """Take the partition for `run_id`, unless a live run holds it (`held_by`). A holder
        that `is_live` says is gone is replaced by compare-and-swap, so two runs taking over
        the same dead lease cannot both win; the one replaced is returned (`replaced`), so
        that what it left behind can be cleaned up."""
        t = lease_table.c
        now = time.time()
        mine = {"run_id": run_id, "host": host, "pid": pid, "heartbeat_at": now}
        for _ in range(5):
            insert = self._insert(lease_table).values(
                batch=batch, partition=partition, acquired_at=now, **mine
            ).on_conflict_do_nothing(index_elements=["batch", "partition"])
            with self.engine.begin() as conn:
                if conn.execute(insert).rowcount:
                    return LeaseTake()
            holder = self.lease_holder(batch, partition)
            if holder is None:
                continue
            ours = holder.run_id == run_id  # a later step (or process) of the same run
            if not ours and is_live(holder):
                return LeaseTake(held_by=holder)
            values = {"host": host, "pid": pid, "heartbeat_at": now}
            if not ours:
                values.update(run_id=run_id, acquired_at=now)
            swap = lease_table.update().where(
                t.batch == batch, t.partition == partition, t.run_id == holder.run_id,
                t.heartbeat_at == holder.heartbeat_at).values(**values)
            with self.engine.begin() as conn:
                if conn.execute(swap).rowcount:
                    return LeaseTake(replaced=None if ours else holder)
        return LeaseTake(held_by=self.lease_holder(batch, partition))

    # Child processes items started (the shell task), so that a resume can end those a
    # killed run left behind before it runs their items again.

    def register_process(self, run_id: str, phase: str, item_key: str, host: str, pgid: int,
                         started_at: float) -> int:
        with self.engine.begin() as conn:
            key = conn.execute(process_table.insert().values(
                run_id=run_id, phase=phase, item_key=storable(item_key), host=host, pgid=pgid,
                started_at=started_at)).inserted_primary_key
        assert key is not None
        return int(key[0])

    def unregister_process(self, process_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(process_table.delete().where(process_table.c.id == process_id))

    def processes(self, run_id: str) -> list[ProcessRecord]:
        t = process_table.c
        with self.engine.connect() as conn:
            return [ProcessRecord(*row) for row in conn.execute(
                sa.select(t.id, t.run_id, t.phase, t.item_key, t.host, t.pgid, t.started_at)
                .where(t.run_id == run_id))]

    def heartbeat(self, batch: str, partition: str, run_id: str) -> None:
        t = lease_table.c
        with self.engine.begin() as conn:
            conn.execute(lease_table.update().where(
                t.batch == batch, t.partition == partition, t.run_id == run_id)
                .values(heartbeat_at=time.time()))

    def release_lease(self, batch: str, partition: str, run_id: str) -> None:
        t = lease_table.c
        with self.engine.begin() as conn:
            conn.execute(lease_table.delete().where(
                t.batch == batch, t.partition == partition, t.run_id == run_id))

    def counts(self, run_id: str) -> dict[tuple[str, str], int]:
        """(phase, status) -> number of items, for one run."""
        t = item_table.c
        query = (sa.select(t.phase, t.status, sa.func.count())
                 .where(t.run_id == run_id).group_by(t.phase, t.status))
        with self.engine.connect() as conn:
            return {(phase, status): n for phase, status, n in conn.execute(query)}

    def row_groups(self, run_id: str) -> list[RowGroup]:
        """The run's rows counted by phase, status, skip cause and carried-over, with their
        cost, tokens, durations and times: read from the tally the writers keep (a few rows,
        whatever the run's size). Summaries and live progress both read this."""
        t = tally_table.c
        rows = sa.func.sum(t.row_count)
        query = (sa.select(t.phase, t.status, t.skip_cause, t.reused, rows, sa.func.sum(t.cost),
                           sa.func.sum(t.tokens), sa.func.sum(t.work_s),
                           sa.func.min(t.first_started), sa.func.max(t.last_finished))
                 .where(t.run_id == run_id)
                 .group_by(t.phase, t.status, t.skip_cause, t.reused)
                 .having(rows > 0)  # every row of the group was rewritten into another
                 .order_by(t.phase, t.status, t.skip_cause, t.reused))
        with self.engine.connect() as conn:
            return [RowGroup(phase, status, cause or None, bool(reused), int(n), float(cost),
                             int(tokens), float(work), first, last)
                    for phase, status, cause, reused, n, cost, tokens, work, first, last
                    in conn.execute(query)]

    def stopping_rows(self, run_id: str, phases: Sequence[str]) -> list[tuple[str, str, str]]:
        """(item_key, phase, status) of the rows in `phases` that stopped their item."""
        t = item_table.c
        query = sa.select(t.item_key, t.phase, t.status).where(
            t.run_id == run_id, t.phase.in_(list(phases)), stops_row())
        with self.engine.connect() as conn:
            return [(key, phase, status) for key, phase, status in conn.execute(query)]

    def passing_statuses(self, run_id: str, phase: str, keys: Iterable[str]) -> Counter[str]:
        """Status -> rows of `keys` in `phase` after which the item went on."""
        t, found = item_table.c, Counter[str]()
        wanted = list(keys)
        for start in range(0, len(wanted), 500):  # stay under SQLite's bound-parameter limit
            query = (sa.select(t.status, sa.func.count())
                     .where(t.run_id == run_id, t.phase == phase, passes_row(),
                            t.item_key.in_(wanted[start:start + 500]))
                     .group_by(t.status))
            with self.engine.connect() as conn:
                found.update({status: int(n) for status, n in conn.execute(query)})
        return found

    def failure_rows(self, run_id: str, limit: int) -> list[dict[str, Any]]:
        """The run's first `limit` failed, invalid or rejected rows, in source order."""
        t = item_table.c
        query = (sa.select(t.item_key, t.phase, t.status, t.attempts, t.error)
                 .where(t.run_id == run_id,
                        FAILING_ROW)
                 .order_by(t.seq, t.id).limit(limit))
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def carry_invalid(self, run_id: str, lineage: Iterable[str]) -> int:
        """Copy the invalid source rows of the nearest earlier run in the lineage, when this
        run's fan-out did not run again (a re-execution from failure): they are facts about
        the source, and each run's rows are a complete picture of its partition."""
        t = item_table
        with self.engine.connect() as conn:
            own = conn.execute(sa.select(sa.func.count()).select_from(t).where(
                t.c.run_id == run_id, t.c.phase == SOURCE_PHASE)).scalar()
        if own:
            return 0
        columns = [c for c in ITEM_COLUMNS if c not in ("run_id", "reused_from")]
        for earlier in lineage:
            select = sa.select(*[t.c[c] for c in columns], sa.literal(run_id),
                               sa.func.coalesce(t.c.reused_from, t.c.run_id)).where(
                t.c.run_id == earlier, t.c.phase == SOURCE_PHASE)
            with self.engine.begin() as conn:
                copied = conn.execute(t.insert().from_select(
                    [*columns, "run_id", "reused_from"], select)).rowcount or 0
            if copied:
                return copied
        return 0

    def recall(self, key: str) -> Any | None:
        """The effect journal (TaskContext.recall/remember): side effects done per item."""
        with self.engine.connect() as conn:
            value = conn.execute(sa.select(effect_table.c.value)
                                 .where(effect_table.c.idempotency_key == key)).scalar()
        return json.loads(value) if value is not None else None

    def remember(self, key: str, value: Any) -> None:
        stmt = self._insert(effect_table).values(
            idempotency_key=key, value=to_json(value), created_at=time.time())
        stmt = stmt.on_conflict_do_update(index_elements=["idempotency_key"],
                                          set_={"value": stmt.excluded.value})
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def rows(self, run_id: str, status: str | None = None, phase: str | None = None,
             keys: Sequence[str] | None = None,
             columns: Sequence[str] = ITEM_COLUMNS) -> pd.DataFrame:
        """A run's rows in source order, of `columns` only: LIGHT_COLUMNS leaves out the JSON
        ones, and fewer still cost less (a million rows of every light column take 1.6 GB)."""
        t = item_table.c
        wanted = [item_table.c[name] for name in columns]
        query = sa.select(*wanted).where(t.run_id == run_id).order_by(t.seq, t.id)
        if status:
            query = query.where(t.status == status)
        if phase:
            query = query.where(t.phase == phase)
        if keys is not None:
            query = query.where(t.item_key.in_(list(keys)))
        return self._frame(query, wanted)

    def shown_rows(self, run_id: str, columns: Sequence[str], failing_per_phase: int,
                   others: int) -> pd.DataFrame:
        """What a summary of the run shows of its rows, however many it has, in source order:
        the first `failing_per_phase` failed, invalid or rejected rows of each phase, and the
        first `others` of the rest. (The first N failing rows of the run are among them.)"""
        t = item_table.c
        rank = sa.func.row_number().over(partition_by=t.phase, order_by=(t.seq, t.id))
        ranked = (sa.select(t.id, rank.label("rank"))
                  .where(t.run_id == run_id, FAILING_ROW).subquery())
        first_failing = sa.select(ranked.c.id).where(ranked.c.rank <= failing_per_phase)
        first_others = (sa.select(t.id).where(t.run_id == run_id, sa.not_(FAILING_ROW))
                        .order_by(t.seq, t.id).limit(others))
        wanted = [item_table.c[name] for name in columns]
        query = (sa.select(*wanted)
                 .where(sa.or_(t.id.in_(first_failing), t.id.in_(first_others)))
                 .order_by(t.seq, t.id))
        return self._frame(query, wanted)

    def executed_timings(self, run_id: str) -> pd.DataFrame:
        """Phase, times and duration of every item-phase the run executed itself (not
        carried over, not rejected by the source): what its charts bin, and no more."""
        t = item_table.c
        wanted = [t.phase, t.started_at, t.finished_at, t.duration_s, t.reused_from]
        query = (sa.select(*wanted)
                 .where(t.run_id == run_id, t.phase != SOURCE_PHASE,
                        t.reused_from.is_(None), t.finished_at.is_not(None))
                 .order_by(t.seq, t.id))
        return self._frame(query, wanted)

    def _frame(self, query: sa.Select[Any], wanted: Sequence[sa.ColumnElement[Any]]
               ) -> pd.DataFrame:
        import pandas as pd

        names = [c.name for c in wanted]
        with self.engine.connect() as conn:
            # In parts: a million rows as one list of row objects weighs more than the frame
            # made of them. Each part is built column by column: faster than from_records
            # over row objects (bench/results_read.py: 200,000 rows 1.31 s against 2.33 s).
            result = conn.execution_options(stream_results=True).execute(query)
            parts = [pd.DataFrame(dict(zip(names, zip(*part, strict=True), strict=True)))
                     for part in result.partitions(50_000)]
        frame = (pd.concat(parts, ignore_index=True) if len(parts) > 1 else
                 parts[0] if parts else pd.DataFrame(columns=names))
        # Text columns keep None for "no value" (pandas would show NaN: "nan" in tables).
        for column in wanted:
            if isinstance(column.type, sa.String | sa.Text):
                frame[column.name] = frame[column.name].astype(object).where(
                    frame[column.name].notna(), None)
        return frame

    def partition_runs(self, batch: str | None = None) -> list[PartitionRuns]:
        """Each partition that has runs (of `batch`, or of all batches), with its latest run."""
        r = run_table.c
        grouped = (sa.select(r.batch, r.partition, sa.func.count().label("runs"),
                             sa.func.min(r.started_at).label("first"),
                             sa.func.max(r.started_at).label("last"))
                   .group_by(r.batch, r.partition))
        if batch:
            grouped = grouped.where(r.batch == batch)
        agg = grouped.subquery()
        query = sa.select(run_table, agg.c.runs, agg.c.first).join(agg, sa.and_(
            r.batch == agg.c.batch, r.partition == agg.c.partition, r.started_at == agg.c.last))
        found: dict[tuple[str, str], PartitionRuns] = {}
        with self.engine.connect() as conn:
            for row in conn.execute(query).mappings():
                latest = {c.name: row[c.name] for c in run_table.columns}
                latest["phases"] = json.loads(latest["phases"])
                latest["summary"] = json.loads(latest["summary"]) if latest["summary"] else None
                found[(row["batch"], row["partition"])] = PartitionRuns(
                    row["batch"], row["partition"], int(row["runs"]), float(row["first"]),
                    latest)
        return list(found.values())

    def item_page(self, run_id: str, phases: Sequence[str], statuses: Sequence[str] = (),
                  phase: str | None = None, offset: int = 0, limit: int = 100) -> ItemPage:
        """Items of a run in source order, `limit` from `offset`, filtered by final status
        (or, with `phase`, by their status in that phase): each item's rows come along."""
        t = item_table.c
        where = [t.run_id == run_id] + ([t.phase == phase] if phase else [])
        final = sa.func.min(t.status) if phase else _final_status(phases)
        grouped = (sa.select(t.item_key, final.label("final"), sa.func.min(t.seq).label("seq"),
                             sa.func.min(t.id).label("first_id"))
                   .where(*where).group_by(t.item_key))
        if statuses:
            grouped = grouped.having(final.in_(list(statuses)))
        page = grouped.subquery()
        with self.engine.connect() as conn:
            total = int(conn.execute(sa.select(sa.func.count()).select_from(page)).scalar()
                        or 0)
            items = [(key, status) for key, status in conn.execute(
                sa.select(page.c.item_key, page.c.final)
                .order_by(page.c.seq, page.c.first_id).offset(offset).limit(limit))]
        return ItemPage(total, items, self.rows(run_id, phase=phase,
                                                keys=[key for key, _ in items]))

    def delete_partition(self, batch: str, partition: str) -> DeletedRows:
        """Every ledger row of a partition: its runs, items, lease, child processes and effect
        journal entries, in one transaction."""
        r, t, e = run_table.c, item_table.c, effect_table.c
        prefix = f"{batch}/{partition}/"  # TaskContext.idempotency_key
        with self.engine.begin() as conn:
            run_ids = [row[0] for row in conn.execute(
                sa.select(r.run_id).where(r.batch == batch, r.partition == partition))]
            counted = sa.select(t.run_id).where(t.batch == batch, t.partition == partition)
            # Rows leave only with their whole run: so do the run's counts (no trigger does).
            conn.execute(tally_table.delete().where(
                tally_table.c.run_id.in_(counted.distinct())))
            items = conn.execute(item_table.delete().where(
                t.batch == batch, t.partition == partition)).rowcount or 0
            if run_ids:
                conn.execute(process_table.delete().where(process_table.c.run_id.in_(run_ids)))
            conn.execute(run_table.delete().where(r.batch == batch, r.partition == partition))
            conn.execute(lease_table.delete().where(lease_table.c.batch == batch,
                                                    lease_table.c.partition == partition))
            effects = conn.execute(effect_table.delete().where(
                sa.func.substr(e.idempotency_key, 1, len(prefix)) == prefix)).rowcount or 0
        return DeletedRows(run_ids, int(items), int(effects))

    def count_rows(self, run_id: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(item_table)
                                    .where(item_table.c.run_id == run_id)).scalar() or 0)

    # Live changes to a running batch (batch-defs set), read by its engine every second.

    def run_control(self, run_id: str) -> tuple[StopRequest | None, dict[str, Any]]:
        """The run's stop request and its live settings, in one query."""
        r = run_table.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(r.stop_kind, r.stop_reason, r.settings)
                               .where(r.run_id == run_id)).first()
        if row is None:
            return None, {}
        stop = StopRequest(StopKind(row[0]), row[1] or row[0]) if row[0] else None
        return stop, json.loads(row[2]) if row[2] else {}

    def change_settings(self, run_id: str, values: Mapping[str, Any], by: str) -> dict[str, Any]:
        """Merge `values` into the run's live settings (compare-and-swap, so two changes at
        once both land); returns the settings now in force. KeyError if there is no run."""
        r = run_table.c
        for _ in range(100):
            with self.engine.connect() as conn:
                row = conn.execute(sa.select(r.settings).where(r.run_id == run_id)).first()
            if row is None:
                raise KeyError(run_id)
            settings = json.loads(row[0]) if row[0] else {}
            now = dict(settings.get("values", {}), **values)
            history = [*settings.get("history", []),
                       {"at": time.time(), "by": by, "values": dict(values)}][-50:]
            new = to_json({"values": now, "history": history})
            same = r.settings.is_(None) if row[0] is None else r.settings == row[0]
            with self.engine.begin() as conn:
                if conn.execute(run_table.update().where(r.run_id == run_id, same)
                                .values(settings=new)).rowcount:
                    return now
        raise LedgerWriteError(f"could not change the settings of run {run_id}: too busy")

    # Shared rate limits: token buckets every process and run sees (batch_defs/limits.py).

    def _db_now(self) -> Any:
        """The database's clock, so that processes on hosts whose clocks differ agree."""
        if self.engine.dialect.name == "postgresql":
            return sa.func.extract("epoch", sa.func.clock_timestamp())
        return (sa.func.julianday("now") - 2440587.5) * 86400.0

    def prepare_limit(self, name: str, rate_per_s: float, capacity: float,
                      state: Mapping[str, Any]) -> None:
        """Create the bucket, full, unless it exists; its capacity is the latest declared."""
        stmt = self._insert(limit_table).values(
            name=name, tokens=capacity, rate_per_s=rate_per_s, capacity=capacity,
            updated_at=self._db_now(), state=to_json(dict(state)))
        stmt = stmt.on_conflict_do_update(index_elements=["name"],
                                          set_={"capacity": stmt.excluded.capacity})
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def limit(self, name: str) -> LimitRow | None:
        found = self._limit_row(name)
        return found[0] if found else None

    def _limit_row(self, name: str) -> tuple[LimitRow, str | None] | None:
        """The row, and its state as stored (the compare-and-swap's expected value)."""
        t = limit_table.c
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.name, t.tokens, t.rate_per_s, t.capacity,
                                         t.updated_at, t.state).where(t.name == name)).first()
        if row is None:
            return None
        return LimitRow(row[0], row[1], row[2], row[3], row[4],
                        json.loads(row[5]) if row[5] else {}), row[5]

    def reserve_token(self, name: str) -> tuple[float, float]:
        """Take one token in one atomic UPDATE: (tokens left, rate). Negative tokens mean the
        call was promised the start -tokens/rate seconds from now."""
        t = limit_table.c
        now = self._db_now()
        later = now > t.updated_at
        refill = t.tokens + sa.case((later, now - t.updated_at), else_=0.0) * t.rate_per_s
        stmt = (limit_table.update().where(t.name == name)
                .values(tokens=sa.case((refill > t.capacity, t.capacity), else_=refill) - 1.0,
                        updated_at=sa.case((later, now), else_=t.updated_at))
                .returning(t.tokens, t.rate_per_s))
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            raise KeyError(name)
        return float(row[0]), float(row[1])

    def recover_limit(self, name: str, increase: float, ceiling: float) -> float | None:
        """Raise a backed-off rate by `increase`, never above `ceiling`; the rate now (None
        when it was at the ceiling already)."""
        t = limit_table.c
        raised = t.rate_per_s + increase
        stmt = (limit_table.update().where(t.name == name, t.rate_per_s < ceiling)
                .values(rate_per_s=sa.case((raised > ceiling, ceiling), else_=raised))
                .returning(t.rate_per_s))
        with self.engine.begin() as conn:
            row = conn.execute(stmt).first()
        return float(row[0]) if row else None

    def adapt_limit(self, name: str,
                    change: Callable[[LimitRow], tuple[float, dict[str, Any]] | None]
                    ) -> LimitRow | None:
        """Apply `change` (row -> new rate and state, or None for no change) by compare-and-
        swap on the stored state; the row as it is afterwards (None: no such limit)."""
        t = limit_table.c
        for _ in range(500):
            found = self._limit_row(name)
            if found is None:
                return None
            row, stored = found
            wanted = change(row)
            if wanted is None:
                return row
            rate, state = wanted
            same = t.state.is_(None) if stored is None else t.state == stored
            with self.engine.begin() as conn:
                done = conn.execute(limit_table.update().where(t.name == name, same)
                                    .values(rate_per_s=rate, state=to_json(state))).rowcount
            if done:
                return LimitRow(name, row.tokens, rate, row.capacity, row.updated_at, state)
        raise LedgerWriteError(f"could not update limit {name!r}: too busy")

    def forget_limits(self, prefix: str, idle_s: float) -> None:
        """Delete buckets named `prefix...` unused for `idle_s` (a finished run's own)."""
        t = limit_table.c
        with self.engine.begin() as conn:
            conn.execute(limit_table.delete().where(t.name.startswith(prefix),
                                                    t.updated_at < time.time() - idle_s))

    # Compensation (batch-defs rollback): what to undo, and what was undone.

    def undo_targets(self, run_id: str, phase: str) -> list[UndoTarget]:
        """Items whose `phase` succeeded in the run and whose effect is not undone yet, last
        first."""
        t, undo = item_table.c, item_table.alias("undo")
        executed_by = sa.func.coalesce(t.reused_from, t.run_id)
        undone = sa.exists().where(
            undo.c.run_id == sa.literal(UNDO_RUN_PREFIX) + executed_by,
            undo.c.phase == undo_phase(phase), undo.c.item_key == t.item_key,
            undo.c.status == ItemStatus.SUCCEEDED.value)
        query = (sa.select(t.item_key, t.seq, executed_by, t.output)
                 .where(t.run_id == run_id, t.phase == phase,
                        t.status == ItemStatus.SUCCEEDED.value, ~undone)
                 .order_by(t.seq.desc(), t.id.desc()))
        with self.engine.connect() as conn:
            return [UndoTarget(key, seq, by, json.loads(output) if output else None)
                    for key, seq, by, output in conn.execute(query)]

    def undo_counts(self, run_id: str, phases: Sequence[str]) -> dict[str, dict[str, int]]:
        """phase -> undo status -> items, over the effects the run made or reused."""
        t, undo = item_table.c, item_table.alias("undo")
        executed_by = sa.func.coalesce(t.reused_from, t.run_id)
        query = (sa.select(t.phase, undo.c.status, sa.func.count())
                 .select_from(item_table.join(undo, sa.and_(
                     undo.c.run_id == sa.literal(UNDO_RUN_PREFIX) + executed_by,
                     undo.c.phase == t.phase + sa.literal(UNDO_PHASE_SUFFIX),
                     undo.c.item_key == t.item_key)))
                 .where(t.run_id == run_id, t.phase.in_(list(phases)),
                        t.status == ItemStatus.SUCCEEDED.value)
                 .group_by(t.phase, undo.c.status))
        counts: dict[str, dict[str, int]] = {}
        with self.engine.connect() as conn:
            for phase, status, n in conn.execute(query):
                counts.setdefault(phase, {})[status] = int(n)
        return counts


def _final_status(phases: Sequence[str]) -> Any:
    """An item's status over its rows: the status of the row that stopped it (a failure, or a
    skip other than a `when:` condition's), else its last phase's; `pending` while unfinished."""
    t = item_table.c

    def rows_where(*condition: Any) -> Any:
        return sa.func.sum(sa.case((sa.and_(*condition), 1), else_=0))

    last = phases[-1] if phases else SOURCE_PHASE
    return sa.case(
        *[(rows_where(t.status == s.value) > 0, s.value) for s in FAILURE_STATUSES],
        (rows_where(stopping_skip()) > 0, ItemStatus.SKIPPED.value),
        (rows_where(t.phase == last, t.status == ItemStatus.SUCCEEDED.value) > 0,
         ItemStatus.SUCCEEDED.value),
        (rows_where(t.phase == last) > 0, ItemStatus.SKIPPED.value),
        else_="pending")


TEXT_COLUMNS = ("batch", "partition", "run_id", "phase", "item_key", "status", "error",
                "reused_from", "worker", "skip_cause", "branch")
STORED_TEXT_COLUMNS = (*TEXT_COLUMNS, *HEAVY_COLUMNS)  # what _row makes storable


def storable(text: str) -> str:
    """Text every database takes: NUL (which Postgres refuses) spelled out, and characters
    UTF-8 cannot encode (lone surrogates) replaced."""
    if text.isascii() and "\x00" not in text:
        # Nearly every value: ASCII holds no surrogate. str() makes a StrEnum plain text
        # (as the encoding below does) and returns plain text itself, uncopied.
        return str(text)
    text = text.replace("\x00", "\\0")
    return text.encode("utf-8", "replace").decode("utf-8")


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    from batch_defs.secrets import mask

    out = {c: row.get(c) for c in ITEM_COLUMNS}
    for column in STORED_TEXT_COLUMNS:
        value = out[column]
        if value is None:
            continue
        if column in HEAVY_COLUMNS and not isinstance(value, str):
            value = to_json(value)
        if isinstance(value, str):
            out[column] = storable(value)
    # Servers echo credentials back in errors: the stored text never holds a known secret.
    out["error"] = mask(out["error"])
    out["attempt_log"] = mask(out["attempt_log"])
    out["attempts"] = out["attempts"] or 0
    out["cost"] = out["cost"] or 0.0
    out["tokens"] = out["tokens"] or 0
    return out


def _unstorable(row: dict[str, Any], problem: str) -> dict[str, Any]:
    """A row the database refused, reduced to a failure that names the reason."""
    return {**row, "status": ItemStatus.FAILED.value, "input": None, "output": None,
            "attempt_log": None, "skip_cause": None,
            "error": storable(f"the ledger could not store this outcome: {problem}")}


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _create_engine(url: str) -> sa.Engine:
    engine = _connect(url)

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _count(*_args: Any) -> None:
        _queries[url] += 1

    from batch_defs.schema import upgrade

    upgrade(engine)
    return engine


def _connect(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers (progress, CLI) work while a run writes.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
