"""Reports, charts, the progress switch and partition history, from real runs and the CLI."""

from __future__ import annotations

import base64
import csv
import html.parser
import io
import json
import re
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from batch_defs.report import (
    build_report,
    charts_markdown,
    duration_histogram,
    phase_analytics,
    render,
    throughput_series,
    write_report,
)
from resources.storage import BatchStorageResource
from tests.conftest import cli, inline_items, run_batch, start_cli, write_batch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pngs_in(text: str) -> list[bytes]:
    """The PNG images inlined as data URIs in markdown or HTML."""
    return [base64.b64decode(data) for data in
            re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)]


def ledger_rows(n: int, phases: tuple[str, ...] = ("score", "publish"),
                seconds: float = 60.0) -> pd.DataFrame:
    """Synthetic ledger rows as Ledger.rows returns them: n items through every phase."""
    rng = np.random.default_rng(7)
    frames = []
    for index, phase in enumerate(phases):
        durations = rng.exponential(0.05, n)
        finished = 1000.0 + index * seconds / 2 + np.sort(rng.uniform(0, seconds / 2, n))
        status = np.where(np.arange(n) % 50 == 0, "failed", "succeeded") if index == 0 \
            else np.full(n, "succeeded")
        frames.append(pd.DataFrame({
            "batch": "b", "partition": "p", "run_id": "r", "phase": phase,
            "item_key": [str(i) for i in range(n)], "seq": np.arange(n), "status": status,
            "attempts": 1, "input": None, "output": None,
            "error": [("ValueError: bad" if s == "failed" else None) for s in status],
            "attempt_log": None, "started_at": finished - durations, "finished_at": finished,
            "duration_s": durations, "cost": 0.001, "tokens": 10, "reused_from": None,
        }))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.unit
def test_phase_analytics_rates_percentiles_and_reused_rows() -> None:
    rows = ledger_rows(100)
    rows.loc[rows.index[:10], "reused_from"] = "earlier-run"  # carried over: not timed here
    table = {r["phase"]: r for r in phase_analytics(rows, ["score", "publish"])}
    assert list(table) == ["score", "publish", "all"]
    score = table["score"]
    assert (score["items"], score["succeeded"], score["failed"], score["reused"]) == (100, 98, 2,
                                                                                     10)
    assert score["success_rate"] == 0.98
    timed = rows[(rows["phase"] == "score") & rows["reused_from"].isna()]["duration_s"]
    assert score["avg_s"] == pytest.approx(timed.mean(), abs=1e-6)
    assert score["p95_s"] == pytest.approx(np.percentile(timed, 95), abs=1e-6)
    assert table["all"]["items"] == 200 and table["all"]["cost"] == pytest.approx(0.2)
    assert table["all"]["tokens"] == 2000


@pytest.mark.unit
def test_throughput_and_duration_bins_account_for_every_executed_row() -> None:
    rows = ledger_rows(1000, seconds=60.0)
    series = throughput_series(rows, started_at=1000.0)
    widths = np.diff(series["edges_s"])
    assert len(widths) == 60 and widths.max() == pytest.approx(1.0, abs=0.01)
    for phase in ("score", "publish"):
        # rate x bin width summed over bins gives back the items finished in that phase
        assert float(np.dot(series["per_phase"][phase], widths)) == pytest.approx(1000, abs=1)
    # score finishes in the first half of the run, publish in the second
    assert sum(series["per_phase"]["score"][30:]) == 0
    assert sum(series["per_phase"]["publish"][:30]) == 0
    histogram = duration_histogram(rows)
    assert histogram["edges_s"][0] == 0.0
    assert histogram["edges_s"][-1] == pytest.approx(rows["duration_s"].max(), abs=1e-4)
    assert {p: sum(c) for p, c in histogram["per_phase"].items()} == {"score": 1000,
                                                                        "publish": 1000}
    short = throughput_series(ledger_rows(10, seconds=0.1), started_at=1000.0)
    assert len(short["edges_s"]) == 2  # one bin: rates over milliseconds would be noise


@pytest.mark.unit
def test_charts_for_50000_items_are_cheap_png_images() -> None:
    rows = ledger_rows(50_000, seconds=600.0)
    charts_markdown(rows.head(100), 1000.0)  # imports matplotlib, as an earlier run would have
    # CPU time of this thread, not wall time: what the charts cost, however loaded the machine.
    started = time.thread_time()
    markdown = charts_markdown(rows, 1000.0)
    cpu_s = time.thread_time() - started
    images = pngs_in(markdown)
    assert markdown.startswith("![throughput](data:image/png;base64,")
    assert len(images) == 2 and all(image.startswith(PNG_SIGNATURE) for image in images)
    assert all(len(image) < 120_000 for image in images)
    assert cpu_s < 1.5, f"charts for 100,000 item-phases took {cpu_s:.2f}s of CPU"


def scoring_batch(batch_dir: Path, fail_keys: list[int], tolerated: int = 5) -> None:
    write_batch(batch_dir, {
        "name": "scoring",
        "source": inline_items(30),
        "phases": [
            {"name": "score", "task": "python",
             "params": {"function": "tests.handlers:fail_listed", "fail_keys": fail_keys}},
            {"name": "price", "task": "python", "params": {"function": "tests.handlers:priced"}},
        ],
        "options": {"concurrency": 3, "on_error": "continue", "tolerated_failures": tolerated},
    })


@pytest.mark.job
def test_report_of_a_run_with_failures_in_every_format(batch_dir: Path, tmp_path: Path,
                                                       instance: dg.DagsterInstance) -> None:
    scoring_batch(batch_dir, fail_keys=[4, 11])
    result = run_batch(batch_dir, instance, "scoring", "2026-11")
    assert result.success
    ledger = BatchStorageResource().ledger(instance)
    report = build_report(instance, ledger, result.run_id)

    assert (report["status"], report["items"], report["succeeded"]) == ("SUCCESS", 30, 28)
    assert report["cost"] == pytest.approx(28 * 0.25) and report["tokens"] == 2800
    phases = {p["phase"]: p for p in report["phases"]}
    assert (phases["score"]["failed"], phases["score"]["success_rate"]) == (2, 0.9333)
    assert (phases["price"]["items"], phases["price"]["cost"]) == (28, 7.0)
    timed = ledger.rows(result.run_id)["duration_s"]
    assert phases["all"]["avg_s"] == pytest.approx(timed.mean(), abs=1e-6)
    assert phases["all"]["p95_s"] == pytest.approx(np.percentile(timed, 95), abs=1e-6)
    assert phases["all"]["max_s"] == pytest.approx(timed.max(), abs=1e-6)
    assert [(f["item_key"], f["error"]) for f in report["failures"]] == [
        ("4", "ValueError: bad record 4"), ("11", "ValueError: bad record 11")]
    durations = [s["duration_s"] for s in report["slowest"]]
    assert len(durations) == 10 and durations == sorted(durations, reverse=True)
    assert report["executed_item_phases"] == 58
    assert sum(map(sum, report["durations"]["per_phase"].values())) == 58

    page = render(report, "html")
    assert "<h2>Failed, invalid and rejected items (2)</h2>" in page
    assert "ValueError: bad record 11" in page
    assert "success rate" in page and "93.3%" in page
    assert [image[:8] for image in pngs_in(page)] == [PNG_SIGNATURE, PNG_SIGNATURE]

    markdown = write_report(report, "md", tmp_path / "out" / "march.md").read_text()
    assert "| score | 30 | 28 | 2 | 0 | 0 | 0 | 93.3% |" in markdown
    assert "![throughput](march.throughput.png)" in markdown
    assert (tmp_path / "out" / "march.durations.png").read_bytes().startswith(PNG_SIGNATURE)

    table = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert [r["phase"] for r in table] == ["score", "price", "all"]
    assert (table[0]["failed"], table[1]["cost"], table[2]["items"]) == ("2", "7.0", "58")

    as_json = json.loads(render(report, "json"))
    assert as_json["run_id"] == result.run_id and len(as_json["failures"]) == 2
    assert (as_json["failed"], as_json["invalid"], as_json["rejected"]) == (2, 0, 0)


@pytest.mark.job
def test_results_asset_shows_charts_and_report_command(batch_dir: Path,
                                                       instance: dg.DagsterInstance) -> None:
    scoring_batch(batch_dir, fail_keys=[7])
    result = run_batch(batch_dir, instance, "scoring", "2026-11")
    assert result.success
    event = instance.get_latest_materialization_event(dg.AssetKey(["scoring", "results"]))
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    charts = metadata["charts"]
    assert isinstance(charts, dg.MarkdownMetadataValue)
    assert [image[:8] for image in pngs_in(charts.value)] == [PNG_SIGNATURE, PNG_SIGNATURE]
    assert metadata["report"].value == (f"batch-defs report {result.run_id} --format html "
                                        f"--out report-{result.run_id[:8]}.html")
    assert metadata["failed"].value == 1
    table = metadata["items_table"].value
    first = table.records[0].data
    assert (first["item_key"], first["status"], first["error"]) == ("7", "failed",
                                                                    "ValueError: bad record 7")
    assert all(r.data["error"] == "" for r in table.records[1:])  # no "nan" for succeeded rows
    assert metadata["all_failures"].value == (f"batch-defs results {result.run_id} "
                                              "--status failed,invalid,rejected")


@pytest.mark.job
def test_progress_switch_is_read_when_the_run_executes(batch_dir: Path,
                                                       instance: dg.DagsterInstance,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    scoring_batch(batch_dir, fail_keys=[])
    monkeypatch.setenv("BATCH_DEFS_PROGRESS", "0")
    quiet = run_batch(batch_dir, instance, "scoring", "off")
    monkeypatch.delenv("BATCH_DEFS_PROGRESS")
    loud = run_batch(batch_dir, instance, "scoring", "on")
    assert quiet.success and loud.success

    def progress_lines(run_id: str) -> list[str]:
        return [r.user_message for r in instance.all_logs(run_id)
                if r.user_message.startswith("progress ")]

    def progress_tag(run_id: str) -> str:
        run = instance.get_run_by_id(run_id)
        assert run is not None
        return run.tags["batch/progress"]

    # fan-out's initial tag stays; no publish after it, no progress line in the logs
    assert progress_tag(quiet.run_id) == "0/30 done (0%), 0 failed"
    assert progress_lines(quiet.run_id) == []
    assert progress_tag(loud.run_id).startswith("30/30 done (100%), 0 failed, ")
    assert progress_lines(loud.run_id)[-1].startswith("progress 30/30 done (100%), 0 failed")


@pytest.mark.cli
def test_report_command_and_partition_history(env: dict[str, str], batch_dir: Path,
                                              tmp_path: Path) -> None:
    scoring_batch(batch_dir, fail_keys=[3, 9, 12], tolerated=2)
    failed = cli(env, "run", "scoring", "--partition", "march")
    assert failed.returncode == 1
    scoring_batch(batch_dir, fail_keys=[], tolerated=2)
    assert cli(env, "run", "scoring", "--partition", "april").returncode == 0
    listed = json.loads(cli(env, "list", "--partitions", "--json").stdout)
    (batch,) = listed
    by_partition = {p["partition"]: p for p in batch["partition_runs"]}
    assert {k: v["status"] for k, v in by_partition.items()} == {"march": "FAILURE",
                                                                  "april": "SUCCESS"}
    assert batch["last_run_id"] == by_partition["april"]["run_id"]
    march = by_partition["march"]["run_id"]
    table = cli(env, "list", "--partitions").stdout
    assert re.search(rf"scoring\s+│\s+march\s+│\s+{march[:8]}\s+│\s+FAILURE", table), table

    out = tmp_path / "reports" / "march.html"
    done = cli(env, "report", march[:8], "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stderr
    page = out.read_text()
    assert "FAILURE" in page and "<h2>Failed, invalid and rejected items (3)</h2>" in page
    assert "ValueError: bad record 12" in page and len(pngs_in(page)) == 2
    phases = cli(env, "report", march, "--format", "csv").stdout.splitlines()
    assert phases[0].startswith("phase,items,succeeded,failed,invalid,rejected,skipped")
    assert phases[1].startswith("score,30,27,3,0,0,0,")


@pytest.mark.cli
def test_status_watch_follows_a_run_of_another_process(env: dict[str, str],
                                                       batch_dir: Path) -> None:
    write_batch(batch_dir, {
        "name": "slow", "source": inline_items(40),
        "phases": [{"name": "wait", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 150}},
                   {"name": "again", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 50}}],
        "options": {"concurrency": 2},
    })
    runner = start_cli(env, "run", "slow", "--partition", "p")
    try:
        run_id = None
        deadline = time.monotonic() + 60
        while run_id is None and time.monotonic() < deadline:
            time.sleep(0.5)
            listed = cli(env, "list", "--json")
            if listed.returncode == 0 and listed.stdout.strip():
                run_id = json.loads(listed.stdout)[0]["last_run_id"]
        assert run_id, "the run never appeared"
        watched = cli(env, "status", run_id, "--watch")
        assert runner.wait(timeout=60) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
    assert watched.returncode == 0, watched.stderr
    assert re.search(r"wait\s.*40/40", watched.stderr) and re.search(r"all\s.*40/40",
                                                                    watched.stderr)
    assert "40/40 done (100%), 0 failed" in watched.stderr
    assert "items/s" in watched.stderr and "SUCCESS" in watched.stdout


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return cli_env


HOSTILE_PARTITION = "<svg onload=alert(1)>"
HOSTILE_KEY = "<img src=x onerror=alert(2)>"
HOSTILE_ERROR = "ValueError: <script>alert(3)</script>"
# What the report's own markup uses; anything else in a page came from the data.
REPORT_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "table", "thead",
               "tbody", "tr", "th", "td", "img", "p", "code"}


class Markup(html.parser.HTMLParser):
    """The tags and attributes an HTML page really has (what a browser would act on)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.image_sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)
        if tag == "img":
            self.image_sources += [value or "" for name, value in attrs if name == "src"]

    def only_own_markup(self) -> bool:
        """Nothing but the report's tags, no event handlers, images only its charts."""
        return (self.tags <= REPORT_TAGS
                and self.attributes <= {"charset", "class", "alt", "src", "border", "style"}
                and all(src.startswith("data:image/png;base64,") for src in self.image_sources))


def markup(page: str) -> Markup:
    parser = Markup()
    parser.feed(page)
    return parser


def hostile_report() -> dict:
    item = {"item_key": HOSTILE_KEY, "phase": "<b>phase</b>", "status": "failed",
            "attempts": 1, "duration_s": 0.5, "error": HOSTILE_ERROR}
    return {
        "run_id": "0123abcd-4567-89ab-cdef-0123456789ab", "batch": "<u>batch</u>",
        "partition": HOSTILE_PARTITION,
        "status": "FAILURE x onmouseover=alert(4)", "stop_reason": "<marquee>stop</marquee>",
        "files": {"report.report_html": "/out/<iframe src=x>/report.html"},
        "phases": [{"phase": "<b>phase</b>", "items": 1, "succeeded": 0, "failed": 1,
                    "rejected": 0, "invalid": 0, "skipped": 0, "success_rate": 0.0,
                    "avg_s": 0.5, "p95_s": 0.5, "max_s": 0.5, "cost": 0.0, "tokens": 0}],
        "throughput": {"edges_s": [], "per_phase": {}},
        "durations": {"edges_s": [], "per_phase": {}},
        "slowest": [item], "failures": [item] * 101,  # past FAILED_SHOWN: the hint with the run id
        "step_failures": [{"step": "<s>step</s>", "error": "<object data=x>"}],
    }


@pytest.mark.unit
def test_report_escapes_every_value_in_html_and_markdown() -> None:
    page = render(hostile_report(), "html")
    found = markup(page)
    assert found.only_own_markup(), (found.tags, found.attributes)
    assert "&lt;svg onload=alert(1)&gt;" in page and "&lt;script&gt;alert(3)" in page
    markdown = render(hostile_report(), "md")
    # Markdown passes raw HTML through: no `<` of the data may reach it.
    assert "<" not in markdown
    assert "&lt;svg onload=alert(1)&gt;" in markdown and "&lt;img src=x" in markdown


@pytest.mark.job
def test_hostile_partition_key_and_error_stay_text(batch_dir: Path,
                                                   instance: dg.DagsterInstance) -> None:
    (batch_dir / "hostile_report_tasks.py").write_text(
        "def check(item, ctx):\n"
        "    if item['id'] != 'ok':\n"
        f"        raise ValueError({HOSTILE_ERROR.removeprefix('ValueError: ')!r})\n")
    write_batch(batch_dir, {
        "name": "hostile",
        "source": {"type": "inline", "key": "id", "items": [{"id": HOSTILE_KEY}, {"id": "ok"}]},
        "phases": [{"name": "check", "task": "python",
                    "params": {"function": "hostile_report_tasks:check"}}],
        "options": {"on_error": "continue", "tolerated_failures": 1},
        "after": [{"task": "report", "params": {"formats": ["html", "md"]}}],
    })
    result = run_batch(batch_dir, instance, "hostile", HOSTILE_PARTITION)
    assert result.success
    ledger = BatchStorageResource().ledger(instance)
    report = build_report(instance, ledger, result.run_id)
    assert report["partition"] == HOSTILE_PARTITION
    assert [(f["item_key"], f["error"]) for f in report["failures"]] == [(HOSTILE_KEY,
                                                                       HOSTILE_ERROR)]
    folder = Path(instance.root_directory) / "batch_output" / "hostile" / HOSTILE_PARTITION
    pages = [render(report, "html"), (folder / "report.html").read_text()]
    for page in pages:
        found = markup(page)
        assert found.only_own_markup(), (found.tags, found.attributes)
        assert "&lt;svg onload=alert(1)&gt;" in page
    for text in (render(report, "md"), (folder / "report.md").read_text()):
        assert "<svg" not in text and "<img" not in text and "<script" not in text
        assert "&lt;svg onload=alert(1)&gt;" in text
