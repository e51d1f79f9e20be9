"""The results asset of a batch: one materialization per partition with counts and items."""


from typing import Any

import dagster as dg
import pandas as pd

from batch_defs.report import charts_markdown
from batch_defs.spec import BatchSpec
from batch_defs.states import RunState

TABLE_ROWS = 100  # items shown in the asset's metadata; the ledger has them all


def item_table(rows: pd.DataFrame, limit: int = TABLE_ROWS) -> dg.TableMetadataValue:
    """The first items, one row per item and phase, for the Dagster UI."""
    columns = ["item_key", "phase", "status", "attempts", "duration_s", "cost", "error"]
    shown = rows[columns].head(limit)
    schema = dg.TableSchema(columns=[
        dg.TableColumn("item_key", "string"), dg.TableColumn("phase", "string"),
        dg.TableColumn("status", "string"), dg.TableColumn("attempts", "int"),
        dg.TableColumn("duration_s", "float"), dg.TableColumn("cost", "float"),
        dg.TableColumn("error", "string"),
    ])
    records = [
        dg.TableRecord({
            "item_key": str(r.item_key), "phase": str(r.phase), "status": str(r.status),
            "attempts": int(r.attempts), "duration_s": round(float(r.duration_s or 0.0), 4),
            "cost": float(r.cost or 0.0), "error": str(r.error or ""),
        })
        for r in shown.itertuples()
    ]
    return dg.MetadataValue.table(records, schema)


def results_metadata(summary: dict[str, Any], rows: pd.DataFrame,
                     started_at: float | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        key: summary[key] for key in ("items", "succeeded", "failed_items", "invalid", "skipped",
                                      "reused", "duration_s", "items_per_s", "cost", "tokens")
    }
    metadata["per_phase"] = dg.MetadataValue.json(summary["per_phase"])
    metadata["items_table"] = item_table(rows)
    # Data-URI images in markdown: the asset page shows them without a file server.
    metadata["charts"] = dg.MetadataValue.md(charts_markdown(rows, started_at))
    metadata["full_results"] = dg.MetadataValue.text(
        f"batch-defs results {summary['run_id']} --format csv")
    metadata["report"] = dg.MetadataValue.text(
        f"batch-defs report {summary['run_id']} --format html --out "
        f"report-{summary['run_id'][:8]}.html")
    for step, produced in summary.get("after", {}).items():
        for key, value in produced.items():
            metadata[f"{step}.{key}"] = value
    return metadata


def build_results_op(spec: BatchSpec) -> dg.OpDefinition:
    @dg.op(name=f"{spec.name}__results", required_resource_keys={"batch_storage"},
           description="Materializes the partition's results: counts, cost and item rows.")
    def results(context: dg.OpExecutionContext, summary: dict[str, Any]) -> dg.Output[dict]:
        ledger = context.resources.batch_storage.ledger(context.instance)
        rows = ledger.rows(context.run_id, light=True)
        run = ledger.run(context.run_id)
        metadata = results_metadata(summary, rows, run["started_at"] if run else None)
        # The run's last act: only now may the ledger and the tag say succeeded.
        ledger.finish_run(context.run_id, RunState.SUCCEEDED, summary)
        context.instance.add_run_tags(context.run_id,
                                      {"batch/state": RunState.SUCCEEDED.value})
        ledger.release_lease(spec.name, context.partition_key, context.run_id)
        return dg.Output(summary, metadata=metadata)

    return results


def results_asset_key(batch: str) -> dg.AssetKey:
    return dg.AssetKey([batch, "results"])
