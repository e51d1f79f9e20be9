"""One item through a phase's handler: retries with backoff, retry_on, timeouts, verdicts."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from batch_defs.items import Item
from batch_defs.runner import ItemOutcome, ItemRunner, is_retryable, to_output
from batch_defs.spec import RetrySpec
from batch_defs.states import ItemStatus
from batch_defs.tasks.base import RejectItem, SkipItem, TaskResult

pytestmark = pytest.mark.unit


def run(call: Any, retry: RetrySpec | None = None, timeout_s: float | None = None,
        item: Item | None = None) -> ItemOutcome:
    runner = ItemRunner(call, "phase", retry or RetrySpec(), timeout_s, True, threading.Event())
    return runner.run(item or Item("0", 0, {"id": 0}))


def test_flaky_item_succeeds_on_third_attempt_with_recorded_backoff() -> None:
    def call(item: Item, attempt: int) -> dict:
        if attempt < 3:
            raise ConnectionError(f"refused {attempt}")
        return {"ok": attempt}

    outcome = run(call, RetrySpec(max_attempts=3, backoff="exponential", delay_s=0.05,
                                  jitter=False))
    assert outcome.status == ItemStatus.SUCCEEDED and outcome.attempts == 3
    assert outcome.output == {"id": 0, "ok": 3}
    assert [a["wait_s"] for a in outcome.attempt_log] == [0.05, 0.1]
    assert outcome.attempt_log[0]["error"] == "ConnectionError: refused 1"
    assert outcome.duration_s >= 0.15


def test_retries_exhausted_and_retry_on_filter() -> None:
    def call(item: Item, attempt: int) -> None:
        raise KeyError("missing")

    outcome = run(call, RetrySpec(max_attempts=5, delay_s=0, retry_on=["TimeoutError", 503]))
    assert outcome.status == ItemStatus.FAILED
    assert outcome.attempts == 1  # KeyError is not in retry_on
    assert outcome.error == "KeyError: 'missing'"

    class HttpError(Exception):
        status_code = 503

    assert is_retryable(HttpError(), [503]) and not is_retryable(HttpError(), [429])
    assert is_retryable(TimeoutError(), ["OSError"])  # matched through the class hierarchy


def test_timeout_fails_the_attempt() -> None:
    release = threading.Event()

    def call(item: Item, attempt: int) -> None:
        release.wait(5)

    outcome = run(call, timeout_s=0.1)
    release.set()
    assert outcome.status == ItemStatus.FAILED
    assert outcome.error == "TimeoutError: timed out after 0.1s"


def test_skip_reject_and_task_result() -> None:
    def call(item: Item, attempt: int) -> Any:
        if item.seq == 0:
            raise SkipItem("not needed")
        if item.seq == 2:
            raise RejectItem("total must be > 0")
        return TaskResult(output={"x": 1}, cost=0.5, tokens=7)

    retry = RetrySpec(max_attempts=3)
    skipped, priced, rejected = (run(call, retry, item=Item(str(i), i, {"id": i}))
                                 for i in range(3))
    assert (rejected.status, rejected.error, rejected.attempts) == (
        "rejected", "total must be > 0", 1)  # a verdict is not retried
    assert (skipped.status, skipped.error, skipped.attempts) == ("skipped", "not needed", 1)
    assert (priced.status, priced.cost, priced.tokens) == ("succeeded", 0.5, 7)
    assert priced.output == {"id": 1, "x": 1}


def test_to_output_merges_or_replaces() -> None:
    item = Item("k", 1, {"a": 1, "b": 2})
    assert to_output(item, {"b": 3}, "p", merge=True)[0] == {"a": 1, "b": 3}
    assert to_output(item, {"b": 3}, "p", merge=False)[0] == {"b": 3}
    assert to_output(item, None, "p", merge=True)[0] == {"a": 1, "b": 2}
    assert to_output(item, 42, "score", merge=True)[0] == {"a": 1, "b": 2, "score": 42}


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

    retry = RetrySpec(max_attempts=3, delay_s=0.01, jitter=False)
    started = time.monotonic()
    throttled = run(call, retry)
    assert throttled.status == "succeeded" and throttled.attempt_log[0]["wait_s"] == 0.3
    assert time.monotonic() - started >= 0.3  # the server's Retry-After was waited
    missing = run(call, retry, item=Item("1", 1, {}))
    assert (missing.status, missing.attempts) == ("failed", 1)  # permanent: not retried
