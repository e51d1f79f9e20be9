"""Dagster resources of the batch engine and of the built-in task types."""

from resources.database import DatabaseResource
from resources.http import HttpResource
from resources.llm import LlmResource
from resources.smtp import SmtpResource
from resources.storage import BatchStorageResource, RunOverridesResource

__all__ = ["BatchStorageResource", "DatabaseResource", "HttpResource", "LlmResource",
           "RunOverridesResource", "SmtpResource"]
