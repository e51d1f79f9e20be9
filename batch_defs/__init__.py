"""Batch processing on Dagster. Handlers import TaskResult and TaskContext from here.

The names are loaded on first use (PEP 562): every `batch_defs.*` module imports this package
first, and the task registry behind these names loads the spec's models, which `status` of a
live run does without.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batch_defs.tasks.base import RejectItem, SkipItem, TaskContext, TaskResult

__all__ = ["RejectItem", "SkipItem", "TaskContext", "TaskResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from batch_defs.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module 'batch_defs' has no attribute {name!r}")
