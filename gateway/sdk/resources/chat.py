"""``client.chat.completions``: ``POST /v1/chat/completions``, whole or streamed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from .._base import Messages, Stop, TimeoutTypes, build_body
from ..streaming import AsyncStream, Stream
from ..types import ChatCompletion, ChatCompletionChunk

if TYPE_CHECKING:
    from ..client import AsyncClient, Client

PATH = "/v1/chat/completions"


def _chat_body(messages: Messages, params: Mapping[str, Any], extra_body: Mapping[str, Any] | None) -> dict[str, Any]:
    return build_body({"messages": [dict(message) for message in messages], **params}, extra_body)


class ChatCompletions:
    """Create chat completions; ``model`` is ``"auto"`` (the router decides), ``"edge"``, ``"cloud"`` or a model id.

    Usage::

        completion = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], max_tokens=32)
        print(completion.choices[0].message.content, completion.route.tier)

        for chunk in client.chat.completions.create(messages=msgs, stream=True):
            ...
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    @overload
    def create(
        self,
        *,
        messages: Messages,
        model: str = ...,
        stream: Literal[False] = ...,
        max_tokens: int | None = ...,
        max_completion_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        stop: Stop = ...,
        seed: int | None = ...,
        n: int | None = ...,
        stream_options: Mapping[str, Any] | None = ...,
        extra_body: Mapping[str, Any] | None = ...,
        timeout: TimeoutTypes = ...,
    ) -> ChatCompletion: ...

    @overload
    def create(
        self,
        *,
        messages: Messages,
        model: str = ...,
        stream: Literal[True],
        max_tokens: int | None = ...,
        max_completion_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        stop: Stop = ...,
        seed: int | None = ...,
        n: int | None = ...,
        stream_options: Mapping[str, Any] | None = ...,
        extra_body: Mapping[str, Any] | None = ...,
        timeout: TimeoutTypes = ...,
    ) -> Stream[ChatCompletionChunk]: ...

    def create(
        self,
        *,
        messages: Messages,
        model: str = "auto",
        stream: bool = False,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Stop = None,
        seed: int | None = None,
        n: int | None = None,
        stream_options: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = None,
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """Send a conversation; ``stream=True`` returns a :class:`Stream` of chunks instead of one reply.

        ``extra_body`` adds fields the signature lacks (``{"top_k": 40}``); ``timeout`` overrides the client's.
        """
        params = {
            "model": model,
            "stream": stream,
            "max_tokens": max_tokens,
            "max_completion_tokens": max_completion_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": stop,
            "seed": seed,
            "n": n,
            "stream_options": stream_options,
        }
        body = _chat_body(messages, params, extra_body)
        if stream:
            return self._client._stream(PATH, ChatCompletionChunk, body=body, timeout=timeout)
        return self._client._request("POST", PATH, ChatCompletion, body=body, timeout=timeout)


class AsyncChatCompletions:
    """Async twin of :class:`ChatCompletions`.

    Usage::

        completion = await client.chat.completions.create(messages=[{"role": "user", "content": "hi"}])
        async with await client.chat.completions.create(messages=msgs, stream=True) as stream:
            async for chunk in stream:
                ...
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @overload
    async def create(
        self,
        *,
        messages: Messages,
        model: str = ...,
        stream: Literal[False] = ...,
        max_tokens: int | None = ...,
        max_completion_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        stop: Stop = ...,
        seed: int | None = ...,
        n: int | None = ...,
        stream_options: Mapping[str, Any] | None = ...,
        extra_body: Mapping[str, Any] | None = ...,
        timeout: TimeoutTypes = ...,
    ) -> ChatCompletion: ...

    @overload
    async def create(
        self,
        *,
        messages: Messages,
        model: str = ...,
        stream: Literal[True],
        max_tokens: int | None = ...,
        max_completion_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        stop: Stop = ...,
        seed: int | None = ...,
        n: int | None = ...,
        stream_options: Mapping[str, Any] | None = ...,
        extra_body: Mapping[str, Any] | None = ...,
        timeout: TimeoutTypes = ...,
    ) -> AsyncStream[ChatCompletionChunk]: ...

    async def create(
        self,
        *,
        messages: Messages,
        model: str = "auto",
        stream: bool = False,
        max_tokens: int | None = None,
        max_completion_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Stop = None,
        seed: int | None = None,
        n: int | None = None,
        stream_options: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = None,
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """Send a conversation; ``stream=True`` returns an :class:`AsyncStream` of chunks instead of one reply."""
        params = {
            "model": model,
            "stream": stream,
            "max_tokens": max_tokens,
            "max_completion_tokens": max_completion_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": stop,
            "seed": seed,
            "n": n,
            "stream_options": stream_options,
        }
        body = _chat_body(messages, params, extra_body)
        if stream:
            return await self._client._stream(PATH, ChatCompletionChunk, body=body, timeout=timeout)
        return await self._client._request("POST", PATH, ChatCompletion, body=body, timeout=timeout)


class Chat:
    """``client.chat``: holds ``completions``, as in OpenAI's SDK."""

    def __init__(self, client: Client) -> None:
        self.completions = ChatCompletions(client)


class AsyncChat:
    """``client.chat`` of an :class:`AsyncClient`."""

    def __init__(self, client: AsyncClient) -> None:
        self.completions = AsyncChatCompletions(client)
