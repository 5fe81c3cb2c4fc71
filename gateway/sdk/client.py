"""``Client`` and ``AsyncClient``: the gateway's OpenAI-compatible API plus routing, over httpx.

Both send every request through one retry loop (``_send``): connection errors, timeouts, 408, 409,
429 and 5xx are retried up to ``max_retries`` times, waiting as ``_retry.retry_delay`` says; any other
error status raises at once. A stream is retried only until its headers arrive, never after.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

from . import _retry
from ._base import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    BaseClient,
    Messages,
    ModelT,
    TimeoutTypes,
    parse_json,
    parse_response,
    route_body,
)
from .errors import APIConnectionError, APITimeoutError, HybridGatewayError, make_status_error
from .resources import AsyncChat, AsyncCompletions, AsyncModels, Chat, Completions, Models
from .streaming import AsyncStream, Stream
from .types import RouteDecision


def _transport_error(request: httpx.Request, exc: httpx.TransportError) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(request)
    return APIConnectionError(request, f"Connection error: {exc}")


class Client(BaseClient):
    """Synchronous client of a hybrid gateway.

    ``api_key`` defaults to ``$HYBRID_GATEWAY_API_KEY``; ``timeout`` is in seconds (or an ``httpx.Timeout``);
    ``transport`` (e.g. ``httpx.MockTransport``) or ``http_client`` replace the default connection pool.

    Usage::

        from gateway.sdk import Client

        with Client("http://127.0.0.1:8000", api_key="sk-local") as client:
            completion = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
            print(completion.choices[0].message.content, completion.route.tier)
            print(client.route(prompt="Prove Fermat's little theorem.").tier)
    """

    _http: httpx.Client

    def __init__(
        self,
        base_url: str | httpx.URL = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
        )
        if http_client is not None and transport is not None:
            raise ValueError("pass transport= or http_client=, not both")
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(transport=transport, timeout=self.timeout)
        self._bind_resources()

    def _bind_resources(self) -> None:
        self.chat = Chat(self)
        self.completions = Completions(self)
        self.models = Models(self)

    def route(
        self,
        *,
        messages: Messages | None = None,
        prompt: str | None = None,
        model: str = "auto",
        timeout: TimeoutTypes = None,
    ) -> RouteDecision:
        """Ask which tier would serve ``messages`` (or ``prompt``), without generating anything.

        Usage::

            decision = client.route(messages=[{"role": "user", "content": "Write a haiku"}])
            print(decision.tier, decision.score, decision.threshold, decision.reasons)
        """
        body = route_body(messages, prompt, model)
        return self._request("POST", "/v1/route", RouteDecision, body=body, timeout=timeout)

    def health(self, *, timeout: TimeoutTypes = None) -> dict[str, Any]:
        """``GET /health``: the gateway's liveness report, as JSON."""
        return parse_json(self._send(self._build_request("GET", "/health", body=None, timeout=timeout)))

    def close(self) -> None:
        """Close the connection pool (unless it came from ``http_client=`` or this is a ``with_options`` copy)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        cast_to: type[ModelT],
        *,
        body: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = None,
    ) -> ModelT:
        request = self._build_request(method, path, body=body, timeout=timeout)
        return parse_response(self._send(request), cast_to)

    def _stream(
        self, path: str, item_type: type[ModelT], *, body: Mapping[str, Any], timeout: TimeoutTypes
    ) -> Stream[ModelT]:
        request = self._build_request("POST", path, body=body, timeout=timeout, stream=True)
        return Stream(self._send(request, stream=True), item_type)

    def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send ``request`` until it succeeds or ``retry_delay`` gives up; return the 2xx response."""
        attempt = 0
        while True:
            error: HybridGatewayError
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error, cause = _transport_error(request, exc), exc
            else:
                if response.is_success:
                    return response
                response.read()  # a streamed error response has its body still unread
                response.close()
                error, cause = make_status_error(response), None
            delay = _retry.retry_delay(error, attempt, self.max_retries)
            if delay is None:
                raise error from cause
            _retry.sleep(delay)
            attempt += 1


class AsyncClient(BaseClient):
    """Asynchronous twin of :class:`Client`; every API method is awaited.

    Usage::

        from gateway.sdk import AsyncClient

        async with AsyncClient("http://127.0.0.1:8000") as client:
            completion = await client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
            async with await client.chat.completions.create(messages=msgs, stream=True) as stream:
                async for chunk in stream:
                    ...
    """

    _http: httpx.AsyncClient

    def __init__(
        self,
        base_url: str | httpx.URL = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            default_headers=default_headers,
        )
        if http_client is not None and transport is not None:
            raise ValueError("pass transport= or http_client=, not both")
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(transport=transport, timeout=self.timeout)
        self._bind_resources()

    def _bind_resources(self) -> None:
        self.chat = AsyncChat(self)
        self.completions = AsyncCompletions(self)
        self.models = AsyncModels(self)

    async def route(
        self,
        *,
        messages: Messages | None = None,
        prompt: str | None = None,
        model: str = "auto",
        timeout: TimeoutTypes = None,
    ) -> RouteDecision:
        """Ask which tier would serve ``messages`` (or ``prompt``): ``(await client.route(prompt="hi")).tier``."""
        body = route_body(messages, prompt, model)
        return await self._request("POST", "/v1/route", RouteDecision, body=body, timeout=timeout)

    async def health(self, *, timeout: TimeoutTypes = None) -> dict[str, Any]:
        """``GET /health``: the gateway's liveness report, as JSON."""
        return parse_json(await self._send(self._build_request("GET", "/health", body=None, timeout=timeout)))

    async def aclose(self) -> None:
        """Close the connection pool (unless it came from ``http_client=`` or this is a ``with_options`` copy)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        cast_to: type[ModelT],
        *,
        body: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = None,
    ) -> ModelT:
        request = self._build_request(method, path, body=body, timeout=timeout)
        return parse_response(await self._send(request), cast_to)

    async def _stream(
        self, path: str, item_type: type[ModelT], *, body: Mapping[str, Any], timeout: TimeoutTypes
    ) -> AsyncStream[ModelT]:
        request = self._build_request("POST", path, body=body, timeout=timeout, stream=True)
        return AsyncStream(await self._send(request, stream=True), item_type)

    async def _send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send ``request`` until it succeeds or ``retry_delay`` gives up; return the 2xx response."""
        attempt = 0
        while True:
            error: HybridGatewayError
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                error, cause = _transport_error(request, exc), exc
            else:
                if response.is_success:
                    return response
                await response.aread()  # a streamed error response has its body still unread
                await response.aclose()
                error, cause = make_status_error(response), None
            delay = _retry.retry_delay(error, attempt, self.max_retries)
            if delay is None:
                raise error from cause
            await _retry.async_sleep(delay)
            attempt += 1
