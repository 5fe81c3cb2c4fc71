"""Token buckets and the per-identity RateLimiter, driven by a fake clock."""

from __future__ import annotations

import math

import pytest

from gateway.config import GatewaySettings
from gateway.ratelimit import RateLimiter, TokenBucket
from kernels.serving.errors import OpenAIError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("HYBRID_GATEWAY_"):
            monkeypatch.delenv(name)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _limiter(clock: FakeClock, **settings) -> RateLimiter:
    return RateLimiter(GatewaySettings(**settings), clock=clock)


def _refused(limiter: RateLimiter, identity: str) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        limiter.check(identity)
    return info.value


def test_bucket_burst_then_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2.0, capacity=3, clock=clock)
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == pytest.approx(0.5)
    assert bucket.try_take(2) == pytest.approx(1.0)
    clock.advance(0.5)
    assert bucket.try_take() == 0.0
    clock.advance(100)  # refills only up to capacity
    assert bucket.try_take(3) == 0.0 and bucket.try_take() == pytest.approx(0.5)
    assert math.isinf(bucket.try_take(4))  # more than it can ever hold


def test_bucket_charge_goes_into_debt():
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10.0, capacity=100, clock=clock)
    bucket.charge(150)
    assert bucket.wait_time(1) == pytest.approx(5.1) and not bucket.is_full()
    clock.advance(15)
    assert bucket.is_full() and bucket.try_take(100) == 0.0


@pytest.mark.parametrize("rate, capacity", [(0, 1), (1, 0), (-1, 5)])
def test_bucket_rejects_bad_parameters(rate, capacity):
    with pytest.raises(ValueError, match="rate_per_s > 0 and capacity > 0"):
        TokenBucket(rate, capacity)


def test_requests_per_minute_with_default_burst():
    clock = FakeClock()
    limiter = _limiter(clock, rate_limit_rpm=60)
    for _ in range(60):
        limiter.check("key:a")
    err = _refused(limiter, "key:a")
    assert err.status_code == 429 and err.code == "rate_limit_exceeded" and err.type == "rate_limit_error"
    assert err.headers == {"Retry-After": "1"} and "requests per minute" in err.message
    limiter.check("key:b")  # identities are independent
    clock.advance(1.0)
    limiter.check("key:a")


def test_burst_and_retry_after_rounds_up():
    clock = FakeClock()
    limiter = _limiter(clock, rate_limit_rpm=6, rate_limit_burst=2)
    limiter.check("anon:1.2.3.4")
    limiter.check("anon:1.2.3.4")
    assert _refused(limiter, "anon:1.2.3.4").headers["Retry-After"] == "10"
    clock.advance(9.5)
    assert _refused(limiter, "anon:1.2.3.4").headers["Retry-After"] == "1"
    clock.advance(0.5)
    limiter.check("anon:1.2.3.4")


def test_tokens_per_minute_are_charged_after_the_response():
    clock = FakeClock()
    limiter = _limiter(clock, rate_limit_tpm=600)  # 10 tokens/s, one minute of burst
    limiter.check("key:a")
    limiter.record_tokens("key:a", 1000)  # 400 in debt
    err = _refused(limiter, "key:a")
    assert err.headers == {"Retry-After": "41"} and "tokens per minute" in err.message
    limiter.check("key:b")
    clock.advance(41)
    limiter.check("key:a")


def test_token_refusal_keeps_the_request_slot():
    clock = FakeClock()
    limiter = _limiter(clock, rate_limit_rpm=1, rate_limit_burst=1, rate_limit_tpm=60)
    limiter.record_tokens("key:a", 61)  # in debt for 2 s; the request bucket is still full
    assert "tokens" in _refused(limiter, "key:a").message
    clock.advance(2)
    limiter.check("key:a")
    assert "requests" in _refused(limiter, "key:a").message


def test_unlimited_keeps_nothing():
    limiter = _limiter(FakeClock())
    assert not limiter.enabled
    for i in range(1000):
        limiter.check(f"anon:{i}")
        limiter.record_tokens(f"anon:{i}", 10**6)
    assert len(limiter) == 0


def test_refilled_buckets_are_forgotten():
    clock = FakeClock()
    limiter = _limiter(clock, rate_limit_rpm=60)
    limiter.check("key:a")
    clock.advance(1.0)  # a is full again: the same as a new bucket
    limiter.check("key:b")
    assert len(limiter) == 1
    limiter.check("key:c")
    assert len(limiter) == 2  # b is not full yet, so c's arrival keeps it


def test_memory_is_bounded():
    clock = FakeClock()
    limiter = RateLimiter(GatewaySettings(rate_limit_rpm=60, rate_limit_tpm=60), clock=clock, max_identities=3)
    for i in range(10):
        limiter.check(f"anon:{i}")
    assert len(limiter) == 3
    limiter.record_tokens("key:debt", 10**6)
    clock.advance(3600)  # everyone refilled, except the one in debt
    limiter.check("anon:new")
    assert len(limiter) == 2
    assert "tokens" in _refused(limiter, "key:debt").message
