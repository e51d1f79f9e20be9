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
    model_config = ConfigDict(extra="forbid")


class _SourceBase(StrictModel):
    key: str | None = None
    schema_: dict[str, str] | None = Field(default=None, alias="schema")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CsvSourceSpec(_SourceBase):
    type: Literal["csv"]
    path: str
    columns: dict[str, str] | None = None
    delimiter: str = ","
    encoding: str = "utf-8"


class JsonSourceSpec(_SourceBase):
    type: Literal["json"]
    path: str
    records: str | None = None
    encoding: str = "utf-8"


class JsonlSourceSpec(_SourceBase):
    type: Literal["jsonl"]
    path: str
    encoding: str = "utf-8"
    # Take each record from this field of the line: `input` reads the dead-letter files that
    # `batch-defs results --format jsonl` writes.
    field: str | None = None


class ParquetSourceSpec(_SourceBase):
    type: Literal["parquet"]
    path: str
    columns: dict[str, str] | None = None


class SqlSourceSpec(_SourceBase):
    type: Literal["sql"]
    url: str
    query: str
    params: dict[str, Any] = Field(default_factory=dict)
    columns: dict[str, str] | None = None


class PaginationSpec(StrictModel):
    type: Literal["page", "cursor", "link"]
    param: str | None = None
    cursor_field: str | None = None
    page_size: int | None = Field(default=None, ge=1)
    size_param: str | None = None
    max_pages: int = Field(default=1000, ge=1)


class HttpSourceSpec(_SourceBase):
    type: Literal["http"]
    url: str
    method: Literal["GET", "POST"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    body: dict[str, Any] | None = None
    records: str | None = None
    pagination: PaginationSpec | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    # 429 and 5xx answers are retried, waiting Retry-After when the server sends it.
    max_attempts: int = Field(default=5, ge=1, le=20)
    backoff_s: float = Field(default=0.5, ge=0)


class InlineSourceSpec(_SourceBase):
    type: Literal["inline"]
    items: list[dict[str, Any]]


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
    max_attempts: int = Field(default=1, ge=1, le=100)
    backoff: Literal["exponential", "fixed"] = "exponential"
    delay_s: float = Field(default=0.5, ge=0)
    max_delay_s: float = Field(default=30.0, ge=0)
    jitter: bool = True
    # Exception class names (e.g. TimeoutError) or HTTP status codes that are worth retrying;
    # empty means every exception is retried.
    retry_on: list[str | int] = Field(default_factory=list)


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
    params: dict[str, Any] = Field(default_factory=dict)


class RouteSpec(StrictModel):
    """Each item runs one case, chosen by the value of `by`; the case is recorded per item."""

    by: str  # an expression (`country`) or a template (`{{ country }}-{{ tier }}`)
    cases: dict[str, RouteCaseSpec] = Field(min_length=1)
    default: RouteCaseSpec | None = None  # none: the phase's own task and params

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
    params: dict[str, Any] = Field(default_factory=dict)
    retry: RetrySpec = Field(default_factory=lambda: RetrySpec(max_attempts=3))
    timeout_s: float | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, ge=1, le=50)  # default: options.concurrency


class PhaseSpec(StrictModel):
    name: Name
    task: str
    params: dict[str, Any] = Field(default_factory=dict)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    timeout_s: float | None = Field(default=None, gt=0)
    on_error: OnError | None = None
    pool: str | None = None
    # A dict returned by the handler is merged over the incoming item; false passes it alone.
    merge_output: bool = True
    # An expression over the item; items that do not meet it are skipped (cause `condition`)
    # and go on to the next phase unchanged.
    when: str | None = None
    route: RouteSpec | None = None
    rate: Rate | None = None  # e.g. 10/s: this phase's calls (attempts), across the run
    limit: str | None = None  # a name in the batch's `limits`, shared by phases and runs
    undo: UndoSpec | None = None

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
    max_cost: float | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=0)


class CelerySpec(StrictModel):
    """Broker and result backend of the celery executor; workers must use the same."""

    broker: str = "redis://127.0.0.1:6379/0"
    backend: str = "redis://127.0.0.1:6379/1"


class OptionsSpec(StrictModel):
    mode: Literal["parallel", "sequential"] = "parallel"
    concurrency: int = Field(default=10, ge=1, le=50)
    on_error: OnError = "fail_fast"
    tolerated_failures: int | str = 0
    chunk_size: Literal["auto"] | int = "auto"
    executor: Literal["in_process", "multiprocess", "celery"] = "in_process"
    celery: CelerySpec = Field(default_factory=lambda: CelerySpec())
    max_concurrent_steps: int = Field(default=2, ge=1, le=64)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    max_items: int = Field(default=100_000, ge=1)
    # Dagster RetryPolicy on phase steps, for a step that dies as a whole (lost worker, out
    # of memory); the ledger makes a retried step skip the items it already finished.
    step_retries: int = Field(default=0, ge=0, le=10)
    # Item field listing the keys of items that must succeed first (a list, or text separated
    # by commas); items then run in dependency order in one chunk. null: no dependencies.
    depends_on_field: str | None = "depends_on"
    # Run the phases' `undo` of every item that succeeded when the run fails / is canceled.
    rollback_on: list[Literal["fail", "cancel"]] = Field(default_factory=list)

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

    rate: Rate | None = None  # e.g. 14/s
    concurrency: int | None = Field(default=None, ge=1, le=1000)  # calls in flight at once
    burst: int = Field(default=1, ge=1, le=1000)  # calls that may start at once after a lull
    # Back off on HTTP 429 or a RateLimited error, and recover (AIMD).
    adaptive: bool = True

    @model_validator(mode="after")
    def _something(self) -> LimitSpec:
        if self.rate is None and self.concurrency is None:
            raise ValueError("give a rate (e.g. 10/s), a concurrency, or both")
        return self

    @property
    def rate_per_s(self) -> float | None:
        return rate_per_second(self.rate) if self.rate else None


class AfterStepSpec(StrictModel):
    task: str
    name: Name | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class SensorSpec(StrictModel):
    """Launch a run for each new file in a folder (one partition per file)."""

    inbox: str  # folder, relative to the batch file's folder unless absolute
    pattern: str = "*.csv"
    interval_s: int = Field(default=30, ge=5)


NotifyEvent = Literal["success", "failure", "paused", "canceled"]
NOT_SUCCESS: tuple[NotifyEvent, ...] = ("failure", "paused", "canceled")


class NotifySpec(StrictModel):
    """Who hears about a run's end: email recipients (SMTP resource) and webhook URLs."""

    on: list[NotifyEvent] = Field(default_factory=lambda: list(NOT_SUCCESS))
    email: list[str] = Field(default_factory=list)
    webhook: list[str] = Field(default_factory=list)  # ${env:NAME} allowed, read at send time


class BatchSpec(StrictModel):
    name: Name
    description: str = ""
    # Folder that relative paths resolve against, relative to the batch file's own folder
    # (default: that folder). `batch-defs migrate` sets ".." when it moves a file into a
    # component folder, so the paths it holds keep working.
    base_dir: str | None = None
    source: SourceSpec
    phases: list[PhaseSpec] = Field(min_length=1)
    options: OptionsSpec = Field(default_factory=OptionsSpec)
    after: list[AfterStepSpec] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    sensor: SensorSpec | None = None
    schedule: str | None = None  # cron, e.g. "0 6 * * 1-5"; partition key = scheduled time
    schedule_timezone: str = "UTC"
    notify: NotifySpec | None = None
    limits: dict[Name, LimitSpec] = Field(default_factory=dict)
    # Dagster's run priority (the `dagster/priority` tag): the queue starts higher first.
    priority: int = Field(default=0, ge=-1000, le=1000)

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
