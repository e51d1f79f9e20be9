"""Source readers against real files, databases and an HTTP server on loopback."""

from __future__ import annotations

import json
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from batch_defs.items import InvalidRow, Item, ItemSpool, check_records
from batch_defs.sources import RawRecord, SourceError, read_source
from batch_defs.spec import (
    CsvSourceSpec,
    HttpSourceSpec,
    JsonlSourceSpec,
    JsonSourceSpec,
    ParquetSourceSpec,
    SqlSourceSpec,
)
from tests.conftest import PG_ADMIN_URL

MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"


def rows(spec: object, base: Path) -> list[RawRecord]:
    return list(read_source(spec, base))


@pytest.mark.unit
def test_csv_delimiter_encoding_and_bad_bytes(tmp_path: Path) -> None:
    (tmp_path / "eu.csv").write_bytes("id;name\n1;Zoë\n2;Jürgen\n".encode("latin-1"))
    spec = CsvSourceSpec(type="csv", path="eu.csv", delimiter=";", encoding="latin-1")
    assert [r.data for r in rows(spec, tmp_path)] == [{"id": "1", "name": "Zoë"},
                                                      {"id": "2", "name": "Jürgen"}]
    # Read as UTF-8, the two lines with Latin-1 bytes become invalid rows, naming the line.
    utf8 = CsvSourceSpec(type="csv", path="eu.csv", delimiter=";")
    assert rows(utf8, tmp_path) == [RawRecord(2, None, "not valid utf-8 (byte 5 of the line)"),
                                    RawRecord(3, None, "not valid utf-8 (byte 4 of the line)")]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfid,name\n1,x\n")
    assert rows(CsvSourceSpec(type="csv", path="bom.csv"), tmp_path)[0].data == {
        "id": "1", "name": "x"}


@pytest.mark.unit
def test_json_keeps_nested_objects_and_names_bad_lines(tmp_path: Path) -> None:
    doc = {"data": {"items": [{"id": 1, "address": {"city": "Oslo"}, "tags": ["a"]}]}}
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    spec = JsonSourceSpec(type="json", path="doc.json", records="data.items")
    assert rows(spec, tmp_path)[0].data == {"id": 1, "address": {"city": "Oslo"}, "tags": ["a"]}
    (tmp_path / "bad.json").write_text('{"data":\n  [1,\n  oops]}')
    with pytest.raises(SourceError, match=r"bad.json: expected a list of records at the top "):
        rows(JsonSourceSpec(type="json", path="bad.json"), tmp_path)
    assert rows(JsonSourceSpec(type="json", path="bad.json", records="data"), tmp_path) == [
        RawRecord(1, None, "record is a number, not an object"),
        RawRecord(2, None, "line 3: invalid JSON: unexpected 'oops'; the rest of the file "
                           "cannot be read, so this record and any after it are missing")]
    with pytest.raises(SourceError, match=r"doc.json: no field 'rows' on the path 'data.rows'"):
        rows(JsonSourceSpec(type="json", path="doc.json", records="data.rows"), tmp_path)


@pytest.mark.unit
def test_parquet_reader(tmp_path: Path) -> None:
    pd.DataFrame({"sku": ["a", "b"], "qty": [1, 2]}).to_parquet(tmp_path / "stock.parquet")
    spec = ParquetSourceSpec(type="parquet", path="stock.parquet", columns={"sku": "id"})
    assert [r.data for r in rows(spec, tmp_path)] == [{"id": "a", "qty": 1},
                                                      {"id": "b", "qty": 2}]
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(SourceError, match="fake.parquet: not a readable Parquet file"):
        rows(ParquetSourceSpec(type="parquet", path="fake.parquet"), tmp_path)


@pytest.mark.unit
def test_large_csv_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w") as handle:
        handle.write("id,email,amount,note\n")
        for i in range(100_000):
            handle.write(f"{i},user{i}@example.com,{i * 1.5},some note text for row {i}\n")
    spec = CsvSourceSpec(type="csv", path="big.csv", key="id",
                         schema={"id": "int", "email": "str", "amount": "float"})
    tracemalloc.start()
    spool = ItemSpool(tmp_path / "spool.jsonl")
    for entry in check_records(read_source(spec, tmp_path), spec.key, spec.schema_, 200_000):
        assert isinstance(entry, Item)
        spool.add(entry)
    chunks = len(spool.refs(5000))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert spool.count == 100_000 and chunks == 20
    assert peak < 100 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"


@pytest.fixture
def pg_table() -> Iterator[tuple[str, str]]:
    name = f"src_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(PG_ADMIN_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f"create table {name} (id int primary key, name text)"))
        conn.execute(sa.text(f"insert into {name} values (1, 'ok'), (2, :hostile), (3, 'x')"),
                     {"hostile": "'); drop table users; --"})
    yield PG_ADMIN_URL, name
    with engine.begin() as conn:
        conn.execute(sa.text(f"drop table {name}"))
    engine.dispose()


@pytest.mark.postgres
def test_sql_source_on_postgres_with_bound_parameters(pg_table: tuple[str, str]) -> None:
    url, table = pg_table
    spec = SqlSourceSpec(type="sql", url=url, query=f"select * from {table} where id >= :low "
                         "order by id", params={"low": 2}, columns={"name": "title"})
    assert [r.data for r in rows(spec, Path("."))] == [
        {"id": 2, "title": "'); drop table users; --"}, {"id": 3, "title": "x"}]


@pytest.mark.integration
def test_sql_source_on_mariadb() -> None:
    table = f"src_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(MARIADB_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f"create table {table} (id int primary key, city varchar(40))"))
        conn.execute(sa.text(f"insert into {table} values (1, 'Lyon'), (2, 'Graz')"))
    try:
        spec = SqlSourceSpec(type="sql", url=MARIADB_URL,
                             query=f"select id, city from {table} where city = :city",
                             params={"city": "Graz"})
        assert [r.data for r in rows(spec, Path("."))] == [{"id": 2, "city": "Graz"}]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"drop table {table}"))
        engine.dispose()


@pytest.mark.unit
def test_sql_source_sqlite_relative_and_refused_connection(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'local.db'}")
    with engine.begin() as conn:
        conn.execute(sa.text("create table t (id int)"))
        conn.execute(sa.text("insert into t values (7)"))
    engine.dispose()
    spec = SqlSourceSpec(type="sql", url="sqlite:///local.db", query="select id from t")
    assert [r.data for r in rows(spec, tmp_path)] == [{"id": 7}]
    refused = SqlSourceSpec(type="sql", url="postgresql+psycopg2://nobody@127.0.0.1:1/none",
                            query="select 1")
    with pytest.raises(SourceError, match=r"database postgresql\+psycopg2://nobody@127.0.0.1:1"):
        rows(refused, tmp_path)


def http_spec(server: HTTPServer, path: str, **fields: object) -> HttpSourceSpec:
    return HttpSourceSpec.model_validate({"type": "http", "url": server.url_for(path),
                                          "backoff_s": 0, **fields})


@pytest.mark.integration
def test_http_page_pagination_with_env_header(httpserver: HTTPServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKEN", "s3cret")
    pages = {1: [{"id": 1}, {"id": 2}], 2: [{"id": 3}], 3: []}

    def handler(request: Request) -> Response:
        assert request.headers["Authorization"] == "Bearer s3cret"
        page = int(request.args["page"])
        return Response(json.dumps({"data": {"items": pages[page]}}),
                        content_type="application/json")

    httpserver.expect_request("/customers").respond_with_handler(handler)
    spec = http_spec(httpserver, "/customers", records="data.items",
                     headers={"Authorization": "Bearer ${env:API_TOKEN}"},
                     pagination={"type": "page", "param": "page"})
    assert [r.data["id"] for r in rows(spec, Path("."))] == [1, 2, 3]


@pytest.mark.integration
def test_http_cursor_and_link_pagination(httpserver: HTTPServer) -> None:
    def cursor_handler(request: Request) -> Response:
        cursor = request.args.get("cursor")
        body = ({"items": [{"id": "a"}], "next": "c2"} if cursor is None
                else {"items": [{"id": "b"}]})
        return Response(json.dumps(body), content_type="application/json")

    httpserver.expect_request("/c").respond_with_handler(cursor_handler)
    spec = http_spec(httpserver, "/c", records="items",
                     pagination={"type": "cursor", "cursor_field": "next", "param": "cursor"})
    assert [r.data["id"] for r in rows(spec, Path("."))] == ["a", "b"]

    second = httpserver.url_for("/l2")
    httpserver.expect_request("/l1").respond_with_json(
        [{"id": 1}], headers={"Link": f'<{second}>; rel="next"'})
    httpserver.expect_request("/l2").respond_with_json([{"id": 2}])
    spec = http_spec(httpserver, "/l1", pagination={"type": "link"})
    assert [r.data["id"] for r in rows(spec, Path("."))] == [1, 2]


@pytest.mark.integration
def test_http_retries_429_and_reports_500(httpserver: HTTPServer) -> None:
    calls = {"n": 0}

    def flaky(request: Request) -> Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return Response("slow down", status=429, headers={"Retry-After": "1"})
        return Response(json.dumps([{"id": 1}]), content_type="application/json")

    httpserver.expect_request("/flaky").respond_with_handler(flaky)
    assert [r.data for r in rows(http_spec(httpserver, "/flaky"), Path("."))] == [{"id": 1}]
    assert calls["n"] == 2

    httpserver.expect_request("/down").respond_with_data("boom", status=500)
    with pytest.raises(SourceError, match=r"/down \(page 1\): HTTP 500 after 3 attempts"):
        rows(http_spec(httpserver, "/down", max_attempts=3), Path("."))
    httpserver.expect_request("/missing").respond_with_data("nope", status=404)
    with pytest.raises(SourceError, match=r"/missing \(page 1\): HTTP 404: nope"):
        rows(http_spec(httpserver, "/missing"), Path("."))


@pytest.mark.unit
def test_records_become_items_or_invalid_rows(tmp_path: Path) -> None:
    (tmp_path / "mixed.csv").write_text("id,email\n1,a@example.com\n1,b@example.com\n"
                                        "2,not-an-email\n,c@example.com\n3,d@example.com,x\n")
    spec = CsvSourceSpec(type="csv", path="mixed.csv", key="id", schema={"email": "email"})
    entries = list(check_records(read_source(spec, tmp_path), "id", spec.schema_, 100))
    assert [e.key for e in entries if isinstance(e, Item)] == ["1"]
    assert [e.error for e in entries if isinstance(e, InvalidRow)] == [
        "row 3: duplicate key '1' (first at row 2)",
        "row 4: email: is not an email address ('not-an-email': An email address must have "
        "an @-sign.)",
        "row 5: missing key field 'id'",
        "row 6: expected 2 columns, found 3",
    ]


def csv_rows(tmp_path: Path, data: bytes | str, **fields: object) -> list[RawRecord]:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    (tmp_path / "f.csv").write_bytes(raw)
    return rows(CsvSourceSpec.model_validate({"type": "csv", "path": "f.csv", **fields}),
                tmp_path)


@pytest.mark.unit
def test_csv_stray_quote_is_one_invalid_row_and_reading_resumes(tmp_path: Path) -> None:
    found = csv_rows(tmp_path, 'id,name\n1,"Bob\n2,Alice\n3,Carol\n')
    assert found == [
        RawRecord(2, None, "unterminated quote: the quoted field opened on this line runs to "
                           "the end of the file"),
        RawRecord(3, {"id": "2", "name": "Alice"}), RawRecord(4, {"id": "3", "name": "Carol"})]
    # The stray quote pairs with the next quote, which text follows: the same verdict.
    found = csv_rows(tmp_path, 'id,name\n1,"Bob\n2,Alice\n3,"Carol"\n4,"multi\nline"\n')
    assert found == [
        RawRecord(2, None, "unterminated quote: the quoted field opened on this line closes on "
                           "line 4 with text after the closing quote"),
        RawRecord(3, {"id": "2", "name": "Alice"}), RawRecord(4, {"id": "3", "name": "Carol"}),
        RawRecord(5, {"id": "4", "name": "multi\nline"})]
    # Within one line, a quote with text after it is a malformed row, as before.
    assert csv_rows(tmp_path, 'id,name\n1,"Bob" Jr\n2,x\n') == [
        RawRecord(2, None, "malformed CSV row: ',' expected after '\"'"),
        RawRecord(3, {"id": "2", "name": "x"})]


@pytest.mark.unit
def test_csv_quoted_field_longer_than_the_limit_ends_at_its_line(tmp_path: Path) -> None:
    body = "".join(f"{i},note {i}\n" for i in range(20_000))  # no quote anywhere after it
    found = csv_rows(tmp_path, 'id,note\n0,"runaway\n' + body)
    assert found[0] == RawRecord(2, None, "unterminated quote: the quoted field opened on this "
                                          "line is longer than 131072 characters")
    assert len(found) == 20_001 and found[-1] == RawRecord(20_002, {"id": "19999",
                                                                   "note": "note 19999"})


@pytest.mark.unit
def test_csv_bad_bytes_inside_a_quoted_field_make_its_row_invalid(tmp_path: Path) -> None:
    found = csv_rows(tmp_path, b'id,note\n1,"first\nsecond \xff\nthird"\n2,ok\n')
    assert found == [RawRecord(2, None, "line 3: not valid utf-8 (byte 8 of the line)"),
                     RawRecord(5, {"id": "2", "note": "ok"})]


@pytest.mark.unit
def test_csv_header_problems_are_source_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"^f\.csv: header row: the column 'id' appears more "
                                          r"than once \(columns 1 and 3\)$"):
        csv_rows(tmp_path, "id,name,id\n1,a,2\n")
    with pytest.raises(SourceError, match=r"^f\.csv: header row: columns: 'customer_id' and "
                                          r"'id' would both become the field 'id'$"):
        csv_rows(tmp_path, "customer_id,id\n1,2\n", columns={"customer_id": "id"})
    for empty in (b"", b"\n\n", b"\xef\xbb\xbf"):
        with pytest.raises(SourceError, match=r"^f\.csv: the file is empty \(a CSV source needs "
                                              r"a header row\)$"):
            csv_rows(tmp_path, empty)
    with pytest.raises(SourceError, match=r"^f\.csv: header row \(line 1\): unterminated quote"):
        csv_rows(tmp_path, 'id,"name\n1,x\n')
    assert csv_rows(tmp_path, "id,name\n") == []
    assert csv_rows(tmp_path, "\nid,name\n1,x\n") == [RawRecord(3, {"id": "1", "name": "x"})]


@pytest.mark.unit
def test_jsonl_lines_python_cannot_parse_are_invalid_rows(tmp_path: Path) -> None:
    lines = [b'{"id": 1}', b'[' * 100_000 + b']' * 100_000, b'{"id": ' + b"9" * 5000 + b"}",
             b'{"id": "\\ud800"}', b'{"id": 2, "name": "\xff"}', b'{"id": ' + b'{"a": ' * 101
             + b"1" + b"}" * 102, b'{"id": NaN}', b'{"id": 1e999}', b'{"id": "\\ud83d\\ude00"}',
             b'{"id": 3}']
    (tmp_path / "f.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    found = rows(JsonlSourceSpec(type="jsonl", path="f.jsonl"), tmp_path)
    assert found == [
        RawRecord(1, {"id": 1}),
        RawRecord(2, None, "nested deeper than 100 levels"),
        RawRecord(3, None, "invalid JSON: a number with more than 4300 digits"),
        RawRecord(4, None, "id: not valid Unicode ('\\ud800': a lone surrogate)"),
        RawRecord(5, None, "not valid utf-8 (byte 20 of the line)"),
        RawRecord(6, None, "nested deeper than 100 levels"),
        RawRecord(7, None, "invalid JSON: NaN is not a JSON number"),
        RawRecord(8, None, "id: not a finite number (inf)"),
        RawRecord(9, {"id": "\U0001F600"}),
        RawRecord(10, {"id": 3})]


def json_rows(tmp_path: Path, data: bytes | str, records: str | None = None) -> list[RawRecord]:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    (tmp_path / "f.json").write_bytes(raw)
    return rows(JsonSourceSpec(type="json", path="f.json", records=records), tmp_path)


STOPPED = "the rest of the file cannot be read, so this record and any after it are missing"


@pytest.mark.unit
def test_json_streams_records_as_plain_numbers(tmp_path: Path) -> None:
    doc = ('{"meta": {"items": "not these"}, "data": {"items": [\n'
           '{"id": 1, "x": 1.5, "big": 123456789012345678901234567890, "when": null},\n'
           '5,\n{"id": 2, "emoji": "\\ud83d\\ude00", "tags": ["a", {"deep": [1e-3]}]}\n]}}')
    found = json_rows(tmp_path, doc, "data.items")
    assert found == [
        RawRecord(1, {"id": 1, "x": 1.5, "big": 123456789012345678901234567890, "when": None}),
        RawRecord(2, None, "record is a number, not an object"),
        RawRecord(3, {"id": 2, "emoji": "\U0001F600", "tags": ["a", {"deep": [0.001]}]})]
    assert type(found[0].data["x"]) is float  # type: ignore[index]
    assert json_rows(tmp_path, '[]') == []


@pytest.mark.unit
def test_json_record_problems_are_invalid_rows_and_reading_goes_on(tmp_path: Path) -> None:
    deep = '{"a": ' * 150 + "1" + "}" * 150
    doc = f'[{{"id": 1}}, {{"id": "\\ud800"}}, {deep}, {{"id": 1e999}}, {{"id": 2}}]'
    assert json_rows(tmp_path, doc) == [
        RawRecord(1, {"id": 1}),
        RawRecord(2, None, "id: not valid Unicode ('\\ud800': a lone surrogate)"),
        RawRecord(3, None, "nested deeper than 100 levels"),
        RawRecord(4, None, "id: not a finite number (1E+999)"),
        RawRecord(5, {"id": 2})]


@pytest.mark.unit
@pytest.mark.parametrize(("tail", "valid", "reason"), [
    (b'{"id": 3,\n oops}]', 2, "line 4: invalid JSON: unexpected 'oops'"),
    (b'{"id": "caf\xe9"}]', 2, "line 3: not valid utf-8 (byte 13 of the line)"),
    (b'{"id": ' + b"7" * 5000 + b"}]", 2, "line 3: a number with more than 4300 digits"),
    (b'{"id": ' + b"[" * 5000 + b"]" * 5000 + b"}]", 2,
     "line 3: nested deeper than 1000 levels"),
    (b'{"id": 3}', 3, "line 3: invalid JSON: the document ends in the middle of a value"),
    (b'{"id": 3}] {"more": 1}', 3,
     "line 3: invalid JSON: more data after the end of the document"),
])
def test_json_unreadable_rest_ends_the_read_with_an_invalid_row(tmp_path: Path, tail: bytes,
                                                               valid: int, reason: str) -> None:
    found = json_rows(tmp_path, b'[{"id": 1},\n {"id": 2},\n ' + tail)
    assert found == [*(RawRecord(i, {"id": i}) for i in range(1, valid + 1)),
                     RawRecord(valid + 1, None, f"{reason}; {STOPPED}")]


@pytest.mark.unit
def test_json_problems_before_the_records_are_source_errors(tmp_path: Path) -> None:
    doc = '{"data": {"items": [{"id": 1}], "count": 1}}'
    with pytest.raises(SourceError, match=r"^f\.json: no field 'rows' on the path 'data\.rows'$"):
        json_rows(tmp_path, doc, "data.rows")
    with pytest.raises(SourceError, match=r"^f\.json: no field 'x' on the path 'data\.count\.x'"
                                          r" \('data\.count' is a number\)$"):
        json_rows(tmp_path, doc, "data.count.x")
    with pytest.raises(SourceError, match=r"^f\.json: expected a list of records at the top "
                                          r"level, found an object \(set records: to the path of "
                                          r"the list\)$"):
        json_rows(tmp_path, doc)
    with pytest.raises(SourceError, match=r"^f\.json: expected a list of records at 'data', "
                                          r"found an object$"):
        json_rows(tmp_path, doc, "data")
    with pytest.raises(SourceError, match=r"^f\.json: line 2: invalid JSON: unexpected 'oops'"):
        json_rows(tmp_path, '{"data":\n oops', "data")
    with pytest.raises(SourceError, match=r"^f\.json: line 1: invalid JSON: the document is "
                                          r"empty"):
        json_rows(tmp_path, "  ")


@pytest.mark.unit
def test_json_streams_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    # Few large records: tracemalloc slows every allocation down.
    record = ('{"id": %d, "email": "user%d@example.com", "amount": %d.25, "tags": ["a", "b"], '
              '"note": "' + "x" * 700 + '"}')
    with path.open("w") as handle:
        handle.write('{"data": {"items": [\n')
        handle.write(",\n".join(record % (i, i, i) for i in range(40_000)))
        handle.write("\n]}}")
    size = path.stat().st_size
    tracemalloc.start()
    spec = JsonSourceSpec(type="json", path="big.json", records="data.items")
    count = sum(1 for record in read_source(spec, tmp_path) if record.data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert size > 30_000_000 and count == 40_000
    assert peak < 10_000_000, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"


@pytest.mark.integration
def test_http_records_are_checked_like_json_records(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/odd").respond_with_data(
        '[{"id": 1}, 7, {"id": "\\ud800"}, {"id": NaN}, {"id": 2}]',
        content_type="application/json")
    assert rows(http_spec(httpserver, "/odd"), Path(".")) == [
        RawRecord(1, {"id": 1}), RawRecord(2, None, "page 1: record is a number, not an object"),
        RawRecord(3, None, "page 1: id: not valid Unicode ('\\ud800': a lone surrogate)"),
        RawRecord(4, None, "page 1: id: not a finite number (nan)"), RawRecord(5, {"id": 2})]
    httpserver.expect_request("/deep").respond_with_data("[" * 100_000 + "]" * 100_000,
                                                         content_type="application/json")
    with pytest.raises(SourceError, match=r"/deep page 1: response nested too deeply"):
        rows(http_spec(httpserver, "/deep"), Path("."))


@pytest.mark.unit
def test_sql_and_parquet_columns_that_would_share_a_field_are_errors(tmp_path: Path) -> None:
    spec = SqlSourceSpec(type="sql", url=f"sqlite:///{tmp_path / 'x.db'}",
                         query="select 1 as id, 2 as id")
    with pytest.raises(SourceError, match=r"^query result: the column 'id' appears more than "
                                          r"once \(columns 1 and 2\)$"):
        rows(spec, tmp_path)
    renamed = SqlSourceSpec(type="sql", url=f"sqlite:///{tmp_path / 'x.db'}",
                            query="select 1 as a, 2 as b", columns={"a": "b"})
    with pytest.raises(SourceError, match=r"^query result: columns: 'a' and 'b' would both "):
        rows(renamed, tmp_path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table([pa.array([1]), pa.array([2])], names=["sku", "sku"]),
                   tmp_path / "dup.parquet")
    with pytest.raises(SourceError, match=r"^dup.parquet: the column 'sku' appears more than "
                                          r"once \(columns 1 and 2\)$"):
        rows(ParquetSourceSpec(type="parquet", path="dup.parquet"), tmp_path)


@pytest.mark.unit
def test_unusable_delimiter_or_encoding_is_a_source_error(tmp_path: Path) -> None:
    (tmp_path / "f.csv").write_text("a;b\n1;2\n")
    (tmp_path / "f.json").write_text("[]")
    with pytest.raises(SourceError, match=r"^f\.csv: the delimiter must be one character "
                                          r"other than a quote or a line break, not ';;'$"):
        rows(CsvSourceSpec(type="csv", path="f.csv", delimiter=";;"), tmp_path)
    for spec in (CsvSourceSpec(type="csv", path="f.csv", encoding="utf-99"),
                 JsonSourceSpec(type="json", path="f.json", encoding="utf-99"),
                 JsonlSourceSpec(type="jsonl", path="f.csv", encoding="utf-99")):
        with pytest.raises(SourceError, match=r"^f\.(csv|json): unknown encoding 'utf-99'$"):
            rows(spec, tmp_path)
