"""Every YAML example in README.md and docs/ loads: batches and batch fragments through the spec
models and every task type's params, Dagster and instance settings as the YAML they are.

An example of a kind this test does not know fails it: a new kind of example needs a check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batch_defs import yamlio
from batch_defs.loader import COMPONENT_TYPE
from batch_defs.spec import BatchSpec, PhaseSpec
from batch_defs.tasks import AFTER_TYPES, TASK_TYPES
from tests.conftest import PROJECT

pytestmark = pytest.mark.unit

DOCS = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("*.md"))]
BASE = {"name": "example", "source": {"type": "inline", "items": [{"id": 1}]},
        "phases": [{"name": "work", "task": "python", "params": {"function": "m:f"}}]}
BATCH_FIELDS = set(BatchSpec.model_fields) | {"schema"}
# Top-level keys of YAML that configures Dagster or the instance, not a batch.
INSTANCE_KEYS = {"telemetry", "storage", "run_monitoring", "run_coordinator", "concurrency",
                 "run_launcher", "compute_logs", "local_artifact_storage", "run_retries",
                 "ledger_url", "load_from", "execution", "resources", "ops", "loggers"}


def examples() -> list[tuple[str, int, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in re.finditer(r"```yaml\n(.*?)```", text, re.DOTALL):
            line = text.count("\n", 0, match.start()) + 1
            found.append((doc.relative_to(PROJECT).as_posix(), line, match.group(1)))
    return found


def check_params(phases: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """Each task's params against its type's model (handlers are not built: the files an
    example names, its templates and modules, are the reader's)."""
    for phase in phases:
        for step in [phase, *phase.get("route", {}).get("cases", {}).values(),
                     *([phase["undo"]] if "undo" in phase else [])]:
            task = step.get("task", phase["task"])
            TASK_TYPES[task].params.model_validate({**phase.get("params", {}),
                                                    **step.get("params", {})}
                                                   if step is not phase and "task" not in step
                                                   else step.get("params", {}))
    for step in after:
        AFTER_TYPES[step["task"]].params.model_validate(step.get("params", {}))


def check_batch(data: dict[str, Any]) -> None:
    spec = BatchSpec.model_validate({"name": "example", **data})
    check_params(data.get("phases", []), data.get("after", []))
    assert spec.phases


def check(data: Any) -> str:
    """What the example is, once checked."""
    if isinstance(data, dict) and data.get("type") == COMPONENT_TYPE:
        check_batch(data["attributes"])
        return "component"
    if isinstance(data, dict) and {"source", "phases"} <= set(data):
        check_batch(data)
        return "batch"
    if isinstance(data, dict) and set(data) <= BATCH_FIELDS:
        check_batch({**BASE, **data})
        return "batch fragment"
    if isinstance(data, list) and all(isinstance(p, dict) and "task" in p for p in data):
        check_batch({**BASE, "phases": data})  # phases, or after steps
        return "phases"
    if isinstance(data, dict) and {"name", "task"} <= set(data):
        PhaseSpec.model_validate(data)
        check_params([data], [])
        return "phase"
    if isinstance(data, dict) and set(data) <= INSTANCE_KEYS:
        return "instance settings"
    raise AssertionError(f"an example of a kind with no check: {sorted(data)[:5]}")


@pytest.mark.parametrize(("doc", "line", "block"), examples(),
                         ids=[f"{d}:{n}" for d, n, _ in examples()])
def test_yaml_example_loads(doc: str, line: int, block: str) -> None:
    data, _ = yamlio.load(block)  # the batch files' YAML rules
    kind = check(data)
    assert kind


def test_the_docs_hold_examples_of_every_kind() -> None:
    kinds = {check(yamlio.load(block)[0]) for _, _, block in examples()}
    assert {"batch", "component", "batch fragment", "instance settings"} <= kinds
    assert len(examples()) >= 30


@pytest.mark.cli
def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    text = (PROJECT / "README.md").read_text(encoding="utf-8")
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.DOTALL)
                  if "BatchClient" in b]
    env = {k: v for k, v in os.environ.items() if k != "BATCH_DEFS_PATH"}
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                          timeout=240, cwd=PROJECT,
                          env={**env, "DAGSTER_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "succeeded=1 failed=0 invalid=0" in done.stdout
