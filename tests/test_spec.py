"""Spec models and the loader: every documented field parses; errors name file, line, field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from batch_defs.loader import SpecError, load_batch, load_batches, parse_batch, with_overrides
from batch_defs.spec import BatchSpec

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
    assert str(info.value) == "--set options.concurrency=99: must be <= 50"
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        with_overrides(spec, sets=["options.concurrency"])


def test_shipped_batches_all_load() -> None:
    batches = load_batches()
    assert "demo" in batches
    assert batches["demo"].spec.options.concurrency == 10


PHASE = '{name: one, task: python, params: {function: "tests.handlers:sleep_ms"}}'


def test_duplicate_keys_name_both_lines() -> None:
    found = problems(f"""\
        name: invoices
        source: {{type: inline, items: [{{a: 1}}]}}
        phases: [{PHASE}]
        options:
          concurrency: 4
          concurrency: 5
        phases: [{PHASE.replace("one", "two")}]
        """)
    assert found == [
        "invoices.yaml:6 options.concurrency: duplicate key 'concurrency' (lines 5 and 6)",
        "invoices.yaml:7 phases: duplicate key 'phases' (lines 3 and 7)",
    ]


def test_keys_equal_once_built_are_duplicates_but_merges_are_not() -> None:
    found = problems(f"""\
        name: invoices
        source: {{type: inline, items: [{{1: a, 1.0: b}}]}}
        phases: [{PHASE}]
        """)
    assert found == ["invoices.yaml:2 source.items[0].1.0: duplicate key '1.0' (lines 2 and 2)"]
    spec = parse_batch(textwrap.dedent("""\
        name: invoices
        source: {type: inline, items: [{a: 1}]}
        phases:
          - &base {name: one, task: python, params: {function: "tests.handlers:sleep_ms"}}
          - <<: *base
            name: two
        """), Path("invoices.yaml"))
    assert [p.name for p in spec.phases] == ["one", "two"]


def test_only_true_and_false_are_booleans() -> None:
    spec = parse_batch(textwrap.dedent(f"""\
        name: invoices
        source: {{type: inline, items: [{{a: 1}}]}}
        phases: [{PHASE}]
        notify: {{on: [failure], email: [ops@example.com]}}
        tags: {{a: yes, b: no, c: on, d: off, e: y, f: n, g: NO, h: 1:30}}
        options: {{budget: {{max_cost: 2.5}}}}
        """), Path("invoices.yaml"))
    assert spec.notify is not None and spec.notify.on == ["failure"]
    assert spec.tags == {"a": "yes", "b": "no", "c": "on", "d": "off", "e": "y", "f": "n",
                         "g": "NO", "h": "1:30"}
    assert spec.options.budget.max_cost == 2.5
    retry = parse_batch(textwrap.dedent("""\
        name: invoices
        source: {type: inline, items: [{a: 1}]}
        phases:
          - {name: one, task: python, params: {function: "tests.handlers:sleep_ms"},
             retry: {jitter: False}, merge_output: TRUE}
        """), Path("invoices.yaml")).phases[0]
    assert retry.retry.jitter is False and retry.merge_output is True


def test_spec_is_parsed_once_with_the_c_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from batch_defs import yamlio

    assert issubclass(yamlio.loader_class(), yaml.CSafeLoader)
    calls = []
    original = yamlio.loader_class().get_single_node

    def counted(self: object) -> object:
        calls.append(1)
        return original(self)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("the text is parsed a second time")

    monkeypatch.setattr(yamlio.loader_class(), "get_single_node", counted)
    monkeypatch.setattr(yaml, "compose", refused)
    monkeypatch.setattr(yaml, "safe_load", refused)
    parse_batch(textwrap.dedent(f"""\
        name: invoices
        source: {{type: inline, items: [{{a: 1}}]}}
        phases: [{PHASE}]
        """), Path("invoices.yaml"))
    assert calls == [1]


@pytest.mark.parametrize(("text", "expected"), [
    ("name: invoices\ntags: {a: &x [1, *x]}\n",
     "invoices.yaml:2 tags.a[1]: an alias refers to a value that contains it"),
    ("name: invoices\nwhen: 2026-13-45\n",
     "invoices.yaml:2: invalid YAML: '2026-13-45' is not a valid timestamp: month must be in "
     "1..12"),
    ("name: invoices\nbig: " + "9" * 5000 + "\n",
     "invoices.yaml:2: invalid YAML: '9999999999999999999999999999999999999999' is not a "
     "valid int: more than 4300 digits"),
    ("name: invoices\ntags:\n  a: \"x\x00y\"\n",
     "invoices.yaml:3: invalid YAML: character #x0000: control characters are not allowed"),
    ("name: invoices\nphases: " + "[" * 2000 + "]" * 2000 + "\n",
     "invoices.yaml:2: invalid YAML: exceeded maximum nesting depth"),
    ("name: invoices\n---\nname: other\n",
     "invoices.yaml:2: invalid YAML: but found another document"),
    ("name: invoices\n\tphases: []\n",
     "invoices.yaml:2: invalid YAML: found a tab character that violates indentation"),
])
def test_hostile_yaml_is_a_spec_error_with_its_line(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_alias_bomb_is_refused_before_it_is_built() -> None:
    lines = ["name: invoices", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    found = problems("\n".join(lines) + "\n")
    assert found == ["invoices.yaml:8 a6: aliases make this document larger than 2,000,000 "
                     "values"]


def set_problems(spec: BatchSpec, *sets: str, **folder: Path) -> list[str]:
    with pytest.raises(SpecError) as info:
        with_overrides(spec, sets=sets, **folder)
    return [str(p) for p in info.value.problems]


def test_overrides_get_the_task_checks_and_name_the_assignment(example_dir: Path) -> None:
    spec = load_batch(example_dir / "invoices.yaml").spec
    found = set_problems(spec, "options.concurrency=4", "phases[0].task=bogus")
    assert len(found) == 1
    assert found[0].startswith("--set phases[0].task=bogus: unknown task type 'bogus' (known: ")
    found = set_problems(spec, "phases[1].params.function=nowhere_xyz:run",
                         base_dir=example_dir)
    assert found[0].startswith("--set phases[1].params.function=nowhere_xyz:run "
                               "phases[1].params: cannot import module 'nowhere_xyz'")
    assert set_problems(spec, "name=other") == [
        "--set name=other: must equal the file name 'invoices'"]
    assert set_problems(spec, "source.schema.amount=money")[0].startswith(
        "--set source.schema.amount=money: unknown type 'money'")
    assert set_problems(spec, "phases[7].task=python") == [
        "--set phases[7].task=python phases: has no entry [7] (it has 2)"]
    assert set_problems(spec, "tags={a: 1, a: 2}") == [
        "--set tags={a: 1, a: 2} tags.a: duplicate key 'a' (lines 1 and 1)"]
    assert set_problems(spec, "options.concurrency.max=3") == [
        "--set options.concurrency.max=3 options.concurrency: is 10, which has no field 'max'"]
    # A changed template is looked for beside the batch file, like the file's own.
    changed = with_overrides(spec, sets=["phases[0].params.template=templates/invoice.md.j2"],
                             base_dir=example_dir)
    assert changed.phases[0].params["template"] == "templates/invoice.md.j2"


def test_override_values_follow_the_file_rules(example_dir: Path) -> None:
    spec = load_batch(example_dir / "invoices.yaml").spec
    changed = with_overrides(spec, sets=["notify.on=[failure]", "tags.flag=yes",
                                         "phases[0].retry.jitter=false"])
    assert changed.notify is not None and changed.notify.on == ["failure"]
    assert changed.tags["flag"] == "yes"
    assert changed.phases[0].retry.jitter is False


def test_unknown_schema_type_is_an_error_at_load() -> None:
    found = problems(f"""\
        name: invoices
        source:
          type: inline
          items: [{{id: 1}}]
          schema:
            id: integer
        phases: [{PHASE}]
        """)
    assert len(found) == 1
    assert found[0].startswith("invoices.yaml:6 source.schema.id: unknown type 'integer' (known: ")


def test_command_line_values_and_file_bytes_follow_the_same_rules(tmp_path: Path) -> None:
    from batch_defs import yamlio

    values = ("on", "[failure]", "1:30", "TRUE", "", "0x10", "a=b")
    assert [yamlio.parse_assignment(f"tags.x={v}").value for v in values] == [
        "on", ["failure"], "1:30", True, None, 16, "a=b"]
    (tmp_path / "latin.yaml").write_bytes(b"name: latin\ndescription: caf\xe9\n")
    with pytest.raises(yamlio.YamlError) as info:
        yamlio.read_text(tmp_path / "latin.yaml")
    assert info.value.problems == [yamlio.YamlProblem(2, (), "not valid UTF-8 (byte 29 of the "
                                                             "file)")]


def test_without_libyaml_the_python_loader_has_the_same_rules(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from batch_defs import yamlio

    monkeypatch.delattr(yaml, "CSafeLoader")
    yamlio.loader_class.cache_clear()
    try:
        assert not issubclass(yamlio.loader_class(), yaml.CLoader)
        assert problems("name: invoices\ntags: {a: on, a: off}\n") == [
            "invoices.yaml:2 tags.a: duplicate key 'a' (lines 2 and 2)"]
        assert problems("name: invoices\ntags:\n  a: \"x\x00y\"\n") == [
            "invoices.yaml:3: invalid YAML: character #x0000: special characters are not "
            "allowed"]
        assert problems("name: invoices\nphases: " + "[" * 3000 + "]" * 3000 + "\n") == [
            "invoices.yaml: invalid YAML: nested too deeply"]
    finally:
        yamlio.loader_class.cache_clear()
