"""Run-end notifications: a JSON payload, sent by email (SMTP) and as webhook POSTs."""

from __future__ import annotations

import logging
import os
from email.message import EmailMessage
from typing import Any

import httpx

from batch_defs.env import MissingVariableError, expand_env

log = logging.getLogger("batch_defs.notify")


def webserver_url() -> str:
    """Base URL of the Dagster UI for links in notifications (read when sending)."""
    return os.environ.get("DAGSTER_WEBSERVER_URL", "http://127.0.0.1:3000").rstrip("/")


def payload(batch: str, partition: str | None, run_id: str, status: str, event: str,
            summary: dict[str, Any] | None) -> dict[str, Any]:
    summary = summary or {}
    counts = {k: summary.get(k) for k in ("items", "succeeded", "failed_items", "invalid",
                                         "skipped")}
    return {"batch": batch, "partition": partition, "run_id": run_id, "status": status,
            "event": event, "counts": counts, "cost": summary.get("cost", 0.0),
            "tokens": summary.get("tokens", 0), "duration_s": summary.get("duration_s"),
            "stop_reason": summary.get("stop_reason"),
            "url": f"{webserver_url()}/runs/{run_id}"}


def email_message(data: dict[str, Any], sender: str, recipients: list[str]) -> EmailMessage:
    counts = data["counts"]
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = (f"[batch] {data['batch']} {data['partition']}: {data['event']} "
                          f"({counts['succeeded'] or 0}/{counts['items'] or 0} succeeded)")
    lines = [f"Batch {data['batch']}, partition {data['partition']}: {data['event']} "
             f"(Dagster status {data['status']}).", ""]
    lines += [f"{name}: {value}" for name, value in counts.items()]
    lines += [f"cost: {data['cost']}", f"tokens: {data['tokens']}",
              f"duration_s: {data['duration_s']}"]
    if data["stop_reason"]:
        lines.append(f"stopped: {data['stop_reason']}")
    lines += ["", f"Run: {data['url']}", f"Items: batch-defs results {data['run_id']}"]
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
