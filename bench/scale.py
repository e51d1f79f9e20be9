"""The scale matrix: each case in a fresh process (so peak memory is that run's alone),
against a plain-Python thread pool measured in the same process; prints JSON and a table.

    python bench/scale.py                       # the cases recorded in docs/benchmarks.md
    python bench/scale.py --only-ms 0           # just the engine-overhead cases
    python bench/scale.py --postgres postgresql+psycopg2://postgres@127.0.0.1:5432/test

Cells whose plain-Python reference alone would take more than --max-ideal-s seconds (e.g.
50,000 items x 100 ms at concurrency 1: 10,000 s) are left out and listed as such.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ITEMS = (100, 1_000, 10_000, 50_000)
CONCURRENCY = (1, 4, 10, 50)
MS = (0, 100)


def run_case(items: int, ms: int, concurrency: int, postgres: str | None) -> dict | None:
    command = [sys.executable, str(HERE / "throughput.py"), "--items", str(items), "--phases",
               "2", "--ms", str(ms), "--concurrency", str(concurrency)]
    if postgres:
        command += ["--postgres", postgres]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        print(f"FAILED {items}x2x{ms}ms c{concurrency}: {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return rows[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", metavar="ADMIN_URL")
    parser.add_argument("--only-ms", type=int, choices=MS)
    parser.add_argument("--max-ideal-s", type=float, default=120.0)
    parser.add_argument("--items", type=int, nargs="+", default=list(ITEMS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    args = parser.parse_args()
    results, left_out = [], []
    for ms in [args.only_ms] if args.only_ms is not None else MS:
        for items in args.items:
            for concurrency in args.concurrency:
                ideal = items * 2 * ms / 1000 / concurrency
                if ideal > args.max_ideal_s:
                    left_out.append(f"{items}x2x{ms}ms c{concurrency} (ideal {ideal:.0f} s)")
                    continue
                row = run_case(items, ms, concurrency, args.postgres)
                if row:
                    row["overhead_ms_per_item"] = round(
                        (row["job_s"] - row["ideal_s"]) * 1000 / items, 2)
                    results.append(row)
                    print(json.dumps(row), flush=True)
    print()
    print(f"{'case':<26} {'inst':<8} {'ideal s':>8} {'job s':>8} {'pool s':>8} "
          f"{'job/pool':>8} {'ms/item':>8} {'q/100':>6} {'peak MB':>8}")
    for r in results:
        name = f"{r['items']}x2x{int(r['ms'])}ms c{r['concurrency']}"
        print(f"{name:<26} {r['instance']:<8} {r['ideal_s']:>8} {r['job_s']:>8} "
              f"{r['pool_s']:>8} {r['ratio']:>8} {r['overhead_ms_per_item']:>8} "
              f"{r['ledger_queries_per_100_items']:>6} {r['peak_rss_mb']:>8}")
    if left_out:
        print("left out (reference alone longer than --max-ideal-s):", ", ".join(left_out))


if __name__ == "__main__":
    main()
