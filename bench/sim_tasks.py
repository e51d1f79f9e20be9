"""Handlers for benchmarks: simulated I/O of a fixed duration, as a network call would be."""

from __future__ import annotations

import time
from typing import Any


def simulated_io(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    time.sleep(ctx.params["ms"] / 1000)
    return {f"{ctx.phase}_ok": True}
