"""Throughput of the batch engine against a plain-Python thread pool, in the same process.

Each case runs N items x P phases x S ms of simulated I/O at concurrency C twice: through the
real Dagster job (fan-out, mapped phase ops, ledger on SQLite, results asset) and through a
ThreadPoolExecutor doing the same sleeps phase after phase. It prints both times and the ratio.

    python bench/throughput.py --suite foundation     # the figures in docs/benchmarks.md
    python bench/throughput.py --items 1000 --phases 2 --ms 100 --concurrency 10
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sim_tasks


@dataclass
class Case:
    items: int
    phases: int
    ms: float
    concurrency: int
    mode: str = "parallel"

    @property
    def name(self) -> str:
        return (f"bench_{self.items}x{self.phases}x{int(self.ms)}ms_c{self.concurrency}"
                f"{'_seq' if self.mode == 'sequential' else ''}")

    @property
    def ideal_s(self) -> float:
        slots = 1 if self.mode == "sequential" else self.concurrency
        return self.items * self.phases * self.ms / 1000 / slots


SUITES = {
    "foundation": [
        Case(1000, 2, 100, 10),
        Case(100, 2, 100, 1), Case(100, 2, 100, 4), Case(100, 2, 100, 10),
        Case(1000, 1, 100, 10, "sequential"),
    ],
    "quick": [Case(200, 2, 20, 10), Case(100, 2, 20, 1), Case(100, 2, 20, 4)],
}


def plain_pool(case: Case) -> float:
    """The reference: the same sleeps through a thread pool, one phase after another."""
    def work(_: int) -> None:
        time.sleep(case.ms / 1000)

    slots = 1 if case.mode == "sequential" else case.concurrency
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=slots) as pool:
        for _ in range(case.phases):
            list(pool.map(work, range(case.items)))
    return time.perf_counter() - started


def write_spec(folder: Path, case: Case) -> None:
    spec = {
        "name": case.name,
        "source": {"type": "inline", "key": "id",
                   "items": [{"id": i, "payload": f"item {i}"} for i in range(case.items)]},
        "phases": [{"name": f"phase_{p}", "task": "python",
                    "params": {"function": "sim_tasks:simulated_io", "ms": case.ms}}
                   for p in range(case.phases)],
        "options": {"concurrency": case.concurrency, "mode": case.mode},
    }
    (folder / f"{case.name}.yaml").write_text(yaml.safe_dump(spec))


def run_job(home: Path, folder: Path, case: Case) -> dict[str, Any]:
    import dagster as dg

    from batch_defs.definitions import build_definitions
    from resources.storage import BatchStorageResource

    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(case.name, ["bench"])
        job = build_definitions([folder]).resolve_job_def(case.name)
        ledger = BatchStorageResource().ledger(instance)
        queries = ledger.queries
        started = time.perf_counter()
        result = job.execute_in_process(instance=instance, partition_key="bench", run_config={
            "loggers": {"console": {"config": {"log_level": "WARNING"}}}})
        elapsed = time.perf_counter() - started
        rows = ledger.count_rows(result.run_id)
    assert result.success and rows == case.items * case.phases, "benchmark run failed"
    return {"job_s": elapsed, "ledger_queries_per_100_items":
            round((ledger.queries - queries) * 100 / case.items, 1)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh database on the server of admin_url for one benchmark run, dropped after."""
    import sqlalchemy as sa

    name = f"batch_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'create database "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        from batch_defs.ledger import Ledger

        for engine in Ledger._engines.values():
            engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'drop database if exists "{name}" with (force)'))
        admin.dispose()


def run_cases(cases: list[Case], postgres: str | None = None) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        home, folder = Path(tmp) / "home", Path(tmp) / "batches"
        home.mkdir()
        folder.mkdir()
        config: dict[str, Any] = {"telemetry": {"enabled": False}}
        if postgres:
            url = stack.enter_context(postgres_database(postgres))
            config["storage"] = {"postgres": {"postgres_url": url}}
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
        for case in cases:
            write_spec(folder, case)
            job = run_job(home, folder, case)
            pool_s = plain_pool(case)
            row = {**asdict(case), "instance": "postgres" if postgres else "sqlite",
                   "ideal_s": round(case.ideal_s, 2),
                   "job_s": round(job["job_s"], 2), "pool_s": round(pool_s, 2),
                   "ratio": round(job["job_s"] / pool_s, 3),
                   "ledger_queries_per_100_items": job["ledger_queries_per_100_items"],
                   "peak_rss_mb": round(peak_rss_mb(), 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def speedups(results: list[dict[str, Any]]) -> list[str]:
    """Job time at concurrency 1 over job time at C, for cases that differ only in C."""
    lines = []
    for row in results:
        base = next((r for r in results if r["concurrency"] == 1 and r["mode"] == "parallel"
                     and (r["items"], r["phases"], r["ms"]) ==
                     (row["items"], row["phases"], row["ms"])), None)
        if base and row["concurrency"] > 1:
            lines.append(f"{row['items']} items: concurrency {row['concurrency']} vs 1: "
                         f"{base['job_s'] / row['job_s']:.2f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES))
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--phases", type=int, default=2)
    parser.add_argument("--ms", type=float, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[10])
    parser.add_argument("--mode", choices=["parallel", "sequential"], default="parallel")
    parser.add_argument("--postgres", metavar="ADMIN_URL",
                        help="Run on a Postgres instance (a fresh database on this server), "
                             "e.g. postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    cases = SUITES[args.suite] if args.suite else [
        Case(args.items, args.phases, args.ms, c, args.mode) for c in args.concurrency]
    results = run_cases(cases, args.postgres)
    print()
    header = (f"{'case':<34} {'ideal s':>8} {'job s':>8} {'pool s':>8} {'job/pool':>9} "
              f"{'q/100':>6} {'peak MB':>8}")
    print(header)
    for r in results:
        name = f"{r['items']}x{r['phases']}x{int(r['ms'])}ms c{r['concurrency']} {r['mode']}"
        print(f"{name:<34} {r['ideal_s']:>8} {r['job_s']:>8} {r['pool_s']:>8} "
              f"{r['ratio']:>9} {r['ledger_queries_per_100_items']:>6} {r['peak_rss_mb']:>8}")
    for line in speedups(results):
        print(line)


if __name__ == "__main__":
    main()
