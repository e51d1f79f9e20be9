"""A run's summary from its ledger rows: counts, timings, throughput, cost, failures."""

from __future__ import annotations

from typing import Any

from batch_defs.ledger import FAILURE_STATUSES, SOURCE_PHASE, Ledger


def summarize_run(ledger: Ledger, run_id: str, failed_examples: int = 10,
                  run: dict[str, Any] | None = None) -> dict[str, Any]:
    """`run`: the run's batch_run row when the caller has just read it."""
    run = run or ledger.run(run_id) or {"phases": [], "total_items": 0}
    phases: list[str] = run["phases"]
    rows = ledger.rows(run_id, light=True)
    counts = {key: int(n) for key, n in rows.groupby(["phase", "status"]).size().items()}
    invalid = counts.get((SOURCE_PHASE, "invalid"), 0)
    executed = rows[(rows["phase"] != SOURCE_PHASE) & rows["reused_from"].isna()]
    started = float(run.get("started_at") or 0.0)
    finished = float(executed["finished_at"].max()) if len(executed) else started
    duration = max(0.0, finished - started)
    succeeded = counts.get((phases[-1], "succeeded"), 0) if phases else 0
    failures = rows[rows["status"].isin(FAILURE_STATUSES)]
    return {
        "run_id": run_id,
        "batch": run.get("batch"),
        "partition": run.get("partition"),
        "items": int(run["total_items"]) + invalid,
        "succeeded": succeeded,
        "failed_items": int(failures["item_key"].nunique()),
        "invalid": invalid,
        "skipped": int((rows["status"] == "skipped").sum()),
        "reused": int(rows["reused_from"].notna().sum()),
        "per_phase": {p: {s: n for (ph, s), n in sorted(counts.items()) if ph == p}
                      for p in [SOURCE_PHASE, *phases] if p != SOURCE_PHASE or invalid},
        "duration_s": round(duration, 3),
        "items_per_s": round(len(executed) / max(1, len(phases)) / duration, 2)
        if duration else 0.0,
        "cost": round(float(rows["cost"].sum()), 6),
        "tokens": int(rows["tokens"].sum()),
        "stop_reason": run.get("stop_reason"),
        "failures": [
            {"item_key": r.item_key, "phase": r.phase, "status": r.status, "error": r.error}
            for r in failures.head(failed_examples).itertuples()
        ],
    }
