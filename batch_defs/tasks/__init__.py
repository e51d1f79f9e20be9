"""Registry of built-in task types (per-item phases) and after-step types (per batch)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from batch_defs.spec import BatchSpec
from batch_defs.tasks import (
    email,
    embed,
    http,
    llm,
    python,
    report,
    shell,
    sql,
    template,
    validate,
)
from batch_defs.tasks.base import (
    AfterContext,
    AfterHandler,
    AfterType,
    Handler,
    RejectItem,
    SkipItem,
    TaskContext,
    TaskResult,
    TaskType,
)

TASK_TYPES: dict[str, TaskType] = {
    "python": TaskType(python.PythonParams, python.make_handler),
    "template": TaskType(template.TemplateParams, template.make_handler),
    "email": TaskType(email.EmailParams, email.make_handler, resources=("smtp",)),
    "http": TaskType(http.HttpParams, http.make_handler, resources=("http",)),
    "llm": TaskType(llm.LlmParams, llm.make_handler, resources=("llm",)),
    "embed": TaskType(embed.EmbedParams, embed.make_handler),
    "validate": TaskType(validate.ValidateParams, validate.make_handler),
    "sql": TaskType(sql.SqlParams, sql.make_handler, resources=("database",)),
    "shell": TaskType(shell.ShellParams, shell.make_handler),
}

AFTER_TYPES: dict[str, AfterType] = {
    "report": AfterType(report.ReportParams, report.make_handler),
    "export": AfterType(report.ExportParams, report.make_export_handler),
    "python": AfterType(python.PythonParams, python.make_after_handler),
    "sql_commit": AfterType(sql.SqlCommitParams, sql.make_commit_handler,
                            resources=("database",)),
}

__all__ = ["AfterContext", "Handler", "RejectItem", "SkipItem", "TaskContext", "TaskResult",
           "build_handler", "build_after_handler", "check_spec_tasks", "task_resources"]


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


def _problems(registry: dict, task: str, params: dict, base_dir: Path,
              loc: list[str | int]) -> list[tuple[list[str | int], str]]:
    if task not in registry:
        known = ", ".join(sorted(registry))
        return [([*loc, "task"], f"unknown task type {task!r} (known: {known})")]
    try:
        registry[task].make_handler(registry[task].params.model_validate(params), base_dir)
    except ValidationError as exc:
        return [([*loc, "params", *e["loc"]], e["msg"].removeprefix("Value error, "))
                for e in exc.errors()]
    except (ValueError, OSError) as exc:
        return [([*loc, "params"], str(exc))]
    return []


def check_spec_tasks(spec: BatchSpec, base_dir: Path) -> list[tuple[list[str | int], str]]:
    """Each phase's and after-step's task type and params, as (loc, message) problems."""
    problems = []
    for i, phase in enumerate(spec.phases):
        problems += _problems(TASK_TYPES, phase.task, phase.params, base_dir, ["phases", i])
    for i, step in enumerate(spec.after):
        problems += _problems(AFTER_TYPES, step.task, step.params, base_dir, ["after", i])
    return problems
