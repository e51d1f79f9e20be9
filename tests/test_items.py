"""Items from raw records: keys, duplicates, schema validation, chunk sizing; and readers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batch_defs.items import Item, ItemSpool, chunk_size, prepare_items, read_chunk
from batch_defs.sources import RawRecord, SourceError, read_source
from batch_defs.spec import CsvSourceSpec, JsonlSourceSpec, JsonSourceSpec

pytestmark = pytest.mark.unit


def test_keys_duplicates_and_missing_keys_become_invalid_rows() -> None:
    records = [RawRecord(2, {"id": "a"}), RawRecord(3, {"id": "b"}), RawRecord(4, {"id": "a"}),
               RawRecord(5, {"id": ""}), RawRecord(6, None, "expected 2 columns, found 3")]
    prepared = prepare_items(records, "id", None, 100)
    assert [i.key for i in prepared.items] == ["a", "b"]
    assert [(r.key, r.error) for r in prepared.invalid] == [
        ("a#row_4", "row 4: duplicate key 'a' (first at row 2)"),
        ("row_5", "row 5: missing key field 'id'"),
        ("row_6", "row 6: expected 2 columns, found 3"),
    ]
    assert len(prepared.items) + len(prepared.invalid) == len(records)


def test_schema_coerces_and_explains() -> None:
    schema = {"id": "int", "email": "email", "amount": "float", "note": "str?",
              "state": "enum(draft,paid)"}
    records = [
        RawRecord(1, {"id": "7", "email": "a@example.com", "amount": "1.5", "note": "",
                      "state": "paid", "extra": "kept"}),
        RawRecord(2, {"id": "x", "email": "nope", "amount": "1", "state": "lost"}),
    ]
    prepared = prepare_items(records, "id", schema, 100)
    (item,) = prepared.items
    assert item.data == {"id": 7, "email": "a@example.com", "amount": 1.5, "note": None,
                         "state": "paid", "extra": "kept"}
    (bad,) = prepared.invalid
    assert bad.error == ("row 2: id: is not an int ('x'); email: is not an email address "
                         "('nope': An email address must have an @-sign.); "
                         "state: must be one of draft, paid (got 'lost')")


def test_max_items_is_enforced() -> None:
    records = (RawRecord(i, {"id": i}) for i in range(1, 10))
    with pytest.raises(SourceError, match="more than 5 items"):
        prepare_items(records, "id", None, 5)


@pytest.mark.parametrize(("total", "slots", "configured", "expected"), [
    (1000, 10, "auto", 250), (100, 10, "auto", 100), (100, 1, "auto", 100),
    (1000, 1, "auto", 100),
    (50_000, 50, "auto", 1250), (200_000, 10, "auto", 4000), (5, 10, "auto", 5),
    (1000, 10, 7, 7),
])
def test_chunk_size(total: int, slots: int, configured: str | int, expected: int) -> None:
    assert chunk_size(total, slots, configured) == expected


def test_spool_gives_chunks_with_stable_mapping_keys(tmp_path: Path) -> None:
    spool = ItemSpool(tmp_path / "items.jsonl")
    for item in prepare_items((RawRecord(i, {"id": i, "when": "x"}) for i in range(1, 26)),
                              "id", None, 100).items:
        spool.add(item)
    chunks = spool.refs(10, invalid=2)
    assert read_chunk(chunks[2])[-1] == Item("25", 25, {"id": 25, "when": "x"})
    assert [c.mapping_key for c in chunks] == ["chunk_0000", "chunk_0001", "chunk_0002"]
    assert [[i.key for i in read_chunk(c)] for c in chunks] == [
        [str(i) for i in range(1, 11)], [str(i) for i in range(11, 21)],
        [str(i) for i in range(21, 26)]]
    assert chunks[0].total_items == 25 and chunks[0].tolerance_base == 27


def test_csv_reader_renames_and_reports_malformed_rows(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    path.write_text('customer_id,mail\n1,a@x.org\n2,b@x.org,extra\n\n"3","multi\nline"\n')
    spec = CsvSourceSpec(type="csv", path="people.csv", columns={"customer_id": "id"})
    rows = list(read_source(spec, tmp_path))
    assert rows[0] == RawRecord(2, {"id": "1", "mail": "a@x.org"})
    assert rows[1] == RawRecord(3, None, "expected 2 columns, found 3")
    assert rows[2] == RawRecord(5, {"id": "3", "mail": "multi\nline"})


def test_json_and_jsonl_readers(tmp_path: Path) -> None:
    (tmp_path / "doc.json").write_text(json.dumps({"data": {"items": [{"id": 1}, 5]}}))
    spec = JsonSourceSpec(type="json", path="doc.json", records="data.items")
    assert list(read_source(spec, tmp_path)) == [
        RawRecord(1, {"id": 1}), RawRecord(2, None, "record is a number, not an object")]
    (tmp_path / "doc.jsonl").write_text('{"id": 1}\n{broken\n\n{"id": 3}\n')
    rows = list(read_source(JsonlSourceSpec(type="jsonl", path="doc.jsonl"), tmp_path))
    assert [r.row for r in rows] == [1, 2, 4]
    assert rows[1].error and rows[1].error.startswith("invalid JSON")


def test_missing_file_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="file not found: .*absent.csv"):
        list(read_source(CsvSourceSpec(type="csv", path="absent.csv"), tmp_path))


def test_keys_the_ledger_cannot_hold_become_invalid_rows() -> None:
    from batch_defs.states import MAX_ITEM_KEY_LENGTH

    longest = "k" * MAX_ITEM_KEY_LENGTH
    records = [RawRecord(2, {"id": "ok"}), RawRecord(3, {"id": longest + "k"}),
               RawRecord(4, {"id": "a\x00b"}), RawRecord(5, {"id": "two\nlines"}),
               RawRecord(6, {"id": "\ud800"}), RawRecord(7, {"id": longest}),
               RawRecord(8, {"id": {"nested": 1}}), RawRecord(9, {"id": longest}),
               RawRecord(10, {"id": "tab\there"}), RawRecord(11, {"id": "del\x7f"})]
    prepared = prepare_items(records, "id", None, 100)
    assert [i.key for i in prepared.items] == ["ok", longest]
    assert [(r.key, r.error) for r in prepared.invalid] == [
        ("row_3", "row 3: key is 513 characters long (the ledger holds at most 512)"),
        ("row_4", r"row 4: key 'a\x00b' contains the control character U+0000"),
        ("row_5", r"row 5: key 'two\nlines' contains the control character U+000A"),
        ("row_6", r"row 6: key '\ud800' contains the control character U+D800"),
        ("row_8", "row 8: key field 'id' is a dict, not text or a number"),
        ("row_9", f"row 9: duplicate key '{'k' * 56}... (first at row 7)"),
        ("row_10", r"row 10: key 'tab\there' contains the control character U+0009"),
        ("row_11", r"row 11: key 'del\x7f' contains the control character U+007F"),
    ]
    for row in prepared.invalid:  # the invalid rows themselves go to the ledger
        assert len(row.key) <= MAX_ITEM_KEY_LENGTH and row.key.isprintable()
