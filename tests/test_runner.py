"""The slot runner: bounded concurrency, input order, retries, timeouts, skips, stops."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from batch_defs.items import Item
from batch_defs.runner import (
    ItemOutcome,
    ItemRunner,
    StepCrashError,
    is_retryable,
    run_items,
    to_output,
)
from batch_defs.spec import RetrySpec
from batch_defs.tasks.base import RejectItem, SkipItem, TaskResult

pytestmark = pytest.mark.unit


class ListSink:
    def __init__(self, stop_on_failure: bool = False):
        self.outcomes: list[ItemOutcome] = []
        self.stop_on_failure = stop_on_failure

    def judge(self, outcome: ItemOutcome) -> str | None:
        return "a failure" if self.stop_on_failure and outcome.status == "failed" else None

    def add(self, outcome: ItemOutcome) -> None:
        self.outcomes.append(outcome)

    def tick(self) -> str | None:
        return None


class Tracker:
    """A handler that records overlap and start order."""

    def __init__(self, seconds: float, fail: set[str] = frozenset()):  # type: ignore[assignment]
        self.seconds, self.fail = seconds, fail
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.order: list[str] = []

    def __call__(self, item: Item, attempt: int) -> Any:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.order.append(item.key)
        try:
            time.sleep(self.seconds)
            if item.key in self.fail:
                raise ValueError(f"bad {item.key}")
            return {"seen": item.key}
        finally:
            with self.lock:
                self.now -= 1


def items(n: int) -> list[Item]:
    return [Item(str(i), i, {"id": i}) for i in range(n)]


def runner(call: Any, retry: RetrySpec | None = None, timeout_s: float | None = None
           ) -> ItemRunner:
    return ItemRunner(call, "phase", retry or RetrySpec(), timeout_s, True, threading.Event())


@pytest.mark.parametrize("slots", [1, 4, 10])
def test_slots_are_never_exceeded_and_all_are_used(slots: int) -> None:
    tracker = Tracker(0.02)
    sink = ListSink()
    run_items(items(60), runner(tracker), slots, sink)
    assert len(sink.outcomes) == 60
    assert tracker.peak == slots
    assert all(o.status == "succeeded" for o in sink.outcomes)


def test_slots_refill_as_items_finish() -> None:
    # One slow item must not hold the other slot: 2 slots, 1 item of 0.5 s + 10 of 0.02 s.
    def call(item: Item, attempt: int) -> None:
        time.sleep(0.5 if item.key == "0" else 0.02)

    started = time.monotonic()
    run_items(items(11), runner(call), 2, ListSink())
    assert time.monotonic() - started < 0.5 + 0.15


def test_sequential_runs_in_input_order() -> None:
    tracker = Tracker(0.001)
    sink = ListSink()
    run_items(items(30), runner(tracker), 1, sink)
    assert tracker.order == [str(i) for i in range(30)]
    assert [o.item.key for o in sink.outcomes] == tracker.order
    assert tracker.peak == 1


def test_flaky_item_succeeds_on_third_attempt_with_recorded_backoff() -> None:
    def call(item: Item, attempt: int) -> dict:
        if attempt < 3:
            raise ConnectionError(f"refused {attempt}")
        return {"ok": attempt}

    retry = RetrySpec(max_attempts=3, backoff="exponential", delay_s=0.05, jitter=False)
    sink = ListSink()
    run_items(items(1), runner(call, retry), 1, sink)
    (outcome,) = sink.outcomes
    assert outcome.status == "succeeded" and outcome.attempts == 3
    assert outcome.output == {"id": 0, "ok": 3}
    assert [a["wait_s"] for a in outcome.attempt_log] == [0.05, 0.1]
    assert outcome.attempt_log[0]["error"] == "ConnectionError: refused 1"
    assert outcome.duration_s >= 0.15


def test_retries_exhausted_and_retry_on_filter() -> None:
    def call(item: Item, attempt: int) -> None:
        raise KeyError("missing")

    sink = ListSink()
    retry = RetrySpec(max_attempts=5, delay_s=0, retry_on=["TimeoutError", 503])
    run_items(items(1), runner(call, retry), 1, sink)
    assert sink.outcomes[0].status == "failed"
    assert sink.outcomes[0].attempts == 1  # KeyError is not in retry_on
    assert sink.outcomes[0].error == "KeyError: 'missing'"

    class HttpError(Exception):
        status_code = 503

    assert is_retryable(HttpError(), [503]) and not is_retryable(HttpError(), [429])
    assert is_retryable(TimeoutError(), ["OSError"])  # matched through the class hierarchy


def test_timeout_fails_the_attempt() -> None:
    def call(item: Item, attempt: int) -> None:
        time.sleep(2)

    sink = ListSink()
    started = time.monotonic()
    run_items(items(1), runner(call, timeout_s=0.1), 1, sink)
    assert time.monotonic() - started < 1
    assert sink.outcomes[0].status == "failed"
    assert sink.outcomes[0].error == "TimeoutError: timed out after 0.1s"


def test_skip_reject_and_task_result() -> None:
    def call(item: Item, attempt: int) -> Any:
        if item.seq == 0:
            raise SkipItem("not needed")
        if item.seq == 2:
            raise RejectItem("total must be > 0")
        return TaskResult(output={"x": 1}, cost=0.5, tokens=7)

    sink = ListSink()
    run_items(items(3), runner(call, RetrySpec(max_attempts=3)), 1, sink)
    skipped, priced, rejected = sink.outcomes
    assert (rejected.status, rejected.error, rejected.attempts) == (
        "rejected", "total must be > 0", 1)  # a verdict is not retried
    assert (skipped.status, skipped.error, skipped.attempts) == ("skipped", "not needed", 1)
    assert (priced.status, priced.cost, priced.tokens) == ("succeeded", 0.5, 7)
    assert priced.output == {"id": 1, "x": 1}


def test_stop_lets_in_flight_items_finish_and_starts_no_more() -> None:
    tracker = Tracker(0.05, fail={"3"})
    sink = ListSink(stop_on_failure=True)
    reason = run_items(items(100), runner(tracker), 5, sink)
    assert reason == "a failure"
    failure = next(o for o in sink.outcomes if o.status == "failed")
    # Nothing starts after the failure; the items in flight then (at most the 5 slots) finish.
    assert all(o.started_at <= failure.finished_at + 0.01 for o in sink.outcomes)
    finished_later = [o for o in sink.outcomes if o.finished_at > failure.finished_at]
    assert len(finished_later) <= 4
    assert len(sink.outcomes) == len(tracker.order) < 15  # every started item was recorded


def test_to_output_merges_or_replaces() -> None:
    item = Item("k", 1, {"a": 1, "b": 2})
    assert to_output(item, {"b": 3}, "p", merge=True)[0] == {"a": 1, "b": 3}
    assert to_output(item, {"b": 3}, "p", merge=False)[0] == {"b": 3}
    assert to_output(item, None, "p", merge=True)[0] == {"a": 1, "b": 2}
    assert to_output(item, 42, "score", merge=True)[0] == {"a": 1, "b": 2, "score": 42}


def test_a_crashing_handler_fails_the_step_after_recording_the_rest() -> None:
    def call(item: Item, attempt: int) -> None:
        if item.seq == 5:
            raise SystemExit("worker lost")
        time.sleep(0.01)

    sink = ListSink()
    with pytest.raises(StepCrashError, match="a handler raised SystemExit: worker lost"):
        run_items(items(50), runner(call), 3, sink)
    assert 5 <= len(sink.outcomes) < 50  # items finished before the crash were handed over
    assert all(o.status == "succeeded" for o in sink.outcomes)


def test_retry_after_and_permanent_errors() -> None:
    class ThrottledError(Exception):
        retry_after_s = 0.3

    class NotFoundError(Exception):
        transient = False

    def call(item: Item, attempt: int) -> dict:
        if item.seq == 1:
            raise NotFoundError("404")
        if attempt == 1:
            raise ThrottledError("429")
        return {}

    sink = ListSink()
    retry = RetrySpec(max_attempts=3, delay_s=0.01, jitter=False)
    run_items(items(2), runner(call, retry), 2, sink)
    throttled, missing = sorted(sink.outcomes, key=lambda o: o.item.seq)
    assert throttled.status == "succeeded" and throttled.attempt_log[0]["wait_s"] == 0.3
    assert (missing.status, missing.attempts) == ("failed", 1)  # permanent: not retried
