"""`${env:NAME}` in spec values, and paths relative to a batch's folder: one place for both.

Secrets stay out of specs and run config: a value names the variable, read when it is used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV_REFERENCE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


class SourceError(RuntimeError):
    """The source as a whole cannot be read (missing file, refused connection, HTTP 500...)."""


class MissingVariableError(SourceError, ValueError):
    """An environment variable a spec names is not set. A SourceError where a source reads it,
    a ValueError (a failed attempt) where a task does."""


def env_names(text: str) -> set[str]:
    """The variables `text` names."""
    return {match.group(1) for match in ENV_REFERENCE.finditer(text)}


def expand_env(text: str) -> str:
    """`text` with each `${env:NAME}` replaced by the variable's value."""

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise MissingVariableError(f"environment variable {name} is not set")
        return os.environ[name]

    return ENV_REFERENCE.sub(lookup, text)


def resolve_path(path: str, base_dir: Path) -> Path:
    """A spec's path: variables expanded, `~` expanded, relative to the batch's folder."""
    resolved = Path(expand_env(path)).expanduser()
    return resolved if resolved.is_absolute() else (base_dir / resolved)


def resolve_url(url: str, base_dir: Path | None = None) -> str:
    """A database URL: variables expanded, and a relative SQLite path (`sqlite:///data/x.db`)
    made relative to the batch's folder, like every other path in a spec."""
    url = expand_env(url)
    prefix = "sqlite:///"
    if base_dir is None or not url.startswith(prefix) or url.startswith(prefix + "/"):
        return url
    path, sep, query = url.removeprefix(prefix).partition("?")
    if not path or path == ":memory:":
        return url
    return f"{prefix}{(base_dir / path).resolve()}{sep}{query}"


# Every command an item starts carries its run's id in this variable, and so does whatever
# the command starts in turn: a process the run had no time to record (killed between the
# spawn and the ledger write) or one that left its process group is still found by it.
RUN_ENV_MARKER = "BATCH_DEFS_RUN_ID"
