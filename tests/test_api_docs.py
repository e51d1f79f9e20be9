"""The examples of docs/api.md and of the llm section of docs/tasks.md: every complete batch
in them loads, and the Python example compiles."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batch_defs.loader import parse_batch
from tests.conftest import PROJECT

pytestmark = pytest.mark.unit


def blocks(doc: str, language: str) -> list[str]:
    text = (PROJECT / "docs" / doc).read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def test_complete_batches_in_the_docs_load(tmp_path: Path) -> None:
    batches = [b for doc in ("api.md", "tasks.md") for b in blocks(doc, "yaml")
               if b.startswith("name:")]
    assert any("regenerate:" in b and "context:" in b for b in batches)
    for block in batches:
        name = re.match(r"name: (\w+)", block).group(1)  # type: ignore[union-attr]
        spec = parse_batch(block, tmp_path / f"{name}.yaml")
        assert spec.name == name


def test_python_example_compiles() -> None:
    (example,) = blocks("api.md", "python")
    compile(example, "docs/api.md", "exec")
