"""Handlers for the counts tests: each item's outcome is chosen by its key."""

from __future__ import annotations

import time
from typing import Any

from batch_defs import TaskResult


def sort_outcomes(item: dict[str, Any], ctx: Any) -> TaskResult:
    """Fails, rejects or skips the keys listed in params; the others succeed at params.cost."""
    key = int(ctx.key)
    if key in ctx.params.get("fail_keys", []):
        raise ValueError(ctx.params.get("error") or f"bad record {ctx.key}")
    if key in ctx.params.get("reject_keys", []):
        ctx.reject(f"rule: {ctx.key} is out of range")
    if key in ctx.params.get("skip_keys", []):
        ctx.skip("nothing to do")
    time.sleep(float(ctx.params.get("ms", 0)) / 1000)
    return TaskResult(output={f"{ctx.phase}_done": True}, cost=float(ctx.params.get("cost", 0)))


def steady(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The same duration for every item: params.ms."""
    time.sleep(float(ctx.params.get("ms", 10)) / 1000)
    return {f"{ctx.phase}_done": True}


def cancel_at(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Asks for the run to be canceled when it reaches item params.key (as `batch-defs cancel`
    does, through the ledger), then takes params.ms like every item."""
    from batch_defs.ledger import StopRequest
    from batch_defs.states import StopKind

    if ctx.key == str(ctx.params["key"]):
        ctx.journal.request_stop(ctx.run_id, StopRequest(StopKind.CANCELED, "canceled: by a test"))
    time.sleep(float(ctx.params.get("ms", 0)) / 1000)
    return {"seen": True}
