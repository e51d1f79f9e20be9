"""The Batch component's schema (what `dg` checks and the Dagster UI documents) describes every
field, and a defs.yaml loads through the component as through the loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batch_defs.components import Batch
from batch_defs.loader import PACKAGE_BATCHES
from tests.conftest import PROJECT

pytestmark = pytest.mark.unit


def undocumented(schema: dict[str, Any]) -> list[str]:
    definitions = schema.get("$defs", {})
    seen: set[str] = set()
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in seen:
                seen.add(name)
                walk(definitions[name], name)
            return
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                walk(sub, path)
        for nested in (node.get("items"), node.get("additionalProperties")):
            if isinstance(nested, dict):
                walk(nested, path)
        for name, prop in node.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{path}.{name}")
            walk(prop, f"{path}.{name}")

    walk(schema, "Batch")
    return missing


def test_every_field_of_the_component_schema_is_described() -> None:
    schema = Batch.get_model_cls().model_json_schema()
    assert undocumented(schema) == []
    assert schema["additionalProperties"] is False  # unknown attributes are errors
    assert "name" not in schema.get("required", [])  # the folder names the batch


def test_a_shipped_component_loads_through_dagster_as_its_batch() -> None:
    import dagster as dg

    folder: Path = PACKAGE_BATCHES / "demo"
    # Dagster's own loading path: the project's component tree (pyproject's [tool.dg]).
    component = dg.ComponentTree.for_project(PROJECT).load_component(folder)
    assert isinstance(component, Batch)
    assert component.loaded.spec.name == "demo" and component.loaded.path == folder / "defs.yaml"
    assert component.build_defs().resolve_job_def("demo").name == "demo"
