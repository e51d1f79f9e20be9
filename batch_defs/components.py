"""A batch as a Dagster Component: `dg scaffold defs batch_defs.components.Batch NAME` writes
NAME/defs.yaml (`type:` + `attributes:`, the attributes being the batch spec), `dg check yaml`
checks it against the spec's schema, and the UI documents every field."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel, Field

from batch_defs.loader import COMPONENT_FILE, LoadedBatch, load_batch
from batch_defs.spec import BatchSpec, Name


class BatchAttributes(BatchSpec):
    """The attributes of a batch component: the batch spec (docs/yaml.md), whose name defaults
    to the component's folder."""

    name: Name | None = Field(  # type: ignore[assignment]
        default=None, description="The batch's name (and the Dagster job's); default: the "
                                  "component's folder name, which it must equal")


class BatchScaffolder(dg.Scaffolder):
    """`dg scaffold defs batch_defs.components.Batch NAME`: a batch that runs as it is."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        folder = Path(request.target_path)
        name = folder.name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / COMPONENT_FILE).write_text(scaffold_yaml(request.type_name, name),
                                             encoding="utf-8")
        (folder / f"{name}_tasks.py").write_text(SCAFFOLD_TASKS, encoding="utf-8")


def scaffold_yaml(type_name: str, name: str) -> str:
    return textwrap.dedent(f"""\
        # A batch: where the items come from, the phases each item goes through, options.
        # Reference: docs/yaml.md. Run it: batch-defs run {name}
        type: {type_name}
        attributes:
          description: Greets three people (edit me)
          source:
            type: inline
            key: id
            items:
              - {{id: 1, name: Ada}}
              - {{id: 2, name: Grace}}
              - {{id: 3, name: Edsger}}
          phases:
            - name: greet
              task: python
              params: {{function: "{name}_tasks:greet"}}
          options: {{concurrency: 4, on_error: continue}}
        """)


SCAFFOLD_TASKS = '''"""Task handlers of this batch: plain functions, item in, fields out."""


def greet(item: dict, ctx) -> dict:
    return {"greeting": f"Hello, {item['name']}!"}
'''


@dg.scaffold_with(BatchScaffolder)
class Batch(dg.Component):
    """A batch of items (customers, documents, records) through phases: a partitioned job
    whose every launch is a partition, with a results asset per launch and an item ledger."""

    def __init__(self, loaded: LoadedBatch):
        self.loaded = loaded

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        return BatchAttributes

    @classmethod
    def load(cls, attributes: Any, context: dg.ComponentLoadContext) -> Batch:
        # Read with the project's own loader, for the same checks and `file:line` errors as
        # `batch-defs validate` (and no template rendering of the spec's Jinja parameters).
        return cls(load_batch(Path(context.path) / COMPONENT_FILE))

    def build_defs(self, context: dg.ComponentLoadContext | None = None) -> dg.Definitions:
        from batch_defs.definitions import batch_definitions

        return batch_definitions(self.loaded)
