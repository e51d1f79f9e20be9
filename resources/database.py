"""A SQL database the `sql` task writes to, by SQLAlchemy URL (PostgreSQL, MySQL, SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import sqlalchemy as sa
from pydantic import Field

from batch_defs.tasks.sql import engine_for


class DatabaseResource(dg.ConfigurableResource):
    """The database of `sql` phases that name no `url` of their own. Give the URL as
    `dg.EnvVar("TARGET_DB_URL")` (read when a run starts, never at import), e.g.
    `DatabaseResource(url=dg.EnvVar("TARGET_DB_URL"))`."""

    url: str = Field(default="", description="SQLAlchemy URL, e.g. "
                     "postgresql+psycopg2://user:pw@host/db, mysql+pymysql://..., "
                     "sqlite:///path.db (use dg.EnvVar for secrets)")

    def get_engine(self) -> sa.Engine:
        if not self.url:
            raise ValueError("the database resource has no url: configure it, or give the "
                             "sql phase a `url` param")
        return engine_for(self.url)

    @contextmanager
    def get_connection(self) -> Iterator[sa.Connection]:
        """A connection in a transaction, committed when the block ends without error."""
        with self.get_engine().begin() as connection:
            yield connection
