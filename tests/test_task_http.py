"""The `http` task against a real HTTP server (pytest-httpserver) on 127.0.0.1: templated
requests, response mapping, auth from the environment, engine retries on 503, and which
origins get credentials (a second server plays the attacker)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from batch_defs.sources.remote import retry_after_seconds
from batch_defs.tasks import TaskContext, build_handler
from batch_defs.tasks.http import HostNotAllowedError, HttpStatusError
from resources.http import HttpResource
from resources.storage import BatchStorageResource
from tests.conftest import run_batch, write_batch

OPENED: list[HttpResource] = []  # resources handed to handlers in this test, closed after it


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Outside a run nobody tears the resources down: their clients are closed here."""
    yield
    for resource in OPENED:
        resource.close()
    OPENED.clear()


def context(tmp_path: Path, key: str = "1", resource: HttpResource | None = None) -> TaskContext:
    resource = resource or HttpResource()
    OPENED.append(resource)
    return TaskContext(params={}, batch="calls", partition="p1", run_id="run-1", phase="lookup",
                       key=key, base_dir=tmp_path, output_dir=tmp_path,
                       resources={"http": resource})


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


@pytest.fixture
def attacker() -> Iterator[HTTPServer]:
    """A second server on loopback, standing for a host an item's data points at."""
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    yield server
    server.clear()
    server.stop()


def origin_of(server: HTTPServer) -> str:
    return f"http://127.0.0.1:{server.port}"


def trusted_api(server: HTTPServer, monkeypatch: pytest.MonkeyPatch, **fields: Any) -> HttpResource:
    monkeypatch.setenv("TRUSTED_API_KEY", "key-for-the-trusted-api")
    return HttpResource(base_url=server.url_for("/api"),
                        headers={"Authorization": "Bearer token-for-the-trusted-api",
                                 "X-Api-Key": "${env:TRUSTED_API_KEY}", "X-Client": "batch"},
                        **fields)


CREDENTIALS = ("authorization", "x-api-key", "x-phase-token")


def received_headers(server: HTTPServer) -> list[dict[str, str]]:
    return [{k.lower(): v for k, v in request.headers.items()} for request, _ in server.log]


@pytest.mark.integration
def test_resource_credentials_go_only_to_its_origin(tmp_path: Path, httpserver_ipv4: HTTPServer,
                                                    attacker: HTTPServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    httpserver_ipv4.expect_request("/api/hook", method="POST").respond_with_json({"ok": True})
    attacker.expect_request("/steal").respond_with_json({"thanks": True})
    resource = trusted_api(httpserver_ipv4, monkeypatch)
    handler = build_handler("http", {"method": "POST", "url": "{{ callback }}",
                                     "json_body": {"id": "{{ id }}"}}, tmp_path)
    ok = handler({"id": 1, "callback": httpserver_ipv4.url_for("/api/hook")},
                 context(tmp_path, resource=resource))
    assert ok == {"lookup_status": 200}

    hostile = [attacker.url_for("/steal"),
               # userinfo: the host is what follows the @
               f"http://127.0.0.1:{httpserver_ipv4.port}@127.0.0.1:{attacker.port}/steal"]
    for callback in hostile:
        with pytest.raises(HostNotAllowedError) as refused:
            handler({"id": 2, "callback": callback}, context(tmp_path, resource=resource))
        message = str(refused.value)
        assert message.startswith(f"{origin_of(attacker)} is not an origin this phase may call")
        assert f"trusted: {origin_of(httpserver_ipv4)}" in message
        assert "allowed_origins" in message and "other_origins: without_credentials" in message
        assert refused.value.transient is False  # the engine does not retry it
    # A spelled-out host followed by a template is not spelled out: `{{ path }}` could be
    # `@attacker/...`.
    glued = build_handler("http", {"url": f"http://127.0.0.1:{httpserver_ipv4.port}{{{{ path }}}}"},
                          tmp_path)
    with pytest.raises(HostNotAllowedError):
        glued({"path": f"@127.0.0.1:{attacker.port}/steal"}, context(tmp_path, resource=resource))

    assert attacker.log == []
    (trusted,) = received_headers(httpserver_ipv4)
    assert trusted["authorization"] == "Bearer token-for-the-trusted-api"
    assert trusted["x-api-key"] == "key-for-the-trusted-api"


@pytest.mark.unit
def test_origins_compare_scheme_host_and_port() -> None:
    resource = HttpResource(base_url="https://API.example.com/v1",
                            allowed_origins=["http://files.example.com:8080/any/path"])
    assert resource.trusted_origins() == {"https://api.example.com:443",
                                          "http://files.example.com:8080"}
    with pytest.raises(ValueError, match="allowed_origins: not an absolute http.s. URL"):
        HttpResource(allowed_origins=["files.example.com"]).trusted_origins()
    misconfigured = HttpResource(allowed_origins=["ftp://files.example.com"])
    with pytest.raises(ValueError, match="allowed_origins"):  # when the run starts
        misconfigured.setup_for_execution(dg.build_init_resource_context())
    misconfigured.close()


@pytest.mark.integration
def test_other_origins_get_no_credentials_unless_allowed(tmp_path: Path,
                                                         httpserver_ipv4: HTTPServer,
                                                         attacker: HTTPServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    attacker.expect_request("/hook").respond_with_json({"ok": True})
    monkeypatch.setenv("PHASE_TOKEN", "token-of-the-phase")
    params = {"url": "{{ callback }}", "other_origins": "without_credentials",
              "headers": {"X-Trace": "t-1", "X-Phase-Token": "${env:PHASE_TOKEN}"},
              "auth": {"type": "bearer", "token": "${env:PHASE_TOKEN}"}}
    handler = build_handler("http", params, tmp_path)
    item = {"callback": attacker.url_for("/hook")}
    resource = trusted_api(httpserver_ipv4, monkeypatch)
    assert handler(item, context(tmp_path, resource=resource)) == {"lookup_status": 200}
    (bare,) = received_headers(attacker)
    assert bare["x-trace"] == "t-1"
    assert not [name for name in (*CREDENTIALS, "x-client") if name in bare]

    # The resource's allow-list is the way to send its headers (and the phase's) elsewhere.
    allowed = trusted_api(httpserver_ipv4, monkeypatch, allowed_origins=[origin_of(attacker)])
    strict = build_handler("http", {**params, "other_origins": "refuse"}, tmp_path)
    assert strict(item, context(tmp_path, resource=allowed)) == {"lookup_status": 200}
    trusted = received_headers(attacker)[1]
    assert trusted["authorization"] == "Bearer token-of-the-phase"  # the phase's auth wins
    assert (trusted["x-api-key"], trusted["x-phase-token"]) == ("key-for-the-trusted-api",
                                                                "token-of-the-phase")
    assert httpserver_ipv4.log == []


@pytest.mark.integration
def test_a_url_spelled_out_in_the_spec_gets_the_phase_auth_only(
        tmp_path: Path, httpserver_ipv4: HTTPServer, attacker: HTTPServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    attacker.expect_request("/v1/items/7").respond_with_json({"ok": True})
    monkeypatch.setenv("PHASE_TOKEN", "token-of-the-phase")
    handler = build_handler("http", {"url": attacker.url_for("/v1/items/{{ id }}"),
                                     "auth": {"type": "bearer", "token": "${env:PHASE_TOKEN}"}},
                            tmp_path)
    resource = trusted_api(httpserver_ipv4, monkeypatch)
    assert handler({"id": 7}, context(tmp_path, resource=resource)) == {"lookup_status": 200}
    (got,) = received_headers(attacker)
    assert got["authorization"] == "Bearer token-of-the-phase"
    assert "x-api-key" not in got and "x-client" not in got  # the resource's are not for it


@pytest.mark.job
@pytest.mark.integration
def test_an_item_pointing_elsewhere_fails_once_in_a_job(batch_dir: Path,
                                                        instance: dg.DagsterInstance,
                                                        httpserver_ipv4: HTTPServer,
                                                        attacker: HTTPServer) -> None:
    httpserver_ipv4.expect_request("/api/hook/1").respond_with_json({"ok": True})
    write_batch(batch_dir, {
        "name": "callbacks",
        "source": {"type": "inline", "key": "id", "items": [
            {"id": 1, "callback": httpserver_ipv4.url_for("/api/hook/1")},
            {"id": 2, "callback": attacker.url_for("/steal")}]},
        "phases": [{"name": "notify", "task": "http", "params": {"url": "{{ callback }}"},
                    "retry": {"max_attempts": 3, "delay_s": 0}}],
        "options": {"on_error": "continue", "tolerated_failures": 1},
    })
    config = {"resources": {"http": {"config": {
        "base_url": httpserver_ipv4.url_for("/api"),
        "headers": {"Authorization": "Bearer token-for-the-trusted-api"}}}}}
    result = run_batch(batch_dir, instance, "callbacks", run_config=config)
    assert result.success
    rows = BatchStorageResource().ledger(instance).rows(result.run_id).set_index("item_key")
    assert rows.loc["1", "status"] == "succeeded"
    assert (rows.loc["2", "status"], rows.loc["2", "attempts"]) == ("failed", 1)
    assert rows.loc["2", "error"].startswith(
        f"HostNotAllowedError: {origin_of(attacker)} is not an origin this phase may call")
    assert attacker.log == []
    assert received_headers(httpserver_ipv4)[0]["authorization"] == (
        "Bearer token-for-the-trusted-api")
