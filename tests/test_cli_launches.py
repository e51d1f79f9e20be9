"""The CLI over the Python API's job management: `launches` with filters and paging, `delete`
with its confirmation, and `results` showing each item's attempt log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli, inline_items, write_batch

pytestmark = pytest.mark.cli


def test_launches_results_attempt_log_and_delete(cli_env: dict[str, str],
                                                 batch_dir: Path) -> None:
    write_batch(batch_dir, {
        "name": "retried", "source": inline_items(3),
        "phases": [{"name": "call", "task": "python",
                    "params": {"function": "tests.handlers:flaky", "failures": 1},
                    "retry": {"max_attempts": 3, "delay_s": 0}}]})
    for key in ("first", "second"):
        done = cli(cli_env, "run", "retried", "--partition", key, "--json")
        assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout)["run_id"]

    table = cli(cli_env, "results", run_id)
    assert "attempt log" in table.stdout
    assert "#1 ConnectionError: attempt 1 refused" in table.stdout
    rows = json.loads(cli(cli_env, "results", run_id, "--json").stdout)
    assert rows[0]["attempt_log"] == [{"attempt": 1, "error": "ConnectionError: attempt 1 "
                                                              "refused", "wait_s": 0.0}]

    listed = cli(cli_env, "launches", "--batch", "retried", "--json")
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert [i["partition"] for i in page["items"]] == ["second", "first"]
    assert {i["state"] for i in page["items"]} == {"succeeded"}
    one = json.loads(cli(cli_env, "launches", "--limit", "1", "--offset", "1",
                         "--json").stdout)
    assert [i["partition"] for i in one["items"]] == ["first"] and one["total"] == 2
    assert json.loads(cli(cli_env, "launches", "--status", "failed", "--json").stdout)[
        "total"] == 0
    shown = cli(cli_env, "launches")
    assert "retried" in shown.stdout and "1-2 of 2" in shown.stderr

    refused = cli(cli_env, "delete", run_id)
    assert refused.returncode == 2 and "confirm it (--yes" in refused.stderr
    deleted = cli(cli_env, "delete", run_id, "--yes")
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted retried / second: 1 run(s), 3 item rows" in deleted.stdout
    left = json.loads(cli(cli_env, "launches", "--json").stdout)
    assert [i["partition"] for i in left["items"]] == ["first"]
