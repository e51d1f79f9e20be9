"""Compensation: undo what a run did, item by item, phases in reverse order, each effect once.

A phase's `undo:` task reverses its effect for one item (an HTTP DELETE of the record the phase
created, a SQL statement, a Python function); it gets the item as the phase put it out. A
rollback takes every item whose phase succeeded in the run (or whose success the run reused),
last phase first, with its own concurrency and retries, and records each undo in the ledger as
a row of its own: run `undo-<run that made the effect>`, phase `<phase>:undo`. An effect whose
undo row says succeeded is never undone again, whichever run is rolled back, however often,
and a success whose effect was undone is not reused by a later run of the partition.

Like the engine, a slot takes its next item only once its last undo is recorded: after a
crash (SIGKILL) the next rollback repeats only the undos that were in flight, at most
`concurrency` of them, so an undo must tolerate finding its effect gone already (e.g. accept
HTTP 404: `expected_status: [200, 204, 404]`). One rollback of a partition runs at a time.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch_defs.engine import HOST, GroupCommitter
from batch_defs.items import Item
from batch_defs.ledger import (
    LeaseHolder,
    Ledger,
    UndoTarget,
    undo_phase,
    undo_run_id,
)
from batch_defs.runner import ItemOutcome, ItemRunner
from batch_defs.spec import BatchSpec, PhaseSpec
from batch_defs.states import FAILURE_STATUSES, ItemStatus
from batch_defs.tasks import Handler, TaskContext, build_handler, task_resources

LEASE_TTL_S = 60.0  # a rollback on another host that has not beaten for this long is gone
POLL_S = 0.5


class RollbackBusyError(RuntimeError):
    """Another rollback of the partition is running; the message names where."""


@dataclass
class PhaseUndo:
    """What the rollback did for one phase."""

    undone: int = 0
    failed: int = 0
    held_back: int = 0  # not undone: the undo of a later phase failed for them
    errors: list[str] = field(default_factory=list)  # a few, for people


@dataclass
class RollbackReport:
    run_id: str
    phases: dict[str, PhaseUndo] = field(default_factory=dict)  # in the order undone
    no_undo: list[str] = field(default_factory=list)  # phases that declare none

    @property
    def undone(self) -> int:
        return sum(p.undone for p in self.phases.values())

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self.phases.values())

    def line(self) -> str:
        parts = [f"{name}: {p.undone} undone" + (f", {p.failed} failed" if p.failed else "")
                 + (f", {p.held_back} held back" if p.held_back else "")
                 for name, p in self.phases.items() if p.undone or p.failed or p.held_back]
        return "; ".join(parts) or "nothing to undo"


@dataclass
class RollbackPlan:
    """Everything a rollback needs: the run's effective spec, where it ran, its resources."""

    spec: BatchSpec
    ledger: Ledger
    run_id: str
    partition: str
    base_dir: Path
    output_dir: Path
    resources: Mapping[str, Any] = field(default_factory=dict)
    log: Any = field(default_factory=lambda: logging.getLogger("batch_defs.rollback"))
    concurrency: int | None = None  # default: each undo's own, else options.concurrency
    wait: bool = True  # for another rollback of the partition to end (else RollbackBusyError)
    handlers: Mapping[str, Handler] | None = None  # phase -> undo handler (default: built)


def undo_resource_keys(spec: BatchSpec) -> set[str]:
    """The Dagster resources the batch's undo tasks use."""
    return {key for phase in spec.phases if phase.undo
            for key in task_resources(phase.undo.task)}


def rollback_run(plan: RollbackPlan) -> RollbackReport:
    """Undo every effect the run made or reused that is not undone yet (see module doc)."""
    report = RollbackReport(plan.run_id)
    report.no_undo = [p.name for p in plan.spec.phases if p.undo is None]
    holder = f"rollback-{uuid.uuid4().hex[:16]}"
    lease = (f"rollback:{plan.spec.name}"[:128], plan.partition)
    _take_lease(plan, lease, holder)
    committer = GroupCommitter(plan.ledger)
    try:
        held: set[str] = set()
        for phase in reversed([p for p in plan.spec.phases if p.undo is not None]):
            report.phases[phase.name] = _undo_phase(plan, phase, held, committer, lease,
                                                    holder)
            # Items whose later effect is still there keep their earlier one too.
            held |= {t.item_key for t in plan.ledger.undo_targets(plan.run_id, phase.name)}
    finally:
        committer.close()
        plan.ledger.release_lease(*lease, holder)
    plan.log.info(f"rollback of run {plan.run_id}: {report.line()}")
    return report


def _take_lease(plan: RollbackPlan, lease: tuple[str, str], holder: str) -> None:
    announced = False
    while True:
        other = plan.ledger.acquire_lease(*lease, holder, HOST, os.getpid(),
                                          _holder_live).held_by
        if other is None:
            return
        if not plan.wait:
            raise RollbackBusyError(f"a rollback of partition {plan.partition!r} of batch "
                               f"{plan.spec.name!r} is running (pid {other.pid} on "
                               f"{other.host}); wait for it to end")
        if not announced:
            plan.log.info(f"waiting for the rollback in pid {other.pid} on {other.host}")
            announced = True
        time.sleep(POLL_S)


def _holder_live(holder: LeaseHolder) -> bool:
    from batch_defs.control import pid_alive

    if holder.host == HOST:
        return pid_alive(holder.pid)
    return time.time() - holder.heartbeat_at < LEASE_TTL_S


def _undo_phase(plan: RollbackPlan, phase: PhaseSpec, held: set[str],
                committer: GroupCommitter, lease: tuple[str, str], holder: str) -> PhaseUndo:
    assert phase.undo is not None
    result = PhaseUndo()
    targets = plan.ledger.undo_targets(plan.run_id, phase.name)
    todo = [t for t in targets if t.item_key not in held]
    result.held_back = len(targets) - len(todo)
    if not todo:
        return result
    slots = min(len(todo), plan.concurrency or phase.undo.concurrency
                or plan.spec.options.concurrency)
    plan.log.info(f"rollback: undoing phase {phase.name!r} for {len(todo)} items "
                  f"({phase.undo.task}, concurrency {slots})")
    handler = (plan.handlers or {}).get(phase.name) or build_handler(
        phase.undo.task, phase.undo.params, plan.base_dir)
    runner = ItemRunner(_caller(plan, phase, handler), undo_phase(phase.name),
                        phase.undo.retry, phase.undo.timeout_s, True, threading.Event())
    work: queue.SimpleQueue[UndoTarget] = queue.SimpleQueue()
    for target in todo:  # last item first: the reverse of the order they ran in
        work.put(target)
    lock = threading.Lock()

    def slot() -> None:
        while True:
            try:
                target = work.get_nowait()
            except queue.Empty:
                return
            outcome = runner.run(Item(target.item_key, target.seq, dict(target.output or {})))
            committer.commit([_row(plan, phase.name, target, outcome)])  # durable, then next
            with lock:
                if outcome.status == ItemStatus.SUCCEEDED:
                    result.undone += 1
                else:
                    result.failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(f"{target.item_key}: {outcome.error}")

    threads = [threading.Thread(target=slot, name=f"batch-undo-{i}", daemon=True)
               for i in range(slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(5.0)
            plan.ledger.heartbeat(*lease, holder)
    return result


def _caller(plan: RollbackPlan, phase: PhaseSpec,
            handler: Handler) -> Callable[[Item, int], Any]:
    assert phase.undo is not None
    params = phase.undo.params

    def call(item: Item, attempt: int) -> Any:
        ctx = TaskContext(params=params, batch=plan.spec.name, partition=plan.partition,
                          run_id=plan.run_id, phase=undo_phase(phase.name), key=item.key,
                          attempt=attempt, base_dir=plan.base_dir, output_dir=plan.output_dir,
                          resources=plan.resources, log=plan.log, journal=plan.ledger)
        return handler(dict(item.data), ctx)

    return call


def _row(plan: RollbackPlan, phase: str, target: UndoTarget,
         outcome: ItemOutcome) -> dict[str, Any]:
    failed = outcome.status in FAILURE_STATUSES
    return {"batch": plan.spec.name, "partition": plan.partition,
            "run_id": undo_run_id(target.executed_by), "phase": undo_phase(phase),
            "item_key": target.item_key, "seq": target.seq, "worker": f"{HOST}:{os.getpid()}",
            "status": outcome.status, "attempts": outcome.attempts,
            "input": target.output if failed else None, "output": outcome.output,
            "error": outcome.error, "attempt_log": outcome.attempt_log or None,
            "started_at": outcome.started_at, "finished_at": outcome.finished_at,
            "duration_s": outcome.duration_s, "cost": outcome.cost, "tokens": outcome.tokens,
            "skip_cause": outcome.skip_cause}
