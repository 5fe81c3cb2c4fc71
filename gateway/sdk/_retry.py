"""When to retry a failed request, and how long to wait first.

Exponential backoff with jitter (0.5 s x 2^attempt, capped at 8 s, minus up to 25 % so that clients
that failed together do not come back together), unless the server sent ``Retry-After``, which wins
(capped at 60 s). ``sleep`` and ``async_sleep`` are module attributes so tests can record the delays.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from datetime import UTC, datetime

import anyio

from .errors import APIConnectionError, APIStatusError, HybridGatewayError

INITIAL_BACKOFF = 0.5  # seconds
MAX_BACKOFF = 8.0  # seconds
MAX_RETRY_AFTER = 60.0  # seconds; a longer wait is the caller's decision, not the SDK's
JITTER = 0.25  # fraction of the backoff taken off at random
RETRYABLE_STATUSES = frozenset({408, 409, 429})  # plus every status >= 500


def retry_delay(error: HybridGatewayError, attempt: int, max_retries: int) -> float | None:
    """Seconds to wait before retrying after ``error``, or None when it must be raised.

    ``attempt`` counts the retries already made (0 after the first failure).
    """
    if attempt >= max_retries:
        return None
    if isinstance(error, APIStatusError):
        if error.status_code < 500 and error.status_code not in RETRYABLE_STATUSES:
            return None
        retry_after = parse_retry_after(error.response.headers.get("retry-after"))
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
    elif not isinstance(error, APIConnectionError):
        return None
    backoff = min(INITIAL_BACKOFF * 2**attempt, MAX_BACKOFF)
    return backoff * (1 - JITTER * random.random())


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if math.isnan(seconds):
        return None
    return max(seconds, 0.0)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


async def async_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)
