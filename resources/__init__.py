"""Dagster resources of the batch engine: where ledger and outputs live, per-run overrides."""

from resources.storage import BatchStorageResource, RunOverridesResource

__all__ = ["BatchStorageResource", "RunOverridesResource"]
