"""Inbox sensors, schedules and run-end notifications, evaluated as the daemon would."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer

from batch_defs.definitions import build_definitions
from resources.smtp import SmtpResource
from tests.conftest import Inbox, write_batch

pytestmark = pytest.mark.job


def inbox_spec(inbox: Path, **extra: object) -> dict:
    return {
        "name": "arrivals",
        "source": {"type": "csv", "path": "unused.csv", "key": "id",
                   "schema": {"id": "int", "email": "email"}},
        "phases": [{"name": "score", "task": "python",
                    "params": {"function": "tests.handlers:fail_listed"}}],
        "options": {"on_error": "continue", "tolerated_failures": "10%"},
        "sensor": {"inbox": str(inbox), "pattern": "*.csv", "interval_s": 5},
        **extra,
    }


def tick(defs: dg.Definitions, name: str, instance: dg.DagsterInstance,
         cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    return defs.resolve_sensor_def(name)(context)


def run_request(defs: dg.Definitions, instance: dg.DagsterInstance,
                request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def("arrivals")
    return job.execute_in_process(instance=instance, partition_key=request.partition_key,
                                  run_config=request.run_config, tags=request.tags,
                                  raise_on_error=False)


def end_of_run(defs: dg.Definitions, instance: dg.DagsterInstance, run_id: str,
               smtp_port: int = 1) -> None:
    """Evaluate the run-status sensor that matches how the run ended."""
    run = instance.get_run_by_id(run_id)
    assert run is not None
    name = {dg.DagsterRunStatus.SUCCESS: "batch_run_success",
            dg.DagsterRunStatus.FAILURE: "batch_run_failure"}[run.status]
    event_type = (dg.DagsterEventType.RUN_SUCCESS if run.status == dg.DagsterRunStatus.SUCCESS
                  else dg.DagsterEventType.RUN_FAILURE)
    (record,) = instance.all_logs(run_id, of_type=event_type)
    context = dg.build_run_status_sensor_context(
        sensor_name=name, dagster_event=record.dagster_event, dagster_instance=instance,
        dagster_run=run, resources={"smtp": SmtpResource(host="127.0.0.1", port=smtp_port,
                                                         timeout_s=5)})
    defs.resolve_sensor_def(name)(context)


def test_inbox_files_become_partitions_and_runs_once(tmp_path: Path, batch_dir: Path,
                                                      instance: dg.DagsterInstance) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    write_batch(batch_dir, inbox_spec(inbox))
    defs = build_definitions([batch_dir])
    good = "id,email\n1,a@example.com\n2,b@example.com\n"
    for name in ("orders_jan.csv", "orders_feb.csv"):
        (inbox / name).write_text(good)
    (inbox / "orders_bad.csv").write_text("id,email\nx,nope\ny,never\n")  # all invalid
    (inbox / "notes.txt").write_text("not a batch file")

    result = tick(defs, "arrivals_inbox", instance, None)
    assert isinstance(result, dg.SensorResult)
    assert sorted(r.partition_key for r in result.run_requests) == [
        "orders_bad", "orders_feb", "orders_jan"]
    (added,) = result.dynamic_partitions_requests
    assert sorted(added.partition_keys) == ["orders_bad", "orders_feb", "orders_jan"]
    instance.add_dynamic_partitions("arrivals", list(added.partition_keys))  # as the daemon does

    again = tick(defs, "arrivals_inbox", instance, result.cursor)
    assert isinstance(again, dg.SkipReason)  # the same files never launch twice

    outcomes = {}
    for request in result.run_requests:
        assert Path(request.run_config["resources"]["run_overrides"]["config"]["data"]).exists()
        run = run_request(defs, instance, request)
        outcomes[request.partition_key] = run.success
        end_of_run(defs, instance, run.run_id)
    assert outcomes == {"orders_jan": True, "orders_feb": True, "orders_bad": False}
    assert sorted(p.name for p in (inbox / "processed").iterdir()) == [
        "orders_feb.csv", "orders_jan.csv"]
    assert (inbox / "failed" / "orders_bad.csv").exists()
    reason = (inbox / "failed" / "orders_bad.csv.reason.txt").read_text()
    assert "source csv has no valid items (2 invalid)" in reason
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == ["notes.txt"]

    # A new file (or a file dropped again) is picked up on a later tick, once.
    (inbox / "orders_jan.csv").write_text(good + "3,c@example.com\n")
    later = tick(defs, "arrivals_inbox", instance, result.cursor)
    assert isinstance(later, dg.SensorResult)
    assert [r.partition_key for r in later.run_requests] == ["orders_jan-2"]


def test_schedule_names_the_partition_by_its_time(batch_dir: Path,
                                                  instance: dg.DagsterInstance) -> None:
    spec = inbox_spec(Path("."))
    del spec["sensor"]
    spec["schedule"] = "0 6 * * 1-5"
    write_batch(batch_dir, spec)
    defs = build_definitions([batch_dir])
    schedule = defs.resolve_schedule_def("arrivals_schedule")
    assert schedule.cron_schedule == "0 6 * * 1-5"
    when = dt.datetime(2026, 11, 24, 6, 0, tzinfo=dt.UTC)
    context = dg.build_schedule_context(instance=instance, scheduled_execution_time=when,
                                        repository_def=defs.get_repository_def())
    request = schedule.evaluate_tick(context).run_requests[0]
    assert request.partition_key == "2026-11-24T0600"
    assert instance.has_dynamic_partition("arrivals", "2026-11-24T0600")


def test_bad_cron_is_a_spec_error(batch_dir: Path) -> None:
    from batch_defs.loader import load_catalog

    spec = inbox_spec(Path("."))
    spec["schedule"] = "every morning"
    write_batch(batch_dir, spec)
    (broken,) = load_catalog([batch_dir]).broken
    assert "schedule: 'every morning' is not a valid cron" in broken.describe()
    # The code location still loads; the batch's job says why it does not.
    job = build_definitions([batch_dir]).resolve_job_def(spec["name"])
    assert "is not a valid cron expression" in (job.description or "")


@pytest.mark.integration
def test_notifications_by_email_and_webhook(tmp_path: Path, batch_dir: Path,
                                            instance: dg.DagsterInstance,
                                            smtp_server: tuple[Inbox, int],
                                            httpserver: HTTPServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    mailbox, port = smtp_server
    monkeypatch.setenv("DAGSTER_WEBSERVER_URL", "http://dagster.example:3000")
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    httpserver.expect_request("/broken", method="POST").respond_with_data("no", status=500)
    spec = inbox_spec(tmp_path)
    del spec["sensor"]
    spec["source"] = {"type": "inline", "key": "id", "items": [{"id": i} for i in range(1, 6)]}
    spec["phases"][0]["params"]["fail_keys"] = [2]
    spec["options"]["tolerated_failures"] = 0
    spec["notify"] = {"on": ["failure"], "email": ["ops@example.com"],
                      "webhook": [httpserver.url_for("/hook"), httpserver.url_for("/broken")]}
    write_batch(batch_dir, spec)
    defs = build_definitions([batch_dir])
    instance.add_dynamic_partitions("arrivals", ["nov"])
    run = defs.resolve_job_def("arrivals").execute_in_process(
        instance=instance, partition_key="nov", raise_on_error=False)
    assert not run.success
    end_of_run(defs, instance, run.run_id, smtp_port=port)

    (message,) = mailbox.messages()
    assert message["To"] == "ops@example.com"
    assert message["Subject"] == "[batch] arrivals nov: failure (4/5 succeeded)"
    body = message.get_content()
    assert "failed: 1" in body and "  2 (score, failed): ValueError" in body
    assert f"Run: http://dagster.example:3000/runs/{run.run_id}" in body
    hook = next(request for request, _ in httpserver.log if request.path == "/hook")
    data = json.loads(hook.get_data())
    assert data["batch"] == "arrivals" and data["partition"] == "nov"
    assert data["run_id"] == run.run_id and data["status"] == "FAILURE"
    assert data["event"] == "failure" and data["counts"]["failed"] == 1
    assert data["counts"]["succeeded"] == 4 and data["cost"] == 0.0
    assert data["url"] == f"http://dagster.example:3000/runs/{run.run_id}"
    assert "more than the 0 tolerated" in data["stop_reason"]
    # The broken webhook (HTTP 500) was tried and its failure did not stop anything else.
    assert any(request.path == "/broken" for request, _ in httpserver.log)


def test_notification_failures_never_crash_the_sensor(tmp_path: Path, batch_dir: Path,
                                                      instance: dg.DagsterInstance,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    spec = inbox_spec(tmp_path)
    del spec["sensor"]
    spec["source"] = {"type": "inline", "key": "id", "items": [{"id": 1}]}
    spec["notify"] = {"on": ["success"], "email": ["ops@example.com"],
                      "webhook": ["http://127.0.0.1:1/nothing-listens"]}
    write_batch(batch_dir, spec)
    defs = build_definitions([batch_dir])
    instance.add_dynamic_partitions("arrivals", ["nov"])
    run = defs.resolve_job_def("arrivals").execute_in_process(instance=instance,
                                                              partition_key="nov")
    with caplog.at_level("WARNING", logger="batch_defs.notify"):
        end_of_run(defs, instance, run.run_id, smtp_port=1)  # nothing listens on port 1
    failures = [r.getMessage() for r in caplog.records if r.name == "batch_defs.notify"]
    assert len(failures) == 2
    assert failures[0].startswith("notification failed: email to ops@example.com: "
                                  "ConnectionRefusedError")
    assert failures[1].startswith("notification failed: webhook http://127.0.0.1:1/")
