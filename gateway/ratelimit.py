"""Per-caller rate limits with the token-bucket algorithm.

A bucket holds up to ``capacity`` tokens and refills at ``rate_per_s``; a request takes one. Each caller
identity (from :class:`gateway.auth.APIKeyAuth`) gets a request bucket (``rate_limit_rpm``, burst
``rate_limit_capacity``) and, with ``rate_limit_tpm``, a token bucket charged after each response with the
prompt + completion tokens it used. Token usage is only known afterwards, so the token bucket may go into
debt; the caller's next request waits until it is repaid.

    limiter = RateLimiter(settings)
    limiter.check(identity)               # before the engine: raises a 429 OpenAIError with Retry-After
    limiter.record_tokens(identity, 812)  # after the response

Memory is bounded: a bucket that has refilled completely is indistinguishable from a new one and is dropped,
and at most ``max_identities`` buckets are kept (least recently used go first).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config import GatewaySettings
from kernels.serving.errors import OpenAIError

__all__ = ["RateLimiter", "TokenBucket"]

Clock = Callable[[], float]


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate_per_s``.

    >>> now = [0.0]
    >>> bucket = TokenBucket(rate_per_s=1.0, capacity=2, clock=lambda: now[0])
    >>> bucket.try_take(), bucket.try_take(), bucket.try_take()
    (0.0, 0.0, 1.0)
    """

    __slots__ = ("rate_per_s", "capacity", "clock", "tokens", "updated")

    def __init__(self, rate_per_s: float, capacity: float, clock: Clock = time.monotonic) -> None:
        if rate_per_s <= 0 or capacity <= 0:
            raise ValueError(f"a token bucket needs rate_per_s > 0 and capacity > 0, got {rate_per_s}, {capacity}")
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.clock = clock
        self.tokens = float(capacity)
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def wait_time(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available (0.0 if they are now; inf if ``n`` exceeds capacity)."""
        self._refill()
        if self.tokens >= n:
            return 0.0
        return math.inf if n > self.capacity else (n - self.tokens) / self.rate_per_s

    def try_take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens and return 0.0, or take nothing and return the seconds until they would be there."""
        wait = self.wait_time(n)
        if wait == 0.0:
            self.tokens -= n
        return wait

    def charge(self, n: float) -> None:
        """Take ``n`` tokens unconditionally; the bucket may go negative (a debt that refilling repays)."""
        self._refill()
        self.tokens -= n

    def is_full(self) -> bool:
        """Whether the bucket has refilled completely (so it can be forgotten without changing anything)."""
        return self.tokens + (self.clock() - self.updated) * self.rate_per_s >= self.capacity


@dataclass(slots=True)
class _Buckets:
    requests: TokenBucket | None
    tokens: TokenBucket | None

    def is_full(self) -> bool:
        return all(b is None or b.is_full() for b in (self.requests, self.tokens))


class RateLimiter:
    """Request and token rate limits per caller identity, from ``settings.rate_limit_*``.

    >>> limiter = RateLimiter(GatewaySettings(rate_limit_rpm=60))
    >>> limiter.check("key:abc")  # raises OpenAIError(429) once the minute's 60 are spent
    """

    def __init__(self, settings: GatewaySettings, *, clock: Clock = time.monotonic,
                 max_identities: int = 10_000) -> None:
        self.rpm = settings.rate_limit_rpm
        self.tpm = settings.rate_limit_tpm
        self.request_capacity = settings.rate_limit_capacity
        self.clock = clock
        self.max_identities = max_identities
        self._buckets: OrderedDict[str, _Buckets] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # sync dependencies run in FastAPI's thread pool

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, identity: str) -> None:
        """Admit one request from ``identity`` or raise a 429 ``OpenAIError`` with ``Retry-After``."""
        if not self.enabled:
            return
        with self._lock:
            buckets = self._get(identity)
            # Tokens first, without taking, so a request refused for tokens keeps its request slot.
            if buckets.tokens is not None and (wait := buckets.tokens.wait_time(min(1.0, self.tpm))) > 0:
                raise _too_many(identity, f"tokens per minute (limit {self.tpm:g})", wait)
            if buckets.requests is not None and (wait := buckets.requests.try_take(1)) > 0:
                raise _too_many(identity, f"requests per minute (limit {self.rpm:g}, burst "
                                          f"{self.request_capacity})", wait)

    def record_tokens(self, identity: str, n: int) -> None:
        """Charge ``n`` prompt + completion tokens of a finished response to ``identity``."""
        if self.tpm <= 0 or n <= 0:
            return
        with self._lock:
            buckets = self._get(identity)
            assert buckets.tokens is not None
            buckets.tokens.charge(n)

    def _get(self, identity: str) -> _Buckets:
        buckets = self._buckets.get(identity)
        if buckets is None:
            buckets = _Buckets(
                requests=TokenBucket(self.rpm / 60, self.request_capacity, self.clock) if self.rpm > 0 else None,
                tokens=TokenBucket(self.tpm / 60, self.tpm, self.clock) if self.tpm > 0 else None)
            self._buckets[identity] = buckets
            self._evict()
        self._buckets.move_to_end(identity)
        return buckets

    def _evict(self) -> None:
        while len(self._buckets) > self.max_identities:
            self._buckets.popitem(last=False)
        # Drop refilled buckets from the idle end; stop at the first one still in use (amortized O(1)).
        while len(self._buckets) > 1:
            oldest = next(iter(self._buckets.values()))
            if not oldest.is_full():
                break
            self._buckets.popitem(last=False)


def _too_many(identity: str, limit: str, wait_s: float) -> OpenAIError:
    retry_after = max(1, math.ceil(wait_s)) if math.isfinite(wait_s) else 60
    return OpenAIError(429, f"Rate limit reached for {identity} on {limit}. Please try again in {retry_after}s.",
                       code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})
