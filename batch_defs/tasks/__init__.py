"""Registry of built-in task types (per-item phases) and after-step types (per batch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from batch_defs.spec import BatchSpec, PhaseSpec
from batch_defs.tasks.base import (
    AfterContext,
    AfterHandler,
    Handler,
    ItemsFailed,
    MissingExtra,
    RejectItem,
    SkipItem,
    TaskContext,
    TaskResult,
    TaskType,
    installed,
)


def _task(module: str, params: str, factory: str = "make_handler",
          resources: tuple[str, ...] = ()) -> TaskType:
    return TaskType(f"batch_defs.tasks.{module}", params, factory, resources)


TASK_TYPES: dict[str, TaskType] = {
    "python": _task("python", "PythonParams"),
    "template": _task("template", "TemplateParams"),
    "email": _task("email", "EmailParams", resources=("smtp",)),
    "http": _task("http", "HttpParams", resources=("http",)),
    "llm": _task("llm", "LlmParams", resources=("llm",)),
    "embed": _task("embed", "EmbedParams"),
    "validate": _task("validate", "ValidateParams"),
    "sql": _task("sql", "SqlParams", resources=("database",)),
    "shell": _task("shell", "ShellParams"),
}

# After steps run once per batch, on its summary and ledger rows.
AFTER_TYPES: dict[str, TaskType] = {
    "report": _task("report", "ReportParams"),
    "export": _task("report", "ExportParams", "make_export_handler"),
    "python": _task("python", "PythonParams", "make_after_handler"),
    "sql_commit": _task("sql", "SqlCommitParams", "make_commit_handler", resources=("database",)),
}

__all__ = ["AFTER_TYPES", "AfterContext", "Handler", "ItemsFailed", "MissingExtra",
           "RejectItem", "SkipItem", "TaskContext", "TaskResult", "build_after_handler",
           "build_handler", "check_spec_tasks", "task_resources"]

Loc = list[str | int]


@dataclass
class TaskChecks:
    """What checking a spec's tasks found: problems (the batch does not load) and notices
    (it loads, and cannot run here until an extra is installed)."""

    problems: list[tuple[Loc, str]] = field(default_factory=list)
    notices: list[tuple[Loc, str]] = field(default_factory=list)


def task_resources(task: str) -> tuple[str, ...]:
    """Dagster resource keys a task type's handler needs (empty for unknown types)."""
    task_type = TASK_TYPES.get(task)
    return task_type.resources if task_type else ()


def build_handler(task: str, params: dict, base_dir: Path) -> Handler:
    task_type = TASK_TYPES[task]
    return task_type.make_handler(task_type.params.model_validate(params), base_dir)


def build_after_handler(task: str, params: dict, base_dir: Path) -> AfterHandler:
    after_type = AFTER_TYPES[task]
    return after_type.make_handler(after_type.params.model_validate(params), base_dir)


def _check(registry: dict, task: str, params: dict, base_dir: Path, loc: Loc,
           checks: TaskChecks) -> object | None:
    """The handler the task and params make, or None with the problem recorded."""
    if task not in registry:
        known = ", ".join(sorted(registry))
        checks.problems.append(([*loc, "task"], f"unknown task type {task!r} (known: {known})"))
        return None
    try:
        return registry[task].make_handler(registry[task].params.model_validate(params),
                                           base_dir)
    except ValidationError as exc:
        checks.problems += [([*loc, "params", *e["loc"]], e["msg"].removeprefix("Value error, "))
                            for e in exc.errors()]
    except MissingExtra as exc:
        checks.notices.append(([*loc, "task"], str(exc)))
    except (ValueError, OSError) as exc:
        checks.problems.append(([*loc, "params"], str(exc)))
    return None


def _case_loc(phase: PhaseSpec, branch: str, loc: Loc) -> Loc:
    route = phase.route
    if route is not None and branch in route.cases:
        return [*loc, "route", "cases", branch]
    return [*loc, "route", "default"] if route is not None and route.default else loc


def _check_control(spec: BatchSpec, index: int, base_dir: Path, checks: TaskChecks) -> None:
    """A phase's route cases, undo task and shared limit (batch_defs/engine.py runs them)."""
    phase = spec.phases[index]
    loc: Loc = ["phases", index]
    for branch, (task, params) in phase.route_configs().items():
        where = _case_loc(phase, branch, loc)
        handler = _check(TASK_TYPES, task, params, base_dir, where, checks)
        if getattr(handler, "finish_chunk", None) is not None:
            checks.problems.append((where, "a route case cannot defer its writes to the "
                                           "chunk's end (sql transaction: chunk)"))
    if phase.undo is not None:
        _check(TASK_TYPES, phase.undo.task, phase.undo.params, base_dir, [*loc, "undo"], checks)
    if phase.limit is not None and phase.limit not in spec.limits:
        known = ", ".join(sorted(spec.limits)) or "none declared"
        checks.problems.append(([*loc, "limit"], f"no limit named {phase.limit!r} in the "
                                                 f"batch's limits ({known})"))


def check_spec_tasks(spec: BatchSpec, base_dir: Path) -> TaskChecks:
    """Each phase's and after-step's task type and params, and the executor's extra."""
    checks = TaskChecks()
    for i, phase in enumerate(spec.phases):
        if phase.route is None:  # a routed phase runs its cases (its params are their base)
            _check(TASK_TYPES, phase.task, phase.params, base_dir, ["phases", i], checks)
        _check_control(spec, i, base_dir, checks)
    for i, step in enumerate(spec.after):
        _check(AFTER_TYPES, step.task, step.params, base_dir, ["after", i], checks)
    if spec.options.executor == "celery" and not installed("dagster_celery"):
        checks.notices.append((["options", "executor"], "the celery executor needs "
                               "dagster-celery: install the celery extra: pip install "
                               "'batch-defs[celery]'"))
    return checks
