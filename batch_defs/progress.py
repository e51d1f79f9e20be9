"""Progress of a run from ledger counts: done/total, throughput over a moving window, ETA."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from batch_defs.ledger import SOURCE_PHASE

FINAL_FAILURES = ("failed", "skipped", "rejected")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class Progress:
    total_items: int
    items_done: int  # items whose outcome is final: through the last phase, or stopped
    units_done: int  # (item, phase) executions finished
    units_total: int
    failed: int
    invalid: int
    rate: float  # item-phase units per second over the window
    eta_s: float | None

    @property
    def fraction(self) -> float:
        return self.units_done / self.units_total if self.units_total else 1.0

    def tag(self) -> str:
        eta = f" ETA {format_duration(self.eta_s)}" if self.eta_s is not None else ""
        return f"{self.items_done}/{self.total_items} {self.fraction:.0%}{eta}"

    def line(self) -> str:
        per_s = self.rate / max(1, self.units_total // max(1, self.total_items))
        return (f"{self.tag()} | {per_s:.1f} items/s | failed {self.failed} | "
                f"invalid {self.invalid}")


def summarize_counts(counts: Mapping[tuple[str, str], int], phases: list[str],
                     total_items: int) -> tuple[int, int, int, int]:
    """(items done, units done, failed items, invalid items) from (phase, status) counts."""
    last = phases[-1]
    stopped = sum(n for (phase, status), n in counts.items()
                  if phase != SOURCE_PHASE and status in FINAL_FAILURES)
    failed = sum(n for (phase, status), n in counts.items()
                 if phase != SOURCE_PHASE and status == "failed")
    invalid = counts.get((SOURCE_PHASE, "invalid"), 0)
    units = 0
    for index, phase in enumerate(phases):
        units += counts.get((phase, "succeeded"), 0)
        # An item that stopped in this phase will never run the later ones: count them done.
        stopped_here = sum(counts.get((phase, s), 0) for s in FINAL_FAILURES)
        units += stopped_here * (len(phases) - index)
    return counts.get((last, "succeeded"), 0) + stopped, units, failed, invalid


class ProgressWindow:
    """Throughput over the last `window_s` seconds of samples."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def rate(self, units_done: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self.samples.append((now, units_done))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        (t0, u0), (t1, u1) = self.samples[0], self.samples[-1]
        return (u1 - u0) / (t1 - t0) if t1 > t0 else 0.0

    def progress(self, counts: Mapping[tuple[str, str], int], phases: list[str],
                 total_items: int) -> Progress:
        items_done, units, failed, invalid = summarize_counts(counts, phases, total_items)
        units_total = total_items * len(phases)
        rate = self.rate(units)
        remaining = max(0, units_total - units)
        eta = remaining / rate if rate > 0 else (0.0 if remaining == 0 else None)
        return Progress(total_items, items_done, units, units_total, failed, invalid, rate, eta)
