"""A million items (issue 16): N items x 1 phase x 0 ms from a generated JSONL file through
`batch-defs run` in a subprocess, watched while it runs.

Prints the wall time (goal: under 10 minutes for 1,000,000), the peak resident memory of the
run's process tree sampled every 0.5 s (goal: under 1 GB), the ledger's row count afterwards
(goal: every item), the latency of `batch-defs status RUN --json` asked again and again during
the run (p50/p95/max; goal: under 1 s), and the answer times of the Dagster webserver's run
page GraphQL query during the run (started on a free port against the same DAGSTER_HOME, asked
every 0.5 s as bench/queue_load.py does; goal: p95 under 1 s). A plain thread pool over the
same file gives the reference.

    .venv/bin/python bench/million.py [--items 1000000] [--concurrency 10] [--no-webserver]
                                      [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from harness import BIN, PROJECT, Bench, Workload, bench_folder, print_table, stop_group

RUN_PAGE_QUERY = """query RunPage($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { runId status startTime endTime
    stats { __typename ... on RunStatsSnapshot { stepsSucceeded stepsFailed } } } }
  logsForRun(runId: $runId, limit: 1000) { __typename ... on EventConnection {
    cursor hasMore events { __typename } } } }"""
SAMPLE_S = 0.5


@dataclass
class Watch:
    """What the watchers collect while the run goes on."""

    stop: threading.Event = field(default_factory=threading.Event)
    peak_rss: int = 0
    peak_at: float = 0.0  # when the peak was sampled (seconds since launch)
    status_s: list[float] = field(default_factory=list)
    status_at: list[float] = field(default_factory=list)  # when each was asked (since launch)
    launched: float = field(default_factory=time.perf_counter)
    status_errors: int = 0
    graphql_s: list[float] = field(default_factory=list)
    graphql_errors: int = 0
    run_id: str | None = None


def sample_memory(process: psutil.Process, watch: Watch) -> None:
    while not watch.stop.is_set():
        try:
            tree = [process, *process.children(recursive=True)]
            rss = 0
            for member in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss += member.memory_info().rss
            if rss > watch.peak_rss:
                watch.peak_rss, watch.peak_at = rss, time.perf_counter() - watch.launched
        except psutil.NoSuchProcess:
            return
        watch.stop.wait(SAMPLE_S)


def find_run_id(bench: Bench, batch: str, partition: str, watch: Watch) -> None:
    while watch.run_id is None and not watch.stop.is_set():
        with suppress(sqlite3.Error):  # the ledger's tables may not exist yet
            watch.run_id = bench.run_id(batch, partition)
        watch.stop.wait(0.2)


def ask_status(bench: Bench, watch: Watch) -> None:
    """`batch-defs status RUN --json`, one after another, timed from spawn to exit."""
    while not watch.stop.is_set():
        if watch.run_id is None:
            watch.stop.wait(0.2)
            continue
        started = time.perf_counter()
        done = subprocess.run([str(BIN / "batch-defs"), "status", watch.run_id, "--json"],
                              env=bench.env, cwd=bench.root, capture_output=True, timeout=120)
        if watch.stop.is_set():
            return  # the run ended meanwhile: not a figure taken during the run
        if done.returncode == 0:
            watch.status_s.append(time.perf_counter() - started)
            watch.status_at.append(started - watch.launched)
        else:
            watch.status_errors += 1
        watch.stop.wait(SAMPLE_S)


def ask_run_page(url: str, watch: Watch) -> None:
    while not watch.stop.is_set():
        if watch.run_id is None:
            watch.stop.wait(0.2)
            continue
        started = time.perf_counter()
        try:
            answer = httpx.post(f"{url}/graphql", timeout=60, json={
                "query": RUN_PAGE_QUERY, "variables": {"runId": watch.run_id}})
            answer.raise_for_status()
            ok = "errors" not in answer.json()
        except httpx.HTTPError:
            ok = False
        if ok:
            watch.graphql_s.append(time.perf_counter() - started)
        else:
            watch.graphql_errors += 1
        watch.stop.wait(SAMPLE_S)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_webserver(bench: Bench) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", str(PROJECT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)], cwd=PROJECT, env=bench.env,
        start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=(bench.root / "webserver.log").open("w"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_group(server)
    raise SystemExit(f"the webserver did not start: see {bench.root / 'webserver.log'}")


def plain_threads_over_file(source: Path, concurrency: int) -> float:
    """The reference: read the JSONL and call a no-op for each record on a thread pool."""
    started = time.perf_counter()
    with source.open() as lines, ThreadPoolExecutor(max_workers=concurrency) as pool:
        for _ in pool.map(lambda line: json.loads(line), lines, chunksize=1000):
            pass
    return time.perf_counter() - started


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * share + 0.5) - 1))]


def run(items: int, concurrency: int, webserver: bool) -> dict[str, Any]:
    with bench_folder() as bench:
        source = bench.jsonl_source(items)
        work = Workload(items, 1, 0, concurrency)
        name = bench.write_batch(work, source, name=f"million_{items}")
        threads_s = plain_threads_over_file(source, concurrency)
        server, url = start_webserver(bench) if webserver else (None, "")
        watch = Watch()
        partition = bench.next_partition()
        log = (bench.root / "run.log").open("w")
        try:
            started = watch.launched = time.perf_counter()
            launched_at = time.time()  # the ledger's clock
            process = subprocess.Popen(bench.cli_command(name, partition), env=bench.env,
                                       cwd=bench.root, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            watchers = [threading.Thread(target=sample_memory,
                                         args=(psutil.Process(process.pid), watch)),
                        threading.Thread(target=find_run_id, args=(bench, name, partition, watch)),
                        threading.Thread(target=ask_status, args=(bench, watch))]
            if server:
                watchers.append(threading.Thread(target=ask_run_page, args=(url, watch)))
            for watcher in watchers:
                watcher.daemon = True
                watcher.start()
            returncode = process.wait()
            wall_s = time.perf_counter() - started
            watch.stop.set()
            for watcher in watchers:
                watcher.join(timeout=130)
        finally:
            log.close()
            if server:
                stop_group(server)
        run_id = watch.run_id or bench.run_id(name, partition)
        rows = bench.row_count(run_id) if run_id else 0
        # Which stage holds the peak: the items' (before the last finished) or the results
        # step's and the summary's (after it).
        last_item_s = (bench.query("select max(finished_at) from batch_item where run_id = ?",
                                   run_id)[0][0] - launched_at) if run_id else None
        tail = (bench.root / "run.log").read_text()[-2000:] if returncode else ""
    return {"items": items, "concurrency": concurrency, "returncode": returncode,
            "wall_s": wall_s, "threads_s": threads_s, "peak_rss_mb": watch.peak_rss / 2**20,
            "peak_at_s": watch.peak_at, "last_item_s": last_item_s,
            "ledger_rows": rows, "status_calls": len(watch.status_s),
            "status_errors": watch.status_errors,
            "status_p50_s": percentile(watch.status_s, 0.5),
            "status_p95_s": percentile(watch.status_s, 0.95),
            "status_max_s": max(watch.status_s, default=None),
            # Answers over the goal, with when they were asked: (seconds since launch, took).
            "status_over_1s": [(round(at, 1), round(took, 2)) for at, took
                               in zip(watch.status_at, watch.status_s, strict=True) if took > 1],
            "graphql_calls": len(watch.graphql_s), "graphql_errors": watch.graphql_errors,
            "graphql_p50_s": (statistics.median(watch.graphql_s) if watch.graphql_s
                              else None),
            "graphql_p95_s": percentile(watch.graphql_s, 0.95),
            "graphql_max_s": max(watch.graphql_s, default=None), "log_tail": tail}


def over_1s(result: dict[str, Any]) -> str:
    slow = result["status_over_1s"]
    if not slow:
        return "none over 1 s"
    asked = ", ".join(f"{took:.2f} s at {at:.0f} s" for at, took in slow[:4])
    return f"{len(slow)} over 1 s: {asked}{' ...' if len(slow) > 4 else ''}"


def render(result: dict[str, Any]) -> None:
    def s(key: str, digits: int = 2) -> str:
        value = result.get(key)
        return "-" if value is None else f"{value:.{digits}f} s"

    items = result["items"]
    scale = items / 1_000_000
    rows = [
        ["wall time of `batch-defs run`", f"{result['wall_s']:.1f} s "
         f"({result['wall_s'] / 60:.1f} min; plain threads {result['threads_s']:.1f} s)",
         f"< {600 * scale:.0f} s" + (" (10 min at 1M, scaled)" if scale != 1 else "")],
        ["peak memory of the run's process tree", f"{result['peak_rss_mb']:.0f} MB at "
         f"{result['peak_at_s']:.0f} s (the last item finished at {s('last_item_s', 0)})",
         "< 1024 MB"],
        ["ledger rows afterwards", f"{result['ledger_rows']:,} of {items:,}", f"{items:,}"],
        ["`batch-defs status RUN` during the run",
         f"p50 {s('status_p50_s')}, p95 {s('status_p95_s')}, max {s('status_max_s')} "
         f"({result['status_calls']} calls, {result['status_errors']} errors; "
         f"{over_1s(result)})", "< 1 s"],
        ["webserver run page GraphQL during the run",
         f"p50 {s('graphql_p50_s')}, p95 {s('graphql_p95_s')}, max {s('graphql_max_s')} "
         f"({result['graphql_calls']} calls, {result['graphql_errors']} errors)", "p95 < 1 s"],
    ]
    print_table([f"{items:,} x 1 x 0 ms, c{result['concurrency']} (JSONL)", "measured", "goal"],
                rows)
    if result["returncode"]:
        print(f"\nbatch-defs run exited {result['returncode']}:\n{result['log_tail']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--no-webserver", action="store_true",
                        help="skip the webserver and its GraphQL figures")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures")
    args = parser.parse_args()
    result = run(args.items, args.concurrency, not args.no_webserver)
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}), flush=True)
    print()
    render(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(0 if result["returncode"] == 0 else 1)


if __name__ == "__main__":
    main()
