"""`report` and `export` after-steps: a run's report (html, md: the one `batch-defs report`
draws, with charts), its ledger rows (csv, json, jsonl, parquet; times in ISO 8601), or its
items' final outputs, as files."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from batch_defs.tasks.base import AfterContext, AfterHandler, TaskParams

if TYPE_CHECKING:  # pandas loads when the step runs: every batch file that names one of
    import pandas as pd  # these steps is checked (its handler made) before its first item

Format = Literal["csv", "json", "jsonl", "html", "md", "parquet"]
TIME_COLUMNS = ("started_at", "finished_at")
REPORT_FORMATS = ("html", "md")  # the drawn report; the other formats are the rows


class ReportParams(TaskParams):
    formats: list[Format] = ["csv", "json"]
    output: str = "{partition}/report"  # file stem, relative to the batch's output folder


def iso_times(rows: pd.DataFrame) -> pd.DataFrame:
    """Epoch-second columns as ISO 8601 UTC text (`2026-11-03T09:15:02.125431+00:00`)."""
    import pandas as pd

    rows = rows.copy()
    for column in TIME_COLUMNS:
        if column in rows.columns:
            stamps = pd.to_datetime(rows[column], unit="s", utc=True).dt.round("us")
            rows[column] = [None if pd.isna(t) else t.isoformat() for t in stamps]
    return rows


def write_table(rows: pd.DataFrame, stem: Path, fmt: str, title: str) -> Path:
    path = stem.with_suffix(f".{fmt}")
    if fmt in ("csv", "json", "jsonl"):
        rows = iso_times(rows)
    if fmt == "csv":
        rows.to_csv(path, index=False)
    elif fmt == "json":
        rows.to_json(path, orient="records", indent=2, date_format="iso")
    elif fmt == "jsonl":
        rows.to_json(path, orient="records", lines=True, date_format="iso")
    elif fmt == "parquet":
        rows.to_parquet(path, index=False)
    elif fmt == "md":
        # Raw HTML is live in markdown: partition, keys and errors go in as entities.
        text = rows.map(lambda v: html.escape(v, quote=False) if isinstance(v, str) else v)
        path.write_text(f"# {html.escape(title, quote=False)}\n\n"
                        f"{text.to_markdown(index=False)}\n", encoding="utf-8")
    elif fmt == "html":
        table = rows.to_html(index=False, border=0, classes="items")  # escapes the cells
        title = html.escape(title)
        path.write_text(f"<!doctype html><title>{title}</title><h1>{title}</h1>{table}",
                        encoding="utf-8")
    return path


def write_run_report(rows: pd.DataFrame, ctx: AfterContext, stem: Path, fmt: str) -> Path:
    """The run's report as `batch-defs report` renders it (md: charts as PNGs beside)."""
    from batch_defs.report import render, report_from_rows

    # The after steps run once every item is done and the run is within tolerance.
    report = report_from_rows(ctx.summary, rows, ctx.phases, "COMPLETED")
    path = stem.with_suffix(f".{fmt}")
    path.write_text(render(report, fmt, path), encoding="utf-8")
    return path


def make_handler(params: ReportParams, base_dir: Path) -> AfterHandler:
    from batch_defs.tasks.template import confined_path

    def report(rows: pd.DataFrame, ctx: AfterContext) -> dict[str, Any]:
        stem = confined_path(ctx.output_dir, params.output.format(partition=ctx.partition))
        stem.parent.mkdir(parents=True, exist_ok=True)
        title = f"{ctx.batch} / {ctx.partition}"
        paths = [write_run_report(rows, ctx, stem, fmt) if fmt in REPORT_FORMATS
                 else write_table(rows, stem, fmt, title) for fmt in params.formats]
        return {f"report_{p.suffix[1:]}": str(p) for p in paths}

    return report


class ExportParams(TaskParams):
    formats: list[Format] = ["csv"]
    output: str = "{partition}/export"  # file stem, relative to the batch's output folder
    phase: str | None = None  # whose outputs; default: the batch's last phase


def final_outputs(rows: pd.DataFrame, phase: str) -> pd.DataFrame:
    """One row per item that succeeded in `phase`: its key, then its output's fields
    flattened into columns (nested objects as `a.b`)."""
    import pandas as pd

    done = rows[(rows["phase"] == phase) & (rows["status"] == "succeeded")]
    outputs = [json.loads(text) if text else {} for text in done["output"]]
    table = pd.json_normalize(outputs, sep=".") if outputs else pd.DataFrame()
    keys = list(done["item_key"])
    if "item_key" in table.columns:
        table = table.drop(columns=["item_key"])
    table.insert(0, "item_key", keys)
    return table


def make_export_handler(params: ExportParams, base_dir: Path) -> AfterHandler:
    from batch_defs.tasks.template import confined_path

    def export(rows: pd.DataFrame, ctx: AfterContext) -> dict[str, Any]:
        if not (params.phase or ctx.phases):
            raise ValueError("no phase to export: give the export step a `phase`")
        table = final_outputs(rows, params.phase or ctx.phases[-1])
        stem = confined_path(ctx.output_dir, params.output.format(partition=ctx.partition))
        stem.parent.mkdir(parents=True, exist_ok=True)
        title = f"{ctx.batch} / {ctx.partition}: outputs"
        paths = [write_table(table, stem, fmt, title) for fmt in params.formats]
        return {"exported_items": len(table),
                **{f"export_{p.suffix[1:]}": str(p) for p in paths}}

    return export
