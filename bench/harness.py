"""What bench/speed.py, peers.py and million.py share: a throwaway instance and batch folder,
workloads written as batch specs over a CSV or JSONL file, `batch-defs run` timed from spawn
to exit, the job alone in process, the plain-threads reference, and figures read back from
the ledger (idle slot share, first item, row count).

Every script keeps its CLI small: --repeats N (medians), --quick, --json.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(HERE))  # sim_tasks, for the job run in this process

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Workload:
    """N items x P phases x S ms of simulated I/O (or `loops` of pure-Python CPU) at C."""

    items: int
    phases: int
    ms: float
    concurrency: int
    handler: str = "simulated_io"  # a function of bench/sim_tasks.py
    options: dict[str, Any] = field(default_factory=dict, hash=False)
    loops: int = 0  # for handler cpu_work

    @property
    def label(self) -> str:
        return f"{self.items:,} x {self.phases} x {self.ms:g} ms, c{self.concurrency}"

    @property
    def name(self) -> str:
        extra = "_".join(f"{k}_{v}" for k, v in sorted(self.options.items()))
        return (f"bench_{self.handler}_{self.items}x{self.phases}x{int(self.ms)}"
                f"_c{self.concurrency}{'_' + extra if extra else ''}").lower()

    def params(self) -> dict[str, Any]:
        return {"loops": self.loops} if self.handler == "cpu_work" else {"ms": self.ms}

    def call(self) -> None:
        """One item-phase of the plain-threads reference: the handler's own work."""
        import sim_tasks

        if self.handler == "cpu_work":
            sim_tasks.burn(self.loops)
        elif self.ms:
            time.sleep(self.ms / 1000)


@dataclass
class CliRun:
    wall_s: float
    returncode: int
    run_id: str | None
    first_item_s: float | None = None  # spawn to the first handler call


class Bench:
    """A temporary DAGSTER_HOME (the project's dagster.yaml, set up before anything is timed),
    a batch folder (BATCH_DEFS_PATH) and a data folder."""

    def __init__(self, root: Path):
        self.root = root
        self.home, self.batches, self.data = root / "home", root / "batches", root / "data"
        for folder in (self.home, self.batches, self.data):
            folder.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home),
                    "BATCH_DEFS_PATH": str(self.batches),
                    "PYTHONPATH": os.pathsep.join([str(HERE), str(PROJECT)])}
        self.env.pop("BENCH_FIRST_CALL_FILE", None)
        self._partition = 0

    def set_up(self) -> None:
        """Dagster's storage and the ledger schema, once, so no timed run pays for them."""
        subprocess.run([str(BIN / "python"), "-m", "batch_defs.instance"], env=self.env,
                       cwd=PROJECT, check=True, stdout=subprocess.DEVNULL)

    def next_partition(self) -> str:
        self._partition += 1
        return f"p{self._partition}"

    @property
    def ledger_db(self) -> Path:
        return self.home / "batch_ledger.db"

    # Batches

    def write_batch(self, work: Workload, source: Path, name: str | None = None,
                    handler: str | None = None, after: list[dict[str, Any]] | None = None) -> str:
        name = name or work.name
        kind = "jsonl" if source.suffix == ".jsonl" else "csv"
        spec = {
            "name": name,
            "source": {"type": kind, "path": str(source), "key": "id"},
            "phases": [{"name": f"phase_{p}", "task": "python",
                        "params": {"function": f"sim_tasks:{handler or work.handler}",
                                   **work.params()}}
                       for p in range(work.phases)],
            "options": {"concurrency": work.concurrency,
                        "max_items": max(work.items, 100_000), **work.options},
        }
        if after:
            spec["after"] = after
        (self.batches / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return name

    def csv_source(self, items: int) -> Path:
        path = self.data / f"items_{items}.csv"
        if not path.exists():
            write_csv(path, items)
        return path

    def jsonl_source(self, items: int) -> Path:
        path = self.data / f"items_{items}.jsonl"
        if not path.exists():
            write_jsonl(path, items)
        return path

    # Running

    def cli_command(self, name: str, partition: str) -> list[str]:
        return [str(BIN / "batch-defs"), "run", name, "--partition", partition, "--json"]

    def cli_run(self, name: str, timeout_s: float = 3600) -> CliRun:
        """`batch-defs run` in a subprocess, wall clock from spawn to exit."""
        partition = self.next_partition()
        log = (self.root / f"{name}_{partition}.log").open("w")
        started = time.perf_counter()
        done = subprocess.run(self.cli_command(name, partition), env=self.env, cwd=self.root,
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
        wall = time.perf_counter() - started
        log.close()
        return CliRun(wall, done.returncode, self.run_id(name, partition))

    def first_item(self, name: str, timeout_s: float = 600) -> CliRun:
        """`batch-defs run` until its first handler call (sim_tasks.mark_first_call writes the
        time), then the run is killed: what follows is measured elsewhere."""
        partition = self.next_partition()
        stamp = self.root / f"first_{name}_{partition}"
        env = {**self.env, "BENCH_FIRST_CALL_FILE": str(stamp)}
        log = (self.root / f"{name}_{partition}.log").open("w")
        spawned = time.time()
        process = subprocess.Popen(self.cli_command(name, partition), env=env, cwd=self.root,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        first = wait_for_stamp(stamp, process, timeout_s)
        stop_group(process)
        log.close()
        return CliRun(time.time() - spawned, process.returncode or 0, None,
                      None if first is None else first - spawned)

    def job_alone(self, name: str) -> tuple[float, str]:
        """The job executed in this process (as bench/throughput.py does): no CLI start-up,
        no spec discovery, the definitions built before the clock starts."""
        import dagster as dg

        from batch_defs.definitions import build_definitions

        partition = self.next_partition()
        os.environ["DAGSTER_HOME"] = str(self.home)
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            instance.add_dynamic_partitions(name, [partition])
            job = build_definitions([self.batches]).resolve_job_def(name)
            started = time.perf_counter()
            result = job.execute_in_process(
                instance=instance, partition_key=partition,
                run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
            elapsed = time.perf_counter() - started
        if not result.success:
            raise RuntimeError(f"{name}: the job failed")
        return elapsed, result.run_id

    # The ledger, read directly (SQLite in DAGSTER_HOME)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(f"file:{self.ledger_db}?mode=ro", uri=True, timeout=30) as conn:
            return conn.execute(sql, args).fetchall()

    def run_id(self, batch: str, partition: str) -> str | None:
        rows = self.query("select run_id from batch_run where batch = ? and partition = ? "
                          "order by started_at desc limit 1", batch, partition)
        return rows[0][0] if rows else None

    def row_count(self, run_id: str) -> int:
        return int(self.query("select count(*) from batch_item where run_id = ?", run_id)[0][0])

    def item_span(self, run_id: str) -> float | None:
        """Seconds from the first item-phase's start to the last one's finish."""
        first, last = self.query("select min(started_at), max(finished_at) from batch_item "
                                 "where run_id = ?", run_id)[0]
        return None if first is None or last is None else last - first

    def idle_share(self, run_id: str, concurrency: int) -> float | None:
        """Share of slot-seconds idle while items ran: available = concurrency x (last finish
        - first start over every item-phase of the run), busy = the sum of item durations."""
        rows = self.query("select min(started_at), max(finished_at), "
                          "sum(finished_at - started_at), count(*) from batch_item "
                          "where run_id = ? and started_at is not null "
                          "and finished_at is not null", run_id)
        first, last, busy, count = rows[0]
        if not count or last <= first:
            return None
        return max(0.0, 1 - busy / (concurrency * (last - first)))


@contextmanager
def bench_folder() -> Iterator[Bench]:
    with tempfile.TemporaryDirectory(prefix="batch_bench_") as tmp:
        bench = Bench(Path(tmp))
        bench.set_up()
        yield bench


def write_csv(path: Path, items: int) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id", "payload"])
        writer.writerows([i, f"item {i}"] for i in range(items))


def write_jsonl(path: Path, items: int) -> None:
    with path.open("w") as out:
        for start in range(0, items, 10_000):
            out.write("".join(json.dumps({"id": i, "payload": f"item {i}"}) + "\n"
                              for i in range(start, min(items, start + 10_000))))


def wait_for_stamp(stamp: Path, process: subprocess.Popen, timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stamp.exists():
            text = stamp.read_text().strip()
            if text:
                return float(text)
        if process.poll() is not None and not stamp.exists():
            return None
        time.sleep(0.01)
    return None


def stop_group(process: subprocess.Popen) -> None:
    """End a run started with start_new_session (the CLI and any step processes of it)."""
    import signal

    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# The plain-threads reference

def plain_threads(work: Workload) -> float:
    """The same handler work through a ThreadPoolExecutor, one phase after another."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=work.concurrency) as pool:
        for _ in range(work.phases):
            list(pool.map(lambda _i: work.call(), range(work.items)))
    return time.perf_counter() - started


PLAIN_FIRST_ITEM = """
import csv, sys, time
from concurrent.futures import ThreadPoolExecutor
first = []
def call(row):
    if not first:
        first.append(time.time())
with open(sys.argv[1], newline="") as f, ThreadPoolExecutor(max_workers=int(sys.argv[2])) as pool:
    for row in csv.DictReader(f):
        pool.submit(call, row)
        if first:
            break
    pool.shutdown(wait=True)
print(repr(first[0]))
"""


def plain_threads_first_item(source: Path, concurrency: int) -> float:
    """Spawn to the first call of a plain script streaming the CSV into a thread pool."""
    spawned = time.time()
    done = subprocess.run([sys.executable, "-c", PLAIN_FIRST_ITEM, str(source),
                           str(concurrency)], capture_output=True, text=True, check=True)
    return float(done.stdout.strip()) - spawned


# Figures

def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def repeat(times: int, measure: Callable[[], Any]) -> list[Any]:
    return [measure() for _ in range(times)]


def calibrate_loops(ms: float) -> int:
    """burn() iterations that take `ms` on this machine now (the fastest of a few tries)."""
    import sim_tasks

    loops = 100_000
    best = min(timed(lambda: sim_tasks.burn(loops)) for _ in range(5))
    return max(1, int(loops * (ms / 1000) / best))


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def fmt_s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table, so the output pastes into docs/benchmarks.md as it is."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    def line(cells: Sequence[str]) -> str:
        padded = (str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
        return "| " + " | ".join(padded) + " |"

    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def option_available(name: str, value: Any = None) -> bool:
    """Whether this checkout's spec has `options.<name>` (and accepts `value` for it)."""
    from batch_defs.spec import OptionsSpec

    if name not in OptionsSpec.model_fields:
        return False
    if value is None:
        return True
    try:
        OptionsSpec.model_validate({name: value})
    except Exception:
        return False
    return True
