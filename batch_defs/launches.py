"""Launches made with the Python API or REST: a record per launch (batch, partition, its items
file) under the instance's storage, and the worker process that runs or resumes one.

    python -m batch_defs.launches run LAUNCH_ID
    python -m batch_defs.launches resume LAUNCH_ID RUN_ID
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

FOLDER = "batch_launches"  # beside dagster.yaml in DAGSTER_HOME
ITEMS_FILE = "items.jsonl"
RECORD_FILE = "launch.json"
WORKER_LOG = "worker.log"


def launch_id(batch: str, partition: str) -> str:
    """Stable and URL-safe for any partition key, whichever door made the partition."""
    return f"{batch}.{hashlib.sha256(partition.encode()).hexdigest()[:16]}"


class LaunchRecord(BaseModel):
    """What the API knows of a launch beyond the ledger and Dagster."""

    id: str
    batch: str
    partition: str
    created_at: float
    data: str | None = None  # the file the run reads (the items file, or the caller's)
    items: int | None = None
    sets: list[str] = Field(default_factory=list)
    started_at: float | None = None  # when a worker was last started
    worker_pid: int | None = None
    error: str | None = None  # why the worker could not start the run


class LaunchStore:
    """Records in DAGSTER_HOME/batch_launches/<launch id>/."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = threading.Lock()

    def folder(self, launch: str) -> Path:
        return self.root / launch

    def items_path(self, launch: str) -> Path:
        return self.folder(launch) / ITEMS_FILE

    def write_items(self, launch: str, items: Iterable[dict[str, Any]]) -> int:
        """Stream the items to the launch's JSONL file (the run reads it like any file)."""
        path = self.items_path(launch)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial, count = path.with_suffix(".partial"), 0
        with partial.open("w", encoding="utf-8") as handle:
            for item in items:
                if not isinstance(item, dict):
                    raise ValueError(f"item {count + 1} is a {type(item).__name__}, not an "
                                     "object")
                handle.write(json.dumps(item, default=str, ensure_ascii=False) + "\n")
                count += 1
        os.replace(partial, path)
        return count

    def save(self, record: LaunchRecord) -> None:
        folder = self.folder(record.id)
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{RECORD_FILE}.partial"
        with self._lock:
            partial.write_text(record.model_dump_json(indent=2), encoding="utf-8")
            os.replace(partial, folder / RECORD_FILE)

    def load(self, launch: str) -> LaunchRecord | None:
        path = self.folder(launch) / RECORD_FILE
        if not path.exists():
            return None
        return LaunchRecord.model_validate_json(path.read_text(encoding="utf-8"))

    def all(self) -> Iterator[LaunchRecord]:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob(f"*/{RECORD_FILE}")):
            yield LaunchRecord.model_validate_json(path.read_text(encoding="utf-8"))

    def delete(self, launch: str) -> None:
        shutil.rmtree(self.folder(launch), ignore_errors=True)

    def update(self, launch: str, **changes: Any) -> LaunchRecord | None:
        record = self.load(launch)
        if record is None:
            return None
        record = record.model_copy(update=changes)
        self.save(record)
        return record


def spawn_worker(store: LaunchStore, record: LaunchRecord, *args: str) -> LaunchRecord:
    """Start the process that runs (or resumes) the launch; it outlives the caller."""
    log = (store.folder(record.id) / WORKER_LOG).open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "batch_defs.launches", *args], stdin=subprocess.DEVNULL,
        stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True)
    log.close()
    # Reap it when it ends (a long-lived server would otherwise collect zombies).
    threading.Thread(target=process.wait, daemon=True, name="batch-launch-reaper").start()
    updated = record.model_copy(update={"started_at": time.time(), "worker_pid": process.pid,
                                        "error": None})
    store.save(updated)
    return updated


def worker(argv: list[str]) -> int:
    """Run or resume a launch in this process; a refusal is kept in the launch's record."""
    from batch_defs.client import BatchClient

    action, launch = argv[0], argv[1]
    with BatchClient() as client:
        try:
            if action == "run":
                outcome = client.run_launch(launch)
            else:
                outcome = client.resume_in_process(launch, argv[2])
        except Exception as exc:
            client.launch_store.update(launch, error=f"{type(exc).__name__}: {exc}")
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0 if outcome.success else 1


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
