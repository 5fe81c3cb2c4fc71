"""CircuitBreaker state machine, driven by a fake clock."""

from __future__ import annotations

import pytest

from gateway.backends import CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_success_resets_the_count():
    breaker = CircuitBreaker(failures=3, cooldown_s=10, clock=FakeClock())
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # not consecutive any more
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and breaker.consecutive_failures == 3
    assert not breaker.available and not breaker.allow()


def test_cooldown_then_one_trial_then_closed_on_success():
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, cooldown_s=10, clock=clock)
    breaker.record_failure()
    clock.now += 9.99
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 0.01
    assert breaker.state == "half_open" and breaker.available
    assert breaker.allow()  # the one trial
    assert not breaker.allow() and not breaker.available
    breaker.record_success()
    assert breaker.state == "closed" and breaker.consecutive_failures == 0
    assert breaker.allow() and breaker.allow()


def test_failed_trial_reopens_for_a_full_cooldown():
    clock = FakeClock()
    breaker = CircuitBreaker(failures=2, cooldown_s=5, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 5
    assert breaker.allow()
    clock.now += 3  # the trial took 3 s and failed: the cooldown restarts from now
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state == "half_open" and breaker.allow()


def test_release_frees_the_trial_slot():
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, cooldown_s=1, clock=clock)
    breaker.record_failure()
    clock.now += 1
    assert breaker.allow() and not breaker.allow()
    breaker.release()  # the trial was cancelled without a verdict
    assert breaker.allow()


def test_probe_success_closes_an_open_breaker_before_the_cooldown():
    breaker = CircuitBreaker(failures=1, cooldown_s=60, clock=FakeClock())
    breaker.record_failure()
    assert breaker.state == "open"
    breaker.record_success()
    assert breaker.state == "closed"


@pytest.mark.parametrize("kwargs", [{"failures": 0}, {"cooldown_s": -1}])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)
