"""Sandboxed Jinja2 for task parameters: text templates and JSON-like values with templates."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from batch_defs.tasks.base import TaskContext

# A string that is one `{{ expression }}` and nothing else keeps the expression's type.
_SINGLE_EXPRESSION = re.compile(r"\s*\{\{-?(.+?)-?\}\}\s*", re.DOTALL)


def template_env(**options: Any) -> SandboxedEnvironment:
    """Jinja2 without access to Python internals, failing on any undefined variable."""
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, **options)


def compile_template(env: jinja2.Environment, source: str, what: str) -> jinja2.Template:
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ValueError(f"{what}: {exc}") from exc


def template_vars(item: Mapping[str, Any], ctx: TaskContext) -> dict[str, Any]:
    return {**item, "item": item, "batch": ctx.batch, "partition": ctx.partition,
            "key": ctx.key, "phase": ctx.phase}


def render(template: jinja2.Template, variables: Mapping[str, Any], what: str) -> str:
    """The rendered text; a missing field or an unsafe attribute names the template."""
    try:
        return template.render(variables)
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateSecurityError(f"{what}: unsafe template: {exc}") from exc
    except jinja2.TemplateError as exc:
        raise ValueError(f"{what}: {exc}") from exc


class TemplateSecurityError(ValueError):
    """A template tried to reach Python internals (e.g. `''.__class__`)."""


class _Renderable(Protocol):
    def __call__(self, variables: Mapping[str, Any]) -> Any: ...


def compile_value(env: SandboxedEnvironment, value: Any, what: str) -> _Renderable:
    """A JSON-like value whose strings are templates, compiled once; the result renders it.

    A string that is a single `{{ expression }}` renders to the expression's value (a number
    stays a number, a list a list); any other string renders to text.
    """
    if isinstance(value, Mapping):
        parts = {k: compile_value(env, v, f"{what}.{k}") for k, v in value.items()}
        return lambda variables: {k: part(variables) for k, part in parts.items()}
    if isinstance(value, list):
        items = [compile_value(env, v, f"{what}[{i}]") for i, v in enumerate(value)]
        return lambda variables: [part(variables) for part in items]
    if not isinstance(value, str):
        return lambda variables: value
    match = _SINGLE_EXPRESSION.fullmatch(value)
    if match and "{{" not in match.group(1) and "}}" not in match.group(1):
        try:
            expression = env.compile_expression(match.group(1), undefined_to_none=False)
        except jinja2.TemplateError as exc:
            raise ValueError(f"{what}: {exc}") from exc

        def evaluate(variables: Mapping[str, Any]) -> Any:
            try:
                result = expression(**variables)
                if isinstance(result, jinja2.Undefined):
                    str(result)  # raises the undefined (or unsafe) error with its message
            except jinja2.exceptions.SecurityError as exc:
                raise TemplateSecurityError(f"{what}: unsafe template: {exc}") from exc
            except jinja2.TemplateError as exc:
                raise ValueError(f"{what}: {exc}") from exc
            return result

        return evaluate
    template = compile_template(env, value, what)
    return lambda variables: render(template, variables, what)
