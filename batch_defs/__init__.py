"""Batch processing on Dagster. Handlers import TaskResult and TaskContext from here."""

from batch_defs.tasks.base import SkipItem, TaskContext, TaskResult

__all__ = ["SkipItem", "TaskContext", "TaskResult"]
