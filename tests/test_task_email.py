"""The `email` task against a real SMTP server (aiosmtpd) on loopback: content, attachments and
exactly-once sending across repeated calls, runs and lost ledger rows."""

from __future__ import annotations

from email.message import EmailMessage, MIMEPart
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from batch_defs.ledger import item_table
from batch_defs.tasks import TaskContext, build_handler
from batch_defs.tasks.email import EmailParams
from batch_defs.tasks.templating import TemplateSecurityError
from resources.smtp import SmtpResource
from resources.storage import BatchStorageResource
from tests.conftest import Inbox, free_port, run_batch, write_batch


def context(tmp_path: Path, port: int, key: str = "7") -> TaskContext:
    return TaskContext(params={}, batch="mailing", partition="p1", run_id="run-1",
                       phase="mail", key=key, base_dir=tmp_path, output_dir=tmp_path / "out",
                       resources={"smtp": SmtpResource(host="127.0.0.1", port=port)})


def text_of(part: MIMEPart | None) -> str:
    """A text part's content with the wire's CRLF line ends undone."""
    assert part is not None
    return part.get_content().replace("\r\n", "\n")


def body_text(message: EmailMessage) -> str:
    return text_of(message.get_body(preferencelist=("plain", "html")))


@pytest.mark.integration
def test_sends_rendered_message_with_attachment(tmp_path: Path,
                                                smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    (tmp_path / "letter.txt.j2").write_text("Dear {{ name }},\nyou owe {{ amount }} EUR.\n")
    invoice = tmp_path / "out" / "p1" / "7.md"
    invoice.parent.mkdir(parents=True)
    invoice.write_text("# Invoice 7\ntotal: 12.50\n")
    params = {"to": "{{ name }} <{{ email }}>", "subject": "Invoice {{ key }} for {{ name }}",
              "body_template": "letter.txt.j2", "attachments": ["render_path"],
              "from_addr": "billing@example.com"}
    handler = build_handler("email", params, tmp_path)
    item = {"id": 7, "name": "Ada", "email": "ada@example.com", "amount": "12.50",
            "render_path": str(invoice)}

    output = handler(item, context(tmp_path, port))

    assert len(inbox.received) == 1
    mail_from, recipients, message = inbox.received[0]
    assert mail_from == "billing@example.com" and recipients == ["ada@example.com"]
    assert message["Subject"] == "Invoice 7 for Ada"
    assert message["To"] == "Ada <ada@example.com>"
    assert body_text(message) == "Dear Ada,\nyou owe 12.50 EUR.\n"
    attachments = list(message.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["7.md"]
    assert text_of(attachments[0]) == "# Invoice 7\ntotal: 12.50\n"
    assert output == {"email_message_id": message["Message-ID"],
                      "email_to": "Ada <ada@example.com>"}
    assert message["Message-ID"].endswith("@example.com>")


@pytest.mark.integration
def test_same_context_twice_sends_once(tmp_path: Path, smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    params = {"subject": "Hello", "body": "Hi {{ name }}"}
    handler = build_handler("email", params, tmp_path)
    ctx = context(tmp_path, port)
    item = {"name": "Bo", "email": "bo@example.com"}

    first = handler(item, ctx)
    second = handler(item, ctx)

    assert len(inbox.received) == 1
    assert first == second
    assert ctx.recall() == {"message_id": first["email_message_id"], "to": "bo@example.com"}
    # Another item (another idempotency key) does get its own message, with its own id.
    other = handler({"name": "Cy", "email": "cy@example.com"}, context(tmp_path, port, "8"))
    assert len(inbox.received) == 2
    assert other["email_message_id"] != first["email_message_id"]


@pytest.mark.integration
def test_message_id_is_stable_per_idempotency_key(tmp_path: Path,
                                                  smtp_server: tuple[Inbox, int]) -> None:
    """A fresh journal (e.g. it was lost) still yields the same Message-ID, so receivers
    that deduplicate on it see one message."""
    inbox, port = smtp_server
    handler = build_handler("email", {"subject": "S", "body": "B"}, tmp_path)
    item = {"email": "dee@example.com"}
    handler(item, context(tmp_path, port))
    handler(item, context(tmp_path, port))
    first, second = inbox.messages()
    assert first["Message-ID"] == second["Message-ID"]


@pytest.mark.integration
def test_html_body_escapes_item_values(tmp_path: Path, smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    params = {"subject": "News for {{ name }}", "body": "<p>Hello {{ name }}</p>", "html": True}
    handler = build_handler("email", params, tmp_path)
    handler({"name": "<script>x</script>", "email": "e@example.com"},
            context(tmp_path, port))
    message = inbox.messages()[0]
    assert message.get_content_type() == "text/html"
    assert body_text(message).strip() == "<p>Hello &lt;script&gt;x&lt;/script&gt;</p>"
    assert message["Subject"] == "News for <script>x</script>"  # headers are not HTML


@pytest.mark.integration
def test_template_reaching_python_internals_fails(tmp_path: Path,
                                                  smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    params = {"subject": "{{ ''.__class__.__mro__ }}", "body": "x"}
    handler = build_handler("email", params, tmp_path)
    with pytest.raises(TemplateSecurityError, match=r"subject: unsafe template: access to "
                                                     r"attribute '__class__' of 'str'"):
        handler({"email": "f@example.com"}, context(tmp_path, port))
    body_params = {"subject": "s", "body": "{{ email.__init__.__globals__ }}"}
    with pytest.raises(TemplateSecurityError, match="body: unsafe template"):
        build_handler("email", body_params, tmp_path)(
            {"email": "f@example.com"}, context(tmp_path, port))
    assert inbox.received == []


@pytest.mark.integration
def test_attachment_outside_output_and_batch_folders_is_refused(
        tmp_path: Path, smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    params = {"subject": "s", "body": "b", "attachments": ["path"]}
    handler = build_handler("email", params, tmp_path / "batch")
    ctx = context(tmp_path / "batch", port)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not send")
    with pytest.raises(PermissionError, match="outside the output and batch folders"):
        handler({"email": "g@example.com", "path": str(secret)}, ctx)
    with pytest.raises(ValueError, match="attachment field 'path' is missing"):
        handler({"email": "g@example.com"}, ctx)
    assert inbox.received == []


@pytest.mark.unit
def test_params_need_one_body_and_a_valid_recipient(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="exactly one of 'body'"):
        EmailParams.model_validate({"subject": "s", "body": "b", "body_template": "t.j2"})
    with pytest.raises(ValidationError, match="exactly one of 'body'"):
        EmailParams.model_validate({"subject": "s"})
    with pytest.raises(ValueError, match="body_template missing.j2"):
        build_handler("email", {"subject": "s", "body_template": "missing.j2"}, tmp_path)
    handler = build_handler("email", {"subject": "s", "body": "b"}, tmp_path)
    with pytest.raises(ValueError, match="'to' rendered to no valid recipient"):
        handler({"email": "not-an-address"}, context(tmp_path, free_port()))


def mailing_spec(n: int) -> dict:
    return {
        "name": "mailing",
        "source": {"type": "inline", "key": "id",
                   "items": [{"id": i, "name": f"Customer {i}", "email": f"c{i}@example.com"}
                             for i in range(1, n + 1)]},
        "phases": [
            {"name": "render", "task": "template",
             "params": {"source": "Invoice for {{ name }}\n", "output": "{partition}/{key}.txt"}},
            {"name": "mail", "task": "email",
             "params": {"subject": "Invoice {{ id }}", "body": "Dear {{ name }}, see attached.",
                        "attachments": ["render_path"], "from_addr": "billing@example.com"},
             "retry": {"max_attempts": 2, "delay_s": 0}},
        ],
        "options": {"concurrency": 3},
    }


@pytest.mark.job
@pytest.mark.integration
def test_batch_sends_one_message_per_item_across_runs(
        batch_dir: Path, instance: dg.DagsterInstance, smtp_server: tuple[Inbox, int]) -> None:
    inbox, port = smtp_server
    write_batch(batch_dir, mailing_spec(4))
    config = {"resources": {"smtp": {"config": {"host": "127.0.0.1", "port": port}}}}

    first = run_batch(batch_dir, instance, "mailing", run_config=config)
    assert first.success
    assert sorted(r for _, rcpt, _ in inbox.received for r in rcpt) == [
        f"c{i}@example.com" for i in range(1, 5)]
    by_subject = {m["Subject"]: m for m in inbox.messages()}
    attachment = next(by_subject["Invoice 3"].iter_attachments())
    assert attachment.get_filename() == "3.txt"
    assert text_of(attachment) == "Invoice for Customer 3\n"
    assert body_text(by_subject["Invoice 3"]).strip() == "Dear Customer 3, see attached."

    ledger = BatchStorageResource().ledger(instance)
    rows = ledger.rows(first.run_id, phase="mail")
    sent_ids = {row.item_key: row.output for row in rows.itertuples()}
    assert set(rows["status"]) == {"succeeded"} and len(sent_ids) == 4

    # The same partition again: succeeded items are reused, nothing is sent.
    again = run_batch(batch_dir, instance, "mailing", run_config=config)
    assert again.success and len(inbox.received) == 4

    # The item rows are lost (as if the run died between sending and recording): the phase
    # runs again, and the effect journal alone keeps the messages from going out twice.
    with ledger.engine.begin() as conn:
        conn.execute(sa.delete(item_table).where(item_table.c.batch == "mailing"))
    third = run_batch(batch_dir, instance, "mailing", run_config=config)
    assert third.success
    assert len(inbox.received) == 4
    rows = ledger.rows(third.run_id, phase="mail")
    assert len(rows) == 4 and rows["reused_from"].isna().all()
    assert {row.item_key: row.output for row in rows.itertuples()} == sent_ids
