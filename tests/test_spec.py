"""Spec models and the loader: every documented field parses; errors name file, line, field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from batch_defs.loader import SpecError, load_batch, load_batches, parse_batch, with_overrides

pytestmark = pytest.mark.unit

SPEC_EXAMPLE = """\
name: invoices                 # ^[a-z][a-z0-9_]*$ ; also the Dagster job name
description: Monthly invoices from the customer list
source:
  type: csv                    # csv | json | jsonl | parquet | sql | http | inline
  path: data/customers.csv     # relative paths resolve against the YAML file's folder
  columns: {id: customer_id, email: mail}   # csv/sql: rename source columns -> item fields
  key: id                      # item field giving a stable unique key (default: row number)
  schema:                      # optional item validation; failing items are recorded as invalid
    id: int
    email: email
    amount: float
    note: str?                 # ? = optional
phases:
  - name: render
    task: template             # a built-in task type, or python (see below)
    params: {template: templates/invoice.md.j2, output: "out/{partition}/{key}.md"}
    retry: {max_attempts: 3, backoff: exponential, delay_s: 0.5, max_delay_s: 30, jitter: true}
    timeout_s: 60
    on_error: continue         # overrides options.on_error for this phase
  - name: score
    task: python
    params: {function: "my_pkg.tasks:score"}   # module:function importable on the code location
options:
  mode: parallel               # parallel | sequential
  concurrency: 10              # 1..50 items in flight
  on_error: fail_fast          # fail_fast | continue
  tolerated_failures: 0        # count (int) or percentage ("2%") before the batch fails
  chunk_size: auto             # auto | int >= 1
  executor: in_process         # in_process | multiprocess | (distributed executors)
  budget: {max_cost: 5.0}      # stop starting items once spent; resumable
after:                         # batch-level steps after every item, in order
  - {task: report, params: {formats: [csv, json, html]}}
tags: {batch/resource: smtp}   # run tags, for run-coordinator limits
"""


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "invoice.md.j2").write_text("Invoice for {{ email }}")
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "tasks.py").write_text("def score(item, ctx):\n    return {}\n")
    (tmp_path / "invoices.yaml").write_text(SPEC_EXAMPLE)
    return tmp_path


def problems(text: str, name: str = "invoices") -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_batch(textwrap.dedent(text), Path(f"/somewhere/{name}.yaml"))
    return [str(p) for p in info.value.problems]


def test_every_field_of_the_spec_example_parses(example_dir: Path) -> None:
    spec = load_batch(example_dir / "invoices.yaml").spec
    assert spec.name == "invoices"
    assert spec.source.type == "csv"
    assert spec.source.columns == {"id": "customer_id", "email": "mail"}
    assert spec.source.schema_ == {"id": "int", "email": "email", "amount": "float",
                                   "note": "str?"}
    assert [p.name for p in spec.phases] == ["render", "score"]
    assert spec.phases[0].retry.max_attempts == 3 and spec.phases[0].retry.jitter
    assert spec.phases[0].timeout_s == 60
    assert spec.on_error(spec.phases[0]) == "continue"
    assert spec.on_error(spec.phases[1]) == "fail_fast"
    assert spec.options.concurrency == 10 and spec.options.chunk_size == "auto"
    assert spec.options.budget.max_cost == 5.0
    assert spec.after[0].task == "report"
    assert spec.tags == {"batch/resource": "smtp"}


def test_error_names_file_line_and_field(example_dir: Path) -> None:
    text = SPEC_EXAMPLE.replace("max_attempts: 3", "max_attempts: 0")
    path = example_dir / "invoices.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_batch(path)
    assert str(info.value) == "invoices.yaml:17 phases[0].retry.max_attempts: must be >= 1"


def test_unknown_field_is_rejected_with_its_line() -> None:
    found = problems("""\
        name: invoices
        source: {type: inline, items: [{a: 1}]}
        phases:
          - name: one
            task: python
            params: {function: "tests.handlers:sleep_ms"}
            retries: 3
        """)
    assert found == ["invoices.yaml:7 phases[0].retries: unknown field"]


def test_several_problems_are_all_reported() -> None:
    found = problems("""\
        name: invoices
        source: {type: ftp, path: x}
        phases:
          - name: Bad-Name
            task: python
            params: {function: "tests.handlers:sleep_ms"}
        options: {concurrency: 99, tolerated_failures: "lots"}
        """)
    assert any(p.startswith("invoices.yaml:2 source:") and "ftp" in p for p in found)
    assert any(p.startswith("invoices.yaml:4 phases[0].name:") for p in found)
    assert "invoices.yaml:7 options.concurrency: must be <= 50" in found
    assert any(p.startswith("invoices.yaml:7 options.tolerated_failures:") and "percentage" in p
               for p in found)


def test_yaml_syntax_error_names_the_line() -> None:
    found = problems("name: invoices\nphases: [\n  - oops: {\n")
    assert len(found) == 1 and found[0].startswith("invoices.yaml:") and "invalid YAML" in found[0]


def test_name_must_match_file_stem() -> None:
    found = problems("""\
        name: other
        source: {type: inline, items: [{a: 1}]}
        phases: [{name: one, task: python, params: {function: "tests.handlers:sleep_ms"}}]
        """)
    assert found == ["invoices.yaml:1 name: must equal the file name 'invoices'"]


def test_unknown_task_and_unimportable_function() -> None:
    found = problems("""\
        name: invoices
        source: {type: inline, items: [{a: 1}]}
        phases:
          - {name: one, task: teleport}
          - {name: two, task: python, params: {function: "no_such_module_xyz:run"}}
          - {name: three, task: python, params: {function: "tests.handlers:nope"}}
          - {name: four, task: template, params: {}}
        """)
    assert found[0].startswith("invoices.yaml:4 phases[0].task: unknown task type 'teleport'")
    assert found[1].startswith("invoices.yaml:5 phases[1].params: cannot import module "
                               "'no_such_module_xyz'")
    assert found[2] == ("invoices.yaml:6 phases[2].params: module 'tests.handlers' has no "
                        "function 'nope'")
    assert found[3].startswith("invoices.yaml:7 phases[3].params: give exactly one of")


def test_duplicate_phase_names_rejected() -> None:
    found = problems("""\
        name: invoices
        source: {type: inline, items: [{a: 1}]}
        phases:
          - {name: one, task: python, params: {function: "tests.handlers:sleep_ms"}}
          - {name: one, task: python, params: {function: "tests.handlers:sleep_ms"}}
        """)
    assert found == ["invoices.yaml:4 phases: phase name 'one' is used twice"]


def test_reserved_and_clashing_step_names() -> None:
    found = problems("""\
        name: invoices
        source: {type: inline, items: [{a: 1}]}
        phases:
          - {name: collect, task: python, params: {function: "tests.handlers:sleep_ms"}}
        """)
    assert found == ["invoices.yaml:1: phase name 'collect' is reserved"]
    found = problems("""\
        name: invoices
        source: {type: inline, items: [{a: 1}]}
        phases:
          - {name: report, task: python, params: {function: "tests.handlers:sleep_ms"}}
        after:
          - {task: report}
        """)
    assert found == ["invoices.yaml:1: after step name 'report' is already used; give it a name"]


def test_tolerated_failures_count_and_percent() -> None:
    spec = parse_batch(textwrap.dedent("""\
        name: invoices
        source: {type: inline, items: [{a: 1}]}
        phases: [{name: one, task: python, params: {function: "tests.handlers:sleep_ms"}}]
        options: {tolerated_failures: "2%"}
        """), Path("invoices.yaml"))
    assert spec.options.tolerated_count(100) == 2
    assert spec.options.tolerated_count(149) == 2
    assert with_overrides(spec, sets=["options.tolerated_failures=3"]).options.tolerated_count(
        10) == 3


def test_overrides_set_fields_and_report_bad_values(example_dir: Path) -> None:
    spec = load_batch(example_dir / "invoices.yaml").spec
    changed = with_overrides(spec, data=example_dir / "march.csv",
                             sets=["options.concurrency=4", "phases[1].params.limit=3"])
    assert changed.options.concurrency == 4
    assert changed.phases[1].params["limit"] == 3
    assert changed.source.path == str((example_dir / "march.csv").resolve())
    assert spec.options.concurrency == 10  # the loaded spec itself is untouched
    with pytest.raises(SpecError) as info:
        with_overrides(spec, sets=["options.concurrency=99"])
    assert str(info.value) == "--set options.concurrency: must be <= 50"
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        with_overrides(spec, sets=["options.concurrency"])


def test_shipped_batches_all_load() -> None:
    batches = load_batches()
    assert "demo" in batches
    assert batches["demo"].spec.options.concurrency == 10
