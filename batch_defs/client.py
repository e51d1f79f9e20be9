"""The Python API: launch batches, follow them, read their items, control them.

`batch-defs` (batch_defs/cli.py) and the REST API (batch_defs/api) are thin layers over it;
code that starts batches itself uses it directly (docs/api.md)::

    from batch_defs.client import BatchClient

    with BatchClient() as client:
        launch = client.create("invoices", items=[{"invoice_no": "A-1", ...}])
        status = client.wait(launch)
        for item in client.iter_items(launch, statuses=["failed"]):
            print(item.key, item.phases)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import yaml

from batch_defs import control
from batch_defs.api.models import (
    Analytics,
    BatchInfo,
    Counts,
    DeleteResult,
    FailureExample,
    ItemResult,
    LaunchInfo,
    LaunchState,
    Page,
    PhaseAnalytics,
    PhaseOutcome,
    RunStatus,
)
from batch_defs.launches import FOLDER, LaunchRecord, LaunchStore, launch_id, spawn_worker
from batch_defs.ledger import LIGHT_COLUMNS, LeaseHolder, Ledger, PartitionRuns
from batch_defs.loader import (
    PACKAGE_BATCHES,
    Catalog,
    LoadedBatch,
    SpecError,
    find_batch,
    load_batch,
    load_catalog,
    with_overrides,
)
from batch_defs.spec import BatchSpec

if TYPE_CHECKING:
    import pandas as pd

    from batch_defs.run_status import RunStatus as ShownStatus  # the CLI's view of a run

DEFINITIONS = "batch_defs.definitions"
SPECS_FOLDER = "batch_specs"  # spec objects given to create(), beside dagster.yaml
LAUNCH_ID = re.compile(r"^[a-z][a-z0-9_]*\.[0-9a-f]{16}$")
QUEUED_STATUSES = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
                   dg.DagsterRunStatus.STARTING)
# A launch or run: a launch id, a LaunchInfo, or a run id (or a unique prefix of one).
Ref = str | LaunchInfo


class NotFoundError(control.ControlError):
    """The launch or run a reference names does not exist."""


@dataclass(frozen=True)
class Launch:
    """A checked launch, ready to execute or submit: the batch, its partition, the run config
    that carries --data and --set, and the run's tags."""

    batch: str
    partition: str
    run_config: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None  # set for a resume (a re-execution of that run)


@dataclass(frozen=True)
class Outcome:
    run_id: str
    success: bool


def partition_key(data: str | Path | None) -> str:
    """A stable key from the data file's name (customers_2026_11.csv -> customers_2026_11),
    else the launch time."""
    if data:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data).stem)
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def new_partition_key() -> str:
    """For launches of items: the time, and a suffix so that two in one second differ."""
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def check_partition_key(key: str) -> str:
    if not key.isprintable() or not 0 < len(key) <= 255:
        raise control.ControlError(f"partition key {key!r} is not usable: 1 to 255 "
                                   "printable characters")
    return key


def use_spec_folder(folder: Path) -> None:
    """Make batches saved from spec objects findable by name, in this process and the ones it
    starts (workers, the multiprocess executor): BATCH_DEFS_PATH gets the folder."""
    current = [p for p in os.environ.get("BATCH_DEFS_PATH", "").split(os.pathsep) if p.strip()]
    folders = current or [str(PACKAGE_BATCHES)]
    if str(folder) not in folders:
        os.environ["BATCH_DEFS_PATH"] = os.pathsep.join([*folders, str(folder)])


def stamp(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds else None


def epoch(moment: datetime | float | None) -> float | None:
    if moment is None or isinstance(moment, int | float):
        return moment
    return moment.timestamp() if moment.tzinfo else moment.replace(tzinfo=UTC).timestamp()


def run_config_for(data: str | Path | None, sets: Sequence[str],
                   log_level: str = "WARNING") -> dict[str, Any]:
    config: dict[str, Any] = {}
    if data or sets:
        overrides: dict[str, Any] = {"overrides": list(sets)}
        if data:
            overrides["data"] = str(Path(data).expanduser().resolve())
        config["resources"] = {"run_overrides": {"config": overrides}}
    # The console logger: the CLI's live bars replace Dagster's step logs unless --verbose;
    # the event log in the instance keeps every event either way.
    config["loggers"] = {"console": {"config": {"log_level": log_level}}}
    return config


class BatchClient:
    """The instance in DAGSTER_HOME (set up on first use) and its ledger."""

    def __init__(self, project_dir: Path | None = None):
        from batch_defs.instance import ensure_dagster_home
        from resources.storage import open_ledger

        ensure_dagster_home(project_dir)
        self.instance = dg.DagsterInstance.get()
        self.ledger: Ledger = open_ledger(self.instance)
        root = Path(self.instance.root_directory).resolve()
        self.launch_store = LaunchStore(root / FOLDER)
        self.spec_folder = root / SPECS_FOLDER
        if self.spec_folder.is_dir():
            use_spec_folder(self.spec_folder)

    def close(self) -> None:
        self.ledger.close()
        self.instance.dispose()

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # Batches

    def catalog(self) -> Catalog:
        return load_catalog()

    # Launching

    def prepare(self, name: str, partition: str | None = None, data: str | Path | None = None,
                sets: Sequence[str] = (), wait: bool = False,
                on_wait: Callable[[LeaseHolder], None] | None = None,
                log_level: str = "WARNING") -> Launch:
        """Check the batch and its overrides before anything starts, add the partition, and
        make sure no live run holds it (wait for it with `wait`; else ControlError)."""
        loaded = find_batch(name)
        # The same validation as the file's.
        with_overrides(loaded.spec, data, sets, base_dir=loaded.base_dir)
        key = check_partition_key(partition or partition_key(data))
        control.ensure_partition(self.instance, name, key)
        control.wait_for_partition(self.instance, self.ledger, name, key, wait, on_wait)
        return Launch(name, key, run_config_for(data, sets, log_level))

    def execute(self, launch: Launch) -> Outcome:
        """Execute the batch's job in this process, against the instance; blocks."""
        job = dg.build_reconstructable_job(DEFINITIONS, "get_job",
                                           reconstructable_args=(launch.batch,))
        # Who runs it, so that `resume` can tell a live run from one whose process was killed.
        tags = {"dagster/partition": launch.partition, "batch/launched_by": "cli",
                "batch/pid": str(os.getpid()), "batch/host": socket.gethostname(),
                **launch.tags}
        reexecution = (dg.ReexecutionOptions(parent_run_id=launch.parent_run_id)
                       if launch.parent_run_id else None)
        result = dg.execute_job(job, instance=self.instance, run_config=launch.run_config,
                                tags=tags, reexecution_options=reexecution)
        return Outcome(result.run_id, result.success)

    def submit(self, launch: Launch) -> str:
        """Queue the run through the instance's run coordinator (the daemon launches it, under
        the run limits in dagster.yaml); returns its run id."""
        run_id = str(uuid.uuid4())
        tags = {"dagster/partition": launch.partition, "batch/launched_by": "cli-submit",
                **launch.tags}
        # `dagster job launch`, the public door, with the same code location name as
        # workspace.yaml's so that the daemon finds the job.
        command = [sys.executable, "-m", "dagster", "job", "launch", "-m", DEFINITIONS,
                   "-j", launch.batch, "--run-id", run_id, "--tags", json.dumps(tags),
                   "--config-json", json.dumps(launch.run_config)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0 or self.instance.get_run_by_id(run_id) is None:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise control.ControlError(f"could not queue the run: {lines[-1] if lines else ''}")
        return run_id

    def prepare_resume(self, run: str, sets: Sequence[str] = (),
                       log_level: str = "WARNING") -> Launch:
        """A re-execution of an ended (or killed) run; items already done are not run again."""
        plan = control.prepare_resume(self.instance, self.ledger, run)
        run_config: dict[str, Any] = json.loads(json.dumps(plan.run.run_config))
        if sets:
            config = run_config.setdefault("resources", {}).setdefault(
                "run_overrides", {}).setdefault("config", {})
            config["overrides"] = [*config.get("overrides", []), *sets]
            loaded = find_batch(plan.job_name)
            with_overrides(loaded.spec, config.get("data"), config["overrides"],
                           base_dir=loaded.base_dir)
        run_config["loggers"] = {"console": {"config": {"log_level": log_level}}}
        return Launch(plan.job_name, plan.partition, run_config,
                      {"batch/resumed_from": plan.run.run_id}, parent_run_id=plan.run.run_id)

    # Control

    def resolve(self, run: str) -> dg.DagsterRun:
        return control.resolve_run(self.instance, run)

    def pause(self, run: Ref) -> dg.DagsterRun:
        """Stop starting items; in-flight ones finish and are recorded; resume continues."""
        return control.pause(self.instance, self.ledger, self.run_id_of(run))

    def cancel(self, run: Ref, grace_s: float = 30.0) -> dg.DagsterRun:
        """Stop starting items, give in-flight ones `grace_s`, then end the run by force."""
        return control.cancel(self.instance, self.ledger, self.run_id_of(run), grace_s)

    # Reading

    def status(self, run: str) -> ShownStatus:
        """The run's Dagster status, batch state, summary (counts in one vocabulary), live
        progress (percent, ETA, current phase) and failed steps; `.as_dict()` for JSON."""
        from batch_defs.watch import run_status

        return run_status(self.instance, self.ledger, self.resolve(run).run_id)

    def results(self, run: str, statuses: Sequence[str] = (),
                phase: str | None = None) -> pd.DataFrame:
        rows = self.ledger.rows(self.resolve(run).run_id, phase=phase)
        return rows[rows["status"].isin(statuses)] if statuses else rows

    def report(self, run: str) -> dict[str, Any]:
        from batch_defs.report import build_report

        return build_report(self.instance, self.ledger, self.resolve(run).run_id)

    def batch(self, name: str) -> LoadedBatch:
        return find_batch(name)

    # Control of running batches: live changes and compensation

    def set(self, run: str, assignments: Sequence[str]) -> dict[str, Any]:
        """Change a running batch (e.g. ["options.concurrency=20", "phases.send.rate=5/s"]);
        it applies them within about a second. Returns the changes now in force."""
        return control.change_settings(self.instance, self.ledger, run, assignments)[1]

    def rollback(self, run: str, concurrency: int | None = None) -> Any:
        """Undo every effect of an ended run (its phases' `undo:`), each once; blocks.
        Returns a batch_defs.rollback.RollbackReport."""
        return control.rollback(self.instance, self.ledger, run, concurrency)

    # Launches (the API's jobs): create, start, list, delete

    def batches(self) -> list[BatchInfo]:
        catalog = self.catalog()
        found = [BatchInfo(name=name, description=loaded.spec.description,
                           phases=[p.name for p in loaded.spec.phases],
                           partitions=len(self.instance.get_dynamic_partitions(name)),
                           problem="; ".join(str(n) for n in loaded.notices) or None)
                 for name, loaded in sorted(catalog.batches.items())]
        return found + [BatchInfo(name=b.name, phases=[], partitions=0,
                                  problem=f"does not load: {b.describe()}")
                        for b in catalog.broken]

    def register_spec(self, spec: BatchSpec) -> LoadedBatch:
        """Save a spec object as a batch of this instance (DAGSTER_HOME/batch_specs/NAME.yaml)
        so that every process finds it by name; relative paths in it resolve there."""
        try:
            existing: LoadedBatch | None = find_batch(spec.name)
        except SpecError:
            existing = None
        if existing is not None and existing.path.parent != self.spec_folder:
            raise control.ControlError(f"batch {spec.name!r} is already defined in "
                                       f"{existing.path}; give the spec another name")
        self.spec_folder.mkdir(parents=True, exist_ok=True)
        path = self.spec_folder / f"{spec.name}.yaml"
        data = spec.model_dump(mode="json", by_alias=True, exclude_unset=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True),
                        encoding="utf-8")
        use_spec_folder(self.spec_folder)
        return load_batch(path)

    def create(self, batch: str | BatchSpec, items: Iterable[dict[str, Any]] | None = None,
               *, data: str | Path | None = None, partition: str | None = None,
               sets: Sequence[str] = (), start: bool = True) -> LaunchInfo:
        """A launch of `batch` (a name, or a spec object) over `items` (any iterable of
        dicts, streamed to a JSONL file under the instance's storage) or a `data` file, else
        the batch's own source. `start=False` creates it (partition, items, a record you can
        list) without starting it; else a worker process starts the run at once."""
        if items is not None and data is not None:
            raise control.ControlError("give items or a data file, not both")
        loaded = self.register_spec(batch) if isinstance(batch, BatchSpec) else find_batch(batch)
        name = loaded.spec.name
        key = check_partition_key(partition or (partition_key(data) if data
                                                else new_partition_key()))
        ident = launch_id(name, key)
        self._refuse_if_busy(ident, name, key)
        count = None
        if items is not None:
            count = self.launch_store.write_items(ident, items)
            data = self.launch_store.items_path(ident)
        data_path = str(Path(data).expanduser().resolve()) if data else None
        with_overrides(loaded.spec, data_path, sets)  # checked now, not when the run starts
        control.ensure_partition(self.instance, name, key)
        self.launch_store.save(LaunchRecord(id=ident, batch=name, partition=key,
                                            created_at=time.time(), data=data_path,
                                            items=count, sets=list(sets)))
        return self.start(ident) if start else self.get_launch(ident)

    def start(self, launch: Ref, wait: bool = False) -> LaunchInfo:
        """Start a created (or ended) launch: in a worker process that outlives this one, or
        with `wait`, in this process until the run ends."""
        record = self._record(launch)
        self._refuse_if_busy(record.id, record.batch, record.partition)
        if wait:
            self.run_launch(record.id)
        else:
            spawn_worker(self.launch_store, record, "run", record.id)
        return self.get_launch(record.id)

    def run_launch(self, ident: str) -> Outcome:
        """Execute a launch's run in this process (what the worker does); blocks."""
        record = self._record(ident)
        launch = self.prepare(record.batch, record.partition, record.data, record.sets)
        return self.execute(replace(launch, tags={
            **launch.tags, "batch/launch": record.id, "batch/launched_by": "api"}))

    def resume(self, ref: Ref, wait: bool = False) -> LaunchInfo:
        """Continue a launch's latest run (or the given run): only items not yet succeeded
        run. In a worker process, or with `wait` in this one."""
        run = self.resolve(self.run_id_of(ref))
        if not run.is_finished and control.worker_alive(run) is not False:
            raise control.ControlError(f"run {run.run_id} is {run.status.value}; pause or "
                                       "cancel it first")
        partition = run.tags.get("dagster/partition") or ""
        ident = launch_id(run.job_name, partition)
        record = self.launch_store.load(ident) or LaunchRecord(
            id=ident, batch=run.job_name, partition=partition, created_at=time.time())
        self.launch_store.save(record)
        if wait:
            self.resume_in_process(ident, run.run_id)
        else:
            spawn_worker(self.launch_store, record, "resume", ident, run.run_id)
        return self.get_launch(ident)

    def resume_in_process(self, ident: str, run_id: str) -> Outcome:
        launch = self.prepare_resume(run_id)
        return self.execute(replace(launch, tags={
            **launch.tags, "batch/launch": ident, "batch/launched_by": "api"}))

    def get_launch(self, ident: str) -> LaunchInfo:
        """A launch by its id; ControlError if there is none."""
        batch = ident.split(".", 1)[0]
        for info in self._launch_infos(batch):
            if info.id == ident:
                return info
        raise NotFoundError(f"no launch {ident!r}")

    def launches(self, batch: str | None = None, states: Sequence[str] = (),
                 since: datetime | float | None = None, until: datetime | float | None = None,
                 offset: int = 0, limit: int = 50) -> Page[LaunchInfo]:
        """Launches, newest first, of one batch or all, in some states, made in a date range
        (`since` inclusive, `until` exclusive), a page at a time."""
        wanted = {LaunchState(s) for s in states}
        low, high = epoch(since), epoch(until)
        found = []
        for info in self._launch_infos(batch):
            made = epoch(info.created_at)
            if wanted and info.state not in wanted:
                continue
            if (low is not None or high is not None) and made is None:
                continue
            if (low is not None and made is not None and made < low) or (
                    high is not None and made is not None and made >= high):
                continue
            found.append(info)
        found.sort(key=lambda i: (epoch(i.created_at) or 0.0, i.id), reverse=True)
        return page_of(found, offset, limit)

    def delete(self, launch: Ref, confirm: bool = False) -> DeleteResult:
        """Remove a launch: its ledger rows, output files and item files, and its Dagster
        partition. Refused without `confirm`, and while a run of it is live."""
        info = launch if isinstance(launch, LaunchInfo) else self.get_launch(
            launch if LAUNCH_ID.match(launch) else self.launch_of_run(launch))
        if not confirm:
            raise control.ControlError(
                f"deleting launch {info.id} ({info.batch} / {info.partition}) removes its "
                f"{info.runs} run(s)' item rows and output files for good; confirm it "
                "(--yes, confirm=true)")
        self._refuse_if_busy(info.id, info.batch, info.partition, "delete")
        summaries = [(r["run_id"], r.get("summary")) for r in self.ledger.runs(info.batch)
                     if r["partition"] == info.partition]
        files = self._delete_files(info, [json.loads(s) if s else None for _, s in summaries],
                                   [run_id for run_id, _ in summaries])
        deleted = self.ledger.delete_partition(info.batch, info.partition)
        if self.instance.has_dynamic_partition(info.batch, info.partition):
            self.instance.delete_dynamic_partition(info.batch, info.partition)
        self.launch_store.delete(info.id)
        return DeleteResult(batch=info.batch, partition=info.partition,
                            runs=len(deleted.run_ids), item_rows=deleted.items, files=files)

    # Reading a launch or run

    def run_status(self, ref: Ref) -> RunStatus:
        """Counts per status and phase, percent, ETA, current phase and cost so far."""
        info, run_id = self._launch_and_run(ref)
        if run_id is None:
            assert info is not None
            # Without a run, only a worker that gave up has ended (state failed, and why).
            return RunStatus(launch_id=info.id, batch=info.batch, partition=info.partition,
                             state=info.state, total_items=info.items or 0,
                             run_ended=info.state is LaunchState.FAILED,
                             stop_reason=info.error)
        return self._status_of_run(run_id, info)

    def wait(self, ref: Ref, timeout_s: float | None = None, poll_s: float = 0.5) -> RunStatus:
        """Poll until the launch's run has ended (succeeded, failed, paused, canceled)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.run_status(ref)
            if status.finished:
                return status
            if status.state is LaunchState.CREATED:
                raise control.ControlError(f"launch {status.launch_id} is not started")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{status.run_id or status.launch_id} is still "
                                   f"{status.state.value} after {timeout_s:g}s")
            time.sleep(poll_s)

    def items(self, ref: Ref, statuses: Sequence[str] = (), phase: str | None = None,
              offset: int = 0, limit: int = 100) -> Page[ItemResult]:
        """A page of a run's items in source order, each with its outcome per phase; filter
        by final status (or, with `phase`, by the status in that phase)."""
        run_id = self.run_id_of(ref)
        run = self.ledger.run(run_id)
        phases = run["phases"] if run else []
        page = self.ledger.item_page(run_id, phases, statuses, phase, offset, limit)
        by_key: dict[str, dict[str, PhaseOutcome]] = {key: {} for key, _ in page.items}
        inputs: dict[str, Any] = {}
        for row in page.rows.to_dict("records"):
            by_key[row["item_key"]][row["phase"]] = phase_outcome(row)
            if row["input"] is not None:
                inputs[row["item_key"]] = json.loads(row["input"])
        results = [ItemResult(key=key, status=status, phases=by_key[key],
                              input=inputs.get(key)) for key, status in page.items]
        return Page[ItemResult](items=results, total=page.total, offset=offset, limit=limit,
                                next_offset=offset + limit if offset + limit < page.total
                                else None)

    def iter_items(self, ref: Ref, statuses: Sequence[str] = (), phase: str | None = None,
                   page_size: int = 500) -> Iterator[ItemResult]:
        """Every item of a run (matching the filter), read a page at a time."""
        run_id = self.run_id_of(ref)
        offset: int | None = 0
        while offset is not None:
            page = self.items(run_id, statuses, phase, offset, page_size)
            yield from page.items
            offset = page.next_offset

    def analytics(self, ref: Ref) -> Analytics:
        """Per phase: success rate, average and p95 duration, cost in total and per item."""
        from batch_defs.report import phase_analytics

        run_id = self.run_id_of(ref)
        run = self.ledger.run(run_id)
        if run is None:
            raise control.ControlError(f"run {run_id} has no items in the ledger yet")
        table = phase_analytics(self.ledger.rows(run_id, columns=LIGHT_COLUMNS), run["phases"])
        phases = [PhaseAnalytics(**row, cost_per_item=round(row["cost"] / row["items"], 8)
                                 if row["items"] else None) for row in table]
        return Analytics(run_id=run_id, batch=run["batch"], partition=run["partition"],
                         phases=phases[:-1], total=phases[-1])

    # Resolving references

    def run_id_of(self, ref: Ref) -> str:
        """The run a reference names: a launch's latest run, or a run id (or prefix)."""
        _, run_id = self._launch_and_run(ref)
        if run_id is None:
            raise control.ControlError(f"launch {ref_name(ref)} has no run yet; start it")
        return run_id

    def launch_of_run(self, run: str) -> str:
        found = self.resolve(run)
        return launch_id(found.job_name, found.tags.get("dagster/partition") or "")

    def _launch_and_run(self, ref: Ref) -> tuple[LaunchInfo | None, str | None]:
        if isinstance(ref, LaunchInfo) or LAUNCH_ID.match(ref):
            info = self.get_launch(ref.id if isinstance(ref, LaunchInfo) else ref)
            if info.state is LaunchState.STARTING:
                return info, None  # the latest run is an earlier one; the new one comes
            return info, info.run_id
        try:
            return None, self.resolve(ref).run_id
        except control.ControlError as exc:  # no such run, or the prefix names several
            raise NotFoundError(str(exc)) from exc

    def _record(self, launch: Ref) -> LaunchRecord:
        ident = launch.id if isinstance(launch, LaunchInfo) else launch
        record = self.launch_store.load(ident)
        if record is None:
            raise NotFoundError(f"no launch {ident!r} made with the API (the CLI's "
                                       "launches are started with batch-defs run)")
        return record

    def _refuse_if_busy(self, ident: str, batch: str, partition: str,
                        doing: str = "start") -> None:
        """A live run (or a worker starting one) holds the launch: ControlError."""
        control.wait_for_partition(self.instance, self.ledger, batch, partition, wait=False)
        for info in self._launch_infos(batch, partition):
            if info.id == ident and not info.state.ended:
                run = f" (run {info.run_id})" if info.run_id else ""
                raise control.ControlError(f"launch {ident} is {info.state.value}{run}; pause "
                                           f"or cancel it before you {doing} it")

    def _launch_infos(self, batch: str | None = None,
                      partition: str | None = None) -> list[LaunchInfo]:
        """Every launch (of one batch, or all): records of the API, partitions with runs in
        the ledger, and partitions only Dagster knows (queued, or never run)."""
        records = {r.id: r for r in self.launch_store.all()
                   if (batch is None or r.batch == batch)
                   and (partition is None or r.partition == partition)}
        ledger_runs = {launch_id(p.batch, p.partition): p
                       for p in self.ledger.partition_runs(batch)
                       if partition is None or p.partition == partition}
        names = sorted({r.batch for r in records.values()}
                       | {p.batch for p in ledger_runs.values()} | ({batch} if batch else set()))
        keys: dict[str, tuple[str, str]] = {}
        latest: dict[str, Any] = {}
        for name in names:
            existing = set(self.instance.get_dynamic_partitions(name))
            keys.update({launch_id(name, key): (name, key) for key in existing
                         if partition is None or key == partition})
            # Runs of deleted partitions stay in Dagster's history, not in the launches.
            latest.update({launch_id(name, data.partition): data.run_id for data in
                           self.instance.get_run_partition_data(dg.RunsFilter(job_name=name))
                           if data.partition in existing})
        keys.update({i: (r.batch, r.partition) for i, r in records.items()})
        keys.update({i: (p.batch, p.partition) for i, p in ledger_runs.items()})
        run_records = {rec.dagster_run.run_id: rec for rec in self.instance.get_run_records(
            dg.RunsFilter(run_ids=list(latest.values())))} if latest else {}
        return [launch_info(ident, name, key, records.get(ident), ledger_runs.get(ident),
                            run_records.get(latest.get(ident, "")))
                for ident, (name, key) in keys.items()]

    def _status_of_run(self, run_id: str, info: LaunchInfo | None) -> RunStatus:
        """The API's view of a run: the typed summary and live progress the CLI shows."""
        shown = self.status(run_id)
        dagster_run = self.instance.get_run_by_id(run_id)
        state = launch_state(dagster_run, shown.state.value)
        summary, progress = shown.summary, shown.progress or {}
        counts = Counts(**{name: getattr(summary, name) for name in Counts.model_fields}) \
            if summary else Counts()
        per_phase = {phase: {status: n for status, n in tally.model_dump().items()
                             if n and status != "reused"}
                     for phase, tally in summary.per_phase.items()} if summary else {}
        finished = state in (LaunchState.SUCCEEDED, LaunchState.FAILED,
                             LaunchState.CANCELED, LaunchState.PAUSED)
        return RunStatus(
            launch_id=info.id if info else launch_id(shown.job or "", shown.partition or ""),
            run_id=run_id, batch=(summary.batch if summary else None) or shown.job,
            partition=shown.partition, state=state, dagster_status=shown.status,
            total_items=summary.items if summary else 0,
            items_done=int(progress.get("done") or 0), counts=counts, per_phase=per_phase,
            percent=float(progress.get("percent") or (100.0 if finished and summary else 0.0)),
            eta_s=progress.get("eta_s"),
            current_phase=None if finished else progress.get("phase"),
            cost=summary.cost if summary else 0.0, tokens=summary.tokens if summary else 0,
            duration_s=summary.duration_s if summary else 0.0,
            items_per_s=summary.items_per_s if summary else 0.0,
            stop_reason=summary.stop_reason if summary else None,
            failures=[FailureExample(item_key=f.item_key, phase=f.phase, status=f.status.value,
                                     error=f.error) for f in (summary.failures if summary
                                                              else [])],
            step_failures=[f.model_dump() for f in shown.step_failures], files=shown.files,
            run_ended=dagster_run is None or dagster_run.is_finished)

    def _delete_files(self, info: LaunchInfo, summaries: list[Any], run_ids: list[str]) -> int:
        """The partition's output folder, the files its after steps wrote and its runs'
        manifests (they hold the items): only what lies inside the instance's folders."""
        from resources.storage import BatchStorageResource

        root = BatchStorageResource().output_root(self.instance, info.batch)
        storage = Path(self.instance.storage_directory()).resolve()
        own = Path(info.partition)
        # Only a key that is a plain relative path names a folder of its own ("a/../b" is b's).
        plain = not own.is_absolute() and not {".", ".."} & set(own.parts)
        targets = [root / own] if plain else []
        targets += [Path(str(path)) for summary in summaries if summary
                    for produced in summary.get("after", {}).values()
                    for path in produced.values() if isinstance(path, str)]
        targets += [storage / run_id / "batch_items.jsonl" for run_id in run_ids]
        removed = 0
        for target in targets:
            target = target.resolve()
            inside = any(target.is_relative_to(base) and target != base
                         for base in (root, storage))
            if not inside or not target.exists():
                continue
            if target.is_dir():
                removed += sum(1 for p in target.rglob("*") if p.is_file())
                shutil.rmtree(target)
            else:
                target.unlink()
                removed += 1
        return removed


def ref_name(ref: Ref) -> str:
    return ref.id if isinstance(ref, LaunchInfo) else ref


def page_of(found: list[Any], offset: int, limit: int) -> Page[Any]:
    chunk = found[offset:offset + limit]
    return Page[Any](items=chunk, total=len(found), offset=offset, limit=limit,
                     next_offset=offset + limit if offset + limit < len(found) else None)


def launch_state(run: dg.DagsterRun | None, recorded: str | None) -> LaunchState:
    """A run's state for the API: the effective state (batch_defs.control), or queued."""
    if run is not None and run.status in QUEUED_STATUSES:
        return LaunchState.QUEUED
    return LaunchState(control.effective_state(run, recorded).value)


def launch_info(ident: str, batch: str, partition: str, record: LaunchRecord | None,
                runs: PartitionRuns | None, run_record: Any) -> LaunchInfo:
    """One launch from what the API recorded, the ledger's runs and Dagster's latest run."""
    dagster_run = run_record.dagster_run if run_record is not None else None
    latest = runs.latest if runs else None
    if latest is not None and dagster_run is not None and latest["run_id"] != dagster_run.run_id:
        latest = None  # the newest Dagster run has not reached the ledger yet
    created_run = run_record.create_timestamp.timestamp() if run_record is not None else None
    state = (launch_state(dagster_run, latest["status"] if latest else None)
             if dagster_run is not None else LaunchState.CREATED)
    error = None
    since = max(record.created_at, record.started_at or 0.0) if record else None
    if record is not None and since and (created_run is None or created_run < since):
        # Made or started again after the latest run: that run is not this launch's news.
        alive = record.worker_pid is not None and control.pid_alive(record.worker_pid)
        if not record.started_at or record.started_at < record.created_at:
            state = LaunchState.CREATED
        elif alive and record.error is None:
            state = LaunchState.STARTING
        else:
            state, error = LaunchState.FAILED, record.error or (
                "the worker ended before the run started; see its log: "
                f"batch_launches/{ident}/worker.log")
    created = record.created_at if record else (runs.first_started_at if runs else created_run)
    return LaunchInfo(
        id=ident, batch=batch, partition=partition, state=state, created_at=stamp(created),
        items=record.items if record and record.items is not None
        else (int(latest["total_items"]) if latest else None),
        data=record.data if record else None, runs=runs.runs if runs else 0,
        run_id=dagster_run.run_id if dagster_run else None,
        started_at=stamp(latest["started_at"]) if latest else None,
        finished_at=stamp(latest["finished_at"]) if latest else None, error=error)


def phase_outcome(row: dict[str, Any]) -> PhaseOutcome:
    def number(value: Any) -> Any:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) \
            else value

    return PhaseOutcome(
        status=row["status"], attempts=int(row["attempts"] or 0),
        output=json.loads(row["output"]) if row["output"] else None, error=row["error"],
        duration_s=number(row["duration_s"]), cost=float(row["cost"] or 0.0),
        tokens=int(row["tokens"] or 0),
        attempt_log=json.loads(row["attempt_log"]) if row["attempt_log"] else None,
        reused_from=row["reused_from"])


def with_priority(launch: Launch, priority: int | None) -> Launch:
    """The launch with Dagster's run priority (`dagster/priority`: the queue starts higher
    priorities first), overriding the batch's `priority:`."""
    if priority is None:
        return launch
    return replace(launch, tags={**launch.tags, "dagster/priority": str(priority)})
