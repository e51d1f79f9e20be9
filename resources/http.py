"""Base URL, default headers, timeout and the pooled client of `http` task requests."""

from __future__ import annotations

import threading

import dagster as dg
import httpx
from pydantic import Field, PrivateAttr

from batch_defs.secrets import register_resources
from batch_defs.tasks.http import origin


class PooledClientResource(dg.ConfigurableResource):
    """A resource owning one pooled httpx client: opened in setup_for_execution (or on first
    use outside a run), closed in teardown_after_execution (or by close()). The client is
    shared by a phase's slots: httpx clients are thread-safe; timeouts are set per request."""

    _client: httpx.Client | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.client()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                # Its secrets are masked in errors from the moment it can send them.
                register_resources([self])
                # No redirects: a 3xx must not carry credentials to wherever it points.
                self._client = httpx.Client(follow_redirects=False)
            return self._client

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class HttpResource(PooledClientResource):
    """Shared settings of an API that phases call with relative URLs (`url: /users/{{ id }}`).
    Header values may hold `${env:NAME}`, read when each request is sent.

    The `headers` (credentials such as Authorization) go only to the origin of `base_url` and
    to `allowed_origins`; a phase whose URL (e.g. from an item field) points elsewhere fails,
    unless it sets `other_origins: without_credentials`."""

    base_url: str = Field(default="", description="Prefix of relative URLs; empty: only "
                          "absolute URLs are allowed")
    headers: dict[str, str] = Field(default_factory=dict,
                                    description="Headers sent with every request to the "
                                    "trusted origins; a phase's own headers win")
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) besides base_url's that may be called "
                    "and get `headers`, e.g. https://files.example.com")
    timeout_s: float = Field(default=30.0, gt=0,
                             description="Request timeout when the phase sets none")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self.trusted_origins()  # a mistyped allowed_origins fails the run, not every item
        super().setup_for_execution(context)

    def trusted_origins(self) -> set[str]:
        """Where `headers` may go: the origin of base_url and the allowed_origins."""
        origins = {origin(self.base_url)} if self.base_url else set()
        for entry in self.allowed_origins:
            try:
                origins.add(origin(entry))
            except ValueError as exc:
                raise ValueError(f"http resource allowed_origins: {exc}") from exc
        return origins
