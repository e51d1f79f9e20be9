"""The rollback's order and bookkeeping, without Dagster: phases in reverse, an item whose
later undo failed keeps its earlier effect, and a retry finishes only what is left."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from batch_defs.engine import run_items
from batch_defs.items import Item
from batch_defs.ledger import Ledger
from batch_defs.rollback import RollbackPlan, rollback_run
from tests.conftest import engine_plan

pytestmark = pytest.mark.unit
UNDO = {"task": "python", "params": {"function": "m:f"}, "retry": {"max_attempts": 1}}


def test_phases_are_undone_last_first_and_a_failed_undo_holds_the_earlier_one(
        unit_ledger: Ledger, tmp_path: Path) -> None:
    plan = engine_plan(unit_ledger, [lambda item, ctx: {"a": 1}, lambda item, ctx: {"b": 1}],
                       tmp_path, phases=[{"undo": UNDO}, {"undo": {**UNDO, "concurrency": 2}}])
    run_items(plan, [Item(str(i), i, {"id": i}) for i in range(6)], tmp_path)
    undone: list[tuple[str, str, float]] = []
    lock = threading.Lock()
    broken = {"3"}

    def undo(phase: str) -> Any:
        def handler(item: dict[str, Any], ctx: Any) -> None:
            if phase == "phase1" and ctx.key in broken:
                raise ConnectionError("the API is down")
            time.sleep(0.01)
            with lock:
                undone.append((phase, ctx.key, time.monotonic()))
            assert item["b" if phase == "phase1" else "a"] == 1  # what the phase put out
        return handler

    rollback = RollbackPlan(plan.spec, unit_ledger, "run-1", "p1", tmp_path, tmp_path,
                            handlers={"phase0": undo("phase0"), "phase1": undo("phase1")})
    report = rollback_run(rollback)
    assert report.line() == "phase1: 5 undone, 1 failed; phase0: 5 undone, 1 held back"
    last_of_phase1 = max(t for phase, _, t in undone if phase == "phase1")
    assert all(t > last_of_phase1 for phase, _, t in undone if phase == "phase0")
    assert "3" not in {key for phase, key, _ in undone if phase == "phase0"}
    # Run again once the API is back: only what is left, each once.
    broken.clear()
    undone.clear()
    assert rollback_run(rollback).line() == "phase1: 1 undone; phase0: 1 undone"
    assert sorted((phase, key) for phase, key, _ in undone) == [("phase0", "3"),
                                                                  ("phase1", "3")]
    assert unit_ledger.undo_counts("run-1", ["phase0", "phase1"]) == {
        "phase0": {"succeeded": 6}, "phase1": {"succeeded": 6}}
