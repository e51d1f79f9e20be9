"""The secret values this process knows, masked as `***` wherever errors are stored or shown."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any, overload
from urllib.parse import quote, unquote, urlsplit

from batch_defs.env import MissingVariableError, expand_env

MASK = "***"
MIN_LENGTH = 4  # shorter values would mask ordinary words and digits

# Header names that carry credentials whatever their value; any header whose configured value
# reads the environment (`${env:...}`) counts as one too.
_CREDENTIAL_HEADER = re.compile(
    r"authorization|cookie|key|token|secret|passw|session|signature|credential", re.IGNORECASE)
# Resource fields holding a secret by name (SmtpResource.password, LlmResource.api_key, ...).
_SECRET_FIELD = re.compile(r"(password|passwd|secret|token|api_?key)$", re.IGNORECASE)

_lock = threading.Lock()
_values: set[str] = set()
_pattern: re.Pattern[str] | None = None


def register(value: str | None) -> None:
    """Mask `value` from now on, with its percent-encoded form (as it appears in URLs) and its
    JSON-escaped form (as it appears in stored JSON such as the ledger's attempt_log)."""
    global _pattern
    if not value or len(value) < MIN_LENGTH:
        return
    with _lock:
        new = {value, quote(value, safe=""), json.dumps(value)[1:-1]} - _values
        if not new:
            return
        _values.update(new)
        # Longest first: a secret that contains another is masked whole.
        ordered = sorted(_values, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(v) for v in ordered))


@overload
def mask(text: str) -> str: ...


@overload
def mask(text: None) -> None: ...


def mask(text: str | None) -> str | None:
    """`text` with every registered secret replaced by `***`."""
    pattern = _pattern  # one read: a concurrent register() swaps in a complete new pattern
    if not text or pattern is None:
        return text
    return pattern.sub(MASK, text)


def register_url(url: str | None) -> None:
    """The password of a URL (`postgresql://user:PASSWORD@host/db`), raw and decoded."""
    if not url or "@" not in url:
        return
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL: nothing to find
        return
    if password:
        register(password)
        register(unquote(password))


def is_credential_header(name: str, configured_value: str) -> bool:
    """Whether a header carries a credential: by its name, or by a value read from the
    environment (`X-Tenant: ${env:TENANT_KEY}`)."""
    return bool(_CREDENTIAL_HEADER.search(name)) or "${env:" in configured_value


def register_headers(headers: Mapping[str, str]) -> None:
    """The values of the credential headers among `headers` (as configured, `${env:...}`
    expanded; a variable that is not set has nothing to mask)."""
    for name, value in headers.items():
        if is_credential_header(name, value):
            try:
                expanded = expand_env(value)
            except MissingVariableError:
                continue
            register(expanded)
            # `Bearer TOKEN`: servers often echo the token alone.
            register(expanded.partition(" ")[2].strip())


def register_resources(resources: Iterable[Any]) -> None:
    """Every secret the given Dagster resources hold: fields named like a password, key or
    token, the password of every `*url` field, credential `headers`, and what a resource's
    `bearer_token()` returns (LlmResource falls back to $OPENAI_API_KEY there)."""
    for resource in resources:
        for name in getattr(type(resource), "model_fields", {}):
            value = getattr(resource, name, None)
            if isinstance(value, str) and _SECRET_FIELD.search(name):
                register(value)
            elif isinstance(value, str) and name.endswith("url"):
                register_url(value)
            elif name == "headers" and isinstance(value, Mapping):
                register_headers(value)
        bearer_token = getattr(resource, "bearer_token", None)
        if callable(bearer_token):
            register(bearer_token())


def _configured(value: Any) -> Any:
    """A run config value, with Dagster's `{env: NAME}` (dg.EnvVar) read from the environment."""
    if isinstance(value, Mapping) and set(value) == {"env"}:
        return os.environ.get(str(value["env"]))
    return value


def register_run_config(run_config: Mapping[str, Any] | None) -> None:
    """The secrets in a run's resource config, for processes that show a run without having
    executed it (`batch-defs report`): the same fields register_resources looks at."""
    resources = (run_config or {}).get("resources")
    for entry in (resources.values() if isinstance(resources, Mapping) else ()):
        config = entry.get("config") if isinstance(entry, Mapping) else None
        if not isinstance(config, Mapping):
            continue
        for name, raw in config.items():
            value = _configured(raw)
            if isinstance(value, str) and _SECRET_FIELD.search(name):
                register(value)
            elif isinstance(value, str) and name.endswith("url"):
                register_url(value)
            elif name == "headers" and isinstance(value, Mapping):
                register_headers({str(k): str(_configured(v) or "") for k, v in value.items()})
