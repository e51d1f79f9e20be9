"""`llm` task: one chat completion per item from an OpenAI-compatible API, priced per token."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from batch_defs.secrets import mask
from batch_defs.tasks.base import Handler, TaskContext, TaskParams, TaskResult
from batch_defs.tasks.http import check_status
from batch_defs.tasks.python import import_function
from batch_defs.tasks.templating import (
    compile_template,
    render,
    template_env,
    template_vars,
)

JUDGE_SYSTEM = {"role": "system",
                "content": 'Answer with a JSON object {"score": <a number from 0 to 1>}.'}


class JudgeGate(TaskParams):
    judge_prompt: str  # template over the item, its new fields and `output` (the answer)
    min_score: float = Field(ge=0, le=1)
    model: str | None = None  # default: the phase's model


class PythonGate(TaskParams):
    python: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class LlmParams(TaskParams):
    prompt: str  # template over the item
    system: str | None = None  # template too
    model: str | None = None  # default: the llm resource's model
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    json_output: bool = False  # ask for a JSON object and merge its fields into the item
    output_field: str | None = None  # default: <phase>_text (unless json_output)
    gate: JudgeGate | PythonGate | None = None

    @model_validator(mode="after")
    def _field_or_json(self) -> LlmParams:
        if self.json_output and self.output_field:
            raise ValueError("json_output merges the answer's fields: drop output_field")
        return self


@dataclass
class Completion:
    content: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def parse_json_object(content: str, model: str) -> dict[str, Any]:
    """The answer as a JSON object; code fences some models add around it are tolerated."""
    text = content.strip()
    if text.startswith("```"):
        text = text.strip("`").removeprefix("json").strip()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"model {model} did not answer with JSON ({exc}): "
                         f"{content[:200]!r}") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"model {model} answered JSON that is not an object: {content[:200]!r}")
    return parsed


def chat(resource: Any, messages: list[dict[str, str]], model: str, json_output: bool,
         temperature: float | None = None, max_tokens: int | None = None) -> Completion:
    """POST {base_url}/chat/completions; 429 and 5xx raise HttpStatusError (retryable)."""
    payload: dict[str, Any] = {"model": model, "messages": messages}
    if temperature is not None:
        payload["temperature"] = temperature
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if json_output:
        payload["response_format"] = {"type": "json_object"}
    token = resource.bearer_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{resource.endpoint().rstrip('/')}/chat/completions"
    response = resource.client().post(url, json=payload, headers=headers,
                                      timeout=resource.timeout_s)
    check_status(response)
    try:
        data = response.json()
        content = data["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(mask(f"POST {url}: not a chat completion: "
                              f"{response.text[:200]!r}")) from exc
    usage = data.get("usage") or {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    completion_tokens = int(usage.get("completion_tokens") or 0)
    return Completion(content, data.get("model") or model, prompt_tokens, completion_tokens,
                      int(usage.get("total_tokens") or prompt_tokens + completion_tokens))


def make_handler(params: LlmParams, base_dir: Path) -> Handler:
    env = template_env()
    prompt = compile_template(env, params.prompt, "prompt")
    system = compile_template(env, params.system, "system") if params.system else None
    judge = (compile_template(env, params.gate.judge_prompt, "gate.judge_prompt")
             if isinstance(params.gate, JudgeGate) else None)
    gate_function: Callable[..., Any] | None = (
        import_function(params.gate.python, base_dir)
        if isinstance(params.gate, PythonGate) else None)

    def complete(item: dict[str, Any], ctx: TaskContext) -> TaskResult:
        resource = ctx.resources["llm"]
        model = params.model or resource.model
        variables = template_vars(item, ctx)
        messages = [{"role": "user", "content": render(prompt, variables, "prompt")}]
        if system:
            messages.insert(0, {"role": "system",
                                "content": render(system, variables, "system")})
        if params.json_output and not any("json" in m["content"].lower() for m in messages):
            # OpenAI refuses response_format json_object unless a message mentions JSON.
            messages.insert(0, {"role": "system", "content": "Answer with a JSON object."})
        answer = chat(resource, messages, model, params.json_output, params.temperature,
                      params.max_tokens)
        cost = resource.cost(model, answer.prompt_tokens, answer.completion_tokens)
        tokens = answer.total_tokens
        output = (parse_json_object(answer.content, model) if params.json_output
                  else {params.output_field or f"{ctx.phase}_text": answer.content})
        if judge is not None and isinstance(params.gate, JudgeGate):
            gate, judge_model = params.gate, params.gate.model or model
            text = render(judge, {**variables, **output, "output": answer.content},
                          "gate.judge_prompt")
            verdict = chat(resource, [JUDGE_SYSTEM, {"role": "user", "content": text}],
                           judge_model, True)
            cost += resource.cost(judge_model, verdict.prompt_tokens, verdict.completion_tokens)
            tokens += verdict.total_tokens
            score = parse_json_object(verdict.content, judge_model).get("score")
            if not isinstance(score, int | float) or isinstance(score, bool):
                raise ValueError(f"judge {judge_model} gave no numeric score: "
                                 f"{verdict.content[:200]!r}")
            if score < gate.min_score:
                ctx.log.info(f"{ctx.key}: rejected, judge score {score} (cost {cost:.6f})")
                ctx.reject(f"gate: judge score {score:g} < min_score {gate.min_score:g}")
        if gate_function is not None and isinstance(params.gate, PythonGate):
            verdict_value = gate_function({**item, **output}, ctx)
            if isinstance(verdict_value, str) or not verdict_value:
                reason = verdict_value if isinstance(verdict_value, str) else ""
                ctx.reject(f"gate: {params.gate.python}: {reason or 'returned false'}")
        return TaskResult(output=output, cost=cost, tokens=tokens)

    return complete

