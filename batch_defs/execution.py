"""Executes one chunk of one phase against the ledger: skip what is done, run the rest, record."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from batch_defs.items import (
    Chunk,
    InvalidRow,
    Item,
    ItemSpool,
    check_records,
    dependency_map,
)
from batch_defs.ledger import FAILURE_STATUSES, SOURCE_PHASE, Ledger, RunState
from batch_defs.runner import ItemOutcome, ItemRunner, run_items
from batch_defs.sources import read_source
from batch_defs.spec import BatchSpec, BudgetSpec, PhaseSpec
from batch_defs.tasks import Handler, TaskContext

HOST = socket.gethostname()
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
                "phase": self.phase.name, "item_key": item.key, "seq": item.seq,
                "worker": f"{HOST}:{os.getpid()}", **values}  # which process ran it


@dataclass
class ChunkResult:
    outputs: list[Item]  # items for the next phase, in source order
    executed: int
    reused: int
    failed: int
    stop_reason: str | None


class LedgerSink:
    """Buffers outcomes into batched ledger writes and decides when the batch must stop."""

    def __init__(self, ledger: Ledger, run: PhaseRun, state: RunState, tolerated: int,
                 on_flush: Callable[[], None] | None = None, hold: bool = False):
        self.ledger, self.run = ledger, run
        # Rows stay unwritten until flush() while the handler defers its writes to the
        # chunk's end: a crash must not leave items recorded whose rows were never written.
        self.hold = hold
        self.failures = state.failed_items
        self.cost, self.tokens = state.spent_cost, state.spent_tokens
        self.budget = run.spec.options.budget
        self.tolerated = tolerated
        self.on_flush = on_flush
        self.fail_fast = run.spec.on_error(run.phase) == "fail_fast"
        self.buffer: list[dict[str, Any]] = []
        self.outcomes: list[ItemOutcome] = []
        self.last_flush = time.monotonic()
        self.lock = threading.Lock()

    def judge(self, outcome: ItemOutcome) -> str | None:
        with self.lock:
            self.cost += outcome.cost
            self.tokens += outcome.tokens
            failed = self._failed(outcome) if outcome.status in FAILURE_STATUSES else None
            return failed or budget_exceeded(self.budget, self.cost, self.tokens)

    def _failed(self, outcome: ItemOutcome) -> str | None:
        self.failures += 1
        if self.fail_fast and self.failures > self.tolerated:
            return (f"fail_fast: item {outcome.item.key!r} failed in phase "
                    f"{self.run.phase.name!r}: {outcome.error}")
        return None

    def _row(self, outcome: ItemOutcome) -> dict[str, Any]:
        # The input of a failed or rejected item is its dead-letter payload: kept for fixing.
        kept_input = outcome.item.data if outcome.status in FAILURE_STATUSES else None
        return self.run.row(
            outcome.item, status=outcome.status, attempts=outcome.attempts, input=kept_input,
            output=outcome.output, error=outcome.error, attempt_log=outcome.attempt_log or None,
            started_at=outcome.started_at, finished_at=outcome.finished_at,
            duration_s=outcome.duration_s, cost=outcome.cost, tokens=outcome.tokens,
        )

    def add(self, outcome: ItemOutcome) -> None:
        self.outcomes.append(outcome)
        self.buffer.append(self._row(outcome))

    def settle(self, finish_chunk: Callable[[list[str]], Mapping[str, str]]) -> str | None:
        """Let the handler complete the writes it deferred (finish_chunk); items whose write
        failed become failed. Returns a fail-fast reason, as judge() does."""
        keys = [o.item.key for o in self.outcomes if o.status == "succeeded"]
        errors = finish_chunk(keys) if keys else {}
        reason = None
        for index, outcome in enumerate(self.outcomes):
            error = errors.get(outcome.item.key)
            if error is None or outcome.status != "succeeded":
                continue
            failed = replace(outcome, status="failed", output=None, error=error,
                             finished_at=time.time())
            self.outcomes[index] = failed
            # Ledger writes are upserts, but one statement must not hold a key twice.
            self.buffer = [row for row in self.buffer if row["item_key"] != failed.item.key]
            self.buffer.append(self._row(failed))
            with self.lock:
                reason = reason or self._failed(failed)
        return reason

    def tick(self) -> str | None:
        if len(self.buffer) >= FLUSH_ROWS or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            if self.hold:
                self.last_flush = time.monotonic()
            else:
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


def budget_exceeded(budget: BudgetSpec, cost: float, tokens: int) -> str | None:
    """The stop reason once the partition's spend reaches options.budget, else None."""
    if budget.max_cost is not None and cost >= budget.max_cost:
        return f"budget: spent {cost:.4f} of max_cost {budget.max_cost:g}"
    if budget.max_tokens is not None and tokens >= budget.max_tokens:
        return f"budget: used {tokens} tokens of max_tokens {budget.max_tokens}"
    return None


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
                  state: RunState | None = None,
                  on_flush: Callable[[], None] | None = None) -> ChunkResult:
    spec, phase = run.spec, run.phase
    state = state or RunState()
    reused, todo = reuse_done(ledger, run, chunk)
    over_budget = budget_exceeded(spec.options.budget, state.spent_cost, state.spent_tokens)
    if over_budget and todo:
        return ChunkResult(reused, 0, len(reused), 0, over_budget)

    def call(item: Item, attempt: int) -> Any:
        ctx = TaskContext(params=phase.params, batch=spec.name, partition=run.partition,
                          run_id=run.run_id, phase=phase.name, key=item.key, attempt=attempt,
                          base_dir=run.base_dir, output_dir=run.output_dir,
                          resources=run.resources, log=run.log, journal=ledger)
        return handler(dict(item.data), ctx)

    stop = threading.Event()
    runner = ItemRunner(call, phase.name, phase.retry, phase.timeout_s, phase.merge_output, stop)
    # A handler may defer its writes to the chunk's end (sql `transaction: chunk`).
    finish_chunk = getattr(handler, "finish_chunk", None)
    sink = LedgerSink(ledger, run, state, spec.options.tolerated_count(chunk.tolerance_base),
                      on_flush, hold=finish_chunk is not None)
    depends = dependency_map(todo, spec.options.depends_on_field)
    reason = None
    try:
        if todo:
            reason = run_items(todo, runner, spec.options.slots, sink, depends=depends,
                               satisfied=satisfied_dependencies(ledger, run, chunk, reused,
                                                                depends))
    finally:
        if finish_chunk is not None:
            reason = sink.settle(finish_chunk) or reason
        sink.flush()  # what finished is recorded even when the step crashes
    succeeded = [Item(o.item.key, o.item.seq, o.output or {})
                 for o in sink.outcomes if o.status == "succeeded"]
    outputs = sorted(reused + succeeded, key=lambda item: item.seq)
    failed = sum(o.status in FAILURE_STATUSES for o in sink.outcomes)
    return ChunkResult(outputs, len(sink.outcomes), len(reused), failed, reason)


def satisfied_dependencies(ledger: Ledger, run: PhaseRun, chunk: Chunk, reused: list[Item],
                           depends: Mapping[str, Sequence[str]]) -> set[str]:
    """Dependencies that already succeeded in this phase of the partition: reused items, and
    items outside the chunk (collect re-runs a subset) found in the ledger."""
    if not depends:
        return set()
    outside = {dep for deps in depends.values() for dep in deps} - {i.key for i in chunk.items}
    found = ledger.succeeded(run.spec.name, run.partition, run.phase.name,
                             sorted(outside)) if outside else {}
    return {item.key for item in reused} | set(found)


def next_phase(states: Mapping[str, str], phases: Sequence[str]) -> int | None:
    """Index of the phase an item must run next, or None when its outcome is final."""
    if any(status != "succeeded" for status in states.values()):
        return None  # failed, skipped or rejected in this run: final
    done = 0
    while done < len(phases) and states.get(phases[done]) == "succeeded":
        done += 1
    return None if done == len(phases) else done


def complete_run(ledger: Ledger, runs: Sequence[PhaseRun], handlers: Sequence[Handler],
                 manifest: Iterable[Item], total_items: int) -> ChunkResult | None:
    """Take every item of the batch that this run has not finished through its remaining
    phases: items that failed in an earlier run, and items in steps a re-execution left out.

    An item restarts at the first phase it has not succeeded in, with the stored output of the
    phase before as its input, so nothing already done is repeated.
    """
    run_id = runs[0].run_id
    phases = [run.phase.name for run in runs]
    states = ledger.item_states(run_id)
    # Items skipped in an earlier run because a dependency failed are carried over like
    # successes; that dependency is retried here, so they must get their chance again.
    skipped = ledger.rows(run_id, status="skipped")
    retried = skipped[skipped["reused_from"].notna()
                      & skipped["error"].fillna("").astype(str).str.startswith("dependency ")]
    for key, phase in zip(retried["item_key"], retried["phase"], strict=True):
        states.get(key, {}).pop(phase, None)
    waiting: dict[int, list[Item]] = {}
    for item in manifest:
        index = next_phase(states.get(item.key, {}), phases)
        if index is not None:
            waiting.setdefault(index, []).append(item)
    if not waiting:
        return None
    carried: list[Item] = []
    executed = failed = 0
    result = None
    for index, (run, handler) in enumerate(zip(runs, handlers, strict=True)):
        starting = waiting.get(index, [])
        if index and starting:
            inputs = ledger.outputs(run_id, phases[index - 1], [i.key for i in starting])
            starting = [Item(i.key, i.seq, inputs.get(i.key, i.data)) for i in starting]
        items = sorted(carried + starting, key=lambda i: i.seq)
        if not items:
            continue
        result = execute_chunk(ledger, run, Chunk(-1, items, total_items), handler,
                               ledger.run_state(run_id))
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
    dependencies: bool = False  # some item declares options.depends_on_field


def spool_source(ledger: Ledger, spec: BatchSpec, base_dir: Path, partition: str, run_id: str,
                 spool_path: Path) -> SourceRead:
    """Read, key and validate the source in one streaming pass: valid items to the spool,
    invalid ones to the ledger in batches."""
    read = SourceRead(ItemSpool(spool_path))
    pending: list[dict[str, Any]] = []
    records = read_source(spec.source, base_dir)
    depends_on = spec.options.depends_on_field
    for entry in check_records(records, spec.source.key, spec.source.schema_,
                               spec.options.max_items):
        if isinstance(entry, Item):
            read.spool.add(entry)
            if depends_on and entry.data.get(depends_on) not in (None, "", []):
                read.dependencies = True
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
