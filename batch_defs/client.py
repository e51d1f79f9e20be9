"""The Python API: launch batches, follow them, read their items, control them.

`batch-defs` (batch_defs/cli.py) is a thin layer over it; code that starts batches itself uses
it directly::

    from batch_defs.client import BatchClient

    with BatchClient() as client:
        launch = client.prepare("invoices", data="march.csv")
        result = client.execute(launch)
        print(client.status(result.run_id))
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import pandas as pd

from batch_defs import control
from batch_defs.ledger import LeaseHolder, Ledger
from batch_defs.loader import Catalog, LoadedBatch, find_batch, load_catalog, with_overrides

if TYPE_CHECKING:
    from batch_defs.watch import RunStatus

DEFINITIONS = "batch_defs.definitions"


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
        with_overrides(loaded.spec, data, sets)  # the same validation as the file's
        key = partition or partition_key(data)
        if not key.isprintable() or not 0 < len(key) <= 255:
            raise control.ControlError(f"partition key {key!r} is not usable: 1 to 255 "
                                       "printable characters")
        if not self.instance.has_dynamic_partition(name, key):
            self.instance.add_dynamic_partitions(name, [key])
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
            with_overrides(find_batch(plan.job_name).spec, config.get("data"),
                           config["overrides"])
        run_config["loggers"] = {"console": {"config": {"log_level": log_level}}}
        return Launch(plan.job_name, plan.partition, run_config,
                      {"batch/resumed_from": plan.run.run_id}, parent_run_id=plan.run.run_id)

    # Control

    def resolve(self, run: str) -> dg.DagsterRun:
        return control.resolve_run(self.instance, run)

    def pause(self, run: str) -> dg.DagsterRun:
        return control.pause(self.instance, self.ledger, run)

    def cancel(self, run: str, grace_s: float = 30.0) -> dg.DagsterRun:
        return control.cancel(self.instance, self.ledger, run, grace_s)

    # Reading

    def status(self, run: str) -> RunStatus:
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
