"""What a run loads before its first item, and what it prepares while items run.

The job runs in a fresh interpreter: this test process has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tests.cli_zygote import PROJECT
from tests.conftest import inline_items, prepared_home, write_batch

pytestmark = pytest.mark.job

HANDLER = '''
import sys, time

EVENTS = []
HEAVY = ("pandas", "numpy", "matplotlib")
CHARTS = "matplotlib.backends.backend_agg"

def work(item, ctx):
    if not EVENTS:
        EVENTS.append({"first_item_saw": [m for m in HEAVY if m in sys.modules]})
    EVENTS.append("item")
    if EVENTS.count("item") == 6:  # the last item: the results step has not begun
        waited = time.monotonic()
        while CHARTS not in sys.modules and time.monotonic() - waited < 60:
            time.sleep(0.05)
        EVENTS.append({"last_item_saw_charts": CHARTS in sys.modules})
    return {}
'''

SCRIPT = '''
import json, sys
from pathlib import Path
import dagster as dg
from batch_defs.definitions import build_definitions
import startup_handler

with dg.DagsterInstance.get() as instance:
    instance.add_dynamic_partitions("startup", ["p1"])
    job = build_definitions([Path(sys.argv[1])]).resolve_job_def("startup")
    result = job.execute_in_process(instance=instance, partition_key="p1")
print(json.dumps({"success": result.success, "events": startup_handler.EVENTS}))
'''


def run_fresh(tmp_path: Path) -> dict:
    home = prepared_home(tmp_path / "home")
    batches = tmp_path / "batches"
    batches.mkdir()
    (batches / "startup_handler.py").write_text(textwrap.dedent(HANDLER))
    write_batch(batches, {"name": "startup", "source": inline_items(6),
                          "phases": [{"name": "a", "task": "python",
                                      "params": {"function": "startup_handler:work"}}],
                          # After-steps that need pandas, as every shipped batch has.
                          "after": [{"task": "report", "params": {"formats": ["csv"]}},
                                    {"task": "export"}],
                          "options": {"concurrency": 1}})
    env = {"DAGSTER_HOME": str(home), "PYTHONPATH": f"{batches}:{PROJECT}",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(batches)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_first_item_does_not_wait_for_pandas_or_the_charts(tmp_path: Path) -> None:
    run = run_fresh(tmp_path)
    assert run["success"]
    # Loaded neither before the first item, and by the background before the results step.
    assert run["events"] == [{"first_item_saw": []}, *["item"] * 6,
                             {"last_item_saw_charts": True}]


def test_a_chart_warm_up_that_fails_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The results step meets the same failure and reports it where users look; a traceback
    # from a background thread would only be noise in front of them.
    import batch_defs.report as report
    from batch_defs.engine import prepare_results_step

    tried: list[str] = []
    escaped: list[object] = []

    def broken() -> None:
        tried.append(threading.current_thread().name)
        raise RuntimeError("no chart library")

    monkeypatch.setattr(report, "prepare_charts", broken)
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    prepare_results_step.__wrapped__()  # uncached: a fresh warm-up thread
    for thread in threading.enumerate():
        if thread.name == "batch-prepare-results":
            thread.join(60)
    assert tried == ["batch-prepare-results"]
    assert escaped == []


LOAD_SHIPPED = '''
import json, sys
from batch_defs.definitions import build_definitions

jobs = build_definitions().get_repository_def().get_all_jobs()
print(json.dumps({"jobs": len(jobs), "heavy": [m for m in ("pandas", "numpy", "matplotlib")
                                               if m in sys.modules]}))
'''


def test_loading_the_shipped_batches_imports_no_pandas_numpy_or_charts(tmp_path: Path) -> None:
    # Every code server, daemon, webserver, `dagster job launch` and run worker loads the
    # definitions; their report, export and context steps need these only when they run.
    home = prepared_home(tmp_path / "home")
    env = {"DAGSTER_HOME": str(home), "PYTHONPATH": str(PROJECT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", LOAD_SHIPPED], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["jobs"] >= 6  # the shipped batches did load
    assert loaded["heavy"] == []


AT_EXIT = '''
import atexit, gc, sys
from importlib.metadata import entry_points

atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count()))
(script,) = entry_points(group="console_scripts", name="batch-defs")
sys.argv = ["batch-defs", "--help"]
script.load()()
'''


@pytest.mark.unit
def test_the_command_ends_without_a_collection_over_everything_it_loaded(
        tmp_path: Path) -> None:
    # The interpreter's teardown collections cost a `run` about 0.45 s: the console script
    # freezes what is alive before it ends, and atexit handlers still run.
    done = subprocess.run([sys.executable, "-c", AT_EXIT], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(PROJECT)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Usage: batch-defs" in done.stdout
    frozen = int(done.stdout.strip().splitlines()[-1].removeprefix("frozen at exit:"))
    assert frozen > 10_000  # the command's modules and objects, not a handful
