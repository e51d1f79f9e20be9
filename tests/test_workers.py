"""options.workers: processes: handler calls go to worker processes; failures stay items'."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from batch_defs.engine import run_items
from batch_defs.items import Item
from batch_defs.loader import SpecError, load_batch
from batch_defs.workers import option_notes, validate_notes
from tests import handlers
from tests.conftest import engine_plan, inline_items, write_batch


def _pid(row: dict) -> int:
    return json.loads(row["output"])["pid"]


def _items(n: int) -> list[Item]:
    return [Item(str(i), i, {"id": i}) for i in range(1, n + 1)]


def _run(unit_ledger, tmp_path: Path, handler, params: dict, n: int, **options):
    plan = engine_plan(unit_ledger, [handler], tmp_path,
                       phases=[{"params": {"function": "tests.handlers:x", **params}}],
                       workers="processes", **options)
    report = run_items(plan, _items(n), tmp_path / "items")
    rows = {r["item_key"]: r for r in unit_ledger.rows(plan.run_id).to_dict("records")}
    return report, rows


@pytest.mark.unit
def test_handlers_run_in_worker_processes_never_in_the_parent(unit_ledger, tmp_path):
    report, rows = _run(unit_ledger, tmp_path, handlers.burn_cpu, {"ms": 20}, 40,
                        concurrency=4, processes=2)
    assert report.executed == 40 and report.failed == 0
    pids = {_pid(row) for row in rows.values()}
    assert len(pids) == 2
    assert os.getpid() not in pids


@pytest.mark.unit
def test_threads_stay_the_default(unit_ledger, tmp_path):
    plan = engine_plan(unit_ledger, [handlers.burn_cpu], tmp_path,
                       phases=[{"params": {"function": "m:f", "ms": 1}}])
    run_items(plan, _items(3), tmp_path / "items")
    assert {_pid(r) for r in unit_ledger.rows(plan.run_id).to_dict("records")} == {os.getpid()}


@pytest.mark.unit
def test_an_error_in_a_worker_is_the_same_item_failure_with_retries(unit_ledger, tmp_path):
    report, rows = _run(unit_ledger, tmp_path, handlers.die_on_listed, {"fail_keys": [2]}, 4,
                        on_error="continue", processes=2)
    assert report.failed == 1
    assert rows["2"]["status"] == "failed"
    assert rows["2"]["error"] == "ValueError: bad item 2"
    assert all(rows[k]["status"] == "succeeded" for k in ("1", "3", "4"))


@pytest.mark.unit
def test_a_worker_that_dies_fails_only_its_item_and_is_replaced(unit_ledger, tmp_path):
    # One slot, one worker: items run in order, so 1 and 2 ran in the worker that item 3 killed
    report, rows = _run(unit_ledger, tmp_path, handlers.die_on_listed, {"die_keys": [3]}, 12,
                        on_error="continue", concurrency=1, processes=1)
    assert report.executed == 12 and report.failed == 1
    assert rows["3"]["status"] == "failed"
    assert "worker process" in rows["3"]["error"] and "died (exit code 7)" in rows["3"]["error"]
    assert "item 3" in rows["3"]["error"]
    assert all(row["status"] == "succeeded" for key, row in rows.items() if key != "3")
    # the dead worker was replaced: every later item ran in one new process
    before = {_pid(rows[key]) for key in ("1", "2")}
    after = {_pid(rows[str(key)]) for key in range(4, 13)}
    assert len(before) == 1 and len(after) == 1 and before != after


def _spec(tmp_path: Path, options: dict, task: dict | None = None) -> Path:
    phase = task or {"name": "work", "task": "python",
                     "params": {"function": "tests.handlers:burn_cpu"}}
    return write_batch(tmp_path, {"name": "cpu", "source": inline_items(2),
                                  "phases": [phase], "options": options})


@pytest.mark.unit
def test_processes_with_another_executor_is_an_error_naming_the_line(tmp_path):
    path = _spec(tmp_path, {"workers": "processes", "executor": "multiprocess"})
    with pytest.raises(SpecError) as caught:
        load_batch(path)
    assert "cpu.yaml:" in str(caught.value)
    assert "workers: processes needs executor: in_process" in str(caught.value)


@pytest.mark.unit
def test_processes_count_without_process_workers_is_an_error(tmp_path):
    with pytest.raises(SpecError, match="processes applies only with workers: processes"):
        load_batch(_spec(tmp_path, {"processes": 2}))


@pytest.mark.unit
def test_validate_notes_tasks_that_stay_in_threads(tmp_path):
    loaded = load_batch(_spec(tmp_path, {"workers": "processes"}, {
        "name": "render", "task": "template", "params": {"source": "hi {{ item.id }}"}}))
    notes = [str(n) for n in validate_notes(loaded)]
    assert len(notes) == 1
    assert notes[0].startswith("cpu.yaml:")
    assert "phases[0].task" in notes[0] or "phases.0.task" in notes[0]
    assert "template runs in the slots' threads" in notes[0]


@pytest.mark.unit
def test_python_phases_under_processes_have_no_note(tmp_path):
    assert option_notes(load_batch(_spec(tmp_path, {"workers": "processes"})).spec) == []
