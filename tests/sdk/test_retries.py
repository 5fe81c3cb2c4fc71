"""Retries: which failures, how many times, and how long the client waits (recorded, never slept)."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from gateway.sdk import (
    APIConnectionError,
    APITimeoutError,
    BadRequestError,
    RateLimitError,
    ServiceUnavailableError,
    _retry,
)
from tests.sdk.fakes import MESSAGES, chat_completion, error_body, resolve

pytestmark = pytest.mark.anyio

OK = httpx.Response(200, json=chat_completion())


def scripted(*outcomes: httpx.Response | Exception):
    """A handler that plays ``outcomes`` in order (raising the exceptions; the last one repeats), and its requests."""
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        outcome = outcomes[min(len(calls), len(outcomes)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome.status_code, headers=outcome.headers, content=outcome.content)  # a fresh copy

    return handler, calls


def rate_limited(retry_after: str | None = None) -> httpx.Response:
    headers = {} if retry_after is None else {"retry-after": retry_after}
    return httpx.Response(429, json=error_body("slow down", "rate_limit_error"), headers=headers)


async def test_retry_after_is_honoured(make_client, sleeps) -> None:
    handler, calls = scripted(rate_limited("3"), rate_limited("0.25"), OK)
    completion = await resolve(make_client(handler).chat.completions.create(messages=MESSAGES))
    assert completion.choices[0].message.content == "Hello!"
    assert len(calls) == 3
    assert sleeps == [3.0, 0.25]


async def test_503_then_success_backs_off_with_jitter(make_client, sleeps) -> None:
    handler, calls = scripted(httpx.Response(503), OK)
    await resolve(make_client(handler).chat.completions.create(messages=MESSAGES))
    assert len(calls) == 2
    (delay,) = sleeps
    assert 0.5 * (1 - _retry.JITTER) <= delay <= 0.5


@pytest.mark.parametrize("status", [408, 409, 500, 502, 504])
async def test_other_retryable_statuses(make_client, sleeps, status: int) -> None:
    handler, calls = scripted(httpx.Response(status), OK)
    await resolve(make_client(handler).models.list())
    assert len(calls) == 2 and len(sleeps) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_client_errors_are_never_retried(make_client, sleeps, status: int) -> None:
    handler, calls = scripted(httpx.Response(status, json=error_body("bad", "invalid_request_error")), OK)
    with pytest.raises(Exception) as info:
        await resolve(make_client(handler, max_retries=5).chat.completions.create(messages=MESSAGES))
    assert info.value.status_code == status
    assert len(calls) == 1 and sleeps == []


async def test_bad_request_is_raised_at_once(make_client, sleeps) -> None:
    handler, calls = scripted(httpx.Response(400, json=error_body("bad tier", "invalid_request_error")))
    with pytest.raises(BadRequestError, match="bad tier"):
        await resolve(make_client(handler).route(prompt="hi", model="moon"))
    assert len(calls) == 1 and sleeps == []


async def test_exhausted_retries_raise_the_last_error(make_client, sleeps) -> None:
    handler, calls = scripted(rate_limited())
    with pytest.raises(RateLimitError):
        await resolve(make_client(handler, max_retries=2).chat.completions.create(messages=MESSAGES))
    assert len(calls) == 3
    assert 0.375 <= sleeps[0] <= 0.5 and 0.75 <= sleeps[1] <= 1.0, "0.5 s x 2^attempt, minus jitter"


async def test_connection_error_is_retried_then_raised(make_client, sleeps) -> None:
    handler, calls = scripted(httpx.ConnectError("connection refused"))
    with pytest.raises(APIConnectionError) as info:
        await resolve(make_client(handler).health())
    assert type(info.value) is APIConnectionError
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(calls) == 3 and len(sleeps) == 2


async def test_connection_error_then_success(make_client, sleeps) -> None:
    handler, calls = scripted(httpx.ConnectError("connection refused"), OK)
    await resolve(make_client(handler).chat.completions.create(messages=MESSAGES))
    assert len(calls) == 2 and len(sleeps) == 1


@pytest.mark.parametrize("exc", [httpx.ReadTimeout("read timed out"), httpx.ConnectTimeout("connect timed out")])
async def test_timeout_raises_api_timeout_error(make_client, sleeps, exc: Exception) -> None:
    handler, calls = scripted(exc)
    with pytest.raises(APITimeoutError):
        await resolve(make_client(handler, max_retries=1).chat.completions.create(messages=MESSAGES, timeout=0.1))
    assert len(calls) == 2 and len(sleeps) == 1
    assert calls[0].extensions["timeout"] == httpx.Timeout(0.1).as_dict()


async def test_max_retries_zero_and_per_call_override(make_client, sleeps) -> None:
    handler, calls = scripted(httpx.Response(503))
    client = make_client(handler, max_retries=0)
    with pytest.raises(ServiceUnavailableError):
        await resolve(client.models.list())
    assert len(calls) == 1
    with pytest.raises(ServiceUnavailableError):
        await resolve(client.with_options(max_retries=1).models.list())
    assert len(calls) == 3 and len(sleeps) == 1
    assert client.max_retries == 0


def test_backoff_doubles_up_to_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_retry.random, "random", lambda: 0.0)
    error = APIConnectionError(httpx.Request("GET", "http://gw"))
    delays = [_retry.retry_delay(error, attempt, max_retries=10) for attempt in range(7)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert _retry.retry_delay(error, attempt=2, max_retries=2) is None


def test_retry_after_header_forms() -> None:
    in_ten_seconds = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert _retry.parse_retry_after("7") == 7.0
    assert 8.0 <= _retry.parse_retry_after(in_ten_seconds) <= 10.0
    assert _retry.parse_retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    for unreadable in (None, "", "soon", "nan"):
        assert _retry.parse_retry_after(unreadable) is None
    request = httpx.Request("GET", "http://gw")
    response = httpx.Response(429, headers={"retry-after": "3600"}, request=request)
    error = RateLimitError("slow down", response=response, body=None)
    assert _retry.retry_delay(error, attempt=0, max_retries=2) == _retry.MAX_RETRY_AFTER
