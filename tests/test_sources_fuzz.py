"""Property tests: readers never crash on malformed input and account for every row.

Each file is built row by row, and each row's fate is known by construction: the row it must
come back as (a record with exactly its values), or the invalid row it must become (its line
and the reason). A row dropped, merged into another or split fails the comparison.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_defs.items import check_records
from batch_defs.sources import RawRecord, SourceError, read_source
from batch_defs.spec import CsvSourceSpec, JsonlSourceSpec, JsonSourceSpec

pytestmark = pytest.mark.unit
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STOPPED = "the rest of the file cannot be read, so this record and any after it are missing"


@dataclass(frozen=True)
class Expected:
    """What one written row must come back as: data, or an invalid row whose reason
    contains `reason`."""

    data: dict[str, Any] | None
    reason: str = ""


def read(name: str, content: bytes, spec: Any) -> list[RawRecord]:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, name).write_bytes(content)
        return list(read_source(spec, Path(tmp)))


def assert_rows(records: list[RawRecord], expected: list[tuple[int, Expected]]) -> None:
    assert [r.row for r in records] == [row for row, _ in expected]
    for record, (row, want) in zip(records, expected, strict=True):
        if want.data is not None:
            assert (record.data, record.error) == (want.data, None), f"row {row}"
        else:
            assert record.data is None and record.error and want.reason in record.error, (
                f"row {row}: {record.error!r} lacks {want.reason!r}")
    # And they all survive keying: one item or invalid row each, nothing raised.
    assert len(list(check_records(iter(records), None, None, 10_000))) == len(records)


# CSV ---------------------------------------------------------------------------------------

# Any text but surrogates (not encodable) and the snowman, which marks where bad bytes go.
cell = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="☃"),
               max_size=10)
plain = st.text(alphabet=st.characters(blacklist_categories=["Cs"],
                                       blacklist_characters='"\r\n,☃'), min_size=1, max_size=8)


def csv_line(cells: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(cells)
    return out.getvalue()


def unambiguous(cells: list[str]) -> bool:
    """A quoted cell's first character decides what a stray quote before it does: text makes
    the quoting invalid (detected), but a comma, quote or line break would pair the stray
    quote into well-formed CSV, which no reader can tell from a real multi-line field."""
    return all(not (csv_line([c]).startswith('"') and c[:1] in ("", ",", '"', "\r", "\n"))
               for c in cells)


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, Expected]]]:
    width = draw(st.integers(1, 4))
    header = [f"c{i}" for i in range(width)]
    text, expected, line = csv_line(header).encode(), [], 2
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["good", "good", "good", "stray", "bad bytes", "width"]))
        cells = draw(st.lists(cell, min_size=width, max_size=width).filter(unambiguous))
        if kind == "stray":  # a quote that never closes properly
            row = f'"{draw(plain)}\r\n'.encode()
            want = Expected(None, "unterminated quote")
        elif kind == "width":
            cells.append(draw(cell.filter(lambda c: unambiguous([c]))))
            row, want = csv_line(cells).encode(), Expected(None, f"expected {width} columns")
        elif kind == "bad bytes":  # a Latin-1 byte in a UTF-8 file, anywhere in the row
            cells[draw(st.integers(0, width - 1))] += "☃"
            row = csv_line(cells).encode().replace("☃".encode(), b"\xe9")
            want = Expected(None, "not valid utf-8")
        else:
            row, want = csv_line(cells).encode(), Expected(dict(zip(header, cells, strict=True)))
        text += row
        expected.append((line, want))
        line += row.count(b"\n")
    return text, expected


@FUZZ
@given(csv_files())
def test_csv_every_written_row_comes_back_once(file: tuple[bytes, list]) -> None:
    content, expected = file
    assert_rows(read("f.csv", content, CsvSourceSpec(type="csv", path="f.csv")), expected)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([b"", b'"', b'a,"b\n', b'\xef\xbb\xbf']))
def test_csv_arbitrary_bytes_never_crash(data: bytes, prefix: bytes) -> None:
    content = prefix + data
    try:
        records = read("f.csv", content, CsvSourceSpec(type="csv", path="f.csv"))
    except SourceError as exc:
        assert str(exc).startswith("f.csv: ")
        return
    lines = content.count(b"\n") + 1
    assert [r.row for r in records] == sorted({r.row for r in records})  # in order, once each
    assert all(2 <= r.row <= lines and (r.data is None) == (r.error is not None)
               for r in records)


# JSON Lines --------------------------------------------------------------------------------

text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=6)
scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                               allow_infinity=False) | text
json_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(text, inner, max_size=3), max_leaves=8)
obj = st.dictionaries(text, json_value, max_size=4)


def deep(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@st.composite
def bad_record(draw: st.DrawFn, whole_line: bool) -> tuple[bytes, str]:
    """A record Python's parser or the ledger cannot take, and the expected reason. In a
    json document, nesting past 1000 and huge integers end the read instead (BREAKERS)."""
    bad = [
        (deep(draw(st.integers(101, 900))).encode(), "nested deeper than 100 levels"),
        (b'{"s": "a\\ud800b"}', "not valid Unicode"), (b'{"\\udfff": 1}', "not valid Unicode"),
        (b'{"s": "\\ude00\\ud83d"}', "not valid Unicode"), (b'{"n": 1e999}', "not a finite"),
        (json.dumps(draw(json_value.filter(lambda v: not isinstance(v, dict)))).encode(),
         "not an object"),
    ]
    if whole_line:
        bad += [(b"[" * 5000 + b"]" * 5000, "nested deeper than 100 levels"),
                (b'{"n": ' + b"9" * draw(st.integers(4301, 6000)) + b"}",
                 "more than 4300 digits")]
    return draw(st.sampled_from(bad))


@st.composite
def jsonl_files(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, Expected]]]:
    content, expected = b"", []
    for number in range(1, draw(st.integers(0, 20)) + 1):
        kind = draw(st.sampled_from(["good", "good", "bad", "garbage", "bytes", "blank"]))
        if kind == "good":
            value = draw(obj)
            line, want = json.dumps(value).encode(), Expected(value)
        elif kind == "bad":
            line, reason = draw(bad_record(whole_line=True))
            want = Expected(None, reason)
        elif kind == "garbage":
            # Without a closing brace the object never ends, whatever the text after it.
            tail = draw(plain.filter(lambda t: "}" not in t))
            line, want = b'{"id": 1' + tail.encode(), Expected(None, "invalid JSON")
        elif kind == "bytes":
            line, want = b'{"name": "caf\xe9"}', Expected(None, "not valid utf-8")
        else:
            line, want = draw(st.sampled_from([b"", b"  ", b"\t"])), None
        content += line + draw(st.sampled_from([b"\n", b"\r\n"]))
        if want is not None:
            expected.append((number, want))
    return content, expected


@FUZZ
@given(jsonl_files())
def test_jsonl_every_line_comes_back_once(file: tuple[bytes, list]) -> None:
    content, expected = file
    assert_rows(read("f.jsonl", content, JsonlSourceSpec(type="jsonl", path="f.jsonl")),
                expected)


@FUZZ
@given(st.binary(max_size=400))
def test_jsonl_arbitrary_bytes_never_crash(data: bytes) -> None:
    records = read("f.jsonl", data, JsonlSourceSpec(type="jsonl", path="f.jsonl"))
    # One row for each line that is not blank, or whose bytes are not UTF-8.
    lines = data.split(b"\n")
    assert [r.row for r in records] == [n for n, line in enumerate(lines, start=1)
                                        if not _blank(line, first=n == 1)]
    assert all((r.data is None) == (r.error is not None) for r in records)


def _blank(line: bytes, first: bool) -> bool:
    try:
        return not line.decode("utf-8-sig" if first else "utf-8").strip()
    except UnicodeDecodeError:
        return False


# JSON --------------------------------------------------------------------------------------

BREAKERS = [  # what makes the rest of a document unreadable, and the expected reason
    (b'{"id": oops}', "invalid JSON: unexpected 'oops'"),
    (b'{"id": "caf\xe9"}', "not valid utf-8 (byte 12 of the line)"),
    (b"[" * 1200 + b"]" * 1200, "nested deeper than 1000 levels"),
    (b'{"n": -' + b"7" * 4400 + b"}", "a number with more than 4300 digits"),
    (b'{"id": 1', "invalid JSON: the document ends in the middle of a value"),  # the file ends
]


@st.composite
def json_files(draw: st.DrawFn) -> tuple[bytes, str | None, list[tuple[int, Expected]]]:
    records: list[tuple[bytes, Expected]] = []
    for _ in range(draw(st.integers(0, 15))):
        if draw(st.booleans()):
            value = draw(obj)
            records.append((json.dumps(value, ensure_ascii=draw(st.booleans())).encode(),
                            Expected(value)))
        else:
            line, reason = draw(bad_record(whole_line=False))
            records.append((line, Expected(None, reason)))
    gap = draw(st.sampled_from([b",", b",\n", b" ,\r\n  "]))
    body = gap.join(r for r, _ in records)
    expected = [(row, want) for row, (_, want) in enumerate(records, start=1)]
    breaker = draw(st.none() | st.sampled_from(BREAKERS))
    end = b"]"
    if breaker is not None:
        body += (gap if records else b"") + b"\n" + breaker[0]
        line = body.count(b"\n") + 1
        reason = f"line {line}: {breaker[1]}; {STOPPED}"
        expected.append((len(records) + 1, Expected(None, reason)))
        end = b"" if breaker[0].endswith(b"1") else end  # a truncated file has no end
    path = draw(st.sampled_from([None, "data.items"]))
    listed = b"[" + body + end
    if path is None:
        return listed, path, expected
    return (b'{"meta": {"items": [1]}, "data": {"items": ' + listed
            + (b', "n": 2}}' if end else b""), path, expected)


@FUZZ
@given(json_files())
def test_json_every_record_comes_back_once(file: tuple[bytes, str | None, list]) -> None:
    content, records, expected = file
    found = read("f.json", content, JsonSourceSpec(type="json", path="f.json", records=records))
    assert_rows(found, expected)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([b"", b"[", b'[{"a": 1}, ', b'{"x": [']))
def test_json_arbitrary_bytes_never_crash(data: bytes, prefix: bytes) -> None:
    try:
        found = read("f.json", prefix + data, JsonSourceSpec(type="json", path="f.json"))
    except SourceError as exc:
        assert str(exc).startswith("f.json: ")
        return
    assert [r.row for r in found] == list(range(1, len(found) + 1))
    stopped = [i for i, r in enumerate(found) if r.error and r.error.endswith(STOPPED)]
    assert stopped in ([], [len(found) - 1])  # a read that stops stops there


@FUZZ
@given(st.integers(1, 3000), st.sampled_from(["[", '{"a": ']))
def test_json_deep_nesting_is_bounded(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    found = read("f.json", f'[{{"id": 0}}, {nested}, {{"id": 2}}]'.encode(),
                 JsonSourceSpec(type="json", path="f.json"))
    assert found[0] == RawRecord(1, {"id": 0})
    if depth + 1 > 1000:  # the document's own list is one level too
        assert found[1:] == [RawRecord(2, None, f"line 1: nested deeper than 1000 levels; "
                                                f"{STOPPED}")]
    else:
        assert found[2] == RawRecord(3, {"id": 2})
        assert found[1].error == ("record is a list, not an object" if opener == "[" else
                                  "nested deeper than 100 levels" if depth > 100 else None)
