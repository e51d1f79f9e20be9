"""A SQL database the `sql` task writes to, by SQLAlchemy URL (PostgreSQL, MySQL, SQLite)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import sqlalchemy as sa
from pydantic import Field, PrivateAttr

from batch_defs.secrets import register_url
from batch_defs.tasks.sql import create_engine


class DatabaseResource(dg.ConfigurableResource):
    """The database of `sql` phases that name no `url` of their own. Give the URL as
    `dg.EnvVar("TARGET_DB_URL")` (read when a run starts, never at import), e.g.
    `DatabaseResource(url=dg.EnvVar("TARGET_DB_URL"))`.

    It owns the engines (connection pools) of the `sql` task and `sql_commit`, one per URL
    (phases with their own `url` too): opened on first use, disposed at the run's end
    (teardown_after_execution), or by dispose() outside a run."""

    url: str = Field(default="", description="SQLAlchemy URL, e.g. "
                     "postgresql+psycopg2://user:pw@host/db, mysql+pymysql://..., "
                     "sqlite:///path.db (use dg.EnvVar for secrets)")

    _engines: dict[str, sa.Engine] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        register_url(self.url)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.dispose()

    def engine(self, url: str | None = None) -> sa.Engine:
        """The pooled engine of `url` (default: the resource's own), shared by a phase's
        slots; the URL's password is masked in errors from now on."""
        url = url or self.url
        if not url:
            raise ValueError("the database resource has no url: configure it, or give the "
                             "sql phase a `url` param")
        with self._lock:
            if url not in self._engines:
                register_url(url)
                self._engines[url] = create_engine(url)
            return self._engines[url]

    def dispose(self) -> None:
        """Close every pooled connection of the engines this resource opened."""
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.dispose()

    def get_engine(self) -> sa.Engine:
        return self.engine(self.url)

    @contextmanager
    def get_connection(self) -> Iterator[sa.Connection]:
        """A connection in a transaction, committed when the block ends without error."""
        with self.get_engine().begin() as connection:
            yield connection
