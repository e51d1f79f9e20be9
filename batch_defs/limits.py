"""Rate limits and concurrency limits that every worker sees, adaptive to HTTP 429.

A limit is a token bucket whose state lives where every process of every run reads it: the
ledger database (one atomic UPDATE per call), or Redis (one Lua script per call) when the batch
runs on celery workers. A call takes a token before each attempt; when none is left it is
promised the next free moment (the bucket goes into debt), so waiting callers need no polling
and the calls start evenly spaced. The capacity (`burst`) is small, 1 by default: after a
lull, at most `burst` calls start at once, and no second holds more than rate + burst starts.

Adaptive (AIMD): an attempt that fails with HTTP 429 or RateLimited lowers the rate to 70%
(at most once a second, as the calls already in flight answer 429 too); every success while
the rate is below the declared one raises it by 5% of that rate per second. Each back-off is
recorded in the limit's row (`batch_limit.state.history`) and in the run's log.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from batch_defs.ledger import Ledger, LimitRow

HOST = socket.gethostname()
DECREASE = 0.7  # a back-off keeps this share of the rate
COOLDOWN_S = 1.0  # one back-off per this many seconds: in-flight calls answer 429 too
INCREASE_SHARE = 0.05  # recovery per second, as a share of the declared rate
FLOOR_SHARE = 0.05  # a back-off never goes below this share of the declared rate
RECOVER_EVERY_S = 0.25  # how often one process writes a recovery
IDLE_RESET_S = 60.0  # a limit nobody used for this long starts again at its declared rate
HOLDER_TTL_S = 600.0  # a concurrency slot held this long by a process elsewhere is taken back
HISTORY = 50  # back-offs kept in a limit's state
LATE_SHARE = 0.5  # a caller later than this share of the interval gives its token back
MAX_REQUEUES = 20
_holders = itertools.count()


class RateLimited(Exception):  # noqa: N818 - the service's word, as HTTP 429 says it
    """Raise it from a handler when the service says to slow down: the phase's rate and its
    shared limit back off (with `retry`, the item is tried again later)."""

    def __init__(self, message: str = "rate limited", retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def is_rate_limited(exc: BaseException | None) -> bool:
    """RateLimited, or an HTTP error whose status is 429 (the http task's, httpx's)."""
    if exc is None:
        return False
    if isinstance(exc, RateLimited):
        return True
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", None)
    return status == 429


@dataclass(frozen=True)
class Bucket:
    """One limit as a caller declares it: a run's phase rate or a shared named limit."""

    name: str  # stored under this name: the limit's name, or run:<run id>:<phase>
    label: str  # how people know it: `limit smtp`, `phase send`
    rate_per_s: float | None = None  # None: no rate, only concurrency
    burst: int = 1
    concurrency: int | None = None
    adaptive: bool = True

    @property
    def floor(self) -> float:
        return (self.rate_per_s or 0.0) * FLOOR_SHARE

    def fresh_state(self) -> dict[str, Any]:
        return {"ceiling": self.rate_per_s, "burst": self.burst, "holders": {},
                "decreases": 0, "history": []}


@dataclass(frozen=True)
class Backoff:
    """A back-off that happened: the limit's rate before and after, and why."""

    bucket: Bucket
    before: float
    after: float
    reason: str


class LimitStore(Protocol):
    """Where buckets live; every operation is atomic across processes."""

    def prepare(self, bucket: Bucket) -> None: ...

    def reserve(self, bucket: Bucket) -> tuple[float, float]: ...

    def backoff(self, bucket: Bucket, reason: str) -> Backoff | None: ...

    def recover(self, bucket: Bucket, increase: float) -> float | None: ...

    def set_rate(self, bucket: Bucket) -> None: ...

    def enter(self, bucket: Bucket, holder: str) -> bool: ...

    def leave(self, bucket: Bucket, holder: str) -> None: ...


def _live_holders(holders: dict[str, Any], now: float) -> dict[str, Any]:
    """Holders whose process still exists (this host) or that are recent (elsewhere)."""
    from batch_defs.control import pid_alive

    kept = {}
    for holder, (host, pid, since) in holders.items():
        alive = pid_alive(int(pid)) if host == HOST else now - float(since) < HOLDER_TTL_S
        if alive:
            kept[holder] = [host, pid, since]
    return kept


def backed_off(bucket: Bucket, rate: float, state: dict[str, Any], now: float,
               reason: str) -> tuple[float, dict[str, Any]] | None:
    """AIMD's decrease, unless one happened within the cooldown (the same burst of 429s)."""
    if now - float(state.get("last_decrease_at") or 0.0) < COOLDOWN_S:
        return None
    lowered = max(bucket.floor, rate * DECREASE)
    event = {"at": round(now, 3), "from": round(rate, 3), "to": round(lowered, 3), "why": reason}
    return lowered, {**state, "last_decrease_at": now,
                     "decreases": int(state.get("decreases", 0)) + 1,
                     "history": [*state.get("history", []), event][-HISTORY:]}


class LedgerLimitStore:
    """Buckets in the ledger database (table batch_limit)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def prepare(self, bucket: Bucket) -> None:
        if bucket.name.startswith("run:"):
            self.ledger.forget_limits("run:", idle_s=86_400)
        self.ledger.prepare_limit(bucket.name, bucket.rate_per_s or 0.0, float(bucket.burst),
                                  bucket.fresh_state())
        now = time.time()

        def declared(row: LimitRow) -> tuple[float, dict[str, Any]] | None:
            # The last run to start sets a shared limit's rate; an idle one forgets back-offs.
            state = row.state
            changed = (state.get("ceiling") != bucket.rate_per_s
                       or state.get("burst") != bucket.burst)
            if not changed and now - row.updated_at < IDLE_RESET_S:
                return None
            return bucket.rate_per_s or 0.0, {**state, "ceiling": bucket.rate_per_s,
                                              "burst": bucket.burst}

        self.ledger.adapt_limit(bucket.name, declared)

    def reserve(self, bucket: Bucket) -> tuple[float, float]:
        return self.ledger.reserve_token(bucket.name)

    def backoff(self, bucket: Bucket, reason: str) -> Backoff | None:
        seen: list[float] = []

        def lower(row: LimitRow) -> tuple[float, dict[str, Any]] | None:
            seen[:] = [row.rate_per_s]
            return backed_off(bucket, row.rate_per_s, row.state, time.time(), reason)

        after = self.ledger.adapt_limit(bucket.name, lower)
        if after is None or not seen or after.rate_per_s == seen[0]:
            return None
        return Backoff(bucket, seen[0], after.rate_per_s, reason)

    def recover(self, bucket: Bucket, increase: float) -> float | None:
        return self.ledger.recover_limit(bucket.name, increase, bucket.rate_per_s or 0.0)

    def set_rate(self, bucket: Bucket) -> None:
        self.ledger.adapt_limit(bucket.name, lambda row: (
            bucket.rate_per_s or 0.0, {**row.state, "ceiling": bucket.rate_per_s}))

    def enter(self, bucket: Bucket, holder: str) -> bool:
        entered: list[bool] = []

        def take(row: LimitRow) -> tuple[float, dict[str, Any]] | None:
            now = time.time()
            holders = row.state.get("holders", {})
            alive = _live_holders(holders, now)
            full = len(alive) >= (bucket.concurrency or 0)
            entered[:] = [not full]
            if full:
                return None if alive == holders else (row.rate_per_s,
                                                      {**row.state, "holders": alive})
            return row.rate_per_s, {**row.state, "holders": {
                **alive, holder: [HOST, os.getpid(), round(now, 3)]}}

        self.ledger.adapt_limit(bucket.name, take)
        return bool(entered and entered[0])

    def leave(self, bucket: Bucket, holder: str) -> None:
        def drop(row: LimitRow) -> tuple[float, dict[str, Any]] | None:
            holders = row.state.get("holders", {})
            if holder not in holders:
                return None
            return row.rate_per_s, {**row.state, "holders": {
                k: v for k, v in holders.items() if k != holder}}

        self.ledger.adapt_limit(bucket.name, drop)


# Redis: the same operations, each one Lua script (atomic on the server), on the server's clock.
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000 "
_PREPARE = _NOW + """
local k = KEYS[1]
if redis.call('EXISTS', k) == 0 then
  redis.call('HSET', k, 'tokens', ARGV[2], 'updated_at', now, 'rate', ARGV[1],
             'capacity', ARGV[2], 'ceiling', ARGV[1], 'last_decrease_at', 0, 'decreases', 0)
  return 1
end
local ceiling = redis.call('HGET', k, 'ceiling')
local idle = now - tonumber(redis.call('HGET', k, 'updated_at'))
if ceiling ~= ARGV[1] or idle > tonumber(ARGV[3]) then
  redis.call('HSET', k, 'rate', ARGV[1], 'ceiling', ARGV[1])
end
redis.call('HSET', k, 'capacity', ARGV[2])
return 0
"""
_RESERVE = _NOW + """
local k = KEYS[1]
local h = redis.call('HMGET', k, 'tokens', 'updated_at', 'rate', 'capacity')
local tokens, updated = tonumber(h[1]), tonumber(h[2])
local rate, capacity = tonumber(h[3]), tonumber(h[4])
if now > updated then tokens = tokens + (now - updated) * rate; updated = now end
if tokens > capacity then tokens = capacity end
tokens = tokens - 1
redis.call('HSET', k, 'tokens', tokens, 'updated_at', updated)
return {tostring(tokens), tostring(rate)}
"""
_BACKOFF = _NOW + """
local k = KEYS[1]
local h = redis.call('HMGET', k, 'rate', 'last_decrease_at')
local rate, last = tonumber(h[1]), tonumber(h[2])
if now - last < tonumber(ARGV[3]) then return {tostring(rate), tostring(rate), tostring(now)} end
local lowered = math.max(tonumber(ARGV[2]), rate * tonumber(ARGV[1]))
redis.call('HSET', k, 'rate', lowered, 'last_decrease_at', now)
redis.call('HINCRBY', k, 'decreases', 1)
return {tostring(rate), tostring(lowered), tostring(now)}
"""
_RECOVER = """
local k = KEYS[1]
local rate = tonumber(redis.call('HGET', k, 'rate'))
local ceiling = tonumber(ARGV[2])
if rate >= ceiling then return nil end
rate = math.min(ceiling, rate + tonumber(ARGV[1]))
redis.call('HSET', k, 'rate', rate)
return tostring(rate)
"""
_ENTER = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
return 1
"""


class RedisLimitStore:
    """Buckets in Redis (the celery executor's broker): hashes `batch_defs:limit:<name>`,
    holders in sorted sets `...:holders` that expire, back-offs in lists `...:history`."""

    def __init__(self, url: str, ledger: Ledger | None = None):
        import redis

        self.client = redis.Redis.from_url(url)
        self.ledger = ledger  # back-offs are recorded in the ledger as well
        self._scripts = {name: self.client.register_script(source) for name, source in
                         {"prepare": _PREPARE, "reserve": _RESERVE, "backoff": _BACKOFF,
                          "recover": _RECOVER, "enter": _ENTER}.items()}

    @staticmethod
    def key(bucket: Bucket) -> str:
        return f"batch_defs:limit:{bucket.name}"

    def prepare(self, bucket: Bucket) -> None:
        self._scripts["prepare"](keys=[self.key(bucket)],
                                 args=[repr(bucket.rate_per_s or 0.0), repr(float(bucket.burst)),
                                       IDLE_RESET_S])
        if self.ledger is not None:
            self.ledger.prepare_limit(bucket.name, bucket.rate_per_s or 0.0,
                                      float(bucket.burst), bucket.fresh_state())

    def reserve(self, bucket: Bucket) -> tuple[float, float]:
        tokens, rate = self._scripts["reserve"](keys=[self.key(bucket)])
        return float(tokens), float(rate)

    def backoff(self, bucket: Bucket, reason: str) -> Backoff | None:
        before, after, now = (float(v) for v in self._scripts["backoff"](
            keys=[self.key(bucket)], args=[DECREASE, bucket.floor, COOLDOWN_S]))
        if after == before:
            return None
        event = {"at": round(now, 3), "from": round(before, 3), "to": round(after, 3),
                 "why": reason}
        self.client.rpush(self.key(bucket) + ":history", json.dumps(event))
        self.client.ltrim(self.key(bucket) + ":history", -HISTORY, -1)
        if self.ledger is not None:
            self.ledger.adapt_limit(bucket.name, lambda row: (after, {
                **row.state, "last_decrease_at": now,
                "decreases": int(row.state.get("decreases", 0)) + 1,
                "history": [*row.state.get("history", []), event][-HISTORY:]}))
        return Backoff(bucket, before, after, reason)

    def recover(self, bucket: Bucket, increase: float) -> float | None:
        rate = self._scripts["recover"](keys=[self.key(bucket)],
                                        args=[increase, bucket.rate_per_s or 0.0])
        return float(rate) if rate is not None else None

    def set_rate(self, bucket: Bucket) -> None:
        rate = repr(bucket.rate_per_s or 0.0)
        self.client.hset(self.key(bucket), mapping={"rate": rate, "ceiling": rate})

    def enter(self, bucket: Bucket, holder: str) -> bool:
        return bool(self._scripts["enter"](keys=[self.key(bucket) + ":holders"],
                                           args=[bucket.concurrency or 0, holder,
                                                 HOLDER_TTL_S]))

    def leave(self, bucket: Bucket, holder: str) -> None:
        self.client.zrem(self.key(bucket) + ":holders", holder)


@dataclass
class Permit:
    """The right to make one attempt; release it with the attempt's error (or None)."""

    gate: Gate
    holder: str
    entered: list[Bucket] = field(default_factory=list)
    # When the gate let the attempt go (epoch seconds), taken beside the check that it was on
    # time: a thread starved of CPU after that check still starts at its moment, on record.
    granted_at: float = 0.0

    def release(self, error: BaseException | None) -> None:
        self.gate.release(self, error)


class Gate:
    """What a phase's attempts go through: its own rate and its shared limit, if any."""

    def __init__(self, store: LimitStore | None, buckets: Sequence[Bucket],
                 log: logging.Logger | Any = None):
        self.store = store
        self.buckets = list(buckets)
        self.log = log or logging.getLogger("batch_defs.limits")
        self.on_backoff: Callable[[Backoff], None] | None = None
        self._rates: dict[str, float] = {b.name: b.rate_per_s or 0.0 for b in self.buckets}
        self._recovered_at: dict[str, float] = {}
        self._lock = threading.Lock()
        for bucket in self.buckets:
            self._store().prepare(bucket)

    def _store(self) -> LimitStore:
        if self.store is None:
            raise RuntimeError("a limit needs a store")
        return self.store

    @property
    def idle(self) -> bool:
        return not self.buckets

    def acquire(self, stop: threading.Event) -> Permit | None:
        """Wait for a concurrency slot of each limit, then for a token of each rate; None if
        `stop` is set meanwhile (nothing is taken then)."""
        permit = Permit(self, f"{HOST}:{os.getpid()}:{next(_holders)}")
        if self.idle:
            permit.granted_at = time.time()
            return permit
        store = self._store()
        for bucket in [b for b in self.buckets if b.concurrency]:
            pause = 0.01
            while not store.enter(bucket, permit.holder):
                if stop.wait(pause):
                    self._leave(permit)
                    return None
                pause = min(0.2, pause * 1.5)
            permit.entered.append(bucket)
        granted_at = self._await_tokens(stop)
        if granted_at is None:
            self._leave(permit)
            return None
        permit.granted_at = granted_at
        return permit

    def _await_tokens(self, stop: threading.Event) -> float | None:
        """Take a token of each rate and wait for the moment it was promised: that moment
        (epoch seconds), or None if `stop` came meanwhile. A caller that woke too late (its
        process was starved of CPU) queues again: its moment is gone (giving it back would let
        the next caller start early), and late callers must not start in a bunch with those
        on time."""
        store = self._store()
        rated = [b for b in self.buckets if b.rate_per_s]
        if not rated:
            return time.time()
        for _ in range(MAX_REQUEUES):
            wait, fastest = 0.0, 0.0
            asked = time.monotonic()
            for bucket in rated:
                tokens, rate = store.reserve(bucket)
                with self._lock:
                    self._rates[bucket.name] = rate
                fastest = max(fastest, rate)
                if tokens < 0 and rate > 0:
                    wait = max(wait, -tokens / rate)
            # The bucket promised its moment between `asked` and its reply. Wait from the
            # reply (never start before the promise), but judge lateness from `asked`: a
            # reply that came back late (a loaded database) makes its caller late as well.
            if wait and stop.wait(wait):
                return None
            woke, granted_at = time.monotonic(), time.time()
            if woke - (asked + wait) <= max(0.005, LATE_SHARE / fastest):
                return granted_at
        return time.time()

    def release(self, permit: Permit, error: BaseException | None) -> None:
        self._leave(permit)
        if is_rate_limited(error):
            self._backoff(error)
        elif error is None:
            self._recover()

    def _leave(self, permit: Permit) -> None:
        for bucket in permit.entered:
            self._store().leave(bucket, permit.holder)
        permit.entered.clear()

    def _backoff(self, error: BaseException | None) -> None:
        reason = "HTTP 429" if not isinstance(error, RateLimited) else f"RateLimited: {error}"
        for bucket in [b for b in self.buckets if b.rate_per_s and b.adaptive]:
            done = self._store().backoff(bucket, reason)
            if done is None:
                continue
            with self._lock:
                self._rates[bucket.name] = done.after
            self.log.warning(f"{bucket.label}: {reason}; rate {done.before:.2f}/s -> "
                             f"{done.after:.2f}/s")
            if self.on_backoff is not None:
                self.on_backoff(done)

    def _recover(self) -> None:
        now = time.monotonic()
        for bucket in [b for b in self.buckets if b.rate_per_s and b.adaptive]:
            with self._lock:
                below = self._rates.get(bucket.name, 0.0) < (bucket.rate_per_s or 0.0)
                last = self._recovered_at.setdefault(bucket.name, now)
                if not below or now - last < RECOVER_EVERY_S:
                    continue
                self._recovered_at[bucket.name] = now
            increase = (bucket.rate_per_s or 0.0) * INCREASE_SHARE * min(now - last, 1.0)
            rate = self._store().recover(bucket, increase)
            if rate is not None:
                with self._lock:
                    self._rates[bucket.name] = rate

    def set_rate(self, name: str, rate_per_s: float) -> Bucket:
        """A live change of one bucket's declared rate (batch-defs set)."""
        with self._lock:
            index = next(i for i, b in enumerate(self.buckets) if b.name == name)
            bucket = self.buckets[index] = replace(self.buckets[index], rate_per_s=rate_per_s)
            self._rates[name] = rate_per_s
        self._store().set_rate(bucket)
        return bucket

    def add(self, bucket: Bucket) -> None:
        self._store().prepare(bucket)
        with self._lock:
            self.buckets.append(bucket)
            self._rates[bucket.name] = bucket.rate_per_s or 0.0


def open_store(ledger: Ledger, executor: str, celery_broker: str | None) -> LimitStore:
    """Redis when the batch runs on celery workers with a Redis broker, else the ledger."""
    if executor == "celery" and celery_broker and celery_broker.startswith(("redis://",
                                                                            "rediss://")):
        from batch_defs.env import expand_env

        return RedisLimitStore(expand_env(celery_broker), ledger)
    return LedgerLimitStore(ledger)
