"""Readers for SQL databases (SQLAlchemy, bound parameters only) and HTTP APIs (httpx)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import tenacity

from batch_defs.env import expand_env, resolve_url
from batch_defs.sources import (
    RawRecord,
    SourceError,
    dig,
    field_names,
    json_type,
    record_problem,
)


def read_sql(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    engine = sa.create_engine(resolve_url(spec.url, base_dir))
    try:
        with engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=1000).execute(
                sa.text(spec.query), spec.params)
            names = field_names("query result", list(result.keys()), spec.columns)
            for row, values in enumerate(result, start=1):
                yield RawRecord(row, dict(zip(names, values, strict=True)))
    except sa.exc.OperationalError as exc:
        raise SourceError(f"database {engine.url.render_as_string(hide_password=True)}: "
                          f"{exc.orig}") from exc
    except sa.exc.SQLAlchemyError as exc:
        raise SourceError(f"query failed: {exc}") from exc
    finally:
        engine.dispose()


RETRY_STATUSES = {429, 500, 502, 503, 504}


class RetryableStatusError(Exception):
    def __init__(self, response: httpx.Response):
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _fetch(client: httpx.Client, spec: Any, url: str, params: dict[str, Any],
           page: int) -> httpx.Response:
    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        asked = (retry_after_seconds(exc.response.headers.get("Retry-After"))
                 if isinstance(exc, RetryableStatusError) else None)
        if asked is not None:
            return min(asked, 60.0)
        return min(spec.backoff_s * 2 ** (state.attempt_number - 1), 30.0)

    @tenacity.retry(
        retry=tenacity.retry_if_exception_type((RetryableStatusError, httpx.TransportError)),
        wait=wait, stop=tenacity.stop_after_attempt(spec.max_attempts), reraise=True,
    )
    def attempt() -> httpx.Response:
        response = client.request(spec.method, url, params=params, json=spec.body)
        if response.status_code in RETRY_STATUSES:
            raise RetryableStatusError(response)
        return response

    where = f"{url} (page {page})"
    try:
        response = attempt()
    except RetryableStatusError as exc:
        raise SourceError(f"{where}: HTTP {exc.response.status_code} after "
                          f"{spec.max_attempts} attempts") from exc
    except httpx.TransportError as exc:
        raise SourceError(f"{where}: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 400:
        raise SourceError(f"{where}: HTTP {response.status_code}: {response.text[:200]}")
    return response


def read_http(spec: Any, base_dir: Path) -> Iterator[RawRecord]:
    headers = {k: expand_env(v) for k, v in spec.headers.items()}
    pagination = spec.pagination
    url: str | None = expand_env(spec.url)
    params = dict(spec.params)
    if pagination and pagination.type == "page":
        params[pagination.param or "page"] = params.get(pagination.param or "page", 1)
    if pagination and pagination.page_size:
        params[pagination.size_param or "per_page"] = pagination.page_size
    row = 0
    with httpx.Client(headers=headers, timeout=spec.timeout_s, follow_redirects=True) as client:
        for page in range(1, (pagination.max_pages if pagination else 1) + 1):
            if url is None:
                return
            response = _fetch(client, spec, url, params, page)
            try:
                body = response.json()
            except RecursionError as exc:
                raise SourceError(f"{url} page {page}: response nested too deeply") from exc
            except ValueError as exc:  # a 4300-digit integer is refused here too
                raise SourceError(f"{url} page {page}: response is not JSON") from exc
            try:
                records = dig(body, spec.records)
            except SourceError as exc:
                raise SourceError(f"{url} page {page}: {exc}") from exc
            if not isinstance(records, list):
                raise SourceError(f"{url} page {page}: expected a list of records")
            for data in records:
                row += 1
                problem = (record_problem(data) if isinstance(data, dict)
                           else f"record is {json_type(data)}, not an object")
                yield (RawRecord(row, None, f"page {page}: {problem}") if problem
                       else RawRecord(row, data))
            if not pagination or not records:
                return
            if pagination.type == "page":
                params[pagination.param or "page"] += 1
            elif pagination.type == "cursor":
                try:
                    cursor = dig(body, pagination.cursor_field or "next_cursor")
                except SourceError:  # the last page leaves the cursor out
                    return
                if not cursor:
                    return
                params[pagination.param or "cursor"] = cursor
            else:
                next_link = response.links.get("next", {}).get("url")
                url, params = (next_link, {}) if next_link else (None, params)
