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


def read_csv(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    path = resolve_path(spec.path, base_dir)
    with _open(path, spec.encoding, newline="") as handle:
        reader = csv.reader(handle, delimiter=spec.delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (UnicodeDecodeError, csv.Error) as exc:
            raise SourceError(f"{path.name}: cannot read the header row: {exc}") from exc
        width = len(header)
        while True:
            # Row numbers are file lines, as an editor shows them (quoted fields may span lines).
            row = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                raise SourceError(f"{path.name}: not valid {spec.encoding} near line {row}: "
                                  f"{exc.reason}") from exc
            except csv.Error as exc:
                yield RawRecord(row, None, f"malformed CSV row: {exc}")
                continue
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
    records = dig(document, spec.records)
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
    with _open(path, spec.encoding) as handle:
        row = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                raise SourceError(f"{path.name}: not valid {spec.encoding} near line {row + 1}"
                                  ) from exc
            if not line:
                return
            row += 1
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRecord(row, None, f"invalid JSON: {exc.msg}")
                continue
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
