"""Runs the REST API with uvicorn: the tokens it accepts and the document it serves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch_defs.api.auth import TOKENS_FILE, Quotas, Token, TokenBook, add_token, load_tokens


@dataclass(frozen=True)
class CreatedToken:
    path: Path
    token: str


def tokens_for(tokens_file: Path | None, home: Path) -> tuple[list[Token], CreatedToken | None]:
    """The configured tokens; with none at all, one new token (so that a first `make ui`
    works), stored hashed in DAGSTER_HOME/api_tokens and returned once in clear."""
    tokens = load_tokens(tokens_file)
    if tokens:
        return tokens, None
    path = tokens_file or home / TOKENS_FILE
    token = add_token(path, "default")
    return load_tokens(path), CreatedToken(path, token)


def run(host: str, port: int, tokens: list[Token], quota: str) -> None:
    import uvicorn

    from batch_defs.api.app import create_app

    uvicorn.run(create_app(TokenBook(tokens), Quotas(quota)), host=host, port=port,
                log_level="warning")


def openapi_document() -> dict[str, Any]:
    from batch_defs.api.app import openapi_document as document

    return document()
