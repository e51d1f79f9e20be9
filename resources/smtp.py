"""SMTP server the `email` task sends through; credentials come from the environment."""

from __future__ import annotations

import os
import smtplib
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from batch_defs.secrets import register_resources


class SmtpResource(dg.ConfigurableResource):
    """Where mail goes. Give secrets as `dg.EnvVar("SMTP_PASSWORD")` (read when a run starts,
    never at import), e.g. `SmtpResource(host="smtp.example.com", port=587, starttls=True,
    username="batch", password=dg.EnvVar("SMTP_PASSWORD"))`."""

    # Unset: SMTP_HOST / SMTP_PORT from the environment when a message is sent (so `batch-defs
    # run` reaches a local test server without run config), else localhost:25.
    host: str | None = Field(default=None, description="SMTP server host; empty: $SMTP_HOST "
                             "at send time, else localhost")
    port: int | None = Field(default=None, description="SMTP server port (587 with starttls); "
                             "empty: $SMTP_PORT at send time, else 25")
    starttls: bool = Field(default=False, description="Upgrade the connection with STARTTLS")
    username: str | None = Field(default=None, description="Login user; none: no login")
    password: str | None = Field(default=None, description="Login password (use dg.EnvVar)")
    timeout_s: float = Field(default=30.0, gt=0, description="Socket timeout per operation")
    from_addr: str = Field(default="batch-defs@localhost",
                           description="Sender when the phase gives no from_addr")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # A server may echo the password back in an error; masked from the run's start.
        register_resources([self])

    @contextmanager
    def get_connection(self) -> Iterator[smtplib.SMTP]:
        """A connected (and logged-in) SMTP session, closed with QUIT afterwards."""
        register_resources([self])  # also outside a run (sensors, tests)
        host = self.host or os.environ.get("SMTP_HOST") or "localhost"
        port = self.port or int(os.environ.get("SMTP_PORT") or 25)
        with smtplib.SMTP(host, port, timeout=self.timeout_s) as smtp:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, self.password or "")
            yield smtp
