"""One workload through Prefect 3: `task.map` on a ThreadPoolTaskRunner(max_workers=C), phase
after phase (as the plain-threads reference does). Run by bench/peers.py in a subprocess with a
temporary PREFECT_HOME and Prefect's ephemeral local server on SQLite, timed from spawn to exit.

    python bench/peer_prefect.py ITEMS PHASES MS CONCURRENCY
"""

from __future__ import annotations

import os
import sys
import time

from prefect import flow, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner


def first_call_mark() -> None:
    """The moment the first task body runs, for the time-to-first-item row."""
    path = os.environ.get("BENCH_FIRST_CALL_FILE")
    if path and not os.path.exists(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as out:
            out.write(repr(time.time()))


@task
def simulated_io(item: int, ms: float) -> int:
    first_call_mark()
    if ms:
        time.sleep(ms / 1000)
    return item


def main() -> None:
    items, phases, ms, concurrency = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                                      int(sys.argv[4]))

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=concurrency), log_prints=False)
    def bench_flow() -> int:
        values: list[int] = list(range(items))
        for _ in range(phases):
            values = simulated_io.map(values, ms=unmapped(ms)).result()
        return len(values)

    assert bench_flow() == items


if __name__ == "__main__":
    main()
