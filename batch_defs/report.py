"""Run reports from the item ledger: summary, phase analytics, slowest and failed items, charts."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from batch_defs.ledger import FAILURE_STATUSES, SOURCE_PHASE, Ledger
from batch_defs.progress import format_duration
from batch_defs.secrets import mask, register_run_config
from batch_defs.summary import RESULTS_HINT, RunSummary

FORMATS = ("html", "md", "csv", "json")
SLOWEST = 10
FAILED_SHOWN = 100  # failed items listed in html and md; json has them all, `results` too
FAILED_TITLE = "Failed, invalid and rejected items"
THROUGHPUT_BINS = 60
HISTOGRAM_BINS = 30
MIN_BIN_S = 0.25
PHASE_COLUMNS = ["phase", "items", "succeeded", "failed", "invalid", "rejected", "skipped",
                 "reused", "success_rate", "avg_s", "p95_s", "max_s", "cost", "tokens"]


def executed(rows: pd.DataFrame) -> pd.DataFrame:
    """Item-phases this run executed itself (not carried over, not rejected by the source)."""
    return rows[(rows["phase"] != SOURCE_PHASE) & rows["reused_from"].isna()
                & rows["finished_at"].notna()]


def _stats(durations: pd.Series) -> dict[str, float | None]:
    values = durations.dropna().to_numpy(dtype=float)
    if not len(values):
        return {"avg_s": None, "p95_s": None, "max_s": None}
    return {"avg_s": round(float(values.mean()), 6),
            "p95_s": round(float(np.percentile(values, 95)), 6),
            "max_s": round(float(values.max()), 6)}


def phase_analytics(rows: pd.DataFrame, phases: list[str]) -> list[dict[str, Any]]:
    """One row per phase and one for the whole run: counts, success rate, durations, cost.

    Durations count only what this run executed; counts, cost and tokens cover every row, as
    the run's summary does (rows carried over from earlier runs keep what they cost).
    """
    ran = executed(rows)
    names = ([SOURCE_PHASE] if (rows["phase"] == SOURCE_PHASE).any() else []) + list(phases)
    table = []
    for phase in [*names, None]:
        part = rows if phase is None else rows[rows["phase"] == phase]
        counts = part["status"].value_counts()
        total = len(part)
        table.append({
            "phase": phase or "all",
            "items": total,
            **{s: int(counts.get(s, 0))
               for s in ("succeeded", "failed", "skipped", "rejected", "invalid")},
            "reused": int(part["reused_from"].notna().sum()),
            "success_rate": round(int(counts.get("succeeded", 0)) / total, 4) if total else None,
            **_stats((ran if phase is None else ran[ran["phase"] == phase])["duration_s"]),
            "cost": round(float(part["cost"].sum()), 6),
            "tokens": int(part["tokens"].sum()),
        })
    return table


def _item_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"item_key": str(r.item_key), "phase": str(r.phase), "status": str(r.status),
             "attempts": int(r.attempts),
             "duration_s": None if pd.isna(r.duration_s) else round(float(r.duration_s), 6),
             "error": None if pd.isna(r.error) else str(r.error)}
            for r in frame.itertuples()]


def throughput_series(rows: pd.DataFrame, started_at: float | None = None,
                      bins: int = THROUGHPUT_BINS) -> dict[str, Any]:
    """Item-phases finished per second in time bins since the run started, per phase.

    Binned with numpy, so the cost does not grow with the number of items beyond one pass.
    Bins are at least MIN_BIN_S wide: rates over shorter spans are noise.
    """
    ran = executed(rows)
    if ran.empty:
        return {"edges_s": [], "per_phase": {}}
    finished = ran["finished_at"].to_numpy(dtype=float)
    start = float(started_at) if started_at else float(ran["started_at"].min())
    span = max(float(finished.max()) - start, 1e-3)
    width = max(span / bins, MIN_BIN_S)
    edges = np.arange(0.0, span, width)
    # arange may end a hair below span (float steps): that bin would have no width.
    edges = np.append(edges[edges < span - width * 1e-6], span)
    lengths = np.diff(edges)
    per_phase = {}
    for phase in ran["phase"].unique():
        counts, _ = np.histogram(finished[(ran["phase"] == phase).to_numpy()] - start, edges)
        per_phase[str(phase)] = [round(float(c), 3) for c in counts / lengths]
    return {"edges_s": [round(float(e), 3) for e in edges], "per_phase": per_phase}


def duration_histogram(rows: pd.DataFrame, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """How many item-phases took how long, per phase, on shared bin edges."""
    ran = executed(rows)
    durations = ran["duration_s"].to_numpy(dtype=float)
    durations = durations[~np.isnan(durations)]
    if not len(durations):
        return {"edges_s": [], "per_phase": {}}
    edges = np.linspace(0.0, max(float(durations.max()), 1e-3), bins + 1)
    per_phase = {}
    for phase in ran["phase"].unique():
        values = ran.loc[ran["phase"] == phase, "duration_s"].to_numpy(dtype=float)
        counts, _ = np.histogram(values[~np.isnan(values)], edges)
        per_phase[str(phase)] = [int(c) for c in counts]
    return {"edges_s": [round(float(e), 5) for e in edges], "per_phase": per_phase}


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    # The object API with the Agg canvas: no pyplot state, no GUI backend, thread-safe enough
    # for an op's thread, and it skips pyplot's import cost.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 2.8), dpi=90)
    # Fixed margins that fit the titles and tick labels: tight_layout measured every text
    # and took half of each chart's time (every run renders two).
    figure.subplots_adjust(left=0.085, right=0.985, top=0.9, bottom=0.17)
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel, fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.tick_params(labelsize=8)
    axes.grid(alpha=0.3)
    return figure, axes


def _png(figure: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def throughput_png(series: dict[str, Any]) -> bytes | None:
    if not series["per_phase"]:
        return None
    figure, axes = _figure("Throughput", "seconds since the run started", "items/s")
    for phase, rates in series["per_phase"].items():
        axes.stairs(rates, series["edges_s"], label=phase, linewidth=1.5)
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=8)
    return _png(figure)


def durations_png(histogram: dict[str, Any]) -> bytes | None:
    if not histogram["per_phase"]:
        return None
    figure, axes = _figure("Item durations", "seconds", "item-phases")
    edges = np.asarray(histogram["edges_s"])
    for phase, counts in histogram["per_phase"].items():
        axes.stairs(counts, edges, label=phase, fill=True, alpha=0.45)
    axes.legend(fontsize=8)
    return _png(figure)


def prepare_charts() -> None:
    """Load the chart library and its fonts by drawing a blank chart: the first chart of a
    process costs about 0.5 s more than the next ones."""
    _png(_figure("", "", "")[0])


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def charts_markdown(rows: pd.DataFrame, started_at: float | None = None) -> str:
    """Both charts as markdown images with data URIs, for the results asset's metadata."""
    parts = []
    throughput = throughput_png(throughput_series(rows, started_at))
    if throughput:
        parts.append(f"![throughput]({data_uri(throughput)})")
    durations = durations_png(duration_histogram(rows))
    if durations:
        parts.append(f"![durations]({data_uri(durations)})")
    return "\n\n".join(parts) or "no items executed in this run"


def build_report(instance: Any, ledger: Ledger, run_id: str) -> dict[str, Any]:
    """Everything a report shows, as plain data (charts as their binned series)."""
    from batch_defs.watch import run_report

    # This process may not have run the batch: its resources' secrets come from the run.
    dagster_run = instance.get_run_by_id(run_id)
    register_run_config(dagster_run.run_config if dagster_run else None)
    report = run_report(instance, ledger, run_id)
    run = ledger.run(run_id)
    rows = ledger.rows(run_id)
    phases = run["phases"] if run else [p for p in rows["phase"].unique() if p != SOURCE_PHASE]
    return masked(with_analytics(report, rows, phases, run["started_at"] if run else None))


def report_from_rows(summary: Mapping[str, Any], rows: pd.DataFrame, phases: list[str],
                     status: str) -> dict[str, Any]:
    """The same report from a run's summary and rows, where no instance is at hand (the
    `report` after step, which runs before the run has ended: `status` says how far it is)."""
    typed = RunSummary.model_validate(summary)
    report = {**typed.as_dict(), "status": status, "state": "running", "files": {},
              "step_failures": []}
    started = typed.started_at.timestamp() if typed.started_at else None
    return masked(with_analytics(report, rows, phases, started))


def with_analytics(report: dict[str, Any], rows: pd.DataFrame, phases: list[str],
                   started_at: float | None) -> dict[str, Any]:
    ran = executed(rows)
    failed = rows[rows["status"].isin(FAILURE_STATUSES)]
    report.update({
        "phases": phase_analytics(rows, phases),
        "executed_item_phases": len(ran),
        "slowest": _item_rows(ran.sort_values("duration_s", ascending=False).head(SLOWEST)),
        "failures": _item_rows(failed),  # every one (the summary's are the first ten)
        "throughput": throughput_series(rows, started_at),
        "durations": duration_histogram(rows),
    })
    return report


def masked(value: Any) -> Any:
    """Every text in a report with the known secrets as `***` (errors, stop reasons, step
    failures from Dagster's event log: rows written before masking existed, too)."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {key: masked(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    return value


def render(report: dict[str, Any], fmt: str, out: Path | None = None) -> str:
    """The report as text in `fmt`; md written to `out` gets its charts as PNG files beside."""
    if fmt == "json":
        return json.dumps(report, indent=2, default=str) + "\n"
    if fmt == "csv":
        return render_csv(report)
    if fmt == "md":
        return render_md(report, out)
    if fmt == "html":
        return render_html(report)
    raise ValueError(f"unknown report format {fmt!r}; one of {', '.join(FORMATS)}")


def write_report(report: dict[str, Any], fmt: str, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report, fmt, out), encoding="utf-8")
    return out


def render_csv(report: dict[str, Any]) -> str:
    """The per-phase analytics table (item rows: `batch-defs results RUN --format csv`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PHASE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report.get("phases", []):
        writer.writerow({k: "" if row[k] is None else row[k] for k in PHASE_COLUMNS})
    return buffer.getvalue()


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.3g} ms"
    return f"{value:.2f} s" if value < 100 else format_duration(value)


def _rate(value: Any) -> str:
    return "-" if value is None else f"{value:.1%}"


def summary_pairs(report: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = [("run", report["run_id"]),
             ("batch / partition", f"{report.get('batch') or report.get('job')} / "
                                   f"{report.get('partition') or '-'}"),
             ("status", report["status"] + (f" ({report['state']})" if report.get("state")
                                             in ("paused", "canceled") else ""))]
    if "items" in report:
        summary = RunSummary.model_validate(report)
        pairs += [
            ("items", summary.counts_line()),
            ("executed item-phases", f"{report['executed_item_phases']} "
                                     f"({summary.reused} rows reused from earlier runs)"),
            ("duration", f"{summary.duration_s:.1f} s"),
            ("throughput", f"{summary.items_per_s:.1f} items/s"),
            ("cost", summary.cost_line()),
        ]
        if summary.tolerated_failures is not None:
            pairs.append(("tolerated failures", f"{summary.tolerated_failures} (failed + "
                                                f"invalid + rejected: "
                                                f"{summary.counted_failures})"))
    if report.get("stop_reason"):
        pairs.append(("stopped", report["stop_reason"]))
    pairs += [(name, str(path)) for name, path in report.get("files", {}).items()]
    return pairs


def _phase_cells(row: dict[str, Any]) -> list[str]:
    return [row["phase"], str(row["items"]),
            *(str(row[s]) for s in ("succeeded", "failed", "invalid", "rejected", "skipped")),
            _rate(row["success_rate"]), _seconds(row["avg_s"]), _seconds(row["p95_s"]),
            f"{row['cost']:.6g}", str(row["tokens"])]


PHASE_HEADER = ["phase", "rows", "succeeded", "failed", "invalid", "rejected", "skipped",
                "success rate", "avg", "p95", "cost", "tokens"]
ITEM_HEADER = ["item", "phase", "status", "attempts", "duration", "error"]


def _item_cells(row: dict[str, Any]) -> list[str]:
    return [row["item_key"], row["phase"], row["status"], str(row["attempts"]),
            _seconds(row["duration_s"]), row["error"] or ""]


def md_text(text: str) -> str:
    """Text for markdown, where raw HTML is live: `<`, `>` and `&` as entities (which
    markdown shows as the characters themselves)."""
    return html.escape(str(text), quote=False)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return md_text(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _title(report: dict[str, Any]) -> str:
    return (f"Batch {report.get('batch') or report.get('job')} / "
            f"{report.get('partition') or '-'}: run {report['run_id'][:8]}")


def render_md(report: dict[str, Any], out: Path | None = None) -> str:
    parts = [f"# {md_text(_title(report))}", "",
             _md_table(["", ""], [[k, v] for k, v in summary_pairs(report)])]
    if report.get("phases"):
        parts += ["", "## Phases", "",
                  _md_table(PHASE_HEADER, [_phase_cells(r) for r in report["phases"]])]
    # What went wrong comes before the figures.
    parts += _md_items(FAILED_TITLE, report.get("failures", []), FAILED_SHOWN, report["run_id"])
    if out is not None:
        images = {"throughput": throughput_png(report["throughput"]),
                  "durations": durations_png(report["durations"])}
        written = []
        for name, png in images.items():
            if png:
                path = out.with_name(f"{out.stem}.{name}.png")
                path.write_bytes(png)
                written.append(f"![{name}]({path.name})")
        if written:
            parts += ["", "## Charts", "", *written]
    parts += _md_items("Slowest items", report.get("slowest", []), SLOWEST)
    if report.get("step_failures"):
        parts += ["", "## Failed steps", "",
                  _md_table(["step", "error"],
                            [[f["step"], f["error"]] for f in report["step_failures"]])]
    return "\n".join(parts) + "\n"


def _md_items(title: str, rows: list[dict[str, Any]], limit: int,
              run_id: str | None = None) -> list[str]:
    if not rows:
        return []
    parts = ["", f"## {title} ({len(rows)})", "",
             _md_table(ITEM_HEADER, [_item_cells(r) for r in rows[:limit]])]
    if run_id:
        shown = f"The first {limit} of {len(rows)}; all" if len(rows) > limit else "All"
        parts += ["", f"{shown} of them: `{RESULTS_HINT.format(run_id=run_id)}`"]
    return parts


STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#1d2330;max-width:70rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;font-size:.9rem}td,th{border-bottom:1px solid #dde;
padding:.25rem .7rem;text-align:left;vertical-align:top}th{background:#f3f4f8}
td.num{text-align:right}.status-SUCCESS{color:#137333}.status-FAILURE{color:#b3261e}
img{max-width:100%;display:block;margin:.5rem 0}.error{color:#b3261e;white-space:pre-wrap}
"""


def _html_table(header: list[str], rows: list[list[str]], error_column: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for index, value in enumerate(row):
            css = ' class="error"' if index == error_column else ""
            cells.append(f"<td{css}>{html.escape(value)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def css_token(text: str) -> str:
    """Letters, digits, `-` and `_` only: safe inside a quoted class attribute."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in text)


def _html_items(title: str, rows: list[dict[str, Any]], limit: int,
                run_id: str | None = None) -> list[str]:
    if not rows:
        return []
    parts = [f"<h2>{title} ({len(rows)})</h2>",
             _html_table(ITEM_HEADER, [_item_cells(r) for r in rows[:limit]], 5)]
    if run_id:
        shown = f"The first {limit} of {len(rows)}; all" if len(rows) > limit else "All"
        hint = html.escape(RESULTS_HINT.format(run_id=run_id))
        parts.append(f"<p>{shown} of them: <code>{hint}</code></p>")
    return parts


def render_html(report: dict[str, Any]) -> str:
    """One self-contained page: charts are PNGs inlined as data URIs."""
    title = html.escape(_title(report))
    status_class = f' class="status-{css_token(report["status"])}"'
    summary = "".join(
        f"<tr><th>{html.escape(k)}</th><td{status_class if k == 'status' else ''}>"
        f"{html.escape(v)}</td></tr>" for k, v in summary_pairs(report))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
             f"<style>{STYLE}</style></head><body>", f"<h1>{title}</h1>",
             f"<table class='summary'>{summary}</table>"]
    if report.get("phases"):
        parts += ["<h2>Phases</h2>",
                  _html_table(PHASE_HEADER, [_phase_cells(r) for r in report["phases"]])]
    parts += _html_items(FAILED_TITLE, report.get("failures", []), FAILED_SHOWN,
                         report["run_id"])
    charts = [(name, png) for name, png in (
        ("throughput", throughput_png(report["throughput"])),
        ("durations", durations_png(report["durations"]))) if png]
    if charts:
        parts.append("<h2>Charts</h2>")
        parts += [f"<img alt='{name}' src='{data_uri(png)}'>" for name, png in charts]
    parts += _html_items("Slowest items", report.get("slowest", []), SLOWEST)
    if report.get("step_failures"):
        parts += ["<h2>Failed steps</h2>",
                  _html_table(["step", "error"], [[f["step"], f["error"]]
                                                  for f in report["step_failures"]], 1)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
