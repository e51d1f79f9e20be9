"""Sandboxed expressions over an item: a phase's `when:` condition and a route's `by:`.

Jinja2's SandboxedEnvironment evaluates them (no Python `eval`): no attribute of Python's
internals is reachable, and an undefined field is an error rather than a silent empty value.
They compile when the batch loads, so a syntax error is reported by `batch-defs validate` with
the file and line of the field; evaluation errors fail the item, naming the expression.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

_SINGLE = re.compile(r"\s*\{\{-?(.+?)-?\}\}\s*", re.DOTALL)


class ExpressionError(ValueError):
    """An expression that cannot be evaluated for an item (undefined field, unsafe access)."""


def _env() -> SandboxedEnvironment:
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined)


def _bare(source: str) -> str | None:
    """The expression inside a single `{{ ... }}`, or the text itself when it has no `{{`;
    None for a template with text around its expressions."""
    match = _SINGLE.fullmatch(source)
    if match and "{{" not in match.group(1) and "}}" not in match.group(1):
        return match.group(1).strip()
    return None if "{{" in source or "{%" in source else source.strip()


def _problem(exc: jinja2.TemplateError, source: str) -> str:
    return f"{exc.message or type(exc).__name__} in {source!r}"


class Expression:
    """One compiled expression (`amount > 100 and country == "DE"`, or `{{ country }}`), or a
    template with text around its expressions (`{{ country }}-{{ tier }}`, evaluating to text)
    when `templates` allows it."""

    def __init__(self, source: str, templates: bool = False):
        if not source.strip():
            raise ValueError("must not be empty")
        self.source = source
        env = _env()
        bare = _bare(source)
        try:
            if bare is not None:
                self._expression: Any = env.compile_expression(bare, undefined_to_none=False)
                self._template: jinja2.Template | None = None
            elif templates:
                self._template = env.from_string(source)
            else:
                raise ValueError(f"must be one expression, e.g. amount > 100, not a template "
                                 f"with text around it: {source!r}")
        except jinja2.TemplateError as exc:
            raise ValueError(_problem(exc, source)) from exc

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        try:
            if self._template is not None:
                return self._template.render(variables)
            value = self._expression(**variables)
            if isinstance(value, jinja2.Undefined):
                str(value)  # raises the undefined error with its message
            return value
        except jinja2.exceptions.SecurityError as exc:
            raise ExpressionError(f"unsafe expression {self.source!r}: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise ExpressionError(_problem(exc, self.source)) from exc
        except Exception as exc:  # e.g. comparing a number with text: the item's data
            raise ExpressionError(f"{type(exc).__name__}: {exc} in {self.source!r}") from exc


def item_variables(item: Mapping[str, Any], key: str, batch: str, partition: str,
                   phase: str) -> dict[str, Any]:
    """What an expression sees: the item's fields by name (earlier phases' outputs are merged
    into it), the item itself as `item` (for fields that may be missing: `item.vip is
    defined`), and the run's identity."""
    return {**item, "item": item, "key": key, "batch": batch, "partition": partition,
            "phase": phase}


def check_expression(source: str, templates: bool = False) -> str:
    """A field validator's body: the source, once it compiles (ValueError otherwise)."""
    Expression(source, templates)
    return source
