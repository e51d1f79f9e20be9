"""What durability costs: the engine's group commit against buffered writes, same run, same ledger.

Durable (the product): a slot takes its next item only once its last outcome is in the
ledger, one write carrying every outcome that arrived meanwhile. Buffered (the write path
before it): slots hand outcomes over and go on at once; a writer stores them in groups, so a
crash loses the outcomes still waiting. Both run the same items through the same engine
(batch_defs.engine.run_items, no Dagster) against a SQLite ledger, alternating, and a plain
thread pool gives the limit for the timed cases.

    .venv/bin/python bench/durable_writes.py [--repeats 3] [--ledger sqlite|postgres URL]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from batch_defs.engine import GroupCommitter, RunPlan, _Commit, run_items
from batch_defs.items import Item
from batch_defs.ledger import Ledger
from batch_defs.spec import BatchSpec

CASES = [(1000, 2, 0.0), (1000, 2, 0.1)]  # items, phases, seconds per item-phase
CONCURRENCY = 10


def handler(seconds: float) -> Any:
    def work(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if seconds:
            time.sleep(seconds)
        return {f"{ctx.phase}_done": True}

    return work


def buffered_commit(self: GroupCommitter, rows: list[dict[str, Any]]) -> set[str]:
    """The old path: hand the rows to the writer and go on without waiting."""
    self._arrivals.put(_Commit(rows))
    return set()


@contextmanager
def write_path(durable: bool) -> Iterator[None]:
    if durable:
        yield
        return
    with mock.patch.object(GroupCommitter, "commit", buffered_commit):
        yield


def engine_run(url: str, folder: Path, items: int, phases: int, seconds: float,
               run: int) -> tuple[float, int]:
    spec = BatchSpec.model_validate({
        "name": "bench", "source": {"type": "inline", "items": []},
        "phases": [{"name": f"p{i}", "task": "python", "params": {"function": "m:f"}}
                   for i in range(phases)],
        "options": {"concurrency": CONCURRENCY, "on_error": "continue"}})
    with Ledger(url) as ledger:
        plan = RunPlan(spec, ledger, f"part{run}", f"run-{run}", folder, folder / "out",
                       [handler(seconds)] * phases)
        started = time.perf_counter()
        run_items(plan, [Item(str(i), i, {"id": i}) for i in range(items)], folder)
        elapsed = time.perf_counter() - started
        stored = ledger.count_rows(f"run-{run}")
    return elapsed, stored


def plain_threads(items: int, phases: int, seconds: float) -> float:
    def item(_: int) -> None:
        for _ in range(phases):
            time.sleep(seconds)

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(item, range(items)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ledger", default="sqlite", help="sqlite, or a database URL")
    args = parser.parse_args()
    run = 0
    print(f"{'items x phases x s':>20} {'durable s':>10} {'buffered s':>11} {'ratio':>6} "
          f"{'threads s':>10} {'durable/threads':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = f"sqlite:///{folder / 'ledger.db'}" if args.ledger == "sqlite" else args.ledger
        for items, phases, seconds in CASES:
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeats):
                for durable in (True, False):  # alternating: drift hits both alike
                    run += 1
                    with write_path(durable):
                        elapsed, stored = engine_run(url, folder, items, phases, seconds, run)
                    assert stored == items * phases, stored
                    times[durable].append(elapsed)
            durable_s = statistics.median(times[True])
            buffered_s = statistics.median(times[False])
            reference = plain_threads(items, phases, seconds) if seconds else None
            limit = f"{reference:10.2f} {durable_s / reference:16.3f}" if reference else \
                f"{'-':>10} {'-':>16}"
            print(f"{f'{items} x {phases} x {seconds:g}':>20} {durable_s:10.2f} "
                  f"{buffered_s:11.2f} {durable_s / buffered_s:6.3f} {limit}")


if __name__ == "__main__":
    main()
