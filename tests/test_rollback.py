"""Compensation against a real HTTP API on loopback: a batch creates records, fails beyond
its tolerance, and `batch-defs rollback` deletes exactly the records it created, each once,
even when the rollback itself is killed with SIGKILL and run again."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from resources.storage import open_ledger
from tests.conftest import PROJECT, cli, run_batch, start_cli, write_batch

pytestmark = pytest.mark.integration


class RecordsApi:
    """POST /records creates a record (refused for the listed keys); DELETE /records/ID
    deletes it (204), or answers 404 if there is none. Every call is counted."""

    def __init__(self, refuse: set[int] = frozenset(), delete_ms: int = 0,  # type: ignore
                 create_ms: int = 0):
        self.refuse, self.delete_ms, self.create_ms = refuse, delete_ms, create_ms
        self.records: dict[int, int] = {}  # record id -> item key
        self.created: list[int] = []
        self.deleted: Counter[int] = Counter()  # record id -> deletions that removed it
        self.missing: Counter[int] = Counter()  # record id -> DELETEs that found nothing
        self.ids = itertools.count(1000)
        self.lock = threading.Lock()
        # Creations after the first `hold_after` wait for `released` (at most 20 s, within
        # the client's 30 s timeout): a test stops the run part-way, whatever the load.
        self.hold_after: int | None = None
        self.released = threading.Event()

    def create(self, request: Request) -> Response:
        key = int(request.get_json()["key"])
        if self.hold_after is not None and len(self.created) >= self.hold_after:
            self.released.wait(20)
        time.sleep(self.create_ms / 1000)
        if key in self.refuse:
            return Response(json.dumps({"error": "invalid"}), status=422)
        with self.lock:
            record = next(self.ids)
            self.records[record] = key
            self.created.append(record)
        return Response(json.dumps({"record_id": record}), status=201,
                        content_type="application/json")

    def delete(self, request: Request) -> Response:
        record = int(request.path.rsplit("/", 1)[1])
        time.sleep(self.delete_ms / 1000)
        with self.lock:
            if self.records.pop(record, None) is None:
                self.missing[record] += 1
                return Response(status=404)
            self.deleted[record] += 1
        return Response(status=204)


@pytest.fixture
def api() -> Iterator[tuple[HTTPServer, RecordsApi]]:
    server = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    records = RecordsApi()
    server.expect_request("/records", method="POST").respond_with_handler(
        lambda r: records.create(r))
    server.expect_request(re.compile(r"/records/\d+"), method="DELETE").respond_with_handler(
        lambda r: records.delete(r))
    server.start()
    try:
        yield server, records
    finally:
        server.stop()


def records_batch(batch_dir: Path, server: HTTPServer, name: str = "records",
                  fail_keys: list[int] | None = None, **options: Any) -> None:
    write_batch(batch_dir, {
        "name": name,
        "source": {"type": "inline", "key": "id", "items": [{"id": i} for i in range(50)]},
        "phases": [
            {"name": "create", "task": "http",
             "params": {"method": "POST", "url": server.url_for("/records"),
                        "json_body": {"key": "{{ id }}"},
                        "response_fields": {"record_id": "record_id"}},
             "undo": {"task": "http",
                      "params": {"method": "DELETE",
                                 "url": server.url_for("/records") + "/{{ record_id }}",
                                 # Gone already (an undo repeated after a crash): done.
                                 "expected_status": [204, 404]},
                      "concurrency": 4}},
            {"name": "confirm", "task": "python",
             "params": {"function": "tests.handlers:fail_listed",
                        "fail_keys": fail_keys or []}},
        ],
        "options": {"concurrency": 5, **options},
    })


def home_env(dagster_home: Path, batch_dir: Path) -> dict[str, str]:
    return {**os.environ, "DAGSTER_HOME": str(dagster_home), "BATCH_DEFS_PATH": str(batch_dir),
            "PYTHONPATH": str(PROJECT), "COLUMNS": "200"}


def test_rollback_deletes_exactly_the_records_a_failed_run_created(
        api: tuple[HTTPServer, RecordsApi], batch_dir: Path, dagster_home: Path,
        instance: dg.DagsterInstance) -> None:
    server, records = api
    records.refuse = {7, 23, 31}  # the second refusal is beyond the tolerance: fail-fast
    records_batch(batch_dir, server, tolerated_failures=1)
    result = run_batch(batch_dir, instance, "records")
    assert not result.success
    created = set(records.created)
    assert 0 < len(created) < 47  # the batch stopped part way
    done = cli(home_env(dagster_home, batch_dir), "rollback", result.run_id[:8])
    assert done.returncode == 0, done.stderr
    assert f"rollback of {result.run_id}: create: {len(created)} undone" in done.stdout
    print(f"the run created {len(created)} records; rollback deleted "
          f"{sum(records.deleted.values())}")
    assert set(records.deleted) == created  # none missed, nothing else touched
    assert set(records.deleted.values()) == {1} and not records.missing  # none twice
    again = cli(home_env(dagster_home, batch_dir), "rollback", result.run_id)
    assert again.returncode == 0 and "nothing to undo" in again.stdout
    assert set(records.deleted.values()) == {1}
    with open_ledger(instance) as ledger:
        undo = ledger.rows(f"undo-{result.run_id}")
    assert len(undo) == len(created) and set(undo["status"]) == {"succeeded"}
    assert set(undo["phase"]) == {"create:undo"}


def test_a_rollback_killed_with_sigkill_then_run_again_deletes_each_record_once(
        api: tuple[HTTPServer, RecordsApi], batch_dir: Path, dagster_home: Path,
        instance: dg.DagsterInstance) -> None:
    server, records = api
    records_batch(batch_dir, server, fail_keys=[3, 4, 5], on_error="continue")
    result = run_batch(batch_dir, instance, "records")
    assert not result.success  # 3 failures in `confirm`, none tolerated
    created = set(records.created)
    assert len(created) == 50
    records.delete_ms = 200
    env = home_env(dagster_home, batch_dir)
    first = subprocess.Popen([sys.executable, "-m", "batch_defs.cli", "rollback",
                              result.run_id], env=env, cwd=PROJECT, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while sum(records.deleted.values()) < 15:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_after = sum(records.deleted.values())
    assert killed_after < 50
    records.delete_ms = 0
    second = cli(env, "rollback", result.run_id)
    assert second.returncode == 0, second.stderr
    print(f"SIGKILL after {killed_after} deletions; the second rollback repeated "
          f"{sum(records.missing.values())} DELETEs that were in flight")
    assert set(records.deleted) == created and set(records.deleted.values()) == {1}
    # Only undos in flight at the kill were sent again (concurrency 4), and found nothing.
    assert sum(records.missing.values()) <= 4
    assert not records.records


def test_rollback_on_fail_undoes_the_run_in_the_run_and_a_new_run_creates_again(
        api: tuple[HTTPServer, RecordsApi], batch_dir: Path,
        instance: dg.DagsterInstance) -> None:
    server, records = api
    records_batch(batch_dir, server, fail_keys=[10, 11], on_error="continue",
                  rollback_on="fail")
    result = run_batch(batch_dir, instance, "records")
    assert not result.success
    assert len(records.created) == 50 and set(records.deleted) == set(records.created)
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "rolled back (create: 50 undone)" in failure.step_failure_data.user_failure_data \
        .description  # type: ignore[union-attr]
    messages = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any("options.rollback_on: fail: rolling the run back" in m for m in messages)
    # Undone successes are not reused: the next run of the partition creates them again.
    records_batch(batch_dir, server, on_error="continue", rollback_on="fail")
    again = run_batch(batch_dir, instance, "records")
    assert again.success
    assert len(records.created) == 100 and len(records.records) == 50
    with open_ledger(instance) as ledger:
        rows = ledger.rows(again.run_id, phase="create")
    assert rows["reused_from"].isna().all()


def test_rollback_on_cancel_undoes_what_a_canceled_run_created(
        api: tuple[HTTPServer, RecordsApi], batch_dir: Path, dagster_home: Path,
        instance: dg.DagsterInstance) -> None:
    server, records = api
    records.create_ms, records.hold_after = 400, 10  # 50 items at concurrency 2: 10 s
    records_batch(batch_dir, server, rollback_on=["cancel"], concurrency=2)
    env = home_env(dagster_home, batch_dir)
    run = start_cli(env, "run", "records", "--partition", "p1")
    deadline = time.monotonic() + 120
    while len(records.created) < 10:
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.05)
    run_id = instance.get_runs(limit=1)[0].run_id
    cancel = start_cli(env, "cancel", run_id, "--grace", "60")
    with open_ledger(instance) as ledger:  # the cancel is asked for: let the held items go
        while ledger.stop_request(run_id) is None:
            assert cancel.poll() is None and time.monotonic() < deadline, cancel.communicate()
            time.sleep(0.05)
    records.released.set()
    _, error = cancel.communicate(timeout=120)
    assert cancel.returncode == 0, error
    run.communicate(timeout=120)
    assert 10 <= len(records.created) < 50
    assert set(records.deleted) == set(records.created) and not records.records
    assert set(records.deleted.values()) == {1}
    messages = [r.user_message for r in instance.all_logs(run_id)]
    assert any("options.rollback_on: cancel: rolling the run back" in m for m in messages)
