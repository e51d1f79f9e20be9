"""The batch-defs command, run as users run it: in a subprocess, against a DAGSTER_HOME."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import cli, inline_items, write_batch

pytestmark = pytest.mark.cli


def scoring_batch(batch_dir: Path, fail_keys: list[int], tolerated: int) -> None:
    write_batch(batch_dir, {
        "name": "scoring",
        "description": "scores items; some raise",
        "source": inline_items(40),
        "phases": [
            {"name": "score", "task": "python",
             "params": {"function": "tests.handlers:fail_listed", "fail_keys": fail_keys}},
            {"name": "publish", "task": "python",
             "params": {"function": "tests.handlers:sleep_ms", "ms": 1}},
        ],
        "options": {"concurrency": 4, "on_error": "continue", "tolerated_failures": tolerated},
    })


def run_id_of(output: str) -> str:
    line = next(line for line in output.splitlines() if line.startswith("run "))
    return line.split()[1]


def test_run_within_tolerance_succeeds_and_records_every_item(env: dict[str, str],
                                                               batch_dir: Path) -> None:
    scoring_batch(batch_dir, fail_keys=[5, 17], tolerated=2)
    done = cli(env, "run", "scoring", "--partition", "2026-11")
    assert done.returncode == 0, done.stderr
    assert "SUCCESS" in done.stdout and "40 items: 38 succeeded, 2 failed, 0 invalid" in done.stdout
    assert "score" in done.stderr and "40/40" in done.stderr  # the live progress bars
    run_id = run_id_of(done.stdout)

    failed = cli(env, "results", run_id, "--status", "failed", "--format", "json")
    assert failed.returncode == 0, failed.stderr
    rows = json.loads(failed.stdout)
    assert [(r["item_key"], r["phase"], r["error"]) for r in rows] == [
        ("5", "score", "ValueError: bad record 5"), ("17", "score", "ValueError: bad record 17")]
    assert rows[0]["input"] == {"id": 5, "name": "item 5"}

    everything = json.loads(cli(env, "results", run_id, "--json").stdout)
    statuses = {(r["item_key"], r["phase"]): r["status"] for r in everything}
    assert len(everything) == 40 + 38  # 38 items reached the second phase
    assert statuses[("5", "score")] == "failed" and ("5", "publish") not in statuses
    assert statuses[("6", "publish")] == "succeeded"

    status = json.loads(cli(env, "status", run_id[:8], "--json").stdout)
    assert status["status"] == "SUCCESS" and status["failed"] == 2
    assert {p: {s: n for s, n in c.items() if n} for p, c in status["per_phase"].items()} == {
        "score": {"failed": 2, "succeeded": 38}, "publish": {"succeeded": 38}}

    listed = json.loads(cli(env, "list", "--json").stdout)
    assert listed == [{"name": "scoring", "description": "scores items; some raise",
                       "phases": ["score", "publish"], "partitions": ["2026-11"],
                       "last_run_id": run_id, "last_status": "SUCCESS",
                       "last_partition": "2026-11", "problem": None}]


def test_run_beyond_tolerance_exits_non_zero(env: dict[str, str], batch_dir: Path) -> None:
    scoring_batch(batch_dir, fail_keys=[5, 17, 30], tolerated=2)
    done = cli(env, "run", "scoring")
    assert done.returncode == 1
    assert "FAILURE" in done.stdout and "first failed, invalid and rejected items" in done.stdout
    csv_rows = cli(env, "results", run_id_of(done.stdout), "--status", "failed",
                   "--format", "csv").stdout.splitlines()
    assert csv_rows[0].startswith("item_key,phase,status,attempts,error")
    assert len(csv_rows) == 4


def test_run_with_data_and_set_overrides(env: dict[str, str], batch_dir: Path,
                                         tmp_path: Path) -> None:
    write_batch(batch_dir, {
        "name": "monthly", "source": {"type": "csv", "path": "default.csv", "key": "id"},
        "phases": [{"name": "score", "task": "python",
                    "params": {"function": "tests.handlers:fail_listed"}}],
    })
    data = tmp_path / "customers 2026-11.csv"
    data.write_text("id,name\n1,a\n2,b\n")
    done = cli(env, "run", "monthly", "--data", str(data), "--set", "options.concurrency=2")
    assert done.returncode == 0, done.stderr
    assert "monthly / customers_2026-11" in done.stdout
    bad = cli(env, "run", "monthly", "--set", "options.concurrency=500")
    assert bad.returncode == 2
    assert "--set options.concurrency=500: must be <= 50" in bad.stderr


def test_validate_reports_file_line_and_field(env: dict[str, str], batch_dir: Path) -> None:
    scoring_batch(batch_dir, fail_keys=[], tolerated=0)
    ok = cli(env, "validate")
    assert ok.returncode == 0 and "scoring: 2 phases" in ok.stdout
    (batch_dir / "broken.yaml").write_text(
        "name: broken\nsource: {type: inline, items: [{a: 1}]}\nphases:\n"
        "  - name: one\n    task: python\n    params: {function: 'tests.handlers:sleep_ms'}\n"
        "    retry: {max_attempts: 0}\n")
    bad = cli(env, "validate")
    assert bad.returncode == 1
    assert "broken.yaml:7 phases[0].retry.max_attempts: must be >= 1" in bad.stderr
    only_good = cli(env, "validate", str(batch_dir / "scoring.yaml"))
    assert only_good.returncode == 0


def test_shipped_batches_validate_with_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BATCH_DEFS_PATH"}
    env["DAGSTER_HOME"] = str(tmp_path / "home")
    done = cli(env, "validate")
    assert done.returncode == 0, done.stderr
    assert "demo: 2 phases" in done.stdout


def test_unreadable_source_is_explained(env: dict[str, str], batch_dir: Path) -> None:
    write_batch(batch_dir, {
        "name": "nofile", "source": {"type": "csv", "path": "absent.csv"},
        "phases": [{"name": "score", "task": "python",
                    "params": {"function": "tests.handlers:fail_listed"}}],
    })
    done = cli(env, "run", "nofile", "--partition", "x")
    assert done.returncode == 1
    assert "FAILURE" in done.stdout
    assert "source csv: file not found:" in done.stdout and "absent.csv" in done.stdout
    status = json.loads(cli(env, "status", run_id_of(done.stdout), "--json").stdout)
    assert status["partition"] == "x"
    (failure,) = status["step_failures"]
    assert failure["step"] == "nofile_batch.fan_out"
    assert failure["error"] == f"source csv: file not found: {batch_dir / 'absent.csv'}"


def test_validate_checks_every_item_of_a_data_file(env: dict[str, str], batch_dir: Path,
                                                   tmp_path: Path) -> None:
    write_batch(batch_dir, {
        "name": "people", "source": {"type": "csv", "path": "people.csv", "key": "id",
                                     "schema": {"id": "int", "email": "email"}},
        "phases": [{"name": "score", "task": "python",
                    "params": {"function": "tests.handlers:fail_listed"}}],
    })
    data = tmp_path / "people.csv"
    data.write_text("id,email\n1,a@example.com\nx,b@example.com\n3,nope\n3,c@example.com\n")
    done = cli(env, "validate", "people", "--data", str(data))
    assert done.returncode == 1
    assert "1 valid items, 3 invalid" in done.stdout
    assert "people: item x row 3: id: is not an int ('x')" in done.stderr
    assert "people: item 3 row 4: email: is not an email address" in done.stderr
    assert "people: item 3#row_5 row 5: duplicate key '3' (first at row 4)" in done.stderr
    missing = cli(env, "validate", "people", "--items")
    assert missing.returncode == 1 and "file not found" in missing.stderr


@pytest.fixture
def env(cli_env: dict[str, str]) -> dict[str, str]:
    return cli_env
