"""An OpenAI-compatible chat completions endpoint for the `llm` task, with its prices."""

from __future__ import annotations

import json
import os

from pydantic import Field

from resources.http import PooledClientResource


class LlmResource(PooledClientResource):
    """Endpoint, key, default model and price table. Give the key as
    `dg.EnvVar("OPENAI_API_KEY")`; it may stay empty for local servers that need none.

    Fields left unset are read from the environment when a request is made (never at
    import), so `batch-defs run` can point at any OpenAI-compatible server without run config:
    OPENAI_BASE_URL, OPENAI_API_KEY and LLM_PRICES (the `prices` mapping as JSON).

    It owns the pooled client of the `llm` task (client(), closed at the run's end)."""

    base_url: str | None = Field(default=None, description="API root; the task POSTs to "
                                 "{base_url}/chat/completions. Unset: $OPENAI_BASE_URL, else "
                                 "https://api.openai.com/v1")
    api_key: str | None = Field(default=None, description="Bearer token (use dg.EnvVar); "
                                "empty: none; unset: $OPENAI_API_KEY")
    model: str = Field(default="gpt-4o-mini", description="Model when the phase names none")
    timeout_s: float = Field(default=120.0, gt=0, description="Per-request timeout")
    prices: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per model: {input_per_1k: USD, output_per_1k: USD}; unlisted models "
                    "cost 0. Empty: $LLM_PRICES (JSON)")

    def endpoint(self) -> str:
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"

    def bearer_token(self) -> str:
        return self.api_key if self.api_key is not None else os.environ.get("OPENAI_API_KEY", "")

    def price_table(self) -> dict[str, dict[str, float]]:
        if self.prices or not os.environ.get("LLM_PRICES"):
            return self.prices
        try:
            table = json.loads(os.environ["LLM_PRICES"])
        except ValueError as exc:
            raise ValueError(f"LLM_PRICES is not JSON: {exc}") from exc
        if not isinstance(table, dict):
            raise ValueError("LLM_PRICES must be a JSON object {model: {input_per_1k: ..., "
                             "output_per_1k: ...}}")
        return table

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.price_table().get(model, {})
        return (prompt_tokens * price.get("input_per_1k", 0.0)
                + completion_tokens * price.get("output_per_1k", 0.0)) / 1000
