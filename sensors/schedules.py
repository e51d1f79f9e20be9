"""Schedules from `schedule:` cron strings: each tick is a partition named by its time."""

from __future__ import annotations

import dagster as dg

from assets.factory import BatchJob
from batch_defs.control import ensure_partition
from batch_defs.loader import LoadedBatch


def build_schedule(loaded: LoadedBatch,
                   job: BatchJob) -> dg.ScheduleDefinition:
    spec = loaded.spec
    assert spec.schedule is not None

    @dg.schedule(name=f"{spec.name}_schedule", cron_schedule=spec.schedule, job=job,
                 execution_timezone=spec.schedule_timezone,
                 default_status=dg.DefaultScheduleStatus.RUNNING,
                 description=f"Launches {spec.name} at {spec.schedule} ({spec.schedule_timezone}).")
    def schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        key = context.scheduled_execution_time.strftime("%Y-%m-%dT%H%M")
        # Schedules cannot request dynamic partitions like sensors do; the instance can.
        ensure_partition(context.instance, spec.name, key)
        return dg.RunRequest(run_key=key, partition_key=key,
                             tags={"batch/launched_by": "schedule"})

    return schedule
