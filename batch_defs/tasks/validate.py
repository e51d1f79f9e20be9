"""`validate` task: a quality gate rejecting items that break a rule; others pass unchanged."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from email_validator import EmailNotValidError, validate_email
from pydantic import Field, model_validator

from batch_defs.tasks.base import Handler, TaskContext, TaskParams
from batch_defs.tasks.python import import_function

RuleType = Literal["int", "float", "str", "bool", "date", "email", "url"]
Bound = float | date
_MISSING = object()
_TRUE, _FALSE = {"true", "yes", "1"}, {"false", "no", "0"}


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
        if kinds == {False} and self.type in ("date", "bool"):
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


def to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise RuleFailed(f"is not an int ({value!r})")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise RuleFailed(f"is not an int ({value!r})")


def to_float(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise RuleFailed(f"is not a number ({value!r})") from None
    else:
        raise RuleFailed(f"is not a number ({value!r})")
    if math.isnan(number):
        raise RuleFailed("is not a number (NaN)")
    return number


def to_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        for parse in (date.fromisoformat, datetime.fromisoformat):
            try:
                parsed = parse(value.strip())
                return parsed.date() if isinstance(parsed, datetime) else parsed
            except ValueError:
                continue
    raise RuleFailed(f"is not an ISO date ({value!r})")


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RuleFailed(f"is not a boolean ({value!r})")


def to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise RuleFailed(f"is not a string ({value!r})")
    return value


def to_email(value: Any) -> str:
    try:
        return validate_email(to_str(value), check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise RuleFailed(f"is not an email address ({value!r}: {exc})") from None


def to_url(value: Any) -> str:
    text = to_str(value)
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise RuleFailed(f"is not an http(s) URL ({value!r})")
    return text


CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "int": to_int, "float": to_float, "str": to_str, "bool": to_bool, "date": to_date,
    "email": to_email, "url": to_url,
}


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
        if raw is _MISSING or raw is None or (isinstance(raw, str) and not raw.strip()):
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
            except RuleFailed as exc:
                broken.append(f"{rule.message or f'rule {i}'}: {rule.field} {exc}")
        if broken:
            ctx.reject("; ".join(broken))

    return validate
