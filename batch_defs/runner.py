"""Runs one item through a phase's handler: attempts, retries with backoff, timeouts.

The slots that call it (one pool per run: batch_defs/engine.py) take the next item as soon as
they finish one, like Promise.race; `mode: sequential` is one slot, so items run in input order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import tenacity

from batch_defs.items import Item
from batch_defs.spec import RetrySpec
from batch_defs.states import ItemStatus, SkipCause
from batch_defs.tasks.base import RejectItem, SkipItem, TaskResult


@dataclass
class ItemOutcome:
    item: Item
    status: ItemStatus
    attempts: int
    started_at: float
    finished_at: float
    output: dict[str, Any] | None = None
    error: str | None = None
    cost: float = 0.0
    tokens: int = 0
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    skip_cause: SkipCause | None = None
    branch: str | None = None  # the route case that ran it

    @property
    def duration_s(self) -> float:
        return self.finished_at - self.started_at


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


class NotStarted(Exception):  # noqa: N818 - an outcome, not an error
    """The batch stopped while the item waited for its rate limit: it did not start, and is
    left for a resume (nothing is recorded)."""


class ItemRunner:
    """Runs one item with retries and a per-attempt timeout; thread-safe.

    With a `gate` (batch_defs/limits.py), each attempt first waits for its rate limits and
    concurrency limits, outside the attempt's timeout, and reports how it went (a 429 makes
    adaptive limits back off)."""

    def __init__(self, call: Call, phase: str, retry: RetrySpec, timeout_s: float | None,
                 merge: bool, stop: threading.Event, gate: Any = None):
        self.call, self.phase, self.retry = call, phase, retry
        self.timeout_s, self.merge, self.stop = timeout_s, merge, stop
        self.gate = gate
        self.wait = backoff_wait(retry)
        self._retrying = tenacity.Retrying(wait=self.wait)

    def _attempt(self, item: Item, attempt: int, permit: Any) -> Any:
        try:
            result = call_with_timeout(partial(self.call, item, attempt), self.timeout_s)
        except BaseException as exc:
            if permit is not None:
                permit.release(exc)
            raise
        if permit is not None:
            permit.release(None)
        return result

    def run(self, item: Item) -> ItemOutcome:
        """The item's outcome; NotStarted if a stop came before its first attempt began."""
        started = 0.0  # when the first attempt began, past any wait for a limit
        log: list[dict[str, Any]] = []
        attempt = 0
        while True:
            attempt += 1
            permit = self.gate.acquire(self.stop) if self.gate is not None else None
            if self.gate is not None and permit is None:  # a stop came while it waited
                if attempt == 1:
                    raise NotStarted()
                return ItemOutcome(item, ItemStatus.FAILED, attempt - 1, started, time.time(),
                                   error=log[-1]["error"], attempt_log=log)
            started = started or (permit.granted_at if permit is not None else time.time())
            try:
                result = self._attempt(item, attempt, permit)
                output, cost, tokens = to_output(item, result, self.phase, self.merge)
                return ItemOutcome(item, ItemStatus.SUCCEEDED, attempt, started, time.time(),
                                   output=output, cost=cost, tokens=tokens, attempt_log=log)
            except SkipItem as exc:
                return ItemOutcome(item, ItemStatus.SKIPPED, attempt, started, time.time(),
                                   error=str(exc), attempt_log=log,
                                   skip_cause=SkipCause.HANDLER)
            except RejectItem as exc:
                # What the item paid before the verdict stays on its row (and the budget).
                return ItemOutcome(item, ItemStatus.REJECTED, attempt, started, time.time(),
                                   error=str(exc), cost=exc.cost, tokens=exc.tokens,
                                   attempt_log=[*log, *exc.attempt_log])
            except Exception as exc:
                last = (attempt >= self.retry.max_attempts
                        or not is_retryable(exc, self.retry.retry_on))
                wait_s = 0.0 if last else self._backoff(attempt, exc)
                log.append({"attempt": attempt, "error": describe(exc), "wait_s": round(wait_s, 3)})
                # A stop (fail-fast elsewhere, pause) ends the backoff early: no new attempt.
                if last or self.stop.wait(wait_s):
                    return ItemOutcome(item, ItemStatus.FAILED, attempt, started, time.time(),
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


class StepCrashError(RuntimeError):
    """A handler raised something that is not an Exception; the step fails as a whole."""
