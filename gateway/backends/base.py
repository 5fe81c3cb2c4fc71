"""The contract between the gateway and whatever serves a request (the in-process edge engine, a cloud over HTTP).

Errors a backend raises on purpose::

    BackendError                 base; catch it to handle any of them
     ├── UpstreamError           the upstream rejected the request (4xx): pass status, body and headers through
     └── BackendUnavailable      the request could not be served: connect error, timeout, 5xx, circuit open,
                                 stream broken mid-way; the gateway may fall back to the other tier (503 if none)

A streamed call returns only once the upstream has accepted the request (status 200), so both errors reach the
gateway before it sends its own status line. After that, only :class:`BackendUnavailable` can come out of the
chunk iterator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["Backend", "BackendError", "BackendLoad", "BackendResult", "BackendUnavailable", "UpstreamError",
           "error_body"]

# A non-streamed call's response JSON, or a streamed call's chunk dicts.
BackendResult = dict[str, Any] | AsyncIterator[dict[str, Any]]

# OpenAI's error "type" for the statuses a backend may pass through.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
                422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(message: str, status_code: int, *, code: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error body: ``{"error": {"message", "type", "param", "code"}}``."""
    err_type = _ERROR_TYPES.get(status_code, "api_error" if status_code < 500 else "server_error")
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


class BackendError(Exception):
    """Base of every error a backend raises on purpose."""


class UpstreamError(BackendError):
    """The upstream answered with a 4xx: the request itself is at fault, so it is passed through, never retried.

    ``body`` is always OpenAI-shaped (synthesized when the upstream's was not); ``headers`` holds only those worth
    passing on (``Retry-After``, rate-limit headers, the upstream request id).

    Usage::

        try:
            out = await backend.chat_completions(body, stream=False)
        except UpstreamError as exc:
            return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)
    """

    def __init__(self, status_code: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status_code
        self.body = body
        self.headers = dict(headers or {})
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        super().__init__(f"upstream returned {status_code}: {message or body}")


class BackendUnavailable(BackendError):
    """The backend could not serve the request; ``reason`` says why in one line.

    Usage::

        raise BackendUnavailable("all 2 replicas have their circuit open")
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(slots=True, frozen=True)
class BackendLoad:
    """How busy a backend is right now; what a backend cannot tell is 0 (counts) or None (estimates)."""

    outstanding: int = 0  # requests accepted and not yet finished (streams count until closed)
    waiting: int = 0  # queued, not yet scheduled
    running: int = 0  # scheduled, generating
    est_ttft_s: float | None = None  # expected time to first token for a new request, seconds


@runtime_checkable
class Backend(Protocol):
    """One tier the gateway can route to.

    ``body`` is the OpenAI request JSON; the backend rewrites ``body["model"]`` to :attr:`model_id`. Non-streamed
    calls return the response JSON. Streamed calls return, once the upstream answered 200, an async iterator of
    chunk dicts (no ``[DONE]``); calling its ``aclose()`` stops generation upstream.

    Usage::

        stream = await backend.chat_completions({"messages": [...], "stream": True}, stream=True)
        try:
            async for chunk in stream:
                ...
        finally:
            await stream.aclose()
    """

    name: str  # "edge" or "cloud"

    @property
    def model_id(self) -> str | None: ...

    def healthy(self) -> bool: ...

    def load(self) -> BackendLoad: ...

    async def chat_completions(self, body: dict[str, Any], *, stream: bool) -> BackendResult: ...

    async def completions(self, body: dict[str, Any], *, stream: bool) -> BackendResult: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...
