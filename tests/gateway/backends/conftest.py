"""Helpers for backend tests: run a coroutine with a deadline, fake OpenAI responses and SSE bodies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Coroutine
from typing import Any


def run(coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
    """Run one coroutine on a fresh event loop; no pytest-asyncio needed."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def completion(model: str, text: str = "hi") -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def chunk(text: str, index: int = 0) -> dict[str, Any]:
    return {"id": "cmpl-1", "object": "chat.completion.chunk",
            "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}


def sse(*payloads: dict[str, Any] | str) -> bytes:
    """An event stream: dicts as JSON data events, strings verbatim."""
    return b"".join(p.encode() if isinstance(p, str) else f"data: {json.dumps(p)}\n\n".encode() for p in payloads)


async def byte_pieces(data: bytes, size: int = 7, fail_with: BaseException | None = None) -> AsyncIterator[bytes]:
    """``data`` in awkward pieces (splitting lines and events), optionally breaking at the end."""
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(0)
    if fail_with is not None:
        raise fail_with
