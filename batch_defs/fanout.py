"""The fan-out's work: read, key and validate the source in one streaming pass.

A chunk is handed on (`on_chunk`) as soon as it is full, so that the run's slots start on its
items while the rest of the source is still read and validated: a large source costs the first
item nothing. Its refs name an upper bound of the items (`bound`) until the count is known."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch_defs.items import ChunkRef, InvalidRow, Item, ItemSpool, check_records
from batch_defs.ledger import SOURCE_PHASE, Ledger
from batch_defs.sources import read_source
from batch_defs.spec import BatchSpec
from batch_defs.states import ItemStatus

FLUSH_ROWS = 500  # invalid source rows per ledger write


@dataclass
class SourceRead:
    spool: ItemSpool
    invalid: int = 0
    first_invalid: InvalidRow | None = None
    dependencies: bool = False  # some item declares options.depends_on_field
    streamed: int = 0  # chunks handed on while the source was read


@dataclass(frozen=True)
class Streaming:
    """Chunks handed on while the source is read: `size` items each, refs naming `bound`
    items (an upper bound: the count is known only at the end)."""

    size: int
    bound: int
    on_chunk: Callable[[ChunkRef], None]


def spool_source(ledger: Ledger, spec: BatchSpec, base_dir: Path, partition: str, run_id: str,
                 spool_path: Path, streaming: Streaming | None = None) -> SourceRead:
    """Valid items to the run's manifest (the spool), invalid ones to the ledger in batches:
    every record of the source is one or the other. With `streaming`, each full chunk is
    handed on as soon as its last item is in the spool."""
    read = SourceRead(ItemSpool(spool_path))
    pending: list[dict[str, Any]] = []
    depends_on = spec.options.depends_on_field
    try:
        for entry in check_records(read_source(spec.source, base_dir), spec.source.key,
                                   spec.source.schema_, spec.options.max_items):
            if isinstance(entry, Item):
                read.spool.add(entry)
                if depends_on and entry.data.get(depends_on) not in (None, "", []):
                    read.dependencies = True  # and no chunk is handed on from here
                if (streaming is not None and not read.dependencies
                        and read.spool.count % streaming.size == 0):
                    read.spool.flush()
                    streaming.on_chunk(read.spool.ref(read.streamed, streaming.size,
                                                      streaming.bound))
                    read.streamed += 1
                continue
            read.invalid += 1
            read.first_invalid = read.first_invalid or entry
            pending.append({"batch": spec.name, "partition": partition, "run_id": run_id,
                            "phase": SOURCE_PHASE, "status": ItemStatus.INVALID,
                            **entry.ledger_row()})
            if len(pending) >= FLUSH_ROWS:
                ledger.record(pending)
                pending = []
    finally:
        ledger.record(pending)  # what was read is recorded even when the source breaks off
        read.spool.close()
    return read
