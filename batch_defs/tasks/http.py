"""`http` task: one templated HTTP request per item, response fields mapped onto the item."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from pydantic import Field, field_validator

from batch_defs.env import expand_env
from batch_defs.secrets import is_credential_header, mask, register
from batch_defs.sources import SourceError, dig
from batch_defs.sources.remote import retry_after_seconds
from batch_defs.tasks.base import Handler, TaskContext, TaskParams
from batch_defs.tasks.templating import (
    compile_template,
    compile_value,
    render,
    template_env,
    template_vars,
)


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
    # Masked here already: servers echo credentials back, and this message also reaches
    # fail-fast stop reasons and Dagster's event log, not only the ledger.
    raise HttpStatusError(
        status, mask(f"{response.request.method} {response.request.url}: {kind} {status}"
                     + (f", retry after {retry_after:g}s" if retry_after is not None else "")
                     + (f": {snippet}" if snippet else "")), retry_after)


class HostNotAllowedError(PermissionError):
    """The request's URL is on an origin the phase may not call; permanent (a retry would go
    to the same place)."""

    transient = False


def origin(url: str) -> str:
    """`scheme://host:port` of an absolute http(s) URL, the port always written out, so that
    `https://api.example.com` and `https://API.example.com:443/v1` compare equal."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"not a URL: {url!r} ({exc})") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not an absolute http(s) URL: {url!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return f"{parsed.scheme}://{parsed.host}:{port}"


_AUTHORITY = re.compile(r"https?://[^/?#]*", re.IGNORECASE)


def written_origin(url_template: str) -> str | None:
    """The origin spelled out in the spec's `url` (`https://api.example.com/v1/{{ id }}`);
    None when the URL is relative or templates reach into its host part
    (`{{ callback }}`, `https://api.example.com{{ path }}`, where a value could say
    `@attacker.example`)."""
    match = _AUTHORITY.match(url_template)
    if match is None or any(mark in match.group() for mark in ("{{", "{%", "{#")):
        return None
    try:
        return origin(match.group())
    except ValueError:
        return None


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
    # A URL on an origin that is neither the http resource's (base_url, allowed_origins) nor
    # spelled out in `url` fails the item, or with `without_credentials` is called with no
    # credentials at all (webhooks and callbacks taken from item fields).
    other_origins: Literal["refuse", "without_credentials"] = "refuse"

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


def auth_headers(auth: BearerAuth | BasicAuth | None) -> dict[str, str]:
    """The Authorization header of `auth`; its secret is registered for masking."""
    if isinstance(auth, BearerAuth):
        token = expand_env(auth.token)
        register(token)
        return {"Authorization": f"Bearer {token}"}
    if isinstance(auth, BasicAuth):
        password = expand_env(auth.password)
        pair = base64.b64encode(f"{expand_env(auth.username)}:{password}".encode()).decode()
        register(password)
        register(pair)
        return {"Authorization": f"Basic {pair}"}
    return {}


def expanded(headers: Mapping[str, str], credentials: bool = True) -> dict[str, str]:
    """Configured headers with `${env:NAME}` read; `credentials=False` leaves out those that
    carry a credential (by name, or by a value read from the environment). Credential values
    are registered for masking."""
    out = {}
    for name, configured in headers.items():
        secret = is_credential_header(name, configured)
        if secret and not credentials:
            continue
        try:
            out[name] = expand_env(configured)
        except SourceError as exc:  # a missing environment variable
            raise ValueError(f"headers: {exc}") from exc
        if secret:
            register(out[name])
    return out


def absolute_url(url: str, base_url: str) -> str:
    if url.startswith(("http://", "https://")):
        return url
    if not base_url:
        raise ValueError(f"url {url!r} is relative and the http resource has no base_url")
    return f"{base_url.rstrip('/')}/{url.lstrip('/')}"


def http_resource(ctx: TaskContext) -> Any:
    resource = ctx.resources.get("http")
    if resource is None:
        raise ValueError("the http task needs the `http` resource (HttpResource) in "
                         "ctx.resources")
    return resource


def refused(target: str, allowed: set[str]) -> HostNotAllowedError:
    known = ", ".join(sorted(allowed)) or "none: the http resource has no base_url"
    return HostNotAllowedError(
        f"{target} is not an origin this phase may call (trusted: {known}); add {target!r} "
        "to the http resource's allowed_origins to call it with the resource's headers, or "
        "set the phase param `other_origins: without_credentials` to call it without any "
        "credentials")


def make_handler(params: HttpParams, base_dir: Path) -> Handler:
    env = template_env()
    url_template = compile_template(env, params.url, "url")
    body = compile_value(env, params.json_body, "json_body") if params.json_body else None
    spelled_out = written_origin(params.url)

    def request_headers(resource: Any, target: str) -> dict[str, str]:
        """Which credentials go to `target`: the resource's only to its own origins, the
        phase's also to the origin its `url` spells out, none anywhere else."""
        trusted = resource.trusted_origins()
        if target in trusted:
            return {**expanded(resource.headers), **expanded(params.headers),
                    **auth_headers(params.auth)}
        if target == spelled_out:
            return {**expanded(params.headers), **auth_headers(params.auth)}
        if params.other_origins == "without_credentials":
            return expanded(params.headers, credentials=False)
        raise refused(target, trusted | ({spelled_out} if spelled_out else set()))

    def request(item: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        resource = http_resource(ctx)
        variables = template_vars(item, ctx)
        url = absolute_url(render(url_template, variables, "url"), resource.base_url)
        headers = request_headers(resource, origin(url))
        timeout = params.timeout_s or resource.timeout_s
        response = resource.client().request(
            params.method, url, headers=headers, timeout=timeout,
            json=body(variables) if body else None)
        check_status(response, params.expected_status)
        output: dict[str, Any] = {f"{ctx.phase}_status": response.status_code}
        if params.response_fields:
            try:
                data = response.json()
            except ValueError as exc:
                raise ValueError(mask(f"{params.method} {url}: the response is not JSON "
                                      f"({response.text[:100]!r})")) from exc
            for field, path in params.response_fields.items():
                try:
                    output[field] = dig(data, path)
                except SourceError as exc:
                    raise ValueError(f"response_fields.{field}: {exc}") from exc
        return output

    return request
