"""Task handlers used by the tests: plain functions, as users write them."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Any

from batch_defs import TaskResult

_lock = threading.Lock()
in_flight = 0
max_in_flight = 0
started: list[str] = []
passed_gate = 0


def reset() -> None:
    global in_flight, max_in_flight, passed_gate
    with _lock:
        in_flight = max_in_flight = passed_gate = 0
        started.clear()


def wait_at_gate(ctx: Any) -> None:
    """Lets the first params.open_for calls through, then holds the others until the file
    params.gate exists: a test acts on a run part-way through however loaded the machine is
    (a fixed sleep would let the run finish first), then opens the gate."""
    global passed_gate
    gate = ctx.params.get("gate")
    if not gate:
        return
    with _lock:
        passed_gate += 1
        if passed_gate <= int(ctx.params.get("open_for", 0)):
            return
    while not os.path.exists(gate):
        time.sleep(0.02)


def sleep_ms(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Simulated I/O that also records how many calls overlap."""
    global in_flight, max_in_flight
    with _lock:
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        started.append(ctx.key)
    try:
        wait_at_gate(ctx)
        time.sleep(float(ctx.params.get("ms", 10)) / 1000)
    finally:
        with _lock:
            in_flight -= 1
    return {f"{ctx.phase}_done": True}


def fail_listed(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Fails for the item keys in params.fail_keys (or in the file named by params.fail_file,
    so a test can 'fix' the data between runs)."""
    keys = {str(k) for k in ctx.params.get("fail_keys", [])}
    fail_file = ctx.params.get("fail_file")
    if fail_file and os.path.exists(fail_file):
        with open(fail_file) as handle:
            keys |= set(handle.read().split())
    count_calls(ctx)
    if ctx.key in keys:
        raise ValueError(f"bad record {ctx.key}")
    return {"score": len(str(item))}


def count_calls(ctx: Any) -> None:
    """Counts calls per (phase, key) in a real SQLite table named by params.calls_db."""
    db = ctx.params.get("calls_db")
    if not db:
        return
    with sqlite3.connect(db, timeout=30) as conn:
        conn.execute("create table if not exists calls (phase text, key text)")
        conn.execute("insert into calls values (?, ?)", (ctx.phase, ctx.key))


def flaky(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Fails the first params.failures attempts of every item, then succeeds."""
    if ctx.attempt <= int(ctx.params.get("failures", 2)):
        raise ConnectionError(f"attempt {ctx.attempt} refused")
    return {"attempt_that_worked": ctx.attempt}


def priced(item: dict[str, Any], ctx: Any) -> TaskResult:
    return TaskResult(output={"priced": True}, cost=0.25, tokens=100)


def skip_odd(item: dict[str, Any], ctx: Any) -> None:
    if int(item["id"]) % 2:
        ctx.skip("odd id")


def counted(item: dict[str, Any], ctx: Any) -> TaskResult:
    """Counts its calls per key in a real table, waits params.ms, costs params.cost."""
    count_calls(ctx)
    wait_at_gate(ctx)
    time.sleep(float(ctx.params.get("ms", 0)) / 1000)
    return TaskResult(output={f"{ctx.phase}_done": True}, cost=float(ctx.params.get("cost", 0)))


def crash_first_step(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Raises a non-item error (like a lost connection pool) the first time the step runs:
    the whole step fails, and Dagster's RetryPolicy runs it again."""
    count_calls(ctx)
    marker = ctx.params["marker"]
    if item["id"] == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        raise SystemExit("worker lost")  # not an Exception: escapes the item's retries
    return {"ok": True}


def after_then_wait(rows: Any, ctx: Any) -> dict[str, Any]:
    """An after step that says it has started (params.marker) and then waits for a release
    file beside it, so a test can kill the run inside an after step."""
    marker = ctx.params["marker"]
    release = os.path.join(os.path.dirname(marker), "release")
    open(marker, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"waited": True}


def burn_cpu(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Pure-Python CPU work for params.ms of CPU time; says which process ran it."""
    end = time.thread_time() + float(ctx.params.get("ms", 5)) / 1000
    while time.thread_time() < end:
        pass
    return {"pid": os.getpid()}


def die_on_listed(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Kills its own process for the keys in params.die_keys (a crashed worker); fails with a
    plain error for params.fail_keys."""
    if ctx.key in {str(k) for k in ctx.params.get("die_keys", [])}:
        os._exit(7)
    if ctx.key in {str(k) for k in ctx.params.get("fail_keys", [])}:
        raise ValueError(f"bad item {ctx.key}")
    return {"pid": os.getpid()}
