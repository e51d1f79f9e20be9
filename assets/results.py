"""The results asset of a batch: its record of a run's items in Dagster, whatever the outcome.

A run that succeeds materializes `<batch>/results` for its partition; one that fails, pauses
or is canceled records the same metadata as an observation of it. Either way the metadata has
the counts (one vocabulary: batch_defs.summary), per-phase counts, the failed, invalid and
rejected items first, the command that lists them all, and the charts; and each phase's
quality is an asset check that goes red when its failures put the run beyond tolerance.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dagster as dg

from batch_defs.ledger import SOURCE_PHASE, Ledger
from batch_defs.spec import BatchSpec
from batch_defs.states import FAILURE_STATUSES, RunState
from batch_defs.summary import OUTCOMES, PhaseCounts, RunSummary

# pandas and the charts load in the results step, not before the first item. The annotations
# naming pandas are quoted rather than postponed module-wide: Dagster rejects an op whose
# `context` annotation is a string.
if TYPE_CHECKING:
    import pandas as pd

TABLE_ROWS = 100  # items shown in the asset's metadata; the ledger has them all
SOURCE_CHECK = "source_items"  # phase checks are PHASE_quality: no phase name gives this
COLUMNS = ["item_key", "phase", "status", "attempts", "duration_s", "cost", "error"]
FAILURES_SHOWN = 10  # a phase check's first failures


@dataclass(frozen=True)
class ResultRows:
    """What the results asset reads of a run's rows, bounded however many the run has: the
    rows its tables show (every phase's first failing ones, the first others) and the
    timings its charts bin (five columns of each executed row)."""

    shown: "pd.DataFrame"
    timings: "pd.DataFrame"


def read_result_rows(ledger: Ledger, run_id: str) -> ResultRows:
    return ResultRows(ledger.shown_rows(run_id, COLUMNS, failing_per_phase=TABLE_ROWS,
                                        others=TABLE_ROWS),
                      ledger.executed_timings(run_id))


def results_asset_key(batch: str) -> dg.AssetKey:
    return dg.AssetKey([batch, "results"])


def phase_check_name(phase: str) -> str:
    return SOURCE_CHECK if phase == SOURCE_PHASE else f"{phase}_quality"


def check_specs(spec: BatchSpec) -> list[dg.AssetCheckSpec]:
    """Per-phase quality checks of the results asset (and the source's invalid items)."""
    key = results_asset_key(spec.name)
    checks = [dg.AssetCheckSpec(SOURCE_CHECK, asset=key,
                                description="Invalid source items, against tolerated_failures.")]
    checks += [dg.AssetCheckSpec(phase_check_name(p.name), asset=key,
                                 description=f"Phase {p.name}: success rate, failed and "
                                             "rejected items, against tolerated_failures.")
               for p in spec.phases]
    return checks


def failures_first(rows: "pd.DataFrame") -> "pd.DataFrame":
    """Failed, invalid and rejected rows first (source order within), then the others."""
    import pandas as pd

    failing = rows["status"].isin(FAILURE_STATUSES)
    return pd.concat([rows[failing], rows[~failing]])


def item_table(rows: "pd.DataFrame", limit: int = TABLE_ROWS) -> dg.TableMetadataValue:
    """The first items, failures first, one row per item and phase, for the Dagster UI."""
    import pandas as pd

    shown = failures_first(rows)[COLUMNS].head(limit)
    schema = dg.TableSchema(columns=[
        dg.TableColumn("item_key", "string"), dg.TableColumn("phase", "string"),
        dg.TableColumn("status", "string"), dg.TableColumn("attempts", "int"),
        dg.TableColumn("duration_s", "float"), dg.TableColumn("cost", "float"),
        dg.TableColumn("error", "string"),
    ])
    records = [
        dg.TableRecord({
            "item_key": str(r.item_key), "phase": str(r.phase), "status": str(r.status),
            "attempts": int(r.attempts),
            "duration_s": 0.0 if pd.isna(r.duration_s) else round(float(r.duration_s), 4),
            "cost": 0.0 if pd.isna(r.cost) else float(r.cost),
            "error": "" if r.error is None or pd.isna(r.error) else str(r.error),
        })
        for r in shown.itertuples()
    ]
    return dg.MetadataValue.table(records, schema)


def results_metadata(summary: RunSummary, rows: ResultRows,
                     started_at: float | None = None, state: RunState | None = None
                     ) -> dict[str, Any]:
    from batch_defs.report import charts_markdown

    metadata: dict[str, Any] = {}
    if state is not None:
        metadata["state"] = state.value
    metadata["items"] = summary.items
    metadata.update({name: getattr(summary, name) for name in OUTCOMES
                     if name != "pending" or summary.pending})
    if summary.tolerated_failures is not None:
        metadata["tolerated_failures"] = summary.tolerated_failures
    if summary.stop_reason:
        metadata["stopped"] = dg.MetadataValue.text(summary.stop_reason)
    # Failures first, and the command for all of them, before the figures.
    metadata["items_table"] = item_table(rows.shown)
    metadata["all_failures"] = dg.MetadataValue.text(summary.results_hint())
    metadata["per_phase"] = dg.MetadataValue.json(
        {phase: counts.model_dump() for phase, counts in summary.per_phase.items()})
    metadata.update({"reused": summary.reused, "duration_s": summary.duration_s,
                     "items_per_s": summary.items_per_s, "cost": summary.cost,
                     "tokens": summary.tokens, "run_cost": summary.run_cost,
                     "run_tokens": summary.run_tokens})
    # Data-URI images in markdown: the asset page shows them without a file server.
    metadata["charts"] = dg.MetadataValue.md(charts_markdown(rows.timings, started_at))
    metadata["full_results"] = dg.MetadataValue.text(
        f"batch-defs results {summary.run_id} --format csv")
    metadata["report"] = dg.MetadataValue.text(
        f"batch-defs report {summary.run_id} --format html --out "
        f"report-{summary.run_id[:8]}.html")
    for step, produced in summary.after.items():
        for key, value in produced.items():
            metadata[f"{step}.{key}"] = value
    return metadata


def phase_checks(summary: RunSummary, phases: list[str], shown: "pd.DataFrame",
                 ) -> list[tuple[str, bool, dict[str, Any]]]:
    """(check name, passed, metadata) per phase: a phase fails its check when it has failed
    or rejected items (invalid ones, for the source) and the run is beyond tolerance.
    `shown` holds at least each phase's first FAILURES_SHOWN failing rows."""
    beyond = not summary.within_tolerance
    checks = []
    for phase in [SOURCE_PHASE, *phases]:
        counts = summary.per_phase.get(phase) or PhaseCounts()
        bad = counts.failed + counts.rejected + counts.invalid
        part = shown[(shown["phase"] == phase) & shown["status"].isin(FAILURE_STATUSES)]
        rate = counts.success_rate
        metadata: dict[str, Any] = {
            "success_rate": 1.0 if rate is None else rate,
            **{name: getattr(counts, name) for name in OUTCOMES},
            "tolerated_failures": summary.tolerated_failures or 0,
            "run_failures": summary.counted_failures,
            "first_failures": dg.MetadataValue.text(failure_lines(part, bad)),
            "all_failures": dg.MetadataValue.text(summary.results_hint()),
        }
        checks.append((phase_check_name(phase), not (beyond and bad), metadata))
    return checks


def failure_lines(rows: "pd.DataFrame", total: int, shown: int = FAILURES_SHOWN) -> str:
    """`3 (failed, 1 attempts): ValueError: bad record 3; ...`: shown whole in the UI. `rows`
    are the first failing rows, `total` how many there are in all."""
    if rows.empty:
        return "none"
    lines = [f"{r.item_key} ({r.status}, {int(r.attempts)} attempts): {r.error or ''}"
             for r in rows.head(shown).itertuples()]
    if total > shown:
        lines.append(f"... {total - shown} more")
    return "; ".join(lines)


def check_evaluations(summary: RunSummary, phases: list[str], rows: ResultRows,
                      partition: str | None) -> list[dg.AssetCheckEvaluation]:
    key = results_asset_key(summary.batch or "")
    return [dg.AssetCheckEvaluation(asset_key=key, check_name=name, passed=passed,
                                    metadata=metadata, partition=partition,
                                    severity=dg.AssetCheckSeverity.ERROR,
                                    description=None if passed else
                                    "failures beyond tolerated_failures")
            for name, passed, metadata in phase_checks(summary, phases, rows.shown)]


def record_run(instance: dg.DagsterInstance, summary: RunSummary, phases: list[str],
               rows: ResultRows, started_at: float | None, state: RunState) -> None:
    """A run that did not materialize its results (failed, paused, canceled) still leaves
    its record on the asset: an observation with the results metadata, and the checks.

    Reported straight to the instance: events an op logs are only written when it yields,
    and these steps end by raising."""
    key = results_asset_key(summary.batch or "")
    instance.report_runless_asset_event(dg.AssetObservation(
        asset_key=key, partition=summary.partition,
        description=f"run {summary.run_id[:8]} {state.value}: {summary.counts_line()}",
        metadata={"run_id": summary.run_id,
                  **results_metadata(summary, rows, started_at, state)}))
    for evaluation in check_evaluations(summary, phases, rows, summary.partition):
        instance.report_runless_asset_event(evaluation)


def build_results_op(spec: BatchSpec) -> dg.OpDefinition:
    checks = {check.get_python_identifier(): check for check in check_specs(spec)}

    @dg.op(name=f"{spec.name}__results", required_resource_keys={"batch_storage"},
           out={"result": dg.Out(dict),
                **{name: dg.Out(is_required=False) for name in checks}},
           description="Materializes the partition's results: counts, cost and item rows; "
                       "evaluates each phase's quality check.")
    def results(context: dg.OpExecutionContext, summary: dict[str, Any]) -> Any:
        ledger = context.resources.batch_storage.ledger(context.instance)
        rows = read_result_rows(ledger, context.run_id)
        run = ledger.run(context.run_id)
        typed = RunSummary.model_validate(summary)
        metadata = results_metadata(typed, rows, run["started_at"] if run else None,
                                    RunState.SUCCEEDED)
        # The run's last act: only now may the ledger and the tag say succeeded.
        ledger.finish_run(context.run_id, RunState.SUCCEEDED, summary)
        context.instance.add_run_tags(context.run_id,
                                      {"batch/state": RunState.SUCCEEDED.value})
        ledger.release_lease(spec.name, context.partition_key, context.run_id)
        yield dg.Output(summary, output_name="result", metadata=metadata)
        phases = [p.name for p in spec.phases]
        for name, passed, check_metadata in phase_checks(typed, phases, rows.shown):
            yield dg.AssetCheckResult(asset_key=results_asset_key(spec.name),
                                      check_name=name, passed=passed, metadata=check_metadata,
                                      severity=dg.AssetCheckSeverity.ERROR)

    return results
