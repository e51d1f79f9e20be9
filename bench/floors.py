"""The floors under issue 16's goals on this machine: what Dagster and the cores allow before
the product adds anything, measured in one run.

  - a bare Dagster job of the product's shape (dynamic partition, a fan-out op yielding one
    DynamicOutput, one mapped op that stamps the time) on a persistent SQLite DAGSTER_HOME with
    the project's dagster.yaml: spawn to the mapped op, spawn to exit;
  - `import dagster`: CPU seconds; and the imports a `batch-defs status` that left Dagster
    out would still pay (SQLAlchemy, pydantic, rich, click), the floor under the status goal;
  - 1,000 x 5 ms of pure-Python CPU: plain threads at c10 (harness.plain_threads, the
    reference of bench/speed.py), multiprocessing.Pool(2) in chunks of 25 (warm), and the
    product's worker pool alone (10 slot threads, 2 workers).

    .venv/bin/python bench/floors.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from harness import (
    BIN,
    PROJECT,
    Workload,
    calibrate_loops,
    fmt_s,
    median,
    plain_threads,
    print_table,
)
from sim_tasks import burn

BARE_JOB = textwrap.dedent('''
    import os, sys, time
    import dagster as dg

    parts = dg.DynamicPartitionsDefinition(name="floor")

    @dg.op(out=dg.DynamicOut())
    def fan():
        yield dg.DynamicOutput([1], mapping_key="c0")

    @dg.op
    def first(chunk):
        with open(os.environ["STAMP"], "w") as f:
            f.write(str(time.time()))

    @dg.job(partitions_def=parts)
    def floor():
        fan().map(first)

    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("floor", [sys.argv[1]])
        floor.execute_in_process(instance=instance, partition_key=sys.argv[1])
''')
LOOPS = 0  # set in main(), inherited by forked pool processes


def bare_job(repeats: int) -> tuple[list[float], list[float]]:
    root = Path(tempfile.mkdtemp(prefix="floors-"))
    home, script, stamp = root / "home", root / "job.py", root / "stamp"
    home.mkdir()
    shutil.copy(PROJECT / "dagster.yaml", home / "dagster.yaml")
    script.write_text(BARE_JOB)
    env = {"DAGSTER_HOME": str(home), "STAMP": str(stamp), "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(PROJECT)}  # dagster.yaml names the project's run coordinator
    to_op, to_exit = [], []
    try:
        for n in range(repeats + 1):  # the first run creates the instance's storage
            started = time.time()
            subprocess.run([str(BIN / "python"), str(script), f"p{n}"], env=env, check=True,
                           capture_output=True, cwd=root)
            ended = time.time()
            if n:
                to_op.append(float(stamp.read_text()) - started)
                to_exit.append(ended - started)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return to_op, to_exit


STATUS_IMPORTS = "import sqlalchemy, pydantic, rich.table, click"


def import_cpu(statement: str, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([str(BIN / "python"), "-c", statement], check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return seconds


def one(_: int) -> int:
    return burn(LOOPS)


def cpu_floors() -> tuple[float, float, float]:
    """(threads, multiprocessing.Pool, the product's pool) seconds for 1,000 items."""
    sys.path.insert(0, str(PROJECT))
    from batch_defs.tasks.base import TaskContext
    from batch_defs.workers import HandlerRef, ProcessPool

    threads_s = plain_threads(Workload(1000, 1, 5, 10, handler="cpu_work", loops=LOOPS))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(one, range(4))
        started = time.perf_counter()
        pool.map(one, range(1000), chunksize=25)
        mp_s = time.perf_counter() - started
    ours = ProcessPool(2)
    ref = HandlerRef("sim_tasks", "cpu_work", str(Path(__file__).parent))
    ctx = TaskContext(params={"loops": LOOPS}, batch="b", partition="p", run_id="r",
                      phase="x", key="k")

    def slot(calls: int) -> None:
        for i in range(calls):
            ours.call(ref, {"id": i}, ctx)

    def slots(count: int, calls: int) -> float:
        started = time.perf_counter()
        running = [threading.Thread(target=slot, args=(calls,)) for _ in range(count)]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join()
        return time.perf_counter() - started

    try:
        slots(4, 2)  # both workers started
        pool_s = slots(10, 100)
    finally:
        ours.close()
    return threads_s, mp_s, pool_s


def main() -> None:
    global LOOPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    LOOPS = calibrate_loops(5)
    to_op, to_exit = bare_job(args.repeats)
    imports = import_cpu("import dagster", args.repeats)
    status_imports = import_cpu(STATUS_IMPORTS, args.repeats)
    cpu = [cpu_floors() for _ in range(3)]
    rows = [
        ["bare Dagster job, spawn to the mapped op", fmt_s(median(to_op)),
         ", ".join(fmt_s(s) for s in to_op)],
        ["bare Dagster job, spawn to exit", fmt_s(median(to_exit)),
         ", ".join(fmt_s(s) for s in to_exit)],
        ["`import dagster`, CPU seconds", fmt_s(median(imports)),
         ", ".join(fmt_s(s) for s in imports)],
        [f"`{STATUS_IMPORTS}`, CPU seconds", fmt_s(median(status_imports)),
         ", ".join(fmt_s(s) for s in status_imports)],
    ]
    for name, index in (("1,000 x 5 ms CPU: ThreadPoolExecutor(10)", 0),
                        ("1,000 x 5 ms CPU: multiprocessing.Pool(2), chunks of 25", 1),
                        ("1,000 x 5 ms CPU: the product's worker pool alone, 10 slots", 2)):
        values = [run[index] for run in cpu]
        speedups = ", ".join(f"{run[0] / run[index]:.2f}x" for run in cpu)
        rows.append([name, fmt_s(median(values)),
                     ", ".join(fmt_s(v) for v in values)
                     + ("" if index == 0 else f" (against threads: {speedups})")])
    print_table(["floor", "median", "each run"], rows)


if __name__ == "__main__":
    main()
