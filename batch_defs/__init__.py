"""Batch processing on Dagster. Handlers import TaskResult and TaskContext from here."""

from batch_defs.tasks.base import RejectItem, SkipItem, TaskContext, TaskResult

__all__ = ["RejectItem", "SkipItem", "TaskContext", "TaskResult"]
