"""Progress: its phrasing, the ETA's accuracy on a real engine run, one throughput figure."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from batch_defs.engine import run_items
from batch_defs.items import Item
from batch_defs.ledger import Ledger
from batch_defs.progress import (
    LiveCounts,
    PhaseTally,
    Progress,
    ProgressWindow,
    read_progress,
    remaining,
)
from batch_defs.summary import summarize_run
from tests.conftest import engine_plan

pytestmark = pytest.mark.unit


def sleeper(seconds: float) -> Any:
    def handler(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        time.sleep(seconds)
        return {f"{ctx.phase}_done": True}

    return handler


def items(n: int) -> list[Item]:
    return [Item(str(i), i, {"id": i}) for i in range(n)]


def test_progress_line_says_done_percent_failed_rate_eta_and_phase() -> None:
    progress = Progress(total_items=1000, done=450, percent=0.45, failed=3, invalid=0,
                        rejected=0, items_per_s=12.4, eta_s=44.2, phase="score",
                        finished=False)
    assert progress.line() == "450/1000 done (45%), 3 failed, 12.4 items/s, ETA 44s, phase score"
    stopped = Progress(total_items=10, done=10, percent=1.0, failed=1, invalid=2, rejected=1,
                       items_per_s=3.0, eta_s=0.0, phase=None, finished=True)
    assert stopped.line() == "10/10 done (100%), 1 failed, 2 invalid, 1 rejected, 3.0 items/s"
    unknown = Progress(total_items=10, done=0, percent=0.0, failed=0, invalid=0, rejected=0,
                       items_per_s=0.0, eta_s=None, phase="score", finished=False)
    assert "ETA ?" in unknown.line()


def test_done_and_percent_agree_and_stopped_items_count_as_done() -> None:
    # 1000 items, 2 phases: 600 through score (3 failed there), 300 through publish.
    counts = LiveCounts({
        "score": PhaseTally({"succeeded": 597, "failed": 3}, stops=3, executed=600,
                            work_s=60.0),
        "publish": PhaseTally({"succeeded": 300}, executed=300, work_s=3.0),
    })
    window = ProgressWindow()
    window.samples.append((100.0, 0, 0.0))
    progress = window.progress(counts, ["score", "publish"], 1000, now=110.0)
    # item-phases done: 600 + 300 + the 3 failed items' publish = 903 of 2000
    assert progress.percent == pytest.approx(903 / 2000)
    assert progress.done == 451 and progress.line().startswith("451/1000 done (45%), 3 failed")
    assert progress.phase == "score" and not progress.finished
    # 900 item-phases in 10 s over 2 phases
    assert progress.items_per_s == pytest.approx(45.0)
    # Work left: 400 score items at 0.1 s and 697 publish items at 0.01 s, done at the pace
    # of 63 work-seconds per 10 s: the slow phase weighs what it costs, not what it counts.
    left = remaining(counts, ["score", "publish"], 1000)
    assert left.units == 400 + 697
    assert left.work_s == pytest.approx(400 * 0.1 + 697 * 0.01)
    assert progress.eta_s == pytest.approx((40 + 6.97) / 6.3)


def test_eta_after_a_quarter_of_1000_steady_items_is_within_15_percent(
        unit_ledger: Ledger, tmp_path: Path) -> None:
    """The requirement's figure: at 25% of a 1,000-item run of steady items (two phases of
    20 ms each, concurrency 10: about 4 s), the predicted end is within 15% of the actual end,
    as a share of the run's duration. Deterministic handlers (fixed sleeps); the tolerance
    is the requirement's own. (A phase that has not run yet is assumed to cost what the
    others do: nothing tells otherwise; once it has run, its own mean counts.)

    The results step's warm-up is done first, as in any process that has run a batch: in a
    fresh one it holds the GIL for most of the first second (importing the charts), slowing
    this 4 s run's first quarter by a fifth (measured: slot use 0.55-0.8 in the first
    second, 0.97 after), which is start-up, not the pace an ETA extrapolates."""
    from batch_defs.report import prepare_charts

    prepare_charts()
    plan = engine_plan(unit_ledger, [sleeper(0.02), sleeper(0.02)], tmp_path, concurrency=10)
    window = ProgressWindow()
    predictions: list[tuple[float, float, float]] = []  # (when, percent, predicted end)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            progress = read_progress(unit_ledger, "run-1", window)
            if progress is not None and progress.eta_s is not None:
                now = time.time()
                predictions.append((now, progress.percent, now + progress.eta_s))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run_items(plan, items(1000), tmp_path / "spool")
    done.set()
    sampler.join()
    rows = unit_ledger.rows("run-1")
    start, end = float(rows["started_at"].min()), float(rows["finished_at"].max())
    at_quarter = next(p for p in predictions if p[1] >= 0.25)
    error = abs(at_quarter[2] - end) / (end - start)
    print(f"ETA at {at_quarter[1]:.1%}: end predicted {at_quarter[2] - start:.2f}s, actual "
          f"{end - start:.2f}s, error {error:.1%}")
    assert error <= 0.15, (f"at {at_quarter[1]:.0%} the ETA said the run ends "
                           f"{at_quarter[2] - start:.2f}s in; it ended {end - start:.2f}s in")


def test_the_ended_run_has_one_throughput_figure(unit_ledger: Ledger, tmp_path: Path) -> None:
    plan = engine_plan(unit_ledger, [sleeper(0.005), sleeper(0.001)], tmp_path, concurrency=4)
    window = ProgressWindow()
    run_items(plan, items(60), tmp_path / "spool")
    progress = read_progress(unit_ledger, "run-1", window)
    summary = summarize_run(unit_ledger, "run-1")
    assert progress is not None and progress.finished
    assert progress.items_per_s == summary.items_per_s > 0
    assert f"{summary.items_per_s:.1f} items/s" in progress.line()
    assert progress.line().startswith("60/60 done (100%), 0 failed")


def test_publishing_is_spaced_to_stay_within_its_budget() -> None:
    from assets.factory import PROGRESS_AT_MOST_S, PROGRESS_BUDGET, Publishing

    cheap = Publishing(last=100.0, cost_s=0.002)
    assert not cheap.due(100.9) and cheap.due(101.0)  # every second
    slow = Publishing(last=100.0, cost_s=0.012)  # 12 ms a publish: every 1.5 s
    assert not slow.due(101.4) and slow.due(100.0 + 0.012 / PROGRESS_BUDGET)
    very_slow = Publishing(last=100.0, cost_s=0.5)
    assert very_slow.due(100.0 + PROGRESS_AT_MOST_S)  # never rarer than every 2 s
