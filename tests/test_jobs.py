"""Batch jobs executed in process on a temporary SQLite instance, checked through the ledger."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import dagster as dg
import pytest

from assets.results import results_asset_key
from batch_defs.definitions import build_definitions
from batch_defs.ledger import SOURCE_PHASE
from resources.storage import BatchStorageResource
from tests import handlers
from tests.conftest import inline_items, run_batch, write_batch

pytestmark = pytest.mark.job


def two_phase_spec(name: str, n: int, **options: object) -> dict:
    return {
        "name": name,
        "source": inline_items(n),
        "phases": [
            {"name": "first", "task": "python",
             "params": {"function": "tests.handlers:sleep_ms", "ms": 5}},
            {"name": "second", "task": "python",
             "params": {"function": "tests.handlers:sleep_ms", "ms": 5}},
        ],
        "options": {"concurrency": 4, **options},
    }


def ledger(instance: dg.DagsterInstance):
    return BatchStorageResource().ledger(instance)


def test_job_runs_every_item_through_every_phase(batch_dir: Path,
                                                 instance: dg.DagsterInstance) -> None:
    write_batch(batch_dir, two_phase_spec("simple", 50, chunk_size=20))
    result = run_batch(batch_dir, instance, "simple")
    assert result.success
    rows = ledger(instance).rows(result.run_id)
    assert len(rows) == 100
    assert set(rows["status"]) == {"succeeded"}
    assert handlers.max_in_flight == 4
    # The second phase saw the first phase's output merged into the item.
    second = rows[rows["phase"] == "second"]
    assert all('"first_done":true' in o for o in second["output"])
    # Three chunks (20, 20, 10) per phase: stable mapping keys in the step keys.
    steps = {e.step_key for e in result.all_events if e.step_key}
    assert {"simple_batch.first[chunk_0000]", "simple_batch.first[chunk_0002]",
            "simple_batch.second[chunk_0001]"} <= steps
    # The run carries the batch tag and the final progress tag.
    run = instance.get_run_by_id(result.run_id)
    assert run is not None and run.tags["batch/name"] == "simple"
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags["batch/progress"].startswith("50/50 done (100%), 0 failed, ")


def test_many_batches_load_side_by_side(batch_dir: Path) -> None:
    """Op names are unique per batch, so phase names may repeat across batches."""
    write_batch(batch_dir, two_phase_spec("one", 3))
    write_batch(batch_dir, two_phase_spec("two", 3))
    defs = build_definitions([batch_dir])
    dg.Definitions.validate_loadable(defs)
    assert {defs.resolve_job_def(n).name for n in ("one", "two")} == {"one", "two"}
    assert defs.resolve_job_def("two").partitions_def.name == "two"


def test_results_asset_materialized_per_partition(batch_dir: Path,
                                                  instance: dg.DagsterInstance) -> None:
    write_batch(batch_dir, two_phase_spec("simple", 12))
    result = run_batch(batch_dir, instance, "simple", partition="2026-11")
    assert result.success
    event = instance.get_latest_materialization_event(results_asset_key("simple"))
    assert event is not None and event.asset_materialization is not None
    materialization = event.asset_materialization
    assert materialization.partition == "2026-11"
    metadata = materialization.metadata
    assert metadata["items"].value == 12 and metadata["succeeded"].value == 12
    assert metadata["failed"].value == 0 and metadata["invalid"].value == 0
    assert metadata["duration_s"].value > 0 and metadata["items_per_s"].value > 0
    table = metadata["items_table"].value
    assert len(table.records) == 24
    assert table.records[0].data["status"] == "succeeded"


def failing_spec(name: str, n: int, fail_keys: list[int], on_error: str,
                 tolerated: int | str = 0, **params: object) -> dict:
    return {
        "name": name,
        "source": inline_items(n),
        "phases": [{"name": "score", "task": "python",
                    "params": {"function": "tests.handlers:fail_listed",
                               "fail_keys": fail_keys, **params}}],
        "options": {"concurrency": 5, "on_error": on_error, "tolerated_failures": tolerated},
    }


@pytest.mark.parametrize(("failures", "succeeds"), [(1, True), (3, False)])
def test_tolerated_failures_percentage(batch_dir: Path, instance: dg.DagsterInstance,
                                       failures: int, succeeds: bool) -> None:
    fail_keys = [10, 50, 90][:failures]
    write_batch(batch_dir, failing_spec("tolerant", 100, fail_keys, "continue", "2%"))
    result = run_batch(batch_dir, instance, "tolerant")
    assert result.success is succeeds
    rows = ledger(instance).rows(result.run_id)
    failed = rows[rows["status"] == "failed"]
    assert sorted(failed["item_key"].astype(int)) == fail_keys
    assert set(failed["error"]) == {f"ValueError: bad record {k}" for k in fail_keys}
    assert (rows["status"] == "succeeded").sum() == 100 - failures  # continue: all others ran
    assert all(failed["input"].str.contains('"id":'))  # dead-letter payload kept


def test_fail_fast_stops_starting_items(batch_dir: Path, instance: dg.DagsterInstance,
                                        tmp_path: Path) -> None:
    calls = tmp_path / "calls.db"
    write_batch(batch_dir, failing_spec("fragile", 200, [3], "fail_fast", calls_db=str(calls)))
    result = run_batch(batch_dir, instance, "fragile")
    assert not result.success
    rows = ledger(instance).rows(result.run_id)
    with sqlite3.connect(calls) as conn:
        called = conn.execute("select count(*) from calls").fetchone()[0]
    assert called == len(rows) < 200  # every call is recorded; the batch stopped early
    failure = rows[rows["status"] == "failed"].iloc[0]
    # Nothing started after the failure; only items already in flight (< 5 slots) finished.
    assert (rows["started_at"] <= failure["finished_at"] + 0.01).all()
    assert (rows["finished_at"] > failure["finished_at"]).sum() <= 4
    assert ledger(instance).stop_request(result.run_id).reason.startswith(
        "fail_fast: item '3' failed in phase 'score'")


def test_invalid_items_are_recorded_and_valid_ones_run(batch_dir: Path,
                                                       instance: dg.DagsterInstance) -> None:
    spec = failing_spec("checked", 0, [], "continue", 1)
    spec["source"] = {"type": "inline", "key": "id", "schema": {"id": "int", "email": "email"},
                      "items": [{"id": 1, "email": "a@example.com"},
                                {"id": "two", "email": "b@example.com"},
                                {"id": 3, "email": "c@example.com"}]}
    write_batch(batch_dir, spec)
    result = run_batch(batch_dir, instance, "checked")
    assert result.success
    rows = ledger(instance).rows(result.run_id)
    invalid = rows[rows["phase"] == SOURCE_PHASE]
    assert list(invalid["status"]) == ["invalid"]
    assert invalid["error"].iloc[0].startswith("row 2: id: is not an int ('two')")
    assert sorted(rows[rows["phase"] == "score"]["item_key"]) == ["1", "3"]


def test_rerun_of_a_partition_skips_succeeded_items(batch_dir: Path, instance: dg.DagsterInstance,
                                                    tmp_path: Path) -> None:
    calls, fail_file = tmp_path / "calls.db", tmp_path / "fail.txt"
    fail_file.write_text("4 7")
    write_batch(batch_dir, failing_spec("resumable", 30, [], "continue", 0,
                                        calls_db=str(calls), fail_file=str(fail_file)))
    first = run_batch(batch_dir, instance, "resumable")
    assert not first.success
    fail_file.write_text("")  # the data is fixed
    second = run_batch(batch_dir, instance, "resumable")
    assert second.success
    with sqlite3.connect(calls) as conn:
        per_key = dict(conn.execute("select key, count(*) from calls group by key"))
    assert per_key.pop("4") == 2 and per_key.pop("7") == 2
    assert set(per_key.values()) == {1}  # the 28 others ran once, in the first run only
    rows = ledger(instance).rows(second.run_id)
    assert len(rows) == 30 and set(rows["status"]) == {"succeeded"}
    assert (rows["reused_from"] == first.run_id).sum() == 28


def test_reexecution_from_failure_reuses_finished_items(batch_dir: Path,
                                                        dagster_home: Path,
                                                        tmp_path: Path) -> None:
    """Dagster's own re-execution (as the UI does it) continues from the ledger."""
    from dagster import build_reconstructable_job  # public: dagster exports it

    calls, fail_file = tmp_path / "calls.db", tmp_path / "fail.txt"
    fail_file.write_text("12")
    spec = failing_spec("redo", 40, [], "continue", 0, calls_db=str(calls),
                        fail_file=str(fail_file))
    spec["options"]["chunk_size"] = 10
    write_batch(batch_dir, spec)
    with pytest.MonkeyPatch.context() as mp, dg.DagsterInstance.get() as inst:
        mp.setenv("BATCH_DEFS_PATH", str(batch_dir))
        inst.add_dynamic_partitions("redo", ["p1"])
        job = build_reconstructable_job("tests.jobs_module", "batch_job",
                                        reconstructable_args=("redo",))
        first = dg.execute_job(job, instance=inst, tags={"dagster/partition": "p1"})
        assert not first.success
        fail_file.write_text("")
        options = dg.ReexecutionOptions.from_failure(first.run_id, inst)
        second = dg.execute_job(job, instance=inst, reexecution_options=options,
                                tags={"dagster/partition": "p1"})
        assert second.success
        rows = BatchStorageResource().ledger(inst).rows(second.run_id)
    # All 40 items are in the re-executed run's rows: 1 re-run, 39 carried over.
    assert len(rows) == 40 and set(rows["status"]) == {"succeeded"}
    assert (rows["reused_from"] == first.run_id).sum() == 39
    with sqlite3.connect(calls) as conn:
        per_key = dict(conn.execute("select key, count(*) from calls group by key"))
    assert per_key == {str(k): (2 if k == 12 else 1) for k in range(1, 41)}


def test_costs_and_skips_are_recorded(batch_dir: Path, instance: dg.DagsterInstance) -> None:
    write_batch(batch_dir, {
        "name": "priced", "source": inline_items(6),
        "phases": [
            {"name": "filter", "task": "python", "params": {"function": "tests.handlers:skip_odd"}},
            {"name": "price", "task": "python", "params": {"function": "tests.handlers:priced"}},
        ],
    })
    result = run_batch(batch_dir, instance, "priced")
    assert result.success
    rows = ledger(instance).rows(result.run_id)
    assert sorted(rows[rows["status"] == "skipped"]["item_key"]) == ["1", "3", "5"]
    priced = rows[rows["phase"] == "price"]
    assert sorted(priced["item_key"]) == ["2", "4", "6"]
    assert priced["cost"].sum() == pytest.approx(0.75) and priced["tokens"].sum() == 300


def test_run_config_overrides_the_source(batch_dir: Path, instance: dg.DagsterInstance,
                                         tmp_path: Path) -> None:
    spec = two_phase_spec("monthly", 0)
    spec["source"] = {"type": "csv", "path": "missing.csv", "key": "id"}
    write_batch(batch_dir, spec)
    march = tmp_path / "march.csv"
    march.write_text("id,name\n1,a\n2,b\n3,c\n")
    result = run_batch(batch_dir, instance, "monthly", run_config={
        "resources": {"run_overrides": {"config": {"data": str(march),
                                                   "overrides": ["options.concurrency=1"]}}}})
    assert result.success
    assert len(ledger(instance).rows(result.run_id)) == 6
    assert handlers.max_in_flight == 1
    unreadable = run_batch(batch_dir, instance, "monthly", partition="p2")
    assert not unreadable.success
    failure = next(e for e in unreadable.all_events if e.event_type_value == "STEP_FAILURE")
    assert "file not found" in failure.event_specific_data.error.message


def test_fail_fast_with_invalid_items_runs_no_phase(batch_dir: Path,
                                                    instance: dg.DagsterInstance) -> None:
    spec = failing_spec("strict", 0, [], "fail_fast", 0)
    spec["source"] = {"type": "inline", "key": "id", "schema": {"id": "int"},
                      "items": [{"id": 1}, {"id": "bad"}, {"id": 3}]}
    write_batch(batch_dir, spec)
    result = run_batch(batch_dir, instance, "strict")
    assert not result.success
    rows = ledger(instance).rows(result.run_id)
    assert list(zip(rows["phase"], rows["status"], strict=True)) == [(SOURCE_PHASE, "invalid")]
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert failure.event_specific_data.error.message.startswith(
        "dagster._core.definitions.events.Failure: 1 invalid items (tolerated 0); first: row 2")


def test_step_retry_policy_reruns_only_unfinished_items(batch_dir: Path,
                                                        instance: dg.DagsterInstance,
                                                        tmp_path: Path) -> None:
    calls = tmp_path / "calls.db"
    write_batch(batch_dir, {
        "name": "sturdy", "source": inline_items(10),
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.handlers:crash_first_step",
                               "marker": str(tmp_path / "crashed"), "calls_db": str(calls)}}],
        "options": {"concurrency": 1, "step_retries": 2},
    })
    result = run_batch(batch_dir, instance, "sturdy")
    assert result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 1
    with sqlite3.connect(calls) as conn:
        per_key = dict(conn.execute("select key, count(*) from calls group by key"))
    # Items 1 and 2 were recorded before the crash and are not run again; 3 ran twice.
    assert per_key == {**{str(k): 1 for k in range(1, 11)}, "3": 2}


def test_flaky_item_succeeds_on_third_attempt_in_the_ledger(batch_dir: Path,
                                                            instance: dg.DagsterInstance) -> None:
    write_batch(batch_dir, {
        "name": "flaky", "source": inline_items(3),
        "phases": [{"name": "call", "task": "python",
                    "params": {"function": "tests.handlers:flaky", "failures": 2},
                    "retry": {"max_attempts": 3, "backoff": "exponential", "delay_s": 0.05,
                              "jitter": False, "retry_on": ["ConnectionError"]}}],
    })
    result = run_batch(batch_dir, instance, "flaky")
    assert result.success
    rows = ledger(instance).rows(result.run_id)
    assert list(rows["attempts"]) == [3, 3, 3]
    log = json.loads(rows["attempt_log"].iloc[0])
    assert [(a["attempt"], a["wait_s"]) for a in log] == [(1, 0.05), (2, 0.1)]
    assert log[0]["error"] == "ConnectionError: attempt 1 refused"
    assert (rows["duration_s"] >= 0.15).all()
    assert json.loads(rows["output"].iloc[0])["attempt_that_worked"] == 3


def test_reexecuting_only_collect_still_has_a_complete_run(batch_dir: Path, dagster_home: Path,
                                                           tmp_path: Path) -> None:
    """continue + too many failures fails collect alone; re-executing it from failure runs
    only collect, which must still create the run's ledger row and retry the failed items."""
    from dagster import build_reconstructable_job  # public: dagster exports it

    fail_file = tmp_path / "fail.txt"
    fail_file.write_text("3 7")
    spec = failing_spec("redo_tail", 20, [], "continue", 1, fail_file=str(fail_file))
    write_batch(batch_dir, spec)
    with pytest.MonkeyPatch.context() as mp, dg.DagsterInstance.get() as inst:
        mp.setenv("BATCH_DEFS_PATH", str(batch_dir))
        inst.add_dynamic_partitions("redo_tail", ["p1"])
        job = build_reconstructable_job("tests.jobs_module", "batch_job",
                                        reconstructable_args=("redo_tail",))
        first = dg.execute_job(job, instance=inst, tags={"dagster/partition": "p1"})
        assert not first.success
        fail_file.write_text("")
        second = dg.execute_job(job, instance=inst, tags={"dagster/partition": "p1"},
                                reexecution_options=dg.ReexecutionOptions.from_failure(
                                    first.run_id, inst))
        assert second.success
        executed = {e.step_key for e in second.all_events if e.event_type_value == "STEP_START"}
        ledger_ = BatchStorageResource().ledger(inst)
        run = ledger_.run(second.run_id)
        rows = ledger_.rows(second.run_id)
    assert executed == {"redo_tail_batch.collect", "redo_tail_batch.results"}
    assert run is not None and run["total_items"] == 20 and run["status"] == "succeeded"
    assert len(rows) == 20 and set(rows["status"]) == {"succeeded"}
    assert sorted(rows[rows["reused_from"].isna()]["item_key"]) == ["3", "7"]
