"""Executes one chunk of one phase against the ledger: skip what is done, run the rest, record."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch_defs.items import Chunk, InvalidRow, Item, ItemSpool, check_records
from batch_defs.ledger import FAILURE_STATUSES, SOURCE_PHASE, Ledger
from batch_defs.runner import ItemOutcome, ItemRunner, run_items
from batch_defs.sources import read_source
from batch_defs.spec import BatchSpec, PhaseSpec
from batch_defs.tasks import Handler, TaskContext

FLUSH_ROWS = 500  # rows per ledger write
FLUSH_SECONDS = 1.0  # ...or this often, so progress readers see recent work


@dataclass
class PhaseRun:
    """Where a chunk runs: batch, partition, run and phase, and what handlers may use."""

    spec: BatchSpec
    phase: PhaseSpec
    partition: str
    run_id: str
    base_dir: Path
    output_dir: Path
    resources: Mapping[str, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("batch_defs"))

    def row(self, item: Item, **values: Any) -> dict[str, Any]:
        return {"batch": self.spec.name, "partition": self.partition, "run_id": self.run_id,
                "phase": self.phase.name, "item_key": item.key, "seq": item.seq, **values}


@dataclass
class ChunkResult:
    outputs: list[Item]  # items for the next phase, in source order
    executed: int
    reused: int
    failed: int
    stop_reason: str | None


class LedgerSink:
    """Buffers outcomes into batched ledger writes and decides when the batch must stop."""

    def __init__(self, ledger: Ledger, run: PhaseRun, failures_before: int, tolerated: int,
                 on_flush: Callable[[], None] | None = None):
        self.ledger, self.run = ledger, run
        self.failures = failures_before
        self.tolerated = tolerated
        self.on_flush = on_flush
        self.fail_fast = run.spec.on_error(run.phase) == "fail_fast"
        self.buffer: list[dict[str, Any]] = []
        self.outcomes: list[ItemOutcome] = []
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()

    def judge(self, outcome: ItemOutcome) -> str | None:
        if outcome.status not in FAILURE_STATUSES:
            return None
        with self.lock:
            self.failures += 1
            if self.fail_fast and self.failures > self.tolerated:
                return (f"fail_fast: item {outcome.item.key!r} failed in phase "
                        f"{self.run.phase.name!r}: {outcome.error}")
        return None

    def add(self, outcome: ItemOutcome) -> None:
        self.outcomes.append(outcome)
        # The input of a failed or rejected item is its dead-letter payload: kept for fixing.
        kept_input = outcome.item.data if outcome.status in FAILURE_STATUSES else None
        self.buffer.append(self.run.row(
            outcome.item, status=outcome.status, attempts=outcome.attempts, input=kept_input,
            output=outcome.output, error=outcome.error, attempt_log=outcome.attempt_log or None,
            started_at=outcome.started_at, finished_at=outcome.finished_at,
            duration_s=outcome.duration_s, cost=outcome.cost, tokens=outcome.tokens,
        ))

    def tick(self) -> str | None:
        if len(self.buffer) >= FLUSH_ROWS or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()
            # Another chunk (maybe in another process) may have stopped the batch.
            return self.ledger.stop_reason(self.run.run_id)
        return None

    def flush(self) -> None:
        self.ledger.record(self.buffer)
        self.buffer = []
        self.last_flush = time.monotonic()
        if self.on_flush:
            self.on_flush()


def reuse_done(ledger: Ledger, run: PhaseRun, chunk: Chunk) -> tuple[list[Item], list[Item]]:
    """(items already succeeded in this partition with their stored outputs, items to run)."""
    done = ledger.succeeded(run.spec.name, run.partition, run.phase.name,
                            [item.key for item in chunk.items])
    reused, todo, rows = [], [], []
    for item in chunk.items:
        if item.key in done:
            from_run, output = done[item.key]
            reused.append(Item(item.key, item.seq, output or item.data))
            if from_run != run.run_id:
                rows.append(run.row(item, status="succeeded", output=output,
                                    reused_from=from_run))
        else:
            todo.append(item)
    ledger.record(rows)
    return reused, todo


def execute_chunk(ledger: Ledger, run: PhaseRun, chunk: Chunk, handler: Handler,
                  failures_before: int = 0,
                  on_flush: Callable[[], None] | None = None) -> ChunkResult:
    spec, phase = run.spec, run.phase
    reused, todo = reuse_done(ledger, run, chunk)

    def call(item: Item, attempt: int) -> Any:
        ctx = TaskContext(params=phase.params, batch=spec.name, partition=run.partition,
                          run_id=run.run_id, phase=phase.name, key=item.key, attempt=attempt,
                          base_dir=run.base_dir, output_dir=run.output_dir,
                          resources=run.resources, log=run.log, journal=ledger)
        return handler(dict(item.data), ctx)

    stop = threading.Event()
    runner = ItemRunner(call, phase.name, phase.retry, phase.timeout_s, phase.merge_output, stop)
    sink = LedgerSink(ledger, run, failures_before,
                      spec.options.tolerated_count(chunk.tolerance_base), on_flush)
    reason = run_items(todo, runner, spec.options.slots, sink) if todo else None
    sink.flush()
    succeeded = [Item(o.item.key, o.item.seq, o.output or {})
                 for o in sink.outcomes if o.status == "succeeded"]
    outputs = sorted(reused + succeeded, key=lambda item: item.seq)
    failed = sum(o.status in FAILURE_STATUSES for o in sink.outcomes)
    return ChunkResult(outputs, len(sink.outcomes), len(reused), failed, reason)


def retry_unfinished(ledger: Ledger, runs: Sequence[PhaseRun], handlers: Sequence[Handler],
                     unfinished: Sequence[Mapping[str, Any]], total_items: int,
                     failures_before: int = 0) -> ChunkResult | None:
    """Run items that failed in earlier runs from the phase they failed in to the last one.

    Their stored input is what that phase received, so earlier phases are not repeated.
    """
    if not unfinished:
        return None
    by_phase: dict[str, list[Item]] = {}
    for row in unfinished:
        data = json.loads(row["input"]) if row["input"] else {}
        by_phase.setdefault(row["phase"], []).append(Item(row["item_key"], row["seq"], data))
    carried: list[Item] = []
    executed = failed = 0
    result = None
    for run, handler in zip(runs, handlers, strict=True):
        items = sorted(carried + by_phase.get(run.phase.name, []), key=lambda i: i.seq)
        if not items:
            continue
        result = execute_chunk(ledger, run, Chunk(-1, items, total_items), handler,
                               failures_before=failures_before + failed)
        executed += result.executed
        failed += result.failed
        if result.stop_reason:
            break
        carried = result.outputs
    assert result is not None
    return ChunkResult(carried, executed, 0, failed, result.stop_reason)


@dataclass
class SourceRead:
    spool: ItemSpool
    invalid: int = 0
    first_invalid: InvalidRow | None = None


def spool_source(ledger: Ledger, spec: BatchSpec, base_dir: Path, partition: str, run_id: str,
                 spool_path: Path) -> SourceRead:
    """Read, key and validate the source in one streaming pass: valid items to the spool,
    invalid ones to the ledger in batches."""
    read = SourceRead(ItemSpool(spool_path))
    pending: list[dict[str, Any]] = []
    records = read_source(spec.source, base_dir)
    for entry in check_records(records, spec.source.key, spec.source.schema_,
                               spec.options.max_items):
        if isinstance(entry, Item):
            read.spool.add(entry)
            continue
        read.invalid += 1
        read.first_invalid = read.first_invalid or entry
        pending.append({"batch": spec.name, "partition": partition, "run_id": run_id,
                        "phase": SOURCE_PHASE, "status": "invalid", **entry.ledger_row()})
        if len(pending) >= FLUSH_ROWS:
            ledger.record(pending)
            pending = []
    ledger.record(pending)
    return read
