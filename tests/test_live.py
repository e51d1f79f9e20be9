"""Live changes to a running batch (`batch-defs set`): seen within about a second, applied
without a restart, recorded in the run's log. Measured in real time."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from batch_defs.engine import run_items
from batch_defs.items import Item
from batch_defs.ledger import Ledger
from batch_defs.settings import SettingsError, parse_changes
from batch_defs.spec import BatchSpec
from resources.storage import open_ledger
from tests import control_handlers
from tests.conftest import PROJECT, cli, engine_plan, run_batch, write_batch


@pytest.fixture(autouse=True)
def _reset() -> None:
    control_handlers.reset()


def in_flight(intervals: list[tuple[float, float, str]], at: float) -> int:
    return sum(start <= at < end for start, end, _ in intervals)


def wait_for(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return found


@pytest.mark.cli
@pytest.mark.job
def test_set_raises_the_concurrency_of_a_running_batch_within_two_seconds(
        batch_dir: Path, dagster_home: Path, instance: dg.DagsterInstance) -> None:
    write_batch(batch_dir, {
        "name": "widening",
        "source": {"type": "inline", "key": "id", "items": [{"id": i} for i in range(400)]},
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.control_handlers:timed", "ms": 250}}],
        "options": {"concurrency": 4},
    })
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(
        result=run_batch(batch_dir, instance, "widening")))
    runner.start()
    try:
        run = wait_for(lambda: next(iter(instance.get_runs(limit=1)), None))
        wait_for(lambda: len(control_handlers.intervals) >= 8)
        env = {**os.environ, "DAGSTER_HOME": str(dagster_home),
               "BATCH_DEFS_PATH": str(batch_dir), "PYTHONPATH": str(PROJECT)}
        done = cli(env, "set", run.run_id[:8], "options.concurrency=12")
        assert done.returncode == 0, done.stderr
        assert "in force: options.concurrency=12" in done.stdout
    finally:
        runner.join(120)
    result = outcome["result"]
    assert result.success
    with open_ledger(instance) as ledger:
        changed_at = ledger.run_control(result.run_id)[1]["history"][0]["at"]
    intervals = list(control_handlers.intervals)
    before = [in_flight(intervals, t / 10) for t in range(int(intervals[0][0] * 10) + 1,
                                                           int(changed_at * 10))]
    wider = next(s for s, _, _ in sorted(intervals) if in_flight(intervals, s) > 4)
    later = max(in_flight(intervals, changed_at + 2 + t / 10) for t in range(20))
    print(f"concurrency 4 -> 12: {wider - changed_at:.2f} s after the change, {later} in "
          "flight 2 s later")
    assert max(before) <= 4
    assert 0 <= wider - changed_at <= 2.0
    assert later == 12
    messages = [record.dagster_event.message if record.dagster_event else record.user_message
                for record in instance.all_logs(result.run_id)]
    assert any("live change: options.concurrency 4 -> 12" in m for m in messages)
    assert any("batch-defs set options.concurrency=12" in m for m in messages)


@pytest.mark.unit
def test_rate_and_tolerated_failures_change_while_items_run(
        unit_ledger: Ledger, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    starts: list[tuple[float, str]] = []

    def work(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        starts.append((time.time(), ctx.key))
        if int(ctx.key) >= 97:
            raise ValueError("bad")
        return {}

    plan = engine_plan(unit_ledger, [work], tmp_path, phases=[{"rate": "4/s"}],
                       concurrency=4)
    items = [Item(str(i), i, {"id": i}) for i in range(100)]
    report: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: report.update(
        done=run_items(plan, items, tmp_path)))
    with caplog.at_level(logging.INFO, logger="batch_defs"):
        runner.start()
        wait_for(lambda: unit_ledger.run("run-1") and len(starts) >= 6)
        unit_ledger.change_settings("run-1", {"phases.phase0.rate": "20/s",
                                              "options.tolerated_failures": 3}, by="test")
        changed = time.time()
        runner.join(60)
    # Without the change the first failure (tolerated 0, fail_fast) would stop the batch.
    assert report["done"].stop is None and report["done"].failed == 3
    slow = sorted(t for t, _ in starts if t < changed)
    fast = sorted(t for t, _ in starts if t > changed + 1.5)  # seen within 1 s
    assert len(fast) >= 50
    assert min(b - a for a, b in zip(slow, slow[1:], strict=False)) > 0.2  # 4/s
    assert (fast[-1] - fast[0]) / (len(fast) - 1) < 0.07  # 20/s
    logged = [r.getMessage() for r in caplog.records]
    assert "live change: phases.phase0.rate 4/s -> 20/s (batch-defs set)" in logged
    assert "live change: options.tolerated_failures 3 (0 -> 3 items) (batch-defs set)" in logged


SPEC = BatchSpec.model_validate({
    "name": "live", "source": {"type": "inline", "items": []},
    "phases": [{"name": "fetch", "task": "python", "params": {"function": "m:f"}},
               {"name": "send", "task": "python", "params": {"function": "m:f"}}]})


@pytest.mark.unit
def test_what_may_change_is_checked_before_it_is_stored() -> None:
    assert parse_changes(["options.concurrency=20", "phases[1].rate=5/s",
                          "options.tolerated_failures=2%"], SPEC) == {
        "options.concurrency": 20, "phases.send.rate": "5/s",
        "options.tolerated_failures": "2%"}
    for wrong, message in [
            ("options.concurrency=80", "options.concurrency: Input should be less than or "
                                       "equal to 50"),
            ("options.mode=sequential", "options.mode: cannot be changed while the batch "
                                        "runs"),
            ("phases.store.rate=5/s", "phases.store.rate: no phase 'store' (phases: fetch, "
                                      "send)"),
            ("phases.send.rate=fast", "'fast' is not a rate"),
            ("concurrency", "expected KEY=VALUE")]:
        with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(
                ")", r"\)").replace("[", r"\[")):
            parse_changes([wrong], SPEC)


@pytest.mark.cli
def test_set_on_an_ended_run_says_so_in_one_line(cli_env: dict[str, str],
                                                 batch_dir: Path) -> None:
    write_batch(batch_dir, {
        "name": "quick", "source": {"type": "inline", "key": "id", "items": [{"id": 1}]},
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.control_handlers:scored"}}]})
    ran = cli(cli_env, "run", "quick", "--partition", "p1", "--json")
    assert ran.returncode == 0, ran.stderr
    run_id = next(line.split('"')[3] for line in ran.stdout.splitlines()
                  if '"run_id"' in line)
    done = cli(cli_env, "set", run_id, "options.concurrency=5")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: run {run_id} has already ended (SUCCESS)")


@pytest.mark.unit
def test_a_process_that_joins_a_running_batch_starts_with_its_changes(
        unit_ledger: Ledger, tmp_path: Path) -> None:
    from batch_defs.engine import RunEngine

    plan = engine_plan(unit_ledger, [lambda item, ctx: None], tmp_path, concurrency=4,
                       phases=[{"rate": "2/s"}])
    unit_ledger.start_run("run-1", "unit", "p1", 0, ["phase0"])
    unit_ledger.change_settings("run-1", {"options.concurrency": 9,
                                          "phases.phase0.rate": "30/s"}, by="test")
    engine = RunEngine(plan)
    try:
        assert engine.width == 9 and len(engine.slots) == 9
        assert [b.rate_per_s for b in engine.phases[0].gate.buckets] == [30.0]
    finally:
        engine.close()


@pytest.mark.unit
def test_limits_live_in_redis_for_celery_and_in_the_ledger_otherwise(
        unit_ledger: Ledger) -> None:
    from batch_defs.limits import LedgerLimitStore, RedisLimitStore, open_store

    assert isinstance(open_store(unit_ledger, "celery", "redis://127.0.0.1:6379/0"),
                      RedisLimitStore)
    assert isinstance(open_store(unit_ledger, "in_process", "redis://127.0.0.1:6379/0"),
                      LedgerLimitStore)
    assert isinstance(open_store(unit_ledger, "celery", "amqp://127.0.0.1"),
                      LedgerLimitStore)
