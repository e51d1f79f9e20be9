"""Runs a chunk's items through a handler with a bounded pool of slots, retries and timeouts.

Slots are worker threads pulling the next item as soon as they finish one (the slot refills at
once, like Promise.race); `mode: sequential` is one slot, so items run in input order. Outcomes
flow back to the calling thread, which owns all ledger writes and decides when to stop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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


def run_items(items: Iterable[Item], runner: ItemRunner, slots: int, sink: OutcomeSink,
              poll_s: float = 0.2) -> str | None:
    """Run items through `slots` concurrent slots; returns the stop reason, if any."""
    source: Iterator[Item] = iter(items)
    take_lock = threading.Lock()
    outcomes: queue.SimpleQueue[ItemOutcome | None] = queue.SimpleQueue()
    stop = runner.stop
    reasons: list[str] = []
    crashes: list[BaseException] = []

    def slot() -> None:
        try:
            while not stop.is_set():
                with take_lock:
                    item = None if stop.is_set() else next(source, None)
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
                reason = sink.judge(outcome)
                if reason is not None:
                    reasons.append(reason)
                    stop.set()
                outcomes.put(outcome)
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
