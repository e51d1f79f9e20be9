"""`email` task: sends one templated message per item through the `smtp` resource, once."""

from __future__ import annotations

import hashlib
import mimetypes
import threading
from email.message import EmailMessage
from email.utils import formataddr, getaddresses
from pathlib import Path
from typing import Any

import jinja2
from pydantic import Field, model_validator

from batch_defs.tasks.base import Handler, TaskContext, TaskParams
from batch_defs.tasks.templating import compile_template, render, template_env, template_vars

# Held from recall() to remember(): an attempt abandoned by the phase's timeout_s may still be
# sending while its retry starts, and the retry must then wait and find the journal entry.
_SEND_LOCKS = [threading.Lock() for _ in range(64)]


class EmailParams(TaskParams):
    to: str = "{{ email }}"  # template; several addresses separated by commas
    subject: str  # template
    body: str | None = None  # template text
    body_template: str | None = None  # or a template file, relative to the batch file's folder
    html: bool = False
    attachments: list[str] = Field(default_factory=list)  # item fields holding file paths
    from_addr: str | None = None  # default: the smtp resource's from_addr

    @model_validator(mode="after")
    def _one_body(self) -> EmailParams:
        if (self.body is None) == (self.body_template is None):
            raise ValueError("give exactly one of 'body' (the text) or 'body_template' (a file)")
        return self


def message_id(idempotency_key: str, from_addr: str) -> str:
    """The same Message-ID for every attempt and run of an item, so receivers can dedupe."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]
    domain = from_addr.rpartition("@")[2].strip("<> ") or "batch-defs.invalid"
    return f"<{digest}@{domain}>"


def recipients(to: str) -> str:
    """The To header for a rendered `to`: every address checked, display names kept."""
    pairs = [(name, address) for name, address in getaddresses([to]) if address]
    if not pairs or any("@" not in address for _, address in pairs):
        raise ValueError(f"'to' rendered to no valid recipient: {to!r}")
    return ", ".join(formataddr(pair) for pair in pairs)


def attachment_path(item: dict[str, Any], field: str, roots: list[Path]) -> Path:
    """The file named by an item field, only inside the output or batch folder: item data
    must not be able to mail out arbitrary files of the machine."""
    if item.get(field) in (None, ""):
        raise ValueError(f"attachment field {field!r} is missing or empty")
    path = Path(str(item[field])).resolve()
    if not any(path.is_relative_to(root.resolve()) for root in roots):
        raise PermissionError(f"attachment {field}={path} is outside the output and batch "
                              "folders")
    if not path.is_file():
        raise FileNotFoundError(f"attachment {field}={path} does not exist")
    return path


def make_handler(params: EmailParams, base_dir: Path) -> Handler:
    text_env = template_env()
    # Item values are escaped in HTML bodies (and in .html/.xml template files).
    body_env = template_env(
        loader=jinja2.FileSystemLoader(base_dir),
        autoescape=lambda name: params.html or (name or "").endswith((".html", ".htm", ".xml")))
    to_template = compile_template(text_env, params.to, "to")
    subject_template = compile_template(text_env, params.subject, "subject")
    if params.body_template:
        try:
            body_template = body_env.get_template(params.body_template)
        except jinja2.TemplateError as exc:
            raise ValueError(f"body_template {params.body_template}: {exc}") from exc
    else:
        body_template = compile_template(body_env, params.body or "", "body")

    def build(item: dict[str, Any], ctx: TaskContext, sender: str) -> EmailMessage:
        variables = template_vars(item, ctx)
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = recipients(render(to_template, variables, "to"))
        msg["Subject"] = render(subject_template, variables, "subject").strip()
        msg["Message-ID"] = message_id(ctx.idempotency_key, sender)
        body = render(body_template, variables, params.body_template or "body")
        msg.set_content(body, subtype="html" if params.html else "plain")
        for field in params.attachments:
            path = attachment_path(item, field, [ctx.output_dir, ctx.base_dir])
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            maintype, subtype = kind.split("/", 1)
            msg.add_attachment(path.read_bytes(), maintype=maintype, subtype=subtype,
                               filename=path.name)
        return msg

    def send(item: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        smtp = ctx.resources["smtp"]
        sender = params.from_addr or smtp.from_addr
        with _SEND_LOCKS[hash(ctx.idempotency_key) % len(_SEND_LOCKS)]:
            sent = ctx.recall()
            if sent is not None:
                ctx.log.info(f"{ctx.key}: already sent as {sent['message_id']}, not resending")
                return {"email_message_id": sent["message_id"], "email_to": sent["to"]}
            msg = build(item, ctx, sender)
            sent = {"message_id": str(msg["Message-ID"]), "to": str(msg["To"])}
            with smtp.get_connection() as connection:
                refused = connection.send_message(msg)
                # Journal at once, before QUIT: a failure from here on must not lead to a
                # second message.
                ctx.remember(sent)
        if refused:
            ctx.log.warning(f"{ctx.key}: recipients refused: {sorted(refused)}")
        return {"email_message_id": sent["message_id"], "email_to": sent["to"]}

    return send
