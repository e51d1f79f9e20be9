"""Where a batch keeps its item ledger and output files, and the run's spec overrides."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from batch_defs.engine import RunEngine
from batch_defs.home import configured_ledger_url, home_settings, sqlite_ledger_url
from batch_defs.ledger import Ledger
from batch_defs.loader import LoadedBatch, with_overrides
from batch_defs.spec import BatchSpec


def instance_settings(instance: dg.DagsterInstance) -> dict[str, Any]:
    """The batch engine's own settings of an instance: DAGSTER_HOME/batch_defs.yaml."""
    return home_settings(Path(instance.root_directory))


def instance_ledger_url(instance: dg.DagsterInstance) -> str:
    """`ledger_url` of the instance's settings (${env:NAME} allowed), else the instance's own
    Postgres database when it has one, else SQLite under DAGSTER_HOME."""
    root = Path(instance.root_directory)
    configured = configured_ledger_url(root)
    if configured:
        return configured
    postgres_url = getattr(instance.run_storage, "postgres_url", None)
    if postgres_url:
        return postgres_url
    return sqlite_ledger_url(root)


def open_ledger(instance: dg.DagsterInstance) -> Ledger:
    """The instance's ledger; the caller closes it (or uses it in a `with`)."""
    return Ledger(instance_ledger_url(instance))


class Heartbeat:
    """Calls `beat` every `every_s` seconds on a thread of its own until stopped. A beat that
    raises is logged and the next one tried: a busy database must not end the run."""

    def __init__(self, beat: Callable[[], None], every_s: float = 1.0):
        self.beat, self.every_s = beat, every_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="batch-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            try:
                self.beat()
            except Exception:
                logging.getLogger(__name__).warning("heartbeat failed", exc_info=True)
            if self.stopped.wait(self.every_s):
                return


class BatchStorageResource(dg.ConfigurableResource):
    """The item ledger (configured once per instance: DAGSTER_HOME/batch_defs.yaml) and the
    output folder. The resource owns the ledger's connections for the run and closes them."""

    output_dir: str = Field(default="", description="Root of files written by tasks; "
                            "empty: DAGSTER_HOME/batch_output")
    _ledger: Ledger | None = PrivateAttr(default=None)
    _engines: dict[str, RunEngine] = PrivateAttr(default_factory=dict)
    _heartbeats: dict[str, Heartbeat] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.instance is not None:
            self._ledger = open_ledger(context.instance)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        # The run (or, under the multiprocess executor, the step) is over here: in-flight
        # items finish and are recorded before the ledger closes.
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        for heartbeat in self._heartbeats.values():
            heartbeat.stop()
        self._heartbeats.clear()
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def engine(self, run_id: str, build: Callable[[], RunEngine]) -> RunEngine:
        """The run's engine in this process: one pool of slots shared by its steps."""
        with self._lock:
            if run_id not in self._engines:
                self._engines[run_id] = build()
            return self._engines[run_id]

    def keep_beating(self, run_id: str, beat: Callable[[], None]) -> None:
        """`beat` about every second for as long as the run's resources live in this process
        (the whole run in process; a step under the multiprocess executor): the partition
        lease stays held through every step, however long one goes without running items."""
        with self._lock:
            if run_id not in self._heartbeats:
                self._heartbeats[run_id] = Heartbeat(beat).start()

    def ledger(self, instance: dg.DagsterInstance) -> Ledger:
        if self._ledger is None:  # used outside a run (tests, scripts): opened on demand
            self._ledger = open_ledger(instance)
        return self._ledger

    def output_root(self, instance: dg.DagsterInstance, batch: str) -> Path:
        root = Path(self.output_dir) if self.output_dir else Path(
            instance.root_directory) / "batch_output"
        return (root / batch).resolve()


class RunOverridesResource(dg.ConfigurableResource):
    """Per-run changes to a batch spec: `data` replaces source.path, `overrides` are KEY=VALUE.

    Run config (not a rebuilt job) carries them, so a re-execution from the Dagster UI uses
    exactly the same effective spec as the run it resumes.
    """

    data: str | None = Field(default=None, description="File replacing the spec's source.path")
    overrides: list[str] = Field(default_factory=list,
                                 description="Spec changes such as options.concurrency=4")

    def apply(self, loaded: LoadedBatch) -> BatchSpec:
        return _effective(loaded, self.data, tuple(self.overrides))


@lru_cache(maxsize=64)
def _effective(loaded: LoadedBatch, data: str | None, overrides: tuple[str, ...]) -> BatchSpec:
    return with_overrides(loaded.spec, data, overrides, base_dir=loaded.base_dir)
