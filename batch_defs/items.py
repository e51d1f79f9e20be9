"""Items and chunks: keys, validation and fan-out sizing between the source and the phases."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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


@dataclass
class PreparedItems:
    items: list[Item] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)  # ledger rows, status invalid


def prepare_items(records: Iterable[RawRecord], key_field: str | None,
                  schema: dict[str, str] | None, max_items: int) -> PreparedItems:
    """Give each record a key, validate it; bad records become invalid rows, never drops."""
    model = build_item_model(schema) if schema else None
    prepared = PreparedItems()
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
        if reason is None and model is not None and data is not None:
            data, reason = validate_item(model, data)
        if reason is not None:
            prepared.invalid.append({"item_key": key, "seq": record.row, "input": data,
                                     "error": f"row {record.row}: {reason}"})
            continue
        first_row[key] = record.row
        prepared.items.append(Item(key, record.row, data or {}))
    return prepared


def chunk_size(total: int, slots: int, configured: str | int) -> int:
    """Auto: at most 50 steps per phase, so the UI and event log stay light, and at least 25
    items per slot: each step costs ~50 ms and its slots drain at its end, so fewer, fuller
    chunks run closer to the ideal (bench/throughput.py)."""
    if configured != "auto":
        return int(configured)
    return max(1, min(total, max(slots * 25, math.ceil(total / 50))))


def make_chunks(items: list[Item], size: int, invalid: int = 0) -> list[Chunk]:
    total = len(items)
    return [Chunk(i, items[start:start + size], total, invalid)
            for i, start in enumerate(range(0, total, size))]
