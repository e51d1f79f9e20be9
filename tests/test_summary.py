"""A run's summary, computed in the ledger's database, against the rule it states, item by item.

The summary's counts come from aggregate queries (so `status` costs the same at a million
items); the oracle here walks each item's rows in plain Python by the rule in
batch_defs/summary.py: an item's outcome is its first row that stops it, else its last phase's
row, else pending; invalid items are the source rows.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batch_defs.ledger import SOURCE_PHASE, Ledger
from batch_defs.summary import OUTCOMES, summarize_run

pytestmark = pytest.mark.unit

PHASES = ["extract", "send", "archive"]
# What one item's row in one phase can be: (status, skip cause), or None for no row yet.
ROW_KINDS = [None, ("succeeded", None), ("failed", None), ("rejected", None),
             ("skipped", "handler"), ("skipped", "dependency"), ("skipped", "condition")]
run_counter = itertools.count()


def passes(kind: tuple[str, str | None]) -> bool:
    return kind[0] == "succeeded" or kind == ("skipped", "condition")


def expected_outcome(kinds: list[tuple[str, str | None] | None]) -> str:
    for kind in kinds:
        if kind is not None and not passes(kind):
            return kind[0]
    last = kinds[-1]
    return last[0] if last is not None else "pending"


def expected_pending(items: list[dict[str, Any]], phase_index: int) -> int:
    """Items expected in the phase (not stopped before it) that have no row in it yet."""
    pending = 0
    for item in items:
        kinds = item["kinds"]
        stopped_before = any(k is not None and not passes(k) for k in kinds[:phase_index])
        pending += not stopped_before and kinds[phase_index] is None
    return pending


PASSING = [kind for kind in ROW_KINDS if kind is not None and passes(kind)]
STOPPING = [kind for kind in ROW_KINDS if kind is not None and not passes(kind)]


@st.composite
def phase_rows(draw: st.DrawFn) -> list[tuple[str, str | None] | None]:
    """An item's rows as a run writes them: phases that let it go on, then perhaps the one
    that stopped it, then nothing."""
    went_on = draw(st.integers(0, len(PHASES)))
    kinds: list[tuple[str, str | None] | None] = [draw(st.sampled_from(PASSING))
                                                  for _ in range(went_on)]
    if went_on < len(PHASES):
        kinds.append(draw(st.sampled_from([None, *STOPPING])))
    return kinds + [None] * (len(PHASES) - len(kinds))


item_strategy = st.fixed_dictionaries({
    "invalid": st.booleans(),
    "kinds": phase_rows(),
    "reused": st.lists(st.booleans(), min_size=len(PHASES), max_size=len(PHASES)),
    "cost": st.sampled_from([0.0, 0.25, 1.5]),
})


def write_run(ledger: Ledger, run_id: str, items: list[dict[str, Any]]) -> None:
    valid = sum(not item["invalid"] for item in items)  # total_items counts valid items
    ledger.start_run(run_id, "b", run_id, valid, PHASES)
    rows = []
    for seq, item in enumerate(items):
        key = f"item-{seq}"
        if item["invalid"]:
            rows.append({"batch": "b", "partition": run_id, "run_id": run_id,
                         "phase": SOURCE_PHASE, "item_key": key, "seq": seq,
                         "status": "invalid", "error": f"row {seq}: bad"})
            continue
        for phase, kind, reused in zip(PHASES, item["kinds"], item["reused"], strict=True):
            if kind is None:
                continue
            rows.append({"batch": "b", "partition": run_id, "run_id": run_id, "phase": phase,
                         "item_key": key, "seq": seq, "status": kind[0], "skip_cause": kind[1],
                         "attempts": 1, "cost": item["cost"], "tokens": 3,
                         "started_at": 100.0 + seq, "finished_at": 101.0 + seq,
                         "reused_from": "earlier" if reused else None,
                         "error": None if passes(kind) else f"{phase} said no to {key}"})
    ledger.record(rows)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(item_strategy, min_size=1, max_size=25))
def test_the_summary_counts_each_item_once_by_the_rule(unit_ledger: Ledger,
                                                       items: list[dict[str, Any]]) -> None:
    run_id = f"run-{next(run_counter)}"
    write_run(unit_ledger, run_id, items)
    summary = summarize_run(unit_ledger, run_id, failed_examples=1000)

    valid = [item for item in items if not item["invalid"]]
    expected = dict.fromkeys(OUTCOMES, 0)
    for item in valid:
        expected[expected_outcome(item["kinds"])] += 1
    expected["invalid"] = len(items) - len(valid)
    assert {name: getattr(summary, name) for name in OUTCOMES} == expected
    assert summary.items == len(items)

    for index, phase in enumerate(PHASES):
        counts = summary.per_phase[phase]
        for status in ("succeeded", "failed", "rejected", "skipped"):
            assert getattr(counts, status) == sum(
                1 for item in valid if (item["kinds"][index] or ("",))[0] == status), status
        assert counts.pending == expected_pending(valid, index), phase
        assert counts.reused == sum(1 for item in valid
                                    if item["kinds"][index] and item["reused"][index])

    ran = [(item, index) for item in valid for index, kind in enumerate(item["kinds"])
           if kind is not None and not item["reused"][index]]
    assert summary.executed == len(ran)
    assert summary.run_cost == pytest.approx(sum(item["cost"] for item, _ in ran))
    assert summary.run_tokens == 3 * len(ran)
    failing_rows = [f"item-{seq}" for seq, item in enumerate(items)
                    for kind in (["invalid"] if item["invalid"] else item["kinds"])
                    if kind == "invalid" or (kind and kind[0] in ("failed", "rejected"))]
    assert [f.item_key for f in summary.failures] == failing_rows


def test_failure_examples_are_the_first_in_source_order(unit_ledger: Ledger) -> None:
    items = [{"invalid": seq % 3 == 0, "kinds": [("failed", None), None, None],
              "reused": [False] * 3, "cost": 0.0} for seq in range(30)]
    write_run(unit_ledger, "run-f", list(reversed(items)))
    summary = summarize_run(unit_ledger, "run-f", failed_examples=4)
    assert [f.item_key for f in summary.failures] == ["item-0", "item-1", "item-2", "item-3"]
    assert summary.failures[1].status == "failed" and summary.failures[1].phase == "extract"
    assert summary.failed == 20 and summary.invalid == 10


def test_a_summary_of_many_rows_reads_only_the_stopping_ones(tmp_path: Path) -> None:
    """10,000 items: the items that stopped are read one by one, the rest only counted."""
    with Ledger(f"sqlite:///{tmp_path / 'big.db'}") as ledger:
        items = [{"invalid": False, "reused": [False] * 3, "cost": 0.0,
                  "kinds": [("succeeded", None), ("failed", None) if seq % 1000 == 7
                            else ("succeeded", None), ("succeeded", None) if seq % 1000 != 7
                            else None]} for seq in range(10_000)]
        write_run(ledger, "run-big", items)
        seen: list[int] = []
        original = ledger.stopping_rows

        def counting(run_id: str, phases: list[str]) -> list[tuple[str, str, str]]:
            found = original(run_id, phases)
            seen.append(len(found))
            return found

        ledger.stopping_rows = counting  # type: ignore[method-assign]
        summary = summarize_run(ledger, "run-big")
    assert seen == [10]
    assert (summary.succeeded, summary.failed, summary.pending) == (9_990, 10, 0)
    assert summary.per_phase["archive"].pending == 0
