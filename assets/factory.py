"""Builds a Dagster job from a batch spec: fan-out -> mapped phase ops -> collect -> after."""


import json
import logging
import os
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,  # what define_asset_job returns; not exported by dagster
)

from batch_defs.execution import PhaseRun, complete_run, execute_chunk, spool_source
from batch_defs.items import Chunk, DependencyError, chunk_size, dependency_chunk, read_spool
from batch_defs.ledger import Ledger, stop_kind
from batch_defs.loader import LoadedBatch
from batch_defs.progress import ProgressWindow
from batch_defs.sources import SourceError, expand_env
from batch_defs.spec import BatchSpec, PhaseSpec
from batch_defs.summary import summarize_run
from batch_defs.tasks import Handler, build_handler, task_resources
from resources.storage import BatchStorageResource, RunOverridesResource

RESOURCE_KEYS = {"batch_storage", "run_overrides"}
# Run state after a stop, by the stop reason's kind: paused runs are resumable on purpose.
STOP_STATES = {"paused": "paused", "budget": "paused", "canceled": "canceled",
               "fail_fast": "failed"}
PROGRESS_EVERY_S = 5.0
_progress: dict[str, tuple[float, ProgressWindow]] = {}  # run id -> (last publish, window)


def op_name(spec: BatchSpec, role: str) -> str:
    """Op definitions need names unique in the code location; the graph shows them under
    their role (fan_out, a phase name, collect) through aliases."""
    return f"{spec.name}__{role}"


def run_lineage(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[str]:
    """Parent, grandparent, ... of a re-executed run."""
    lineage, parent = [], run.parent_run_id
    while parent:
        lineage.append(parent)
        parent_run = instance.get_run_by_id(parent)
        parent = parent_run.parent_run_id if parent_run else None
    return lineage


class BatchStep:
    """What every op of a batch needs: the effective spec, the ledger and run identity."""

    def __init__(self, loaded: LoadedBatch, context: dg.OpExecutionContext):
        overrides: RunOverridesResource = context.resources.run_overrides
        storage: BatchStorageResource = context.resources.batch_storage
        self.loaded, self.context = loaded, context
        self.spec: BatchSpec = overrides.apply(loaded)
        self.ledger: Ledger = storage.ledger(context.instance)
        self.output_dir = storage.output_root(context.instance, self.spec.name)
        self.partition = context.partition_key
        self.run_id = context.run_id
        from batch_defs.secrets import register_resources

        # Secrets of this step's resources are masked wherever errors are stored or shown.
        register_resources(getattr(context.resources, key)
                           for key in sorted(context.op_def.required_resource_keys))

    def phase_run(self, phase: PhaseSpec) -> PhaseRun:
        resources = {key: getattr(self.context.resources, key)
                     for key in task_resources(phase.task)}
        return PhaseRun(self.spec, phase, self.partition, self.run_id, self.loaded.base_dir,
                        self.output_dir, resources=resources,
                        log=self.context.log)  # type: ignore[arg-type]

    def stop(self, reason: str, started: bool = True) -> NoReturn:
        """End this step because the batch stopped (fail-fast, pause, cancel, budget).

        The step fails rather than skips, so re-execution from failure picks it up again; the
        run is tagged with its state, since Dagster has no 'paused' status of its own.
        """
        self.ledger.request_stop(self.run_id, reason)
        state = STOP_STATES.get(stop_kind(reason) or "", "failed")
        self.ledger.set_status(self.run_id, state)
        self.context.instance.add_run_tags(self.run_id, {"batch/state": state})
        self.publish_progress(force=True)
        where = "" if started else "not started: "
        raise dg.Failure(f"{where}{reason}", allow_retries=False)

    def publish_progress(self, force: bool = False) -> None:
        """Progress as run tags (the Dagster run list shows them) and a log line, throttled.

        BATCH_DEFS_PROGRESS=0 in the run's environment turns it off (bench/progress_overhead.py
        measures what it costs); read on each call, so a running code server needs no restart.
        """
        if os.environ.get("BATCH_DEFS_PROGRESS", "1").strip().lower() in ("0", "false", "off"):
            return
        # The first publish comes PROGRESS_EVERY_S after a process starts on the run (or at
        # the end): short runs cost no progress queries beyond the final one.
        last, window = _progress.setdefault(self.run_id, (time.monotonic(), ProgressWindow()))
        now = time.monotonic()
        if not force and now - last < PROGRESS_EVERY_S:
            return
        _progress[self.run_id] = (now, window)
        run = self.ledger.run(self.run_id)
        if run is None:
            return
        progress = window.progress(self.ledger.counts(self.run_id), run["phases"],
                                   run["total_items"])
        self.context.instance.add_run_tags(self.run_id, {
            "batch/progress": progress.tag(),
            "batch/failed": str(progress.failed + progress.invalid),
        })
        self.context.log.info(f"progress {progress.line()}")


def build_fan_out(loaded: LoadedBatch) -> dg.OpDefinition:
    @dg.op(name=op_name(loaded.spec, "fan_out"), out=dg.DynamicOut(Chunk),
           required_resource_keys=RESOURCE_KEYS,
           description=f"Reads the {loaded.spec.source.type} source, validates items, "
                       "records invalid ones and yields chunks.")
    def fan_out(context: dg.OpExecutionContext) -> Iterator[dg.DynamicOutput[Chunk]]:
        step = BatchStep(loaded, context)
        spec = step.spec
        manifest = manifest_path(context.instance, step.run_id)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        try:
            read = spool_source(step.ledger, spec, loaded.base_dir, step.partition,
                                step.run_id, manifest)
        except SourceError as exc:
            raise dg.Failure(f"source {spec.source.type}: {exc}",
                             allow_retries=False) from exc
        total, invalid = read.spool.count, read.invalid
        step.ledger.start_run(step.run_id, spec.name, step.partition, total,
                              [p.name for p in spec.phases], context.run.parent_run_id)
        if read.first_invalid:
            context.log.warning(f"{invalid} invalid items recorded, e.g. "
                                f"{read.first_invalid.key}: {read.first_invalid.error}")
        tolerated = spec.options.tolerated_count(total + invalid)
        if spec.options.on_error == "fail_fast" and invalid > tolerated:
            raise dg.Failure(f"{invalid} invalid items (tolerated {tolerated}); first: "
                             f"{read.first_invalid.error if read.first_invalid else ''}",
                             allow_retries=False)
        if not total:
            what = f"no valid items ({invalid} invalid)" if invalid else "no items"
            raise dg.Failure(f"source {spec.source.type} has {what}", allow_retries=False)
        if read.dependencies:
            # One step per phase, so the slot runner can hold each item back until the items
            # it depends on have succeeded; a cycle fails here, before any phase runs.
            try:
                ordered = dependency_chunk(read.spool, spec.options.depends_on_field, invalid)
            except DependencyError as exc:
                raise dg.Failure(f"{spec.options.depends_on_field}: {exc}",
                                 allow_retries=False) from exc
            context.log.info(f"{total} items with dependencies, in one chunk in dependency "
                             "order")
            context.instance.add_run_tags(step.run_id, {"batch/progress": f"0/{total} 0%"})
            yield dg.DynamicOutput(ordered, mapping_key=ordered.mapping_key)
            return
        size = chunk_size(total, spec.options.slots, spec.options.chunk_size)
        context.log.info(f"{total} items in chunks of up to {size}")
        context.instance.add_run_tags(step.run_id, {"batch/progress": f"0/{total} 0%"})
        for chunk in read.spool.chunks(size, invalid):
            yield dg.DynamicOutput(chunk, mapping_key=chunk.mapping_key)

    return fan_out


def phase_handler(loaded: LoadedBatch, phase: PhaseSpec) -> Handler:
    """Built once per process and phase params (templates compiled, functions imported)."""
    return _cached_handler(loaded, phase.task, json.dumps(phase.params, sort_keys=True))


@lru_cache(maxsize=256)
def _cached_handler(loaded: LoadedBatch, task: str, params_json: str) -> Handler:
    return build_handler(task, json.loads(params_json), loaded.base_dir)


def build_phase_op(loaded: LoadedBatch, index: int) -> dg.OpDefinition:
    declared = loaded.spec.phases[index]

    @dg.op(name=op_name(loaded.spec, declared.name), out=dg.Out(Chunk),
           required_resource_keys=RESOURCE_KEYS | set(task_resources(declared.task)),
           pool=declared.pool,
           retry_policy=dg.RetryPolicy(max_retries=loaded.spec.options.step_retries, delay=1,
                                       backoff=dg.Backoff.EXPONENTIAL)
           if loaded.spec.options.step_retries else None,
           description=f"Phase {index + 1}: task {declared.task!r} on each item of a chunk.")
    def run_phase(context: dg.OpExecutionContext, chunk: Chunk) -> Chunk:
        step = BatchStep(loaded, context)
        phase = step.spec.phases[index]
        ledger = step.ledger
        state = ledger.run_state(step.run_id)
        if not state.exists:  # a re-execution whose fan-out did not run again
            ledger.start_run(step.run_id, step.spec.name, step.partition, chunk.total_items,
                             [p.name for p in step.spec.phases], context.run.parent_run_id)
        # A stopped batch fails its remaining steps rather than skipping them, so that
        # re-execution from failure picks them up again.
        if state.stop_reason:
            step.stop(state.stop_reason, started=False)
        result = execute_chunk(ledger, step.phase_run(phase), chunk,
                               phase_handler(loaded, phase), state, step.publish_progress)
        context.log.info(f"{chunk.mapping_key}: {result.executed} run, {result.reused} reused, "
                         f"{result.failed} failed")
        if result.stop_reason:
            step.stop(result.stop_reason)
        return Chunk(chunk.index, result.outputs, chunk.total_items, chunk.invalid_items)

    return run_phase


MANIFEST = "batch_items.jsonl"  # the fan-out's spool, kept beside the run's step outputs


def manifest_path(instance: dg.DagsterInstance, run_id: str) -> Path:
    return Path(instance.storage_directory()) / run_id / MANIFEST


def complete_items(step: BatchStep, lineage: list[str], total_items: int) -> None:
    """Run what earlier runs left unfinished: failed items, and steps a re-execution left out
    (Dagster's re-execution from failure can miss mapped steps that never started)."""
    instance = step.context.instance
    manifest = next((manifest_path(instance, run) for run in [step.run_id, *lineage]
                     if manifest_path(instance, run).exists()), None)
    if manifest is None:
        step.context.log.warning("no item manifest found; cannot check completeness")
        return
    phases = step.spec.phases
    result = complete_run(step.ledger, [step.phase_run(p) for p in phases],
                          [phase_handler(step.loaded, p) for p in phases],
                          read_spool(manifest), total_items)
    if result is None:
        return
    step.context.log.info(f"completed {result.executed} item-phases left unfinished earlier")
    if result.stop_reason:
        step.stop(result.stop_reason)


def build_collect(loaded: LoadedBatch) -> dg.OpDefinition:
    needed = {key for phase in loaded.spec.phases for key in task_resources(phase.task)}

    @dg.op(name=op_name(loaded.spec, "collect"), required_resource_keys=RESOURCE_KEYS | needed,
           description="Completes the run's ledger rows, sums up and applies tolerated_failures.")
    def collect(context: dg.OpExecutionContext, chunks: list[Chunk]) -> dict[str, Any]:
        step = BatchStep(loaded, context)
        lineage = run_lineage(context.instance, context.run)
        run = step.ledger.run(step.run_id)
        if run is None and lineage:
            # A re-execution of collect alone (no phase step re-ran) has no run row yet.
            parent = step.ledger.run(lineage[0])
            step.ledger.start_run(step.run_id, step.spec.name, step.partition,
                                  parent["total_items"] if parent else 0,
                                  [p.name for p in step.spec.phases], lineage[0])
            run = step.ledger.run(step.run_id)
        copied = step.ledger.carry_over(step.run_id, lineage)
        if copied:
            context.log.info(f"{copied} ledger rows carried over from earlier runs")
        complete_items(step, lineage, run["total_items"] if run else 0)
        summary = summarize_run(step.ledger, step.run_id, run=run)
        summary["tolerated_failures"] = step.spec.options.tolerated_count(summary["items"])
        step.publish_progress(force=True)
        ok = summary["failed_items"] <= summary["tolerated_failures"]
        state = "succeeded" if ok else "failed"
        step.ledger.finish_run(step.run_id, state, summary)
        context.instance.add_run_tags(step.run_id, {"batch/state": state})
        if not ok:
            raise dg.Failure(
                f"{summary['failed_items']} items failed or were invalid, more than the "
                f"{summary['tolerated_failures']} tolerated",
                metadata={k: v for k, v in summary.items() if isinstance(v, int | float)},
                allow_retries=False,
            )
        return summary

    return collect


def build_after_op(loaded: LoadedBatch, index: int, name: str) -> dg.OpDefinition:
    from batch_defs.tasks import AFTER_TYPES

    declared = AFTER_TYPES[loaded.spec.after[index].task].resources

    @dg.op(name=op_name(loaded.spec, name), required_resource_keys=RESOURCE_KEYS | set(declared),
           description=f"After step {index + 1}: {loaded.spec.after[index].task}.")
    def after(context: dg.OpExecutionContext, summary: dict[str, Any]) -> dict[str, Any]:
        from batch_defs.item_failures import record_item_failures
        from batch_defs.secrets import mask
        from batch_defs.tasks import AfterContext, build_after_handler
        from batch_defs.tasks.base import ItemsFailed

        step = BatchStep(loaded, context)
        spec_step = step.spec.after[index]
        handler = build_after_handler(spec_step.task, spec_step.params, loaded.base_dir)
        ctx = AfterContext(spec_step.params, step.spec.name, step.partition, step.run_id,
                           summary, loaded.base_dir, step.output_dir,
                           [p.name for p in step.spec.phases],
                           log=logging.getLogger(f"batch_defs.{name}"),
                           resources={key: getattr(context.resources, key) for key in declared})
        try:
            produced = handler(step.ledger.rows(step.run_id), ctx) or {}
        except ItemsFailed as exc:
            # Items whose effect did not land (rows refused at sql_commit) become failed, so
            # the next run of the partition does exactly them again.
            record_item_failures(step.ledger, step.spec.name, step.partition, step.run_id,
                                 exc.errors)
            step.ledger.set_status(step.run_id, "failed")
            context.instance.add_run_tags(step.run_id, {"batch/state": "failed"})
            raise dg.Failure(mask(str(exc)), allow_retries=False) from None
        return {**summary, "after": {**summary.get("after", {}), name: dict(produced)}}

    return after


def build_executor(spec: BatchSpec) -> dg.ExecutorDefinition:
    if spec.options.executor == "celery":
        # Imported only here: the celery extra is needed by batches that scale out.
        from dagster_celery import celery_executor

        return celery_executor.configured({"broker": expand_env(spec.options.celery.broker),
                                           "backend": expand_env(spec.options.celery.backend)})
    if spec.options.executor == "multiprocess":
        return dg.multiprocess_executor.configured(
            {"max_concurrent": spec.options.max_concurrent_steps})
    return dg.in_process_executor


def build_batch_graph(loaded: LoadedBatch) -> dg.GraphDefinition:
    from assets.results import build_results_op

    spec = loaded.spec
    fan_out = build_fan_out(loaded)
    phase_ops = [build_phase_op(loaded, i) for i in range(len(spec.phases))]
    collect = build_collect(loaded)
    after_ops = [build_after_op(loaded, i, name)
                 for i, name in enumerate(spec.after_step_names())]
    results = build_results_op(spec)

    def through_phases(chunk: Any) -> Any:
        for phase, phase_op in zip(spec.phases, phase_ops, strict=True):
            chunk = phase_op.alias(phase.name)(chunk)
        return chunk

    @dg.graph(name=f"{spec.name}_batch", description=spec.description or None,
              out={"result": dg.GraphOut()})
    def batch_graph() -> Any:
        chunks = fan_out.alias("fan_out")()
        summary = collect.alias("collect")(chunks.map(through_phases).collect())
        for name, after_op in zip(spec.after_step_names(), after_ops, strict=True):
            summary = after_op.alias(name)(summary)
        return results.alias("results")(summary)

    return batch_graph


def build_batch(
    loaded: LoadedBatch,
) -> tuple[dg.AssetsDefinition, UnresolvedAssetJobDefinition]:
    """The batch's results asset (graph-backed: its ops are the phases) and the job that
    materializes one partition of it per launch."""
    from assets.results import results_asset_key

    spec = loaded.spec
    partitions = dg.DynamicPartitionsDefinition(name=spec.name)
    asset = dg.AssetsDefinition.from_graph(
        build_batch_graph(loaded),
        keys_by_output_name={"result": results_asset_key(spec.name)},
        partitions_def=partitions,
        group_name="batches",
        descriptions_by_output_name={"result": f"Results of batch {spec.name}, per launch."},
    )
    job = dg.define_asset_job(
        name=spec.name,
        selection=dg.AssetSelection.assets(asset),
        description=spec.description or f"Batch {spec.name}",
        tags={"batch/name": spec.name, **spec.tags},
        executor_def=build_executor(spec),
    )
    return asset, job
