"""The fan-out streams: the first chunk's items run while the rest of the source is read."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pydantic import TypeAdapter

import batch_defs.fanout
from batch_defs.sources import RawRecord, record_bound
from batch_defs.spec import SourceSpec
from tests.conftest import inline_items, run_batch, write_batch

pytestmark = pytest.mark.job

SOURCE_WAIT_S = 20.0  # how long the source waits for the first item before it gives up
first_item = threading.Event()
first_item_lock = threading.Lock()
seen: dict[str, Any] = {}


def note_item(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Records the run's item total as the first item saw it, and lets the source go on.
    Two slots may call at once: only the first one records (the other might look after the
    source was counted)."""
    with first_item_lock:
        if not first_item.is_set():
            seen["total_at_first_item"] = ctx.journal.run(ctx.run_id)["total_items"]
            first_item.set()
    return {"ok": True}


def blocking_source(records: int, first_chunk: int) -> Any:
    """A source that gives the first chunk's records, then waits until an item has run,
    then gives the rest, every third of them broken."""

    def read(_spec: Any, _base_dir: Path) -> Iterator[RawRecord]:
        for row in range(1, first_chunk + 1):
            yield RawRecord(row, {"id": row})
        seen["source_waited_out"] = not first_item.wait(SOURCE_WAIT_S)
        for row in range(first_chunk + 1, records + 1):
            yield (RawRecord(row, None, f"broken row {row}") if row % 3 == 0
                   else RawRecord(row, {"id": row}))

    return read


def test_the_first_chunk_runs_before_the_source_is_read(
        batch_dir: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
    first_item.clear()
    seen.clear()
    monkeypatch.setattr(batch_defs.fanout, "read_source", blocking_source(12, 4))
    write_batch(batch_dir, {
        "name": "streamed", "source": inline_items(12),  # 12 items: the bound
        "phases": [{"name": "note", "task": "python",
                    "params": {"function": "tests.test_streaming:note_item"}}],
        "options": {"chunk_size": 4, "concurrency": 2, "tolerated_failures": 3},
    })
    result = run_batch(batch_dir, instance, "streamed")
    from resources.storage import BatchStorageResource

    ledger = BatchStorageResource().ledger(instance)
    rows = ledger.rows(result.run_id)
    assert seen["source_waited_out"] is False  # an item ran while the source was held
    assert seen["total_at_first_item"] == 12  # the bound, while the source is counted
    invalid = rows[rows["status"] == "invalid"]
    assert sorted(invalid["seq"]) == [6, 9, 12]  # every broken row after the first chunk
    assert set(invalid["error"]) == {"row 6: broken row 6", "row 9: broken row 9",
                                     "row 12: broken row 12"}
    assert ledger.run(result.run_id)["total_items"] == 9  # the count replaced the bound
    done = rows[rows["phase"] == "note"]
    assert sorted(done["seq"]) == [1, 2, 3, 4, 5, 7, 8, 10, 11]
    assert set(done["status"]) == {"succeeded"} and result.success


@pytest.mark.unit
def test_record_bound_is_an_upper_bound_known_before_reading(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('id,text\n1,"two\nlines"\n2,x\n\n')
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    def source(**fields: Any) -> Any:
        return TypeAdapter(SourceSpec).validate_python({"key": "id", **fields})

    csv = source(type="csv", path="a.csv")
    jsonl = source(type="jsonl", path="a.jsonl")
    missing = source(type="csv", path="none.csv")
    inline = source(**inline_items(7))
    assert record_bound(csv, tmp_path) >= 2
    assert record_bound(jsonl, tmp_path) >= 2
    assert record_bound(inline, tmp_path) == 7
    assert record_bound(missing, tmp_path) is None


def fail_two(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    if ctx.key == "2":
        raise ValueError("bad 2")
    return {"ok": True}


def test_dependencies_after_streamed_chunks_still_hold_items_back(
        batch_dir: Path, instance: dg.DagsterInstance) -> None:
    # Items 1-4 stream in two chunks; 5 depends on 2 (failed), 6 on 5, 7 on 1: the items
    # from 5 on are one chunk, and the engine still skips the dependants of a failure.
    source = inline_items(7)
    source["items"][4]["depends_on"] = "2"
    source["items"][5]["depends_on"] = "5"
    source["items"][6]["depends_on"] = "1"
    write_batch(batch_dir, {
        "name": "streamed_deps", "source": source,
        "phases": [{"name": "first", "task": "python",
                    "params": {"function": "tests.test_streaming:fail_two"}},
                   {"name": "second", "task": "python",
                    "params": {"function": "tests.test_streaming:fail_two"}}],
        "options": {"chunk_size": 2, "concurrency": 2, "on_error": "continue",
                    "tolerated_failures": 7},
    })
    result = run_batch(batch_dir, instance, "streamed_deps")
    from resources.storage import BatchStorageResource

    rows = BatchStorageResource().ledger(instance).rows(result.run_id)
    first = dict(zip(rows[rows["phase"] == "first"]["item_key"],
                     rows[rows["phase"] == "first"]["status"], strict=True))
    assert first == {"1": "succeeded", "2": "failed", "3": "succeeded", "4": "succeeded",
                     "5": "skipped", "6": "skipped", "7": "succeeded"}
    second = set(rows[rows["phase"] == "second"]["item_key"])
    assert second == {"1", "3", "4", "7"}
    assert result.success
