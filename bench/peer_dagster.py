"""One workload through Dagster's own one-step-per-item mapping: a plain job whose first op
yields a DynamicOutput per item and maps a phase op over them, one op per phase. Run by
bench/peers.py in a subprocess (timed from spawn to exit) on the in-process or the
multiprocess executor (max_concurrent = C) against a temporary DAGSTER_HOME.

    python bench/peer_dagster.py ITEMS PHASES MS CONCURRENCY in_process|multiprocess
"""

from __future__ import annotations

import os
import sys
import time

import dagster as dg

SIZE = "BENCH_DAGSTER_WORKLOAD"  # items,phases,ms: read by the ops, also in step processes


def workload() -> tuple[int, int, float]:
    items, phases, ms = os.environ[SIZE].split(",")
    return int(items), int(phases), float(ms)


@dg.op(out=dg.DynamicOut(int))
def fan_out():
    items, _, _ = workload()
    for i in range(items):
        yield dg.DynamicOutput(i, mapping_key=str(i))


def phase_op(number: int) -> dg.OpDefinition:
    @dg.op(name=f"phase_{number}")
    def phase(item: int) -> int:
        _, _, ms = workload()
        if ms:
            time.sleep(ms / 1000)
        return item

    return phase


def build_job() -> dg.JobDefinition:
    _, phases, _ = workload()
    ops = [phase_op(p) for p in range(phases)]

    @dg.job(name="one_step_per_item")
    def one_step_per_item():
        mapped = fan_out()
        for op in ops:
            mapped = mapped.map(op)

    return one_step_per_item


def main() -> None:
    items, phases, ms, concurrency, executor = sys.argv[1:6]
    os.environ[SIZE] = f"{items},{phases},{ms}"
    execution = ({"multiprocess": {"max_concurrent": int(concurrency)}}
                 if executor == "multiprocess" else {"in_process": {}})
    with dg.DagsterInstance.get() as instance:
        result = dg.execute_job(dg.reconstructable(build_job), instance=instance, run_config={
            "execution": {"config": execution},
            "loggers": {"console": {"config": {"log_level": "WARNING"}}}})
    assert result.success, "the Dagster job failed"


if __name__ == "__main__":
    main()
