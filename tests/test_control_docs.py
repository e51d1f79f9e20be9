"""The batches that docs/yaml.md and docs/concurrency.md show for conditions, routes, limits,
priorities and compensation load as they are written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from batch_defs.loader import SpecError, load_batch
from tests.conftest import PROJECT

pytestmark = pytest.mark.unit
SECTIONS = ("## Conditions", "## Routes", "## Rate limits", "## Priority", "## Compensation",
            "## Adaptive limits", "## Live changes")


def example_batches(doc: str) -> list[str]:
    """The ```yaml blocks that are whole batches, in this work's sections of `doc`."""
    text = (PROJECT / "docs" / doc).read_text()
    parts = re.split(r"^(?=## )", text, flags=re.MULTILINE)
    mine = [part for part in parts if part.startswith(SECTIONS)]
    return [block for part in mine
            for block in re.findall(r"```yaml\n(.*?)```", part, flags=re.DOTALL)
            if block.startswith("name:")]


@pytest.mark.parametrize("doc", ["yaml.md", "concurrency.md"])
def test_every_example_batch_loads(doc: str, tmp_path: Path) -> None:
    blocks = example_batches(doc)
    assert len(blocks) >= (5 if doc == "yaml.md" else 1)
    for block in blocks:
        name = yaml.safe_load(block)["name"]
        path = tmp_path / f"{name}.yaml"
        path.write_text(block)
        loaded = load_batch(path)
        assert loaded.spec.name == name


def test_the_validate_message_shown_is_what_validate_says(tmp_path: Path) -> None:
    text = (PROJECT / "docs" / "yaml.md").read_text()
    shown = re.search(r"^(big_orders\.yaml:\d+ .*)$", text, flags=re.MULTILINE)
    assert shown is not None
    block = next(b for b in example_batches("yaml.md") if b.startswith("name: big_orders"))
    path = tmp_path / "big_orders.yaml"
    path.write_text(block.replace("when: amount >= 100 or (item.vip is defined and item.vip)",
                                  "when: amount >> 100"))
    with pytest.raises(SpecError) as caught:
        load_batch(path)
    assert [str(p) for p in caught.value.problems] == [shown.group(1)]
