"""Builds a batch's Dagster definitions: fan-out -> mapped phase ops -> collect -> after ->
results, as the graph of the `<batch>/results` asset, and the job that materializes it."""


import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, NoReturn

import dagster as dg

from batch_defs.control import (
    HOST,
    dagster_view,
    describe_holder,
    ensure_partition,
    holder_is_live,
    take_over,
)
from batch_defs.engine import RunEngine, RunPlan
from batch_defs.env import expand_env
from batch_defs.fanout import Streaming, spool_source
from batch_defs.item_failures import record_item_failures
from batch_defs.items import ChunkRef, DependencyError, chunk_size, dependency_chunks
from batch_defs.ledger import Ledger, StopRequest
from batch_defs.loader import LoadedBatch
from batch_defs.progress import ProgressReader, starting_line
from batch_defs.routing import build_router
from batch_defs.secrets import mask, register_resources
from batch_defs.settings import LiveSettings
from batch_defs.sources import SourceError, record_bound
from batch_defs.spec import BatchSpec, OptionsSpec, PhaseSpec
from batch_defs.states import RunState, StopKind
from batch_defs.summary import RunSummary, summarize_run
from batch_defs.tasks import (
    AFTER_TYPES,
    AfterContext,
    Handler,
    ItemsFailed,
    MissingExtra,
    build_after_handler,
    build_handler,
    task_resources,
)
from resources.storage import BatchStorageResource, RunOverridesResource

RESOURCE_KEYS = {"batch_storage", "run_overrides"}
# options.rollback_on names the stops that roll a run back.
ROLLBACK_EVENTS = {StopKind.FAIL_FAST: "fail", StopKind.CANCELED: "cancel"}
# What dg.define_asset_job returns (its class is not exported by dagster).
BatchJob = Any
PROGRESS_EVERY_S = 1.0  # the run page's progress line: within 2 s of a change
PROGRESS_AT_MOST_S = 2.0  # ... or every 2 s, when publishing has become slow
# A publish waits on Dagster's commits, which a loaded machine makes slow: it is spaced so
# that publishing takes at most this share of the run's time (within the two periods above).
PROGRESS_BUDGET = 0.008
# Run tags cost more than the log line (Dagster reads and rewrites the run's tags) and the run
# list shows them after its own refresh (15 s): every 5 s, and at the end.
PROGRESS_TAGS_EVERY_S = 5.0
MANIFEST = "batch_items.jsonl"  # the fan-out's spool, kept beside the run's step outputs


@dataclass
class Publishing:
    """One run's progress publishing in this process."""

    last: float  # monotonic time of the last look at the ledger
    reader: ProgressReader = field(default_factory=ProgressReader)
    line: str | None = None  # the line last published
    tagged: float = 0.0  # when the run tags were last written
    run: dict[str, Any] | None = None  # the run's batch_run row (phases, totals)
    cost_s: float = 0.0  # what a publish takes, smoothed

    def due(self, now: float) -> bool:
        period = min(PROGRESS_AT_MOST_S, max(PROGRESS_EVERY_S, self.cost_s / PROGRESS_BUDGET))
        return now - self.last >= period


_progress: dict[str, Publishing] = {}  # run id -> its publishing
_recorded: set[tuple[str, RunState]] = set()  # runs whose record this process has left


class BatchPartitions(dg.DynamicPartitionsDefinition):
    """A batch's partitions: one per launch, added by the launch itself.

    Every door may name a partition that does not exist yet (`dagster asset materialize
    --partition new`, `dagster job launch` with a partition tag, `dg launch`): the fan-out adds
    it before any item runs, so Dagster's own check that the key exists is answered here."""

    def has_partition_key(self, partition_key: str, current_time: Any = None,
                          dynamic_partitions_store: Any = None) -> bool:
        return valid_partition_key(partition_key)


def valid_partition_key(key: str) -> bool:
    return bool(key) and len(key) <= 255 and key.isprintable()


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


def batch_resource_keys(spec: BatchSpec) -> set[str]:
    """Every op of a batch asks for every resource its phases use: slots working ahead run
    later phases' items from an earlier phase's step (route cases and undo tasks included:
    a failing step may roll the run back)."""
    tasks = {phase.task for phase in spec.phases}
    tasks |= {task for phase in spec.phases for task, _ in phase.route_configs().values()}
    tasks |= {phase.undo.task for phase in spec.phases if phase.undo}
    return RESOURCE_KEYS | {key for task in tasks for key in task_resources(task)}


def beat(instance: dg.DagsterInstance, ledger: Ledger, batch: str, partition: str,
         run_id: str) -> None:
    """Every second of a run (BatchStorageResource.keep_beating): the partition lease's
    heartbeat, and Dagster's view of the run (its status, failed steps) kept in the ledger,
    so that `batch-defs status` of a live run reads the ledger alone (run_status.py)."""
    ledger.heartbeat(batch, partition, run_id)
    view = dagster_view(instance, run_id)
    if view is not None:
        ledger.keep_live_view(run_id, view.model_dump(mode="json"))


class BatchStep:
    """What every op of a batch needs: the effective spec, the ledger, run identity, and the
    run's engine.

    Every op holds the partition's lease before it does anything: one live run per
    partition, whichever door launched it (a second run fails here, naming the first).
    """

    def __init__(self, loaded: LoadedBatch, context: dg.OpExecutionContext):
        overrides: RunOverridesResource = context.resources.run_overrides
        self.storage: BatchStorageResource = context.resources.batch_storage
        self.loaded, self.context = loaded, context
        self.spec: BatchSpec = overrides.apply(loaded)
        self.ledger: Ledger = self.storage.ledger(context.instance)
        self.output_dir = self.storage.output_root(context.instance, self.spec.name)
        self.partition = context.partition_key
        self.run_id = context.run_id
        # Secrets of this step's resources are masked wherever errors are stored or shown.
        register_resources(getattr(context.resources, key)
                           for key in sorted(context.op_def.required_resource_keys))
        self.hold_partition()
        self.beat = partial(beat, context.instance, self.ledger, self.spec.name,
                            self.partition, self.run_id)
        self.storage.keep_beating(self.run_id, self.beat)

    def hold_partition(self) -> None:
        # Under the multiprocess executor a step is a child of the run's process, which
        # outlives it; elsewhere the step runs in the run's process itself.
        pid = os.getppid() if self.spec.options.executor == "multiprocess" else os.getpid()
        take = self.ledger.acquire_lease(
            self.spec.name, self.partition, self.run_id, HOST, pid,
            lambda held: holder_is_live(self.context.instance, held))
        if take.held_by is not None:
            raise dg.Failure(describe_holder(take.held_by, self.spec.name, self.partition),
                             allow_retries=False)
        if take.replaced is not None:
            # A run that died holding the partition: its leftovers go before items run again.
            ended = take_over(self.context.instance, self.ledger, take.replaced)
            if ended:
                self.context.log.warning(f"ended {ended} process(es) left running by run "
                                         f"{take.replaced.run_id}")

    def engine(self) -> RunEngine:
        """The run's engine in this process, made by the first step that needs it."""
        return self.storage.engine(self.run_id, self._new_engine)

    def _new_engine(self) -> RunEngine:
        resources = {key: getattr(self.context.resources, key)
                     for key in batch_resource_keys(self.spec) - RESOURCE_KEYS}
        try:
            handlers = [phase_handler(self.loaded, p) for p in self.spec.phases]
        except MissingExtra as exc:  # the batch loaded without it; it cannot run here
            self.fail(str(exc))
        plan = RunPlan(
            spec=self.spec, ledger=self.ledger, partition=self.partition, run_id=self.run_id,
            base_dir=self.loaded.base_dir, output_dir=self.output_dir,
            handlers=handlers,
            resources=resources, log=self.context.log,
            # Later steps run in this process only with the in-process executor.
            ahead=self.spec.options.executor == "in_process")
        return RunEngine(plan, self.ledger.run_state(self.run_id))

    def start_run(self, total_items: int) -> None:
        """The run's ledger row (unless it exists), with Dagster's view of the run at once:
        `batch-defs status` reads the ledger alone from the first second."""
        self.ledger.start_run(self.run_id, self.spec.name, self.partition, total_items,
                              [p.name for p in self.spec.phases], self.context.run.parent_run_id)
        self.beat()

    def check_in(self) -> None:
        """Called about every second while items run: the progress line and tags."""
        self.publish_progress()

    def mark(self, state: RunState) -> None:
        self.ledger.set_status(self.run_id, state)
        self.context.instance.add_run_tags(self.run_id, {"batch/state": state.value})

    def fail(self, message: str) -> NoReturn:
        """End the run as failed, saying why (the ledger, the state tag and the step agree)."""
        self.mark(RunState.FAILED)
        raise dg.Failure(message, allow_retries=False)

    def fail_fan_out(self, message: str, streamed: bool) -> NoReturn:
        """fail(), once the run's slots stop taking items of chunks already streamed to them
        (those in flight finish and are recorded)."""
        if streamed:
            self.engine().halt(StopRequest(StopKind.FAIL_FAST, message))
        self.fail(message)

    def stop(self, stop: StopRequest, started: bool = True) -> NoReturn:
        """End this step because the batch stopped (fail-fast, pause, cancel, budget).

        The step fails rather than skips, so re-execution from failure picks it up again; the
        run is tagged with its state, since Dagster has no 'paused' status of its own.
        The run is rolled back first if options.rollback_on says so.
        """
        self.ledger.request_stop(self.run_id, stop)
        self.mark(stop.kind.run_state)
        self.publish_progress(force=True)
        if not started and (self.run_id, stop.kind.run_state) in _recorded:
            # Steps after the first stopped one: their words would repeat its (and the
            # summary costs a read of every row).
            raise dg.Failure(f"not started: {stop.reason}", allow_retries=False)
        where = "" if started else "not started: "
        # Even a step that did not start may end the run in a process whose slots worked
        # ahead into its items; a rollback that finds everything undone already is a no-op.
        rolled = self.roll_back(ROLLBACK_EVENTS.get(stop.kind))
        summary = self.summary()
        if self.ledger.run_state(self.run_id).exists:
            self.record_items(summary, stop.kind.run_state)
        raise dg.Failure(f"{where}{stop.reason}{first_failures(summary)}{rolled}",
                         metadata=failure_metadata(summary), allow_retries=False)

    def summary(self) -> RunSummary:
        """The run's summary, judged against the tolerance in force (live changes too)."""
        summary = summarize_run(self.ledger, self.run_id)
        summary.tolerated_failures = self.live_options().tolerated_count(summary.items)
        return summary

    def roll_back(self, event: str | None) -> str:
        """Undo the run's effects if options.rollback_on names `event` ("fail", "cancel"),
        once every item this process started is recorded; what it did, for the message."""
        from batch_defs.rollback import RollbackPlan, rollback_run, undo_resource_keys

        if event not in self.spec.options.rollback_on:
            return ""
        self.engine().quiesce()
        self.context.log.info(f"options.rollback_on: {event}: rolling the run back")
        report = rollback_run(RollbackPlan(
            spec=self.spec, ledger=self.ledger, run_id=self.run_id, partition=self.partition,
            base_dir=self.loaded.base_dir, output_dir=self.output_dir,
            resources={key: getattr(self.context.resources, key)
                       for key in undo_resource_keys(self.spec)}, log=self.context.log))
        return f"; rolled back ({report.line()})"

    def live_options(self) -> OptionsSpec:
        """The options in force: the spec's, with live changes (batch-defs set) applied."""
        _, settings = self.ledger.run_control(self.run_id)
        return LiveSettings.from_values(settings.get("values", {})).options(self.spec.options)

    def publish_progress(self, force: bool = False) -> None:
        """Progress as run tags (the run list and run page show them) and a log line on the
        run page (`progress 450/1000 done (45%), 3 failed, 12.4 items/s, ETA 44s, phase
        score`), about every PROGRESS_EVERY_S while it changes.

        BATCH_DEFS_PROGRESS=0 in the run's environment turns it off (bench/progress_overhead.py
        measures what it costs); read on each call, so a running code server needs no restart.
        """
        if os.environ.get("BATCH_DEFS_PROGRESS", "1").strip().lower() in ("0", "false", "off"):
            return
        # The first publish comes PROGRESS_EVERY_S after a process starts on the run (or at
        # the end): short runs cost no progress queries beyond the final one.
        now = time.monotonic()
        state = _progress.setdefault(self.run_id, Publishing(last=now, tagged=now))
        if not force and not state.due(now):
            return
        state.last = now
        state.run = state.run or self.ledger.run(self.run_id)  # phases, totals: fixed
        progress = state.reader.read(self.ledger, self.run_id, state.run) if state.run else None
        if progress is None or (progress.line() == state.line and not force):
            return  # nothing changed: no event for the run page to show
        state.line = progress.line()
        self.context.log.info(f"progress {state.line}")
        if force or now - state.tagged >= PROGRESS_TAGS_EVERY_S:
            self.context.instance.add_run_tags(self.run_id, {
                "batch/progress": state.line, "batch/failed": str(progress.failed),
                "batch/phase": progress.phase or "-"})
            state.tagged = now
        spent = time.monotonic() - now
        state.cost_s = spent if not state.cost_s else 0.7 * state.cost_s + 0.3 * spent

    def record_items(self, summary: RunSummary, state: RunState) -> None:
        """The run's record on its results asset when it will not materialize it."""
        from assets.results import read_result_rows, record_run

        if (self.run_id, state) in _recorded:
            return  # the steps that stop after the first one add nothing to say
        _recorded.add((self.run_id, state))
        run = self.ledger.run(self.run_id)
        record_run(self.context.instance, summary, [p.name for p in self.spec.phases],
                   read_result_rows(self.ledger, self.run_id),
                   run["started_at"] if run else None, state)


def join_batch(context: dg.OpExecutionContext, spec: BatchSpec) -> None:
    """What every run of a batch gets at its start, whichever door launched it (the UI's job
    or asset page, dagster job launch, dagster asset materialize, dg launch, our CLI, a
    sensor or a schedule): its partition added if missing, before any item runs, and the
    batch's tags, so that `batch-defs list` and the run limits see it."""
    if context.job_name != spec.name and spec.options.executor != "in_process":
        # The implicit asset job (the UI's asset page, `dagster asset materialize`) runs on
        # the code location's executor, in process: never silently instead of the batch's.
        raise dg.Failure(
            f"batch {spec.name} runs on the {spec.options.executor} executor, which a run of "
            f"{context.job_name} does not use: launch the job {spec.name} instead (its page "
            f"in the UI, `dagster job launch -j {spec.name}`, `batch-defs submit "
            f"{spec.name}`)", allow_retries=False)
    partition = context.partition_key
    ensure_partition(context.instance, spec.name, partition)
    context.instance.add_run_tags(context.run_id, {
        "batch/name": spec.name, **spec.tags, "batch/state": RunState.RUNNING.value})


def manifest_path(instance: dg.DagsterInstance, run_id: str) -> Path:
    return Path(instance.storage_directory()) / run_id / MANIFEST


def build_fan_out(loaded: LoadedBatch) -> dg.OpDefinition:
    @dg.op(name=op_name(loaded.spec, "fan_out"), out=dg.DynamicOut(ChunkRef),
           required_resource_keys=batch_resource_keys(loaded.spec),
           description=f"Reads the {loaded.spec.source.type} source, validates items, "
                       "records invalid ones and yields chunks.")
    def fan_out(context: dg.OpExecutionContext) -> Iterator[dg.DynamicOutput[ChunkRef]]:
        join_batch(context, loaded.spec)
        step = BatchStep(loaded, context)
        spec = step.spec
        manifest = manifest_path(context.instance, step.run_id)
        manifest.parent.mkdir(parents=True, exist_ok=True)
        streaming = start_streaming(step, loaded)
        try:
            read = spool_source(step.ledger, spec, loaded.base_dir, step.partition,
                                step.run_id, manifest, streaming)
        except SourceError as exc:
            step.fail_fan_out(f"source {spec.source.type}: {exc}", streaming is not None)
        total, invalid = read.spool.count, read.invalid
        step.start_run(total)
        if streaming is not None:
            step.ledger.set_total_items(step.run_id, total)  # the count, for the bound
        if read.first_invalid:
            context.log.warning(f"{invalid} invalid items recorded, e.g. "
                                f"{read.first_invalid.key}: {read.first_invalid.error}")
        tolerated = spec.options.tolerated_count(total + invalid)
        if spec.options.on_error == "fail_fast" and invalid > tolerated:
            step.fail_fan_out(f"{invalid} invalid items (tolerated {tolerated}); first: "
                              f"{read.first_invalid.error if read.first_invalid else ''}",
                              streaming is not None)
        if not total:
            what = f"no valid items ({invalid} invalid)" if invalid else "no items"
            step.fail(f"source {spec.source.type} has {what}")
        if read.dependencies:
            # One chunk from the first item with dependencies on (the chunks streamed before
            # it declare none), so the engine can hold each item back until the items it
            # depends on have succeeded; a cycle fails here, before any of them runs.
            try:
                refs = dependency_chunks(read.spool, spec.options.depends_on_field, invalid,
                                         streaming.size if streaming else 0, read.streamed)
            except DependencyError as exc:
                step.fail_fan_out(f"{spec.options.depends_on_field}: {exc}",
                                  streaming is not None)
            context.log.info(f"{total} items with dependencies, the last "
                             f"{refs[-1].count} in one chunk")
        else:
            size = streaming.size if streaming else chunk_size(total, spec.options.slots,
                                                               spec.options.chunk_size)
            refs = read.spool.refs(size, invalid)
            context.log.info(f"{total} items in {len(refs)} chunks of up to {size}")
        context.instance.add_run_tags(step.run_id,
                                      {"batch/progress": starting_line(total, invalid)})
        engine = step.engine()
        engine.add_chunks(refs)  # slots start on the first chunks at once
        if streaming is not None:
            engine.rebase(total + invalid, invalid)
        for ref in refs:
            yield dg.DynamicOutput(ref, mapping_key=ref.mapping_key)

    return fan_out


def start_streaming(step: BatchStep, loaded: LoadedBatch) -> Streaming | None:
    """Chunks for the run's slots while the source is still read (see batch_defs/fanout.py),
    where that is possible: the source tells how many records it can have at most (chunks
    are sized by that) and later steps run in this process (the in-process executor: slots
    work ahead). Streaming ends at the first item that depends on another: the items from
    there on are one chunk (see fan_out).

    The run's row starts with that bound as its total (`batch-defs status` shows it while the
    source is counted); the fan-out replaces it with the count."""
    spec = step.spec
    if spec.options.executor != "in_process":
        return None
    bound = record_bound(spec.source, loaded.base_dir)
    if not bound:
        return None
    bound = min(bound, spec.options.max_items)
    step.start_run(bound)
    engine = step.engine()
    return Streaming(chunk_size(bound, spec.options.slots, spec.options.chunk_size), bound,
                     lambda ref: engine.add_chunks([ref]))


def phase_handler(loaded: LoadedBatch, phase: PhaseSpec) -> Handler:
    """Built once per process and phase params (templates compiled, functions imported); a
    routed phase's handler picks one of its cases' for each item."""
    if phase.route is not None:
        return build_router(phase, lambda task, params: _cached_handler(
            loaded, task, json.dumps(params, sort_keys=True)))
    return _cached_handler(loaded, phase.task, json.dumps(phase.params, sort_keys=True))


@lru_cache(maxsize=256)
def _cached_handler(loaded: LoadedBatch, task: str, params_json: str) -> Handler:
    return build_handler(task, json.loads(params_json), loaded.base_dir)


def ensure_run_row(step: BatchStep, ref: ChunkRef) -> None:
    """A re-execution whose fan-out did not run again has no batch_run row yet."""
    if not step.ledger.run_state(step.run_id).exists:
        step.start_run(ref.total_items)


def build_phase_op(loaded: LoadedBatch, index: int) -> dg.OpDefinition:
    declared = loaded.spec.phases[index]

    @dg.op(name=op_name(loaded.spec, declared.name), out=dg.Out(ChunkRef),
           required_resource_keys=batch_resource_keys(loaded.spec),
           pool=declared.pool,
           retry_policy=dg.RetryPolicy(max_retries=loaded.spec.options.step_retries, delay=1,
                                       backoff=dg.Backoff.EXPONENTIAL)
           if loaded.spec.options.step_retries else None,
           description=f"Phase {index + 1}: task {declared.task!r} on each item of a chunk.")
    def run_phase(context: dg.OpExecutionContext, chunk: ChunkRef) -> ChunkRef:
        step = BatchStep(loaded, context)
        ensure_run_row(step, chunk)
        # A stopped batch fails its remaining steps rather than skipping them, so that
        # re-execution from failure picks them up again.
        stopped = step.ledger.stop_request(step.run_id)
        if stopped:
            step.stop(stopped, started=False)
        report = step.engine().run_chunk(index, chunk, step.check_in, context.log)
        step.publish_progress()  # steps that never wait a second (work done ahead) too
        context.log.info(f"{chunk.mapping_key}: {report.executed} run, {report.reused} "
                         f"reused, {report.failed} failed")
        if report.stop:
            step.stop(report.stop)
        return chunk

    return run_phase


def build_collect(loaded: LoadedBatch) -> dg.OpDefinition:
    @dg.op(name=op_name(loaded.spec, "collect"),
           required_resource_keys=batch_resource_keys(loaded.spec),
           description="Completes every item of the run, sums up and applies "
                       "tolerated_failures.")
    def collect(context: dg.OpExecutionContext, chunks: list[ChunkRef]) -> dict[str, Any]:
        step = BatchStep(loaded, context)
        lineage = run_lineage(context.instance, context.run)
        if chunks:
            ensure_run_row(step, chunks[0])
        copied = step.ledger.carry_invalid(step.run_id, lineage)
        if copied:
            context.log.info(f"{copied} invalid source rows carried over from earlier runs")
        # Items the run has not finished in this process: failed items of earlier runs in
        # steps a re-execution did not re-run, and mapped steps it left out.
        report = step.engine().finish(sorted(chunks, key=lambda ref: ref.index), step.check_in,
                                      context.log)
        if report.executed:
            context.log.info(f"completed {report.executed} item-phases left unfinished")
        if report.stop:
            step.stop(report.stop)
        summary = step.summary()
        step.publish_progress(force=True)
        if summary.within_tolerance:
            # Not succeeded yet: after steps and the results asset may still fail or be
            # killed; the results op marks the run succeeded as its very last act.
            step.ledger.save_summary(step.run_id, summary.as_dict())
            return summary.as_dict()
        step.ledger.finish_run(step.run_id, RunState.FAILED, summary.as_dict())
        step.mark(RunState.FAILED)
        step.record_items(summary, RunState.FAILED)
        rolled = step.roll_back("fail")
        raise dg.Failure(
            f"{summary.counted_failures} items failed, were invalid or rejected "
            f"({summary.failed} failed, {summary.invalid} invalid, {summary.rejected} "
            f"rejected), more than the {summary.tolerated_failures} tolerated"
            f"{first_failures(summary)}{rolled}",
            metadata=failure_metadata(summary), allow_retries=False)

    return collect


def first_failures(summary: RunSummary, shown: int = 5) -> str:
    """`; first: 5 (score): ValueError: bad record 5; ...; all: batch-defs results ...`."""
    if not summary.failures:
        return ""
    named = "; ".join(f"{f.item_key} ({f.phase}, {f.status.value}): {f.error or ''}"
                      for f in summary.failures[:shown])
    more = summary.counted_failures - min(shown, len(summary.failures))
    return (f"; first: {named}" + (f"; {more} more" if more > 0 else "")
            + f"; all: {summary.results_hint()}")


def failure_metadata(summary: RunSummary) -> dict[str, Any]:
    """Counts and the first failed items, on the step failure in the run's logs."""
    counts: dict[str, Any] = dict(summary.counts())
    counts["tolerated_failures"] = summary.tolerated_failures
    counts["first_failures"] = dg.MetadataValue.md("\n".join(
        f"- `{f.item_key}` ({f.phase}, {f.status.value}, {f.attempts} attempts): "
        f"{f.error or ''}" for f in summary.failures) or "none")
    counts["all_failures"] = dg.MetadataValue.text(summary.results_hint())
    return counts


def build_after_op(loaded: LoadedBatch, index: int, name: str) -> dg.OpDefinition:
    declared = AFTER_TYPES[loaded.spec.after[index].task].resources

    @dg.op(name=op_name(loaded.spec, name), required_resource_keys=RESOURCE_KEYS | set(declared),
           description=f"After step {index + 1}: {loaded.spec.after[index].task}.")
    def after(context: dg.OpExecutionContext, summary: dict[str, Any]) -> dict[str, Any]:
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
            step.fail(mask(str(exc)))
        return {**summary, "after": {**summary.get("after", {}), name: dict(produced)}}

    return after


def build_executor(spec: BatchSpec) -> dg.ExecutorDefinition:
    if spec.options.executor == "celery":
        # Imported only here: the celery extra is needed by batches that scale out.
        try:
            from dagster_celery import celery_executor
        except ImportError:
            return missing_executor("celery")

        return celery_executor.configured({"broker": expand_env(spec.options.celery.broker),
                                           "backend": expand_env(spec.options.celery.backend)})
    if spec.options.executor == "multiprocess":
        return dg.multiprocess_executor.configured(
            {"max_concurrent": spec.options.max_concurrent_steps})
    return dg.in_process_executor


def missing_executor(extra: str) -> dg.ExecutorDefinition:
    """An executor that says which extra to install: the batch loads without it."""

    @dg.executor(name=f"{extra}_not_installed")
    def missing(_context: dg.InitExecutorContext) -> dg.Executor:
        raise dg.Failure(f"the {extra} executor is not installed: install the {extra} extra: "
                         f"pip install 'batch-defs[{extra}]'")

    return missing


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

    outputs = list(results.outs)  # the result, then one per asset check

    @dg.graph(name=f"{spec.name}_batch", description=spec.description or None,
              out={name: dg.GraphOut() for name in outputs})
    def batch_graph() -> Any:
        chunks = fan_out.alias("fan_out")()
        summary = collect.alias("collect")(chunks.map(through_phases).collect())
        for name, after_op in zip(spec.after_step_names(), after_ops, strict=True):
            summary = after_op.alias(name)(summary)
        return dict(zip(outputs, results.alias("results")(summary), strict=True))

    return batch_graph


def build_batch(loaded: LoadedBatch) -> tuple[dg.AssetsDefinition, BatchJob]:
    """The batch's results asset (graph-backed: its ops are the phases) and the job that
    materializes one partition of it per launch."""
    from assets.results import check_specs, results_asset_key

    spec = loaded.spec
    asset = dg.AssetsDefinition.from_graph(
        build_batch_graph(loaded),
        keys_by_output_name={"result": results_asset_key(spec.name)},
        # Per-phase quality, red in the UI when a phase's failures put the run beyond
        # tolerance; evaluated by the results op, or recorded by a run that fails or stops.
        check_specs=check_specs(spec),
        partitions_def=BatchPartitions(name=spec.name),
        group_name="batches",
        descriptions_by_output_name={"result": f"Results of batch {spec.name}, per launch."},
    )
    # The queued run coordinator starts higher priorities first (`--priority` on submit
    # overrides it per run).
    priority = {"dagster/priority": str(spec.priority)} if spec.priority else {}
    job = dg.define_asset_job(
        name=spec.name,
        selection=dg.AssetSelection.assets(asset),
        description=spec.description or f"Batch {spec.name}",
        tags={"batch/name": spec.name, **spec.tags, **priority},
        executor_def=build_executor(spec),
    )
    return asset, job

