"""Recovery through the CLI: a killed worker, pause, cancel and budget, each then resumed.

Every test counts handler calls per (phase, item) in a real SQLite table, so "no item is
run twice" is checked against what actually happened, not against the ledger's own word.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import sqlalchemy as sa

from batch_defs.ledger import Ledger
from resources.storage import BatchStorageResource
from tests.conftest import cli, inline_items, start_cli, write_batch

pytestmark = pytest.mark.cli



def counted_batch(batch_dir: Path, calls: Path, items: int, ms: float, cost: float = 0.0,
                  phases: int = 2, gate: dict[str, object] | None = None,
                  **options: object) -> None:
    """`gate`: {"gate": FILE, "open_for": N} holds calls after the first N until FILE exists."""
    write_batch(batch_dir, {
        "name": "durable",
        "source": inline_items(items),
        "phases": [{"name": f"step{p}", "task": "python",
                    "params": {"function": "tests.handlers:counted", "ms": ms, "cost": cost,
                               "calls_db": str(calls), **(gate or {})}}
                   for p in range(1, phases + 1)],
        "options": {"concurrency": 10, **options},
    })


def ledger_rows(home: Path) -> pd.DataFrame:
    engine = sa.create_engine(f"sqlite:///{home / 'batch_ledger.db'}")
    try:
        return pd.read_sql("select * from batch_item", engine)
    finally:
        engine.dispose()


def calls_per_item(calls: Path) -> dict[tuple[str, str], int]:
    with sqlite3.connect(calls) as conn:
        return {(p, k): n for p, k, n in
                conn.execute("select phase, key, count(*) from calls group by phase, key")}


def wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def succeeded_so_far(home: Path) -> int:
    if not (home / "batch_ledger.db").exists():
        return 0
    try:
        rows = ledger_rows(home)
    except Exception:  # the tables may not exist yet
        return 0
    return int((rows["status"] == "succeeded").sum())


def only_run_id(home: Path) -> str:
    with dg.DagsterInstance.from_config(str(home)) as inst:
        (run,) = inst.get_runs()
        return run.run_id


def assert_each_item_succeeded_once(rows: pd.DataFrame, items: int, phases: int) -> None:
    executed = rows[(rows["status"] == "succeeded") & rows["reused_from"].isna()]
    per_item = executed.groupby(["phase", "item_key"]).size()
    assert len(per_item) == items * phases and set(per_item) == {1}


def test_killed_worker_resumes_without_rerunning_finished_items(
        env: dict[str, str], batch_dir: Path, tmp_path: Path) -> None:
    calls, home = tmp_path / "calls.db", tmp_path / "home"
    # Calls after the 260th wait for the gate: the kill lands mid-way however loaded the
    # machine is; the resumed run finds the gate open.
    gate = tmp_path / "gate"
    counted_batch(batch_dir, calls, items=500, ms=40, gate={"gate": str(gate), "open_for": 260})
    worker = start_cli(env, "run", "durable", "--partition", "nov")
    wait_for(lambda: succeeded_so_far(home) >= 250)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    time.sleep(0.2)
    before = ledger_rows(home)
    done_before = set(zip(before["phase"], before["item_key"], strict=True))
    assert 250 <= len(done_before) <= 260  # killed mid-way
    gate.touch()

    resumed = cli(env, "resume", only_run_id(home)[:8])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "SUCCESS" in resumed.stdout

    rows = ledger_rows(home)
    assert_each_item_succeeded_once(rows, items=500, phases=2)
    counts = calls_per_item(calls)
    assert len(counts) == 1000
    assert all(counts[key] == 1 for key in done_before)  # recorded before the kill: once
    last_run = rows[rows["run_id"] != before["run_id"].iloc[0]]
    assert len(last_run) == 1000 and set(last_run["status"]) == {"succeeded"}


def test_pause_then_resume_runs_every_item_exactly_once(
        env: dict[str, str], batch_dir: Path, tmp_path: Path) -> None:
    calls, home = tmp_path / "calls.db", tmp_path / "home"
    # 300 items x 2 phases x 100 ms at concurrency 10; calls after the 100th wait for the
    # gate, which opens once the pause is asked for: the run is paused mid-way.
    gate = tmp_path / "gate"
    counted_batch(batch_dir, calls, items=300, ms=100, gate={"gate": str(gate), "open_for": 100})
    worker = start_cli(env, "run", "durable", "--partition", "nov")
    wait_for(lambda: succeeded_so_far(home) >= 100)
    run_id = only_run_id(home)
    paused = cli(env, "pause", run_id, "--no-wait")
    assert paused.returncode == 0, paused.stderr
    gate.touch()
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 1 and "FAILURE (paused)" in output
    at_pause = len(ledger_rows(home))
    assert at_pause < 600
    status = cli(env, "status", run_id, "--json")
    assert '"state": "paused"' in status.stdout

    resumed = cli(env, "resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_each_item_succeeded_once(ledger_rows(home), items=300, phases=2)
    # In-flight items finished and were recorded at the pause: nothing ran twice.
    assert set(calls_per_item(calls).values()) == {1}
    assert len(calls_per_item(calls)) == 600


def test_budget_pauses_and_a_higher_budget_continues(
        env: dict[str, str], batch_dir: Path, tmp_path: Path) -> None:
    calls, home = tmp_path / "calls.db", tmp_path / "home"
    counted_batch(batch_dir, calls, items=100, ms=5, cost=0.25, phases=1,
                  budget={"max_cost": 5.0})
    first = cli(env, "run", "durable", "--partition", "nov")
    assert first.returncode == 1
    assert "FAILURE (paused)" in first.stdout and "budget: spent" in first.stdout
    spent = ledger_rows(home)["cost"].sum()
    assert 5.0 <= spent <= 5.0 + 10 * 0.25  # stopped once reached; in-flight items finished

    again = cli(env, "resume", only_run_id(home))
    assert again.returncode == 1 and "budget: spent" in again.stdout  # same budget: no spend
    assert ledger_rows(home)["cost"].sum() == spent

    with dg.DagsterInstance.from_config(str(home)) as inst:
        latest = inst.get_runs(limit=1)[0].run_id
    more = cli(env, "resume", latest, "--set", "options.budget.max_cost=100")
    assert more.returncode == 0, more.stdout + more.stderr
    rows = ledger_rows(home)
    assert_each_item_succeeded_once(rows, items=100, phases=1)
    assert rows[rows["reused_from"].isna()]["cost"].sum() == pytest.approx(25.0)
    assert set(calls_per_item(calls).values()) == {1}


def test_cancel_stops_the_run_and_resume_finishes_it(
        env: dict[str, str], batch_dir: Path, tmp_path: Path) -> None:
    calls, home = tmp_path / "calls.db", tmp_path / "home"
    # Calls after the 50th wait for the gate, which opens once the cancel is asked for: 5.5 s
    # of work is left then, so the run is canceled mid-way however loaded the machine is.
    gate = tmp_path / "gate"
    counted_batch(batch_dir, calls, items=300, ms=100, gate={"gate": str(gate), "open_for": 50})
    worker = start_cli(env, "run", "durable", "--partition", "nov")
    wait_for(lambda: succeeded_so_far(home) >= 50)
    run_id = only_run_id(home)
    cancel = start_cli(env, "cancel", run_id, "--grace", "60")
    with Ledger(f"sqlite:///{home / 'batch_ledger.db'}") as ledger:
        wait_for(lambda: ledger.stop_request(run_id) is not None)
    gate.touch()
    _, error = cancel.communicate(timeout=120)
    assert cancel.returncode == 0, error
    worker.wait(timeout=60)
    with dg.DagsterInstance.from_config(str(home)) as inst:
        run = inst.get_run_by_id(run_id)
        assert run.status == dg.DagsterRunStatus.CANCELED
        assert run.tags["batch/state"] == "canceled"
        assert BatchStorageResource().ledger(inst).run(run_id)["status"] == "canceled"
    resumed = cli(env, "resume", run_id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_each_item_succeeded_once(ledger_rows(home), items=300, phases=2)
    assert set(calls_per_item(calls).values()) == {1}


def test_dead_letters_are_fixed_and_rerun(env: dict[str, str], batch_dir: Path,
                                          tmp_path: Path) -> None:
    fail_file = tmp_path / "broken_keys.txt"
    fail_file.write_text("4 9")
    write_batch(batch_dir, {
        "name": "letters", "source": {"type": "csv", "path": "people.csv", "key": "id",
                                      "schema": {"id": "int", "email": "email"}},
        "phases": [{"name": "score", "task": "python",
                    "params": {"function": "tests.handlers:fail_listed",
                               "fail_file": str(fail_file)}}],
        "options": {"on_error": "continue", "tolerated_failures": "50%"},
    })
    lines = ["id,email"] + [f"{i},p{i}@example.com" for i in range(1, 11)] + ["11,broken"]
    (batch_dir / "people.csv").write_text("\n".join(lines) + "\n")
    first = cli(env, "run", "letters", "--partition", "nov")
    assert first.returncode == 0, first.stderr
    run_id = first.stdout.split("\n")[0].split()[1]
    dead = cli(env, "results", run_id, "--status", "failed,invalid", "--format", "jsonl")
    rows = [json.loads(line) for line in dead.stdout.splitlines()]
    assert [(r["item_key"], r["status"], r["attempts"]) for r in rows] == [
        ("4", "failed", 1), ("9", "failed", 1), ("11", "invalid", 0)]
    assert rows[0]["error"] == "ValueError: bad record 4"
    assert rows[0]["input"] == {"id": 4, "email": "p4@example.com"}
    # The user fixes the data: the handler no longer fails, the bad email is corrected.
    fail_file.write_text("")
    rows[2]["input"]["email"] = "p11@example.com"
    dead_letters = tmp_path / "to_fix.jsonl"
    dead_letters.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = cli(env, "run", "letters", "--data", str(dead_letters))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "letters / to_fix" in again.stdout
    redo = json.loads(cli(env, "results", again.stdout.split("\n")[0].split()[1],
                          "--json").stdout)
    assert sorted((r["item_key"], r["status"]) for r in redo) == [
        ("11", "succeeded"), ("4", "succeeded"), ("9", "succeeded")]


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return cli_env
