"""Run-end notifications: a JSON payload, sent by email (SMTP) and as webhook POSTs."""

from __future__ import annotations

import logging
import os
from email.message import EmailMessage
from typing import Any

import httpx

from batch_defs.env import MissingVariableError, expand_env
from batch_defs.summary import RunSummary

log = logging.getLogger("batch_defs.notify")


def webserver_url() -> str:
    """Base URL of the Dagster UI for links in notifications (read when sending)."""
    return os.environ.get("DAGSTER_WEBSERVER_URL", "http://127.0.0.1:3000").rstrip("/")


def payload(batch: str, partition: str | None, run_id: str, status: str, event: str,
            summary: RunSummary | None) -> dict[str, Any]:
    """What every notification says: the counts under the summary's names (items,
    succeeded, failed, invalid, rejected, skipped), cost, duration and where to look."""
    summary = summary or RunSummary(run_id=run_id)
    return {"batch": batch, "partition": partition, "run_id": run_id, "status": status,
            "event": event, "counts": summary.counts(), "cost": summary.cost,
            "run_cost": summary.run_cost, "tokens": summary.tokens,
            "duration_s": summary.duration_s, "items_per_s": summary.items_per_s,
            "stop_reason": summary.stop_reason,
            "failures": [f.model_dump(mode="json") for f in summary.failures],
            "all_failures": summary.results_hint(),
            "url": f"{webserver_url()}/runs/{run_id}"}


def email_message(data: dict[str, Any], sender: str, recipients: list[str]) -> EmailMessage:
    counts = data["counts"]
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = (f"[batch] {data['batch']} {data['partition']}: {data['event']} "
                          f"({counts['succeeded']}/{counts['items']} succeeded)")
    lines = [f"Batch {data['batch']}, partition {data['partition']}: {data['event']} "
             f"(Dagster status {data['status']}).", ""]
    lines += [f"{name}: {value}" for name, value in counts.items()]
    lines += [f"cost: {data['cost']} (this run: {data['run_cost']})",
              f"tokens: {data['tokens']}", f"duration_s: {data['duration_s']}",
              f"items_per_s: {data['items_per_s']}"]
    if data["stop_reason"]:
        lines.append(f"stopped: {data['stop_reason']}")
    if data["failures"]:
        lines += ["", "First failed, invalid and rejected items:"]
        lines += [f"  {f['item_key']} ({f['phase']}, {f['status']}): {f['error'] or ''}"
                  for f in data["failures"]]
    lines += ["", f"Run: {data['url']}", f"All of them: {data['all_failures']}"]
    message.set_content("\n".join(lines))
    return message


def send_all(data: dict[str, Any], emails: list[str], webhooks: list[str],
             smtp: Any | None) -> list[str]:
    """Send every notification; return the failures as messages instead of raising, so a
    broken mail server or endpoint never stops the sensor that calls this."""
    problems = []
    if emails:
        try:
            if smtp is None:
                raise RuntimeError("no smtp resource")
            with smtp.get_connection() as connection:
                connection.send_message(email_message(data, smtp.from_addr, emails))
        except Exception as exc:  # any SMTP or socket failure is reported, not raised
            problems.append(f"email to {', '.join(emails)}: {type(exc).__name__}: {exc}")
    for url in webhooks:
        try:
            response = httpx.post(expand_env(url), json=data, timeout=10)
            response.raise_for_status()
        except (httpx.HTTPError, MissingVariableError) as exc:
            problems.append(f"webhook {url}: {type(exc).__name__}: {exc}")
    for problem in problems:
        log.warning("notification failed: %s", problem)
    return problems
