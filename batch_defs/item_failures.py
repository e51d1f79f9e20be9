"""Items an after step found failed (ItemsFailed): recorded so the partition redoes them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batch_defs.ledger import LIGHT_COLUMNS, Ledger

if TYPE_CHECKING:
    import pandas as pd


def _plain(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """DataFrame rows as dicts, missing values as None (not NaN)."""
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


def record_item_failures(ledger: Ledger, batch: str, partition: str, run_id: str,
                         errors: Mapping[tuple[str, str], str]) -> None:
    """Mark each (phase, item key) failed in this run, and also every earlier row of the
    partition that calls it succeeded: a phase reuses an item that succeeded in any run of the
    partition, and this one's effect never landed, so the next run must do it again."""
    now = time.time()
    by_phase: dict[str, dict[str, str]] = {}
    for (phase, key), error in errors.items():
        by_phase.setdefault(phase, {})[key] = error
    runs = [r["run_id"] for r in ledger.runs(batch) if r["partition"] == partition]
    rows: list[dict[str, Any]] = []
    for phase, failed in by_phase.items():
        missing = set(failed)
        for run in runs:
            found = ledger.rows(run, status="succeeded", phase=phase, columns=LIGHT_COLUMNS)
            for row in _plain(found[found["item_key"].isin(list(failed))]):
                if run == run_id:
                    missing.discard(row["item_key"])
                    error = failed[row["item_key"]]
                else:  # a row of an earlier run: history says when it turned out failed
                    error = f"{failed[row['item_key']]} (found at run {run_id})"
                # Timings, cost and origin stay: what changed is only the verdict.
                rows.append({**row, "status": "failed", "error": error, "output": None})
        rows += [{"batch": batch, "partition": partition, "run_id": run_id, "phase": phase,
                  "item_key": key, "seq": 0, "status": "failed", "error": failed[key],
                  "finished_at": now} for key in sorted(missing)]
    ledger.record(rows)
