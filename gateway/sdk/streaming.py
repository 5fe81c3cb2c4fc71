"""Typed iterators over a streamed completion (server-sent events, SSE).

The gateway sends one ``data: {json}`` event per chunk and ends with ``data: [DONE]``. An error that
happens after the headers went out arrives as ``data: {"error": {...}}`` and is raised as the matching
:class:`~gateway.sdk.errors.APIStatusError`. A stream is never retried: its body has started.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from typing import Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from .errors import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    make_status_error,
    stream_error_status,
)
from .types import RouteInfo

ItemT = TypeVar("ItemT", bound=BaseModel)


class SSEDecoder:
    """Turns the lines of an event stream into event payloads (an event's ``data:`` lines, joined).

    Only ``data`` matters to the gateway's protocol; ``event``, ``id`` and ``retry`` are ignored, and
    an event cut off by the end of the stream is dropped, as the SSE spec says.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line (without its terminator); return a payload when ``line`` ends an event."""
        if not line:
            data, self._data = self._data, []
            return "\n".join(data) if data else None
        if not line.startswith(":"):  # ":..." is a comment, e.g. a keep-alive ping
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value.removeprefix(" "))
        return None


def _decode(data: str, item_type: type[ItemT], response: httpx.Response) -> ItemT:
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise APIResponseValidationError(response, f"stream event is not JSON: {data[:200]!r}") from exc
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        raise make_status_error(response, payload, status_code=stream_error_status(payload["error"]))
    try:
        return item_type.model_validate(payload)
    except ValidationError as exc:
        raise APIResponseValidationError(response, f"unexpected stream event: {exc}") from exc


class Stream(Generic[ItemT]):
    """The chunks of a streamed completion, typed; closes its HTTP response when done.

    The response closes when iteration ends, raises, or is abandoned with ``break``; use it as a
    context manager to also close a stream you never iterate. ``route`` comes from the headers.

    Usage::

        with client.chat.completions.create(messages=msgs, stream=True) as stream:
            print("tier:", stream.route.tier)
            for chunk in stream:
                if chunk.choices:
                    print(chunk.choices[0].delta.content or "", end="", flush=True)
    """

    def __init__(self, response: httpx.Response, item_type: type[ItemT]) -> None:
        self.response = response
        self.route: RouteInfo | None = RouteInfo.from_headers(response.headers)
        self._item_type = item_type

    def __iter__(self) -> Iterator[ItemT]:
        decoder = SSEDecoder()
        try:
            for line in self.response.iter_lines():
                data = decoder.feed(line)
                if data == "[DONE]":
                    return
                if data is not None:
                    yield _decode(data, self._item_type, self.response)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(self.response.request) from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(self.response.request, f"Stream broken: {exc}") from exc
        finally:
            self.close()

    def close(self) -> None:
        """Close the HTTP response; safe to call more than once."""
        self.response.close()

    def __enter__(self) -> Stream[ItemT]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncStream(Generic[ItemT]):
    """Async twin of :class:`Stream`; prefer ``async with``, which closes the response at once.

    An ``async for`` abandoned with ``break`` closes it only when the event loop finalizes the generator.

    Usage::

        async with await client.chat.completions.create(messages=msgs, stream=True) as stream:
            async for chunk in stream:
                if chunk.choices:
                    print(chunk.choices[0].delta.content or "", end="", flush=True)
    """

    def __init__(self, response: httpx.Response, item_type: type[ItemT]) -> None:
        self.response = response
        self.route: RouteInfo | None = RouteInfo.from_headers(response.headers)
        self._item_type = item_type

    async def __aiter__(self) -> AsyncIterator[ItemT]:
        decoder = SSEDecoder()
        try:
            async for line in self.response.aiter_lines():
                data = decoder.feed(line)
                if data == "[DONE]":
                    return
                if data is not None:
                    yield _decode(data, self._item_type, self.response)
        except httpx.TimeoutException as exc:
            raise APITimeoutError(self.response.request) from exc
        except httpx.TransportError as exc:
            raise APIConnectionError(self.response.request, f"Stream broken: {exc}") from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP response; safe to call more than once."""
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[ItemT]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
