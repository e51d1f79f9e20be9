"""End to end in the Dagster UI: `dagster dev` on loopback, driven by headless Chromium."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import httpx
import pytest
import yaml
from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright

from resources.storage import BatchStorageResource
from tests.conftest import PROJECT, inline_items, write_batch

# One group: the tests share one `dagster dev` (the dagster_dev fixture).
pytestmark = [pytest.mark.browser, pytest.mark.timeout(300), pytest.mark.xdist_group("browser")]

CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/ensure-chromium.sh); no browser download
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = PROJECT / "tests" / "artifacts"
LOCATION = "batch_defs.definitions"  # the code location's name, from workspace.yaml
BATCH = "letters"
STRICT = "strict"  # fails beyond its tolerance
SLOW = "slow"  # a 10 s run, to watch its progress
STRICT_FAILS = [3, 7, 9]
DOC_IMAGES = PROJECT / "docs" / "images"
RUN_TIMEOUT_MS = 90_000


@dataclass
class DagsterDev:
    url: str
    home: Path
    fail_file: Path
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_home(home: Path) -> None:
    """The project's instance settings (run queue limits), telemetry off."""
    config = yaml.safe_load((PROJECT / "dagster.yaml").read_text())
    config["telemetry"] = {"enabled": False}
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))


def write_batches(folder: Path, fail_file: Path) -> None:
    folder.mkdir()
    write_batch(folder, {
        "name": BATCH,
        "description": "Letters for the browser test; fail_file lists items that fail.",
        "source": inline_items(12),
        "phases": [
            {"name": "score", "task": "python",
             "params": {"function": "tests.handlers:fail_listed", "fail_file": str(fail_file)}},
            {"name": "publish", "task": "python",
             "params": {"function": "tests.handlers:sleep_ms", "ms": 150}},
        ],
        "options": {"concurrency": 2, "chunk_size": 4, "on_error": "fail_fast"},
    })
    write_batch(folder, {
        "name": STRICT,
        "description": "Scores 12 items; three fail, one is tolerated.",
        "source": inline_items(12),
        "phases": [{"name": "score", "task": "python",
                    "params": {"function": "tests.handlers:fail_listed",
                               "fail_keys": STRICT_FAILS}}],
        "options": {"concurrency": 2, "on_error": "continue", "tolerated_failures": 1},
    })
    write_batch(folder, {
        "name": SLOW,
        "description": "20 items of 500 ms, one at a time: about 10 s.",
        "source": inline_items(20),
        "phases": [{"name": "wait", "task": "python",
                    "params": {"function": "tests.handlers:sleep_ms", "ms": 500}}],
        "options": {"concurrency": 1},
    })


def wait_for_webserver(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until /server_info answers and the code location has loaded without error."""
    query = ("{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
             "locationOrLoadError { __typename ... on PythonError { message } } } } } }")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"dagster dev exited:\n{log.read_text()[-3000:]}"
        try:
            httpx.get(f"{url}/server_info", timeout=2).raise_for_status()
            answer = httpx.post(f"{url}/graphql", json={"query": query}, timeout=5).json()
            entries = answer["data"]["workspaceOrError"]["locationEntries"]
            loaded = [e for e in entries if e["name"] == LOCATION and e["loadStatus"] == "LOADED"]
            if loaded:
                error = loaded[0]["locationOrLoadError"]
                assert error["__typename"] == "RepositoryLocation", error.get("message")
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"webserver not ready:\n{log.read_text()[-3000:]}")


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 20) -> None:
    """dagster dev, its webserver, daemon, code servers and run workers: one process group."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterDev]:
    """One `dagster dev` for the module's tests (each drives batches of its own): starting
    the webserver, daemon and code server costs more CPU than a test's runs."""
    tmp_path = tmp_path_factory.mktemp("dagster_dev")
    home, fail_file = tmp_path / "home", tmp_path / "fail_keys.txt"
    write_home(home)
    write_batches(tmp_path / "batches", fail_file)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "BATCH_DEFS_PROGRESS"}
    env.update({"DAGSTER_HOME": str(home), "BATCH_DEFS_PATH": str(tmp_path / "batches"),
                "PYTHONPATH": str(PROJECT)})
    log = tmp_path / "dagster_dev.log"
    dagster = Path(sys.executable).parent / "dagster"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(dagster), "dev", "-w", "workspace.yaml", "-p", str(port), "-h", "127.0.0.1"],
            cwd=PROJECT, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_webserver(url, process, log)
        yield DagsterDev(url, home, fail_file, log)
    finally:
        stop_group(process)


@pytest.fixture
def browser() -> Iterator[Browser]:
    # A page's first load waits for the code location's snapshot: seconds on a busy machine,
    # beyond expect's default of 5 s.
    expect.set_options(timeout=30_000)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


# Resolves when every finite CSS animation or transition (a dialog fading in) has ended.
SETTLED = """() => Promise.all(document.getAnimations()
    .filter(a => a.effect && a.effect.getComputedTiming().endTime !== Infinity)
    .map(a => a.finished.catch(() => null)))"""


def shot(page: Page, name: str, doc: str | None = None) -> None:
    """A screenshot in tests/artifacts; `doc`: with REFRESH_DOC_IMAGES=1, also the
    docs/images file of that name (what docs/operations.md shows), so that plain test runs
    leave the work tree alone."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate(SETTLED)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    if doc and os.environ.get("REFRESH_DOC_IMAGES") == "1":
        page.screenshot(path=str(DOC_IMAGES / doc))


def launch_partition(page: Page, server: DagsterDev, partition: str, batch: str = BATCH) -> str:
    """From the job page: Materialize, add the partition in the dialog, launch; the run's
    short id from the toast."""
    page.goto(f"{server.url}/locations/{LOCATION}/jobs/{batch}")
    page.get_by_role("button", name=re.compile("Materialize")).first.click()
    dialog = page.get_by_role("dialog").filter(has_text=f"Launch runs to materialize {batch}")
    dialog.get_by_text("Add a partition").click()
    adding = page.get_by_role("dialog").filter(has_text=f"Add a partition for {batch}")
    adding.get_by_role("textbox").fill(partition)
    adding.get_by_role("button", name="Save").click()
    launch = dialog.get_by_role("button", name="Launch 1 run")
    expect(launch).to_be_enabled()
    shot(page, f"launch-{partition}")
    launch.click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    expect(toast).to_be_visible()
    match = re.search(r"Launched run ([0-9a-f]{8})", toast.inner_text())
    assert match
    return match.group(1)


def open_run(page: Page, server: DagsterDev, short_id: str) -> None:
    page.goto(f"{server.url}/runs")
    page.get_by_role("link", name=short_id).first.click()
    expect(page).to_have_url(re.compile(rf"/runs/{short_id}"))


def first_visit(browser: Browser, server: DagsterDev, batch: str) -> Page:
    """A new page (a first visit: no stored state) on the batch's job page, once Dagster's
    first-visit community dialog has come and gone: it comes a moment after the page, and
    over a launch dialog its Skip button cannot be reached."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(30_000)
    community = page.get_by_text("Join the Dagster community")
    page.add_locator_handler(community, lambda: page.get_by_role("button", name="Skip").click())
    page.goto(f"{server.url}/locations/{LOCATION}/jobs/{batch}")
    expect(page.get_by_text(f"Asset: {batch}/results")).to_be_visible()
    with contextlib.suppress(AssertionError):
        expect(community).to_be_visible(timeout=10_000)
    expect(community).to_have_count(0)
    return page


def run_status(page: Page) -> Locator:
    """The status pill in the run page's header (Queued, Started, Success, Failure)."""
    return page.get_by_text(
        re.compile("^(Queued|Starting|Started|Success|Failure|Canceling|Canceled)$")).first


def test_launch_watch_inspect_fail_and_reexecute_from_the_ui(dagster_dev: DagsterDev,
                                                            browser: Browser) -> None:
    # The batch is a job; launching it adds a partition and materializes its results asset.
    page = first_visit(browser, dagster_dev, BATCH)
    shot(page, "01-job")
    first = launch_partition(page, dagster_dev, "2026-11")
    open_run(page, dagster_dev, first)
    expect(run_status(page)).to_have_text("Success", timeout=RUN_TIMEOUT_MS)
    expect(page.get_by_text("partition: 2026-11").first).to_be_visible()
    shot(page, "02-run-succeeded")

    # Progress is a run tag: the run list shows it next to the partition.
    page.goto(f"{dagster_dev.url}/runs")
    expect(page.get_by_role("link", name=first)).to_be_visible()  # the module's first run
    expect(page.get_by_text(re.compile(r"batch/progress: 12/12 done \(100%\), 0 failed"))
           ).to_be_visible()
    expect(page.get_by_text("batch/state: succeeded")).to_be_visible()
    shot(page, "03-runs-progress-tag", "ui-runs-progress.png")

    # The partitions: counted on the job's tab, listed with their status on the asset's.
    page.goto(f"{dagster_dev.url}/locations/{LOCATION}/jobs/{BATCH}/partitions")
    expect(page.get_by_text("Total partitions")).to_be_visible()
    expect(page.get_by_text("Missing partitions")).to_be_visible()
    page.goto(f"{dagster_dev.url}/assets/{BATCH}/results?view=partitions")
    page.locator("span", has_text=re.compile("^2026-11$")).first.click()
    expect(page.get_by_text("items_table")).to_be_visible()
    expect(page.get_by_role("link", name=first)).to_be_visible()
    shot(page, "04-partitions", "ui-partition-history.png")

    # The results asset: counts, the item table and the charts in its metadata.
    page.goto(f"{dagster_dev.url}/assets/{BATCH}/results")
    metadata = page.get_by_role("row")
    expect(metadata.filter(has_text="succeeded").filter(has_text="12").first).to_be_visible()
    expect(metadata.filter(has_text="items_table").first).to_be_visible()
    expect(page.get_by_text("batch-defs report")).to_be_visible()
    shot(page, "05-asset-metadata")
    page.get_by_text("[Show Markdown]").first.click()
    for name in ("throughput", "durations"):
        chart = page.get_by_role("dialog").get_by_role("img", name=name)
        expect(chart).to_be_visible()
        width = chart.evaluate("image => image.complete && image.naturalWidth")
        assert width and width > 300, f"the {name} chart did not render"
    shot(page, "06-asset-charts", "ui-asset-charts.png")
    page.get_by_role("button", name="Close").click()

    # Item 5 fails; fail_fast fails its step and the run.
    dagster_dev.fail_file.write_text("5\n")
    failing = launch_partition(page, dagster_dev, "2026-12")
    open_run(page, dagster_dev, failing)
    expect(run_status(page)).to_have_text("Failure", timeout=RUN_TIMEOUT_MS)
    expect(page.get_by_text(re.compile("fail_fast: item '5' failed")).first).to_be_visible()
    shot(page, "07-run-failed")

    # Fix the data, then Re-execute > From failure on the failed run's page.
    dagster_dev.fail_file.write_text("")
    page.get_by_role("button", name="Re-execute all (*)").locator(
        "xpath=following-sibling::*[1]").click()
    page.get_by_role("menuitem", name="From failure").click()
    expect(page).not_to_have_url(re.compile(rf"/runs/{failing}"))
    expect(run_status(page)).to_have_text("Success", timeout=RUN_TIMEOUT_MS)
    shot(page, "08-reexecuted-succeeded", "ui-reexecute-from-failure.png")

    with dg.DagsterInstance.from_config(str(dagster_dev.home)) as instance:
        (failed,) = [r for r in instance.get_runs() if r.run_id.startswith(failing)]
        (retry,) = [r for r in instance.get_runs() if r.parent_run_id == failed.run_id]
        assert failed.status == dg.DagsterRunStatus.FAILURE
        assert retry.status == dg.DagsterRunStatus.SUCCESS
        assert retry.tags["dagster/partition"] == "2026-12"
        assert page.url.endswith(retry.run_id)
        ledger = BatchStorageResource().ledger(instance)
        assert ledger.counts(retry.run_id)[("publish", "succeeded")] == 12
        rows = ledger.rows(retry.run_id)
        five = rows[rows["item_key"] == "5"]
        assert dict(zip(five["phase"], five["status"], strict=True)) == {
            "score": "succeeded", "publish": "succeeded"}
        assert ledger.counts(failed.run_id)[("score", "failed")] == 1

    # History: both partitions materialized, each with its latest run.
    page.goto(f"{dagster_dev.url}/assets/{BATCH}/results?view=partitions")
    expect(page.get_by_text("Materialized (2)")).to_be_visible()
    page.locator("span", has_text=re.compile("^2026-12$")).first.click()
    expect(page.get_by_role("link", name=retry.run_id[:8])).to_be_visible()
    shot(page, "09-partitions-history")


def test_a_failed_runs_items_and_checks_and_a_running_batchs_progress_in_the_ui(
        dagster_dev: DagsterDev, browser: Browser) -> None:
    page = first_visit(browser, dagster_dev, STRICT)

    # Three items fail where one is tolerated: the run fails, and says which and why.
    failing = launch_partition(page, dagster_dev, "bad-data", STRICT)
    open_run(page, dagster_dev, failing)
    expect(run_status(page)).to_have_text("Failure", timeout=RUN_TIMEOUT_MS)
    expect(page.get_by_text(re.compile(r"3 items failed, were invalid or rejected")).first
           ).to_be_visible()
    expect(page.get_by_text(re.compile(r"3 \(score, failed\): ValueError: bad record 3")).first
           ).to_be_visible()
    shot(page, "10-run-failed-items", "ui-run-failed-items.png")

    # The asset keeps the failed run's record: its items, failures first, with errors.
    page.goto(f"{dagster_dev.url}/assets/{STRICT}/results?view=events")
    expect(page.get_by_text(re.compile(rf"run {failing} failed: 12 items")).first
           ).to_be_visible()
    # The metadata's item table: the failed items first, each with its error.
    items_table = page.get_by_role("row").filter(has_text="items_table").first
    items_table.scroll_into_view_if_needed()
    for key in STRICT_FAILS:
        expect(items_table.get_by_text(f"ValueError: bad record {key}")).to_be_visible()
    rows = items_table.locator("tbody tr")
    assert "bad record 3" in rows.nth(0).inner_text()  # failures first, in source order
    expect(page.get_by_text(re.compile("--status failed,invalid,rejected")).first).to_be_visible()
    shot(page, "11-asset-failed-items", "ui-asset-failed-items.png")

    # The phase's quality check is red.
    page.goto(f"{dagster_dev.url}/assets/{STRICT}/results?view=checks")
    expect(page.get_by_text("score_quality").first).to_be_visible()
    page.get_by_text("score_quality").first.click()
    expect(page.get_by_text("failures beyond tolerated_failures")).to_be_visible()
    expect(page.get_by_text("Failed", exact=True).first).to_be_visible()
    expect(page.get_by_text(re.compile(r"3 \(failed, 1 attempts\): ValueError: bad record 3"))
           .first).to_be_visible()
    shot(page, "13-asset-check-failed", "ui-asset-check-failed.png")

    # A 10 s run: its page shows progress lines as items finish, about every second.
    running = launch_partition(page, dagster_dev, "live", SLOW)
    open_run(page, dagster_dev, running)
    seen: list[str] = []
    lines = page.get_by_text(re.compile(r"progress \d+/20 done"))
    deadline = time.monotonic() + RUN_TIMEOUT_MS / 1000
    while time.monotonic() < deadline and run_status(page).inner_text() != "Success":
        for text in lines.all_inner_texts():
            found = re.search(r"progress (\d+)/20 done", text)
            if found and found.group(1) not in seen and found.group(1) != "20":
                seen.append(found.group(1))
        if len(seen) == 3:
            shot(page, "14-run-progress", "ui-run-progress.png")
        time.sleep(0.5)
    assert len(seen) >= 3, f"progress on the run page changed only through {seen}"
    expect(run_status(page)).to_have_text("Success", timeout=RUN_TIMEOUT_MS)
