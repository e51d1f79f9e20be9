"""The `export` after-step: the final outputs of the items that made it through, as files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from assets.results import results_asset_key
from batch_defs.tasks import AfterContext, build_after_handler
from resources.storage import BatchStorageResource
from tests.conftest import inline_items, run_batch, write_batch


def nest(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {"meta": {"length": len(item["name"]), "source": "test"}, "tags": ["a", "b"]}


@pytest.mark.job
def test_export_writes_final_outputs_of_succeeded_items(batch_dir: Path,
                                                        instance: dg.DagsterInstance) -> None:
    write_batch(batch_dir, {
        "name": "exported", "source": inline_items(6),
        "phases": [
            {"name": "filter", "task": "python", "params": {"function": "tests.handlers:skip_odd"}},
            {"name": "enrich", "task": "python",
             "params": {"function": "tests.test_task_export:nest"}},
        ],
        "after": [{"task": "export", "params": {"formats": ["csv", "jsonl", "md", "parquet"]}},
                  {"task": "export",
                   "params": {"formats": ["json"], "phase": "filter", "output": "{partition}/f"}}],
    })
    result = run_batch(batch_dir, instance, "exported")
    assert result.success
    folder = BatchStorageResource().output_root(instance, "exported") / "p1"

    table = pd.read_csv(folder / "export.csv")
    assert list(table.columns) == ["item_key", "id", "name", "tags", "meta.length", "meta.source"]
    assert table["item_key"].tolist() == [2, 4, 6]  # odd ids were skipped: not exported
    assert table["meta.length"].tolist() == [6, 6, 6]
    lines = (folder / "export.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"item_key": "2", "id": 2, "name": "item 2", "meta.length": 6,
                                    "meta.source": "test", "tags": ["a", "b"]}
    assert pd.read_parquet(folder / "export.parquet")["tags"].map(list).tolist() == [
        ["a", "b"]] * 3
    markdown = (folder / "export.md").read_text()
    assert markdown.startswith("# exported / p1: outputs\n") and "| item 4 |" in markdown
    # Another phase's outputs on request.
    assert [r["item_key"] for r in json.loads((folder / "f.json").read_text())] == ["2", "4", "6"]
    event = instance.get_latest_materialization_event(results_asset_key("exported"))
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    assert metadata["export_0.exported_items"].value == 3
    assert metadata["export_0.export_csv"].value == str(folder / "export.csv")


@pytest.mark.unit
def test_export_of_an_empty_run_and_a_missing_phase(tmp_path: Path) -> None:
    rows = pd.DataFrame(columns=["item_key", "phase", "status", "output"])
    handler = build_after_handler("export", {"formats": ["csv"]}, tmp_path)
    ctx = AfterContext({}, "b", "p1", "r", {}, tmp_path, tmp_path / "out", phases=["score"])
    produced = handler(rows, ctx)
    assert produced is not None and produced["exported_items"] == 0
    assert Path(produced["export_csv"]).read_text().strip() == "item_key"
    no_phase = AfterContext({}, "b", "p1", "r", {}, tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="give the export step a `phase`"):
        handler(rows, no_phase)
