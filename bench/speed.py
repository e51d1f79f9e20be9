"""Speed as users feel it (issue 16): each workload through the product and through plain
threads (the limit) in the same run, with the ratios.

  - 1,000 x 2 x 100 ms c10: `batch-defs run` end to end (spawn to exit), the job alone (in
    this process), plain threads, and the share of slot-seconds idle while items ran.
  - time to the first item: `batch-defs run` of a 1,000-row and a 100,000-row CSV, from spawn
    to the first handler call, against a plain script streaming the CSV into threads; and of
    the 1,000-row CSV with the report and export after-steps every shipped batch has.
  - engine overhead at 10,000 x 2 x 0 ms c50: (end to end - plain threads) / items.
  - CPU-bound: 1,000 x 1 x 5 ms of pure-Python CPU at c10, plain threads against
    `options.workers: processes` ("not available" where this checkout has no such option).
  - one step per item: 100 x 2 x 100 ms c10 with `options.chunk_size: 1`.

Sources are CSV files; the ledger is SQLite in a temporary DAGSTER_HOME.

    .venv/bin/python bench/speed.py [--repeats 3] [--quick] [--only NAME ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import (
    Bench,
    Workload,
    bench_folder,
    calibrate_loops,
    fmt_ratio,
    fmt_s,
    median,
    option_available,
    plain_threads,
    plain_threads_first_item,
    print_table,
    ratio,
)

IO_1000 = Workload(1000, 2, 100, 10)
OVERHEAD = Workload(10_000, 2, 0, 50)
ONE_STEP = Workload(100, 2, 100, 10, options={"chunk_size": 1})
FIRST_ITEM_ROWS = (1000, 100_000)


def product_and_threads(bench: Bench, work: Workload, repeats: int,
                        job_alone: bool = True) -> dict[str, Any]:
    """Alternates end to end, job alone and threads, `repeats` times; medians."""
    name = bench.write_batch(work, bench.csv_source(work.items))
    ends, jobs, threads, idles, spans = [], [], [], [], []
    for _ in range(repeats):
        cli = bench.cli_run(name)
        if cli.returncode != 0 or cli.run_id is None:
            raise RuntimeError(f"{name}: batch-defs run exited {cli.returncode} "
                               f"(log in {bench.root})")
        ends.append(cli.wall_s)
        idles.append(bench.idle_share(cli.run_id, work.concurrency))
        spans.append(bench.item_span(cli.run_id))
        if job_alone:
            job_s, run_id = bench.job_alone(name)
            jobs.append(job_s)
            idles.append(bench.idle_share(run_id, work.concurrency))
        threads.append(plain_threads(work))
    row = {"workload": work.label, "options": work.options, "repeats": repeats,
           "threads_s": median(threads), "end_to_end_s": median(ends),
           "job_s": median(jobs), "idle_share": median(idles),
           "item_span_s": median(spans),
           "end_to_end_all": ends, "job_all": jobs, "threads_all": threads}
    row["end_to_end_ratio"] = ratio(row["end_to_end_s"], row["threads_s"])
    row["job_ratio"] = ratio(row["job_s"], row["threads_s"])
    return row


def io_case(bench: Bench, repeats: int) -> dict[str, Any]:
    return product_and_threads(bench, IO_1000, repeats)


# What every shipped batch ends with: their modules must not load before the first item.
SHIPPED_AFTER = [{"task": "report", "params": {"formats": ["csv"]}}, {"task": "export"}]


def first_item_case(bench: Bench, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for items, after in [*((n, None) for n in FIRST_ITEM_ROWS), (1000, SHIPPED_AFTER)]:
        work = Workload(items, 1, 0, 10, handler="mark_first_call")
        source = bench.csv_source(items)
        name = bench.write_batch(work, source, name=f"{work.name}_after" if after else None,
                                 after=after)
        product = [bench.first_item(name).first_item_s for _ in range(repeats)]
        threads = [plain_threads_first_item(source, work.concurrency) for _ in range(repeats)]
        label = f"{items:,}-row CSV" + (", report and export after-steps" if after else "")
        rows.append({"workload": f"time to the first item ({label})",
                     "repeats": repeats, "threads_s": median(threads),
                     "end_to_end_s": median(product), "end_to_end_all": product,
                     "threads_all": threads})
    return rows


def overhead_case(bench: Bench, repeats: int) -> dict[str, Any]:
    row = product_and_threads(bench, OVERHEAD, repeats)
    items = OVERHEAD.items
    row["end_to_end_ms_per_item"] = (row["end_to_end_s"] - row["threads_s"]) * 1000 / items
    row["job_ms_per_item"] = (row["job_s"] - row["threads_s"]) * 1000 / items
    return row


def cpu_case(bench: Bench, repeats: int) -> dict[str, Any]:
    loops = calibrate_loops(5)
    threads_only = Workload(1000, 1, 5, 10, handler="cpu_work", loops=loops)
    label = f"CPU-bound {threads_only.label} (pure Python)"
    if not option_available("workers", "processes"):
        threads = [plain_threads(threads_only) for _ in range(repeats)]
        return {"workload": label, "repeats": repeats, "threads_s": median(threads),
                "threads_all": threads, "available": False, "loops": loops}
    work = Workload(1000, 1, 5, 10, handler="cpu_work", loops=loops,
                    options={"workers": "processes"})
    row = product_and_threads(bench, work, repeats)
    row.update(workload=label, available=True, loops=loops,
               speedup_over_threads=ratio(row["threads_s"], row["end_to_end_s"]),
               job_speedup_over_threads=ratio(row["threads_s"], row["job_s"]))
    return row


def one_step_case(bench: Bench, repeats: int) -> dict[str, Any]:
    row = product_and_threads(bench, ONE_STEP, repeats)
    row["workload"] = f"one step per item: {ONE_STEP.label}, chunk_size 1"
    return row


CASES: dict[str, Callable[[Bench, int], Any]] = {
    "io": io_case, "first_item": first_item_case, "overhead": overhead_case,
    "cpu": cpu_case, "one_step": one_step_case,
}


def render(results: dict[str, Any]) -> None:
    headers = ["workload", "plain threads", "`batch-defs run` end to end", "the job alone",
               "notes"]
    rows = []
    for key, value in results.items():
        for row in value if isinstance(value, list) else [value]:
            rows.append(render_row(key, row))
    print_table(headers, rows)


def render_row(key: str, row: dict[str, Any]) -> list[str]:
    threads = fmt_s(row.get("threads_s"))
    if key == "cpu" and not row.get("available"):
        return [row["workload"], threads, "not available", "not available",
                "no options.workers: processes in this checkout"]
    end_ratio = ratio(row.get("end_to_end_s"), row.get("threads_s"))
    end = f"{fmt_s(row.get('end_to_end_s'))} ({fmt_ratio(end_ratio)})"
    job = ("-" if row.get("job_s") is None else
           f"{fmt_s(row['job_s'])} ({fmt_ratio(row.get('job_ratio'))})")
    notes = []
    if row.get("idle_share") is not None:
        notes.append(f"idle slot-seconds {row['idle_share']:.1%} of the "
                     f"{row['item_span_s']:.1f} s from first to last item")
    if "end_to_end_ms_per_item" in row:
        notes.append(f"overhead {row['end_to_end_ms_per_item']:.3f} ms/item end to end, "
                     f"{row['job_ms_per_item']:.3f} job alone")
    if "speedup_over_threads" in row:
        notes.append(f"{row['speedup_over_threads']:.2f}x faster than threads end to end, "
                     f"{row['job_speedup_over_threads']:.2f}x job alone")
    if key == "first_item":
        end = fmt_s(row.get("end_to_end_s"))
    return [row["workload"], threads, end, job, "; ".join(notes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="medians of N runs (3)")
    parser.add_argument("--quick", action="store_true", help="one run of each (--repeats 1)")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="some workloads")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    results: dict[str, Any] = {}
    with bench_folder() as bench:
        for key in args.only or CASES:
            results[key] = CASES[key](bench, repeats)
            print(json.dumps({key: results[key]}, default=str), flush=True)
    print()
    render(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
