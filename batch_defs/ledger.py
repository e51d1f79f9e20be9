"""The item ledger: one row per (run, phase, item) with status, attempts, output, error and cost.

It is the checkpoint: a phase skips items already succeeded in the partition and reuses their
stored outputs. Writes are batched by the caller (`record` takes many rows in one statement).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

SOURCE_PHASE = "_source"  # rows for items rejected before any phase ran (status invalid)
STATUSES = ("succeeded", "failed", "skipped", "invalid", "rejected")
# Statuses that count against tolerated_failures (skipped is a handler's choice, not a failure).
FAILURE_STATUSES = ("failed", "invalid", "rejected")

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
    sa.UniqueConstraint("run_id", "phase", "item_key", name="uq_batch_item_run_phase_key"),
    sa.Index("ix_batch_item_partition", "batch", "partition", "phase", "item_key"),
    sa.Index("ix_batch_item_run_status", "run_id", "status"),
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
_UPDATED_ON_CONFLICT = [c for c in ITEM_COLUMNS if c not in ("run_id", "phase", "item_key")]


@dataclass(frozen=True)
class RunState:
    exists: bool = False  # the run has its batch_run row
    stop_reason: str | None = None
    failed_items: int = 0
    spent_cost: float = 0.0  # in the whole partition, across runs
    spent_tokens: int = 0


def stop_kind(reason: str | None) -> str | None:
    """fail_fast, paused, canceled or budget: the word before the reason's first colon."""
    return reason.split(":", 1)[0] if reason else None


def to_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str, separators=(",", ":"))


class Ledger:
    """Access to the ledger tables in one database; safe to share between threads."""

    _engines: dict[str, sa.Engine] = {}
    _lock = threading.Lock()

    def __init__(self, url: str):
        self.url = url
        self.engine = self._engine(url)

    @classmethod
    def _engine(cls, url: str) -> sa.Engine:
        # One engine (and connection pool) per URL and process: ops reuse connections.
        with cls._lock:
            if url not in cls._engines:
                cls._engines[url] = _create_engine(url)
            return cls._engines[url]

    @property
    def queries(self) -> int:
        """Statements sent to this database by this process so far (for benchmarks)."""
        return _queries[self.url]

    def _insert(self, table: sa.Table) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

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

    def record(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Upsert finished item rows in one statement (a step retry may write a row again)."""
        if not rows:
            return
        stmt = self._insert(item_table)
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "phase", "item_key"],
            set_={c: stmt.excluded[c] for c in _UPDATED_ON_CONFLICT},
        )
        with self.engine.begin() as conn:
            conn.execute(stmt, [_row(r) for r in rows])

    def succeeded(self, batch: str, partition: str, phase: str,
                  keys: Sequence[str]) -> dict[str, tuple[str, Any]]:
        """item key -> (run id, output) for keys already succeeded in this partition."""
        found: dict[str, tuple[str, Any]] = {}
        t = item_table.c
        for start in range(0, len(keys), 900):
            query = sa.select(t.item_key, t.run_id, t.reused_from, t.output).where(
                t.batch == batch, t.partition == partition, t.phase == phase,
                t.status == "succeeded", t.item_key.in_(keys[start:start + 900]),
            )
            with self.engine.connect() as conn:
                for key, run_id, reused_from, output in conn.execute(query):
                    found[key] = (reused_from or run_id, json.loads(output) if output else None)
        return found

    def run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(run_table).where(run_table.c.run_id == run_id)).first()
        if row is None:
            return None
        run = dict(row._mapping)
        run["phases"] = json.loads(run["phases"])
        run["summary"] = json.loads(run["summary"]) if run["summary"] else None
        return run

    def runs(self, batch: str | None = None) -> list[dict[str, Any]]:
        query = sa.select(run_table).order_by(run_table.c.started_at)
        if batch:
            query = query.where(run_table.c.batch == batch)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def request_stop(self, run_id: str, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(run_table.update().where(run_table.c.run_id == run_id,
                                                  run_table.c.stop_reason.is_(None))
                         .values(stop_reason=reason))

    def run_state(self, run_id: str) -> RunState:
        """What a step needs to know before starting items, in one query."""
        t, r = item_table.c, run_table.c
        failed = (sa.select(sa.func.count(sa.distinct(t.item_key)))
                  .where(t.run_id == run_id, t.status.in_(FAILURE_STATUSES))
                  .scalar_subquery())
        # Spend counts every execution in the partition, whichever run paid for it, so a
        # resumed batch does not get its budget afresh.
        paid = (t.batch == r.batch, t.partition == r.partition, t.reused_from.is_(None))
        cost = sa.select(sa.func.coalesce(sa.func.sum(t.cost), 0.0)).where(*paid)
        tokens = sa.select(sa.func.coalesce(sa.func.sum(t.tokens), 0)).where(*paid)
        query = sa.select(r.stop_reason, failed, cost.scalar_subquery(),
                          tokens.scalar_subquery()).where(r.run_id == run_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return RunState()
        return RunState(True, row[0], int(row[1]), float(row[2]), int(row[3]))

    def stop_reason(self, run_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(run_table.c.stop_reason)
                                .where(run_table.c.run_id == run_id)).scalar()

    def set_status(self, run_id: str, status: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(run_table.update().where(run_table.c.run_id == run_id)
                         .values(status=status))

    def finish_run(self, run_id: str, status: str, summary: Mapping[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(run_table.update().where(run_table.c.run_id == run_id).values(
                status=status, finished_at=time.time(), summary=to_json(summary)))

    def counts(self, run_id: str) -> dict[tuple[str, str], int]:
        """(phase, status) -> number of items, for one run."""
        t = item_table.c
        query = (sa.select(t.phase, t.status, sa.func.count())
                 .where(t.run_id == run_id).group_by(t.phase, t.status))
        with self.engine.connect() as conn:
            return {(phase, status): n for phase, status, n in conn.execute(query)}

    def failed_items(self, run_id: str) -> int:
        """Distinct items that failed, were invalid or rejected in any phase of the run."""
        t = item_table.c
        query = sa.select(sa.func.count(sa.distinct(t.item_key))).where(
            t.run_id == run_id, t.status.in_(FAILURE_STATUSES))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def carry_over(self, run_id: str, lineage: Iterable[str]) -> int:
        """Copy rows of earlier runs in the lineage that this run did not execute itself,
        except failures: those items are retried, not inherited.

        Re-execution from failure skips steps that succeeded before; copying their rows keeps
        each run's rows a complete picture of its partition.
        """
        copied = 0
        t = item_table
        for earlier in lineage:
            own = t.alias("own")
            exists_in_run = sa.select(own.c.id).where(
                own.c.run_id == run_id, own.c.phase == t.c.phase, own.c.item_key == t.c.item_key)
            columns = [c for c in ITEM_COLUMNS if c not in ("run_id", "reused_from")]
            select = sa.select(
                *[t.c[c] for c in columns], sa.literal(run_id),
                sa.func.coalesce(t.c.reused_from, t.c.run_id),
            ).where(t.c.run_id == earlier, t.c.status != "failed", ~sa.exists(exists_in_run))
            stmt = t.insert().from_select([*columns, "run_id", "reused_from"], select)
            with self.engine.begin() as conn:
                copied += conn.execute(stmt).rowcount or 0
        return copied

    def item_states(self, run_id: str) -> dict[str, dict[str, str]]:
        """item key -> {phase: status} for one run."""
        t = item_table.c
        states: dict[str, dict[str, str]] = {}
        query = sa.select(t.item_key, t.phase, t.status).where(t.run_id == run_id)
        with self.engine.connect() as conn:
            for key, phase, status in conn.execute(query):
                states.setdefault(key, {})[phase] = status
        return states

    def outputs(self, run_id: str, phase: str, keys: Sequence[str]) -> dict[str, Any]:
        """item key -> stored output of a phase, for items that succeeded in it."""
        t = item_table.c
        found: dict[str, Any] = {}
        for start in range(0, len(keys), 900):
            query = sa.select(t.item_key, t.output).where(
                t.run_id == run_id, t.phase == phase, t.status == "succeeded",
                t.item_key.in_(keys[start:start + 900]))
            with self.engine.connect() as conn:
                for key, output in conn.execute(query):
                    found[key] = json.loads(output) if output else {}
        return found

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
             light: bool = False) -> pd.DataFrame:
        """A run's rows in source order; `light` leaves out the JSON columns (input, output,
        attempt_log), which are most of the memory of a large run."""
        t = item_table.c
        columns = [c for c in item_table.columns if c.name != "id"
                   and not (light and c.name in HEAVY_COLUMNS)]
        query = sa.select(*columns).where(t.run_id == run_id).order_by(t.seq, t.id)
        if status:
            query = query.where(t.status == status)
        if phase:
            query = query.where(t.phase == phase)
        with self.engine.connect() as conn:
            return pd.DataFrame(conn.execute(query).mappings().all(),
                                columns=[c.name for c in columns])

    def count_rows(self, run_id: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(item_table)
                                    .where(item_table.c.run_id == run_id)).scalar() or 0)


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {c: row.get(c) for c in ITEM_COLUMNS}
    for column in ("input", "output", "attempt_log"):
        if out[column] is not None and not isinstance(out[column], str):
            out[column] = to_json(out[column])
    # Servers echo credentials back in errors: the stored text never holds a known secret.
    from batch_defs.secrets import mask

    out["error"] = mask(out["error"])
    out["attempt_log"] = mask(out["attempt_log"])
    out["attempts"] = out["attempts"] or 0
    out["cost"] = out["cost"] or 0.0
    out["tokens"] = out["tokens"] or 0
    return out


def _create_engine(url: str) -> sa.Engine:
    engine = _connect(url)

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _count(*_args: Any) -> None:
        _queries[url] += 1

    metadata.create_all(engine)
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
