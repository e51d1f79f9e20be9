"""`sql` task and `sql_commit` after step: items as table rows, values always bound parameters."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import ConfigDict, Field, model_validator
from sqlalchemy.dialects import mysql, postgresql, sqlite

from batch_defs.env import resolve_url
from batch_defs.tasks.base import (
    AfterContext,
    AfterHandler,
    ItemsFailed,
    TaskContext,
    TaskParams,
)
from batch_defs.tasks.templating import compile_value, template_env, template_vars

Mode = Literal["insert", "upsert", "update", "delete"]
STAGE_KEY = "batch_item_key"  # primary key of a staging table: re-staging an item replaces it
STAGE_REGISTRY = "batch_sql_stage"  # which staging tables wait for sql_commit, and how


def create_engine(url: str) -> sa.Engine:
    """An engine for a target database (the `database` resource owns and disposes it)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ValueError(f"not a SQLAlchemy database URL: {exc}") from exc
    if parsed.get_backend_name() != "sqlite":
        # A phase may run up to 50 slots against the database at once.
        return sa.create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=40)
    engine = sa.create_engine(parsed, connect_args={"timeout": 30})

    # pysqlite opens transactions late and commits on its own around SAVEPOINT, which breaks
    # per-row savepoints (transaction: chunk); SQLAlchemy's documented remedy is to turn that
    # off and BEGIN ourselves. IMMEDIATE takes the write lock up front, so concurrent slots
    # wait for it (busy timeout) instead of failing on a lock upgrade.
    @sa.event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        # SQLite checks foreign keys only when asked, per connection; a target's declared
        # constraints hold here as on the other databases.
        dbapi_connection.execute("PRAGMA foreign_keys = ON")

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def database(resources: Mapping[str, Any], what: str) -> Any:
    """The `database` resource, which owns the engines (one per URL) of a run."""
    resource = resources.get("database")
    if resource is None:
        raise ValueError(f"{what} needs the `database` resource (DatabaseResource)")
    return resource


_TEMPLATE = re.compile(r"\{\{|\{%")


class SqlError(RuntimeError):
    """A statement failed; `transient` is false for data errors (constraint, type), which a
    retry cannot fix, and true for connection trouble."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient


class SqlParams(TaskParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    table: str = Field(min_length=1)
    schema_: str | None = Field(default=None, alias="schema")
    url: str | None = None  # SQLAlchemy URL, `${env:NAME}` read at run time; default: the
    # `database` resource
    mode: Mode = "insert"
    key_columns: list[str] = Field(default_factory=list)  # what upsert/update/delete match on
    columns: dict[str, str] | None = None  # table column -> item field or template; default:
    # the item fields named like the table's columns
    transaction: Literal["item", "chunk", "batch"] = "item"
    setup_sql: str | None = None  # SQL file (beside the batch file) run once per process
    # before the first write, e.g. `create table if not exists ...`

    @model_validator(mode="after")
    def _consistent(self) -> SqlParams:
        if self.mode != "insert" and not self.key_columns:
            raise ValueError(f"mode {self.mode} needs key_columns")
        if self.columns is not None:
            if not self.columns:
                raise ValueError("columns must map at least one column (or be left out)")
            missing = [k for k in self.key_columns if k not in self.columns]
            if missing:
                raise ValueError(f"key_columns {missing} must be in columns too")
            if self.mode == "update" and set(self.columns) <= set(self.key_columns):
                raise ValueError("mode update needs columns besides key_columns")
        if self.transaction == "batch" and not self.url:
            raise ValueError("transaction batch needs `url` (the sql_commit step connects "
                             "with it too)")
        return self


def db_error(action: str, exc: sa.exc.SQLAlchemyError) -> SqlError:
    """A short message without the statement and its (item) parameters."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    detail = f"{type(orig or exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    transient = isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
    return SqlError(f"{action}: {detail}", transient)


def upsert_statement(table: sa.Table, dialect: str, keys: list[str], columns: list[str],
                     rows: Mapping[str, Any] | sa.Select) -> Any:
    """INSERT ... ON CONFLICT/DUPLICATE KEY UPDATE of one row or of a SELECT's rows."""
    updates = [c for c in columns if c not in keys]
    if dialect in ("postgresql", "sqlite"):
        module: Any = postgresql if dialect == "postgresql" else sqlite
        stmt = module.insert(table)
        if isinstance(rows, sa.Select):
            # SQLite needs a WHERE in INSERT ... SELECT ... ON CONFLICT to parse it.
            stmt = stmt.from_select(columns, rows.where(sa.true()))
        else:
            stmt = stmt.values(dict(rows))
        if not updates:
            return stmt.on_conflict_do_nothing(index_elements=keys)
        return stmt.on_conflict_do_update(index_elements=keys,
                                          set_={c: stmt.excluded[c] for c in updates})
    if dialect in ("mysql", "mariadb"):
        stmt = mysql.insert(table)
        stmt = stmt.from_select(columns, rows) if isinstance(rows, sa.Select) else stmt.values(
            dict(rows))
        return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in updates or keys[:1]})
    raise ValueError(f"mode upsert is not supported on {dialect} (PostgreSQL, MySQL/MariaDB "
                     "and SQLite are)")


def coerce(column: sa.Column, value: Any) -> Any:
    """ISO text into date columns (CSV and JSON sources deliver text; SQLite's driver wants
    date objects); everything else goes to the driver as it is."""
    if isinstance(value, str) and value:
        try:
            if isinstance(column.type, sa.DateTime):
                return datetime.fromisoformat(value)
            if isinstance(column.type, sa.Date):
                return date.fromisoformat(value[:10])
        except ValueError:
            return value  # the database reports the bad value with its own message
    return value


def key_filter(table: sa.Table, keys: list[str], values: Mapping[str, Any]) -> list[Any]:
    return [table.c[k] == values[k] for k in keys]


def write_row(conn: sa.Connection, table: sa.Table, mode: Mode, keys: list[str],
              values: Mapping[str, Any]) -> int:
    """One item's statement; returns the rows it touched. An update that matches no row
    fails the item: the row it was meant for is missing."""
    if mode == "insert":
        return conn.execute(table.insert().values(dict(values))).rowcount
    if mode == "upsert":
        stmt = upsert_statement(table, conn.dialect.name, keys, list(values), values)
        return conn.execute(stmt).rowcount
    if mode == "delete":
        return conn.execute(table.delete().where(*key_filter(table, keys, values))).rowcount
    changes = {c: v for c, v in values.items() if c not in keys}
    count = conn.execute(table.update().where(*key_filter(table, keys, values))
                         .values(changes)).rowcount
    if count == 0:
        match = ", ".join(f"{k}={values[k]!r}" for k in keys)
        raise SqlError(f"update {table.name}: no row with {match}", transient=False)
    return count


@dataclass
class Target:
    url: str
    engine: sa.Engine
    table: sa.Table


_staged: set[tuple[str, str | None, str]] = set()  # staging tables known to exist
_cache_lock = threading.Lock()


def reflect(engine: sa.Engine, schema: str | None, name: str) -> sa.Table:
    try:
        return sa.Table(name, sa.MetaData(), schema=schema, autoload_with=engine)
    except sa.exc.NoSuchTableError as exc:
        where = f"{schema}.{name}" if schema else name
        raise ValueError(f"table {where} does not exist in "
                         f"{engine.url.render_as_string(hide_password=True)}") from exc


def run_setup(engine: sa.Engine, path: Path) -> None:
    """The statements of a setup file (separated by `;` at line ends), in one transaction."""
    statements = [s.strip() for s in re.split(r";\s*(?:\n|$)", path.read_text(encoding="utf-8"))]
    with engine.begin() as conn:
        for statement in statements:
            if statement and not all(line.strip().startswith("--") or not line.strip()
                                     for line in statement.splitlines()):
                conn.exec_driver_sql(statement)


def stage_name(table: str, batch: str, partition: str, phase: str) -> str:
    """Stable per (batch, partition, phase): a resumed run stages into the same table; short
    enough for PostgreSQL's and MySQL's 63/64-character identifiers."""
    digest = hashlib.sha256(f"{batch}/{partition}/{phase}".encode()).hexdigest()[:10]
    return f"{table[:40]}__stage_{digest}"


def registry_table() -> sa.Table:
    """In the database's default schema; staging tables live in their target's schema."""
    return sa.Table(
        STAGE_REGISTRY, sa.MetaData(),
        sa.Column("stage_table", sa.String(128), primary_key=True),
        sa.Column("target_schema", sa.String(128)),
        sa.Column("target_table", sa.String(255), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("key_columns", sa.Text, nullable=False),
        sa.Column("batch", sa.String(128), nullable=False),
        sa.Column("partition", sa.String(255), nullable=False),
        sa.Column("phase", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


class SqlWriter:
    """`transaction: item`: each item's statement commits on its own."""

    def __init__(self, params: SqlParams, base_dir: Path):
        self.params, self.base_dir = params, base_dir
        self.keys = list(params.key_columns)
        env = template_env()
        self.columns: dict[str, Callable[[dict[str, Any], Mapping[str, Any]], Any]] = {
            column: self._compile(env, column, source)
            for column, source in (params.columns or {}).items()}
        self.setup: Path | None = None
        if params.setup_sql:
            self.setup = (base_dir / params.setup_sql).resolve()
            if not self.setup.is_relative_to(base_dir.resolve()):
                raise ValueError(f"setup_sql {params.setup_sql}: outside the batch file's folder")
            if not self.setup.is_file():
                raise ValueError(f"setup_sql {params.setup_sql}: no such file")
        # Per handler (one per process and phase): reflected tables, setups already run.
        self.tables: dict[str, sa.Table] = {}
        self.lock = threading.Lock()

    @staticmethod
    def _compile(env: Any, column: str,
                 source: str) -> Callable[[dict[str, Any], Mapping[str, Any]], Any]:
        if _TEMPLATE.search(source):
            # A single `{{ expression }}` keeps its type: numbers stay numbers.
            rendered = compile_value(env, source, f"columns.{column}")
            return lambda item, variables: rendered(variables)

        def field(item: dict[str, Any], variables: Mapping[str, Any]) -> Any:
            if source not in item:
                raise ValueError(f"columns.{column}: the item has no field {source!r}")
            return item[source]

        return field

    def target(self, ctx: TaskContext) -> Target:
        resource = database(ctx.resources, "the sql task")
        if self.params.url:
            url = resolve_url(self.params.url, self.base_dir)
        else:
            url = resource.url
            if not url:
                raise ValueError("no database: give the sql phase a `url` or configure the "
                                 "database resource")
        engine = resource.engine(url)
        with self.lock:
            if url not in self.tables:
                if self.setup is not None:
                    try:
                        run_setup(engine, self.setup)
                    except sa.exc.SQLAlchemyError as exc:
                        raise db_error(f"setup_sql {self.params.setup_sql}", exc) from exc
                table = reflect(engine, self.params.schema_, self.params.table)
                unknown = [c for c in [*self.columns, *self.keys] if c not in table.c]
                if unknown:
                    raise ValueError(f"table {table.name} has no column {unknown[0]!r}")
                self.tables[url] = table
            return Target(url, engine, self.tables[url])

    def values(self, item: dict[str, Any], ctx: TaskContext, table: sa.Table) -> dict[str, Any]:
        if self.columns:
            variables = template_vars(item, ctx)
            row = {column: get(item, variables) for column, get in self.columns.items()}
        else:
            row = {c.name: item[c.name] for c in table.columns if c.name in item}
            if not row:
                raise ValueError(f"no item field is named like a column of {table.name}")
        missing = [k for k in self.keys if row.get(k) is None]
        if missing:
            raise ValueError(f"key column {missing[0]!r} has no value")
        if self.params.mode == "delete":
            row = {k: row[k] for k in self.keys}
        return {name: coerce(table.c[name], value) for name, value in row.items()}

    def action(self, table: sa.Table) -> str:
        return f"{self.params.mode} {table.name}"

    def __call__(self, item: dict[str, Any], ctx: TaskContext) -> dict[str, Any] | None:
        target = self.target(ctx)
        values = self.values(item, ctx, target.table)
        try:
            with target.engine.begin() as conn:
                count = write_row(conn, target.table, self.params.mode, self.keys, values)
        except sa.exc.SQLAlchemyError as exc:
            raise db_error(self.action(target.table), exc) from exc
        return {f"{ctx.phase}_rows": count}


class ChunkSqlWriter(SqlWriter):
    """`transaction: chunk`: items are checked and held; the engine calls finish_chunk after
    the chunk's items ran, and their rows commit together in one transaction. A row the
    database refuses is rolled back alone (a savepoint per row) and fails its item."""

    def __init__(self, params: SqlParams, base_dir: Path):
        super().__init__(params, base_dir)
        self.pending: dict[str, tuple[Target, dict[str, Any]]] = {}

    def __call__(self, item: dict[str, Any], ctx: TaskContext) -> None:
        target = self.target(ctx)
        values = self.values(item, ctx, target.table)
        with self.lock:
            self.pending[ctx.key] = (target, values)

    def finish_chunk(self, keys: list[str]) -> dict[str, str]:
        """Write the held rows of these items in one transaction; {key: error} of those that
        did not make it."""
        with self.lock:
            held = [(key, self.pending.pop(key)) for key in keys if key in self.pending]
        errors: dict[str, str] = {}
        by_url: dict[str, list[tuple[str, Target, dict[str, Any]]]] = {}
        for key, (target, values) in held:
            by_url.setdefault(target.url, []).append((key, target, values))
        for rows in by_url.values():
            errors.update(self._commit(rows))
        return errors

    def _commit(self, rows: list[tuple[str, Target, dict[str, Any]]]) -> dict[str, str]:
        errors: dict[str, str] = {}
        engine = rows[0][1].engine
        try:
            with engine.connect() as conn, conn.begin():
                for key, target, values in rows:
                    try:
                        with conn.begin_nested():
                            write_row(conn, target.table, self.params.mode, self.keys, values)
                    except SqlError as exc:
                        errors[key] = f"SqlError: {exc}"
                    except sa.exc.SQLAlchemyError as exc:
                        errors[key] = f"SqlError: {db_error(self.action(target.table), exc)}"
        except sa.exc.SQLAlchemyError as exc:
            # The commit itself failed (or the connection): no row of the chunk was written.
            failed = f"SqlError: {db_error('commit of the chunk', exc)}"
            return {key: errors.get(key, failed) for key, _, _ in rows}
        return errors


class BatchSqlWriter(SqlWriter):
    """`transaction: batch`: rows go to a staging table keyed by item; the `sql_commit` after
    step moves them into the target in one transaction once the batch succeeded."""

    def stage(self, target: Target, ctx: TaskContext) -> sa.Table:
        table, schema = target.table, self.params.schema_
        name = stage_name(table.name, ctx.batch, ctx.partition, ctx.phase)
        if self.params.mode == "delete":
            copied = list(self.keys)
        else:
            copied = list(self.columns) if self.columns else [c.name for c in table.columns]
        if STAGE_KEY in copied:
            raise ValueError(f"column {STAGE_KEY!r} is reserved for staging tables")
        stage = sa.Table(
            name, sa.MetaData(),
            sa.Column(STAGE_KEY, sa.String(512), primary_key=True),
            # Same types and nullability as the target: a bad value fails its item now,
            # not the whole commit later.
            *[sa.Column(c, table.c[c].type, nullable=table.c[c].nullable) for c in copied],
            schema=schema,
        )
        with _cache_lock:
            if (target.url, schema, name) in _staged:
                return stage
            registry = registry_table()
            try:
                stage.create(target.engine, checkfirst=True)
                registry.create(target.engine, checkfirst=True)
            except sa.exc.SQLAlchemyError as exc:
                inspector = sa.inspect(target.engine)
                # Another process may have created them between the check and the create.
                if not (inspector.has_table(name, schema=schema)
                        and inspector.has_table(STAGE_REGISTRY)):
                    raise db_error(f"create staging table {name}", exc) from exc
            record = {"stage_table": name, "target_schema": schema, "target_table": table.name,
                      "mode": self.params.mode, "key_columns": json.dumps(self.keys),
                      "batch": ctx.batch, "partition": ctx.partition, "phase": ctx.phase,
                      "created_at": time.time()}
            try:
                with target.engine.begin() as conn:
                    conn.execute(upsert_statement(registry, conn.dialect.name, ["stage_table"],
                                                  ["stage_table"], record))
            except sa.exc.SQLAlchemyError as exc:
                raise db_error(f"register staging table {name}", exc) from exc
            _staged.add((target.url, schema, name))
        return stage

    def __call__(self, item: dict[str, Any], ctx: TaskContext) -> None:
        target = self.target(ctx)
        values = self.values(item, ctx, target.table)
        stage = self.stage(target, ctx)
        row = {STAGE_KEY: ctx.key, **{c.name: values.get(c.name) for c in stage.columns
                                      if c.name != STAGE_KEY}}
        try:
            with target.engine.begin() as conn:
                conn.execute(upsert_statement(stage, conn.dialect.name, [STAGE_KEY], list(row),
                                              row))
        except sa.exc.SQLAlchemyError as exc:
            with _cache_lock:  # the staging table may have been dropped meanwhile
                _staged.discard((target.url, self.params.schema_, stage.name))
            raise db_error(f"stage into {stage.name}", exc) from exc


def make_handler(params: SqlParams, base_dir: Path) -> SqlWriter:
    writers = {"item": SqlWriter, "chunk": ChunkSqlWriter, "batch": BatchSqlWriter}
    return writers[params.transaction](params, base_dir)


class SqlCommitParams(TaskParams):
    url: str  # the same database as the sql phase's `url`
    phase: str | None = None  # commit only this phase's staged rows (default: every phase)


def apply_stage(conn: sa.Connection, target: sa.Table, stage: sa.Table, mode: str,
                keys: list[str], only: Sequence[str] | None = None) -> None:
    """Move the staged rows (or those of the items `only`) into the target, uncommitted."""
    columns = [c.name for c in stage.columns if c.name != STAGE_KEY]
    chosen = [stage.c[STAGE_KEY].in_(only)] if only is not None else []
    match = sa.and_(sa.true(), *chosen, *[stage.c[k] == target.c[k] for k in keys])
    if mode == "insert":
        rows = sa.select(*[stage.c[c] for c in columns]).where(*chosen)
        conn.execute(target.insert().from_select(columns, rows))
    elif mode == "upsert":
        rows = sa.select(*[stage.c[c] for c in columns]).where(*chosen)
        conn.execute(upsert_statement(target, conn.dialect.name, keys, columns, rows))
    elif mode == "update":
        changes = {c: sa.select(stage.c[c]).where(match).scalar_subquery()
                   for c in columns if c not in keys}
        conn.execute(target.update().values(changes).where(sa.exists().where(match)))
    else:
        conn.execute(target.delete().where(sa.exists().where(match)))


# MySQL/MariaDB report a CHECK violation as an OperationalError (3819, 4025), like a lock
# timeout; only these codes mean the target refused the data.
MYSQL_CHECK_VIOLATIONS = frozenset({3819, 4025})
DIAGNOSIS_BLOCK = 500  # staged rows tried at once when looking for the refused ones


def refused_by_target(exc: sa.exc.SQLAlchemyError) -> bool:
    """A constraint or data error (the rows' fault), not trouble with the connection."""
    if isinstance(exc, sa.exc.IntegrityError | sa.exc.DataError):
        return True
    args = getattr(getattr(exc, "orig", None), "args", None) or (None,)
    return isinstance(exc, sa.exc.OperationalError) and args[0] in MYSQL_CHECK_VIOLATIONS


@dataclass
class StagedTable:
    """One registry entry of sql_commit: a phase's staging table and its target."""

    phase: str
    stage: sa.Table
    target: sa.Table
    mode: str
    keys: list[str]
    name: str
    schema: str | None

    def apply(self, conn: sa.Connection, only: Sequence[str] | None = None) -> None:
        apply_stage(conn, self.target, self.stage, self.mode, self.keys, only)

    def action(self) -> str:
        return f"sql_commit {self.mode} {self.target.name}"


def staged_tables(conn: sa.Connection, ctx: AfterContext, phase: str | None) -> list[StagedTable]:
    """The partition's staging tables, in the batch's phase order (a later phase's rows may
    refer to an earlier phase's)."""
    registry = registry_table()
    query = sa.select(registry).where(registry.c.batch == ctx.batch,
                                      registry.c.partition == ctx.partition)
    if phase:
        query = query.where(registry.c.phase == phase)
    order = {name: i for i, name in enumerate(ctx.phases)}
    entries = sorted(conn.execute(query).mappings().all(),
                     key=lambda s: (order.get(s["phase"], len(order)), s["phase"]))
    return [StagedTable(e["phase"], reflect_in(conn, e["target_schema"], e["stage_table"]),
                        reflect_in(conn, e["target_schema"], e["target_table"]), e["mode"],
                        json.loads(e["key_columns"]), e["stage_table"], e["target_schema"])
            for e in entries]


def refused_items(conn: sa.Connection, staged: StagedTable,
                  order: Mapping[tuple[str, str], int]) -> dict[str, str]:
    """{item key: error} of the staged rows the target refuses, given the rows applied before
    them: blocks of rows are applied in item order under savepoints, and a block that fails
    is halved until the refused rows stand alone. Everything stays uncommitted."""
    keys = [k for (k,) in conn.execute(sa.select(staged.stage.c[STAGE_KEY]))]
    keys.sort(key=lambda k: (order.get((staged.phase, k), len(order)), k))
    refused: dict[str, str] = {}

    def search(block: list[str]) -> None:
        try:
            with conn.begin_nested():
                staged.apply(conn, block)
            return
        except sa.exc.SQLAlchemyError as exc:
            if not refused_by_target(exc):
                raise
            if len(block) == 1:
                refused[block[0]] = f"SqlError: {db_error(staged.action(), exc)}"
                return
        half = len(block) // 2
        search(block[:half])
        search(block[half:])

    for start in range(0, len(keys), DIAGNOSIS_BLOCK):
        search(keys[start:start + DIAGNOSIS_BLOCK])
    return refused


def find_refused(engine: sa.Engine, ctx: AfterContext, phase: str | None,
                 order: Mapping[tuple[str, str], int]) -> dict[tuple[str, str], str]:
    """Replay the commit in a transaction that is rolled back, to name the items whose rows
    made it fail: {(phase, item key): error}."""
    refused: dict[tuple[str, str], str] = {}
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            if conn.dialect.name == "postgresql":
                # Deferred constraints would otherwise only fail at COMMIT, for no one row.
                conn.exec_driver_sql("SET CONSTRAINTS ALL IMMEDIATE")
            for staged in staged_tables(conn, ctx, phase):
                # The rows it accepts stay applied, for later phases' rows to build on.
                for key, error in refused_items(conn, staged, order).items():
                    refused[(staged.phase, key)] = error
        finally:
            transaction.rollback()
    return refused


def item_order(rows: Any) -> dict[tuple[str, str], int]:
    """(phase, item key) -> position in the source, from the run's ledger rows."""
    if rows is None or not {"phase", "item_key", "seq"} <= set(getattr(rows, "columns", ())):
        return {}
    return {(str(p), str(k)): int(s)
            for p, k, s in zip(rows["phase"], rows["item_key"], rows["seq"], strict=True)}


def refused_message(refused: Mapping[tuple[str, str], str], shown: int = 3) -> str:
    listed = "; ".join(f"{phase} item {key!r}: {error}"
                       for (phase, key), error in list(refused.items())[:shown])
    more = f" (and {len(refused) - shown} more)" if len(refused) > shown else ""
    return (f"sql_commit: the target refused the staged rows of {len(refused)} items, so "
            f"nothing was committed: {listed}{more}. They are marked failed in the ledger: "
            "fix their data and run the partition again")


def commit_staged(engine: sa.Engine, ctx: AfterContext,
                  phase: str | None) -> tuple[list[StagedTable], dict[str, int]]:
    """Every staged table into its target in one transaction: the targets change together
    or not at all. Returns the tables and the rows committed per target."""
    committed: dict[str, int] = {}
    registry = registry_table()
    with engine.begin() as conn:
        stages = staged_tables(conn, ctx, phase)
        for staged in stages:
            count = conn.execute(sa.select(sa.func.count()).select_from(staged.stage)).scalar()
            staged.apply(conn)
            conn.execute(staged.stage.delete())
            conn.execute(registry.delete().where(registry.c.stage_table == staged.name))
            target = staged.target.name
            committed[target] = committed.get(target, 0) + int(count or 0)
    return stages, committed


def drop_stages(engine: sa.Engine, url: str, stages: Iterable[StagedTable]) -> None:
    """After the commit: MySQL ends a transaction at any DDL. An emptied staging table left
    behind by a crash here is harmless and dropped next time."""
    for staged in stages:
        with _cache_lock:
            _staged.discard((url, staged.schema, staged.name))
        sa.Table(staged.name, sa.MetaData(), schema=staged.schema).drop(engine, checkfirst=True)


def commit_failure(engine: sa.Engine, ctx: AfterContext, phase: str | None, rows: Any,
                   exc: sa.exc.SQLAlchemyError) -> Exception:
    """What a failed commit raises: ItemsFailed naming the items whose rows the target
    refused (so that the next run redoes exactly them, while the others' staged rows wait for
    its commit), else the database's error."""
    failure = db_error("sql_commit", exc)
    if not refused_by_target(exc):
        return failure
    try:
        refused = find_refused(engine, ctx, phase, item_order(rows))
    except sa.exc.SQLAlchemyError:  # the connection went: nobody to blame
        return failure
    if not refused:  # the rows pass one by one (e.g. two upserts of one key in a statement)
        return failure
    return ItemsFailed(refused, refused_message(refused))


def make_commit_handler(params: SqlCommitParams, base_dir: Path) -> AfterHandler:
    def commit(rows: Any, ctx: AfterContext) -> dict[str, Any]:
        url = resolve_url(params.url, base_dir)
        engine = database(ctx.resources, "sql_commit").engine(url)
        if not sa.inspect(engine).has_table(STAGE_REGISTRY):
            ctx.log.info("sql_commit: nothing staged")
            return {"committed_rows": 0}
        try:
            stages, committed = commit_staged(engine, ctx, params.phase)
        except sa.exc.SQLAlchemyError as exc:
            raise commit_failure(engine, ctx, params.phase, rows, exc) from exc
        drop_stages(engine, url, stages)
        total = sum(committed.values())
        ctx.log.info(f"sql_commit: {total} staged rows committed into {sorted(committed)}")
        return {"committed_rows": total, "committed_tables": sorted(committed)}

    return commit


def reflect_in(conn: sa.Connection, schema: str | None, name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), schema=schema, autoload_with=conn)
