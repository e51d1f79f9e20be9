"""`http` task: one templated HTTP request per item, response fields mapped onto the item."""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from pydantic import Field, field_validator

from batch_defs.sources import SourceError, dig, expand_env
from batch_defs.sources.remote import retry_after_seconds
from batch_defs.tasks.base import Handler, TaskContext, TaskParams
from batch_defs.tasks.templating import (
    compile_template,
    compile_value,
    render,
    template_env,
    template_vars,
)

DEFAULT_TIMEOUT_S = 30.0


class HttpStatusError(Exception):
    """An unexpected HTTP status. `status_code` is what a phase's `retry_on: [429, 503]`
    matches; `retry_after_s` is the server's Retry-After, for the phase's retry policy."""

    def __init__(self, status_code: int, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.retry_after_s = retry_after_s

    @property
    def transient(self) -> bool:
        return self.status_code == 429 or self.status_code >= 500


def check_status(response: httpx.Response, expected: list[int] | None = None) -> None:
    """Raise HttpStatusError unless the status is expected (default: any 2xx)."""
    status = response.status_code
    if (status in expected) if expected else response.is_success:
        return
    snippet = response.text[:300].strip()
    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
    kind = "transient error" if status == 429 or status >= 500 else "unexpected status"
    raise HttpStatusError(
        status, f"{response.request.method} {response.request.url}: {kind} {status}"
        + (f", retry after {retry_after:g}s" if retry_after is not None else "")
        + (f": {snippet}" if snippet else ""), retry_after)


_client: httpx.Client | None = None
_client_lock = threading.Lock()


def shared_client() -> httpx.Client:
    """One pooled client per process: connections are reused across items and threads
    (httpx clients may be shared between threads); timeouts are set per request."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx.Client(follow_redirects=False)
        return _client


class BearerAuth(TaskParams):
    type: Literal["bearer"]
    token: str  # e.g. "${env:API_TOKEN}", read when the request is sent


class BasicAuth(TaskParams):
    type: Literal["basic"]
    username: str
    password: str = ""


Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


class HttpParams(TaskParams):
    method: Method = "GET"
    url: str  # template; relative URLs go to the `http` resource's base_url
    headers: dict[str, str] = Field(default_factory=dict)  # values may hold ${env:NAME}
    json_body: dict[str, Any] | None = None  # string values are templates
    auth: Annotated[BearerAuth | BasicAuth, Field(discriminator="type")] | None = None
    response_fields: dict[str, str] = Field(default_factory=dict)  # item field -> JSON path
    timeout_s: float | None = Field(default=None, gt=0)  # default: the resource's timeout
    expected_status: list[int] = Field(default_factory=list)  # empty: any 2xx

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


def auth_headers(auth: BearerAuth | BasicAuth | None) -> dict[str, str]:
    if isinstance(auth, BearerAuth):
        return {"Authorization": f"Bearer {expand_env(auth.token)}"}
    if isinstance(auth, BasicAuth):
        pair = f"{expand_env(auth.username)}:{expand_env(auth.password)}".encode()
        return {"Authorization": f"Basic {base64.b64encode(pair).decode('ascii')}"}
    return {}


def absolute_url(url: str, base_url: str) -> str:
    if url.startswith(("http://", "https://")):
        return url
    if not base_url:
        raise ValueError(f"url {url!r} is relative and the http resource has no base_url")
    return f"{base_url.rstrip('/')}/{url.lstrip('/')}"


def make_handler(params: HttpParams, base_dir: Path) -> Handler:
    env = template_env()
    url_template = compile_template(env, params.url, "url")
    body = compile_value(env, params.json_body, "json_body") if params.json_body else None

    def request(item: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        resource = ctx.resources.get("http")
        variables = template_vars(item, ctx)
        try:
            headers = {**{k: expand_env(v) for k, v in getattr(resource, "headers", {}).items()},
                       **{k: expand_env(v) for k, v in params.headers.items()},
                       **auth_headers(params.auth)}
        except SourceError as exc:  # a missing environment variable
            raise ValueError(f"headers: {exc}") from exc
        url = absolute_url(render(url_template, variables, "url"),
                           getattr(resource, "base_url", ""))
        timeout = params.timeout_s or getattr(resource, "timeout_s", DEFAULT_TIMEOUT_S)
        response = shared_client().request(
            params.method, url, headers=headers, timeout=timeout,
            json=body(variables) if body else None)
        check_status(response, params.expected_status)
        output: dict[str, Any] = {f"{ctx.phase}_status": response.status_code}
        if params.response_fields:
            try:
                data = response.json()
            except ValueError as exc:
                raise ValueError(f"{params.method} {url}: the response is not JSON "
                                 f"({response.text[:100]!r})") from exc
            for field, path in params.response_fields.items():
                try:
                    output[field] = dig(data, path)
                except SourceError as exc:
                    raise ValueError(f"response_fields.{field}: {exc}") from exc
        return output

    return request
