"""A module-level job for reconstructable execution in tests (BATCH_DEFS_PATH decides)."""

import dagster as dg

from batch_defs.definitions import build_definitions


def redo_job() -> dg.JobDefinition:
    return build_definitions().resolve_job_def("redo")
