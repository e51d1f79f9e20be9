"""What the results step pays to read a run's rows (issue 16), three ways on the same ledger in
the same run: what it reads now (`read_result_rows`: the rows its tables show and the timings
its charts bin), every row of the columns it used to read through `Ledger.rows` (frames
built column by column), and the same through the former `DataFrame.from_records` over
SQLAlchemy's row objects.

A job of N items x 2 phases x 0 ms (default 10,000 items: 20,000 rows) runs once in this
process on a temporary SQLite DAGSTER_HOME; then both reads alternate, --repeats times each,
after one warm-up read of each. Prints the medians and their ratio.

    .venv/bin/python bench/results_read.py [--items 10000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from harness import Workload, bench_folder, print_table

# What the results step read of every row of a run before it read only the rows it shows and
# its charts' timings (assets/results.py).
READ_COLUMNS = ["item_key", "phase", "status", "attempts", "duration_s", "cost", "error",
                "started_at", "finished_at", "reused_from"]


def former_rows(ledger: Any, run_id: str, columns: list[str]) -> Any:
    """The read as it was before: from_records over each part's row objects."""
    import pandas as pd
    import sqlalchemy as sa

    from batch_defs.ledger import item_table

    t = item_table.c
    query = (sa.select(*[t[name] for name in columns]).where(t.run_id == run_id)
             .order_by(t.seq, t.id))
    with ledger.engine.connect() as conn:
        result = conn.execution_options(stream_results=True).execute(query)
        parts = [pd.DataFrame.from_records(part, columns=columns)
                 for part in result.partitions(50_000)]
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def timed(read: Callable[[], Any]) -> tuple[float, int]:
    started = time.perf_counter()
    frame = read()
    frame = getattr(frame, "timings", frame)  # read_result_rows: count the timings' rows
    return time.perf_counter() - started, len(frame)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with bench_folder() as bench:
        work = Workload(args.items, 2, 0, 50)
        name = bench.write_batch(work, bench.csv_source(args.items))
        _, run_id = bench.job_alone(name)

        import dagster as dg

        from assets.results import read_result_rows
        from resources.storage import open_ledger

        with dg.DagsterInstance.from_config(str(bench.home)) as instance:
            ledger = open_ledger(instance)
            reads = {"read_result_rows (shown rows, chart timings)":
                     lambda: read_result_rows(ledger, run_id),
                     "Ledger.rows of every row (column by column)":
                     lambda: ledger.rows(run_id, columns=READ_COLUMNS),
                     "from_records over row objects (before)":
                     lambda: former_rows(ledger, run_id, READ_COLUMNS)}
            times: dict[str, list[float]] = {label: [] for label in reads}
            for read in reads.values():
                timed(read)  # warm-up: the SQLite pages, pandas' first use
            for _ in range(args.repeats):
                for label, read in reads.items():
                    seconds, count = timed(read)
                    assert count == 2 * args.items, (label, count)  # timings: every row too
                    times[label].append(seconds)
            ledger.close()
    result_read, now, before = (statistics.median(v) for v in times.values())
    print_table(["read of the run's rows", f"median of {args.repeats}", "each"],
                [[label, f"{statistics.median(v):.3f} s", ", ".join(f"{s:.3f}" for s in v)]
                 for label, v in times.items()])
    print(f"\n{2 * args.items:,} rows: Ledger.rows is {before / now:.2f}x as fast as before; "
          f"the results step's read {before / result_read:.2f}x")


if __name__ == "__main__":
    main()
