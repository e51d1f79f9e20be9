"""One pool of slots per run and process, shared by the run's steps, that works ahead.

Dagster's in-process executor runs one step at a time. A step that ran its chunk on slots of its
own left them idle while its last items finished and while Dagster moved on to the next step.
Here a step *demands* its chunk (phase P of chunk C) and waits; meanwhile free slots take the
next work: phase P+1 of items that just finished P, then items of the next chunks. When Dagster
reaches those steps, their items are done already. A step still means what it meant: every item
of its chunk has its outcome for its phase, durable in the ledger.

Group commit: a slot takes its next item only once its last outcome is durable, and one write
carries every outcome that arrived meanwhile. After a crash the only items that run again are
those that were in flight: at most `concurrency` of them.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from batch_defs.expressions import Expression, ExpressionError, item_variables
from batch_defs.items import (
    ChunkRef,
    Item,
    ItemSpool,
    dependency_map,
    item_dependencies,
    read_chunk,
)
from batch_defs.ledger import KnownOutcome, Ledger, LedgerWriteError, RunSnapshot, StopRequest
from batch_defs.limits import Bucket, Gate, LimitStore, open_store
from batch_defs.routing import Router
from batch_defs.runner import ItemOutcome, ItemRunner, NotStarted, StepCrashError, describe
from batch_defs.secrets import mask
from batch_defs.settings import LiveSettings
from batch_defs.spec import BatchSpec, BudgetSpec, PhaseSpec, rate_per_second
from batch_defs.states import FAILURE_STATUSES, ItemStatus, SkipCause, StopKind
from batch_defs.tasks import Handler, TaskContext
from batch_defs.workers import call_handler, close_workers

HOST = socket.gethostname()
CHECK_SECONDS = 1.0  # how often a waiting step looks for stops from elsewhere and checks in
AHEAD_CHUNKS = 2  # how many chunks beyond the latest demanded one slots may start early
DEMANDED, AHEAD = 0, 1  # task ranks: a waiting step's items always go first

Key = tuple[int, str]  # (phase index, item key)


@dataclass
class Known:
    """An item's outcome for one phase, as this run knows it."""

    status: ItemStatus
    output: dict[str, Any] | None = None  # the next phase's input, while it may be needed
    skip_cause: SkipCause | None = None
    ran: bool = False  # run by this engine (not found in the ledger)
    reused: bool = False  # carried over from an earlier run of the partition

    @property
    def passes_on(self) -> bool:
        """Whether the item goes on to the next phase (a `when:` skip passes it through)."""
        return self.status == ItemStatus.SUCCEEDED or self.skip_cause == SkipCause.CONDITION


@dataclass(frozen=True)
class Task:
    phase: int
    chunk: int
    item: Item  # the item as this phase receives it


@dataclass
class ChunkReport:
    """What one demanded chunk (or the whole run, for finish) came to."""

    executed: int = 0
    reused: int = 0
    failed: int = 0
    passed: int = 0  # items that go on to the next phase
    stop: StopRequest | None = None


@dataclass
class RunPlan:
    """Everything the engine needs to run a batch's items for one run."""

    spec: BatchSpec
    ledger: Ledger
    partition: str
    run_id: str
    base_dir: Path
    output_dir: Path
    handlers: Sequence[Handler]
    resources: Mapping[str, Any] = field(default_factory=dict)
    log: Any = field(default_factory=lambda: logging.getLogger("batch_defs"))
    ahead: bool = True  # work ahead of the steps (only where later steps run in this process)
    # Where rate limits live; default: the ledger (Redis for celery: batch_defs/limits.py).
    limit_store: LimitStore | None = None


class PhaseWork:
    """One phase's handler behind its condition, route, limits, retries and timeouts."""

    def __init__(self, plan: RunPlan, index: int, handler: Handler, store: LimitStore,
                 log: Any, rate: str | None = None):
        self.plan, self.index, self.handler = plan, index, handler
        self.spec: PhaseSpec = plan.spec.phases[index]
        # A handler that defers its writes to the chunk's end (sql `transaction: chunk`):
        # its outcomes become durable only after finish_chunk, so it never works ahead.
        self.finish_chunk: Callable[[list[str]], Mapping[str, str]] | None = getattr(
            handler, "finish_chunk", None)
        self.when = Expression(self.spec.when) if self.spec.when else None
        self.router = handler if isinstance(handler, Router) else None
        self.gate = Gate(store, phase_buckets(plan, self.spec, rate), log)
        stop = threading.Event()  # one for the phase: halt() ends every runner's waits
        self.runner = self._runner(self.handler, stop)
        self.branches = {branch: self._runner(case, stop, self.router.params[branch])
                         for branch, case in self.router.handlers.items()} if self.router else {}

    def _runner(self, handler: Callable[..., Any], stop: threading.Event,
                params: Mapping[str, Any] | None = None) -> ItemRunner:
        return ItemRunner(partial(self.call, handler, params or self.spec.params),
                          self.spec.name, self.spec.retry, self.spec.timeout_s,
                          self.spec.merge_output, stop, self.gate)

    @property
    def holds(self) -> bool:
        return self.finish_chunk is not None

    def call(self, handler: Callable[..., Any], params: Mapping[str, Any], item: Item,
             attempt: int) -> Any:
        plan = self.plan
        ctx = TaskContext(params=params, batch=plan.spec.name,
                          partition=plan.partition, run_id=plan.run_id, phase=self.spec.name,
                          key=item.key, attempt=attempt, base_dir=plan.base_dir,
                          output_dir=plan.output_dir, resources=plan.resources, log=plan.log,
                          journal=plan.ledger)
        # In this thread, or handed to a worker process (options.workers: processes).
        return call_handler(plan.spec.options, handler, dict(item.data), ctx)

    def run(self, item: Item) -> ItemOutcome:
        """The item through `when:`, then its route's case (or the handler); NotStarted if the
        batch stopped while it waited for a limit."""
        variables = item_variables(item.data, item.key, self.plan.spec.name,
                                   self.plan.partition, self.spec.name)
        now = time.time()
        try:
            met = self.when is None or bool(self.when.evaluate(variables))
        except ExpressionError as exc:
            return ItemOutcome(item, ItemStatus.FAILED, 0, now, now, error=f"when: {exc}")
        if not met:
            return ItemOutcome(item, ItemStatus.SKIPPED, 0, now, now,
                               error=f"condition not met: {self.spec.when}",
                               skip_cause=SkipCause.CONDITION)
        if self.router is None:
            return self.runner.run(item)
        try:
            branch = self.router.branch(variables)
        except ExpressionError as exc:
            return ItemOutcome(item, ItemStatus.FAILED, 0, now, now, error=f"route.by: {exc}")
        return replace(self.branches[branch].run(item), branch=branch)

    def row(self, outcome: ItemOutcome) -> dict[str, Any]:
        # The input of a failed or rejected item is its dead-letter payload: kept for fixing.
        kept_input = outcome.item.data if outcome.status in FAILURE_STATUSES else None
        return self.plan_row(outcome.item, status=outcome.status, attempts=outcome.attempts,
                             input=kept_input, output=outcome.output, error=outcome.error,
                             attempt_log=outcome.attempt_log or None,
                             started_at=outcome.started_at, finished_at=outcome.finished_at,
                             duration_s=outcome.duration_s, cost=outcome.cost,
                             tokens=outcome.tokens, skip_cause=outcome.skip_cause,
                             branch=outcome.branch)

    def plan_row(self, item: Item, **values: Any) -> dict[str, Any]:
        return ledger_row(self.plan, self.spec.name, item, **values)


def ledger_row(plan: RunPlan, phase: str, item: Item, **values: Any) -> dict[str, Any]:
    return {"batch": plan.spec.name, "partition": plan.partition, "run_id": plan.run_id,
            "phase": phase, "item_key": item.key, "seq": item.seq,
            "worker": f"{HOST}:{os.getpid()}", **values}  # which process ran it


def phase_buckets(plan: RunPlan, phase: PhaseSpec, rate: str | None = None) -> list[Bucket]:
    """The limits a phase's attempts wait for: its own `rate` (shared by the run's processes;
    `rate` is a live change of it) and the batch-level limit it names."""
    buckets = []
    rate = rate or phase.rate
    if rate:
        buckets.append(phase_bucket(plan, phase.name, rate_per_second(rate)))
    if phase.limit is not None:
        declared = plan.spec.limits.get(phase.limit)
        if declared is None:
            raise ValueError(f"phase {phase.name!r}: no limit named {phase.limit!r} in the "
                             f"batch's limits")
        buckets.append(Bucket(phase.limit, f"limit {phase.limit}", declared.rate_per_s,
                              declared.burst, declared.concurrency, declared.adaptive))
    return buckets


def phase_bucket(plan: RunPlan, phase: str, rate_per_s: float) -> Bucket:
    return Bucket(f"run:{plan.run_id}:{phase}"[:128], f"phase {phase} rate", rate_per_s)


@functools.cache
def prepare_results_step() -> None:
    """Once per process, in the background while items run: import what the results step
    needs (pandas, the charts: about a second of CPU) while slots mostly wait on their
    handlers, rather than after the last item, where every run would wait for it."""

    def prepare() -> None:
        try:
            from batch_defs.report import prepare_charts

            prepare_charts()
        except Exception:  # the results step meets the same failure, and reports it
            pass

    threading.Thread(target=prepare, name="batch-prepare-results", daemon=True).start()


class _StepLog:
    """The log of whichever step waits on the engine now (slots outlive the step that made
    the engine): back-offs of rate limits are logged where people look."""

    def __init__(self, engine: RunEngine):
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine.log, name)


class GroupCommitter:
    """Writes outcomes to the ledger in groups: whatever arrived while the last write ran."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._arrivals: queue.SimpleQueue[_Commit | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="batch-commit", daemon=True)
        self._thread.start()

    def commit(self, rows: list[dict[str, Any]]) -> set[str]:
        """Make `rows` durable; returns the keys stored as failures instead (see Ledger.record).
        Raises LedgerWriteError if the ledger could not store them at all."""
        entry = _Commit(rows)
        self._arrivals.put(entry)
        entry.durable.wait()
        if entry.error is not None:
            raise entry.error
        return entry.degraded

    def close(self) -> None:
        self._arrivals.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            entries = [self._arrivals.get()]
            while True:
                try:
                    entries.append(self._arrivals.get_nowait())
                except queue.Empty:
                    break
            waiting = [e for e in entries if e is not None]
            if waiting:
                self._write(waiting)
            if len(waiting) < len(entries):
                return

    def _write(self, entries: list[_Commit]) -> None:
        try:
            degraded = self.ledger.record([row for e in entries for row in e.rows])
        except (LedgerWriteError, Exception) as exc:  # the database is gone: every slot hears
            for entry in entries:
                entry.error = exc if isinstance(exc, LedgerWriteError) else LedgerWriteError(
                    f"the ledger could not store {len(entry.rows)} outcome(s): {describe(exc)}")
                entry.durable.set()
            return
        for entry in entries:
            entry.degraded = {r["item_key"] for r in entry.rows} & degraded
            entry.durable.set()


@dataclass
class _Commit:
    rows: list[dict[str, Any]]
    durable: threading.Event = field(default_factory=threading.Event)
    degraded: set[str] = field(default_factory=set)
    error: BaseException | None = None


class RunEngine:
    """The items of one run in this process; steps demand chunks of it (see module doc)."""

    def __init__(self, plan: RunPlan, state: RunSnapshot | None = None):
        self.plan = plan
        self.spec = plan.spec
        self.store = plan.limit_store or open_store(plan.ledger, plan.spec.options.executor,
                                                    plan.spec.options.celery.broker)
        self.log: Any = plan.log  # the latest waiting step's: where slots' news go
        # A process that joins a running batch starts with the changes made to it so far.
        self.live = live_at_start(plan)
        self.phases = [PhaseWork(plan, i, h, self.store, _StepLog(self),
                                 self.live.rates.get(plan.spec.phases[i].name))
                       for i, h in enumerate(plan.handlers)]
        state = state or RunSnapshot()
        self.failures = state.counted_failures
        self.cost, self.tokens = state.spent_cost, state.spent_tokens
        self.tolerated = 0  # set from the first chunk: a share of the whole batch
        self.tolerance_base = 0  # the items tolerated_failures is a share of
        self.counted: int | None = None  # the base once the fan-out has counted (rebase)
        # Slots that may take work: options.concurrency, or its live change.
        self.width = (plan.spec.options.slots if plan.spec.options.mode == "sequential"
                      else self.live.concurrency or plan.spec.options.slots)
        self.refused: dict[str, Any] | None = None  # live settings that did not validate
        self.cond = threading.Condition()
        self.known: dict[Key, Known] = {}
        self.inputs: dict[Key, Task] = {}  # input available, not queued (held or not ahead)
        self.queued: dict[Key, int] = {}  # key -> the best rank it is queued with
        self.running: set[Key] = set()
        # (phase, chunk) -> keys that still need an outcome for that phase
        self.pending: dict[tuple[int, int], set[str]] = {}
        self.held: dict[tuple[int, int], list[ItemOutcome]] = {}
        self.blocked: dict[Key, Task] = {}  # waiting for its dependencies in the same phase
        self.skip_roots: dict[Key, str] = {}  # skipped for a dependency: the item that failed
        self.crashes: dict[tuple[int, int], BaseException] = {}
        self.fatal: BaseException | None = None
        self.stop: StopRequest | None = None
        self.closing = False
        self.chunks: dict[int, ChunkRef] = {}
        self.chunk_keys: dict[int, list[str]] = {}  # loaded chunks
        self.chunk_of: dict[str, int] = {}  # item key -> its chunk, for loaded chunks
        self.demanded: set[tuple[int, int]] = set()
        self.done_chunks: set[int] = set()  # through the last phase in this process
        self.loading = False
        self.depends: dict[str, list[str]] = {}
        self.dependants: dict[str, list[str]] = {}
        self._heap: list[tuple[int, int, int, int, int, Key]] = []
        self._order = itertools.count()
        self.committer = GroupCommitter(plan.ledger)
        self.slots: list[threading.Thread] = []
        self._add_slots(self.width)
        # The results step runs in this process too: it may prepare once items are running.
        self.prepares_results = plan.spec.options.executor == "in_process"
        over = budget_exceeded(self.spec.options.budget, self.cost, self.tokens)
        if over is not None:
            self.halt(over)

    # The steps' side

    def add_chunks(self, refs: Iterable[ChunkRef]) -> None:
        """Make chunks known (the fan-out's layout), so slots can work ahead into them. A
        chunk the fan-out streamed is known again once the source is counted."""
        with self.cond:
            for ref in refs:
                self.chunks[ref.index] = ref
            self.cond.notify_all()

    def rebase(self, tolerance_base: int, invalid: int) -> None:
        """The fan-out, which streamed chunks to this engine, has counted the source (valid
        and invalid items): tolerated_failures is a share of that, not of the upper bound
        the streamed chunks named, and the `invalid` items it recorded since this engine
        started count as failures. A fail-fast batch already beyond it stops now."""
        with self.cond:
            self.failures += invalid
            self.counted = self.tolerance_base = tolerance_base
            self.tolerated = self.live.options(self.spec.options).tolerated_count(
                tolerance_base)
            beyond = self.failures > self.tolerated
        if beyond and self.spec.options.on_error == "fail_fast":
            self.halt(StopRequest(StopKind.FAIL_FAST, f"fail_fast: {self.failures} items "
                                  f"failed, more than the {self.tolerated} tolerated"))

    def run_chunk(self, phase: int, ref: ChunkRef,
                  on_check: Callable[[], None] | None = None, log: Any = None) -> ChunkReport:
        """Block until every item of the chunk that reaches `phase` has its outcome for it
        (or the batch stopped); raises StepCrashError if one of its handlers crashed. `log`:
        the waiting step's, where live changes it sees are recorded."""
        return self.run_chunks(phase, [ref], on_check, log)

    def run_chunks(self, phase: int, refs: Sequence[ChunkRef],
                   on_check: Callable[[], None] | None = None, log: Any = None) -> ChunkReport:
        self.add_chunks(refs)
        self.log = log or self.log
        for ref in refs:
            self._load(ref)
        chunks = [ref.index for ref in refs]
        with self.cond:
            self.demanded.update((phase, c) for c in chunks)
            for chunk in chunks:
                self._demand(phase, chunk)
            self.cond.notify_all()
        try:
            self._wait(phase, chunks, on_check, log)
            with self.cond:
                report = self._report(phase, chunks)
                if phase == len(self.phases) - 1 and report.stop is None:
                    self._forget(chunks)
            return report
        finally:
            with self.cond:
                self.demanded.difference_update((phase, c) for c in chunks)

    def finish(self, refs: Sequence[ChunkRef],
               on_check: Callable[[], None] | None = None, log: Any = None) -> ChunkReport:
        """Every item of the run through every phase: what this process has not completed
        (failed items of earlier runs, chunks of steps a re-execution left out)."""
        todo = [ref for ref in refs if ref.index not in self.done_chunks]
        total = ChunkReport()
        for phase in range(len(self.phases)):
            if not todo:
                break
            report = self.run_chunks(phase, todo, on_check, log)
            total.executed += report.executed
            total.reused += report.reused
            total.failed += report.failed
            total.stop = report.stop
            if report.stop:
                break
        return total

    def halt(self, stop: StopRequest) -> None:
        """No item starts from now on; in-flight ones finish and are recorded."""
        with self.cond:
            first = self.stop is None
            if first:
                self.stop = stop
            self.cond.notify_all()
        if first:
            self.plan.ledger.request_stop(self.plan.run_id, stop)
            for phase in self.phases:
                phase.runner.stop.set()  # ends retry backoffs and waits for limits early

    def quiesce(self) -> None:
        """After a stop: wait until no item is in flight in this process (every outcome is
        recorded), e.g. before undoing what the run did."""
        with self.cond:
            while self.running:
                self.cond.wait(0.2)

    def close(self) -> None:
        """Stop taking work, let in-flight items finish and be recorded, end the threads."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        for slot in self.slots:
            slot.join()
        self.committer.close()
        close_workers(self.plan.run_id)

    # Loading chunks: their items, and what this run or the partition knows of them already

    def _load(self, ref: ChunkRef) -> None:
        with self.cond:
            while self.loading:
                self.cond.wait()
            if ref.index in self.chunk_keys:
                return
            self.loading = True
        try:
            items = read_chunk(ref)
            keys = [i.key for i in items]
            # Dependencies outside the chunk (a dead-letter re-run of some items) count if
            # they succeeded in the partition before.
            outside = sorted({dep for item in items for dep in
                              item_dependencies(item.data, self.spec.options.depends_on_field)}
                             - set(keys))
            found = self.plan.ledger.known_outcomes(
                self.spec.name, self.plan.partition, self.plan.run_id,
                [p.spec.name for p in self.phases], keys + outside)
            reused_rows = self._absorb(ref, items, found)
            if reused_rows:
                self.plan.ledger.record(reused_rows)
        finally:
            with self.cond:
                self.loading = False
                self.cond.notify_all()

    def _absorb(self, ref: ChunkRef, items: list[Item],
                found: Mapping[Key, KnownOutcome]) -> list[dict[str, Any]]:
        """Take in a loaded chunk: known outcomes, rows to write for those reused from
        earlier runs, and for each item the first phase it still has to run."""
        reused_rows = []
        depends = dependency_map(items, self.spec.options.depends_on_field)
        with self.cond:
            if not self.chunk_keys:
                self.tolerance_base = self.counted or ref.tolerance_base
                self.tolerated = self.live.options(self.spec.options).tolerated_count(
                    self.tolerance_base)
            self.depends.update(depends)
            for key, deps in depends.items():
                for dep in deps:
                    self.dependants.setdefault(dep, []).append(key)
            mine = {item.key for item in items}
            for (phase_index, key), outside in found.items():
                # Also the items of chunks done and forgotten here (streamed before the
                # first item with dependencies): the ledger has their outcomes.
                if key not in mine and (key not in self.chunk_of
                                        or self.chunk_of[key] in self.done_chunks):
                    self.known.setdefault((phase_index, key), Known(
                        outside.status, None, outside.skip_cause, reused=outside.other_run))
            for item in items:
                self.chunk_of[item.key] = ref.index
                data = item.data
                for phase in self.phases:
                    outcome = found.get((phase.index, item.key))
                    if outcome is None:
                        for later in range(phase.index, len(self.phases)):
                            self.pending.setdefault((later, ref.index), set()).add(item.key)
                        self._offer(Task(phase.index, ref.index, Item(item.key, item.seq, data)))
                        break
                    if outcome.other_run:  # a success, or a `when:` skip, carried over
                        reused_rows.append(phase.plan_row(
                            item, status=outcome.status, output=outcome.output,
                            skip_cause=outcome.skip_cause, branch=outcome.branch,
                            reused_from=outcome.run_id))
                    known = Known(outcome.status, outcome.output, outcome.skip_cause,
                                  reused=outcome.other_run)
                    self.known[(phase.index, item.key)] = known
                    if not known.passes_on:
                        break
                    data = outcome.output if outcome.output is not None else data
            self.chunk_keys[ref.index] = [item.key for item in items]
            self.cond.notify_all()
        return reused_rows

    # Queueing

    def _offer(self, task: Task) -> None:
        """A task whose input is there: queued now if slots may take it, else kept for its
        step. Lock held."""
        key = (task.phase, task.item.key)
        self.inputs[key] = task
        if (task.phase, task.chunk) in self.demanded:
            self._queue(task, DEMANDED)
        elif self.plan.ahead and not self.phases[task.phase].holds:
            self._queue(task, AHEAD)

    def _demand(self, phase: int, chunk: int) -> None:
        for key in self.pending.get((phase, chunk), ()):
            task = self.inputs.get((phase, key))
            if task is not None:
                self._queue(task, DEMANDED)

    def _queue(self, task: Task, rank: int) -> None:
        key = (task.phase, task.item.key)
        if key in self.running or key in self.known or self.queued.get(key, AHEAD + 1) <= rank:
            return
        self.queued[key] = rank
        # Ahead work goes chunk by chunk, later phases first (items finish, memory stays low).
        order = task.phase if rank == DEMANDED else -task.phase
        heapq.heappush(self._heap, (rank, task.chunk, order, task.item.seq, next(self._order),
                                    key))

    def _take(self, slot: int) -> tuple[Task, str | None] | None:
        """The next task for a slot, with the reason to skip it if a dependency failed;
        None once the engine closes. Slots beyond the width (a live lower concurrency) idle."""
        with self.cond:
            while not self.closing:
                if self.stop is None and self.fatal is None and slot < self.width:
                    taken = self._pop()
                    if taken is not None:
                        return taken
                    ahead = self._ahead_chunk()
                    if ahead is not None:
                        self.cond.release()
                        try:
                            self._load(ahead)
                        finally:
                            self.cond.acquire()
                        continue
                self.cond.wait(0.5)
            return None

    def _pop(self) -> tuple[Task, str | None] | None:
        while self._heap:
            rank, *_, key = heapq.heappop(self._heap)
            if self.queued.get(key) != rank or key in self.running or key in self.known:
                continue  # stale: taken already, re-queued with a better rank, or done
            del self.queued[key]
            task = self.inputs.pop(key)
            waiting, reason = self._dependencies(task)
            if waiting:
                self.blocked[key] = task
                continue
            self.running.add(key)
            return task, reason
        return None

    def _ahead_chunk(self) -> ChunkRef | None:
        """The next chunk slots may load to work ahead into, if any."""
        if not self.plan.ahead or self.loading:
            return None
        unloaded = [i for i in self.chunks if i not in self.chunk_keys]
        if not unloaded:
            return None
        latest = max(max((chunk for _, chunk in self.demanded), default=-1), 0)
        nxt = min(unloaded)
        # Small chunks (chunk_size: 1 above all) would leave slots idle within AHEAD_CHUNKS:
        # the window also reaches twice the slots' width in items.
        between = sum(self.chunks[i].count for i in range(latest + 1, nxt) if i in self.chunks)
        near = nxt <= latest + AHEAD_CHUNKS or between < 2 * self.width
        return self.chunks[nxt] if near else None

    # Dependencies (options.depends_on_field): an item starts once its dependencies succeeded
    # in the same phase; the dependants of an item that did not succeed are skipped.

    def _dependencies(self, task: Task) -> tuple[bool, str | None]:
        """(must wait, reason to skip). Lock held."""
        for dep in self.depends.get(task.item.key, ()):
            known = self.known.get((task.phase, dep))
            if known is None and self._reaches(task.phase, dep):
                return True, None
            if known is None or not known.passes_on:  # a `when:` skip passes it on too
                root = self.skip_roots.get((task.phase, dep), dep)
                self.skip_roots[(task.phase, task.item.key)] = root
                via = "" if root == dep else f" (through {dep!r})"
                return False, f"dependency {root!r} failed{via}"
        return False, None

    def _reaches(self, phase: int, key: str) -> bool:
        """Whether item `key` has, or may still get, an input for `phase`."""
        if key not in self.chunk_of:
            return False  # not an item of this run: only a success before counts
        if phase == 0:
            return True
        before = self.known.get((phase - 1, key))
        return before is None or before.passes_on

    def _release_dependants(self, phase: int, key: str) -> None:
        for dependant in self.dependants.get(key, ()):
            task = self.blocked.pop((phase, dependant), None)
            if task is not None:
                self.inputs[(phase, dependant)] = task
                rank = DEMANDED if (phase, task.chunk) in self.demanded else AHEAD
                self._queue(task, rank)

    # The slots' side

    def _add_slots(self, count: int) -> None:
        while len(self.slots) < count:
            slot = threading.Thread(target=self._slot, args=(len(self.slots),),
                                    name=f"batch-slot-{len(self.slots)}", daemon=True)
            self.slots.append(slot)
            slot.start()

    def _slot(self, index: int) -> None:
        while (taken := self._take(index)) is not None:
            task, skip_reason = taken
            if skip_reason is not None:
                now = time.time()
                self._record(task, ItemOutcome(task.item, ItemStatus.SKIPPED, 0, now, now,
                                               error=skip_reason,
                                               skip_cause=SkipCause.DEPENDENCY))
                continue
            try:
                outcome = self.phases[task.phase].run(task.item)
            except NotStarted:  # stopped while it waited for a limit: left for a resume
                self._put_back(task)
                continue
            except BaseException as exc:  # SystemExit, MemoryError...: the step fails
                self._crashed(task, exc)
                continue
            self._record(task, outcome)

    def _put_back(self, task: Task) -> None:
        with self.cond:
            key = (task.phase, task.item.key)
            self.running.discard(key)
            self.inputs[key] = task
            self.cond.notify_all()

    def _record(self, task: Task, outcome: ItemOutcome) -> None:
        """Judge, make durable, then let the item go on (never before it is durable)."""
        if self.prepares_results:  # after the first item, not before it
            prepare_results_step()
        stop = self._judge(task.phase, outcome)
        if stop is not None:
            self.halt(stop)
        work = self.phases[task.phase]
        if work.holds:
            with self.cond:
                self.held.setdefault((task.phase, task.chunk), []).append(outcome)
                self.running.discard((task.phase, task.item.key))
                self.cond.notify_all()
            return
        try:
            degraded = self.committer.commit([work.row(outcome)])
        except LedgerWriteError as exc:
            with self.cond:
                self.fatal = self.fatal or exc
                self.running.discard((task.phase, task.item.key))
                self.cond.notify_all()
            return
        if degraded:  # stored as a failure saying why: the next phase must not get it
            outcome = replace(outcome, status=ItemStatus.FAILED, output=None)
        self._settle(task, outcome)

    def _settle(self, task: Task, outcome: ItemOutcome) -> None:
        phase, key, chunk = task.phase, task.item.key, task.chunk
        last = phase == len(self.phases) - 1
        known = Known(outcome.status, None if last else outcome.output, outcome.skip_cause,
                      ran=True)
        with self.cond:
            self.running.discard((phase, key))
            self.known[(phase, key)] = known
            self.pending.get((phase, chunk), set()).discard(key)
            if phase:
                before = self.known.get((phase - 1, key))
                if before is not None:
                    before.output = None  # consumed: free the memory
            if known.passes_on and not last:
                data = outcome.output if outcome.output is not None else task.item.data
                self._offer(Task(phase + 1, chunk, Item(key, task.item.seq, data)))
            elif not known.passes_on:
                for later in range(phase + 1, len(self.phases)):
                    self.pending.get((later, chunk), set()).discard(key)
            self._release_dependants(phase, key)
            self.cond.notify_all()

    def _crashed(self, task: Task, exc: BaseException) -> None:
        with self.cond:
            key = (task.phase, task.item.key)
            self.running.discard(key)
            self.inputs[key] = task  # not recorded: a retried step runs it again
            self.crashes.setdefault((task.phase, task.chunk), exc)
            self.cond.notify_all()

    def _judge(self, phase: int, outcome: ItemOutcome) -> StopRequest | None:
        """Fail-fast and budgets, decided as soon as an item ends, before its slot goes on."""
        spec = self.phases[phase].spec
        with self.cond:
            self.cost += outcome.cost
            self.tokens += outcome.tokens
            if outcome.status in FAILURE_STATUSES:
                self.failures += 1
                if self.spec.on_error(spec) == "fail_fast" and self.failures > self.tolerated:
                    return StopRequest(StopKind.FAIL_FAST,
                                       f"fail_fast: item {outcome.item.key!r} failed in phase "
                                       f"{spec.name!r}: {mask(outcome.error)}")
            return budget_exceeded(self.spec.options.budget, self.cost, self.tokens)

    # Waiting for chunks

    def _complete(self, phase: int, chunk: int) -> bool:
        missing = self.pending.get((phase, chunk), set())
        return len(missing) == len(self.held.get((phase, chunk), ()))

    def _in_flight(self, phase: int, chunks: Sequence[int]) -> bool:
        return any((phase, key) in self.running
                   for chunk in chunks for key in self.pending.get((phase, chunk), ()))

    def _wait(self, phase: int, chunks: Sequence[int],
              on_check: Callable[[], None] | None, log: Any) -> None:
        last_check = time.monotonic()
        with self.cond:
            while True:
                crash = next((self.crashes.pop((phase, c)) for c in chunks
                              if (phase, c) in self.crashes), None)
                if crash is not None:
                    raise StepCrashError(f"a handler raised {describe(crash)}") from crash
                if self.fatal is not None:
                    raise self.fatal
                stopped = self.stop is not None and not self._in_flight(phase, chunks)
                for chunk in chunks:
                    if (phase, chunk) in self.held and (self._complete(phase, chunk)
                                                        or stopped):
                        self._settle_held(phase, chunk)
                if all(not self.pending.get((phase, c)) for c in chunks) or stopped:
                    return
                self.cond.wait(0.2)
                if time.monotonic() - last_check >= CHECK_SECONDS:
                    last_check = time.monotonic()
                    self.cond.release()
                    try:
                        self._check(on_check, log)
                    finally:
                        self.cond.acquire()

    def _check(self, on_check: Callable[[], None] | None, log: Any) -> None:
        if on_check is not None:
            on_check()  # progress, and the partition lease's heartbeat
        # Another process (a pause, a cancel, a step elsewhere) may have stopped the batch,
        # or someone changed its settings (batch-defs set).
        stop, settings = self.plan.ledger.run_control(self.plan.run_id)
        if stop is not None:
            self.halt(stop)
        values = settings.get("values")
        if not values:
            return
        try:
            live = LiveSettings.from_values(values)
        except ValidationError as exc:  # written around batch-defs set: keep what runs
            if values != self.refused:
                (log or self.plan.log).warning(f"live change ignored: {values}: {exc}")
                self.refused = values
            return
        self.apply(live, log or self.plan.log)

    # Live changes (batch-defs set): applied by whichever step sees them first, and logged

    def apply(self, live: LiveSettings, log: Any) -> None:
        """Bring the running batch to `live`; each change is logged once, where it is seen."""
        old, self.live = self.live, live
        if live.concurrency is not None and live.concurrency != (old.concurrency or self.width):
            if self.spec.options.mode == "sequential":
                log.warning("live change ignored: options.concurrency (a sequential batch "
                            "runs one item at a time)")
            else:
                log.info(f"live change: options.concurrency {self.width} -> "
                         f"{live.concurrency} (batch-defs set)")
                with self.cond:
                    self.width = live.concurrency
                    self._add_slots(self.width)
                    self.cond.notify_all()
        if live.tolerated_failures is not None and live.tolerated_failures != \
                old.tolerated_failures:
            with self.cond:
                before = self.tolerated
                self.tolerated = live.options(self.spec.options).tolerated_count(
                    self.tolerance_base)
            log.info(f"live change: options.tolerated_failures {live.tolerated_failures!r} "
                     f"({before} -> {self.tolerated} items) (batch-defs set)")
        for name, rate in live.rates.items():
            if old.rates.get(name) != rate:
                self._change_rate(name, rate, old.rates.get(name), log)

    def _change_rate(self, name: str, rate: str, before: str | None, log: Any) -> None:
        work = next((p for p in self.phases if p.spec.name == name), None)
        if work is None:
            log.warning(f"live change ignored: phases.{name}.rate (no phase {name!r})")
            return
        bucket = phase_bucket(self.plan, name, rate_per_second(rate))
        if any(b.name == bucket.name for b in work.gate.buckets):
            work.gate.set_rate(bucket.name, rate_per_second(rate))
        else:
            work.gate.add(bucket)
        log.info(f"live change: phases.{name}.rate {before or work.spec.rate or 'none'} -> "
                 f"{rate} (batch-defs set)")

    def _settle_held(self, phase: int, chunk: int) -> None:
        """Let the handler complete the writes it deferred; items whose write failed become
        failed; everything is then recorded in one write. Lock held (released meanwhile)."""
        outcomes = self.held.pop((phase, chunk))
        work = self.phases[phase]
        assert work.finish_chunk is not None
        self.cond.release()
        try:
            succeeded = [o.item.key for o in outcomes if o.status == ItemStatus.SUCCEEDED]
            errors = work.finish_chunk(succeeded) if succeeded else {}
            now = time.time()
            outcomes = [replace(o, status=ItemStatus.FAILED, output=None,
                                error=errors[o.item.key], finished_at=now)
                        if o.status == ItemStatus.SUCCEEDED and o.item.key in errors else o
                        for o in outcomes]
            for outcome in outcomes:
                if outcome.item.key in errors and (stop := self._judge(phase, outcome)):
                    self.halt(stop)
            self.committer.commit([work.row(o) for o in outcomes])
            for outcome in outcomes:
                self._settle(Task(phase, chunk, outcome.item), outcome)
        finally:
            self.cond.acquire()

    def _report(self, phase: int, chunks: Sequence[int]) -> ChunkReport:
        report = ChunkReport(stop=self.stop)
        for chunk in chunks:
            for key in self.chunk_keys.get(chunk, ()):
                known = self.known.get((phase, key))
                if known is None:
                    continue
                report.executed += known.ran
                report.reused += known.reused
                report.passed += known.passes_on
                report.failed += known.status in FAILURE_STATUSES
        return report

    def _forget(self, chunks: Sequence[int]) -> None:
        """Chunks through their last phase: their items' states are no longer needed here.
        Lock held."""
        for chunk in chunks:
            self.done_chunks.add(chunk)
            # Items of other chunks may still wait on these: their states stay.
            for key in () if self.depends else self.chunk_keys.get(chunk, ()):
                for phase in range(len(self.phases)):
                    self.known.pop((phase, key), None)
                    self.skip_roots.pop((phase, key), None)
            self.chunk_keys[chunk] = []  # loaded, and nothing left to do
            for phase in range(len(self.phases)):
                self.pending.pop((phase, chunk), None)


def live_at_start(plan: RunPlan) -> LiveSettings:
    """The changes made to the run so far (none if they do not validate: see _check)."""
    try:
        return LiveSettings.from_values(
            plan.ledger.run_control(plan.run_id)[1].get("values", {}))
    except ValidationError:
        return LiveSettings()


def run_items(plan: RunPlan, items: Sequence[Item], folder: Path) -> ChunkReport:
    """Run `items` through every phase of the plan as one chunk, outside Dagster (the Python
    API and tests); outcomes go to the plan's ledger as in a batch run."""
    folder.mkdir(parents=True, exist_ok=True)
    spool = ItemSpool(folder / f"{plan.run_id}.items.jsonl")
    for item in items:
        spool.add(item)
    refs = spool.refs(max(1, spool.count))
    plan.ledger.start_run(plan.run_id, plan.spec.name, plan.partition, spool.count,
                          [phase.name for phase in plan.spec.phases])
    engine = RunEngine(plan, plan.ledger.run_state(plan.run_id))
    try:
        engine.add_chunks(refs)
        return engine.finish(refs) if spool.count else ChunkReport()
    finally:
        engine.close()


def budget_exceeded(budget: BudgetSpec, cost: float, tokens: int) -> StopRequest | None:
    """The stop once the partition's spend reaches options.budget, else None."""
    if budget.max_cost is not None and cost >= budget.max_cost:
        return StopRequest(StopKind.BUDGET,
                           f"budget: spent {cost:.4f} of max_cost {budget.max_cost:g}")
    if budget.max_tokens is not None and tokens >= budget.max_tokens:
        return StopRequest(StopKind.BUDGET,
                           f"budget: used {tokens} tokens of max_tokens {budget.max_tokens}")
    return None
