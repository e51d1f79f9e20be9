"""The shipped example batches, run as a fresh clone runs them: against local servers only
(aiosmtpd, the fake OpenAI-compatible server in scripts/, PostgreSQL on 127.0.0.1)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from batch_defs.loader import PACKAGE_BATCHES, load_batches
from resources.storage import BatchStorageResource
from tests.conftest import PROJECT, Inbox, cli, run_batch, serve_smtp
from tests.test_task_sql import (  # noqa: F401 - pg_target, migration_target: fixtures
    migration_config,
    migration_target,
    pg_target,
    poisoned_legacy,
    table_rows,
)

SHIPPED = {"demo", "invoices", "bulk_email", "data_migration", "package_build",
           "document_pipeline"}


class RefusingInbox(Inbox):
    """An SMTP inbox that refuses the recipients in `refused` (550), like a full mailbox."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,  # noqa: N802
                          rcpt_options: list[str]) -> str:
        if address in self.refused:
            return "550 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"


@pytest.fixture
def smtp_inbox() -> Iterator[tuple[RefusingInbox, int]]:
    with serve_smtp(RefusingInbox()) as served:
        yield served  # type: ignore[misc]


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, PROJECT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_every_shipped_batch_validates() -> None:
    batches = load_batches([PACKAGE_BATCHES])
    assert set(batches) == SHIPPED
    assert [p.task for p in batches["document_pipeline"].spec.phases] == ["llm", "llm", "embed"]
    assert [s.task for s in batches["data_migration"].spec.after] == ["sql_commit", "python"]


@pytest.mark.cli
@pytest.mark.integration
def test_invoices_mail_each_invoice_once_across_a_resume(
        tmp_path: Path, smtp_inbox: tuple[RefusingInbox, int]) -> None:
    inbox, port = smtp_inbox
    with (PACKAGE_BATCHES / "invoices" / "data" / "invoices.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    sample = rows[:24] + [rows[136]]  # INV-2026-0137 states a wrong total
    data = tmp_path / "march.csv"
    with data.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sample)
    inbox.refused = {sample[3]["email"], sample[17]["email"]}
    env = {k: v for k, v in os.environ.items() if k != "BATCH_DEFS_PATH"}
    env.update({"DAGSTER_HOME": str(tmp_path / "home"), "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(port), "PYTHONPATH": str(PROJECT), "COLUMNS": "200"})

    first = cli(env, "run", "invoices", "--data", str(data),
                "--set", "options.tolerated_failures=1", "--json")
    assert first.returncode == 1, first.stderr
    report = json.loads(first.stdout)
    # Beyond the one tolerated failure (the wrong total) fail_fast stops new items.
    assert report["failed"] >= 2
    # The failure past the tolerance is one of the three bad invoices (which one comes
    # second depends on how the slots interleave the phases).
    assert re.match(r"(not started: )?fail_fast: item 'INV-2026-0(004|018|137)'",
                    report["step_failures"][0]["error"])
    first_sent = Counter(rcpt for _, rcpts, _ in inbox.received for rcpt in rcpts)
    assert set(first_sent.values()) == {1} and len(first_sent) < 24

    inbox.refused = set()
    resumed = cli(env, "resume", report["run_id"], "--json")
    assert resumed.returncode == 0, resumed.stderr
    sent = Counter(rcpt for _, rcpts, _ in inbox.received for rcpt in rcpts)
    expected = {row["email"] for row in sample if row["invoice_no"] != "INV-2026-0137"}
    assert set(sent) == expected and set(sent.values()) == {1}
    message = next(m for _, rcpts, m in inbox.received if rcpts == [sample[3]["email"]])
    assert message["Subject"] == f"Invoice {sample[3]['invoice_no']}"
    attachment = next(message.iter_attachments())
    assert attachment.get_filename() == f"{sample[3]['invoice_no']}.md"
    assert f"# Invoice {sample[3]['invoice_no']}" in attachment.get_content()
    files = json.loads(resumed.stdout)["files"]
    assert Path(files["export.export_csv"]).is_file()
    assert Path(files["report.report_html"]).is_file()


@pytest.mark.job
@pytest.mark.integration
def test_bulk_email_reaches_every_opted_in_user(instance: dg.DagsterInstance,
                                                smtp_inbox: tuple[RefusingInbox, int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    inbox, port = smtp_inbox
    monkeypatch.setenv("SMTP_HOST", "127.0.0.1")
    monkeypatch.setenv("SMTP_PORT", str(port))
    result = run_batch(PACKAGE_BATCHES, instance, "bulk_email")
    assert result.success
    engine = sa.create_engine(f"sqlite:///{PACKAGE_BATCHES / 'bulk_email' / 'data' / 'users.db'}")
    with engine.connect() as conn:
        opted_in = {row[0] for row in conn.execute(sa.text(
            "select email from users where opted_in = 1"))}
    engine.dispose()
    assert len(opted_in) == 180
    sent = Counter(rcpt for _, rcpts, _ in inbox.received for rcpt in rcpts)
    assert set(sent) == opted_in and set(sent.values()) == {1}
    html = inbox.messages()[0].get_body(preferencelist=("html",))
    assert html is not None and "<strong>" in html.get_content()


@pytest.fixture
def fake_llm() -> Iterator[str]:
    server = load_script("fake_llm_server").start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.job
@pytest.mark.integration
@pytest.mark.xdist_group("embed")  # with the other tests that load the embedding model
def test_document_pipeline_records_tokens_and_cost(instance: dg.DagsterInstance, fake_llm: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_llm)
    monkeypatch.setenv("LLM_PRICES", json.dumps(
        {"gpt-4o-mini": {"input_per_1k": 0.15, "output_per_1k": 0.6}}))
    result = run_batch(PACKAGE_BATCHES, instance, "document_pipeline")
    assert result.success
    recorded = BatchStorageResource().ledger(instance).rows(result.run_id)
    assert len(recorded) == 72 and set(recorded["status"]) == {"succeeded"}
    for phase in ("extract", "summarize"):
        priced = recorded[recorded["phase"] == phase]
        assert (priced["tokens"] > 0).all() and (priced["cost"] > 0).all()
    embedded = recorded[recorded["phase"] == "embed"]
    assert (embedded["tokens"] == 0).all()
    output = json.loads(embedded["output"].iloc[0])
    assert output["topic"] == "grid-scale batteries" and output["language"] == "en"
    assert output["summary"].startswith("Grid-scale batteries store surplus solar power")
    assert len(output["embedding"]) == 384
    event = instance.get_latest_materialization_event(
        dg.AssetKey(["document_pipeline", "results"]))
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    assert metadata["cost"].value == pytest.approx(recorded["cost"].sum(), abs=1e-6)
    assert metadata["tokens"].value == recorded["tokens"].sum() > 0


@pytest.mark.postgres
@pytest.mark.job
@pytest.mark.usefixtures("migration_target")
def test_data_migration_into_postgres_verifies_counts(tmp_path: Path,
                                                      instance: dg.DagsterInstance) -> None:
    result = run_batch(PACKAGE_BATCHES, instance, "data_migration",
                       run_config=migration_config(poisoned_legacy(tmp_path)))
    assert result.success
    migrated = table_rows(os.environ["MIGRATION_TARGET_URL"], "migrated_customers")
    assert len(migrated) == 1000
    first = migrated[0]
    assert first[:4] == (1, "Dennis Liskov", "dennis.liskov1@example.com", "GB")
    assert str(first[4]) == "2019-02-24" and float(first[5]) == 1192.70 and first[6] is False
    summary = BatchStorageResource().ledger(instance).run(result.run_id)["summary"]
    assert summary["after"]["sql_commit"]["committed_rows"] == 1000
    assert summary["after"]["verify"] == {"source_rows": 1000, "target_rows": 1000}
