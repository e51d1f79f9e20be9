"""Pydantic models of a batch YAML file (see docs/yaml.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"
RESERVED_NODE_NAMES = ("fan_out", "collect", "results")
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class StrictModel(BaseModel):
    # Attribute docstrings are the fields' descriptions: the component schema (`dg`, the
    # Dagster UI's docs of the Batch component) documents every field from them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class _SourceBase(StrictModel):
    key: str | None = None
    """Item field holding a stable unique key (default: the row number)."""
    schema_: dict[str, str] | None = Field(default=None, alias="schema")
    """Field -> type (`int`, `float`, `str`, `bool`, `date`, `datetime`, `email`, `url`,
    `any`, `enum(a,b)`, `?` for optional): items that fail are recorded as invalid."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True,
                              use_attribute_docstrings=True)


class CsvSourceSpec(_SourceBase):
    """A CSV file with a header row, read line by line."""

    type: Literal["csv"]
    """csv"""
    path: str
    """File, relative to the batch's folder; `${env:NAME}` allowed."""
    columns: dict[str, str] | None = None
    """Renames: source column -> item field."""
    delimiter: str = ","
    """The field separator."""
    encoding: str = "utf-8"
    """The file's text encoding (a byte-order mark is read too)."""


class JsonSourceSpec(_SourceBase):
    """A JSON document holding a list of records, streamed."""

    type: Literal["json"]
    """json"""
    path: str
    """File, relative to the batch's folder; `${env:NAME}` allowed."""
    records: str | None = None
    """Dotted path to the list of records in the document, e.g. `data.items`."""
    encoding: str = "utf-8"
    """The file's text encoding."""


class JsonlSourceSpec(_SourceBase):
    """A file of JSON lines, one record per line."""

    type: Literal["jsonl"]
    """jsonl"""
    path: str
    """File, relative to the batch's folder; `${env:NAME}` allowed."""
    encoding: str = "utf-8"
    """The file's text encoding."""
    field: str | None = None
    """Take each record from this field of the line (`input` reads the dead-letter files
    that `batch-defs results --format jsonl` writes)."""


class ParquetSourceSpec(_SourceBase):
    """A Parquet file, read in batches of rows."""

    type: Literal["parquet"]
    """parquet"""
    path: str
    """File, relative to the batch's folder; `${env:NAME}` allowed."""
    columns: dict[str, str] | None = None
    """Renames: source column -> item field."""


class SqlSourceSpec(_SourceBase):
    """The rows of a SQL query, through a server-side cursor."""

    type: Literal["sql"]
    """sql"""
    url: str
    """SQLAlchemy URL (`${env:NAME}` for secrets; a relative SQLite path is in the batch's
    folder)."""
    query: str
    """The query; values only as bound parameters (`:name`)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Values of the query's bound parameters."""
    columns: dict[str, str] | None = None
    """Renames: result column -> item field."""


class PaginationSpec(StrictModel):
    """How an HTTP source asks for the next page."""

    type: Literal["page", "cursor", "link"]
    """`page` (a page number), `cursor` (from the last answer) or `link` (a Link header)."""
    param: str | None = None
    """Query parameter of the page number or cursor (default `page` / `cursor`)."""
    cursor_field: str | None = None
    """Dotted path of the next cursor in an answer (default `next_cursor`)."""
    page_size: int | None = Field(default=None, ge=1)
    """Records to ask for per page."""
    size_param: str | None = None
    """Query parameter of the page size (default `per_page`)."""
    max_pages: int = Field(default=1000, ge=1)
    """Stop after this many pages."""


class HttpSourceSpec(_SourceBase):
    """Records from an HTTP API that answers JSON, page by page."""

    type: Literal["http"]
    """http"""
    url: str
    """The first page's URL (`${env:NAME}` allowed)."""
    method: Literal["GET", "POST"] = "GET"
    """The request method."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Request headers; values may hold `${env:NAME}`, read when sent."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Query parameters."""
    body: dict[str, Any] | None = None
    """JSON body (POST)."""
    records: str | None = None
    """Dotted path to the list of records in an answer."""
    pagination: PaginationSpec | None = None
    """How to get the next page; none: one request."""
    timeout_s: float = Field(default=30.0, gt=0)
    """Per request."""
    max_attempts: int = Field(default=5, ge=1, le=20)
    """Attempts per page: 429 and 5xx answers are retried, waiting Retry-After if sent."""
    backoff_s: float = Field(default=0.5, ge=0)
    """Base of the exponential wait between attempts."""


class InlineSourceSpec(_SourceBase):
    """Items written in the batch file itself."""

    type: Literal["inline"]
    """inline"""
    items: list[dict[str, Any]]
    """The items, each a mapping."""


SourceSpec = Annotated[
    CsvSourceSpec
    | JsonSourceSpec
    | JsonlSourceSpec
    | ParquetSourceSpec
    | SqlSourceSpec
    | HttpSourceSpec
    | InlineSourceSpec,
    Field(discriminator="type"),
]


class RetrySpec(StrictModel):
    """Retries of an item's failed attempts, inside its slot."""

    max_attempts: int = Field(default=1, ge=1, le=100)
    """Attempts in all (1: no retry)."""
    backoff: Literal["exponential", "fixed"] = "exponential"
    """How the wait grows between attempts."""
    delay_s: float = Field(default=0.5, ge=0)
    """The base wait: delay_s, 2 x delay_s, 4 x ... for exponential."""
    max_delay_s: float = Field(default=30.0, ge=0)
    """The longest wait (a server's Retry-After too)."""
    jitter: bool = True
    """Full jitter: a random wait between 0 and the backoff."""
    retry_on: list[str | int] = Field(default_factory=list)
    """Exception class names (e.g. TimeoutError) or HTTP statuses worth retrying; empty:
    every error that does not call itself permanent."""


OnError = Literal["fail_fast", "continue"]


RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0,
              "hour": 3600.0}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([a-z]+)\s*")


def rate_per_second(text: str) -> float:
    """`10/s`, `600/min`, `2/h` as calls per second; ValueError for anything else."""
    match = _RATE.fullmatch(str(text))
    if not match or match.group(2) not in RATE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a rate: write calls per second or minute, e.g. "
                         "10/s or 600/min (more than 0)")
    return float(match.group(1)) / RATE_UNITS[match.group(2)]


def _rate(value: str) -> str:
    rate_per_second(value)
    return value


Rate = Annotated[str, AfterValidator(_rate)]


class RouteCaseSpec(StrictModel):
    """One branch of a route: a task configuration. Without `task` it is the phase's task,
    and its params are merged over the phase's; with another task, its params alone."""

    task: str | None = None
    """The case's task type (default: the phase's)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The case's params."""


class RouteSpec(StrictModel):
    """Each item runs one case, chosen by the value of `by`; the case is recorded per item."""

    by: str
    """An expression (`country`) or a template (`{{ country }}-{{ tier }}`) whose value names
    the case."""
    cases: dict[str, RouteCaseSpec] = Field(min_length=1)
    """Case name (the value of `by`, as text) -> task configuration."""
    default: RouteCaseSpec | None = None
    """For values with no case; none: the phase's own task and params."""

    @field_validator("by")
    @classmethod
    def _by(cls, value: str) -> str:
        from batch_defs.expressions import check_expression

        return check_expression(value, templates=True)

    @field_validator("cases")
    @classmethod
    def _not_default(cls, cases: dict[str, RouteCaseSpec]) -> dict[str, RouteCaseSpec]:
        if "default" in cases:
            raise ValueError("`default` is not a case: give it as route.default")
        return cases

    @field_validator("cases", mode="before")
    @classmethod
    def _keys_as_text(cls, value: Any) -> Any:
        # YAML reads `1:` or `true:` as a number or boolean; a case matches the value's text.
        return {str(k).lower() if isinstance(k, bool) else str(k): v
                for k, v in value.items()} if isinstance(value, dict) else value


class UndoSpec(StrictModel):
    """The task that reverses a phase's effect for one item (`batch-defs rollback`); it gets
    the item as the phase put it out (with, say, the id of the record it created)."""

    task: str
    """The undo's task type."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Its params (templates over the item as the phase put it out)."""
    retry: RetrySpec = Field(default_factory=lambda: RetrySpec(max_attempts=3))
    """Retries of a failed undo."""
    timeout_s: float | None = Field(default=None, gt=0)
    """Per attempt."""
    concurrency: int | None = Field(default=None, ge=1, le=50)
    """Undos in flight at once (default: options.concurrency)."""


class PhaseSpec(StrictModel):
    """One step every item goes through: a task type with its params."""

    name: Name
    """The phase's name (a node of the Dagster graph)."""
    task: str
    """A task type (python, template, email, http, llm, embed, validate, sql, shell)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The task's params (docs/tasks.md)."""
    retry: RetrySpec = Field(default_factory=RetrySpec)
    """Retries of an item's failed attempts."""
    timeout_s: float | None = Field(default=None, gt=0)
    """Per attempt."""
    on_error: OnError | None = None
    """Overrides options.on_error for this phase."""
    pool: str | None = None
    """A Dagster pool this phase's steps take a slot of while they run."""
    merge_output: bool = True
    """A mapping the handler returns is merged over the incoming item; false: passed alone."""
    when: str | None = None
    """An expression over the item: items that do not meet it are skipped (cause
    `condition`) and go on to the next phase unchanged."""
    route: RouteSpec | None = None
    """Runs each item through one of several task configurations, by a value of the item."""
    rate: Rate | None = None
    """This phase's calls (attempts) per second or minute across the run, e.g. 10/s."""
    limit: str | None = None
    """A name in the batch's `limits`, shared by phases, runs and processes."""
    undo: UndoSpec | None = None
    """The task that reverses this phase's effect for an item (`batch-defs rollback`)."""

    @field_validator("when")
    @classmethod
    def _when(cls, value: str | None) -> str | None:
        from batch_defs.expressions import check_expression

        return value if value is None else check_expression(value)

    @property
    def rate_per_s(self) -> float | None:
        return rate_per_second(self.rate) if self.rate else None

    def route_configs(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Branch name -> (task, params) of each route case, and of `default`."""
        if self.route is None:
            return {}
        cases = {**self.route.cases, "default": self.route.default or RouteCaseSpec()}
        return {name: (case.task or self.task,
                       case.params if case.task not in (None, self.task)
                       else {**self.params, **case.params})
                for name, case in cases.items()}


class BudgetSpec(StrictModel):
    """What the partition may spend, across its runs; then the run pauses."""

    max_cost: float | None = Field(default=None, ge=0)
    """Cost the handlers report (TaskResult.cost)."""
    max_tokens: int | None = Field(default=None, ge=0)
    """Tokens the handlers report."""


class CelerySpec(StrictModel):
    """Broker and result backend of the celery executor; workers must use the same."""

    broker: str = "redis://127.0.0.1:6379/0"
    """The broker's URL (Redis or RabbitMQ; `${env:NAME}` allowed)."""
    backend: str = "redis://127.0.0.1:6379/1"
    """The result backend's URL."""


class OptionsSpec(StrictModel):
    """How the batch runs: concurrency, errors, chunks, executor, budget."""

    mode: Literal["parallel", "sequential"] = "parallel"
    """sequential: one item at a time, in input order."""
    concurrency: int = Field(default=10, ge=1, le=50)
    """Items in flight at once (slots)."""
    on_error: OnError = "fail_fast"
    """fail_fast: no item starts once failures exceed tolerated_failures; continue: every
    item runs, and the run fails at the end if too many failed."""
    tolerated_failures: int | str = 0
    """Failed, invalid and rejected items the run may have and still succeed: a count (5) or
    a share ("2%")."""
    chunk_size: Literal["auto"] | int = "auto"
    """Items per Dagster step; auto: at most 50 steps per phase, at least 100 items each."""
    executor: Literal["in_process", "multiprocess", "celery"] = "in_process"
    """Where steps run: this process, a process each, or celery workers."""
    celery: CelerySpec = Field(default_factory=lambda: CelerySpec())
    """Broker and backend of the celery executor."""
    max_concurrent_steps: int = Field(default=2, ge=1, le=64)
    """Steps at once with the multiprocess executor."""
    workers: Literal["threads", "processes"] = "threads"
    """Where `python` handlers run: in the slots' threads, or handed to worker processes
    (CPU-bound handlers then use every core; docs/yaml.md, options)."""
    processes: int | None = Field(default=None, ge=1, le=64)
    """Worker processes with workers: processes (default: the machine's cores)."""
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    """What the partition may spend."""
    max_items: int = Field(default=100_000, ge=1)
    """A source with more items fails the run (a guard against the wrong file)."""
    step_retries: int = Field(default=0, ge=0, le=10)
    """Dagster RetryPolicy on phase steps, for a step that dies as a whole (a lost worker);
    a retried step skips the items it already finished."""
    depends_on_field: str | None = "depends_on"
    """Item field listing the keys of items that must succeed first (a list, or text
    separated by commas); items then run in dependency order. null: no dependencies."""
    rollback_on: list[Literal["fail", "cancel"]] = Field(default_factory=list)
    """Run the phases' `undo` of every item that succeeded when the run fails or is
    canceled."""

    @field_validator("rollback_on", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("tolerated_failures")
    @classmethod
    def _tolerance(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 0:
                raise ValueError("must be >= 0")
            return value
        if not re.fullmatch(r"\d+(\.\d+)?%", value.strip()):
            raise ValueError('must be a count (e.g. 5) or a percentage (e.g. "2%")')
        if float(value.strip().rstrip("%")) > 100:
            raise ValueError("a percentage must be <= 100%")
        return value.strip()

    @model_validator(mode="after")
    def _workers(self) -> OptionsSpec:
        if self.processes is not None and self.workers != "processes":
            raise ValueError("processes applies only with workers: processes")
        if self.workers == "processes" and self.executor != "in_process":
            raise ValueError(f"workers: processes needs executor: in_process (steps on the "
                             f"{self.executor} executor are processes already)")
        return self

    @field_validator("chunk_size")
    @classmethod
    def _chunk(cls, value: str | int) -> str | int:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return value

    @property
    def slots(self) -> int:
        return 1 if self.mode == "sequential" else self.concurrency

    def tolerated_count(self, total: int) -> int:
        """How many failed items the batch may have and still succeed."""
        if isinstance(self.tolerated_failures, int):
            return self.tolerated_failures
        return int(total * float(self.tolerated_failures.rstrip("%")) / 100)


class LimitSpec(StrictModel):
    """A limit shared by every phase, run and process that names it (`limit: NAME`)."""

    rate: Rate | None = None
    """Calls per second or minute, e.g. 14/s."""
    concurrency: int | None = Field(default=None, ge=1, le=1000)
    """Calls in flight at once."""
    burst: int = Field(default=1, ge=1, le=1000)
    """Calls that may start at once after a lull."""
    adaptive: bool = True
    """Back off on HTTP 429 or a RateLimited error, and recover (AIMD)."""

    @model_validator(mode="after")
    def _something(self) -> LimitSpec:
        if self.rate is None and self.concurrency is None:
            raise ValueError("give a rate (e.g. 10/s), a concurrency, or both")
        return self

    @property
    def rate_per_s(self) -> float | None:
        return rate_per_second(self.rate) if self.rate else None


class AfterStepSpec(StrictModel):
    """A batch-level step after every item: report, export, python, sql_commit."""

    task: str
    """The after step's type."""
    name: Name | None = None
    """Its node name (default: its task, numbered if repeated)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Its params (docs/tasks.md)."""


class SensorSpec(StrictModel):
    """Launch a run for each new file in a folder (one partition per file)."""

    inbox: str
    """The folder to watch, relative to the batch's folder unless absolute."""
    pattern: str = "*.csv"
    """Which files start a run."""
    interval_s: int = Field(default=30, ge=5)
    """How often the sensor looks."""


NotifyEvent = Literal["success", "failure", "paused", "canceled"]
NOT_SUCCESS: tuple[NotifyEvent, ...] = ("failure", "paused", "canceled")


class NotifySpec(StrictModel):
    """Who hears about a run's end: email recipients (SMTP resource) and webhook URLs."""

    on: list[NotifyEvent] = Field(default_factory=lambda: list(NOT_SUCCESS))
    """The endings to tell of."""
    email: list[str] = Field(default_factory=list)
    """Recipients (through the smtp resource)."""
    webhook: list[str] = Field(default_factory=list)
    """URLs that get a JSON POST; `${env:NAME}` allowed, read when sending."""


class BatchSpec(StrictModel):
    """A batch: where its items come from, the phases each goes through, and how it runs."""

    name: Name
    """The batch's name: the Dagster job's and the partitions'; equals the file's stem (or
    the component's folder)."""
    description: str = ""
    """Shown in the Dagster UI and `batch-defs list`."""
    base_dir: str | None = None
    """Folder relative paths resolve against, relative to the batch file's folder (default:
    that folder); `batch-defs migrate` sets `..`."""
    source: SourceSpec
    """Where the items come from: csv, json, jsonl, parquet, sql, http or inline."""
    phases: list[PhaseSpec] = Field(min_length=1)
    """What each item goes through, in order."""
    options: OptionsSpec = Field(default_factory=OptionsSpec)
    """How the batch runs."""
    after: list[AfterStepSpec] = Field(default_factory=list)
    """Batch-level steps after every item, in order."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Run tags, e.g. `batch/resource: smtp` for run limits."""
    sensor: SensorSpec | None = None
    """Launch a run for each new file in a folder."""
    schedule: str | None = None
    """Cron, e.g. "0 6 * * 1-5": a run per tick, its partition named by the tick's time."""
    schedule_timezone: str = "UTC"
    """The schedule's time zone."""
    notify: NotifySpec | None = None
    """Email and webhooks when runs end."""
    limits: dict[Name, LimitSpec] = Field(default_factory=dict)
    """Named rate and concurrency limits, shared across phases, runs and processes."""
    priority: int = Field(default=0, ge=-1000, le=1000)
    """Dagster's run priority (the `dagster/priority` tag): the queue starts higher first."""

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        import dagster as dg

        if value is None:
            return value
        try:  # Dagster's own check, through its public API
            dg.ScheduleDefinition(name="cron_check", cron_schedule=value, job_name="cron_check")
        except dg.DagsterInvalidDefinitionError:
            raise ValueError(f"{value!r} is not a valid cron expression") from None
        return value

    @field_validator("phases")
    @classmethod
    def _unique_phase_names(cls, phases: list[PhaseSpec]) -> list[PhaseSpec]:
        seen: set[str] = set()
        for phase in phases:
            if phase.name in seen:
                raise ValueError(f"phase name {phase.name!r} is used twice")
            seen.add(phase.name)
        return phases

    def on_error(self, phase: PhaseSpec) -> OnError:
        return phase.on_error or self.options.on_error

    @model_validator(mode="after")
    def _node_names_unique(self) -> BatchSpec:
        # Phases and after steps become nodes of one Dagster graph beside these.
        taken = set(RESERVED_NODE_NAMES)
        for phase in self.phases:
            if phase.name in taken:
                raise ValueError(f"phase name {phase.name!r} is reserved")
            taken.add(phase.name)
        for name in self.after_step_names():
            if name in taken:
                raise ValueError(f"after step name {name!r} is already used; give it a name")
            taken.add(name)
        return self

    def after_step_names(self) -> list[str]:
        """Each after step's name: its `name`, else its task, numbered if the task repeats."""
        tasks = [step.task for step in self.after]
        return [step.name or (step.task if tasks.count(step.task) == 1 else f"{step.task}_{i}")
                for i, step in enumerate(self.after)]
