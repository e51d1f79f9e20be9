"""Secrets of the resources are masked as *** wherever errors are stored or shown: the ledger's
error and attempt_log, reports in every format, Dagster's event log; end to end against a
server on loopback that echoes the credentials it gets."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from batch_defs import secrets
from batch_defs.ledger import Ledger
from batch_defs.report import build_report, render
from resources.database import DatabaseResource
from resources.http import HttpResource
from resources.llm import LlmResource
from resources.smtp import SmtpResource
from resources.storage import BatchStorageResource
from tests.conftest import run_batch, write_batch


def fresh(label: str) -> str:
    """A value no earlier test registered (the registry lives as long as the process)."""
    return f"{label}-{uuid.uuid4().hex[:12]}"


@pytest.mark.unit
def test_every_kind_of_resource_secret_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    smtp_pw, api_key, env_token = fresh("smtp"), fresh("llm"), fresh("env-token")
    db_pw, header_key, openai = fresh("db/pw@"), fresh("header"), fresh("openai")
    monkeypatch.setenv("TENANT_KEY", env_token)
    monkeypatch.setenv("OPENAI_API_KEY", openai)
    secrets.register_resources([
        SmtpResource(username="batch", password=smtp_pw),
        LlmResource(api_key=api_key),
        LlmResource(),  # no api_key: its bearer token is $OPENAI_API_KEY
        DatabaseResource(url=f"postgresql://u:{db_pw.replace('/', '%2F').replace('@', '%40')}"
                             "@db.example.com/x"),
        HttpResource(headers={"X-Api-Key": header_key, "X-Tenant": "${env:TENANT_KEY}",
                              "Accept": "application/json"}),
    ])
    for value in (smtp_pw, api_key, env_token, db_pw, header_key, openai):
        assert secrets.mask(f"server said: {value}!") == "server said: ***!"
    assert secrets.mask("application/json") == "application/json"  # not a credential
    # As a URL or stored JSON spells them:
    assert secrets.mask(f"pw={db_pw.replace('/', '%2F').replace('@', '%40')}") == "pw=***"
    quoted = fresh('say "hi"')
    secrets.register(quoted)
    assert secrets.mask(json.dumps({"error": quoted})) == '{"error": "***"}'


@pytest.mark.unit
def test_run_config_secrets_are_registered_for_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    from_env, literal, header = fresh("from-env"), fresh("literal"), fresh("header")
    monkeypatch.setenv("SMTP_PASSWORD_FOR_TEST", from_env)
    monkeypatch.setenv("HEADER_TOKEN_FOR_TEST", header)
    secrets.register_run_config({"resources": {
        "smtp": {"config": {"password": {"env": "SMTP_PASSWORD_FOR_TEST"}}},
        "llm": {"config": {"api_key": literal, "model": "gpt-4o-mini"}},
        "http": {"config": {"headers": {"Authorization": "Bearer ${env:HEADER_TOKEN_FOR_TEST}"}}},
        "run_overrides": {"config": {"overrides": ["options.concurrency=2"]}},
    }})
    assert secrets.mask(f"{from_env} {literal} {header}") == "*** *** ***"
    assert secrets.mask("gpt-4o-mini") == "gpt-4o-mini"


@pytest.mark.unit
def test_ledger_masks_error_and_attempt_log(tmp_path: Path) -> None:
    token = fresh("tok")
    secrets.register(token)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.record([{"batch": "b", "partition": "p", "run_id": "r", "phase": "send",
                    "item_key": "1", "seq": 1, "status": "failed", "attempts": 2,
                    "error": f"SMTPAuthenticationError: bad password {token}",
                    "attempt_log": [{"attempt": 1, "error": f"echo {token}", "wait_s": 0}]}])
    row = ledger.rows("r").iloc[0]
    assert row["error"] == "SMTPAuthenticationError: bad password ***"
    assert json.loads(row["attempt_log"]) == [{"attempt": 1, "error": "echo ***", "wait_s": 0}]


@pytest.mark.unit
def test_report_masks_what_reached_it_unmasked() -> None:
    token = fresh("tok")
    secrets.register(token)
    report: dict[str, Any] = {
        "run_id": "r1", "batch": "b", "partition": "p", "status": "FAILURE",
        "stop_reason": f"fail_fast: item '1' failed: {token}",
        "failures": [{"item_key": "1", "phase": "p", "status": "failed", "attempts": 1,
                    "duration_s": 0.1, "error": f"HTTP 401: {token}"}],
        "step_failures": [{"step": "p", "error": f"fail_fast: {token}"}],
        "throughput": {"edges_s": [], "per_phase": {}},
        "durations": {"edges_s": [], "per_phase": {}}}
    from batch_defs.report import masked

    shown = masked(report)
    for fmt in ("html", "md", "json"):
        text = render(shown, fmt)
        assert token not in text and text.count("***") >= 3, fmt


def echo_credentials(request: Request) -> Response:
    """An API that answers with the credentials it got: 503 on the first try, then 401."""
    echo_credentials.calls += 1  # type: ignore[attr-defined]
    body = (f"cannot use Authorization={request.headers.get('Authorization')} "
            f"X-Api-Key={request.headers.get('X-Api-Key')}")
    return Response(body, status=503 if echo_credentials.calls == 1 else 401)  # type: ignore[attr-defined]


@pytest.mark.job
@pytest.mark.integration
def test_echoed_credentials_are_masked_end_to_end(batch_dir: Path, instance: dg.DagsterInstance,
                                                  httpserver_ipv4: HTTPServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    token, api_key = fresh("bearer"), fresh("api-key")
    monkeypatch.setenv("ECHO_TOKEN", token)
    echo_credentials.calls = 0  # type: ignore[attr-defined]
    httpserver_ipv4.expect_request("/api/items/1").respond_with_handler(echo_credentials)
    write_batch(batch_dir, {
        "name": "echo",
        "source": {"type": "inline", "key": "id", "items": [{"id": 1}]},
        "phases": [{"name": "call", "task": "http", "params": {"url": "/items/{{ id }}"},
                    "retry": {"max_attempts": 2, "delay_s": 0, "retry_on": [503]}}],
        "options": {"on_error": "continue", "tolerated_failures": 1},
        "after": [{"task": "report", "params": {"formats": ["html", "md", "json", "csv"]}}],
    })
    config = {"resources": {"http": {"config": {
        "base_url": httpserver_ipv4.url_for("/api"),
        "headers": {"Authorization": "Bearer ${env:ECHO_TOKEN}", "X-Api-Key": api_key}}}}}
    result = run_batch(batch_dir, instance, "echo", run_config=config)
    assert result.success  # the item failed, tolerated: the report step ran
    assert echo_credentials.calls == 2  # type: ignore[attr-defined]

    ledger = BatchStorageResource().ledger(instance)
    row = ledger.rows(result.run_id).iloc[0]
    assert row["status"] == "failed"
    assert row["error"].endswith("unexpected status 401: cannot use Authorization=*** "
                                 "X-Api-Key=***")
    log = json.loads(row["attempt_log"])
    assert len(log) == 2 and "transient error 503" in log[0]["error"]
    stored = [row["error"], row["attempt_log"]]

    report = build_report(instance, ledger, result.run_id)
    shown = [render(report, fmt) for fmt in ("html", "md", "json")]
    files = sorted(f for f in (Path(instance.root_directory) / "batch_output" / "echo" / "p1")
                   .iterdir() if f.suffix != ".png")  # the md report's charts
    assert [f.name for f in files] == ["report.csv", "report.html", "report.json", "report.md"]
    shown += [f.read_text() for f in files]
    assert all("Authorization=*** X-Api-Key=***" in text for text in shown)
    events = [record.user_message for record in instance.all_logs(result.run_id)]
    for text in [*stored, *shown, *events]:
        assert token not in text and api_key not in text
