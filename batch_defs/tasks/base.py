"""What a task handler sees (TaskContext) and may return (TaskResult); no Dagster here."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict


def installed(module: str) -> bool:
    """Whether an optional module can be imported here (an extra may leave it out)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a stand-in module
        return False


class MissingExtra(ValueError):  # noqa: N818 - a requirement, reported as such
    """A task needs an optional extra that is not installed: the batch still loads (and says
    so), and fails with this message when it runs."""


class SkipItem(Exception):  # noqa: N818 - it is a signal, not an error
    """Raised by ctx.skip(reason): the item is recorded as skipped and not passed on."""


class RejectItem(Exception):  # noqa: N818 - it is a verdict, not an error
    """Raised by a quality gate (ctx.reject(rule)): recorded as rejected, never retried.

    `cost` and `tokens` are what the item spent before the verdict (paid calls count against
    the budget whatever the verdict); `attempt_log` lists the gate's attempts (regenerate)."""

    def __init__(self, reason: str, cost: float = 0.0, tokens: int = 0,
                 attempt_log: list[dict[str, Any]] | None = None):
        super().__init__(reason)
        self.cost, self.tokens = cost, tokens
        self.attempt_log = list(attempt_log or [])


class ItemsFailed(Exception):  # noqa: N818 - it names the outcome, as SkipItem does
    """Raised by an after step that finds specific items whose effect did not land (rows the
    target refused at sql_commit). The after op records each as failed in the run's ledger,
    so the next run of the partition does exactly them again, and fails the step.

    `errors` maps (phase, item key) to the item's error message."""

    def __init__(self, errors: Mapping[tuple[str, str], str], message: str):
        super().__init__(message)
        self.errors = dict(errors)


@dataclass
class TaskResult:
    """A handler's result with what it cost; `output` is what the next phase receives."""

    output: Any = None
    cost: float = 0.0
    tokens: int = 0


class EffectJournal(Protocol):
    def recall(self, key: str) -> Any | None: ...

    def remember(self, key: str, value: Any) -> None: ...


class MemoryJournal:
    """An effect journal kept in memory (for handlers called outside a batch run, in tests)."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def recall(self, key: str) -> Any | None:
        return self.values.get(key)

    def remember(self, key: str, value: Any) -> None:
        self.values[key] = value


@dataclass
class TaskContext:
    params: Mapping[str, Any]
    batch: str
    partition: str
    run_id: str
    phase: str
    key: str
    attempt: int = 1
    base_dir: Path = Path(".")
    output_dir: Path = Path(".")
    resources: Mapping[str, Any] = field(default_factory=dict)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("batch_defs.task"))
    journal: EffectJournal = field(default_factory=lambda: MemoryJournal())

    @property
    def idempotency_key(self) -> str:
        """Stable across retries, resumes and re-executions of the same item and phase."""
        return f"{self.batch}/{self.partition}/{self.key}/{self.phase}"

    def recall(self) -> Any | None:
        """What remember() stored for this item and phase in any earlier attempt or run."""
        return self.journal.recall(self.idempotency_key)

    def remember(self, value: Any) -> None:
        """Record, durably and at once, that this item's side effect happened (e.g. the
        message id of a sent email), so a retry or resume can skip doing it again."""
        self.journal.remember(self.idempotency_key, value)

    def track_process(self, pgid: int, started_at: float) -> Callable[[], None]:
        """Record a child process group this item started (kept in the ledger, the run's
        journal), so that a resume after a crash ends it before running the item again;
        call the returned function once the process has ended."""
        register = getattr(self.journal, "register_process", None)
        if register is None:  # a journal outside a batch run (tests): nothing to clean up
            return lambda: None
        from batch_defs.control import HOST

        record = register(self.run_id, self.phase, self.key, HOST, pgid, started_at)
        return lambda: self.journal.unregister_process(record)  # type: ignore[attr-defined]

    def skip(self, reason: str) -> None:
        raise SkipItem(reason)

    def reject(self, rule: str, cost: float = 0.0, tokens: int = 0) -> None:
        raise RejectItem(rule, cost, tokens)


Handler = Callable[[dict[str, Any], TaskContext], Any]


class TaskParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TaskType:
    """A built-in task type, named by its module and imported when a batch uses it: a run
    imports only its own task types (http pulls in httpx, report pandas and matplotlib, llm and
    embed their clients), which keeps every command's start-up short."""

    module: str
    params_name: str  # the TaskParams model in that module
    factory_name: str = "make_handler"  # turns valid params and the batch folder into a handler
    resources: tuple[str, ...] = ()  # Dagster resource keys its handler reads from ctx.resources

    @property
    def params(self) -> type[TaskParams]:
        return getattr(importlib.import_module(self.module), self.params_name)

    @property
    def make_handler(self) -> Callable[[Any, Path], Any]:
        return getattr(importlib.import_module(self.module), self.factory_name)


@dataclass
class AfterContext:
    """What a batch-level `after` step sees: the run's summary and its ledger rows."""

    params: Mapping[str, Any]
    batch: str
    partition: str
    run_id: str
    summary: Mapping[str, Any]
    base_dir: Path
    output_dir: Path
    phases: list[str] = field(default_factory=list)  # the batch's phases, in order
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("batch_defs.after"))
    # The Dagster resources (by key) the after step's type declares (TaskType.resources).
    resources: Mapping[str, Any] = field(default_factory=dict)


AfterHandler = Callable[[Any, AfterContext], Mapping[str, Any] | None]
