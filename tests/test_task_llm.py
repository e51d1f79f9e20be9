"""The `llm` task against a small OpenAI-compatible server on 127.0.0.1: prompts, JSON
answers, quality gates, and cost and tokens recorded in the ledger."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from batch_defs.tasks import RejectItem, TaskContext, TaskResult, build_handler
from batch_defs.tasks.http import HttpStatusError
from batch_defs.tasks.templating import TemplateSecurityError
from resources.llm import LlmResource
from resources.storage import BatchStorageResource
from tests.conftest import run_batch, write_batch

PRICES = {"fake-1": {"input_per_1k": 0.5, "output_per_1k": 1.5},
          "judge-1": {"input_per_1k": 0.1, "output_per_1k": 0.1}}
# Every answer of the fake server uses 100 prompt and 20 completion tokens.
ANSWER_COST = (100 * 0.5 + 20 * 1.5) / 1000
JUDGE_COST = (100 * 0.1 + 20 * 0.1) / 1000


@dataclass
class FakeChat:
    """Answers /v1/chat/completions like an OpenAI-compatible server, deterministically."""

    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)

    def __call__(self, request: Request) -> Response:
        body = request.get_json()
        self.requests.append((dict(request.headers), body))
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Rate"):
            content = json.dumps({"score": 0.9 if "great" in prompt else 0.2})
        elif prompt.startswith("Not JSON"):
            content = "Sure! Here is your answer."
        elif body.get("response_format") == {"type": "json_object"}:
            content = json.dumps({"sentiment": "positive", "stars": 5, "echo": prompt})
        else:
            content = f"Summary: {prompt}"
        return Response(json.dumps({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1767225600,
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }), content_type="application/json")


@pytest.fixture
def fake_llm(httpserver_ipv4: HTTPServer) -> tuple[FakeChat, str]:
    chat = FakeChat()
    httpserver_ipv4.expect_request("/v1/chat/completions", method="POST").respond_with_handler(
        chat)
    return chat, httpserver_ipv4.url_for("/v1")


def context(tmp_path: Path, base_url: str, key: str = "1", **resource: Any) -> TaskContext:
    llm = LlmResource(base_url=base_url, model="fake-1", prices=PRICES, **resource)
    return TaskContext(params={}, batch="reviews", partition="p1", run_id="run-1",
                       phase="summarize", key=key, base_dir=tmp_path, output_dir=tmp_path,
                       resources={"llm": llm})


def gate_short(item: dict[str, Any], ctx: Any) -> bool | str:
    """A python gate: passes short summaries only."""
    text = item["summarize_text"]
    return True if len(text) < 30 else f"summary too long ({len(text)} chars)"


@pytest.mark.integration
def test_prompt_system_and_model_reach_the_server(tmp_path: Path,
                                                  fake_llm: tuple[FakeChat, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # an unset key falls back to it
    chat, base_url = fake_llm
    handler = build_handler("llm", {"prompt": "Review {{ key }}: {{ text }}",
                                    "system": "You summarize {{ batch }}.",
                                    "temperature": 0.2, "max_tokens": 50}, tmp_path)
    result = handler({"text": "lovely"}, context(tmp_path, base_url, key="9", api_key="sk-1"))
    assert isinstance(result, TaskResult)
    assert result.output == {"summarize_text": "Summary: Review 9: lovely"}
    assert result.tokens == 120 and result.cost == pytest.approx(ANSWER_COST)
    headers, body = chat.requests[0]
    assert headers["Authorization"] == "Bearer sk-1"
    assert body == {"model": "fake-1", "temperature": 0.2, "max_tokens": 50, "messages": [
        {"role": "system", "content": "You summarize reviews."},
        {"role": "user", "content": "Review 9: lovely"}]}
    # A phase's own model wins; an empty api_key sends no Authorization header.
    other = build_handler("llm", {"prompt": "x", "model": "other-2", "output_field": "answer"},
                          tmp_path)
    result = other({}, context(tmp_path, base_url))
    assert result.output == {"answer": "Summary: x"}
    assert result.cost == 0.0  # other-2 has no price
    headers, body = chat.requests[1]
    assert "Authorization" not in headers and body["model"] == "other-2"


@pytest.mark.integration
def test_json_output_is_parsed_and_merged(tmp_path: Path,
                                          fake_llm: tuple[FakeChat, str]) -> None:
    chat, base_url = fake_llm
    handler = build_handler("llm", {"prompt": "Classify: {{ text }}", "json_output": True},
                            tmp_path)
    result = handler({"text": "great"}, context(tmp_path, base_url))
    assert result.output == {"sentiment": "positive", "stars": 5, "echo": "Classify: great"}
    assert chat.requests[0][1]["response_format"] == {"type": "json_object"}
    # OpenAI wants "JSON" in some message with json_object: the task adds it when missing.
    assert chat.requests[0][1]["messages"] == [
        {"role": "system", "content": "Answer with a JSON object."},
        {"role": "user", "content": "Classify: great"}]
    broken = build_handler("llm", {"prompt": "Not JSON {{ text }}", "json_output": True},
                           tmp_path)
    with pytest.raises(ValueError, match="model fake-1 did not answer with JSON .*"
                                         "'Sure! Here is your answer.'"):
        broken({"text": "x"}, context(tmp_path, base_url))


@pytest.mark.integration
def test_gates_reject_with_the_reason(tmp_path: Path, fake_llm: tuple[FakeChat, str]) -> None:
    chat, base_url = fake_llm
    judged = build_handler("llm", {
        "prompt": "Summarize {{ text }}",
        "gate": {"judge_prompt": "Rate 0..1 as JSON {\"score\": x}: {{ output }}",
                 "min_score": 0.5, "model": "judge-1"}}, tmp_path)
    passed = judged({"text": "great"}, context(tmp_path, base_url))
    assert passed.cost == pytest.approx(ANSWER_COST + JUDGE_COST) and passed.tokens == 240
    judge_request = chat.requests[1][1]
    assert judge_request["model"] == "judge-1"
    assert judge_request["response_format"] == {"type": "json_object"}
    assert judge_request["messages"][1]["content"] == (
        'Rate 0..1 as JSON {"score": x}: Summary: Summarize great')
    with pytest.raises(RejectItem, match=r"^gate: judge score 0.2 < min_score 0.5$"):
        judged({"text": "meh"}, context(tmp_path, base_url))

    python_gate = build_handler("llm", {
        "prompt": "{{ text }}", "gate": {"python": "tests.test_task_llm:gate_short"}}, tmp_path)
    passed_output = python_gate({"text": "short"}, context(tmp_path, base_url)).output
    assert passed_output["summarize_text"] == "Summary: short"
    # A gate's verdict stays with the item: a python gate has no score, one attempt passed.
    assert passed_output["summarize_quality"]["score"] is None
    assert [a["passed"] for a in passed_output["summarize_quality"]["attempts"]] == [True]
    with pytest.raises(RejectItem, match=r"gate: tests.test_task_llm:gate_short: summary too "
                                         r"long \(40 chars\)"):
        python_gate({"text": "a much, much longer review text"}, context(tmp_path, base_url))


@pytest.mark.integration
def test_rate_limit_and_unsafe_templates(tmp_path: Path, httpserver_ipv4: HTTPServer) -> None:
    httpserver_ipv4.expect_request("/v1/chat/completions").respond_with_data(
        '{"error": "rate limited"}', status=429, headers={"Retry-After": "2"})
    base_url = httpserver_ipv4.url_for("/v1")
    handler = build_handler("llm", {"prompt": "hi"}, tmp_path)
    with pytest.raises(HttpStatusError, match="transient error 429") as limited:
        handler({}, context(tmp_path, base_url))
    assert limited.value.status_code == 429 and limited.value.retry_after_s == 2.0
    unsafe = build_handler("llm", {"prompt": "{{ text.__class__.__mro__ }}"}, tmp_path)
    with pytest.raises(TemplateSecurityError, match="prompt: unsafe template: access to "
                                                    "attribute '__class__' of 'str' object"):
        unsafe({"text": "x"}, context(tmp_path, base_url))
    assert len(httpserver_ipv4.log) == 1  # the unsafe prompt was never sent


def reviews_spec(tolerated: int) -> dict[str, Any]:
    texts = ["great food", "meh service", "great view", "meh"]
    return {
        "name": "reviews",
        "source": {"type": "inline", "key": "id",
                   "items": [{"id": i + 1, "text": t} for i, t in enumerate(texts)]},
        "phases": [{
            "name": "summarize", "task": "llm",
            "params": {"prompt": "Summarize: {{ text }}", "system": "Be brief.",
                       "gate": {"judge_prompt": "Rate this summary: {{ summarize_text }}",
                                "min_score": 0.5}},
        }],
        "options": {"concurrency": 2, "on_error": "continue",
                    "tolerated_failures": tolerated},
    }


@pytest.mark.job
@pytest.mark.integration
def test_batch_records_cost_tokens_and_rejections(batch_dir: Path, instance: dg.DagsterInstance,
                                                  fake_llm: tuple[FakeChat, str]) -> None:
    chat, base_url = fake_llm
    write_batch(batch_dir, reviews_spec(2))
    config = {"resources": {"llm": {"config": {"base_url": base_url, "api_key": "sk-test",
                                               "model": "fake-1", "prices": PRICES}}}}

    result = run_batch(batch_dir, instance, "reviews", run_config=config)

    assert result.success
    rows = BatchStorageResource().ledger(instance).rows(result.run_id).set_index("item_key")
    assert dict(rows["status"]) == {"1": "succeeded", "2": "rejected", "3": "succeeded",
                                    "4": "rejected"}
    assert set(rows.loc[["2", "4"], "error"]) == {"gate: judge score 0.2 < min_score 0.5"}
    assert rows.loc["2", "attempts"] == 1  # a verdict, not retried
    assert json.loads(rows.loc["1", "output"])["summarize_text"] == "Summary: Summarize: great food"
    # Answer and judge calls (the judge uses the phase's model) of the succeeded items.
    assert rows.loc[["1", "3"], "tokens"].tolist() == [240, 240]
    assert rows.loc[["1", "3"], "cost"].tolist() == pytest.approx([2 * ANSWER_COST] * 2)
    assert len(chat.requests) == 8
    assert all(h["Authorization"] == "Bearer sk-test" for h, _ in chat.requests)
