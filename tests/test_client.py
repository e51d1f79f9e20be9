"""The Python API end to end: create a launch of items without starting it, start it (a
worker process), watch its status to completion, read its items page by page, its analytics,
then delete it; spec objects; list launches with filters and paging."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from batch_defs.client import BatchClient
from batch_defs.control import ControlError
from batch_defs.launches import launch_id
from batch_defs.spec import BatchSpec
from tests.conftest import PROJECT, write_batch

pytestmark = [pytest.mark.job, pytest.mark.integration]

FAILING = ["7", "21"]


def api_spec(name: str = "orders") -> dict[str, Any]:
    return {
        "name": name,
        "source": {"type": "inline", "key": "id", "items": [{"id": 0}]},
        "phases": [
            {"name": "check", "task": "python",
             "params": {"function": "tests.handlers:fail_listed", "fail_keys": FAILING}},
            {"name": "wait", "task": "python",
             "params": {"function": "tests.handlers:sleep_ms", "ms": 20}}],
        "options": {"concurrency": 4, "on_error": "continue", "tolerated_failures": 5},
        "after": [{"task": "export", "params": {"formats": ["csv"]}}],
    }


@pytest.fixture
def client(tmp_path: Path, batch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("BATCH_DEFS_PATH", str(batch_dir))
    monkeypatch.setenv("PYTHONPATH", str(PROJECT))  # workers import tests.handlers
    write_batch(batch_dir, api_spec())
    with BatchClient() as opened:
        yield opened


def test_create_start_watch_read_and_delete(client: BatchClient) -> None:
    items = ({"id": i, "name": f"order {i}"} for i in range(40))  # any iterable
    launch = client.create("orders", items, partition="week-1", start=False)
    assert launch.state == "created" and launch.items == 40 and launch.run_id is None
    assert launch.id == launch_id("orders", "week-1")
    assert client.instance.has_dynamic_partition("orders", "week-1")
    assert [i.id for i in client.launches(batch="orders").items] == [launch.id]
    assert client.run_status(launch).state == "created"

    started = client.start(launch)
    assert started.state in ("starting", "queued", "running")
    with pytest.raises(ControlError, match=f"launch {launch.id} is"):
        client.start(launch)  # one run at a time
    seen = []
    while not (status := client.run_status(launch)).finished:
        seen.append(status.percent)
        time.sleep(0.2)
    assert seen == sorted(seen)  # progress never goes back
    assert status.state == "succeeded" and status.percent == 100.0
    assert status.counts.model_dump() == {"succeeded": 38, "failed": 2, "invalid": 0,
                                          "rejected": 0, "skipped": 0}
    assert status.per_phase["check"] == {"succeeded": 38, "failed": 2}
    assert status.total_items == 40 and status.items_done == 40
    assert status.current_phase is None and status.eta_s == 0.0

    first = client.items(launch, limit=15)
    assert first.total == 40 and first.next_offset == 15
    keys = [item.key for page in (first, client.items(launch, offset=15, limit=15),
                                  client.items(launch, offset=30, limit=15))
            for item in page.items]
    assert keys == [str(i) for i in range(40)]
    item = first.items[1]
    assert item.status == "succeeded" and list(item.phases) == ["check", "wait"]
    assert item.output == {"id": 1, "name": "order 1", "score": 28, "wait_done": True}
    failed = list(client.iter_items(launch, statuses=["failed"], page_size=1))
    assert [(i.key, i.status, list(i.phases)) for i in failed] == [
        ("7", "failed", ["check"]), ("21", "failed", ["check"])]
    assert failed[0].phases["check"].error == "ValueError: bad record 7"
    assert failed[0].input == {"id": 7, "name": "order 7"}  # the dead-letter payload
    in_phase = client.items(launch, statuses=["succeeded"], phase="wait", limit=100)
    assert in_phase.total == 38 and set(in_phase.items[0].phases) == {"wait"}

    analytics = client.analytics(launch)
    check = next(p for p in analytics.phases if p.phase == "check")
    assert check.items == 40 and check.success_rate == 0.95
    # The figures of the check rows' own durations (a mean may exceed the p95: one slow item).
    durations = client.results(status.run_id, phase="check")["duration_s"].tolist()
    assert check.avg_s == pytest.approx(statistics.fmean(durations), abs=1e-6)
    assert check.p95_s == pytest.approx(
        statistics.quantiles(durations, n=20, method="inclusive")[18], abs=1e-6)
    assert check.max_s == pytest.approx(max(durations), abs=1e-6)
    assert analytics.total.cost == 0.0 and analytics.total.cost_per_item == 0.0

    export = Path(status.files["export.export_csv"])
    assert export.is_file()
    with pytest.raises(ControlError, match="confirm it"):
        client.delete(launch)
    deleted = client.delete(launch, confirm=True)
    assert deleted.runs == 1 and deleted.item_rows == 40 + 38 and deleted.files >= 1
    assert not export.exists()
    assert client.ledger.rows(status.run_id).empty
    assert not client.instance.has_dynamic_partition("orders", "week-1")
    assert client.launches(batch="orders").total == 0
    with pytest.raises(ControlError, match="no launch"):
        client.get_launch(launch.id)


def test_spec_objects_run_in_process_and_launches_filter_and_page(client: BatchClient) -> None:
    spec = BatchSpec.model_validate({**api_spec("from_code"), "after": []})
    done = client.create(spec, [{"id": i} for i in range(5)], partition="a", start=False)
    done = client.start(done, wait=True)  # in this process, until the run ends
    assert done.state == "succeeded" and done.runs == 1
    assert client.run_status(done).counts.succeeded == 5
    assert (client.spec_folder / "from_code.yaml").is_file()
    for key in ("b", "c", "d"):
        client.create("from_code", [{"id": 1}], partition=key, start=False)
        time.sleep(0.01)
    every = client.launches(batch="from_code")
    assert [i.partition for i in every.items] == ["d", "c", "b", "a"]  # newest first
    created = client.launches(states=["created"], limit=2)
    assert [i.partition for i in created.items] == ["d", "c"] and created.next_offset == 2
    assert [i.partition for i in client.launches(states=["created"], offset=2).items] == ["b"]
    assert [i.partition for i in client.launches(states=["succeeded"]).items] == ["a"]
    now = datetime.now(UTC)
    assert client.launches(since=now + timedelta(minutes=1)).total == 0
    assert client.launches(until=now + timedelta(minutes=1)).total == 4
    # A spec object may not take the name of a batch defined elsewhere.
    with pytest.raises(ControlError, match="already defined in"):
        client.create(BatchSpec.model_validate(api_spec("orders")), [{"id": 1}])
    with pytest.raises(ControlError, match="items or a data file, not both"):
        client.create("orders", [{"id": 1}], data="x.csv")


def test_pause_resume_and_cancel_through_the_api(client: BatchClient, batch_dir: Path,
                                                tmp_path: Path) -> None:
    # Calls after the 4th wait for the gate, so the pause lands part-way however loaded the
    # machine is; the resumed run finds the gate open.
    gate = tmp_path / "gate"
    write_batch(batch_dir, {
        "name": "slow", "source": {"type": "inline", "key": "id", "items": [{"id": 0}]},
        "phases": [{"name": "wait", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 100,
                               "gate": str(gate), "open_for": 4}}],
        "options": {"concurrency": 2}})
    launch = client.create("slow", [{"id": i} for i in range(100)], partition="p")
    deadline = time.monotonic() + 120
    while client.run_status(launch).counts.succeeded < 4:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    client.pause(launch)
    gate.touch()  # the pause is asked for: 4.8 s of work is left, the engine looks every 1 s
    paused = client.wait(launch, timeout_s=120)
    assert paused.state == "paused" and 4 <= paused.counts.succeeded < 100
    first_run = paused.run_id
    with pytest.raises(ControlError, match="confirm it"):
        client.delete(launch)
    resumed = client.resume(launch)
    assert resumed.state in ("starting", "queued", "running")
    done = client.wait(launch, timeout_s=180)
    assert done.state == "succeeded" and done.counts.succeeded == 100
    assert done.run_id != first_run and client.get_launch(launch.id).runs == 2
    # Items done before the pause were reused, not run again.
    reran = client.items(done.run_id, limit=100).items
    reused = [i for i in reran if i.phases["wait"].reused_from == first_run]
    assert len(reused) == paused.counts.succeeded

    # A gate that never opens: the cancel's grace runs out on the held items, and it ends
    # the run by force.
    other = client.create("slow", [{"id": i} for i in range(40)], partition="q",
                          sets=[f"phases[0].params.gate={tmp_path / 'shut'}"])
    while client.run_status(other).counts.succeeded < 4:
        time.sleep(0.2)
    client.cancel(other, grace_s=2)
    canceled = client.wait(other, timeout_s=60)
    assert canceled.state == "canceled" and canceled.counts.succeeded == 4


def test_a_launch_whose_worker_cannot_start_says_why(client: BatchClient,
                                                     batch_dir: Path) -> None:
    write_batch(batch_dir, {**api_spec("doomed"), "after": []})
    launch = client.create("doomed", [{"id": 1}], start=False)
    (batch_dir / "doomed.yaml").unlink()  # gone before the worker looks for it
    client.start(launch)
    status = client.wait(launch, timeout_s=120)
    assert status.state == "failed" and status.run_id is None
    assert "no batch named 'doomed'" in (status.stop_reason or "")
    info = client.get_launch(launch.id)
    assert info.state == "failed" and "SpecError" in (info.error or "")
    with pytest.raises(ControlError, match="is not started"):
        client.wait(client.create("orders", [{"id": 1}], start=False))
