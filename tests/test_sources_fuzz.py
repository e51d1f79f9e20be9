"""Property tests: readers never crash on malformed input and account for every row."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_defs.items import check_records
from batch_defs.sources import SourceError, read_source
from batch_defs.spec import CsvSourceSpec, JsonlSourceSpec, JsonSourceSpec

pytestmark = pytest.mark.unit
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Any text but NUL (which the csv module refuses outright, tested separately).
cell = st.text(alphabet=st.characters(blacklist_characters="\x00",
                                      blacklist_categories=["Cs"]), max_size=12)


@FUZZ
@given(width=st.integers(1, 5),
       rows=st.lists(st.lists(cell, min_size=1, max_size=7), max_size=30),
       broken=st.sets(st.integers(0, 29), max_size=5))
def test_csv_rows_are_items_or_invalid_never_lost(width: int, rows: list[list[str]],
                                                  broken: set[int]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([f"c{i}" for i in range(width)])
    for row in rows:
        writer.writerow(row)
    # Some one-line rows get a byte that is not UTF-8 (a latin-1 export in a UTF-8 batch).
    one_line = {i for i, row in enumerate(rows)
                if not any(ch in "".join(row) for ch in '\r\n"')}
    text = buffer.getvalue().encode("utf-8")
    for index in sorted(broken & one_line, reverse=True):
        encoded_row = io.StringIO()
        csv.writer(encoded_row).writerow(rows[index])
        line = encoded_row.getvalue().encode("utf-8")
        at = text.rfind(line) if line.strip() else -1
        if at > 0:
            text = text[:at] + line[:-2] + b"\xe9" + line[-2:] + text[at + len(line):]
    data = text
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "f.csv").write_bytes(data)
        spec = CsvSourceSpec(type="csv", path="f.csv")
        try:
            records = list(read_source(spec, Path(tmp)))
        except SourceError:
            return  # a whole-file verdict (e.g. unreadable header) is a clear error too
        entries = list(check_records(iter(records), None, None, 10_000))
    assert len(entries) == len(records)
    # Every written row comes back exactly once: as a record, or invalid with a reason.
    assert len(records) == len(rows)
    assert all((r.data is None) == (r.error is not None) for r in records)


@FUZZ
@given(st.binary(max_size=300))
def test_csv_arbitrary_bytes_never_crash(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "f.csv").write_bytes(data)
        try:
            records = list(read_source(CsvSourceSpec(type="csv", path="f.csv"), Path(tmp)))
        except SourceError:
            return
    rows = {r.row for r in records}
    assert len(rows) == len(records)  # one record per row number


text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=5)
json_value = st.recursive(st.none() | st.booleans() | st.integers() | text,
                          lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(text, inner, max_size=3),
                          max_leaves=8)


@FUZZ
@given(st.lists(json_value.map(json.dumps) | st.text(alphabet=st.characters(
    blacklist_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=20), max_size=25))
def test_jsonl_every_line_accounted_for(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "f.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        records = list(read_source(JsonlSourceSpec(type="jsonl", path="f.jsonl"), Path(tmp)))
    non_blank = [line for line in lines if line.strip()]
    assert len(records) == len(non_blank)
    for record, line in zip(records, non_blank, strict=True):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            assert record.error and record.error.startswith("invalid JSON")
            continue
        assert (record.data == value) if isinstance(value, dict) else record.error


@FUZZ
@given(st.one_of(json_value.map(json.dumps),
                 st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)))
def test_json_document_is_records_or_a_clear_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "f.json").write_text(text, encoding="utf-8")
        try:
            records = list(read_source(JsonSourceSpec(type="json", path="f.json"), Path(tmp)))
        except SourceError as exc:
            assert str(exc).startswith("f.json")
            return
    assert len(records) == len(json.loads(text))
