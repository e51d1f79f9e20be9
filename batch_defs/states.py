"""The engine's states as types: item statuses, run states, stop kinds and skip causes.

They are str enums, so they compare equal to (and are stored as) their plain values.
"""

from __future__ import annotations

from enum import StrEnum


class ItemStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    INVALID = "invalid"
    REJECTED = "rejected"


# The longest item key the ledger stores; a longer key makes its item invalid at fan-out.
MAX_ITEM_KEY_LENGTH = 512

# Statuses that count against tolerated_failures (skipped is a choice, not a failure).
FAILURE_STATUSES = (ItemStatus.FAILED, ItemStatus.INVALID, ItemStatus.REJECTED)


class RunState(StrEnum):
    """A batch run's state in the ledger and in the `batch/state` run tag."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    PAUSED = "paused"
    CANCELED = "canceled"


class StopKind(StrEnum):
    """Why a batch stopped starting items; its human reason is stored beside it."""

    FAIL_FAST = "fail_fast"
    PAUSED = "paused"
    CANCELED = "canceled"
    BUDGET = "budget"

    @property
    def run_state(self) -> RunState:
        """Budget stops are resumable on purpose: the run reads as paused."""
        return {StopKind.FAIL_FAST: RunState.FAILED, StopKind.PAUSED: RunState.PAUSED,
                StopKind.CANCELED: RunState.CANCELED, StopKind.BUDGET: RunState.PAUSED}[self]


class SkipCause(StrEnum):
    """Why an item was skipped: the handler chose to, or a dependency did not succeed."""

    HANDLER = "handler"
    DEPENDENCY = "dependency"
    CONDITION = "condition"
