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


heartbeat_ages: list[float] = []  # lease heartbeat ages seen by watch_lease_for


def watch_lease_for(rows: Any, ctx: Any) -> dict[str, Any]:
    """An after step that runs no items for params.seconds, noting every 0.25 s how old the
    partition lease's heartbeat is (as another process deciding whether the run lives would)."""
    from batch_defs.ledger import Ledger

    heartbeat_ages.clear()
    with Ledger(ctx.params["ledger_url"]) as ledger:
        deadline = time.time() + float(ctx.params["seconds"])
        while time.time() < deadline:
            holder = ledger.lease_holder(ctx.batch, ctx.partition)
            heartbeat_ages.append(time.time() - holder.heartbeat_at if holder else -1.0)
            time.sleep(0.25)
    return {}
