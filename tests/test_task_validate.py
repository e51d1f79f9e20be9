"""The `validate` task: each rule kind on its own, and a batch whose broken items end
`rejected` in the ledger with the rule that failed them."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from batch_defs.tasks import RejectItem, TaskContext, build_handler, check_spec_tasks
from batch_defs.tasks.validate import ValidateParams
from resources.storage import BatchStorageResource
from tests.conftest import run_batch, write_batch


def is_even(value: Any, item: dict[str, Any]) -> bool:
    return int(value) % 2 == 0


def known_customer(value: Any, item: dict[str, Any]) -> bool | str:
    return True if value.startswith("C-") else f"unknown customer id {value!r}"


def verdict(rules: list[dict[str, Any]], item: dict[str, Any]) -> str | None:
    """None if the item passes, else the rejection reason."""
    handler = build_handler("validate", {"rules": rules}, Path(__file__).parent)
    ctx = TaskContext(params={}, batch="b", partition="p", run_id="r", phase="check", key="1")
    try:
        assert handler(item, ctx) is None  # passing items go on unchanged
    except RejectItem as exc:
        return str(exc)
    return None


@pytest.mark.unit
@pytest.mark.parametrize(("rule_type", "good", "bad", "why"), [
    ("int", "42", "4.5", "is not an int ('4.5')"),
    ("int", 7, True, "is not an int (True)"),
    ("float", "2.5", "abc", "is not a number ('abc')"),
    ("str", "x", 5, "is not a string (5)"),
    ("bool", "TRUE", "yes", "is not a boolean ('yes'; use true/false or 1/0)"),
    ("datetime", "2026-03-01T10:30Z", "2026-03-01", "is not an ISO date-time ('2026-03-01')"),
    ("date", "2026-03-01", "01/03/2026", "is not an ISO date ('01/03/2026')"),
    ("email", "ada@example.com", "ada@", "is not an email address ('ada@': "),
    ("url", "https://example.com/x", "ftp://example.com", "is not an http(s) URL"),
])
def test_types(rule_type: str, good: Any, bad: Any, why: str) -> None:
    rules = [{"field": "v", "type": rule_type}]
    assert verdict(rules, {"v": good}) is None
    reason = verdict(rules, {"v": bad})
    assert reason is not None and reason.startswith(f"rule 1: v {why}")


@pytest.mark.unit
def test_min_max_on_numbers_dates_and_lengths() -> None:
    ages = [{"field": "age", "type": "int", "min": 18, "max": 120, "message": "adult age"}]
    assert verdict(ages, {"age": "18"}) is None
    assert verdict(ages, {"age": 17}) == "adult age: age must be >= 18 (got 17)"
    assert verdict(ages, {"age": 121}) == "adult age: age must be <= 120 (got 121)"
    untyped = [{"field": "score", "min": 0.5}]
    assert verdict(untyped, {"score": "0.75"}) is None
    assert verdict(untyped, {"score": "n/a"}) == "rule 1: score is not a number ('n/a')"
    dates = [{"field": "due", "type": "date", "min": date(2026, 1, 1), "max": "2026-12-31"}]
    assert verdict(dates, {"due": "2026-06-30"}) is None
    assert verdict(dates, {"due": "2025-12-31"}) == (
        "rule 1: due must be >= 2026-01-01 (got datetime.date(2025, 12, 31))")
    names = [{"field": "name", "type": "str", "min": 2, "max": 5}]
    assert verdict(names, {"name": "Bo"}) is None
    assert verdict(names, {"name": "Bartholomew"}) == (
        "rule 1: name must be <= 5 characters long (got 11)")


@pytest.mark.unit
def test_regex_one_of_required_and_nested_fields() -> None:
    assert verdict([{"field": "sku", "regex": r"[A-Z]{3}-\d+"}], {"sku": "ABC-12"}) is None
    assert verdict([{"field": "sku", "regex": r"[A-Z]{3}-\d+"}], {"sku": "ABC-12x"}) == (
        r"rule 1: sku does not match /[A-Z]{3}-\d+/ ('ABC-12x')")
    plans = [{"field": "plan", "one_of": ["free", "pro", 3]}]
    assert verdict(plans, {"plan": "pro"}) is None
    assert verdict(plans, {"plan": "3"}) is None  # CSV text matches the number
    assert verdict(plans, {"plan": "gold"}) == (
        "rule 1: plan must be one of ['free', 'pro', 3] (got 'gold')")
    assert verdict([{"field": "email"}], {}) == "rule 1: email is required"
    assert verdict([{"field": "email"}], {"email": "  "}) == "rule 1: email is empty ('  ')"
    optional = [{"field": "phone", "regex": r"\+\d+", "required": False}]
    assert verdict(optional, {"phone": None}) is None
    assert verdict(optional, {"phone": "+4930"}) is None
    assert verdict(optional, {"phone": "030"}) is not None
    nested = [{"field": "address.city", "one_of": ["Berlin"]}]
    assert verdict(nested, {"address": {"city": "Berlin"}}) is None
    assert verdict(nested, {"address": {}}) == "rule 1: address.city is required"


@pytest.mark.unit
def test_python_rules_and_several_failures() -> None:
    rules = [{"field": "n", "python": "tests.test_task_validate:is_even"},
             {"field": "customer", "python": "tests.test_task_validate:known_customer",
              "message": "customer check"}]
    assert verdict(rules, {"n": 4, "customer": "C-1"}) is None
    assert verdict(rules, {"n": 3, "customer": "X-9"}) == (
        "rule 1: n fails tests.test_task_validate:is_even: returned false; "
        "customer check: customer fails tests.test_task_validate:known_customer: "
        "unknown customer id 'X-9'")


@pytest.mark.unit
def test_bad_rules_fail_when_the_batch_loads(tmp_path: Path) -> None:
    def problems(rules: list[dict[str, Any]]) -> list[str]:
        from batch_defs.spec import BatchSpec

        spec = BatchSpec.model_validate({
            "name": "b", "source": {"type": "inline", "key": "id", "items": [{"id": 1}]},
            "phases": [{"name": "check", "task": "validate", "params": {"rules": rules}}]})
        return [message for _, message in check_spec_tasks(spec, tmp_path).problems]

    assert problems([{"field": "x", "regex": "("}])[0].startswith("regex '(': missing )")
    assert problems([{"field": "x", "min": 5, "max": 1}]) == ["min 5.0 is above max 1.0"]
    assert problems([{"field": "x", "type": "int", "min": "2026-01-01"}]) == [
        "date bounds need type date, not int"]
    assert problems([{"field": "x", "type": "color"}])[0].startswith("Input should be 'int'")
    assert "cannot import module 'nowhere'" in problems([{"field": "x",
                                                          "python": "nowhere:f"}])[0]
    assert problems([]) == ["List should have at least 1 item after validation, not 0"]
    assert ValidateParams.model_validate({"rules": [{"field": "x"}]}).rules[0].required


@pytest.mark.job
def test_batch_rejects_broken_items_with_the_rule(batch_dir: Path,
                                                  instance: dg.DagsterInstance) -> None:
    items = [{"id": 1, "email": "a@example.com", "age": 30},
             {"id": 2, "email": "not-an-email", "age": 40},
             {"id": 3, "email": "c@example.com", "age": 12},
             {"id": 4, "email": "d@example.com", "age": 50}]
    write_batch(batch_dir, {
        "name": "gated",
        "source": {"type": "inline", "key": "id", "items": items},
        "phases": [
            {"name": "check", "task": "validate", "params": {"rules": [
                {"field": "email", "type": "email"},
                {"field": "age", "type": "int", "min": 18, "message": "adults only"}]},
             "retry": {"max_attempts": 3, "delay_s": 0}},
            {"name": "after_check", "task": "python",
             "params": {"function": "tests.handlers:sleep_ms", "ms": 1}},
        ],
        "options": {"on_error": "continue", "tolerated_failures": 2},
    })
    result = run_batch(batch_dir, instance, "gated")
    assert result.success
    rows = BatchStorageResource().ledger(instance).rows(result.run_id)
    check = rows[rows["phase"] == "check"].set_index("item_key")
    assert dict(check["status"]) == {"1": "succeeded", "2": "rejected", "3": "rejected",
                                     "4": "succeeded"}
    assert check.loc["2", "error"].startswith("rule 1: email is not an email address")
    assert check.loc["3", "error"] == "adults only: age must be >= 18 (got 12)"
    assert set(check.loc[["2", "3"], "attempts"]) == {1}  # verdicts are not retried
    assert '"age":12' in check.loc["3", "input"]  # kept to fix and re-run
    later = rows[rows["phase"] == "after_check"]
    assert sorted(later["item_key"]) == ["1", "4"]  # only passing items went on


# (type, value, what both checkers make of it: the converted value, or the reason it fails)
TYPE_RULES: list[tuple[str, Any, Any]] = [
    ("int", " 42 ", 42), ("int", 4.0, 4), ("int", "4.0", "is not an int ('4.0')"),
    ("int", True, "is not an int (True)"), ("int", "1_000", "is not an int ('1_000')"),
    ("int", "\u0663", "is not an int ('\u0663')"), ("int", "9" * 5000, "is not an int ('999"),
    ("float", "1e3", 1000.0), ("float", 2, 2.0), ("float", "nan", "is not a number ('nan')"),
    ("float", "inf", "is not a number ('inf')"),
    ("float", "1e999", "is out of range for a number ('1e999')"),
    ("float", False, "is not a number (False)"),
    ("str", " x ", " x "), ("str", 5, "is not a string (5)"),
    ("bool", True, True), ("bool", " False ", False), ("bool", "1", True), ("bool", 0, False),
    ("bool", "on", "is not a boolean ('on'; use true/false or 1/0)"),
    ("bool", "no", "is not a boolean ('no'; use true/false or 1/0)"),
    ("bool", 2, "is not a boolean (2; use true/false or 1/0)"),
    ("date", "2026-03-01", date(2026, 3, 1)), ("date", date(2026, 3, 1), date(2026, 3, 1)),
    ("date", "2026-02-30", "is not an ISO date ('2026-02-30')"),
    ("date", "20260301", "is not an ISO date ('20260301')"),
    ("datetime", "2026-03-01 10:30:00+02:00", "2026-03-01T10:30:00+02:00"),
    ("email", " Ada@Example.COM ", "Ada@example.com"),
    ("email", "ada@", "is not an email address ('ada@': "),
    ("url", "https://example.com/a?b=1", "https://example.com/a?b=1"),
    ("url", "https://exa mple.com/", "is not an http(s) URL ('https://exa mple.com/')"),
    ("url", "mailto:ada@example.com", "is not an http(s) URL ('mailto:ada@example.com')"),
]


@pytest.mark.unit
@pytest.mark.parametrize(("type_name", "value", "expected"), TYPE_RULES)
def test_schema_and_validate_apply_one_rule_per_type(type_name: str, value: Any,
                                                     expected: Any) -> None:
    from batch_defs.items import prepare_items
    from batch_defs.sources import RawRecord

    prepared = prepare_items([RawRecord(1, {"v": value})], None, {"v": type_name}, 10)
    rejected = verdict([{"field": "v", "type": type_name}], {"v": value})
    if isinstance(expected, str) and expected.startswith(("is ", "must ")):
        assert prepared.invalid[0].reason.startswith(f"v: {expected}")
        assert rejected is not None and rejected.startswith(f"rule 1: v {expected}")
    else:
        assert rejected is None
        shown = expected.isoformat() if isinstance(expected, date) else expected
        assert prepared.items[0].data["v"] == shown
        assert type(prepared.items[0].data["v"]) is type(shown)


@pytest.mark.unit
def test_rule_types_are_the_schema_types() -> None:
    from typing import get_args

    from batch_defs.tasks.validate import RuleType
    from batch_defs.validation import CONVERTERS

    assert set(get_args(RuleType)) == set(CONVERTERS)
