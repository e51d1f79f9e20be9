"""Conditions (`when:`) and routes (`route:`): evaluated in a sandbox, recorded per item,
checked by `batch-defs validate` with the file and line of a bad expression."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from batch_defs.engine import run_items
from batch_defs.expressions import Expression, ExpressionError
from batch_defs.items import Item
from batch_defs.ledger import Ledger
from batch_defs.loader import SpecError, load_batch
from batch_defs.routing import build_router
from resources.storage import open_ledger
from tests.conftest import cli, engine_plan, run_batch, write_batch


def items(amounts: list[int]) -> list[Item]:
    return [Item(str(i), i, {"id": i, "amount": a}) for i, a in enumerate(amounts)]


def by_phase(ledger: Ledger, run_id: str = "run-1") -> dict[str, dict[str, Any]]:
    rows = ledger.rows(run_id)
    return {phase: {r.item_key: r for r in group.itertuples()}
            for phase, group in rows.groupby("phase")}


@pytest.mark.unit
def test_when_skips_items_for_condition_and_passes_them_on(unit_ledger: Ledger,
                                                           tmp_path: Path) -> None:
    sent: list[int] = []
    logged: list[dict[str, Any]] = []

    def send(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        sent.append(item["id"])
        return {"sent": True}

    def log(item: dict[str, Any], ctx: Any) -> None:
        logged.append(item)

    plan = engine_plan(unit_ledger, [send, log], tmp_path,
                       phases=[{"when": "amount > 100"}, {}])
    report = run_items(plan, items([50, 150, 100, 300]), tmp_path)
    assert sorted(sent) == [1, 3]
    rows = by_phase(unit_ledger)
    skipped = {k for k, r in rows["phase0"].items() if r.status == "skipped"}
    assert skipped == {"0", "2"}
    assert {rows["phase0"][k].skip_cause for k in skipped} == {"condition"}
    # A condition skip goes on to the next phase, unchanged; the others carry `sent`.
    assert {r.status for r in rows["phase1"].values()} == {"succeeded"}
    assert sorted((i["id"], i.get("sent", False)) for i in logged) == [
        (0, False), (1, True), (2, False), (3, True)]
    assert report.failed == 0


@pytest.mark.unit
def test_when_sees_what_earlier_phases_put_out(unit_ledger: Ledger, tmp_path: Path) -> None:
    def score(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"score": item["id"] * 2}

    def high(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {"high": True}

    plan = engine_plan(unit_ledger, [score, high], tmp_path,
                       phases=[{}, {"when": "{{ score >= 4 and key != '3' }}"}])
    run_items(plan, items([0] * 5), tmp_path)
    statuses = {k: r.status for k, r in by_phase(unit_ledger)["phase1"].items()}
    assert statuses == {"0": "skipped", "1": "skipped", "2": "succeeded", "3": "skipped",
                        "4": "succeeded"}


@pytest.mark.unit
def test_an_expression_that_fails_fails_its_item_naming_it(unit_ledger: Ledger,
                                                           tmp_path: Path) -> None:
    calls: list[str] = []
    plan = engine_plan(unit_ledger, [lambda item, ctx: calls.append(ctx.key)], tmp_path,
                       phases=[{"when": "discount > 0"}], on_error="continue")
    run_items(plan, items([1, 2]), tmp_path)
    rows = by_phase(unit_ledger)["phase0"]
    assert {r.status for r in rows.values()} == {"failed"} and calls == []
    assert rows["0"].error == "when: 'discount' is undefined in 'discount > 0'"


@pytest.mark.unit
def test_the_sandbox_keeps_python_internals_out_of_reach() -> None:
    with pytest.raises(ExpressionError, match="unsafe"):
        Expression("item.__class__.__mro__").evaluate({"item": {}})
    assert Expression("item.vip is defined and item.vip").evaluate({"item": {"vip": 1}}) == 1
    assert Expression("item.vip is defined and item.vip").evaluate({"item": {}}) is False
    with pytest.raises(ValueError, match="one expression"):
        Expression("amount is {{ amount }}")


@pytest.mark.unit
def test_route_runs_each_item_through_its_case_and_records_the_branch(
        unit_ledger: Ledger, tmp_path: Path) -> None:
    seen: dict[str, dict[str, Any]] = {}

    def build(task: str, params: dict[str, Any]) -> Any:
        def handler(item: dict[str, Any], ctx: Any) -> dict[str, Any]:
            seen[ctx.key] = dict(ctx.params)
            return {"via": params["channel"]}
        return handler

    plan = engine_plan(unit_ledger, [None], tmp_path, phases=[{
        "params": {"function": "m:f", "channel": "post", "sender": "shop"},
        "route": {"by": "{{ country }}",
                  "cases": {"DE": {"params": {"channel": "de-mail"}},
                            "FR": {"params": {"channel": "fr-mail"}}}}}])
    plan.handlers = [build_router(plan.spec.phases[0], build)]
    countries = ["DE", "FR", "US", "DE", None]
    run_items(plan, [Item(str(i), i, {"id": i, "country": c}) for i, c in
                     enumerate(countries)], tmp_path)
    rows = by_phase(unit_ledger)["phase0"]
    assert {k: r.branch for k, r in rows.items()} == {
        "0": "DE", "1": "FR", "2": "default", "3": "DE", "4": "default"}
    assert {k: json.loads(r.output)["via"] for k, r in rows.items()} == {
        "0": "de-mail", "1": "fr-mail", "2": "post", "3": "de-mail", "4": "post"}
    # A case's params are merged over the phase's: what the handler saw in ctx.params.
    assert seen["0"] == {"function": "m:f", "channel": "de-mail", "sender": "shop"}


@pytest.mark.job
def test_routed_batch_in_dagster_keeps_its_graph_and_reuses_outcomes(
        batch_dir: Path, instance: dg.DagsterInstance) -> None:
    spec = {
        "name": "routed",
        "source": {"type": "inline", "key": "id", "items": [
            {"id": i, "country": c, "amount": a} for i, (c, a) in
            enumerate([("DE", 10), ("FR", 200), ("IT", 300), ("DE", 400)])]},
        "phases": [
            {"name": "notify", "task": "python",
             "params": {"function": "tests.control_handlers:tagged", "channel": "post"},
             "route": {"by": "country",
                       "cases": {"DE": {"params": {"channel": "de", "region": "eu"}},
                                 "FR": {"params": {"channel": "fr"}}}}},
            {"name": "bill", "task": "python", "when": "amount >= 100",
             "params": {"function": "tests.control_handlers:scored"}},
        ],
    }
    write_batch(batch_dir, spec)
    first = run_batch(batch_dir, instance, "routed")
    assert first.success
    # The graph shows the phases as ever: routing happens inside the phase's steps.
    nodes = {e.step_key.split("[")[0] for e in first.all_events if e.step_key}
    assert nodes == {"routed_batch.fan_out", "routed_batch.notify", "routed_batch.bill",
                     "routed_batch.collect", "routed_batch.results"}
    with open_ledger(instance) as ledger:
        rows = by_phase(ledger, first.run_id)
        assert {k: (r.branch, json.loads(r.output)["channel"])
                for k, r in rows["notify"].items()} == {
            "0": ("DE", "de"), "1": ("FR", "fr"), "2": ("default", "post"), "3": ("DE", "de")}
        assert {k: (r.status, r.skip_cause) for k, r in rows["bill"].items()} == {
            "0": ("skipped", "condition"), "1": ("succeeded", None),
            "2": ("succeeded", None), "3": ("succeeded", None)}
        # The next run of the partition reuses them as they were: skips stay skips.
        second = run_batch(batch_dir, instance, "routed")
        assert second.success
        again = by_phase(ledger, second.run_id)
        assert {k: (r.status, r.skip_cause, r.reused_from is not None)
                for k, r in again["bill"].items()}["0"] == ("skipped", "condition", True)
        assert again["notify"]["1"].branch == "FR"


BAD_EXPRESSIONS = """\
name: checks
source:
  type: inline
  items: [{id: 1, amount: 5}]
phases:
  - name: first
    task: python
    params: {function: "tests.control_handlers:scored"}
  - name: second
    task: python
    params: {function: "tests.control_handlers:scored"}
    when: "amount >> 3"
    limit: smtpp
  - name: third
    task: python
    params: {function: "tests.control_handlers:tagged"}
    route:
      by: "{{ country | no_such_filter }}"
      cases:
        DE: {task: nope}
limits:
  smtp: {rate: 10/s}
"""


@pytest.mark.unit
def test_load_reports_expression_errors_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "checks.yaml"
    path.write_text(BAD_EXPRESSIONS)
    with pytest.raises(SpecError) as caught:
        load_batch(path)
    problems = [str(p) for p in caught.value.problems]
    assert "checks.yaml:12 phases[1].when: unexpected '>' in 'amount >> 3'" in problems
    assert any(p.startswith("checks.yaml:18 phases[2].route.by: No filter named "
                            "'no_such_filter'") for p in problems), problems


@pytest.mark.unit
def test_load_reports_unknown_limits_and_case_tasks_with_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "checks.yaml"
    path.write_text(BAD_EXPRESSIONS.replace('"amount >> 3"', '"amount > 3"')
                    .replace("| no_such_filter ", ""))
    with pytest.raises(SpecError) as caught:
        load_batch(path)
    problems = [str(p) for p in caught.value.problems]
    assert ("checks.yaml:13 phases[1].limit: no limit named 'smtpp' in the batch's limits "
            "(smtp)") in problems
    assert any(p.startswith("checks.yaml:20 phases[2].route.cases.DE.task: unknown task "
                            "type 'nope'") for p in problems), problems


@pytest.mark.cli
def test_validate_prints_an_expression_error_with_its_line(batch_dir: Path,
                                                          cli_env: dict[str, str]) -> None:
    (batch_dir / "checks.yaml").write_text(textwrap.dedent(BAD_EXPRESSIONS))
    done = cli(cli_env, "validate", str(batch_dir / "checks.yaml"))
    assert done.returncode == 1
    assert "checks.yaml:12 phases[1].when: unexpected '>' in 'amount >> 3'" in done.stderr


@pytest.mark.unit
def test_a_condition_skip_counts_as_done_for_dependants(unit_ledger: Ledger,
                                                        tmp_path: Path) -> None:
    ran: list[str] = []
    plan = engine_plan(unit_ledger, [lambda item, ctx: ran.append(ctx.key)], tmp_path,
                       phases=[{"when": "key != 'a'"}])
    run_items(plan, [Item("a", 0, {"id": "a"}), Item("b", 1, {"id": "b", "depends_on": "a"})],
              tmp_path)
    rows = by_phase(unit_ledger)["phase0"]
    assert (rows["a"].status, rows["a"].skip_cause) == ("skipped", "condition")
    assert rows["b"].status == "succeeded" and ran == ["b"]
