"""The run engine: one pool of slots per run, group commit, working ahead, stops, crashes."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from batch_defs.engine import RunEngine, run_items
from batch_defs.items import Item, ItemSpool
from batch_defs.ledger import Ledger
from batch_defs.runner import StepCrashError
from batch_defs.states import StopKind
from batch_defs.tasks.base import TaskResult
from tests.conftest import engine_plan

pytestmark = pytest.mark.unit


class Tracker:
    """A handler that records overlap, start order, and each item's start and end times."""

    def __init__(self, seconds: float = 0.0, fail: frozenset[str] = frozenset(),
                 slow: dict[str, float] | None = None):
        self.seconds, self.fail, self.slow = seconds, fail, slow or {}
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.order: list[str] = []
        self.times: dict[str, tuple[float, float]] = {}
        self.threads: dict[str, str] = {}

    def __call__(self, item: dict[str, Any], ctx: Any) -> Any:
        started = time.monotonic()
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.order.append(ctx.key)
            self.threads[ctx.key] = threading.current_thread().name
        try:
            time.sleep(self.slow.get(ctx.key, self.seconds))
            if ctx.key in self.fail:
                raise ValueError(f"bad {ctx.key}")
            return {f"{ctx.phase}_seen": ctx.key}
        finally:
            with self.lock:
                self.now -= 1
                self.times[ctx.key] = (started, time.monotonic())


def items(n: int) -> list[Item]:
    return [Item(str(i), i, {"id": i}) for i in range(n)]


def rows(ledger: Ledger, run_id: str = "run-1") -> pd.DataFrame:
    return ledger.rows(run_id)


@pytest.mark.parametrize("slots", [1, 4, 10])
def test_slots_are_never_exceeded_and_all_are_used(unit_ledger: Ledger, tmp_path: Path,
                                                   slots: int) -> None:
    tracker = Tracker(0.02)
    run_items(engine_plan(unit_ledger, [tracker], tmp_path, concurrency=slots), items(60),
              tmp_path)
    recorded = rows(unit_ledger)
    assert len(recorded) == 60 and set(recorded["status"]) == {"succeeded"}
    assert tracker.peak == slots


def test_a_free_slot_takes_the_next_item_at_once(unit_ledger: Ledger, tmp_path: Path) -> None:
    # One slow item must not hold the other slot: 2 slots, one item of 0.5 s and ten short.
    tracker = Tracker(0.01, slow={"0": 0.5})
    run_items(engine_plan(unit_ledger, [tracker], tmp_path, concurrency=2), items(11), tmp_path)
    slow_end = tracker.times["0"][1]
    assert all(tracker.times[str(i)][1] < slow_end for i in range(1, 11))


def test_sequential_runs_in_input_order(unit_ledger: Ledger, tmp_path: Path) -> None:
    tracker = Tracker()
    run_items(engine_plan(unit_ledger, [tracker], tmp_path, mode="sequential"), items(30),
              tmp_path)
    assert tracker.order == [str(i) for i in range(30)] and tracker.peak == 1
    assert list(rows(unit_ledger)["item_key"]) == tracker.order


def test_outputs_flow_to_the_next_phase_and_costs_are_recorded(unit_ledger: Ledger,
                                                                tmp_path: Path) -> None:
    def priced(item: dict[str, Any], ctx: Any) -> TaskResult:
        return TaskResult(output={"price": item["id"] * 2}, cost=0.5, tokens=3)

    seen: list[dict[str, Any]] = []

    def second(item: dict[str, Any], ctx: Any) -> None:
        seen.append(item)

    run_items(engine_plan(unit_ledger, [priced, second], tmp_path), items(5), tmp_path)
    assert sorted(i["price"] for i in seen) == [0, 2, 4, 6, 8]
    assert all(set(i) == {"id", "price"} for i in seen)
    recorded = rows(unit_ledger)
    assert recorded.groupby("phase")["cost"].sum().to_dict() == {"phase0": 2.5, "phase1": 0.0}


class TimedLedger(Ledger):
    """Notes when each item's row became durable, and how many writes it took."""

    def __init__(self, url: str):
        super().__init__(url)
        self.durable: dict[str, float] = {}
        self.writes = 0

    def record(self, rows):  # type: ignore[no-untyped-def]
        stored = super().record(rows)
        now = time.monotonic()
        self.writes += 1
        for row in rows:
            self.durable.setdefault(row["item_key"], now)
        return stored


def test_group_commit_a_slot_goes_on_only_once_its_outcome_is_durable(tmp_path: Path) -> None:
    with TimedLedger(f"sqlite:///{tmp_path / 'timed.db'}") as ledger:
        tracker = Tracker(0.002)
        run_items(engine_plan(ledger, [tracker], tmp_path, concurrency=10), items(300),
                  tmp_path)
        by_slot: dict[str, list[str]] = {}
        for key in tracker.order:
            by_slot.setdefault(tracker.threads[key], []).append(key)
        # Each slot's next item started only after its previous outcome was in the ledger:
        # a crash can only lose the items in flight.
        for keys in by_slot.values():
            for previous, following in zip(keys, keys[1:], strict=False):
                assert tracker.times[following][0] >= ledger.durable[previous]
        assert len(ledger.durable) == 300
        assert ledger.writes < 300  # outcomes that arrive together share one write


def spooled(tmp_path: Path, n: int, size: int) -> list[Any]:
    spool = ItemSpool(tmp_path / "manifest.jsonl")
    for item in items(n):
        spool.add(item)
    return spool.refs(size)


def test_slots_work_ahead_while_a_step_waits(unit_ledger: Ledger, tmp_path: Path) -> None:
    """While phase 0 of chunk 0 is demanded, free slots run phase 1 of its finished items and
    the next chunk's items; later steps then find their items done."""
    tracker = Tracker(0.01)
    refs = spooled(tmp_path, 60, 20)
    engine = RunEngine(engine_plan(unit_ledger, [tracker, tracker], tmp_path, concurrency=4))
    try:
        engine.add_chunks(refs)
        engine.run_chunk(0, refs[0])
        time.sleep(0.3)  # Dagster's bookkeeping between two steps: slots keep going
        ahead = set(tracker.order)
        for phase in (0, 1):
            for ref in refs:
                engine.run_chunk(phase, ref)
    finally:
        engine.close()
    recorded = rows(unit_ledger)
    assert any(key in ahead for key in ("20", "21"))  # the next chunk started early
    assert (recorded["phase"] == "phase1").sum() == 60
    # Every item ran exactly once per phase, however far ahead it was taken.
    assert recorded.groupby(["phase", "item_key"]).size().eq(1).all() and len(recorded) == 120


def test_without_working_ahead_only_demanded_chunks_run(unit_ledger: Ledger,
                                                        tmp_path: Path) -> None:
    tracker = Tracker(0.005)
    refs = spooled(tmp_path, 40, 10)
    engine = RunEngine(engine_plan(unit_ledger, [tracker, tracker], tmp_path, ahead=False))
    try:
        engine.add_chunks(refs)
        engine.run_chunk(0, refs[1])
        time.sleep(0.2)
    finally:
        engine.close()
    assert sorted(tracker.order, key=int) == [str(i) for i in range(10, 20)]


def test_fail_fast_lets_in_flight_items_finish_and_starts_no_more(unit_ledger: Ledger,
                                                                   tmp_path: Path) -> None:
    tracker = Tracker(0.05, fail=frozenset({"3"}))
    report = run_items(engine_plan(unit_ledger, [tracker], tmp_path, concurrency=5),
                       items(100), tmp_path)
    assert report.stop is not None and report.stop.kind is StopKind.FAIL_FAST
    assert report.stop.reason == ("fail_fast: item '3' failed in phase 'phase0': "
                                  "ValueError: bad 3")
    recorded = rows(unit_ledger)
    failure = recorded[recorded["status"] == "failed"].iloc[0]
    # Nothing starts after the failure; the items in flight then (at most 5 slots) finish.
    assert (recorded["started_at"] <= failure["finished_at"] + 0.01).all()
    assert (recorded["finished_at"] > failure["finished_at"]).sum() <= 4
    assert len(recorded) == len(tracker.order) < 15  # every started item was recorded
    assert unit_ledger.stop_request("run-1") == report.stop


def test_budget_stops_starting_items(unit_ledger: Ledger, tmp_path: Path) -> None:
    def priced(item: dict[str, Any], ctx: Any) -> TaskResult:
        time.sleep(0.01)
        return TaskResult(output={}, cost=1.0)

    report = run_items(engine_plan(unit_ledger, [priced], tmp_path, concurrency=2,
                                   budget={"max_cost": 5}), items(40), tmp_path)
    assert report.stop is not None and report.stop.kind is StopKind.BUDGET
    assert 5 <= len(rows(unit_ledger)) <= 6  # the budget, plus what was in flight


def test_a_crashing_handler_fails_the_step_after_recording_the_rest(unit_ledger: Ledger,
                                                                    tmp_path: Path) -> None:
    def call(item: dict[str, Any], ctx: Any) -> None:
        if ctx.key == "5":
            raise SystemExit("worker lost")
        time.sleep(0.01)

    with pytest.raises(StepCrashError, match="a handler raised SystemExit: worker lost"):
        run_items(engine_plan(unit_ledger, [call], tmp_path, concurrency=3), items(50),
                  tmp_path)
    recorded = rows(unit_ledger)
    assert "5" not in set(recorded["item_key"])  # not recorded: a retried step runs it again
    assert set(recorded["status"]) == {"succeeded"} and len(recorded) >= 5


def test_a_second_run_of_the_partition_reuses_successes(unit_ledger: Ledger,
                                                        tmp_path: Path) -> None:
    first = Tracker(fail=frozenset({"2", "7"}))
    run_items(engine_plan(unit_ledger, [first, first], tmp_path, on_error="continue",
                          tolerated_failures=5), items(10), tmp_path)
    second = Tracker()
    report = run_items(engine_plan(unit_ledger, [second, second], tmp_path, run_id="run-2"),
                       items(10), tmp_path)
    # Only the two failed items run again, through both phases; the rest are reused.
    assert sorted(second.order) == ["2", "2", "7", "7"]
    assert report.failed == 0
    again = rows(unit_ledger, "run-2")
    assert len(again) == 20 and set(again["status"]) == {"succeeded"}
    assert again["reused_from"].eq("run-1").sum() == 16
