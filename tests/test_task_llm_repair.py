"""Repair, not only reject: a gated `llm` phase asks again with the judge's feedback
(`regenerate`), records each attempt's score and cost, and a rejected item keeps what it paid."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from batch_defs.tasks import RejectItem, TaskContext, build_handler
from resources.llm import LlmResource
from resources.storage import BatchStorageResource
from tests.conftest import run_batch, write_batch

PRICES = {"fake-1": {"input_per_1k": 0.5, "output_per_1k": 1.5}}
CALL_COST = (100 * 0.5 + 20 * 1.5) / 1000  # every answer: 100 prompt, 20 completion tokens


@dataclass
class RepairingChat:
    """Drafts first; once told the reviewer's feedback it answers with an improved text. The
    judge passes only improved answers (or none, with `strict`), giving feedback otherwise."""

    strict: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, request: Request) -> Response:
        body = request.get_json()
        self.requests.append(body)
        messages = body["messages"]
        if "score" in messages[0]["content"]:  # the judge's system message
            judged = messages[-1]["content"]
            passed = "improved" in judged and not self.strict
            content = json.dumps({"score": 0.9 if passed else 0.3,
                                  "feedback": "" if passed else "name the product"})
        elif any(m["role"] == "assistant" for m in messages):
            content = f"improved summary ({messages[-1]['content'][:60]})"
        else:
            content = "draft summary"
        return Response(json.dumps({
            "id": "c1", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }), content_type="application/json")


def serve(httpserver: HTTPServer, chat: RepairingChat) -> str:
    httpserver.expect_request("/v1/chat/completions", method="POST").respond_with_handler(chat)
    return httpserver.url_for("/v1")


GATED = {"prompt": "Summarize {{ text }}",
         "gate": {"judge_prompt": "Rate: {{ output }}", "min_score": 0.5},
         "regenerate": {"max_attempts": 2}}


def context(tmp_path: Path, base_url: str) -> TaskContext:
    llm = LlmResource(base_url=base_url, model="fake-1", prices=PRICES, api_key="")
    return TaskContext(params={}, batch="b", partition="p1", run_id="r", phase="summarize",
                       key="1", base_dir=tmp_path, output_dir=tmp_path, resources={"llm": llm})


@pytest.mark.integration
def test_feedback_goes_into_the_second_attempt(tmp_path: Path,
                                               httpserver_ipv4: HTTPServer) -> None:
    chat = RepairingChat()
    base_url = serve(httpserver_ipv4, chat)
    result = build_handler("llm", GATED, tmp_path)({"text": "the bike"},
                                                   context(tmp_path, base_url))
    assert result.output["summarize_text"].startswith("improved summary")
    quality = result.output["summarize_quality"]
    assert quality["score"] == 0.9
    assert [(a["attempt"], a["score"], a["passed"]) for a in quality["attempts"]] == [
        (1, 0.3, False), (2, 0.9, True)]
    assert [a["cost"] for a in quality["attempts"]] == pytest.approx([2 * CALL_COST] * 2)
    assert result.cost == pytest.approx(4 * CALL_COST) and result.tokens == 480
    # The second answer was asked with the first one and the judge's feedback.
    second = chat.requests[2]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[1]["content"] == "draft summary"
    assert "score 0.3, at least 0.5 needed" in second[2]["content"]
    assert "name the product" in second[2]["content"]


@pytest.mark.integration
def test_reject_after_the_last_attempt_carries_cost_and_log(
        tmp_path: Path, httpserver_ipv4: HTTPServer) -> None:
    base_url = serve(httpserver_ipv4, RepairingChat(strict=True))
    handler = build_handler("llm", {**GATED, "regenerate": {"max_attempts": 3}}, tmp_path)
    with pytest.raises(RejectItem, match=r"^gate: judge score 0.3 < min_score 0.5$") as caught:
        handler({"text": "x"}, context(tmp_path, base_url))
    assert caught.value.cost == pytest.approx(6 * CALL_COST) and caught.value.tokens == 720
    assert [a["attempt"] for a in caught.value.attempt_log] == [1, 2, 3]


@pytest.mark.unit
def test_regenerate_needs_a_gate(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="regenerate retries what a gate rejects"):
        build_handler("llm", {"prompt": "x", "regenerate": {"max_attempts": 2}}, tmp_path)


@pytest.mark.job
@pytest.mark.integration
def test_ledger_records_repairs_and_paid_rejections(batch_dir: Path,
                                                    instance: dg.DagsterInstance,
                                                    httpserver_ipv4: HTTPServer) -> None:
    chat = RepairingChat()
    base_url = serve(httpserver_ipv4, chat)
    write_batch(batch_dir, {
        "name": "repair",
        "source": {"type": "inline", "key": "id",
                   "items": [{"id": 1, "text": "a bike"}, {"id": 2, "text": "a lamp"}]},
        "phases": [
            {"name": "summarize", "task": "llm", "params": GATED},
            # No regenerate here: a single refused answer is rejected, and what it paid stays.
            {"name": "strict", "task": "llm",
             "params": {"prompt": "Again {{ text }}",
                        "gate": {"judge_prompt": "Rate: {{ output }}", "min_score": 0.5}}}],
        "options": {"on_error": "continue", "tolerated_failures": 2},
    })
    config = {"resources": {"llm": {"config": {"base_url": base_url, "api_key": "",
                                               "model": "fake-1", "prices": PRICES}}}}
    result = run_batch(batch_dir, instance, "repair", run_config=config)
    assert result.success
    rows = BatchStorageResource().ledger(instance).rows(result.run_id)
    summarized = rows[rows["phase"] == "summarize"].set_index("item_key")
    assert set(summarized["status"]) == {"succeeded"}
    assert summarized["cost"].tolist() == pytest.approx([4 * CALL_COST] * 2)
    assert summarized["tokens"].tolist() == [480, 480]
    output = json.loads(summarized.loc["1", "output"])
    assert len(output["summarize_quality"]["attempts"]) == 2
    strict = rows[rows["phase"] == "strict"].set_index("item_key")
    assert set(strict["status"]) == {"rejected"}
    assert strict["cost"].tolist() == pytest.approx([2 * CALL_COST] * 2)
    assert strict["tokens"].tolist() == [240, 240]
    log = json.loads(strict.loc["1", "attempt_log"])
    assert log == [{"attempt": 1, "score": 0.3, "passed": False,
                    "feedback": "name the product", "cost": pytest.approx(2 * CALL_COST),
                    "tokens": 240}]
    run = BatchStorageResource().ledger(instance).run_state(result.run_id)
    assert run.spent_cost == pytest.approx(12 * CALL_COST)  # rejections count in the budget
