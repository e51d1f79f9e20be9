"""Doors that queue a run (the daemon launches it): `dagster job launch` of a new partition, and
a run of the implicit asset job (what the UI's asset page launches), which the project's run
coordinator gives the batch's tags before the run limits see it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import httpx
import pytest
import yaml

from tests.conftest import (
    PROJECT,
    fresh_pg_database,
    inline_items,
    queued_instance_config,
    write_batch,
)


def doorway(batch_dir: Path) -> None:
    # 12 x 250 ms at concurrency 4: long enough for runs of it to overlap if allowed to.
    write_batch(batch_dir, {
        "name": "doorway", "source": inline_items(12),
        "phases": [{"name": "work", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 250}}],
        "options": {"concurrency": 4}, "tags": {"batch/resource": "crm"}})


@pytest.fixture
def queued_home(tmp_path: Path, batch_dir: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    home = tmp_path / "home"
    home.mkdir()
    with fresh_pg_database() as url:
        (home / "dagster.yaml").write_text(yaml.safe_dump(queued_instance_config(url)))
        yield home, {**os.environ, "DAGSTER_HOME": str(home), "BATCH_DEFS_PATH": str(batch_dir),
                     "PYTHONPATH": str(PROJECT)}


def wait_until_finished(home: Path, run_id: str, timeout: float = 180) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout
    with dg.DagsterInstance.from_config(str(home)) as inst:
        while True:
            run = inst.get_run_by_id(run_id)
            if run is not None and run.is_finished:
                return run
            assert time.monotonic() < deadline, run.status if run else "no run"
            time.sleep(0.5)


LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


@contextmanager
def dagster_dev(home: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """`dagster dev` (webserver and daemon) on a loopback port; yields its URL."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster"), "dev", "-w",
         str(PROJECT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=PROJECT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the webserver did not start"
            time.sleep(1)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.daemon
@pytest.mark.postgres
def test_queued_doors_end_success_as_runs_of_the_batch(
        queued_home: tuple[Path, dict[str, str]], batch_dir: Path, tmp_path: Path) -> None:
    """`dagster job launch` of a new partition, and the UI asset page's launch (the implicit
    asset job, one asset, a partition): both queue, run and end SUCCESS with the batch's tags,
    which the run limits saw (they were on the run before it left the queue)."""
    home, env = queued_home
    doorway(batch_dir)
    with dagster_dev(home, env, tmp_path / "dev.log") as url:
        launched = subprocess.run(
            [sys.executable, "-m", "dagster", "job", "launch", "-m", "batch_defs.definitions",
             "-j", "doorway", "--run-id", JOB_LAUNCH_RUN,
             "--tags", json.dumps({"dagster/partition": "from-job-launch"})],
            env=env, cwd=PROJECT, capture_output=True, text=True, timeout=180)
        assert launched.returncode == 0, launched.stderr[-2000:]
        # The UI's docs of the Batch component type describe its fields.
        answer = httpx.post(f"{url}/graphql", json={"query": COMPONENT_TYPES}, timeout=60).json()
        (batch_type,) = [t for t in answer["data"]["componentTypesForLocationOrError"]
                         ["componentTypes"] if t["name"] == "batch_defs.components.Batch"]
        described = batch_type["schema"]["$defs"]["OptionsSpec"]["properties"]
        assert described["tolerated_failures"]["description"].startswith("Failed, invalid")
        page_runs = [launch_from_asset_page(url, partition) for partition in PAGE_PARTITIONS]
        runs = [wait_until_finished(home, run_id) for run_id in (JOB_LAUNCH_RUN, *page_runs)]
    for run, partition in zip(runs, ("from-job-launch", *PAGE_PARTITIONS), strict=True):
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.run_id
        assert run.tags["batch/name"] == "doorway" and run.tags["batch/resource"] == "crm"
        assert run.tags["dagster/partition"] == partition
    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert {"from-job-launch", *PAGE_PARTITIONS} <= set(
            inst.get_dynamic_partitions("doorway"))
        records = inst.get_run_records(dg.RunsFilter(run_ids=[r.run_id for r in runs]))
    # One run of a batch at a time (dagster.yaml): the asset page's runs carried the batch's
    # name while queued, so the limit held them back; without it they would have overlapped.
    spans = sorted((r.start_time, r.end_time) for r in records)
    assert all(end <= next_start
               for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False))


PAGE_PARTITIONS = ("from-asset-page-1", "from-asset-page-2")
COMPONENT_TYPES = """query {
  componentTypesForLocationOrError(locationName: "batch_defs.definitions") {
    ... on ComponentTypes { componentTypes { name schema } } } }"""


def launch_from_asset_page(url: str, partition: str) -> str:
    """What the UI's asset page sends: the implicit asset job, one asset, a partition."""
    params = {"selector": {"repositoryLocationName": "batch_defs.definitions",
                           "repositoryName": "__repository__", "jobName": "__ASSET_JOB",
                           "assetSelection": [{"path": ["doorway", "results"]}]},
              "runConfigData": {},
              "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]}}
    answer = httpx.post(f"{url}/graphql", json={"query": LAUNCH, "variables": {"params": params}},
                        timeout=60).json()["data"]["launchRun"]
    assert answer["__typename"] == "LaunchRunSuccess", answer
    return answer["run"]["runId"]


JOB_LAUNCH_RUN = "0f0e0d0c-0b0a-4000-8000-000000000001"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
