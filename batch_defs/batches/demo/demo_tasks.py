"""Task handlers of the demo batch: plain Python, item in, fields out."""

from __future__ import annotations

import time
from typing import Any

TIERS = [(2000.0, "gold"), (500.0, "silver"), (0.0, "bronze")]


def loyalty_tier(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Stands in for a CRM lookup: waits like one, then derives the customer's tier."""
    time.sleep(ctx.params.get("lookup_ms", 0) / 1000)
    tier = next(name for floor, name in TIERS if item["spent"] >= floor)
    return {"tier": tier, "first_name": item["name"].split()[0]}
