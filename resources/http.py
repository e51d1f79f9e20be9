"""Base URL, default headers and timeout for `http` task requests with relative URLs."""

from __future__ import annotations

import dagster as dg
from pydantic import Field


class HttpResource(dg.ConfigurableResource):
    """Shared settings of an API that phases call with relative URLs (`url: /users/{{ id }}`).
    Header values may hold `${env:NAME}`, read when each request is sent."""

    base_url: str = Field(default="", description="Prefix of relative URLs; empty: only "
                          "absolute URLs are allowed")
    headers: dict[str, str] = Field(default_factory=dict,
                                    description="Headers sent with every request; a phase's "
                                    "own headers win")
    timeout_s: float = Field(default=30.0, gt=0,
                             description="Request timeout when the phase sets none")
