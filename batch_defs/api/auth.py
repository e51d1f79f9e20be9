"""API tokens: given in an environment variable or a file, kept only as salted scrypt hashes,
compared in constant time; and per-token request quotas (a moving window).

    python -m batch_defs.api.auth add NAME [--quota 120/minute] [--file PATH]

adds a token to the tokens file (default DAGSTER_HOME/api_tokens) and prints it, once.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TOKENS_ENV = "BATCH_DEFS_API_TOKENS"  # NAME=TOKEN[,NAME=TOKEN...] (or bare tokens)
TOKENS_FILE_ENV = "BATCH_DEFS_API_TOKENS_FILE"
TOKENS_FILE = "api_tokens"  # in DAGSTER_HOME: NAME scrypt$N$r$p$SALT$HASH [QUOTA] per line
DEFAULT_QUOTA = "600/minute"
# scrypt's cost: ~16 MiB and some tens of ms per check; a verified token is remembered by
# its SHA-256, so only the first request of a token (and every wrong one) pays it.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


class TokenConfigError(ValueError):
    """A tokens file or variable that cannot be read; names the file and line."""


@dataclass(frozen=True)
class Token:
    """A token as stored: its name, salt and scrypt hash, and its quota (e.g. 60/minute)."""

    name: str
    salt: bytes
    digest: bytes
    quota: str | None = None
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    def matches(self, presented: str) -> bool:
        candidate = hashlib.scrypt(presented.encode(), salt=self.salt, n=self.n, r=self.r,
                                   p=self.p, dklen=len(self.digest), maxmem=64 * 2**20)
        return hmac.compare_digest(candidate, self.digest)

    def line(self) -> str:
        stored = f"scrypt${self.n}${self.r}${self.p}${self.salt.hex()}${self.digest.hex()}"
        return " ".join([self.name, stored, *([self.quota] if self.quota else [])])


def hash_token(name: str, token: str, quota: str | None = None) -> Token:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(token.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=32, maxmem=64 * 2**20)
    return Token(name, salt, digest, quota)


def parse_line(line: str, where: str) -> Token:
    parts = line.split()
    if len(parts) not in (2, 3):
        raise TokenConfigError(f"{where}: expected NAME scrypt$N$r$p$SALT$HASH [QUOTA]")
    name, stored, *quota = parts
    fields = stored.split("$")
    try:
        if len(fields) != 6 or fields[0] != "scrypt":
            raise ValueError("not scrypt$N$r$p$SALT$HASH")
        n, r, p = (int(x) for x in fields[1:4])
        token = Token(name, bytes.fromhex(fields[4]), bytes.fromhex(fields[5]),
                      quota[0] if quota else None, n, r, p)
    except ValueError as exc:
        raise TokenConfigError(f"{where}: token {name!r}: {exc}") from exc
    if token.quota:
        check_quota(token.quota, where)
    return token


def check_quota(quota: str, where: str) -> None:
    from limits import parse

    try:
        parse(quota)
    except ValueError as exc:
        raise TokenConfigError(f"{where}: quota {quota!r} is not like 120/minute") from exc


def read_tokens_file(path: Path) -> list[Token]:
    tokens = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            tokens.append(parse_line(line, f"{path}:{number}"))
    return tokens


def tokens_from_env(value: str) -> list[Token]:
    """Tokens given in plain text (as a secret store sets variables): hashed on reading."""
    tokens = []
    for index, entry in enumerate(e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, sep, token = entry.partition("=")
        if not sep:
            name, token = f"token{index + 1}", entry
        if not token:
            raise TokenConfigError(f"{TOKENS_ENV}: entry {index + 1} has an empty token")
        tokens.append(hash_token(name.strip(), token.strip()))
    return tokens


def default_tokens_file() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or ".dagster_home") / TOKENS_FILE


def load_tokens(file: Path | None = None) -> list[Token]:
    """$BATCH_DEFS_API_TOKENS, and the tokens file ($BATCH_DEFS_API_TOKENS_FILE, else
    DAGSTER_HOME/api_tokens) if it exists."""
    tokens = tokens_from_env(os.environ.get(TOKENS_ENV, ""))
    path = file or Path(os.environ.get(TOKENS_FILE_ENV) or default_tokens_file())
    if path.exists():
        tokens += read_tokens_file(path)
    return tokens


def add_token(path: Path, name: str, quota: str | None = None) -> str:
    """A new random token: its hash appended to the file; the token itself is returned."""
    if not name or any(c.isspace() for c in name):
        raise TokenConfigError(f"token name {name!r}: one word, no spaces")
    if quota:
        check_quota(quota, str(path))
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(hash_token(name, token, quota).line() + "\n")
    path.chmod(0o600)
    return token


class TokenBook:
    """Checks presented tokens; remembers verified ones by their SHA-256, never in clear."""

    def __init__(self, tokens: Iterable[Token]):
        self.tokens = list(tokens)
        self._verified: dict[bytes, Token] = {}
        self._lock = threading.Lock()

    def verify(self, presented: str) -> Token | None:
        fingerprint = hashlib.sha256(presented.encode()).digest()
        with self._lock:
            known = self._verified.get(fingerprint)
        if known is not None:
            return known
        found = None
        for token in self.tokens:  # every stored token is tried: the time tells nothing
            if token.matches(presented) and found is None:
                found = token
        if found is not None:
            with self._lock:
                self._verified[fingerprint] = found
        return found


class Quotas:
    """Requests per token in a moving window (the `limits` library); how long to wait."""

    def __init__(self, default: str = DEFAULT_QUOTA):
        from limits import parse, storage, strategies

        check_quota(default, "--quota")
        self.parse = parse
        self.default = default
        self.limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def retry_after(self, token: Token) -> int | None:
        """None if the request may go; else whole seconds until it may."""
        item = self.parse(token.quota or self.default)
        if self.limiter.hit(item, token.name):
            return None
        stats = self.limiter.get_window_stats(item, token.name)
        return max(1, math.ceil(stats.reset_time - time.time()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batch_defs.api.auth",
                                     description="Manage batch-defs API tokens.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="Add a token; prints it once (only its hash is kept).")
    add.add_argument("name")
    add.add_argument("--quota", help="Requests allowed, e.g. 120/minute (default: the "
                                     "server's --quota)")
    add.add_argument("--file", type=Path, help="Tokens file (default: DAGSTER_HOME/api_tokens)")
    args = parser.parse_args(argv)
    path = args.file or Path(os.environ.get(TOKENS_FILE_ENV) or default_tokens_file())
    try:
        print(add_token(path, args.name, args.quota))
    except TokenConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"added token {args.name!r} to {path}; keep it: it is not shown again",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
