"""What progress publishing (run tags and a log line about every second) costs a run: on
against off.

The same real Dagster job (N items x P phases x S ms of simulated I/O at concurrency C, ledger
on SQLite, results asset) runs in this process with BATCH_DEFS_PROGRESS unset and set to 0,
alternating, each run on a fresh partition so no item is reused. It prints every run, the
median times after a warm-up run, their ratio, and the time spent inside
BatchStep.publish_progress itself.

    python bench/progress_overhead.py    # both cases of docs/benchmarks.md: 1,000 x 2 x 100 ms
                                         # and 10,000 x 2 x 10 ms, concurrency 10
    python bench/progress_overhead.py --items 200 --ms 20 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput, sim_tasks

from throughput import Case, write_spec  # noqa: E402

REQUIREMENT = 0.01  # progress may cost under 1% of run time
CASES = [(1000, 2, 100.0, 10), (10_000, 2, 10.0, 10)]  # items, phases, ms, concurrency


class PublishTimer:
    """Wraps BatchStep.publish_progress: calls, publishes (a new line) and seconds inside."""

    def __init__(self) -> None:
        from assets import factory

        self.factory = factory
        self.original = factory.BatchStep.publish_progress
        self.calls = self.published = 0
        self.seconds = self.cpu_seconds = 0.0

    def __enter__(self) -> PublishTimer:
        timer, original, progress = self, self.original, self.factory._progress

        def timed(step: Any, force: bool = False) -> None:
            before = progress[step.run_id].line if step.run_id in progress else None
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                original(step, force)
            finally:
                timer.seconds += time.perf_counter() - started
                # CPU of the publishing thread: what a loaded machine does not inflate.
                timer.cpu_seconds += time.thread_time() - cpu
                timer.calls += 1
                after = progress[step.run_id].line if step.run_id in progress else None
                timer.published += after != before

        self.factory.BatchStep.publish_progress = timed  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *_exc: object) -> None:
        self.factory.BatchStep.publish_progress = self.original  # type: ignore[method-assign]


def run_once(instance: Any, job: Any, partition: str, progress: bool) -> dict[str, Any]:
    if progress:
        os.environ.pop("BATCH_DEFS_PROGRESS", None)
    else:
        os.environ["BATCH_DEFS_PROGRESS"] = "0"
    instance.add_dynamic_partitions(job.name, [partition])
    with PublishTimer() as timer:
        started = time.perf_counter()
        result = job.execute_in_process(instance=instance, partition_key=partition, run_config={
            "loggers": {"console": {"config": {"log_level": "WARNING"}}}})
        elapsed = time.perf_counter() - started
    assert result.success, f"benchmark run {partition} failed"
    tags = instance.get_run_by_id(result.run_id).tags
    return {"progress": progress, "partition": partition, "job_s": round(elapsed, 3),
            "publish_calls": timer.calls, "published": timer.published,
            "publish_s": round(timer.seconds, 4), "publish_cpu_s": round(timer.cpu_seconds, 4),
            "progress_tag": tags.get("batch/progress")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, help="one case of N items (default: both cases)")
    parser.add_argument("--phases", type=int, default=2)
    parser.add_argument("--ms", type=float, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting")
    args = parser.parse_args()
    cases = ([Case(args.items, args.phases, args.ms, args.concurrency)] if args.items
             else [Case(*case) for case in CASES])
    verdicts = [measure(case, args.repeats) for case in cases]
    print()
    print("meets the requirement in every case" if all(verdicts) else
          "MISSES the requirement")


def measure(case: Case, repeats: int) -> bool:
    saved = os.environ.get("BATCH_DEFS_PROGRESS")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        home, folder = Path(tmp) / "home", Path(tmp) / "batches"
        home.mkdir()
        folder.mkdir()
        (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        write_spec(folder, case)
        import dagster as dg

        from batch_defs.definitions import build_definitions

        job = build_definitions([folder]).resolve_job_def(case.name)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            # The first run in a process pays for imports and caches: measured by neither.
            print(json.dumps({"warmup": run_once(instance, job, "warmup", True)}), flush=True)
            for repeat in range(repeats):
                # Alternate which setting goes first, so drift over time hits both alike.
                order = (True, False) if repeat % 2 == 0 else (False, True)
                for progress in order:
                    name = f"{'on' if progress else 'off'}_{repeat}"
                    runs.append(run_once(instance, job, name, progress))
                    print(json.dumps(runs[-1]), flush=True)
    if saved is None:
        os.environ.pop("BATCH_DEFS_PROGRESS", None)
    else:
        os.environ["BATCH_DEFS_PROGRESS"] = saved
    on = [r for r in runs if r["progress"]]
    off = [r for r in runs if not r["progress"]]
    on_s = statistics.median(r["job_s"] for r in on)
    off_s = statistics.median(r["job_s"] for r in off)
    inside = statistics.median(r["publish_s"] / r["job_s"] for r in on)
    inside_cpu = statistics.median(r["publish_cpu_s"] / r["job_s"] for r in on)
    overhead = on_s / off_s - 1
    print()
    print(f"case: {case.items} items x {case.phases} phases x {case.ms:g} ms at concurrency "
          f"{case.concurrency} (ideal {case.ideal_s:.1f} s), {repeats} runs per setting")
    print(f"progress on:  median {on_s:.3f} s  ({', '.join(str(r['job_s']) for r in on)})")
    print(f"progress off: median {off_s:.3f} s  ({', '.join(str(r['job_s']) for r in off)})")
    print(f"on / off: {on_s / off_s:.4f}  -> wall-clock difference {overhead:+.2%} (noise "
          "on a shared machine)")
    print(f"inside publish_progress: median {inside:.3%} of run time "
          f"({statistics.median(r['published'] for r in on):.0f} publishes, "
          f"{statistics.median(r['publish_calls'] for r in on):.0f} calls per run); CPU of "
          f"the publishing thread: {inside_cpu:.3%}")
    meets = inside < REQUIREMENT
    print(f"{'meets' if meets else 'MISSES'} the requirement: time inside publishing under "
          f"{REQUIREMENT:.0%} of run time")
    # Publishing waits on SQLite commits and the scheduler: on a shared machine its wall
    # time grows with the load of the others, its CPU time does not.
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}")
    return meets


if __name__ == "__main__":
    main()
