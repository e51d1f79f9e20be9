"""SMTP server the `email` task sends through; credentials come from the environment."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field


class SmtpResource(dg.ConfigurableResource):
    """Where mail goes. Give secrets as `dg.EnvVar("SMTP_PASSWORD")` (read when a run starts,
    never at import), e.g. `SmtpResource(host="smtp.example.com", port=587, starttls=True,
    username="batch", password=dg.EnvVar("SMTP_PASSWORD"))`."""

    host: str = Field(default="localhost", description="SMTP server host")
    port: int = Field(default=25, description="SMTP server port (587 with starttls)")
    starttls: bool = Field(default=False, description="Upgrade the connection with STARTTLS")
    username: str | None = Field(default=None, description="Login user; none: no login")
    password: str | None = Field(default=None, description="Login password (use dg.EnvVar)")
    timeout_s: float = Field(default=30.0, gt=0, description="Socket timeout per operation")
    from_addr: str = Field(default="batch-defs@localhost",
                           description="Sender when the phase gives no from_addr")

    @contextmanager
    def get_connection(self) -> Iterator[smtplib.SMTP]:
        """A connected (and logged-in) SMTP session, closed with QUIT afterwards."""
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, self.password or "")
            yield smtp
