"""The product beside its peers (issue 16), every figure from the same run: plain threads (the
limit), `batch-defs run` end to end (spawn to exit), the job alone (in process), Prefect 3
`task.map` on ThreadPoolTaskRunner(C) (spawn to exit, ephemeral local server on SQLite in a
temporary PREFECT_HOME), and Dagster's one step per item (a DynamicOutput per item; in process
and multiprocess, only for workloads of at most --dagster-max-items items: "-" beyond).

Needs the peers extra: `pip install -e '.[peers]'` (Prefect 3).

    .venv/bin/python bench/peers.py [--repeats 3] [--quick] [--only NAME ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import (
    HERE,
    Bench,
    Workload,
    bench_folder,
    fmt_ratio,
    fmt_s,
    median,
    plain_threads,
    plain_threads_first_item,
    print_table,
    ratio,
    stop_group,
    wait_for_stamp,
)

WORKLOADS = {
    "io_1000": Workload(1000, 2, 100, 10),
    "io_100": Workload(100, 2, 100, 10),
    "zero_10000": Workload(10_000, 2, 0, 50),
}
FIRST_ITEM_ITEMS = 10_000


def prefect_env(bench: Bench) -> dict[str, str]:
    """Prefect on its own: a home of its own, the ephemeral server (no PREFECT_API_URL), no
    analytics, no update checks, quiet logs."""
    home = bench.root / "prefect_home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in bench.env.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
               PREFECT_LOGGING_TO_API_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY="false")
    return env


def spawn_wall(command: list[str], env: dict[str, str], log: Path) -> float:
    with log.open("w") as out:
        started = time.perf_counter()
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=3600)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[1]} exited {done.returncode}: see {log}")
    return wall


def prefect(bench: Bench, work: Workload) -> float:
    args = [str(a) for a in (work.items, work.phases, work.ms, work.concurrency)]
    return spawn_wall([sys.executable, str(HERE / "peer_prefect.py"), *args],
                      prefect_env(bench), bench.root / "prefect.log")


def prefect_first_item(bench: Bench, items: int) -> float | None:
    stamp = bench.root / f"prefect_first_{time.time_ns()}"
    env = {**prefect_env(bench), "BENCH_FIRST_CALL_FILE": str(stamp)}
    spawned = time.time()
    process = subprocess.Popen([sys.executable, str(HERE / "peer_prefect.py"), str(items), "1",
                                "0", "10"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    first = wait_for_stamp(stamp, process, 600)
    stop_group(process)
    return None if first is None else first - spawned


def dagster_one_step(bench: Bench, work: Workload, executor: str) -> float:
    args = [str(a) for a in (work.items, work.phases, work.ms, work.concurrency, executor)]
    return spawn_wall([sys.executable, str(HERE / "peer_dagster.py"), *args], bench.env,
                      bench.root / f"dagster_{executor}.log")


def measure(bench: Bench, work: Workload, repeats: int, dagster_max: int) -> dict[str, Any]:
    name = bench.write_batch(work, bench.csv_source(work.items))
    cells: dict[str, list[float]] = {k: [] for k in (
        "threads", "end_to_end", "job", "prefect", "dagster_in_process", "dagster_multiprocess")}
    for _ in range(repeats):
        cli = bench.cli_run(name)
        if cli.returncode != 0:
            raise RuntimeError(f"{name}: batch-defs run exited {cli.returncode}")
        cells["end_to_end"].append(cli.wall_s)
        cells["job"].append(bench.job_alone(name)[0])
        cells["prefect"].append(prefect(bench, work))
        if work.items <= dagster_max:
            cells["dagster_in_process"].append(dagster_one_step(bench, work, "in_process"))
            cells["dagster_multiprocess"].append(dagster_one_step(bench, work, "multiprocess"))
        cells["threads"].append(plain_threads(work))
    row: dict[str, Any] = {"workload": work.label, "repeats": repeats}
    row.update({f"{k}_s": median(v) for k, v in cells.items()})
    row.update({f"{k}_all": v for k, v in cells.items()})
    return row


def first_item(bench: Bench, repeats: int) -> dict[str, Any]:
    items = FIRST_ITEM_ITEMS
    source = bench.csv_source(items)
    name = bench.write_batch(Workload(items, 1, 0, 10, handler="mark_first_call"), source)
    product = [bench.first_item(name).first_item_s for _ in range(repeats)]
    peer = [prefect_first_item(bench, items) for _ in range(repeats)]
    threads = [plain_threads_first_item(source, 10) for _ in range(repeats)]
    return {"workload": f"time to the first item ({items:,} items)", "repeats": repeats,
            "threads_s": median(threads), "end_to_end_s": median(product),
            "prefect_s": median(peer), "end_to_end_all": product, "prefect_all": peer,
            "threads_all": threads}


def cell(row: dict[str, Any], key: str, per_item: bool = False) -> str:
    value = row.get(f"{key}_s")
    if value is None:
        return "-"
    text = fmt_s(value, 1 if value >= 10 else 2)
    if key == "threads" or row["workload"].startswith("time to"):
        return text
    if per_item:
        items = int(row["workload"].split(" x ")[0].replace(",", ""))
        return f"{text} ({(value - row['threads_s']) * 1000 / items:.2f} ms/item over threads)"
    return f"{text} ({fmt_ratio(ratio(value, row['threads_s']))})"


def render(rows: list[dict[str, Any]]) -> None:
    headers = ["workload", "plain threads (the limit)", "`batch-defs run` end to end",
               "the job alone", "Prefect 3 task.map", "Dagster, one step per item"]
    table = []
    for row in rows:
        per_item = row["workload"].startswith("10,000")
        dagster = "-"
        if row.get("dagster_in_process_s") is not None:
            dagster = (f"{cell(row, 'dagster_in_process')} in process, "
                       f"{cell(row, 'dagster_multiprocess')} multiprocess")
        table.append([row["workload"], cell(row, "threads"), cell(row, "end_to_end", per_item),
                      cell(row, "job", per_item), cell(row, "prefect", per_item), dagster])
    print_table(headers, table)
    print()
    for row in rows:
        if row.get("prefect_s") and row.get("end_to_end_s") and not row["workload"].startswith(
                "time to"):
            print(f"{row['workload']}: batch-defs run end to end is "
                  f"{row['prefect_s'] / row['end_to_end_s']:.2f}x faster than Prefect 3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="medians of N runs (3)")
    parser.add_argument("--quick", action="store_true", help="one run of each (--repeats 1)")
    parser.add_argument("--only", nargs="+", choices=[*WORKLOADS, "first_item"])
    parser.add_argument("--dagster-max-items", type=int, default=100,
                        help="run Dagster one-step-per-item only up to this many items (100)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures")
    args = parser.parse_args()
    try:
        import prefect  # noqa: F401
    except ImportError:
        raise SystemExit("Prefect is not installed: pip install -e '.[peers]'") from None
    repeats = 1 if args.quick else args.repeats
    rows = []
    with bench_folder() as bench:
        os.environ.pop("BENCH_FIRST_CALL_FILE", None)
        for key in args.only or [*WORKLOADS, "first_item"]:
            row = (first_item(bench, repeats) if key == "first_item" else
                   measure(bench, WORKLOADS[key], repeats, args.dagster_max_items))
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    print()
    render(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
