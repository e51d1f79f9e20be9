"""`validate` task: a quality gate rejecting items that break a rule; others pass unchanged."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from batch_defs.tasks.base import Handler, TaskContext, TaskParams
from batch_defs.tasks.python import import_function
from batch_defs.validation import CONVERTERS, NotOfType, is_blank, to_date, to_float

# The item types of validation.py (the same rules as a source's `schema:`), by name.
RuleType = Literal["int", "float", "str", "bool", "date", "datetime", "email", "url"]
Bound = float | date
_MISSING = object()


class RuleSpec(TaskParams):
    field: str  # an item field; a dotted path reaches into nested objects
    type: RuleType | None = None
    min: Bound | None = None  # the value's bound; with type str/email/url, its length's
    max: Bound | None = None
    regex: str | None = None  # the whole value (as text) must match
    one_of: list[Any] | None = None
    required: bool = True  # false: a missing, null or empty field passes every check
    python: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    message: str | None = None  # how the rejection names the rule (default: "rule N")

    @model_validator(mode="after")
    def _bounds(self) -> RuleSpec:
        bounds: list[Any] = [b for b in (self.min, self.max) if b is not None]
        kinds = {isinstance(b, date) for b in bounds}
        if len(kinds) > 1:
            raise ValueError("min and max must both be numbers or both be dates")
        if kinds == {True} and self.type not in (None, "date"):
            raise ValueError(f"date bounds need type date, not {self.type}")
        if kinds == {False} and self.type in ("date", "datetime", "bool"):
            raise ValueError(f"type {self.type} needs {'date' if self.type == 'date' else 'no'}"
                             " bounds")
        if len(bounds) == 2 and bounds[0] > bounds[1]:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class ValidateParams(TaskParams):
    rules: list[RuleSpec] = Field(min_length=1)


class RuleFailed(Exception):  # noqa: N818 - a verdict carried to the caller, not an error
    """Why a value breaks a rule (the text after the field name)."""


def lookup(item: dict[str, Any], field: str) -> Any:
    if field in item:
        return item[field]
    value: Any = item
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def shown(bound: Bound) -> str:
    return bound.isoformat() if isinstance(bound, date) else f"{bound:g}"


def check_bounds(rule: RuleSpec, value: Any) -> None:
    """min/max on the value (a number or a date), or on its length for str/email/url."""
    if rule.min is None and rule.max is None:
        return
    measured: Any
    unit = ""
    if rule.type in ("str", "email", "url"):
        measured, unit = len(value), " characters long"
    elif isinstance(rule.min if rule.min is not None else rule.max, date):
        measured = to_date(value)
    else:
        measured = to_float(value)
    got = measured if unit else value
    if rule.min is not None and measured < rule.min:
        raise RuleFailed(f"must be >= {shown(rule.min)}{unit} (got {got!r})")
    if rule.max is not None and measured > rule.max:
        raise RuleFailed(f"must be <= {shown(rule.max)}{unit} (got {got!r})")


def make_checker(rule: RuleSpec, base_dir: Path) -> Callable[[dict[str, Any]], None]:
    """A function raising RuleFailed when an item breaks the rule; bad rules fail at load."""
    try:
        pattern = re.compile(rule.regex) if rule.regex is not None else None
    except re.error as exc:
        raise ValueError(f"regex {rule.regex!r}: {exc}") from exc
    function = import_function(rule.python, base_dir) if rule.python else None
    allowed = {str(v) for v in rule.one_of} if rule.one_of is not None else None

    def check(item: dict[str, Any]) -> None:
        raw = lookup(item, rule.field)
        if raw is _MISSING or is_blank(raw):
            if rule.required:
                raise RuleFailed("is required" if raw is _MISSING else f"is empty ({raw!r})")
            return
        value = CONVERTERS[rule.type](raw) if rule.type else raw
        check_bounds(rule, value)
        if pattern is not None and not pattern.fullmatch(str(raw)):
            raise RuleFailed(f"does not match /{rule.regex}/ ({raw!r})")
        if rule.one_of is not None and value not in rule.one_of and str(value) not in (
                allowed or set()):
            raise RuleFailed(f"must be one of {rule.one_of} (got {raw!r})")
        if function is not None:
            verdict = function(value, item)
            if isinstance(verdict, str) or not verdict:
                reason = verdict if isinstance(verdict, str) and verdict else "returned false"
                raise RuleFailed(f"fails {rule.python}: {reason}")

    return check


def make_handler(params: ValidateParams, base_dir: Path) -> Handler:
    checks = [(rule, make_checker(rule, base_dir)) for rule in params.rules]

    def validate(item: dict[str, Any], ctx: TaskContext) -> None:
        broken = []
        for i, (rule, check) in enumerate(checks, start=1):
            try:
                check(item)
            except (RuleFailed, NotOfType) as exc:
                broken.append(f"{rule.message or f'rule {i}'}: {rule.field} {exc}")
        if broken:
            ctx.reject("; ".join(broken))

    return validate
