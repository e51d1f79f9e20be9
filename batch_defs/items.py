"""Items and chunks: keys, validation and fan-out sizing between the source and the phases."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from batch_defs.sources import RawRecord, SourceError
from batch_defs.validation import build_item_model, validate_item


@dataclass(frozen=True)
class Item:
    key: str
    seq: int  # position in the source (row number), keeps output order stable
    data: dict[str, Any]


@dataclass
class Chunk:
    """The unit Dagster sees: one mapped step processes one chunk of items per phase."""

    index: int
    items: list[Item]
    total_items: int  # valid items in the whole batch, for progress
    invalid_items: int = 0  # rejected by validation; they count against tolerated_failures

    @property
    def tolerance_base(self) -> int:
        return self.total_items + self.invalid_items

    @property
    def mapping_key(self) -> str:
        return f"chunk_{self.index:04d}"


@dataclass(frozen=True)
class InvalidRow:
    """A record that cannot become an item, and why; it becomes an `invalid` ledger row."""

    key: str
    row: int
    data: dict[str, Any] | None
    reason: str

    @property
    def error(self) -> str:
        return f"row {self.row}: {self.reason}"

    def ledger_row(self) -> dict[str, Any]:
        return {"item_key": self.key, "seq": self.row, "input": self.data, "error": self.error}


def check_records(records: Iterable[RawRecord], key_field: str | None,
                  schema: dict[str, str] | None, max_items: int) -> Iterator[Item | InvalidRow]:
    """Give each record a key and validate it, streaming: every record comes out as an Item
    or an InvalidRow, never dropped. Only the keys seen so far are kept in memory."""
    model = build_item_model(schema) if schema else None
    first_row: dict[str, int] = {}
    for count, record in enumerate(records, start=1):
        if count > max_items:
            raise SourceError(f"the source has more than {max_items} items "
                              "(options.max_items); split it or raise the limit")
        data, reason = record.data, record.error
        key = f"row_{record.row}"
        if data is not None and key_field:
            if data.get(key_field) in (None, ""):
                reason = reason or f"missing key field {key_field!r}"
            else:
                key = str(data[key_field])
        elif data is not None:
            key = str(record.row)
        if reason is None and key in first_row:
            reason = f"duplicate key {key!r} (first at row {first_row[key]})"
            key = f"{key}#row_{record.row}"
        elif reason is None:
            # Claimed even if the record fails the schema: a key twice in a source is
            # ambiguous whichever copy is valid.
            first_row[key] = record.row
        if reason is None and model is not None and data is not None:
            data, reason = validate_item(model, data)
        if reason is not None:
            yield InvalidRow(key, record.row, data, reason)
            continue
        yield Item(key, record.row, data or {})


@dataclass
class PreparedItems:
    items: list[Item] = field(default_factory=list)
    invalid: list[InvalidRow] = field(default_factory=list)


def prepare_items(records: Iterable[RawRecord], key_field: str | None,
                  schema: dict[str, str] | None, max_items: int) -> PreparedItems:
    """check_records, collected in memory (for small sources and tests)."""
    prepared = PreparedItems()
    for entry in check_records(records, key_field, schema, max_items):
        if isinstance(entry, InvalidRow):
            prepared.invalid.append(entry)
        else:
            prepared.items.append(entry)
    return prepared


class ItemSpool:
    """Valid items go to a JSON-lines file as the source is read, and come back chunk by chunk,
    so a large source never sits in memory as a whole (the chunk size depends on the count)."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._file: IO[str] = path.open("w", encoding="utf-8")

    def add(self, item: Item) -> None:
        self._file.write(json.dumps([item.key, item.seq, item.data], default=str))
        self._file.write("\n")
        self.count += 1

    def chunks(self, size: int, invalid: int = 0) -> Iterator[Chunk]:
        self._file.close()
        batch: list[Item] = []
        index = 0
        for item in read_spool(self.path):
            batch.append(item)
            if len(batch) == size:
                yield Chunk(index, batch, self.count, invalid)
                batch, index = [], index + 1
        if batch:
            yield Chunk(index, batch, self.count, invalid)


def read_spool(path: Path) -> Iterator[Item]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            key, seq, data = json.loads(line)
            yield Item(key, seq, data)


def chunk_size(total: int, slots: int, configured: str | int) -> int:
    """Auto: at most 50 steps per phase, so the UI and event log stay light, and at least 25
    items per slot: each step costs ~50 ms and its slots drain at its end, so fewer, fuller
    chunks run closer to the ideal (bench/throughput.py)."""
    if configured != "auto":
        return int(configured)
    return max(1, min(total, max(slots * 25, math.ceil(total / 50))))
