"""The ledger never refuses what it is given (issue 11): NUL characters, keys it cannot hold and
rows the database rejects, on Postgres, which refuses NUL in text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from batch_defs.ledger import SOURCE_PHASE, Ledger, LedgerWriteError, storable
from batch_defs.states import MAX_ITEM_KEY_LENGTH, ItemStatus
from resources.storage import open_ledger
from tests.conftest import fresh_pg_database, run_batch, write_batch

pytestmark = [pytest.mark.postgres, pytest.mark.job]


def nul_handler(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
    if item["id"] == 2:
        raise ValueError("server said: bad\x00byte")
    return {"echo": f"got\x00{item['id']}"}


def test_nul_characters_and_unholdable_keys_never_fail_a_write(
        pg_instance: dg.DagsterInstance, batch_dir: Path) -> None:
    write_batch(batch_dir, {
        "name": "hostile_text",
        "source": {"type": "inline", "key": "id", "items": [
            {"id": 1, "note": "a\x00b"}, {"id": 2, "note": "fine"}, {"id": 3, "note": "ok"},
            {"id": "x" * (MAX_ITEM_KEY_LENGTH + 1)}, {"id": "nul\x00key"}]},
        "phases": [{"name": "echo", "task": "python",
                    "params": {"function": "tests.test_ledger_text:nul_handler"}}],
        "options": {"on_error": "continue", "tolerated_failures": 5}})
    result = run_batch(batch_dir, pg_instance, "hostile_text")
    assert result.success
    with open_ledger(pg_instance) as ledger:
        rows = ledger.rows(result.run_id)
    by_key = {row.item_key: row for row in rows[rows["phase"] == "echo"].itertuples()}
    # JSON spells NUL \u0000, which every database stores: outputs come back exactly.
    assert by_key["1"].status == "succeeded"
    assert json.loads(by_key["1"].output) == {"id": 1, "note": "a\x00b", "echo": "got\x001"}
    assert by_key["2"].status == "failed" and by_key["2"].error == (
        "ValueError: server said: bad\\0byte")
    assert by_key["3"].status == "succeeded"
    invalid = rows[rows["phase"] == SOURCE_PHASE]
    assert len(invalid) == 2 and set(invalid["status"]) == {"invalid"}
    assert all(len(key) <= MAX_ITEM_KEY_LENGTH for key in invalid["item_key"])
    errors = sorted(invalid["error"])
    assert errors[0].endswith(f"key is {MAX_ITEM_KEY_LENGTH + 1} characters long (the ledger "
                              f"holds at most {MAX_ITEM_KEY_LENGTH})")
    assert errors[1].endswith("contains the control character U+0000")

    # Not "every run and resume, forever": the next run re-runs the failed item alone.
    again = run_batch(batch_dir, pg_instance, "hostile_text")
    with open_ledger(pg_instance) as ledger:
        fresh = ledger.rows(again.run_id)
    ran = fresh[(fresh["phase"] == "echo") & fresh["reused_from"].isna()]
    assert list(ran["item_key"]) == ["2"]


def test_a_row_the_database_refuses_is_stored_as_a_failure_that_says_why() -> None:
    with fresh_pg_database() as url, Ledger(url) as ledger:
        good = {"batch": "b", "partition": "p", "run_id": "r", "phase": "work", "seq": 1,
                "item_key": "ok", "status": "succeeded", "output": {"x": 1}}
        refused = {**good, "item_key": "odd", "seq": 2, "status": "s" * 40}  # > varchar(16)
        degraded = ledger.record([good, refused])
        assert degraded == {"odd"}
        rows = {r.item_key: r for r in ledger.rows("r").itertuples()}
        assert rows["ok"].status == "succeeded"  # the rest of the write went in
        assert rows["odd"].status == "failed"
        assert rows["odd"].error.startswith("the ledger could not store this outcome: ")
        # A row that cannot be stored even as a failure is named in the error, never lost
        # in silence.
        hopeless = {**good, "item_key": "lost", "seq": 3, "run_id": "x" * 100}
        with pytest.raises(LedgerWriteError, match="could not store the outcome of 1 item"):
            ledger.record([hopeless])
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("select count(*) from batch_item")).scalar() == 2
        engine.dispose()


@pytest.mark.unit
@pytest.mark.parametrize(("value", "stored"), [
    ("plain key 42", "plain key 42"),
    (ItemStatus.FAILED, "failed"),  # a StrEnum is stored as its plain value
    ("bad\x00byte", "bad\\0byte"),
    ("caf\u00e9 \udc80", "caf\u00e9 ?"),  # a lone surrogate UTF-8 cannot encode
    ("caf\u00e9", "caf\u00e9"),
])
def test_text_is_made_storable_as_plain_str(value: str, stored: str) -> None:
    made = storable(value)
    assert made == stored
    assert type(made) is str
