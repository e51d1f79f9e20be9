"""Progress of a run from ledger counts: done/total, percent, throughput and ETA over a moving
window, and the current phase; phrased `450/1000 done (45%), 3 failed, 12.4 items/s, ETA 44s`.

The ETA divides the work still to do by the pace of the last WINDOW_S seconds, in seconds of
item work: each phase's remaining item-phases times that phase's mean item duration so far, so
a slow first phase and a fast second one do not skew it (item-phases counted alike would).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from batch_defs.ledger import SOURCE_PHASE, Ledger, RowGroup
from batch_defs.states import ItemStatus
from batch_defs.summary import items_per_second

WINDOW_S = 30.0
STOPS = (ItemStatus.FAILED, ItemStatus.REJECTED, ItemStatus.SKIPPED)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class PhaseTally:
    """One phase's rows as progress needs them."""

    statuses: dict[str, int] = field(default_factory=dict)  # status -> rows (reused too)
    stops: int = 0  # rows that end their item here (failed, rejected, skipped but `when:`)
    executed: int = 0  # rows this run executed itself
    work_s: float = 0.0  # their summed durations

    @property
    def rows(self) -> int:
        return sum(self.statuses.values())


@dataclass
class LiveCounts:
    """A run's rows per phase, read in one grouped query."""

    phases: dict[str, PhaseTally]
    invalid: int = 0
    first_started: float | None = None  # of the rows this run executed
    last_finished: float | None = None

    @property
    def executed(self) -> int:
        return sum(t.executed for t in self.phases.values())

    @property
    def work_s(self) -> float:
        return sum(t.work_s for t in self.phases.values())

    def status(self, status: str) -> int:
        return sum(t.statuses.get(status, 0) for t in self.phases.values())


def read_counts(ledger: Ledger, run_id: str, phases: list[str]) -> LiveCounts:
    """The run's counts now (the ledger's tally: one small read, whatever the run's size)."""
    return tally(ledger.row_groups(run_id), phases)


def tally(groups: list[RowGroup], phases: list[str]) -> LiveCounts:
    """Row groups (Ledger.row_groups) added up as progress counts them."""
    counts = LiveCounts({phase: PhaseTally() for phase in phases})
    for group in groups:
        if group.phase == SOURCE_PHASE:
            counts.invalid += group.rows
            continue
        phase = counts.phases.setdefault(group.phase, PhaseTally())
        phase.statuses[group.status] = phase.statuses.get(group.status, 0) + group.rows
        phase.stops += 0 if group.passes else group.rows
        if not group.reused:
            phase.executed += group.rows
            phase.work_s += group.work_s
            if group.first_started is not None:
                counts.first_started = min(group.first_started,
                                           counts.first_started or group.first_started)
            if group.last_finished is not None:
                counts.last_finished = max(group.last_finished,
                                           counts.last_finished or group.last_finished)
    return counts


@dataclass(frozen=True)
class Progress:
    total_items: int  # valid and invalid
    done: int  # items' worth of work finished: item-phases done over phases (stopped = done)
    percent: float
    failed: int
    invalid: int
    rejected: int
    items_per_s: float
    eta_s: float | None
    phase: str | None  # the first phase with items still to run
    finished: bool

    def line(self) -> str:
        """`450/1000 done (45%), 3 failed, 12.4 items/s, ETA 44s, phase score`."""
        parts = [f"{self.done}/{self.total_items} done ({self.percent:.0%})",
                 f"{self.failed} failed"]
        parts += [f"{n} {name}" for name, n in (("invalid", self.invalid),
                                                ("rejected", self.rejected)) if n]
        parts.append(f"{self.items_per_s:.1f} items/s")
        if not self.finished:
            parts.append(f"ETA {format_duration(self.eta_s)}" if self.eta_s is not None
                         else "ETA ?")
            if self.phase:
                parts.append(f"phase {self.phase}")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {"done": self.done, "total": self.total_items,
                "percent": round(self.percent * 100, 1), "failed": self.failed,
                "invalid": self.invalid, "rejected": self.rejected,
                "items_per_s": self.items_per_s,
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
                "phase": self.phase, "finished": self.finished, "line": self.line()}


def starting_line(valid: int, invalid: int) -> str:
    """The progress line of a run whose items are about to start."""
    items = valid + invalid
    share = invalid / items if items else 0.0
    return f"{invalid}/{items} done ({share:.0%}), 0 failed" + (f", {invalid} invalid"
                                                               if invalid else "")


@dataclass
class Remaining:
    units: int  # item-phases still to run
    work_s: float | None  # their expected seconds of item work; None: nothing to go by yet
    phase: str | None


def remaining(counts: LiveCounts, phases: list[str], total_items: int) -> Remaining:
    executed = counts.executed
    overall_mean = counts.work_s / executed if executed else None
    units, work, current = 0, 0.0, None
    stopped_before = 0
    for phase in phases:
        tally = counts.phases.get(phase, PhaseTally())
        left = max(0, total_items - stopped_before - tally.rows)
        stopped_before += tally.stops
        if not left:
            continue
        current = current or phase
        units += left
        mean = tally.work_s / tally.executed if tally.executed else overall_mean
        if mean is not None:
            work += left * mean
    return Remaining(units, work if overall_mean is not None else None, current)


class ProgressWindow:
    """Pace over the last `window_s` seconds: item-phases and seconds of item work done."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self.samples: deque[tuple[float, int, float]] = deque()

    def add(self, now: float, executed: int, work_s: float) -> tuple[float, float]:
        """(item-phases per second, work seconds per second) over the window."""
        self.samples.append((now, executed, work_s))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        (t0, u0, w0), (t1, u1, w1) = self.samples[0], self.samples[-1]
        if t1 <= t0:
            return 0.0, 0.0
        return (u1 - u0) / (t1 - t0), (w1 - w0) / (t1 - t0)

    def run_progress(self, counts: LiveCounts, run: Mapping[str, Any]) -> Progress:
        """Progress of the run whose batch_run row is `run`."""
        started = run.get("started_at")
        return self.progress(counts, list(run["phases"]), int(run["total_items"]),
                             float(started) if started else None)

    def progress(self, counts: LiveCounts, phases: list[str], total_items: int,
                 started_at: float | None = None, now: float | None = None) -> Progress:
        """`started_at`: the run's start, for its own throughput once it has finished."""
        now = time.time() if now is None else now
        if not self.samples and counts.first_started is not None:
            self.samples.append((counts.first_started, 0, 0.0))  # the pace from the start
        unit_rate, work_rate = self.add(now, counts.executed, counts.work_s)
        left = remaining(counts, phases, total_items)
        units_total = total_items * max(1, len(phases))
        fraction = 1.0 - left.units / units_total if units_total else 1.0
        finished = left.units == 0
        if finished:
            # Ended: the run's own figure, the one its summary gives.
            span = (counts.last_finished or now) - (started_at or counts.first_started or now)
            rate = items_per_second(counts.executed, len(phases), span)
            eta: float | None = 0.0
        else:
            rate = round(unit_rate / max(1, len(phases)), 2)
            eta = (left.work_s / work_rate if left.work_s is not None and work_rate > 0
                   else None)
        # Invalid items are items of the run too, whose outcome was final at the fan-out.
        items = total_items + counts.invalid
        done = counts.invalid + total_items * fraction
        return Progress(
            total_items=items, done=int(done + 1e-9), percent=done / items if items else 1.0,
            failed=counts.status(ItemStatus.FAILED), invalid=counts.invalid,
            rejected=counts.status(ItemStatus.REJECTED), items_per_s=rate, eta_s=eta,
            phase=left.phase, finished=finished)


def read_progress(ledger: Ledger, run_id: str, window: ProgressWindow,
                  run: Mapping[str, Any] | None = None,
                  groups: list[RowGroup] | None = None) -> Progress | None:
    """The run's progress now, or None before it has a batch_run row; `run` and `groups`
    (Ledger.row_groups) when the caller has just read them."""
    run = run or ledger.run(run_id)
    if run is None:
        return None
    phases = list(run["phases"])
    counts = tally(ledger.row_groups(run_id) if groups is None else groups, phases)
    return window.run_progress(counts, run)


class ProgressReader:
    """Progress of one run, read again and again through one moving window (the rate and
    ETA of the last WINDOW_S seconds)."""

    def __init__(self, window: ProgressWindow | None = None):
        self.window = window or ProgressWindow()

    def read(self, ledger: Ledger, run_id: str,
             run: Mapping[str, Any] | None = None) -> Progress | None:
        run = run or ledger.run(run_id)
        if run is None:
            return None
        return self.window.run_progress(read_counts(ledger, run_id, list(run["phases"])), run)
