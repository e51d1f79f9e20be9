"""When a batch run ends: file its inbox file away and send the notifications it asks for."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from assets.factory import BatchJob
from batch_defs.control import failure_message
from batch_defs.loader import LoadedBatch
from batch_defs.summary import summarize_run
from resources.smtp import SmtpResource
from resources.storage import open_ledger
from sensors.inbox import file_away
from sensors.notify import payload, send_all

ENDINGS = {dg.DagsterRunStatus.SUCCESS: "success", dg.DagsterRunStatus.FAILURE: "failure",
           dg.DagsterRunStatus.CANCELED: "canceled"}


def handle_run_end(context: dg.RunStatusSensorContext, batches: Mapping[str, LoadedBatch],
                   smtp: SmtpResource | None) -> None:
    run = context.dagster_run
    loaded = batches.get(run.job_name)
    if loaded is None:
        return
    instance = context.instance
    state = run.tags.get("batch/state")
    event = state if state in ("paused", "canceled") else ENDINGS[run.status]
    reason = ((failure_message(instance, run.run_id) or "the run failed")
              if event != "success" else None)
    inbox_file = run.tags.get("batch/inbox_file")
    if inbox_file and event != "paused":  # a paused run will be resumed: leave its file
        moved = file_away(inbox_file, event == "success", reason)
        context.log.info(f"inbox file {inbox_file} moved to {moved}")
    notify = loaded.spec.notify
    if notify is None or event not in notify.on:
        return
    with open_ledger(instance) as ledger:
        summary = summarize_run(ledger, run.run_id) if ledger.run(run.run_id) else None
    data = payload(loaded.spec.name, run.tags.get("dagster/partition"), run.run_id,
                   run.status.value, event, summary)
    if reason and not data["stop_reason"]:
        data["stop_reason"] = reason
    problems = send_all(data, notify.email, notify.webhook, smtp)
    for problem in problems:
        context.log.warning(f"notification failed: {problem}")


def build_run_end_sensors(batches: Mapping[str, LoadedBatch],
                          jobs: list[BatchJob]) -> list:
    """One run-status sensor per ending (success, failure, canceled) over all batch jobs."""
    sensors = []
    for status, name in ENDINGS.items():
        @dg.run_status_sensor(name=f"batch_run_{name}", run_status=status, monitored_jobs=jobs,
                              default_status=dg.DefaultSensorStatus.RUNNING,
                              description=f"Files inbox files away and notifies on {name}.")
        def on_end(context: dg.RunStatusSensorContext, smtp: SmtpResource) -> None:
            handle_run_end(context, batches, smtp)

        sensors.append(on_end)
    return sensors
