"""The REST API over real HTTP: `batch-defs serve` in a subprocess on loopback, a launch of
2,000 items in one request, status polled to the end, results paged through; 401 on every
route without a valid token, 429 with Retry-After past a token's quota; the OpenAPI document
served equals docs/openapi.json and validates."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from batch_defs.api.auth import add_token
from tests.conftest import PROJECT, free_port, write_batch

pytestmark = [pytest.mark.integration, pytest.mark.cli]

ALICE = "alice-token-0123456789abcdef"
FAILING = ["13", "1500"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The server, its URL, and the tokens: alice (env var), bob (file, 5 requests/min)."""
    root = tmp_path_factory.mktemp("api")
    batches = root / "batches"
    batches.mkdir()
    write_batch(batches, {
        "name": "bulk",
        "source": {"type": "inline", "key": "id", "items": [{"id": 0}]},
        "phases": [{"name": "check", "task": "python",
                    "params": {"function": "tests.handlers:fail_listed",
                               "fail_keys": FAILING}}],
        "options": {"concurrency": 10, "on_error": "continue", "tolerated_failures": 5},
    })
    tokens_file = root / "tokens"
    bob = add_token(tokens_file, "bob", "5/minute")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(root / "home"), "BATCH_DEFS_PATH": str(batches),
           "PYTHONPATH": str(PROJECT), "BATCH_DEFS_API_TOKENS": f"alice={ALICE}"}
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "batch_defs.cli", "serve", "--port", str(port),
         "--tokens-file", str(tokens_file), "--quota", "100000/minute"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/v1/batches", headers=auth(ALICE)).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError((root / "server.log").read_text())
        time.sleep(0.3)
    try:
        yield {"url": url, "bob": bob, "home": root / "home"}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def get(api: dict[str, Any], path: str, **params: Any) -> Any:
    response = httpx.get(api["url"] + path, params=params, headers=auth(ALICE), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_launch_2000_items_poll_and_page_through_results(api: dict[str, Any]) -> None:
    items = [{"id": i, "text": f"item {i}"} for i in range(2000)]
    created = httpx.post(f"{api['url']}/v1/launches", headers=auth(ALICE), timeout=60,
                         json={"batch": "bulk", "items": items, "partition": "big"})
    assert created.status_code == 201, created.text
    launch = created.json()
    assert launch["items"] == 2000 and launch["state"] in ("starting", "queued", "running")
    deadline, states = time.monotonic() + 240, []
    while True:
        status = get(api, f"/v1/launches/{launch['id']}/status")
        states.append(status["state"])
        if status["run_ended"]:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert status["state"] == "succeeded", status
    assert status["counts"]["succeeded"] == 1998 and status["counts"]["failed"] == 2
    assert status["percent"] == 100.0 and status["total_items"] == 2000
    assert "running" in states or "starting" in states  # it was seen before its end

    keys, offset, pages = [], 0, 0
    while offset is not None:
        page = get(api, f"/v1/launches/{launch['id']}/items", offset=offset, limit=500)
        assert page["total"] == 2000
        keys += [item["key"] for item in page["items"]]
        offset, pages = page["next_offset"], pages + 1
    assert pages == 4 and keys == [str(i) for i in range(2000)]
    failed = get(api, f"/v1/runs/{status['run_id'][:12]}/items", status="failed")
    assert [(i["key"], i["phases"]["check"]["error"]) for i in failed["items"]] == [
        ("13", "ValueError: bad record 13"), ("1500", "ValueError: bad record 1500")]
    analytics = get(api, f"/v1/launches/{launch['id']}/analytics")
    assert analytics["phases"][0]["success_rate"] == 0.999
    listed = get(api, "/v1/launches", batch="bulk", state="succeeded")
    assert [i["id"] for i in listed["items"]] == [launch["id"]]


def test_create_without_start_then_start_and_delete(api: dict[str, Any]) -> None:
    url, headers = api["url"], auth(ALICE)
    made = httpx.post(f"{url}/v1/launches", headers=headers, json={
        "batch": "bulk", "items": [{"id": 1}, {"id": 2}], "start": False}).json()
    assert made["state"] == "created" and re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}",
                                                       made["partition"])
    assert httpx.post(f"{url}/v1/launches/{made['id']}/start",
                      headers=headers).status_code == 202
    deadline = time.monotonic() + 120
    while get(api, f"/v1/launches/{made['id']}")["state"] != "succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    refused = httpx.delete(f"{url}/v1/launches/{made['id']}", headers=headers)
    assert refused.status_code == 409 and "confirm" in refused.json()["detail"]
    deleted = httpx.delete(f"{url}/v1/launches/{made['id']}", headers=headers,
                           params={"confirm": "true"})
    assert deleted.status_code == 200 and deleted.json()["item_rows"] == 2
    assert httpx.get(f"{url}/v1/launches/{made['id']}", headers=headers).status_code == 404


def test_bad_requests_name_the_problem(api: dict[str, Any]) -> None:
    url, headers = api["url"], auth(ALICE)
    too_many = httpx.post(f"{url}/v1/launches", headers=headers, timeout=60, json={
        "batch": "bulk", "items": [{"id": i} for i in range(10_001)]})
    assert too_many.status_code == 422
    assert too_many.json()["detail"][0]["loc"] == ["body", "items"]
    unknown = httpx.post(f"{url}/v1/launches", headers=headers, json={"batch": "nope"})
    assert unknown.status_code == 422 and "no batch named 'nope'" in unknown.json()["detail"]
    rewrite = httpx.post(f"{url}/v1/launches", headers=headers, json={
        "batch": "bulk", "sets": ["phases[0].params.function=os:system"]})
    assert rewrite.status_code == 422
    assert "only options.* may be set over the API" in rewrite.json()["detail"][0]["msg"]
    escape = httpx.post(f"{url}/v1/launches", headers=headers, json={
        "batch": "bulk", "partition": "../other"})
    assert escape.status_code == 422 and escape.json()["detail"][0]["loc"] == [
        "body", "partition"]
    missing = httpx.get(f"{url}/v1/runs/feedbeef/status", headers=headers)
    assert missing.status_code == 404 and missing.json()["detail"] == "no run 'feedbeef'"


def test_every_route_refuses_a_missing_or_wrong_token(api: dict[str, Any]) -> None:
    document = get(api, "/openapi.json")
    calls = [("get", "/openapi.json")] + [
        (method, re.sub(r"\{[^}]+\}", "bulk.0123456789abcdef", path))
        for path, operations in document["paths"].items() for method in operations]
    assert len(calls) >= 15
    for method, path in calls:
        for headers in ({}, auth("wrong"), {"Authorization": f"Basic {ALICE}"}):
            response = httpx.request(method, api["url"] + path, headers=headers, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["WWW-Authenticate"] == "Bearer"


def test_quota_past_its_limit_is_429_with_retry_after(api: dict[str, Any]) -> None:
    bob = auth(api["bob"])
    codes = [httpx.get(f"{api['url']}/v1/batches", headers=bob).status_code
             for _ in range(6)]
    assert codes == [200] * 5 + [429]
    limited = httpx.get(f"{api['url']}/v1/batches", headers=bob)
    assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
    assert "quota of token 'bob'" in limited.json()["detail"]
    # Quotas are per token: alice goes on.
    assert httpx.get(f"{api['url']}/v1/batches", headers=auth(ALICE)).status_code == 200


def surface(document: dict[str, Any]) -> dict[str, Any]:
    """What an API's user relies on: operations, their parameters, the models' fields (not
    how a FastAPI or pydantic release happens to spell the schemas)."""
    return {
        "operations": {(path, method): (op.get("operationId"),
                                        sorted(p["name"] for p in op.get("parameters", [])),
                                        sorted(op.get("responses", {})))
                       for path, ops in document["paths"].items() for method, op in ops.items()},
        "models": {name: sorted(schema.get("properties", {}))
                   for name, schema in document["components"]["schemas"].items()},
    }


def test_served_openapi_document_is_the_checked_in_one_and_valid(api: dict[str, Any]) -> None:
    served = get(api, "/openapi.json")
    validate(served)
    checked_in = json.loads((PROJECT / "docs" / "openapi.json").read_text())
    validate(checked_in)
    assert surface(served) == surface(checked_in), \
        "docs/openapi.json is stale: batch-defs serve --openapi > docs/openapi.json"
    assert served["components"]["securitySchemes"] == {
        "HTTPBearer": {"type": "http", "scheme": "bearer",
                       "description": served["components"]["securitySchemes"]["HTTPBearer"][
                           "description"]}}


@pytest.mark.unit
def test_tokens_are_stored_hashed(tmp_path: Path) -> None:
    from batch_defs.api.auth import TokenBook, read_tokens_file

    path = tmp_path / "tokens"
    token = add_token(path, "carol", "10/second")
    text = path.read_text()
    assert token not in text and text.startswith("carol scrypt$16384$8$1$")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    book = TokenBook(read_tokens_file(path))
    assert book.verify(token) is not None and book.verify(token).name == "carol"
    assert book.verify(token + "x") is None and book.verify("") is None
    path.write_text("carol md5$abc\n")
    with pytest.raises(ValueError, match=r"tokens:1: token 'carol': not scrypt"):
        read_tokens_file(path)
