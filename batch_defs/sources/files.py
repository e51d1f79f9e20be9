"""Readers for inline items and CSV, JSON, JSONL and Parquet files, streamed row by row."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batch_defs.sources import RawRecord, SourceError, dig, rename, resolve_path


def _open(path: Path, encoding: str, newline: str | None = None) -> Any:
    try:
        return path.open(encoding=encoding, newline=newline)
    except FileNotFoundError as exc:
        raise SourceError(f"file not found: {path}") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from exc


def read_inline(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    for row, data in enumerate(spec.items, start=1):
        yield RawRecord(row, dict(data))


def _decoded_lines(path: Path, encoding: str, bad: dict[int, str]) -> Iterator[str]:
    """The file's lines decoded one by one: a line with bytes that are not valid in the
    encoding becomes an empty line, its reason noted in `bad`, instead of failing the file."""
    # utf-8-sig also reads files that start with a byte-order mark (as spreadsheets write).
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    handle = _open(path, "latin-1")  # only to report a missing file the same way as others
    handle.close()
    with path.open("rb") as raw:
        for number, line in enumerate(raw, start=1):
            try:
                yield line.decode(codec if number == 1 else encoding.replace("-sig", ""))
            except UnicodeDecodeError as exc:
                bad[number] = f"not valid {encoding} (byte {exc.start + 1} of the line)"
                yield "\n"


def read_csv(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    path = resolve_path(spec.path, base_dir)
    bad: dict[int, str] = {}
    reader = csv.reader(_decoded_lines(path, spec.encoding, bad), delimiter=spec.delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise SourceError(f"{path.name}: cannot read the header row: {exc}") from exc
    if 1 in bad:
        raise SourceError(f"{path.name}: header row: {bad[1]}")
    width = len(header)
    while True:
        # Row numbers are file lines, as an editor shows them (quoted fields may span lines).
        row = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            values = None
        except csv.Error as exc:
            yield RawRecord(row, None, f"malformed CSV row: {exc}")
            continue
        for number in sorted(n for n in bad if n <= reader.line_num):
            yield RawRecord(number, None, bad.pop(number))
        if values is None:
            return
        if not values:  # blank line
            continue
        if len(values) != width:
            yield RawRecord(row, None, f"expected {width} columns, found {len(values)}")
            continue
        yield RawRecord(row, rename(dict(zip(header, values, strict=True)), spec.columns))


def read_json(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    path = resolve_path(spec.path, base_dir)
    with _open(path, spec.encoding) as handle:
        try:
            document = json.load(handle)
        except UnicodeDecodeError as exc:
            raise SourceError(f"{path.name}: not valid {spec.encoding}: {exc.reason}") from exc
        except json.JSONDecodeError as exc:
            raise SourceError(f"{path.name}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    try:
        records = dig(document, spec.records)
    except SourceError as exc:
        raise SourceError(f"{path.name}: {exc}") from exc
    if not isinstance(records, list):
        where = f" at {spec.records!r}" if spec.records else ""
        raise SourceError(f"{path.name}: expected a list of records{where}, "
                          f"found {type(records).__name__}")
    for row, data in enumerate(records, start=1):
        if isinstance(data, dict):
            yield RawRecord(row, data)
        else:
            yield RawRecord(row, None, f"record is a {type(data).__name__}, not an object")


def read_jsonl(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    path = resolve_path(spec.path, base_dir)
    bad: dict[int, str] = {}
    for row, line in enumerate(_decoded_lines(path, spec.encoding, bad), start=1):
        if row in bad:
            yield RawRecord(row, None, bad.pop(row))
            continue
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRecord(row, None, f"invalid JSON: {exc.msg}")
            continue
        if spec.field and isinstance(data, dict):
            data = data.get(spec.field)
        if isinstance(data, dict):
            yield RawRecord(row, data)
        else:
            yield RawRecord(row, None, f"record is a {type(data).__name__}, not an object")


def read_parquet(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    path = resolve_path(spec.path, base_dir)
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError as exc:
        raise SourceError(f"file not found: {path}") from exc
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends for non-parquet files
        raise SourceError(f"{path.name}: not a readable Parquet file: {exc}") from exc
    row = 0
    for batch in parquet.iter_batches(batch_size=5000):
        for data in batch.to_pylist():
            row += 1
            yield RawRecord(row, rename(data, spec.columns))
