"""The REST API (FastAPI): launches, their status, items and analytics, and run control over
HTTP, behind bearer tokens with per-token quotas. A thin layer over batch_defs.client; every
route, the OpenAPI document included, refuses a missing or wrong token (docs/api.md)."""

# No `from __future__ import annotations`: FastAPI reads the annotations of routes defined
# inside functions (the bearer scheme, the reference parameter), which strings would hide.
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator

from batch_defs.api.auth import Quotas, Token, TokenBook
from batch_defs.api.models import (
    Analytics,
    BatchInfo,
    DeleteResult,
    ItemResult,
    LaunchInfo,
    LaunchState,
    Page,
    RunStatus,
)
from batch_defs.spec import NAME_PATTERN

MAX_ITEMS = 10_000  # items in one launch request
MAX_PAGE = 1_000  # rows in one page of a list
LAUNCH_ID_PATTERN = r"^[a-z][a-z0-9_]*\.[0-9a-f]{16}$"
# Partition keys made over HTTP: one safe path segment (outputs live under <partition>/).
PARTITION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:@+=-]{0,254}$"
LaunchId = Annotated[str, Path(pattern=LAUNCH_ID_PATTERN,
                               description="A launch id: <batch>.<16 hex digits>")]


class LaunchRequest(BaseModel):
    """A launch of a batch over the items given (else the batch's own source)."""

    model_config = ConfigDict(extra="forbid")

    batch: str = Field(pattern=NAME_PATTERN)
    items: list[dict[str, Any]] | None = Field(
        default=None, max_length=MAX_ITEMS,
        description=f"Up to {MAX_ITEMS:,} items, each an object with the batch's key field")
    partition: str | None = Field(default=None, pattern=PARTITION_PATTERN,
                                  description="Default: the time, with a random suffix")
    sets: list[str] = Field(
        default_factory=list, description="Overrides of options only, KEY=VALUE, e.g. "
        "options.concurrency=4 (sources and task params are the server's)")
    start: bool = Field(default=True, description="false: create only (start it later)")

    @field_validator("sets")
    @classmethod
    def _options_only(cls, sets: list[str]) -> list[str]:
        # A token holder may tune a run, not rewrite the batch: a source or a task's params
        # (a shell command, a SQL URL) set over HTTP would run anything on the server.
        for assignment in sets:
            if not assignment.strip().startswith("options."):
                raise ValueError(f"{assignment!r}: only options.* may be set over the API")
        return sets


class Problem(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No token, or a wrong one"},
    429: {"model": Problem, "description": "The token's quota is used up; see Retry-After"},
}


def client_of(request: Request) -> Any:
    return request.app.state.client


Client = Annotated[Any, Depends(client_of)]


def create_app(tokens: TokenBook, quotas: Quotas,
               client_factory: Callable[[], Any] | None = None) -> FastAPI:
    """The app; `client_factory` (default BatchClient) is called once, at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from batch_defs.client import BatchClient

        app.state.client = (client_factory or BatchClient)()
        try:
            yield
        finally:
            app.state.client.close()

    bearer = HTTPBearer(auto_error=False, description="A token of the API's tokens file "
                        "or BATCH_DEFS_API_TOKENS")

    def authorize(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Depends(bearer)]) -> Token:
        token = tokens.verify(credentials.credentials) if credentials else None
        if token is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "a valid bearer token is needed",
                                headers={"WWW-Authenticate": "Bearer"})
        wait = quotas.retry_after(token)
        if wait is not None:
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                                f"quota of token {token.name!r} used up; retry in {wait}s",
                                headers={"Retry-After": str(wait)})
        return token

    app = FastAPI(title="batch-defs", version="1.0.0", lifespan=lifespan,
                  description="Launch batches and follow them: docs/api.md",
                  openapi_url=None, docs_url=None, redoc_url=None,
                  dependencies=[Depends(authorize)], responses=ERRORS)
    add_error_handlers(app)
    add_routes(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    from batch_defs.client import NotFoundError
    from batch_defs.control import ControlError
    from batch_defs.loader import SpecError
    from batch_defs.sources import SourceError

    def problem(code: int) -> Callable[[Request, Exception], Any]:
        async def handler(_request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=code)
        return handler

    # Most specific first: Starlette picks the handler by the exception's class order.
    app.add_exception_handler(NotFoundError, problem(404))
    app.add_exception_handler(ControlError, problem(409))
    app.add_exception_handler(SpecError, problem(422))
    app.add_exception_handler(SourceError, problem(422))


def add_routes(app: FastAPI) -> None:
    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/v1/batches", tags=["batches"])
    def list_batches(client: Client) -> list[BatchInfo]:
        """The batches of the server's BATCH_DEFS_PATH; those that do not load, with why."""
        return client.batches()

    @app.post("/v1/launches", status_code=201, tags=["launches"],
              responses={404: {"model": Problem}, 409: {"model": Problem},
                         422: {"model": Problem}})
    def create_launch(request: LaunchRequest, client: Client) -> LaunchInfo:
        """Create a launch (a partition of the batch and its items) and start it, unless
        `start` is false."""
        return client.create(request.batch, request.items, partition=request.partition,
                             sets=request.sets, start=request.start)

    @app.get("/v1/launches", tags=["launches"])
    def list_launches(
            client: Client, batch: Annotated[str | None, Query(pattern=NAME_PATTERN)] = None,
            state: Annotated[list[LaunchState] | None, Query()] = None,
            since: Annotated[datetime | None, Query(description="Made at or after")] = None,
            until: Annotated[datetime | None, Query(description="Made before")] = None,
            offset: Annotated[int, Query(ge=0)] = 0,
            limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> Page[LaunchInfo]:
        """Launches, newest first, filtered by batch, state and date range, a page at a
        time."""
        return client.launches(batch, [s.value for s in state or []], since, until, offset,
                               limit)

    @app.get("/v1/launches/{launch_id}", tags=["launches"],
             responses={404: {"model": Problem}})
    def get_launch(launch_id: LaunchId, client: Client) -> LaunchInfo:
        return client.get_launch(launch_id)

    @app.post("/v1/launches/{launch_id}/start", status_code=202, tags=["launches"],
              responses={404: {"model": Problem}, 409: {"model": Problem}})
    def start_launch(launch_id: LaunchId, client: Client) -> LaunchInfo:
        """Start a launch created with `start: false` (or start an ended one again)."""
        return client.start(launch_id)

    @app.post("/v1/launches/{launch_id}/resume", status_code=202, tags=["control"],
              responses={404: {"model": Problem}, 409: {"model": Problem}})
    def resume_launch(launch_id: LaunchId, client: Client) -> LaunchInfo:
        """Continue the latest run: only items not yet succeeded run again."""
        return client.resume(launch_id)

    @app.post("/v1/launches/{launch_id}/pause", tags=["control"],
              responses={404: {"model": Problem}, 409: {"model": Problem}})
    def pause_launch(launch_id: LaunchId, client: Client) -> RunStatus:
        """Stop starting items; in-flight items finish and are recorded."""
        client.pause(launch_id)
        return client.run_status(launch_id)

    @app.post("/v1/launches/{launch_id}/cancel", tags=["control"],
              responses={404: {"model": Problem}, 409: {"model": Problem}})
    def cancel_launch(launch_id: LaunchId, client: Client,
                      grace_s: Annotated[float, Query(ge=0, le=300)] = 30.0) -> RunStatus:
        """Stop starting items, give in-flight ones `grace_s` seconds, then end the run."""
        client.cancel(launch_id, grace_s)
        return client.run_status(launch_id)

    @app.delete("/v1/launches/{launch_id}", tags=["launches"],
                responses={404: {"model": Problem}, 409: {"model": Problem}})
    def delete_launch(launch_id: LaunchId, client: Client,
                      confirm: Annotated[bool, Query(description="Must be true")] = False
                      ) -> DeleteResult:
        """Delete a launch: its ledger rows, output files and Dagster partition."""
        return client.delete(launch_id, confirm=confirm)

    for kind, parameter in (("launches", LaunchId), ("runs", Annotated[str, Path(
            description="A run id, or a unique prefix of one")])):
        add_reading_routes(app, kind, parameter)


def add_reading_routes(app: FastAPI, kind: str, parameter: Any) -> None:
    """Status, items and analytics of a launch (its latest run) or of any run."""
    what = "the launch's latest run" if kind == "launches" else "the run"

    def run_status(ref: parameter, client: Client) -> RunStatus:  # type: ignore[valid-type]
        return client.run_status(ref)

    def items(ref: parameter, client: Client,  # type: ignore[valid-type]
              status: Annotated[list[str] | None, Query(
                  description="Final statuses (or, with phase, the statuses in it)")] = None,
              phase: str | None = None, offset: Annotated[int, Query(ge=0)] = 0,
              limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> Page[ItemResult]:
        return client.items(ref, status or [], phase, offset, limit)

    def analytics(ref: parameter, client: Client) -> Analytics:  # type: ignore[valid-type]
        return client.analytics(ref)

    name = "launch" if kind == "launches" else "run"
    for suffix, endpoint, summary in (
            ("status", run_status, f"Counts, percent, ETA, current phase and cost of {what}"),
            ("items", items, f"Items of {what} with their outcome per phase, a page at a time"),
            ("analytics", analytics, f"Per phase: success rate, durations and cost of {what}")):
        app.add_api_route(f"/v1/{kind}/{{ref}}/{suffix}", endpoint, methods=["GET"],
                          tags=[kind if kind == "runs" else "launches"],
                          operation_id=f"{name}_{suffix}", summary=summary,
                          responses={404: {"model": Problem}})


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document, as the server serves it (docs/openapi.json)."""
    return create_app(TokenBook([]), Quotas()).openapi()
