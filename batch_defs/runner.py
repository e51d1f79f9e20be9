"""Runs a chunk's items through a handler with a bounded pool of slots, retries and timeouts.

Slots are worker threads pulling the next item as soon as they finish one (the slot refills at
once, like Promise.race); `mode: sequential` is one slot, so items run in input order. Outcomes
flow back to the calling thread, which owns all ledger writes and decides when to stop.
"""

from __future__ import annotations

import heapq
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import tenacity

from batch_defs.items import Item
from batch_defs.spec import RetrySpec
from batch_defs.tasks.base import RejectItem, SkipItem, TaskResult


@dataclass
class ItemOutcome:
    item: Item
    status: str  # succeeded | failed | skipped | rejected
    attempts: int
    started_at: float
    finished_at: float
    output: dict[str, Any] | None = None
    error: str | None = None
    cost: float = 0.0
    tokens: int = 0
    attempt_log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.finished_at - self.started_at


class OutcomeSink(Protocol):
    def judge(self, outcome: ItemOutcome) -> str | None:
        """Called in the slot's thread as soon as an item ends, before the slot takes the next
        one; a returned reason stops new items at once (fail-fast). Must be thread-safe."""
        ...

    def add(self, outcome: ItemOutcome) -> None:
        """Called in the calling thread for every outcome (record it)."""
        ...

    def tick(self) -> str | None:
        """Called often from the calling thread; a returned reason stops new items."""
        ...


Call = Callable[[Item, int], Any]  # (item, attempt number) -> handler result


def call_with_timeout(fn: Callable[[], Any], timeout_s: float | None) -> Any:
    """fn() in a helper thread when a timeout is set. Python cannot kill a thread: a handler
    that overruns is abandoned (its result ignored) and the attempt fails with TimeoutError."""
    if not timeout_s:
        return fn()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    helper = threading.Thread(target=target, daemon=True, name="batch-item-timeout")
    helper.start()
    helper.join(timeout_s)
    if helper.is_alive():
        raise TimeoutError(f"timed out after {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def is_retryable(exc: BaseException, retry_on: list[str | int]) -> bool:
    """Listed in retry_on; with no list, anything that does not call itself permanent
    (an exception with `transient = False`, e.g. an HTTP 404)."""
    if isinstance(exc, SkipItem | RejectItem):
        return False
    if not retry_on:
        return getattr(exc, "transient", True) is not False
    names = {cls.__name__ for cls in type(exc).__mro__}
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    return any(r in names if isinstance(r, str) else r == status for r in retry_on)


def backoff_wait(retry: RetrySpec) -> tenacity.wait.wait_base:
    if retry.backoff == "fixed":
        wait: tenacity.wait.wait_base = tenacity.wait_fixed(retry.delay_s)
        return tenacity.wait_random(0, retry.delay_s) if retry.jitter else wait
    if retry.jitter:  # "full jitter": uniform between 0 and the exponential bound
        return tenacity.wait_random_exponential(multiplier=retry.delay_s, max=retry.max_delay_s)
    return tenacity.wait_exponential(multiplier=retry.delay_s, max=retry.max_delay_s)


def to_output(item: Item, result: Any, phase: str, merge: bool) -> tuple[dict, float, int]:
    """A handler's return value as (next phase's item, cost, tokens)."""
    cost, tokens = 0.0, 0
    if isinstance(result, TaskResult):
        result, cost, tokens = result.output, result.cost, result.tokens
    if result is None:
        return dict(item.data), cost, tokens
    if isinstance(result, dict):
        return ({**item.data, **result} if merge else dict(result)), cost, tokens
    return {**item.data, phase: result}, cost, tokens


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ItemRunner:
    """Runs one item with retries and a per-attempt timeout; thread-safe."""

    def __init__(self, call: Call, phase: str, retry: RetrySpec, timeout_s: float | None,
                 merge: bool, stop: threading.Event):
        self.call, self.phase, self.retry = call, phase, retry
        self.timeout_s, self.merge, self.stop = timeout_s, merge, stop
        self.wait = backoff_wait(retry)
        self._retrying = tenacity.Retrying(wait=self.wait)

    def run(self, item: Item) -> ItemOutcome:
        started = time.time()
        log: list[dict[str, Any]] = []
        attempt = 0
        while True:
            attempt += 1
            try:
                result = call_with_timeout(partial(self.call, item, attempt), self.timeout_s)
                output, cost, tokens = to_output(item, result, self.phase, self.merge)
                return ItemOutcome(item, "succeeded", attempt, started, time.time(),
                                   output=output, cost=cost, tokens=tokens, attempt_log=log)
            except SkipItem as exc:
                return ItemOutcome(item, "skipped", attempt, started, time.time(),
                                   error=str(exc), attempt_log=log)
            except RejectItem as exc:
                return ItemOutcome(item, "rejected", attempt, started, time.time(),
                                   error=str(exc), attempt_log=log)
            except Exception as exc:
                last = (attempt >= self.retry.max_attempts
                        or not is_retryable(exc, self.retry.retry_on))
                wait_s = 0.0 if last else self._backoff(attempt, exc)
                log.append({"attempt": attempt, "error": describe(exc), "wait_s": round(wait_s, 3)})
                # A stop (fail-fast elsewhere, pause) ends the backoff early: no new attempt.
                if last or self.stop.wait(wait_s):
                    return ItemOutcome(item, "failed", attempt, started, time.time(),
                                       error=describe(exc), attempt_log=log)

    def _backoff(self, attempt: int, exc: BaseException) -> float:
        """The backoff, or longer if the server said when to come back (Retry-After)."""
        state = tenacity.RetryCallState(self._retrying, None, (), {})
        state.attempt_number = attempt
        wait = float(self.wait(state)) if self.retry.delay_s else 0.0
        asked = getattr(exc, "retry_after_s", None)
        if isinstance(asked, int | float):
            wait = max(wait, min(float(asked), self.retry.max_delay_s))
        return wait


class ItemQueue:
    """Hands the slots their next item, in input order."""

    def __init__(self, items: Iterable[Item]):
        self._source: Iterator[Item] = iter(items)
        self._lock = threading.Lock()

    def take(self, stop: threading.Event) -> Item | None:
        with self._lock:
            return None if stop.is_set() else next(self._source, None)

    def finish(self, outcome: ItemOutcome) -> None:
        """An item ended (called before its slot takes another)."""

    def skipped(self) -> list[ItemOutcome]:
        """Items given up without running, to record as outcomes."""
        return []


class DependencyQueue(ItemQueue):
    """Hands out an item only once every item it depends on has succeeded (here, or before:
    `satisfied`); the dependants of an item that did not succeed are skipped, not run. Among
    items that are ready, input order wins."""

    def __init__(self, items: Iterable[Item], depends: Mapping[str, Sequence[str]],
                 satisfied: Collection[str], poll_s: float = 0.2):
        super().__init__(())
        self._pending = {item.key: (position, item) for position, item in enumerate(items)}
        self._dependants: dict[str, list[str]] = {}
        self._waiting: dict[str, int] = {}  # key -> dependencies not yet succeeded
        unavailable: set[str] = set()
        for key in self._pending:
            deps = set(depends.get(key, ())) - set(satisfied)
            self._waiting[key] = len(deps)
            for dep in deps:
                self._dependants.setdefault(dep, []).append(key)
                if dep not in self._pending:
                    unavailable.add(dep)
        self._ready = [(position, key) for key, (position, _) in self._pending.items()
                       if not self._waiting[key]]
        heapq.heapify(self._ready)
        self._running = 0
        self._given_up: list[ItemOutcome] = []
        self._cond = threading.Condition()
        self._poll_s = poll_s
        # Neither here nor done before: it did not succeed in an earlier phase.
        for dep in sorted(unavailable):
            self._give_up_dependants(dep, dep)

    def take(self, stop: threading.Event) -> Item | None:
        with self._cond:
            while not stop.is_set():
                while self._ready:
                    _, key = heapq.heappop(self._ready)
                    if key in self._pending:  # not given up meanwhile
                        self._running += 1
                        return self._pending.pop(key)[1]
                if not self._pending:
                    return None
                if not self._running:
                    # Nothing runs that could release them: a cycle (fan-out rejects those,
                    # so only a changed source could get here). Record them, never drop them.
                    stuck = ", ".join(repr(key) for key in self._pending)
                    for _, item in self._pending.values():
                        self._skip(item, f"dependency cycle among {stuck}")
                    self._pending.clear()
                    return None
                self._cond.wait(self._poll_s)
            return None

    def finish(self, outcome: ItemOutcome) -> None:
        with self._cond:
            self._running -= 1
            key = outcome.item.key
            if outcome.status == "succeeded":
                for dependant in self._dependants.get(key, ()):
                    self._waiting[dependant] -= 1
                    if not self._waiting[dependant] and dependant in self._pending:
                        heapq.heappush(self._ready, (self._pending[dependant][0], dependant))
            else:
                self._give_up_dependants(key, key)
            self._cond.notify_all()

    def skipped(self) -> list[ItemOutcome]:
        with self._cond:
            given_up, self._given_up = self._given_up, []
            return given_up

    def _give_up_dependants(self, failed: str, root: str) -> None:
        """Skip every pending item that depends on `failed`, directly or through others."""
        stack = [failed]
        while stack:
            through = stack.pop()
            for key in self._dependants.get(through, ()):
                if key not in self._pending:
                    continue
                _, item = self._pending.pop(key)
                via = "" if through == root else f" (through {through!r})"
                self._skip(item, f"dependency {root!r} failed{via}")
                stack.append(key)

    def _skip(self, item: Item, reason: str) -> None:
        now = time.time()
        self._given_up.append(ItemOutcome(item, "skipped", 0, now, now, error=reason))


def run_items(items: Iterable[Item], runner: ItemRunner, slots: int, sink: OutcomeSink,
              poll_s: float = 0.2, depends: Mapping[str, Sequence[str]] | None = None,
              satisfied: Collection[str] = ()) -> str | None:
    """Run items through `slots` concurrent slots; returns the stop reason, if any.

    With `depends` (item key -> keys it depends on), an item starts only after its
    dependencies succeeded here or are in `satisfied`; dependants of failures are skipped.
    """
    work = (DependencyQueue(items, depends, satisfied, poll_s) if depends
            else ItemQueue(items))
    outcomes: queue.SimpleQueue[ItemOutcome | None] = queue.SimpleQueue()
    stop = runner.stop
    reasons: list[str] = []
    crashes: list[BaseException] = []

    def report(outcome: ItemOutcome) -> None:
        reason = sink.judge(outcome)
        if reason is not None:
            reasons.append(reason)
            stop.set()
        outcomes.put(outcome)

    def slot() -> None:
        try:
            while not stop.is_set():
                item = work.take(stop)
                for given_up in work.skipped():
                    report(given_up)
                if item is None:
                    return
                try:
                    outcome = runner.run(item)
                except BaseException as exc:  # SystemExit, KeyboardInterrupt, MemoryError...
                    # Not an item failure: the step itself must fail (and may be retried by
                    # Dagster); a slot must never vanish with its item unrecorded.
                    crashes.append(exc)
                    stop.set()
                    return
                report(outcome)
                work.finish(outcome)
                for given_up in work.skipped():
                    report(given_up)
        finally:
            outcomes.put(None)  # this slot is done

    workers = [threading.Thread(target=slot, name=f"batch-slot-{i}", daemon=True)
               for i in range(slots)]
    for worker in workers:
        worker.start()
    running = len(workers)
    reason: str | None = None
    while running:
        if reason is None and reasons:
            reason = reasons[0]
        try:
            outcome = outcomes.get(timeout=poll_s)
            if outcome is None:
                running -= 1
            else:
                sink.add(outcome)
        except queue.Empty:
            pass
        if reason is None and (reason := sink.tick()) is not None:
            stop.set()
    if crashes:
        raise StepCrashError(f"a handler raised {describe(crashes[0])}") from crashes[0]
    return reason or (reasons[0] if reasons else None)


class StepCrashError(RuntimeError):
    """A handler raised something that is not an Exception; the step fails as a whole."""
