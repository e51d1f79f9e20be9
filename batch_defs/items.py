"""Items and chunks: keys, validation and fan-out sizing between the source and the phases."""

from __future__ import annotations

import array
import graphlib
import heapq
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from batch_defs.sources import RawRecord, SourceError
from batch_defs.states import MAX_ITEM_KEY_LENGTH
from batch_defs.validation import ItemSchema, shown


@dataclass(frozen=True)
class Item:
    key: str
    seq: int  # position in the source (row number), keeps output order stable
    data: dict[str, Any]


@dataclass(frozen=True)
class ChunkRef:
    """The unit Dagster sees: one mapped step per chunk and phase. It names a slice of the
    run's item manifest, not the items: they travel through the manifest and the ledger, so
    steps pass (and Dagster pickles) a few numbers instead of every item's data."""

    index: int
    manifest: str  # the run's manifest (the fan-out's spool), a JSON-lines file
    offset: int  # byte offset of the chunk's first item in it
    count: int
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
    try:
        checker = ItemSchema(schema) if schema else None
    except ValueError as exc:  # a spec built in code; loaded files are checked at load time
        raise SourceError(f"schema: {exc}") from exc
    first_row: dict[str, int] = {}
    for count, record in enumerate(records, start=1):
        if count > max_items:
            raise SourceError(f"the source has more than {max_items} items "
                              "(options.max_items); split it or raise the limit")
        data, reason = record.data, record.error
        key, key_problem = record_key(record, key_field)
        reason = reason or key_problem
        if reason is None and key in first_row:
            reason = f"duplicate key {shown(key)} (first at row {first_row[key]})"
            key = _invalid_key(f"{key}#row_{record.row}", record.row)
        elif reason is None:
            # Claimed even if the record fails the schema: a key twice in a source is
            # ambiguous whichever copy is valid.
            first_row[key] = record.row
        if reason is None and checker is not None and data is not None:
            data, reason = checker.check(data)
        if reason is not None:
            yield InvalidRow(_invalid_key(key, record.row), record.row, data, reason)
            continue
        yield Item(key, record.row, data or {})


def record_key(record: RawRecord, key_field: str | None) -> tuple[str, str | None]:
    """The record's item key, and why it cannot be one (None if it can). Without a key field
    the row number is the key; a key the ledger cannot store is refused here, before it
    reaches the ledger (row_N stands in for it)."""
    fallback = f"row_{record.row}"
    if record.data is None:
        return fallback, None
    if not key_field:
        return str(record.row), None
    value = record.data.get(key_field)
    if value in (None, ""):
        return fallback, f"missing key field {key_field!r}"
    if not isinstance(value, str | int | float):
        return fallback, (f"key field {key_field!r} is a {type(value).__name__}, "
                          "not text or a number")
    key = str(value)
    if len(key) > MAX_ITEM_KEY_LENGTH:
        return fallback, (f"key is {len(key)} characters long (the ledger holds at most "
                          f"{MAX_ITEM_KEY_LENGTH})")
    bad = _UNSTORABLE.search(key)
    if bad:
        return fallback, (f"key {shown(key)} contains the control character "
                          f"U+{ord(bad.group()):04X}")
    return key, None


# Control characters (C0, DEL, C1), lone surrogates and line/paragraph separators: the ledger
# (PostgreSQL text) refuses NUL and surrogates, and the others break every listing of keys.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")


def _invalid_key(key: str, row: int) -> str:
    # An invalid row is stored under a key too; one that does not fit falls back to row_N.
    fits = len(key) <= MAX_ITEM_KEY_LENGTH and not _UNSTORABLE.search(key)
    return key if fits else f"row_{row}"


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
    """Valid items go to a JSON-lines file (the run's manifest) as the source is read; chunks
    are slices of it, so a large source never sits in memory as a whole (an item costs the
    spool 8 bytes here: its line's offset)."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._offsets = array.array("q")  # byte offset of each item's line
        self._position = 0
        self._file: IO[bytes] = path.open("wb")

    def add(self, item: Item) -> None:
        line = (json.dumps([item.key, item.seq, item.data], default=str) + "\n").encode()
        self._file.write(line)
        self._offsets.append(self._position)
        self._position += len(line)
        self.count += 1

    def flush(self) -> None:
        """What was added so far readable by read_chunk (the engine's slots read it while the
        fan-out still writes)."""
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def items(self) -> Iterator[Item]:
        self.close()
        return read_spool(self.path)

    def ref(self, index: int, size: int, total: int, invalid: int = 0) -> ChunkRef:
        """Chunk `index` of the manifest cut into chunks of `size` items."""
        start = index * size
        return ChunkRef(index, str(self.path), self._offsets[start],
                        min(size, self.count - start), total, invalid)

    def refs(self, size: int, invalid: int = 0) -> list[ChunkRef]:
        """The manifest cut into chunks of `size` items."""
        self.close()
        return [self.ref(index, size, self.count, invalid)
                for index in range(math.ceil(self.count / size))]


def read_spool(path: Path) -> Iterator[Item]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            key, seq, data = json.loads(line)
            yield Item(key, seq, data)


def read_chunk(ref: ChunkRef) -> list[Item]:
    """The items of one chunk, read from its slice of the manifest."""
    items = []
    with open(ref.manifest, "rb") as handle:
        handle.seek(ref.offset)
        for _ in range(ref.count):
            key, seq, data = json.loads(handle.readline())
            items.append(Item(key, seq, data))
    return items


def chunk_size(total: int, slots: int, configured: str | int) -> int:
    """Auto: at most 50 steps per phase, so the UI and event log stay light, and at least 25
    items per slot and 100 per step: each step costs Dagster ~50 ms of events and bookkeeping,
    which fuller chunks spread over more items (bench/throughput.py, bench/scale.py). The
    run's slots work ahead across chunk boundaries (engine.py), so size is not what keeps
    them busy."""
    if configured != "auto":
        return int(configured)
    return max(1, min(total, max(slots * 25, MIN_AUTO_CHUNK, math.ceil(total / 50))))


MIN_AUTO_CHUNK = 100


class DependencyError(ValueError):
    """Items' depends_on cannot be satisfied: an unknown key or a cycle."""


def item_dependencies(data: dict[str, Any], field: str | None) -> list[str]:
    """The keys an item depends on: a list, or text separated by commas or spaces."""
    value = data.get(field) if field else None
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [part for part in re.split(r"[,\s]+", value) if part]
    if isinstance(value, list | tuple):
        return [str(part) for part in value]
    raise DependencyError(f"{field} must be a list of item keys or text separated by commas, "
                          f"not {type(value).__name__}")


def dependency_map(items: Iterable[Item], field: str | None) -> dict[str, list[str]]:
    """item key -> keys it depends on; empty when no item declares any."""
    depends = {item.key: item_dependencies(item.data, field) for item in items}
    return depends if any(depends.values()) else {}


def dependency_order(items: list[Item], field: str | None) -> list[Item]:
    """The items with every dependency before its dependants (among items that are ready,
    source order). Raises DependencyError naming an unknown key or the keys of a cycle."""
    by_key = {item.key: item for item in items}
    depends = {item.key: item_dependencies(item.data, field) for item in items}
    for item in items:
        unknown = sorted(set(depends[item.key]) - by_key.keys())
        if unknown:
            raise DependencyError(f"item {item.key!r} depends on {unknown[0]!r}, which is not "
                                  "a valid item of the batch")
    sorter = graphlib.TopologicalSorter(depends)
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        raise DependencyError(f"dependency cycle: {describe_cycle(exc.args[1])} (each "
                              "depends on the next)") from exc
    ready = [(by_key[key].seq, key) for key in sorter.get_ready()]
    heapq.heapify(ready)
    ordered: list[Item] = []
    while ready:
        _, key = heapq.heappop(ready)
        ordered.append(by_key[key])
        sorter.done(key)
        for now_ready in sorter.get_ready():
            heapq.heappush(ready, (by_key[now_ready].seq, now_ready))
    return ordered


def describe_cycle(cycle: list[str]) -> str:
    """graphlib's cycle (each a dependency of the next) as `'a' -> 'b' -> 'a'`, each item
    depending on the next, starting from the smallest key so the message is stable."""
    keys = list(reversed(cycle[:-1]))
    start = keys.index(min(keys))
    keys = keys[start:] + keys[:start]
    return " -> ".join(repr(k) for k in [*keys, keys[0]])


def dependency_chunks(spool: ItemSpool, field: str | None, invalid: int = 0,
                      size: int = 0, streamed: int = 0) -> list[ChunkRef]:
    """The `streamed` chunks of `size` items a fan-out handed on before it met the first item
    with dependencies, then every later item in one chunk (the engine holds an item back
    until its dependencies are done, in whichever chunk). Checked first, so a cycle or an
    unknown key fails before any of those items runs."""
    dependency_order(list(spool.items()), field)
    refs = [spool.ref(index, size, spool.count, invalid) for index in range(streamed)]
    start = streamed * size
    last = spool.ref(0, spool.count, spool.count, invalid) if not streamed else replace(
        spool.ref(streamed, size, spool.count, invalid), count=spool.count - start)
    return [*refs, last]
