"""Where a batch keeps its item ledger and output files, and the run's spec overrides."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import dagster as dg
from pydantic import Field

from batch_defs.ledger import Ledger
from batch_defs.loader import LoadedBatch, with_overrides
from batch_defs.spec import BatchSpec


def instance_ledger_url(instance: dg.DagsterInstance) -> str:
    """The instance's own Postgres database when it has one, else SQLite under DAGSTER_HOME."""
    postgres_url = getattr(instance.run_storage, "postgres_url", None)
    if postgres_url:
        return postgres_url
    return f"sqlite:///{Path(instance.root_directory).resolve() / 'batch_ledger.db'}"


class BatchStorageResource(dg.ConfigurableResource):
    """Ledger database and output folder; empty fields follow the Dagster instance."""

    ledger_url: str = Field(default="", description="SQLAlchemy URL of the item ledger; "
                            "empty: the instance's Postgres database or SQLite in DAGSTER_HOME")
    output_dir: str = Field(default="", description="Root of files written by tasks; "
                            "empty: DAGSTER_HOME/batch_output")

    def ledger(self, instance: dg.DagsterInstance) -> Ledger:
        return Ledger(self.ledger_url or instance_ledger_url(instance))

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
    return with_overrides(loaded.spec, data, overrides)
