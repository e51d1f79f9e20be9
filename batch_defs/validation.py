"""Item types: one checker for the `schema:` of a source and the `validate` task's rules.

Each type has one rule (docs/sources.md, "Types"), whatever the value comes from: CSV text,
JSON numbers, YAML dates. Text is trimmed before it is read as a number, boolean, date,
email or URL; a `str` is taken as it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email


class NotOfType(ValueError):  # noqa: N818 - a verdict on a value, read as "... is not of type"
    """Why a value does not have a type: the text that follows the field's name."""


_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DATE_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_DATETIME_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}.*")
_TRUE, _FALSE = ("true", "1"), ("false", "0")
_MAX_INT_DIGITS = 4300  # Python's own limit for reading integers from text


def shown(value: Any) -> str:
    """The value as a message quotes it: repr (control characters escaped), at most 60 long."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise NotOfType(f"is not {what} ({shown(value)})")
    return value.strip()


def to_int(value: Any) -> int:
    """An int (not a bool), a float or decimal without fraction, or text of ASCII digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float | Decimal) and math.isfinite(value) and value == int(value):
        return int(value)
    if (isinstance(value, str) and _INT_TEXT.fullmatch(text := value.strip())
            and len(text) <= _MAX_INT_DIGITS):
        return int(text)
    raise NotOfType(f"is not an int ({shown(value)})")


def to_float(value: Any) -> float:
    """A finite number (not a bool), or text of one in decimal notation (not nan, inf)."""
    number: float | None = None
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    elif isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        number = float(value.strip())
    if number is None or math.isnan(number):
        raise NotOfType(f"is not a number ({shown(value)})")
    if math.isinf(number):
        raise NotOfType(f"is out of range for a number ({shown(value)})")
    return number


def to_str(value: Any) -> str:
    """Text, as it is."""
    if not isinstance(value, str):
        raise NotOfType(f"is not a string ({shown(value)})")
    return value


def to_bool(value: Any) -> bool:
    """true or false; also the text true, false, 1, 0 in any case and the ints 1 and 0
    (not yes/no/on/off, which are ambiguous across tools and languages)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise NotOfType(f"is not a boolean ({shown(value)}; use true/false or 1/0)")


def to_date(value: Any) -> date:
    """A date (not a date-time), or text YYYY-MM-DD of a real day."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and _DATE_TEXT.fullmatch(value.strip()):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise NotOfType(f"is not an ISO date ({shown(value)})")


def to_datetime(value: Any) -> datetime:
    """A date-time, or ISO 8601 text with at least hours and minutes (offset or Z allowed)."""
    if isinstance(value, datetime):
        return value
    if isinstance(value, str) and _DATETIME_TEXT.fullmatch(value.strip()):
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            pass
    raise NotOfType(f"is not an ISO date-time ({shown(value)})")


def to_email(value: Any) -> str:
    """An email address (syntax only, no DNS lookup), normalised (domain lower-cased)."""
    try:
        return validate_email(_text(value, "an email address"),
                              check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise NotOfType(f"is not an email address ({shown(value)}: {exc})") from None


def to_url(value: Any) -> str:
    """An http or https URL with a host and no spaces or control characters."""
    text = _text(value, "an http(s) URL")
    try:
        parts = urlsplit(text)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a malformed port or IPv6 address
        ok = False
    if not ok or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise NotOfType(f"is not an http(s) URL ({shown(value)})")
    return text


CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "int": to_int, "float": to_float, "str": to_str, "bool": to_bool, "date": to_date,
    "datetime": to_datetime, "email": to_email, "url": to_url,
}
_ENUM = re.compile(r"^enum\((.+)\)$")


def is_blank(value: Any) -> bool:
    """Missing in effect: null, or text of only spaces (CSV has no other way to say it)."""
    return value is None or (isinstance(value, str) and not value.strip())


@dataclass(frozen=True)
class FieldType:
    """A `schema:` entry: `int`, `email?`, `enum(a,b,c)`."""

    name: str
    optional: bool = False
    choices: tuple[str, ...] = ()

    def check(self, value: Any) -> Any:
        """The value as the item keeps it (JSON types: dates as ISO text), or NotOfType."""
        if self.choices:
            text = value.strip() if isinstance(value, str) else value
            if isinstance(text, bool) or not isinstance(text, str | int):
                text = None
            if text is None or str(text) not in self.choices:
                raise NotOfType(f"must be one of {', '.join(self.choices)} (got {shown(value)})")
            return str(text)
        if self.name == "any":
            return value
        converted = CONVERTERS[self.name](value)
        return converted.isoformat() if isinstance(converted, date) else converted


def parse_type(expr: str) -> FieldType:
    """`int`, `email?`, `enum(a,b,c)` -> FieldType; ValueError for an unknown type."""
    text = expr.strip()
    optional = text.endswith("?")
    text = text.rstrip("?").strip()
    match = _ENUM.match(text)
    if match:
        choices = tuple(v.strip() for v in match.group(1).split(",") if v.strip())
        return FieldType("enum", optional, choices)
    if text not in (*CONVERTERS, "any"):
        known = ", ".join([*CONVERTERS, "any"])
        raise ValueError(f"unknown type {expr!r} (known: {known}, enum(a,b), with ? for optional)")
    return FieldType(text, optional)


def schema_problems(schema: dict[str, str] | None) -> list[tuple[list[str | int], str]]:
    """(loc inside the schema, message) for each entry that names no known type."""
    problems: list[tuple[list[str | int], str]] = []
    for name, expr in (schema or {}).items():
        try:
            parse_type(expr)
        except ValueError as exc:
            problems.append(([name], str(exc)))
    return problems


class ItemSchema:
    """A source's `schema:`: checks and converts the listed fields, passes the others through."""

    def __init__(self, schema: dict[str, str]):
        self.fields = {name: parse_type(expr) for name, expr in schema.items()}

    def check(self, data: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """(converted item, None) or (original item, reason naming each failing field)."""
        out = dict(data)
        reasons = []
        for name, field in self.fields.items():
            value = data.get(name)
            if is_blank(value):
                if not field.optional:
                    reasons.append(f"{name}: is required" if name not in data
                                   else f"{name}: is empty ({shown(value)})")
                out[name] = None
                continue
            try:
                out[name] = field.check(value)
            except NotOfType as exc:
                reasons.append(f"{name}: {exc}")
        return (data, "; ".join(reasons)) if reasons else (out, None)
