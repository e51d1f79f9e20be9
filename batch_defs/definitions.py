"""The one place that builds dg.Definitions: a job and a results asset per batch YAML file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import dagster as dg

from assets.factory import build_batch
from batch_defs.loader import load_batches
from resources import (
    BatchStorageResource,
    DatabaseResource,
    HttpResource,
    LlmResource,
    RunOverridesResource,
    SmtpResource,
)
from sensors.inbox import build_inbox_sensor
from sensors.run_end import build_run_end_sensors
from sensors.schedules import build_schedule


def build_definitions(paths: Iterable[Path] | None = None) -> dg.Definitions:
    batches = load_batches(paths)
    assets, jobs, sensors, schedules = [], [], [], []
    for loaded in batches.values():
        asset, job = build_batch(loaded)
        assets.append(asset)
        jobs.append(job)
        if loaded.spec.sensor:
            sensors.append(build_inbox_sensor(loaded, job))
        if loaded.spec.schedule:
            schedules.append(build_schedule(loaded, job))
    if jobs:
        sensors.extend(build_run_end_sensors(batches, jobs))
    return dg.Definitions(
        assets=assets,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources={
            "batch_storage": BatchStorageResource(),
            "run_overrides": RunOverridesResource(),
            # Task types' connections; run config (or a deployment's own Definitions) points
            # them at real servers, secrets through dg.EnvVar.
            "smtp": SmtpResource(),
            "http": HttpResource(),
            "llm": LlmResource(),
            "database": DatabaseResource(),
            # Outputs on disk, not in memory: re-execution from failure reloads chunks.
            "io_manager": dg.FilesystemIOManager(),
        },
    )


defs = build_definitions()


def get_job(name: str) -> dg.JobDefinition:
    """Entry point for reconstructable jobs (batch-defs run, multiprocess executor)."""
    return defs.resolve_job_def(name)
