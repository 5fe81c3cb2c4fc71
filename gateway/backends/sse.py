"""Server-sent events from an OpenAI-compatible upstream, as chunk dicts.

:class:`SSEDecoder` follows the WHATWG event-stream rules for what OpenAI-compatible servers send: ``data:``
lines (several join with a newline), ``event:``, ``:comment`` / keep-alive lines ignored, a blank line ends an
event. :class:`ChunkStream` turns one streamed ``httpx.Response`` into the chunk dicts the gateway forwards and
closes the response as soon as it is done with it, which is what makes the upstream stop generating.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from .base import BackendUnavailable

__all__ = ["ChunkStream", "SSEDecoder", "ServerSentEvent"]


@dataclass(slots=True, frozen=True)
class ServerSentEvent:
    data: str
    event: str | None = None


class SSEDecoder:
    """Feed lines (without their line ending); get an event back at each blank line that ends one.

    >>> decoder = SSEDecoder()
    >>> [decoder.decode(line) for line in ["data: {", "data: }", ""]][-1]
    ServerSentEvent(data='{\\n}', event=None)
    """

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None

    def decode(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None  # comment, typically a keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        return None  # "id", "retry" and unknown fields do not matter here

    def flush(self) -> ServerSentEvent | None:
        """The event in progress, if any (also used at end of stream for a last event without its blank line)."""
        if not self._data:
            self._event = None  # an event without data is not dispatched
            return None
        event = ServerSentEvent("\n".join(self._data), self._event)
        self._data, self._event = [], None
        return event


def _error_reason(payload: dict[str, Any]) -> str:
    error = payload.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    return f"upstream error mid-stream: {message or payload}"


class ChunkStream:
    """The chunk dicts of one streamed upstream response; ``[DONE]`` ends it and is not yielded.

    An ``{"error": ...}`` event, a broken connection or a stream that ends without ``[DONE]`` raises
    :class:`BackendUnavailable`. ``aclose()`` closes the HTTP response (dropping the connection when the body was
    not read to the end, so the upstream sees the disconnect); it is safe to call twice or before iterating, and
    iterating to the end or into an error closes too. ``on_close(ok)`` runs exactly once, ``ok`` telling whether
    the stream ended cleanly (``None`` when the caller closed it early).

    Usage::

        async with ChunkStream(response, on_close=lambda ok: None) as chunks:
            async for chunk in chunks:
                print(chunk["choices"][0]["delta"])
    """

    def __init__(self, response: httpx.Response, on_close: Callable[[bool | None], None] | None = None) -> None:
        self.response = response
        self._on_close = on_close
        self._events = self._iter_chunks()
        self._outcome: bool | None = None
        self._closed = False

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await self._events.__anext__()
        except StopAsyncIteration:
            self._outcome = True
            await self.aclose()
            raise
        except BackendUnavailable:
            self._outcome = False
            await self.aclose()
            raise
        except BaseException:
            # Cancellation included: whoever stops reading, the upstream must stop generating.
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._events.aclose()
        finally:
            try:
                await self.response.aclose()
            finally:
                if self._on_close is not None:
                    self._on_close(self._outcome)

    async def __aenter__(self) -> ChunkStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _iter_chunks(self) -> AsyncIterator[dict[str, Any]]:
        decoder = SSEDecoder()
        lines = self.response.aiter_lines()
        try:
            while True:
                try:
                    line = await lines.__anext__()
                except StopAsyncIteration:
                    line = None
                except httpx.HTTPError as exc:
                    raise BackendUnavailable(f"stream broken: {type(exc).__name__}: {exc}") from exc
                event = decoder.flush() if line is None else decoder.decode(line)
                if event is not None and event.data.strip():
                    if event.data.strip() == "[DONE]":
                        return
                    yield self._parse(event)
                if line is None:
                    raise BackendUnavailable("stream ended without [DONE]")
        finally:
            await lines.aclose()

    @staticmethod
    def _parse(event: ServerSentEvent) -> dict[str, Any]:
        try:
            payload = json.loads(event.data)
        except json.JSONDecodeError as exc:
            raise BackendUnavailable(f"malformed stream event: {event.data[:200]!r}") from exc
        if not isinstance(payload, dict):
            raise BackendUnavailable(f"malformed stream event: {event.data[:200]!r}")
        if event.event == "error" or "error" in payload:
            raise BackendUnavailable(_error_reason(payload))
        return payload
