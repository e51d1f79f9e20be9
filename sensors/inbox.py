"""Inbox sensors: each new file in a batch's inbox folder becomes a partition and a run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import dagster as dg

from assets.factory import BatchJob
from batch_defs.env import resolve_path
from batch_defs.loader import LoadedBatch

SEEN_LIMIT = 2000  # file fingerprints kept in the cursor


def inbox_folder(loaded: LoadedBatch) -> Path:
    assert loaded.spec.sensor is not None
    return resolve_path(loaded.spec.sensor.inbox, loaded.base_dir)


def fingerprint(path: Path) -> str:
    """Name, size and modification time: a file dropped again with new content is new."""
    stat = path.stat()
    return f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"


def file_partition(path: Path, existing: set[str]) -> str:
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)
    candidate, n = key, 1
    while candidate in existing:
        n += 1
        candidate = f"{key}-{n}"
    return candidate


def build_inbox_sensor(loaded: LoadedBatch,
                       job: BatchJob) -> dg.SensorDefinition:
    spec = loaded.spec
    assert spec.sensor is not None
    partitions = dg.DynamicPartitionsDefinition(name=spec.name)
    pattern = spec.sensor.pattern

    @dg.sensor(name=f"{spec.name}_inbox", job=job,
               minimum_interval_seconds=spec.sensor.interval_s,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"New {pattern} files in {spec.sensor.inbox} launch {spec.name}.")
    def inbox(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        folder = inbox_folder(loaded)
        if not folder.is_dir():
            return dg.SkipReason(f"inbox {folder} does not exist")
        seen: list[str] = json.loads(context.cursor) if context.cursor else []
        known = set(seen)
        files = sorted((p for p in folder.glob(pattern) if p.is_file()),
                       key=lambda p: p.stat().st_mtime_ns)
        new = [p for p in files if fingerprint(p) not in known]
        if not new:
            return dg.SkipReason(f"no new {pattern} files in {folder}")
        existing = set(context.instance.get_dynamic_partitions(spec.name))
        requests: list[dg.RunRequest] = []
        keys: list[str] = []
        for path in new:
            key = file_partition(path, existing | set(keys))
            keys.append(key)
            # The run reads a copy that never moves: resumes find it, whatever happens to
            # the inbox file (moved to processed/ or failed/ when the run ends).
            snapshot = Path(context.instance.root_directory) / "batch_inbox" / spec.name / key
            snapshot.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, snapshot / path.name)
            requests.append(dg.RunRequest(
                run_key=fingerprint(path), partition_key=key,
                run_config={"resources": {"run_overrides": {"config": {
                    "data": str(snapshot / path.name)}}}},
                tags={"batch/inbox_file": str(path), "batch/launched_by": "sensor"},
            ))
        cursor = json.dumps([*seen, *(fingerprint(p) for p in new)][-SEEN_LIMIT:])
        return dg.SensorResult(run_requests=requests, cursor=cursor,
                               dynamic_partitions_requests=[partitions.build_add_request(keys)])

    return inbox


def file_away(inbox_file: str, succeeded: bool, reason: str | None) -> Path | None:
    """Move a finished run's inbox file to processed/ or failed/ (with a .reason.txt)."""
    source = Path(inbox_file)
    for candidate in (source, source.parent / "failed" / source.name):
        if candidate.exists():
            break
    else:
        return None
    target_dir = source.parent / ("processed" if succeeded else "failed")
    target_dir.mkdir(exist_ok=True)
    target = target_dir / source.name
    if candidate != target:
        shutil.move(str(candidate), target)
    reason_file = source.parent / "failed" / f"{source.name}.reason.txt"
    if succeeded:
        reason_file.unlink(missing_ok=True)
    else:
        reason_file.write_text((reason or "the run failed") + "\n", encoding="utf-8")
    return target
