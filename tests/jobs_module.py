"""Module-level jobs for reconstructable execution in tests (BATCH_DEFS_PATH decides).

Dagster caches a reconstructed job per pointer in a process, so each test uses a batch name
of its own.
"""

import dagster as dg

from batch_defs.definitions import build_definitions


def batch_job(name: str) -> dg.JobDefinition:
    return build_definitions().resolve_job_def(name)
