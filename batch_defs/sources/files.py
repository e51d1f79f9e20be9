"""Readers for inline items and CSV, JSON, JSONL and Parquet files, streamed row by row."""

from __future__ import annotations

import csv
import json
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch_defs.env import resolve_path
from batch_defs.sources import (
    MAX_NESTING,
    RawRecord,
    SourceError,
    check_encoding,
    field_names,
    json_type,
    record_problem,
)
from batch_defs.sources.jsonstream import read_records


def _open(path: Path, encoding: str, newline: str | None = None) -> Any:
    try:
        return path.open(encoding=encoding, newline=newline)
    except FileNotFoundError as exc:
        raise SourceError(f"file not found: {path}") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc


def read_inline(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    for row, data in enumerate(spec.items, start=1):
        record = dict(data)
        problem = record_problem(record)
        yield RawRecord(row, None, problem) if problem else RawRecord(row, record)


@dataclass(frozen=True)
class _Line:
    number: int
    text: str
    bad: str | None = None  # why the line's bytes are not valid in the encoding


def _decoded_lines(path: Path, encoding: str) -> Iterator[_Line]:
    """The file's lines one by one. A line with bytes that are not valid in the encoding is
    decoded with U+FFFD in their place (quotes and delimiters stay where they are) and says
    why in `bad`, so that it fails its own row and no other."""
    # utf-8-sig also reads files that start with a byte-order mark (as spreadsheets write).
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    check_encoding(path, encoding)
    handle = _open(path, "latin-1")  # only to report a missing file the same way as others
    handle.close()
    with path.open("rb") as raw:
        for number, line in enumerate(raw, start=1):
            try:
                yield _Line(number, line.decode(codec if number == 1 else encoding))
            except UnicodeDecodeError as exc:
                yield _Line(number, line.decode(codec if number == 1 else encoding, "replace"),
                            f"not valid {encoding} (byte {exc.start + 1} of the line)")


@dataclass
class _CsvRow:
    first: int  # file lines, as an editor shows them (a quoted field may span lines)
    last: int
    values: list[str] | None
    reason: str | None = None


def _csv_rows(lines: Iterator[_Line], delimiter: str) -> Iterator[_CsvRow]:
    """Logical CSV rows. A quoted field may span lines; one that runs to the end of the file,
    over the field size limit, or into a quote followed by text is taken for a stray quote:
    its first line becomes an invalid row and reading resumes on the next line."""
    pending: deque[_Line] = deque()
    taken: list[_Line] = []

    def feed() -> Iterator[str]:
        while line := (pending.popleft() if pending else next(lines, None)):
            taken.append(line)
            yield line.text

    reader = csv.reader(feed(), delimiter=delimiter, strict=True)
    while True:
        taken.clear()
        try:
            values: list[str] | None = next(reader)
            error = None
        except StopIteration:
            return
        except csv.Error as exc:
            values, error = None, str(exc)
        row = _CsvRow(taken[0].number, taken[-1].number, values)
        if error is not None and (row.last > row.first or _runs_on(error)):
            row.reason = _stray_quote(error, row.last)
            pending.extendleft(reversed(taken[1:]))
            reader = csv.reader(feed(), delimiter=delimiter, strict=True)
        elif error is not None:
            row.reason = f"malformed CSV row: {error}"
        else:
            row.reason = next((line.bad if len(taken) == 1 else f"line {line.number}: {line.bad}"
                               for line in taken if line.bad), None)
        yield row


def _runs_on(error: str) -> bool:
    return error == "unexpected end of data" or "field limit" in error


def _stray_quote(error: str, last: int) -> str:
    if error == "unexpected end of data":
        how = "runs to the end of the file"
    elif "field limit" in error:
        how = f"is longer than {csv.field_size_limit()} characters"
    else:
        how = f"closes on line {last} with text after the closing quote"
    return f"unterminated quote: the quoted field opened on this line {how}"


def read_csv(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    path = resolve_path(spec.path, base_dir)
    if len(spec.delimiter) != 1 or spec.delimiter in '"\r\n':
        raise SourceError(f"{path.name}: the delimiter must be one character other than a "
                          f"quote or a line break, not {spec.delimiter!r}")
    rows = _csv_rows(_decoded_lines(path, spec.encoding), spec.delimiter)
    header = next((row for row in rows if row.values != []), None)
    if header is None:
        raise SourceError(f"{path.name}: the file is empty (a CSV source needs a header row)")
    if header.reason or header.values is None:
        raise SourceError(f"{path.name}: header row (line {header.first}): {header.reason}")
    names = field_names(f"{path.name}: header row", header.values, spec.columns)
    for row in rows:
        if row.reason is not None or row.values is None:
            yield RawRecord(row.first, None, row.reason)
        elif not row.values:  # blank line
            continue
        elif len(row.values) != len(names):
            yield RawRecord(row.first, None, _width_problem(len(names), row))
        else:
            yield RawRecord(row.first, dict(zip(names, row.values, strict=True)))


def _width_problem(width: int, row: _CsvRow) -> str:
    problem = f"expected {width} columns, found {len(row.values or [])}"
    if row.last > row.first:
        problem += (f" (the row spans lines {row.first}-{row.last}: a quoted field continues "
                    f"over line breaks; look for a stray quote on line {row.first})")
    return problem


def read_json(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    return read_records(resolve_path(spec.path, base_dir), spec.encoding, spec.records)


def read_jsonl(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    path = resolve_path(spec.path, base_dir)
    for line in _decoded_lines(path, spec.encoding):
        if line.bad:
            yield RawRecord(line.number, None, line.bad)
            continue
        if not line.text.strip():
            continue
        data, problem = parse_json_line(line.text)
        if problem is None and spec.field and isinstance(data, dict):
            data = data.get(spec.field)
        if problem is None and not isinstance(data, dict):
            problem = f"record is {json_type(data)}, not an object"
        problem = problem or record_problem(data)
        yield RawRecord(line.number, None, problem) if problem else RawRecord(line.number, data)


def parse_json_line(text: str) -> tuple[Any, str | None]:
    """(value, None), or (None, why Python's JSON parser cannot take the text): besides syntax
    errors, nesting beyond its recursion limit, integers over 4300 digits, NaN and Infinity."""
    try:
        return json.loads(text, parse_constant=_no_constant), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, f"nested deeper than {MAX_NESTING} levels"
    except ValueError as exc:
        reason = str(exc) if "JSON number" in str(exc) else "a number with more than 4300 digits"
        return None, f"invalid JSON: {reason}"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_parquet(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    path = resolve_path(spec.path, base_dir)
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError as exc:
        raise SourceError(f"file not found: {path}") from exc
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for non-parquet files
        raise SourceError(f"{path.name}: not a readable Parquet file: {exc}") from exc
    names = field_names(path.name, parquet.schema_arrow.names, spec.columns)
    row = 0
    for batch in parquet.iter_batches(batch_size=5000):
        for values in zip(*(column.to_pylist() for column in batch.columns), strict=True):
            row += 1
            yield RawRecord(row, dict(zip(names, values, strict=True)))
