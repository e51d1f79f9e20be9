"""Task handlers for the tests of conditions, routes, limits and compensation."""

from __future__ import annotations

import threading
import time
from typing import Any

_lock = threading.Lock()
intervals: list[tuple[float, float, str]] = []  # (start, end, key) of each call


def reset() -> None:
    with _lock:
        intervals.clear()


def tagged(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Says which params it ran with (a route case's own, merged over the phase's)."""
    return {"channel": ctx.params.get("channel"), "region": ctx.params.get("region"),
            "seen_phase": ctx.phase}


def scored(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"score": int(item["id"]) % 10}


def timed(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Waits params.ms and records when it ran, for counts per second."""
    started = time.time()
    time.sleep(float(ctx.params.get("ms", 0)) / 1000)
    with _lock:
        intervals.append((started, time.time(), ctx.key))
    return {"timed": True}


def hold_until_file(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Waits (at most params.timeout_s) until the file params.marker exists."""
    import os

    deadline = time.monotonic() + float(ctx.params.get("timeout_s", 120))
    while not os.path.exists(ctx.params["marker"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {"released": True}
