"""Handlers for benchmarks: simulated I/O of a fixed duration, as a network call would be,
pure-Python CPU work of a fixed size, and a marker of the moment the first item starts."""

from __future__ import annotations

import os
import time
from typing import Any

# Set by bench/speed.py in the run's environment: the file the first call writes its time to.
FIRST_CALL_FILE = "BENCH_FIRST_CALL_FILE"
_first_call_seen = False


def simulated_io(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    time.sleep(ctx.params["ms"] / 1000)
    return {f"{ctx.phase}_ok": True}


def burn(loops: int) -> int:
    """Pure-Python CPU work that holds the GIL for its whole length (no sleep, no C call)."""
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


def cpu_work(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """`params.loops` iterations of burn(); the bench calibrates loops to a duration."""
    burn(int(ctx.params["loops"]))
    return {f"{ctx.phase}_ok": True}


def mark_first_call(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Writes time.time() to $BENCH_FIRST_CALL_FILE on the first call of this process (the
    file is created exclusively, so concurrent first calls keep the earliest writer)."""
    global _first_call_seen
    if not _first_call_seen:
        now = time.time()
        _first_call_seen = True
        path = os.environ.get(FIRST_CALL_FILE)
        if path:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as out:
                    out.write(repr(now))
    return {f"{ctx.phase}_ok": True}
