"""Pieces of a fake gateway for ``httpx.MockTransport`` handlers, and helpers that hide sync vs async."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from gateway.sdk import AsyncStream, Stream

MESSAGES = [{"role": "user", "content": "Say hello"}]
ROUTE_HEADERS = {
    "x-hybrid-route": "cloud",
    "x-hybrid-score": "0.73",
    "x-hybrid-reason": "code request",
    "x-request-id": "req-123",
}
MODEL_ID = "smollm2-135m-instruct"


def chat_completion(content: str = "Hello!") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL_ID,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def chat_chunk(content: str | None, finish_reason: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL_ID, "choices": [choice]}


def usage_chunk() -> dict[str, Any]:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL_ID,
        "choices": [],
        "usage": usage,
    }


def error_body(message: str, type_: str, code: Any = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse(*events: dict[str, Any] | str) -> list[bytes]:
    """One ``data:`` event per item, as the byte chunks a server would send."""
    return [f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode() for event in events]


class TrackedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that remembers whether the client closed it; ``fail_with`` is raised after the chunks."""

    def __init__(self, chunks: list[bytes], fail_with: Exception | None = None) -> None:
        self.chunks = chunks
        self.fail_with = fail_with
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        if self.fail_with is not None:
            raise self.fail_with

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.fail_with is not None:
            raise self.fail_with

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def sse_response(stream: TrackedStream, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream", **(headers or {})}, stream=stream)


async def resolve(value: Any) -> Any:
    """``value``, awaited when an async client returned a coroutine."""
    return await value if inspect.isawaitable(value) else value


async def collect(stream: Stream[Any] | AsyncStream[Any]) -> list[Any]:
    if isinstance(stream, AsyncStream):
        return [item async for item in stream]
    return list(stream)
