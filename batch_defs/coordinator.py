"""The run queue's door keeper: every queued run of a batch carries the batch's tags before the
run limits (dagster.yaml `concurrency: runs:`) look at it, whichever door queued it.

The batch's own job carries them already; the implicit asset job does not (the UI's asset page
and `dagster asset materialize` launch that one), so its runs would slip past the per-batch
limit. Configured in dagster.yaml::

    run_coordinator:
      module: batch_defs.coordinator
      class: BatchRunCoordinator
"""

from __future__ import annotations

import logging

import dagster as dg

log = logging.getLogger("batch_defs")
RESULTS = "results"  # a batch's asset is <batch>/results (assets/results.py)


def batch_of(run: dg.DagsterRun) -> str | None:
    """The batch a run materializes: its tag, else its one selected results asset."""
    if run.tags.get("batch/name"):
        return run.tags["batch/name"]
    keys = list(run.asset_selection or [])
    if len(keys) == 1 and len(keys[0].path) == 2 and keys[0].path[1] == RESULTS:
        return keys[0].path[0]
    return None


def batch_tags(batch: str) -> dict[str, str]:
    """The tags a run of `batch` gets: its name and the spec's `tags:` (read from its file;
    without it, the name alone, which is what the per-batch limit needs)."""
    from batch_defs.loader import SpecError, find_batch

    try:
        spec_tags = find_batch(batch).spec.tags
    except SpecError as exc:
        log.warning("batch %s: its tags are not known here (%s)", batch, exc)
        spec_tags = {}
    return {"batch/name": batch, **spec_tags}


class BatchRunCoordinator(dg.QueuedRunCoordinator):
    """Dagster's queued run coordinator, with batch tags added to runs that lack them, and the
    run's partition added if it is new (as the fan-out would, only earlier)."""

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        from batch_defs.control import ensure_partition

        run = context.dagster_run
        batch = batch_of(run)
        if batch is not None:
            instance = self._instance  # set by Dagster when it loads the coordinator
            missing = {k: v for k, v in batch_tags(batch).items() if k not in run.tags}
            if missing:
                instance.add_run_tags(run.run_id, missing)
            partition = run.tags.get("dagster/partition")
            if partition:
                ensure_partition(instance, batch, partition)
            run = instance.get_run_by_id(run.run_id) or run
        return super().submit_run(context._replace(dagster_run=run))
