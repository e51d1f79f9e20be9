"""Every run leaves its record in Dagster, counts say the same everywhere, reports are real."""

from __future__ import annotations

import base64
import csv
import json
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from assets.results import results_asset_key
from resources.storage import BatchStorageResource
from tests.cli_zygote import CliProcess
from tests.conftest import cli, run_batch, start_cli, write_batch

VOCABULARY = ("items", "succeeded", "failed", "invalid", "rejected", "skipped")


def outcome_batch(batch_dir: Path, name: str = "sorted", tolerated: int | str = 5,
                  **options: Any) -> None:
    """10 items: 6 succeed, and one each is failed, invalid, rejected and skipped."""
    items: list[dict[str, Any]] = [{"id": i, "name": f"item {i}"} for i in range(1, 10)]
    items.append({"id": 10})  # no name: invalid against the schema
    write_batch(batch_dir, {
        "name": name,
        "source": {"type": "inline", "key": "id", "items": items,
                   "schema": {"id": "int", "name": "str"}},
        "phases": [
            {"name": "check", "task": "python",
             "params": {"function": "tests.outcome_handlers:sort_outcomes", "fail_keys": [2],
                        "reject_keys": [3], "skip_keys": [4]}},
            {"name": "price", "task": "python",
             "params": {"function": "tests.outcome_handlers:sort_outcomes", "cost": 0.5}},
        ],
        "options": {"concurrency": 2, "on_error": "continue", "tolerated_failures": tolerated,
                    **options},
    })


EXPECTED = {"items": 10, "succeeded": 6, "failed": 1, "invalid": 1, "rejected": 1,
            "skipped": 1}


def metadata_value(metadata: dict[str, Any], key: str) -> Any:
    return metadata[key].value


@pytest.mark.cli
def test_counts_say_the_same_in_cli_report_asset_and_tags(cli_env: dict[str, str],
                                                          batch_dir: Path) -> None:
    outcome_batch(batch_dir)
    done = cli(cli_env, "run", "sorted", "--partition", "p1")
    assert done.returncode == 0, done.stderr
    assert "10 items: 6 succeeded, 1 failed, 1 invalid, 1 rejected, 1 skipped" in done.stdout
    run_id = re.search(r"^run\s+(\S+)", done.stdout, re.M).group(1)  # type: ignore[union-attr]

    status = json.loads(cli(cli_env, "status", run_id, "--json").stdout)
    report = json.loads(cli(cli_env, "report", run_id, "--format", "json").stdout)
    assert {k: status[k] for k in VOCABULARY} == EXPECTED
    assert {k: report[k] for k in VOCABULARY} == EXPECTED
    assert status["progress"]["percent"] == 100.0 and status["progress"]["finished"]
    # The full list hint covers every kind of failure the counts name.
    assert f"batch-defs results {run_id} --status failed,invalid,rejected" in done.stdout
    listed = json.loads(cli(cli_env, "results", run_id, "--status", "failed,invalid,rejected",
                            "--json").stdout)
    assert sorted((r["item_key"], r["status"]) for r in listed) == [
        ("10", "invalid"), ("2", "failed"), ("3", "rejected")]
    page = cli(cli_env, "report", run_id, "--format", "md").stdout
    assert "10 items: 6 succeeded, 1 failed, 1 invalid, 1 rejected, 1 skipped" in page

    with dg.DagsterInstance.from_config(cli_env["DAGSTER_HOME"]) as instance:
        event = instance.get_latest_materialization_event(results_asset_key("sorted"))
        assert event is not None and event.asset_materialization is not None
        metadata = dict(event.asset_materialization.metadata)
        run = instance.get_run_by_id(run_id)
        assert run is not None
        tags = run.tags
    assert {k: metadata_value(metadata, k) for k in VOCABULARY} == EXPECTED
    assert tags["batch/failed"] == "1"
    # One throughput figure: the run's tag, its summary, its report and its asset agree.
    rate = status["items_per_s"]
    assert rate > 0 and report["items_per_s"] == rate
    assert metadata_value(metadata, "items_per_s") == rate
    assert tags["batch/progress"] == (f"10/10 done (100%), 1 failed, 1 invalid, 1 rejected, "
                                      f"{rate:.1f} items/s")
    # ... and so do the run's last progress bar and its printed summary.
    assert any(line.startswith("all") and f"{rate:.1f} items/s" in line
               for line in done.stderr.splitlines())
    assert f", {rate:.1f} items/s" in done.stdout


@pytest.mark.job
def test_a_run_beyond_tolerance_records_its_items_and_red_checks(
        batch_dir: Path, instance: dg.DagsterInstance) -> None:
    outcome_batch(batch_dir, tolerated=1)
    result = run_batch(batch_dir, instance, "sorted", "p1")
    assert not result.success
    # The step failure names the first failed items and their errors, not only counts.
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    description = failure.step_failure_data.user_failure_data.description
    assert description.startswith("3 items failed, were invalid or rejected (1 failed, "
                                  "1 invalid, 1 rejected), more than the 1 tolerated; first: ")
    assert "2 (check, failed): ValueError: bad record 2" in description
    assert "3 (check, rejected): rule: 3 is out of range" in description
    assert description.endswith(f"all: batch-defs results {result.run_id} "
                                "--status failed,invalid,rejected")

    key = results_asset_key("sorted")
    assert instance.get_latest_materialization_event(key) is None
    observed = instance.fetch_observations(key, limit=5).records
    assert len(observed) == 1
    observation = observed[0].asset_observation
    assert observation is not None and observation.partition == "p1"
    metadata = observation.metadata
    assert {k: metadata[k].value for k in VOCABULARY} == EXPECTED
    assert metadata["state"].value == "failed" and metadata["run_id"].value == result.run_id
    table = metadata["items_table"].value.records
    # failed, invalid and rejected items first, then the others
    assert [(r.data["item_key"], r.data["status"]) for r in table[:3]] == [
        ("2", "failed"), ("3", "rejected"), ("10", "invalid")]
    assert table[0].data["error"] == "ValueError: bad record 2"
    assert table[0].data["attempts"] >= 1
    assert "throughput" in metadata["charts"].value
    assert metadata["all_failures"].value.endswith("--status failed,invalid,rejected")

    checks = latest_checks(instance, key)
    assert checks == {"source_items": False, "check_quality": False, "price_quality": True}


def latest_checks(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[str, bool]:
    """Each check's latest evaluation: passed or not."""
    found = {}
    for name in ("source_items", "check_quality", "price_quality"):
        records = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(key, name), limit=5)
        evaluations = [r.event.dagster_event.event_specific_data for r in records
                       if r.event and r.event.dagster_event
                       and isinstance(r.event.dagster_event.event_specific_data,
                                      dg.AssetCheckEvaluation)]
        found[name] = evaluations[0].passed
    return found


@pytest.mark.job
def test_checks_pass_for_a_run_within_tolerance(batch_dir: Path,
                                                instance: dg.DagsterInstance) -> None:
    outcome_batch(batch_dir, tolerated=5)
    result = run_batch(batch_dir, instance, "sorted", "p1")
    assert result.success
    checks = latest_checks(instance, results_asset_key("sorted"))
    assert checks == {"source_items": True, "check_quality": True, "price_quality": True}
    evaluations = [e.asset_check_evaluation_data for e in result.all_events
                   if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION]
    check = next(e for e in evaluations if e.check_name == "check_quality")
    assert check.metadata["success_rate"].value == pytest.approx(6 / 9, abs=1e-4)
    assert check.metadata["first_failures"].value == (
        "2 (failed, 1 attempts): ValueError: bad record 2; "
        "3 (rejected, 1 attempts): rule: 3 is out of range")


@pytest.mark.job
def test_a_run_stopped_by_its_budget_records_its_items_as_paused(
        batch_dir: Path, instance: dg.DagsterInstance) -> None:
    outcome_batch(batch_dir, name="budgeted", budget={"max_cost": 1.0})
    result = run_batch(batch_dir, instance, "budgeted", "p1")
    assert not result.success
    observed = instance.fetch_observations(results_asset_key("budgeted"), limit=5).records
    assert len(observed) == 1
    metadata = observed[0].asset_observation.metadata  # type: ignore[union-attr]
    assert metadata["state"].value == "paused"
    assert metadata["stopped"].value.startswith("budget: spent")
    assert metadata["succeeded"].value < 6 and metadata["items"].value == 10


@pytest.mark.job
def test_a_resumed_run_costs_what_the_partition_spent(batch_dir: Path,
                                                      instance: dg.DagsterInstance) -> None:
    """cost: the partition's spend up to this run (what the budget counts); run_cost: this
    run's own executions. A resumed run shows the same spend as the budget saw."""
    outcome_batch(batch_dir, name="budgeted", budget={"max_cost": 1.0})
    first = run_batch(batch_dir, instance, "budgeted", "p1")
    assert not first.success
    ledger = BatchStorageResource().ledger(instance)
    from batch_defs.summary import summarize_run

    stopped = summarize_run(ledger, first.run_id)
    assert stopped.cost == stopped.run_cost >= 1.0
    outcome_batch(batch_dir, name="budgeted", budget={"max_cost": 10.0})
    second = run_batch(batch_dir, instance, "budgeted", "p1")
    assert second.success
    resumed = summarize_run(ledger, second.run_id)
    assert resumed.succeeded == 6
    assert resumed.cost == pytest.approx(6 * 0.5)  # every paid execution of the partition
    assert resumed.run_cost == pytest.approx(resumed.cost - stopped.run_cost)
    assert ledger.run_state(second.run_id).spent_cost == pytest.approx(resumed.cost)


@pytest.mark.job
def test_the_report_step_writes_the_real_report_and_iso_exports(
        batch_dir: Path, instance: dg.DagsterInstance) -> None:
    outcome_batch(batch_dir, name="reported")
    spec_path = batch_dir / "reported.yaml"
    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    spec["after"] = [{"task": "report", "params": {"formats": ["csv", "json", "html", "md"]}}]
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run_batch(batch_dir, instance, "reported", "p1")
    assert result.success
    folder = Path(instance.root_directory) / "batch_output" / "reported" / "p1"
    page = (folder / "report.html").read_text()
    assert "<h2>Phases</h2>" in page and "<h2>Charts</h2>" in page
    assert "10 items: 6 succeeded, 1 failed, 1 invalid, 1 rejected, 1 skipped" in page
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 2 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 may spell nan
    assert "None" not in text and "nan" not in text
    assert len(page) < 300_000
    markdown = (folder / "report.md").read_text()
    assert "![throughput](report.throughput.png)" in markdown
    assert (folder / "report.throughput.png").exists()
    rows = list(csv.DictReader((folder / "report.csv").open()))
    done = next(r for r in rows if r["phase"] == "price")
    assert datetime.fromisoformat(done["finished_at"]).tzinfo is not None
    records = json.loads((folder / "report.json").read_text())
    assert all(isinstance(r["started_at"], str | None) for r in records)
    assert datetime.fromisoformat(records[0]["started_at"] or records[-1]["started_at"])


@pytest.mark.cli
def test_submit_without_a_daemon_warns_and_watch_says_queued(cli_env: dict[str, str],
                                                             batch_dir: Path) -> None:
    outcome_batch(batch_dir)
    submitted = cli(cli_env, "submit", "sorted", "--partition", "q1")
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip().splitlines()[-1]
    assert "warning: no dagster-daemon is running for this instance" in submitted.stderr
    watcher = start_cli(cli_env, "status", run_id, "--watch")
    assert isinstance(watcher, CliProcess)  # its output is a file, readable while it runs
    try:
        deadline = time.monotonic() + 60
        while "is queued" not in watcher.stderr_text():  # the watcher's first look at the run
            assert watcher.poll() is None and time.monotonic() < deadline, watcher.stderr_text()
            time.sleep(0.1)
        assert cli(cli_env, "cancel", run_id).returncode == 0  # a queued run leaves the queue
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert f"run {run_id[:8]} is queued: no dagster-daemon is running" in err
    assert "CANCELED" in out
    status = json.loads(cli(cli_env, "status", run_id, "--json").stdout)
    assert status["status"] == "CANCELED" and status["progress"] is None


@pytest.mark.cli
def test_piped_output_keeps_tables_and_paths_whole(cli_env: dict[str, str],
                                                   batch_dir: Path) -> None:
    """Not a terminal: plain text, never wrapped or cut, however narrow COLUMNS says."""
    long_error = "the record has no usable total: " + "x" * 150
    outcome_batch(batch_dir)
    spec_path = batch_dir / "sorted.yaml"
    import yaml

    spec = yaml.safe_load(spec_path.read_text())
    spec["phases"][0]["params"]["error"] = long_error
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {**cli_env, "COLUMNS": "40"}
    done = cli(env, "run", "sorted", "--partition", "narrow")
    assert done.returncode == 0, done.stderr
    run_id = re.search(r"^run\s+(\S+)", done.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert "\x1b[" not in done.stdout  # no colour codes in a pipe
    lines = done.stdout.splitlines()
    assert any(f"ValueError: {long_error}" in line for line in lines)
    hint = f"all of them: batch-defs results {run_id} --status failed,invalid,rejected"
    assert hint in [line.strip() for line in lines]
    table = cli(env, "results", run_id, "--status", "failed").stdout.splitlines()
    assert any(f"ValueError: {long_error}" in line and "│ 2 " in line for line in table)


@pytest.mark.job
def test_a_canceled_run_records_its_items_as_canceled(batch_dir: Path,
                                                      instance: dg.DagsterInstance) -> None:
    write_batch(batch_dir, {
        "name": "stopped", "source": {"type": "inline", "key": "id",
                                      "items": [{"id": i} for i in range(1, 41)]},
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.outcome_handlers:cancel_at", "key": 3,
                               "ms": 100}}],
        "options": {"concurrency": 2},
    })
    result = run_batch(batch_dir, instance, "stopped", "p1")
    assert not result.success
    observed = instance.fetch_observations(results_asset_key("stopped"), limit=5).records
    assert len(observed) == 1
    metadata = observed[0].asset_observation.metadata  # type: ignore[union-attr]
    assert metadata["state"].value == "canceled"
    assert metadata["stopped"].value == "canceled: by a test"
    assert 0 < metadata["succeeded"].value < 40 and metadata["pending"].value > 0
    assert metadata["succeeded"].value + metadata["pending"].value == 40
