"""Resources own their clients: the http and llm tasks use the resource's httpx client and the
sql task and sql_commit the database resource's engines, opened for a run and closed at its
end (Dagster's setup_for_execution / teardown_after_execution)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer

from batch_defs.tasks import AfterContext, TaskContext, build_after_handler, build_handler
from resources.database import DatabaseResource
from resources.http import HttpResource
from resources.llm import LlmResource


def task_context(tmp_path: Path, resources: dict[str, Any], phase: str = "call") -> TaskContext:
    return TaskContext(params={}, batch="b", partition="p", run_id="r", phase=phase, key="1",
                       base_dir=tmp_path, output_dir=tmp_path, resources=resources)


def watch(client: httpx.Client) -> list[str]:
    """The URLs `client` sends requests to, from now on."""
    sent: list[str] = []
    client.event_hooks = {"request": [lambda request: sent.append(str(request.url))],
                          "response": []}
    return sent


def answer(content: str) -> dict[str, Any]:
    return {"choices": [{"message": {"content": content}}], "model": "m",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


@pytest.mark.job
@pytest.mark.integration
def test_http_and_llm_tasks_use_the_clients_their_resources_own(
        tmp_path: Path, httpserver_ipv4: HTTPServer) -> None:
    httpserver_ipv4.expect_request("/api/items/1").respond_with_json({"ok": True})
    httpserver_ipv4.expect_request("/v1/chat/completions").respond_with_json(answer("hi"))
    http_task = build_handler("http", {"url": "/items/{{ id }}"}, tmp_path)
    llm_task = build_handler("llm", {"prompt": "Say hi"}, tmp_path)
    seen: dict[str, Any] = {}

    @dg.op(required_resource_keys={"http", "llm"})
    def call(context) -> None:  # unannotated: Dagster rejects string annotations here
        resources = {"http": context.resources.http, "llm": context.resources.llm}
        for key, client in (("http", resources["http"].client()),
                            ("llm", resources["llm"].client())):
            seen[key] = (client, watch(client))
        assert not any(client.is_closed for client, _ in seen.values())  # opened at setup
        http_task({"id": 1}, task_context(tmp_path, resources))
        llm_task({}, task_context(tmp_path, resources))

    @dg.job(resource_defs={
        "http": HttpResource(base_url=httpserver_ipv4.url_for("/api")),
        "llm": LlmResource(base_url=httpserver_ipv4.url_for("/v1"), api_key="")})
    def calls() -> None:
        call()

    assert calls.execute_in_process().success
    http_client, http_sent = seen["http"]
    llm_client, llm_sent = seen["llm"]
    assert http_sent == [httpserver_ipv4.url_for("/api/items/1")]
    assert llm_sent == [httpserver_ipv4.url_for("/v1/chat/completions")]
    assert http_client is not llm_client
    assert http_client.is_closed and llm_client.is_closed  # closed at teardown


@pytest.mark.unit
def test_outside_a_run_the_client_opens_on_demand_and_close_closes_it(
        tmp_path: Path) -> None:
    resource = HttpResource()
    first = resource.client()
    assert resource.client() is first and not first.is_closed
    resource.close()
    assert first.is_closed
    second = resource.client()  # a later use opens a new one
    assert second is not first and not second.is_closed
    resource.close()


class PoolEvents:
    """Connections an engine's pool handed out and closed."""

    def __init__(self, engine: sa.Engine):
        self.checkouts = self.closed = 0
        sa.event.listen(engine, "checkout", self._checkout)
        sa.event.listen(engine, "close", self._close)

    def _checkout(self, *_args: Any) -> None:
        self.checkouts += 1

    def _close(self, *_args: Any) -> None:
        self.closed += 1


@pytest.mark.job
def test_sql_task_and_commit_use_the_engines_of_the_database_resource(tmp_path: Path) -> None:
    own_url = f"sqlite:///{tmp_path / 'own.db'}"  # a phase's own `url`, as transaction batch
    resource_url = f"sqlite:///{tmp_path / 'resource.db'}"  # the resource's
    for url in (own_url, resource_url):
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("create table t (id integer primary key, name text)")
        engine.dispose()
    staged = build_handler("sql", {"table": "t", "url": own_url, "transaction": "batch"},
                           tmp_path)
    plain = build_handler("sql", {"table": "t"}, tmp_path)
    commit = build_after_handler("sql_commit", {"url": own_url}, tmp_path)
    events: dict[str, PoolEvents] = {}

    @dg.op(required_resource_keys={"database"})
    def write(context) -> None:  # unannotated, as above
        database = context.resources.database
        events.update(own=PoolEvents(database.engine(own_url)),
                      resource=PoolEvents(database.engine()))
        resources = {"database": database}
        staged({"id": 1, "name": "staged"}, task_context(tmp_path, resources, phase="load"))
        plain({"id": 2, "name": "plain"}, task_context(tmp_path, resources))
        after = AfterContext({}, "b", "p", "r", {}, tmp_path, tmp_path, ["load"],
                             resources=resources)
        assert commit(None, after) == {"committed_rows": 1, "committed_tables": ["t"]}
        assert events["own"].checkouts >= 2 and events["resource"].checkouts >= 1
        assert events["own"].closed == events["resource"].closed == 0

    @dg.job(resource_defs={"database": DatabaseResource(url=resource_url)})
    def load() -> None:
        write()

    assert load.execute_in_process().success
    # Disposed at the run's end: the pooled connections are closed.
    assert events["own"].closed >= 1 and events["resource"].closed >= 1


@pytest.mark.unit
def test_sql_task_and_commit_refuse_to_run_without_the_resource(tmp_path: Path) -> None:
    handler = build_handler("sql", {"table": "t", "url": "sqlite:///x.db"}, tmp_path)
    with pytest.raises(ValueError, match="the sql task needs the `database` resource"):
        handler({"id": 1}, task_context(tmp_path, {}))
    commit = build_after_handler("sql_commit", {"url": "sqlite:///x.db"}, tmp_path)
    with pytest.raises(ValueError, match="sql_commit needs the `database` resource"):
        commit(None, AfterContext({}, "b", "p", "r", {}, tmp_path, tmp_path))
    assert not (tmp_path / "x.db").exists()  # no engine was opened behind its back
