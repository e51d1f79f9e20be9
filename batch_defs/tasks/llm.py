"""`llm` task: one chat completion per item from an OpenAI-compatible API, priced per token."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import meta
from pydantic import Field, model_validator

from batch_defs.rag import ContextParams, Retriever, context_block
from batch_defs.secrets import mask
from batch_defs.tasks.base import Handler, RejectItem, TaskContext, TaskParams, TaskResult
from batch_defs.tasks.http import check_status
from batch_defs.tasks.python import import_function
from batch_defs.tasks.templating import (
    compile_template,
    render,
    template_env,
    template_vars,
)

JUDGE_SYSTEM = {"role": "system",
                "content": 'Answer with a JSON object {"score": <a number from 0 to 1>, '
                           '"feedback": "<what would make the answer better>"}.'}
# What a regenerated attempt is told (regenerate.feedback replaces it): a template over the
# item plus score, min_score, feedback (the judge's words, or a python gate's reason), attempt.
FEEDBACK = ("A reviewer did not accept your answer{% if score is not none %} (score {{ score }}, "
            "at least {{ min_score }} needed){% endif %}. Their feedback: {{ feedback }}\n\n"
            "Answer the original request again, improved.")


class JudgeGate(TaskParams):
    judge_prompt: str  # template over the item, its new fields and `output` (the answer)
    min_score: float = Field(ge=0, le=1)
    model: str | None = None  # default: the phase's model


class PythonGate(TaskParams):
    python: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class RegenerateParams(TaskParams):
    max_attempts: int = Field(default=2, ge=1, le=10)  # answers in all, the first included
    feedback: str | None = None  # template of the message that asks again (FEEDBACK)


class LlmParams(TaskParams):
    prompt: str  # template over the item
    system: str | None = None  # template too
    model: str | None = None  # default: the llm resource's model
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    json_output: bool = False  # ask for a JSON object and merge its fields into the item
    output_field: str | None = None  # default: <phase>_text (unless json_output)
    gate: JudgeGate | PythonGate | None = None
    # Ask again, with the gate's feedback added, before rejecting (needs a gate).
    regenerate: RegenerateParams | None = None
    context: ContextParams | None = None  # retrieval: passages of a corpus in the prompt

    @model_validator(mode="after")
    def _field_or_json(self) -> LlmParams:
        if self.json_output and self.output_field:
            raise ValueError("json_output merges the answer's fields: drop output_field")
        if self.regenerate and self.gate is None:
            raise ValueError("regenerate retries what a gate rejects: add a gate")
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


@dataclass
class Verdict:
    """A gate's judgement of one answer."""

    passed: bool
    reason: str  # why it was refused (the reject message)
    score: float | None = None  # a judge's score
    feedback: str = ""  # what to improve: the judge's words, or a python gate's reason


@dataclass
class Spend:
    cost: float = 0.0
    tokens: int = 0

    def add(self, resource: Any, model: str, answer: Completion) -> None:
        self.cost += resource.cost(model, answer.prompt_tokens, answer.completion_tokens)
        self.tokens += answer.total_tokens


class LlmTask:
    """One phase's prompts, gate and context, compiled once; __call__ is the handler."""

    def __init__(self, params: LlmParams, base_dir: Path):
        env = template_env()
        self.params = params
        self.prompt = compile_template(env, params.prompt, "prompt")
        self.system = compile_template(env, params.system, "system") if params.system else None
        self.judge = (compile_template(env, params.gate.judge_prompt, "gate.judge_prompt")
                      if isinstance(params.gate, JudgeGate) else None)
        self.gate_function: Callable[..., Any] | None = (
            import_function(params.gate.python, base_dir)
            if isinstance(params.gate, PythonGate) else None)
        regenerate = params.regenerate
        self.attempts = regenerate.max_attempts if regenerate else 1
        self.feedback = compile_template(env, (regenerate.feedback if regenerate else None)
                                         or FEEDBACK, "regenerate.feedback")
        self.retriever = Retriever(params.context, base_dir) if params.context else None
        self.query = (compile_template(env, params.context.query, "context.query")
                      if params.context and params.context.query else None)
        # A prompt that places the passages itself ({{ context }}) gets no block in front.
        self.places_context = "context" in meta.find_undeclared_variables(
            env.parse(params.prompt))

    def __call__(self, item: dict[str, Any], ctx: TaskContext) -> TaskResult:
        resource = ctx.resources["llm"]
        model = self.params.model or resource.model
        variables = template_vars(item, ctx)
        extra = self.retrieve(variables, ctx)
        messages = self.messages(variables)
        spent, log = Spend(), []
        refused = Verdict(False, "")
        for attempt in range(1, self.attempts + 1):
            before = (spent.cost, spent.tokens)
            answer = chat(resource, messages, model, self.params.json_output,
                          self.params.temperature, self.params.max_tokens)
            spent.add(resource, model, answer)
            output = (parse_json_object(answer.content, model) if self.params.json_output
                      else {self.params.output_field or f"{ctx.phase}_text": answer.content})
            verdict = self.check(item, output, answer.content, variables, model, ctx, spent)
            if verdict is None:
                return TaskResult({**output, **extra}, spent.cost, spent.tokens)
            log.append({"attempt": attempt, "score": verdict.score,
                        "passed": verdict.passed, "feedback": verdict.feedback or None,
                        "cost": round(spent.cost - before[0], 8),
                        "tokens": spent.tokens - before[1]})
            if verdict.passed:
                quality = {"score": verdict.score, "attempts": log}
                return TaskResult({**output, **extra, f"{ctx.phase}_quality": quality},
                                  spent.cost, spent.tokens)
            refused = verdict
            ctx.log.info(f"{ctx.key}: attempt {attempt} refused: {verdict.reason} "
                         f"(cost so far {spent.cost:.6f})")
            if attempt < self.attempts:
                messages = [*messages, {"role": "assistant", "content": answer.content},
                            {"role": "user", "content": self.ask_again(
                                variables, verdict, attempt)}]
        raise RejectItem(refused.reason, spent.cost, spent.tokens, log)

    def retrieve(self, variables: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """The top passages for the item (into `variables`); the output field of their ids."""
        if self.retriever is None or self.params.context is None:
            return {}
        query = (render(self.query, variables, "context.query") if self.query
                 else render(self.prompt, {**variables, "context": []}, "prompt"))
        hits = self.retriever.search(query, ctx.output_dir)
        variables["context"] = [{"id": h.passage.id, "text": h.passage.text, "score": h.score}
                                for h in hits]
        variables["_context_block"] = context_block(hits)
        return {self.params.context.output_field or f"{ctx.phase}_context":
                [h.passage.id for h in hits]}

    def messages(self, variables: dict[str, Any]) -> list[dict[str, str]]:
        text = render(self.prompt, variables, "prompt")
        block = variables.pop("_context_block", "")
        if block and not self.places_context:
            # The passages come first: the request itself stays the prompt's last words.
            text = f"Context passages:\n\n{block}\n\n{text}"
        messages = [{"role": "user", "content": text}]
        if self.system:
            messages.insert(0, {"role": "system",
                                "content": render(self.system, variables, "system")})
        if self.params.json_output and not any("json" in m["content"].lower()
                                               for m in messages):
            # OpenAI refuses response_format json_object unless a message mentions JSON.
            messages.insert(0, {"role": "system", "content": "Answer with a JSON object."})
        return messages

    def check(self, item: dict[str, Any], output: dict[str, Any], content: str,
              variables: dict[str, Any], model: str, ctx: TaskContext,
              spent: Spend) -> Verdict | None:
        """The gate's verdict on one answer (None without a gate); the judge's call is paid."""
        gate = self.params.gate
        if self.judge is not None and isinstance(gate, JudgeGate):
            judge_model = gate.model or model
            text = render(self.judge, {**variables, **output, "output": content},
                          "gate.judge_prompt")
            answer = chat(ctx.resources["llm"], [JUDGE_SYSTEM,
                                                 {"role": "user", "content": text}],
                          judge_model, True)
            spent.add(ctx.resources["llm"], judge_model, answer)
            verdict = parse_json_object(answer.content, judge_model)
            score = verdict.get("score")
            if not isinstance(score, int | float) or isinstance(score, bool):
                raise ValueError(f"judge {judge_model} gave no numeric score: "
                                 f"{answer.content[:200]!r}")
            feedback = str(verdict.get("feedback") or "")
            return Verdict(score >= gate.min_score,
                           f"gate: judge score {score:g} < min_score {gate.min_score:g}",
                           float(score), feedback)
        if self.gate_function is not None and isinstance(gate, PythonGate):
            value = self.gate_function({**item, **output}, ctx)
            if isinstance(value, str) or not value:
                reason = (value if isinstance(value, str) else "") or "returned false"
                return Verdict(False, f"gate: {gate.python}: {reason}", None, reason)
            return Verdict(True, "")
        return None

    def ask_again(self, variables: dict[str, Any], verdict: Verdict, attempt: int) -> str:
        gate = self.params.gate
        min_score = gate.min_score if isinstance(gate, JudgeGate) else None
        return render(self.feedback, {**variables, "score": verdict.score,
                                      "min_score": min_score, "attempt": attempt,
                                      "feedback": verdict.feedback or verdict.reason},
                      "regenerate.feedback")


def make_handler(params: LlmParams, base_dir: Path) -> Handler:
    return LlmTask(params, base_dir)
