"""An OpenAI-compatible chat completions endpoint for the `llm` task, with its prices."""

from __future__ import annotations

import dagster as dg
from pydantic import Field


class LlmResource(dg.ConfigurableResource):
    """Endpoint, key, default model and price table. Give the key as
    `dg.EnvVar("OPENAI_API_KEY")`; it may stay empty for local servers that need none."""

    base_url: str = Field(default="https://api.openai.com/v1",
                          description="API root; the task POSTs to {base_url}/chat/completions")
    api_key: str = Field(default="", description="Bearer token (use dg.EnvVar); empty: none")
    model: str = Field(default="gpt-4o-mini", description="Model when the phase names none")
    timeout_s: float = Field(default=120.0, gt=0, description="Per-request timeout")
    prices: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per model: {input_per_1k: USD, output_per_1k: USD}; unlisted models "
                    "cost 0")

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.prices.get(model, {})
        return (prompt_tokens * price.get("input_per_1k", 0.0)
                + completion_tokens * price.get("output_per_1k", 0.0)) / 1000
