"""The `http` task against a real HTTP server (pytest-httpserver) on 127.0.0.1: templated
requests, response mapping, auth from the environment, and engine retries on 503."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from batch_defs.sources.remote import retry_after_seconds
from batch_defs.tasks import TaskContext, build_handler
from batch_defs.tasks.http import HttpStatusError
from resources.http import HttpResource
from resources.storage import BatchStorageResource
from tests.conftest import run_batch, write_batch


def context(tmp_path: Path, key: str = "1", resource: HttpResource | None = None) -> TaskContext:
    return TaskContext(params={}, batch="calls", partition="p1", run_id="run-1", phase="lookup",
                       key=key, base_dir=tmp_path, output_dir=tmp_path,
                       resources={"http": resource or HttpResource()})


@pytest.mark.integration
def test_templated_request_and_response_fields(tmp_path: Path, httpserver_ipv4: HTTPServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "s3cret")
    httpserver_ipv4.expect_request(
        "/customers/42/score", method="POST",
        headers={"Authorization": "Bearer s3cret", "X-Client": "batch"},
        json={"name": "Ada Lovelace", "age": 36, "tags": ["vip", 42], "note": "id=42",
              "nested": {"key": "42"}},
    ).respond_with_json({"result": {"score": 0.93, "labels": ["good"]}, "id": "r-1"})
    params = {
        "method": "post",
        "url": httpserver_ipv4.url_for("/customers/{{ id }}/score"),
        "headers": {"X-Client": "batch"},
        "auth": {"type": "bearer", "token": "${env:API_TOKEN}"},
        "json_body": {"name": "{{ first }} {{ last }}", "age": "{{ age }}",
                      "tags": ["vip", "{{ id }}"], "note": "id={{ id }}",
                      "nested": {"key": "{{ key }}"}},
        "response_fields": {"score": "result.score", "labels": "result.labels",
                            "request_id": "id"},
    }
    handler = build_handler("http", params, tmp_path)
    output = handler({"id": 42, "first": "Ada", "last": "Lovelace", "age": 36},
                     context(tmp_path, key="42"))
    httpserver_ipv4.check_assertions()
    assert output == {"lookup_status": 200, "score": 0.93, "labels": ["good"],
                      "request_id": "r-1"}


@pytest.mark.integration
def test_relative_url_uses_the_http_resource(tmp_path: Path, httpserver_ipv4: HTTPServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_USER_PW", "pw")
    httpserver_ipv4.expect_request(
        "/api/v1/items/a b", query_string="full=1",  # werkzeug matches the decoded path
        headers={"Authorization": "Basic dXNlcjpwdw==", "X-Default": "yes"},
    ).respond_with_json({"ok": True})
    resource = HttpResource(base_url=httpserver_ipv4.url_for("/api/v1/"),
                            headers={"X-Default": "yes"}, timeout_s=5)
    handler = build_handler("http", {
        "url": "items/{{ name | urlencode }}?full=1",
        "auth": {"type": "basic", "username": "user", "password": "${env:API_USER_PW}"},
        "response_fields": {"body": ""},
    }, tmp_path)
    output = handler({"name": "a b"}, context(tmp_path, resource=resource))
    httpserver_ipv4.check_assertions()
    assert output == {"lookup_status": 200, "body": {"ok": True}}


@pytest.mark.integration
def test_errors_carry_status_and_retry_after(tmp_path: Path,
                                             httpserver_ipv4: HTTPServer) -> None:
    httpserver_ipv4.expect_request("/busy").respond_with_data(
        "slow down", status=429, headers={"Retry-After": "7"})
    httpserver_ipv4.expect_request("/missing").respond_with_data("nope", status=404)
    httpserver_ipv4.expect_request("/text").respond_with_data("plain text")
    handler = build_handler("http", {"url": httpserver_ipv4.url_for("/busy")}, tmp_path)
    with pytest.raises(HttpStatusError, match="transient error 429, retry after 7s") as busy:
        handler({}, context(tmp_path))
    assert busy.value.status_code == 429 and busy.value.retry_after_s == 7.0
    assert busy.value.transient

    handler = build_handler("http", {"url": httpserver_ipv4.url_for("/missing")}, tmp_path)
    with pytest.raises(HttpStatusError, match="unexpected status 404: nope") as missing:
        handler({}, context(tmp_path))
    assert missing.value.status_code == 404 and not missing.value.transient
    expected = build_handler("http", {"url": httpserver_ipv4.url_for("/missing"),
                                      "expected_status": [200, 404]}, tmp_path)
    assert expected({}, context(tmp_path)) == {"lookup_status": 404}

    handler = build_handler("http", {"url": httpserver_ipv4.url_for("/text"),
                                     "response_fields": {"x": "a.b"}}, tmp_path)
    with pytest.raises(ValueError, match="the response is not JSON"):
        handler({}, context(tmp_path))


@pytest.mark.integration
def test_missing_env_var_and_unsafe_template_fail_clearly(tmp_path: Path,
                                                          httpserver_ipv4: HTTPServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    handler = build_handler("http", {"url": httpserver_ipv4.url_for("/"),
                                     "headers": {"X-Key": "${env:NO_SUCH_TOKEN}"}}, tmp_path)
    with pytest.raises(ValueError, match="headers: environment variable NO_SUCH_TOKEN is not set"):
        handler({}, context(tmp_path))
    handler = build_handler("http", {"url": httpserver_ipv4.url_for("/"),
                                     "json_body": {"x": "{{ ''.__class__.__mro__ }}"}}, tmp_path)
    with pytest.raises(ValueError, match=r"json_body.x: unsafe template: access to attribute"):
        handler({}, context(tmp_path))
    relative = build_handler("http", {"url": "/items"}, tmp_path)
    with pytest.raises(ValueError, match="relative and the http resource has no base_url"):
        relative({}, context(tmp_path))
    assert httpserver_ipv4.log == []


@pytest.mark.unit
def test_retry_after_parsing() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert 50 < (retry_after_seconds(_http_date(60)) or 0) <= 60


def _http_date(seconds_ahead: float) -> str:
    import time
    from email.utils import formatdate

    return formatdate(time.time() + seconds_ahead, usegmt=True)


def retry_spec(server: HTTPServer) -> dict[str, Any]:
    return {
        "name": "calls",
        "source": {"type": "inline", "key": "id",
                   "items": [{"id": i, "name": f"n{i}"} for i in range(1, 5)]},
        "phases": [{
            "name": "lookup", "task": "http",
            "params": {"method": "POST", "url": server.url_for("/items/{{ id }}"),
                       "json_body": {"name": "{{ name }}"},
                       "response_fields": {"echo": "echo"}},
            "retry": {"max_attempts": 3, "delay_s": 0, "retry_on": [503]},
        }],
        "options": {"concurrency": 2, "on_error": "continue", "tolerated_failures": 1},
    }


@pytest.mark.job
@pytest.mark.integration
def test_engine_retries_503_then_succeeds(batch_dir: Path, instance: dg.DagsterInstance,
                                          httpserver_ipv4: HTTPServer) -> None:
    def echo(request: Request) -> Response:
        return Response(json.dumps({"echo": request.get_json()["name"]}),
                        content_type="application/json")

    for i in (1, 2, 3):  # each of these answers 503 once, then works
        httpserver_ipv4.expect_oneshot_request(f"/items/{i}").respond_with_data(
            "unavailable", status=503, headers={"Retry-After": "0"})
        httpserver_ipv4.expect_request(f"/items/{i}").respond_with_handler(echo)
    httpserver_ipv4.expect_request("/items/4").respond_with_data("gone", status=410)
    write_batch(batch_dir, retry_spec(httpserver_ipv4))

    result = run_batch(batch_dir, instance, "calls")

    assert result.success
    rows = BatchStorageResource().ledger(instance).rows(result.run_id).set_index("item_key")
    for key in ("1", "2", "3"):
        assert rows.loc[key, "status"] == "succeeded" and rows.loc[key, "attempts"] == 2
        assert json.loads(rows.loc[key, "output"])["echo"] == f"n{key}"
        log = json.loads(rows.loc[key, "attempt_log"])
        assert log[0]["error"].startswith("HttpStatusError: POST ")
        assert "transient error 503" in log[0]["error"]
    # 410 is not in retry_on: one attempt, failed, tolerated.
    assert rows.loc["4", "status"] == "failed" and rows.loc["4", "attempts"] == 1
    assert "unexpected status 410" in rows.loc["4", "error"]
    assert len(httpserver_ipv4.log) == 7  # 3 x (503 + 200) + 1 x 410
