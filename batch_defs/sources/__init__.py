"""Source readers: each turns a source spec into a stream of raw records (row number, data)."""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from batch_defs.env import SourceError

__all__ = ["RawRecord", "SourceError", "read_source", "record_bound"]


@dataclass(frozen=True)
class RawRecord:
    """One record of a source: its data, or why the row could not be read (error)."""

    row: int
    data: dict[str, Any] | None
    error: str | None = None


def check_encoding(path: Path, encoding: str) -> None:
    """A SourceError for an encoding Python does not know (rather than a LookupError later)."""
    try:
        codecs.lookup(encoding)
    except LookupError as exc:
        raise SourceError(f"{path.name}: unknown encoding {encoding!r}") from exc


def dig(data: Any, dotted: str | None) -> Any:
    """data at a dotted path such as `data.items`."""
    for part in (dotted or "").split("."):
        if not part:
            continue
        if not isinstance(data, dict) or part not in data:
            raise SourceError(f"no field {part!r} on the path {dotted!r}")
        data = data[part]
    return data


def field_names(where: str, header: Sequence[str], columns: dict[str, str] | None) -> list[str]:
    """The item field of each column (after `columns:` renames). Two columns with one name
    would silently lose the values of all but the last, so that is a SourceError."""
    first: dict[str, int] = {}
    for position, name in enumerate(header, start=1):
        if name in first:
            raise SourceError(f"{where}: the column {name!r} appears more than once "
                              f"(columns {first[name]} and {position})")
        first[name] = position
    names = [(columns or {}).get(name, name) for name in header]
    by_field: dict[str, str] = {}
    for name, field in zip(header, names, strict=True):
        if field in by_field:
            pair = sorted([name, by_field[field]])
            raise SourceError(f"{where}: columns: {pair[0]!r} and {pair[1]!r} would both "
                              f"become the field {field!r}")
        by_field[field] = name
    return names


# Deeper records are invalid: the spool and the ledger write records as JSON, whose encoder
# recurses once per level (and no real record needs a hundred).
MAX_NESTING = 100


def record_problem(data: Any, text: bool = True) -> str | None:
    """Why a parsed record cannot be kept as it is, or None. On the way, decimals (how the
    streaming JSON parser gives non-integers) become floats, in place. Refused: nesting
    deeper than MAX_NESTING, numbers that are not finite and, unless text is False (the
    caller knows there are none), text with lone surrogates: not valid Unicode, there is no
    UTF-8 for it, so no email, file or database could take it."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            return f"nested deeper than {MAX_NESTING} levels"
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            kind = type(value)  # the common kinds first: this runs for every value
            if kind is str:
                if text and not value.isascii() and not _unicode(value):
                    return (f"{_path(data, value)}: not valid Unicode ({value[:40]!r}: a lone "
                            "surrogate)")
            elif kind is int or kind is bool or value is None:
                pass
            elif isinstance(value, dict | list):
                stack.append((value, depth + 1))
            elif isinstance(value, float | Decimal):
                number = float(value)  # a decimal too large for a float becomes inf
                if not math.isfinite(number):
                    return f"{_path(data, value)}: not a finite number ({value})"
                node[key] = number
            if text and type(key) is str and not key.isascii() and not _unicode(key):
                return f"a field name is not valid Unicode ({key!r}: a lone surrogate)"
    return None


def _path(data: Any, target: Any) -> str:
    """The dotted path to target (by identity) in data, for a message."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        node, path = stack.pop()
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if value is target:
                return f"{path}{key}"
            if isinstance(value, dict | list):
                stack.append((value, f"{path}{key}."))
    return "?"


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, with its article."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float | Decimal):
        return "a number"
    names = {str: "a string", list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def _unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


Reader = Callable[[Any, Path], Iterator[RawRecord]]


def read_source(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    from batch_defs.sources import files, remote

    readers: dict[str, Reader] = {
        "inline": files.read_inline,
        "csv": files.read_csv,
        "json": files.read_json,
        "jsonl": files.read_jsonl,
        "parquet": files.read_parquet,
        "sql": remote.read_sql,
        "http": remote.read_http,
    }
    return readers[spec.type](spec, base_dir)


def record_bound(spec: Any, base_dir: Path) -> int | None:
    """The most records the source can have, known before it is read, or None when that
    would cost a read of it (json, parquet, sql, http). Inline: its items; CSV and JSONL:
    one per line break and one more (a CSV's header and blank lines, a quoted field over
    lines make it an upper bound). It sizes the chunks of a fan-out that streams."""
    if spec.type == "inline":
        return len(spec.items)
    if spec.type not in ("csv", "jsonl"):
        return None
    from batch_defs.env import resolve_path

    try:
        with resolve_path(spec.path, base_dir).open("rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b"")) + 1
    except (OSError, SourceError):  # the reader says what is wrong with the file
        return None
