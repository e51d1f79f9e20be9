"""50 batches submitted at once through the run queue, with the webserver watched throughout.

Starts `dagster dev` (webserver + daemon) on a Postgres instance with the project's run
limits, submits one run for each of N batches through the webserver's GraphQL API at once, and
while they run asks the webserver for its run list every half second. Prints how many runs
succeeded, how long the queue took to drain, and the GraphQL answer times (max and p95).

    python bench/queue_load.py --postgres postgresql+psycopg2://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))
RUNS_QUERY = "{ runsOrError(limit: 20) { ... on Runs { results { runId status } } } }"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_batches(folder: Path, count: int, items: int, ms: int) -> list[str]:
    names = [f"load_{n:02d}" for n in range(count)]
    for name in names:
        spec = {"name": name,
                "source": {"type": "inline", "key": "id",
                           "items": [{"id": i} for i in range(items)]},
                "phases": [{"name": "work", "task": "python",
                            "params": {"function": "sim_tasks:simulated_io", "ms": ms}}],
                "options": {"concurrency": 10}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return names


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    response = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables or {}},
                          timeout=30)
    response.raise_for_status()
    return response.json()


LAUNCH = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", required=True, metavar="ADMIN_URL")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--ms", type=int, default=20)
    args = parser.parse_args()
    import dagster as dg
    from throughput import postgres_database

    with tempfile.TemporaryDirectory() as tmp, postgres_database(args.postgres) as pg_url:
        home, folder = Path(tmp) / "home", Path(tmp) / "batches"
        home.mkdir()
        folder.mkdir()
        config = yaml.safe_load((PROJECT / "dagster.yaml").read_text())
        config["storage"] = {"postgres": {"postgres_url": pg_url}}
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        names = write_batches(folder, args.batches, args.items, args.ms)
        env = {**os.environ, "DAGSTER_HOME": str(home), "BATCH_DEFS_PATH": str(folder),
               "PYTHONPATH": os.pathsep.join([str(PROJECT), str(HERE)])}
        with dg.DagsterInstance.from_config(str(home)) as instance:
            for name in names:
                instance.add_dynamic_partitions(name, ["load"])
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster"), "dev", "-w",
             str(PROJECT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
            cwd=PROJECT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=(Path(tmp) / "dev.log").open("w"))
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("webserver did not start")
                time.sleep(1)
            latencies: list[float] = []
            stop = threading.Event()

            def watch() -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    graphql(url, RUNS_QUERY)
                    latencies.append(time.perf_counter() - started)
                    stop.wait(0.5)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            started = time.perf_counter()
            run_ids = []
            for name in names:
                params = {"selector": {"repositoryLocationName": "batch_defs.definitions",
                                       "repositoryName": "__repository__", "jobName": name},
                          "runConfigData": {},
                          "executionMetadata": {"tags": [
                              {"key": "dagster/partition", "value": "load"}]}}
                answer = graphql(url, LAUNCH, {"params": params})["data"]["launchRun"]
                assert answer["__typename"] == "LaunchRunSuccess", answer
                run_ids.append(answer["run"]["runId"])
            submitted = time.perf_counter() - started
            with dg.DagsterInstance.from_config(str(home)) as instance:
                while True:
                    runs = instance.get_runs(dg.RunsFilter(run_ids=run_ids))
                    if all(run.is_finished for run in runs):
                        break
                    time.sleep(2)
                statuses = [run.status.value for run in runs]
            drained = time.perf_counter() - started
            stop.set()
            watcher.join()
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        latencies.sort()
        result = {"batches": args.batches, "items_per_batch": args.items,
                  "succeeded": statuses.count("SUCCESS"), "submit_s": round(submitted, 1),
                  "drain_s": round(drained, 1), "graphql_calls": len(latencies),
                  "graphql_max_s": round(latencies[-1], 3),
                  "graphql_p95_s": round(latencies[int(len(latencies) * 0.95) - 1], 3),
                  "graphql_median_s": round(statistics.median(latencies), 3)}
        print(json.dumps(result))


if __name__ == "__main__":
    main()
