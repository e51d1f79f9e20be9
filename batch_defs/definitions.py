"""The one place that builds dg.Definitions: every batch file as a Batch component, each on its
own, so a batch that does not load is reported while all the others load and run.

Nothing is built at import time: Dagster calls `defs` when it loads the code location.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from pathlib import Path

import dagster as dg

from batch_defs.loader import BrokenBatch, LoadedBatch, find_batch, load_catalog

log = logging.getLogger("batch_defs")


@functools.cache
def shared_resources() -> dict[str, object]:
    """The resources every batch uses: one set of definitions per process (Dagster merges
    definitions only with the very same resource objects); each opens its clients per run."""
    from resources import (
        BatchStorageResource,
        DatabaseResource,
        HttpResource,
        LlmResource,
        RunOverridesResource,
        SmtpResource,
    )

    return {
        "batch_storage": BatchStorageResource(),
        "run_overrides": RunOverridesResource(),
        # Task types' connections; run config (or a deployment's own Definitions) points
        # them at real servers, secrets through dg.EnvVar.
        "smtp": SmtpResource(),
        "http": HttpResource(),
        "llm": LlmResource(),
        "database": DatabaseResource(),
        # Step outputs (chunk references) on disk: re-execution from failure reloads them.
        "io_manager": dg.FilesystemIOManager(),
    }


def batch_definitions(loaded: LoadedBatch) -> dg.Definitions:
    """One batch's asset, job, and its sensor and schedule if it asks for them."""
    from assets.factory import build_batch
    from sensors.inbox import build_inbox_sensor
    from sensors.schedules import build_schedule

    asset, job = build_batch(loaded)
    sensors = [build_inbox_sensor(loaded, job)] if loaded.spec.sensor else []
    schedules = [build_schedule(loaded, job)] if loaded.spec.schedule else []
    return dg.Definitions(assets=[asset], jobs=[job], sensors=sensors, schedules=schedules,
                          resources=shared_resources())


def broken_batch_definitions(broken: BrokenBatch) -> dg.Definitions:
    """A job in the broken batch's place, whose description (and every launch) says why it
    does not load: the UI shows it beside the batches that work."""
    message = f"This batch does not load: {broken.describe()}"

    @dg.op(name=f"{broken.name}__does_not_load", description=message)
    def does_not_load() -> None:
        raise dg.Failure(message, allow_retries=False)

    @dg.job(name=broken.name, description=message,
            tags={"batch/name": broken.name, "batch/broken": "true"})
    def broken_job() -> None:
        does_not_load()

    return dg.Definitions(jobs=[broken_job])


def build_definitions(paths: Iterable[Path] | None = None) -> dg.Definitions:
    """Every batch in `paths` (default: BATCH_DEFS_PATH); a file that fails to load becomes a
    job that says why (and a warning in the code server's log)."""
    from sensors.run_end import build_run_end_sensors

    catalog = load_catalog(paths)
    parts: list[dg.Definitions] = []
    jobs: list[object] = []
    for loaded in catalog.batches.values():
        for notice in loaded.notices:
            log.warning("batch %s loads but cannot run here: %s", loaded.spec.name, notice)
        part = batch_definitions(loaded)
        parts.append(part)
        jobs.extend(part.jobs or [])
    taken = set(catalog.batches)
    for broken in catalog.broken:
        log.warning("batch file %s does not load: %s", broken.path, broken.describe())
        if broken.name.isidentifier() and broken.name not in taken:
            parts.append(broken_batch_definitions(broken))
            taken.add(broken.name)
    sensors = build_run_end_sensors(catalog.batches, jobs) if jobs else []
    return dg.Definitions.merge(
        *parts,
        component_type_docs(),
        dg.Definitions(sensors=sensors, resources=shared_resources(),
                       # `dagster asset materialize` and the UI's asset page launch the
                       # implicit asset job: in process, as the batches' own jobs default.
                       executor=dg.in_process_executor),
    )


@functools.cache
def component_type_docs() -> dg.Definitions:
    """The metadata through which the Dagster UI documents the project's component types
    (the Batch component and its every field), which `dg.load_from_defs_folder` would add:
    batches are loaded one by one here instead, so that one broken file cannot fail them all.
    Built once per process: it renders every installed component type's JSON schema.
    """
    from dagster.components.core.load_defs import get_library_json_enriched_defs

    return get_library_json_enriched_defs(None)


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()


def get_job(name: str) -> dg.JobDefinition:
    """Entry point for reconstructable jobs (batch-defs run, the multiprocess executor):
    only the batch that runs is loaded."""
    return dg.Definitions.merge(
        batch_definitions(find_batch(name)), dg.Definitions(executor=dg.in_process_executor),
    ).resolve_job_def(name)
