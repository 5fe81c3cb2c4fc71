"""``client.completions``: ``POST /v1/completions`` (plain text prompt), whole or streamed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, overload

from .._base import Stop, TimeoutTypes, build_body
from ..streaming import AsyncStream, Stream
from ..types import Completion, CompletionChunk

if TYPE_CHECKING:
    from ..client import AsyncClient, Client

PATH = "/v1/completions"


class Completions:
    """Create text completions; ``model`` is ``"auto"`` (the router decides), ``"edge"``, ``"cloud"`` or a model id.

    Usage::

        completion = client.completions.create(prompt="The capital of France is", max_tokens=8)
        print(completion.choices[0].text, completion.route.tier)

        for chunk in client.completions.create(prompt="Once upon a time", stream=True):
            print("".join(choice.text for choice in chunk.choices), end="")
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    @overload
    def create(
        self,
        *,
        prompt: str | list[str],
        model: str = ...,
        stream: Literal[False] = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        stop: Stop = ...,
        seed: int | None = ...,
        n: int | None = ...,
        stream_options: Mapping[str, Any] | None = ...,
        extra_body: Mapping[str, Any] | None = ...,
        timeout: TimeoutTypes = ...,
    ) -> Completion: ...

    @overload
    def create(
        self,
        *,
        prompt: str | list[str],
        model: str = ...,
        stream: Literal[True],
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        stop: Stop = ...,
        seed: int | None = ...,
        n: int | None = ...,
        stream_options: Mapping[str, Any] | None = ...,
        extra_body: Mapping[str, Any] | None = ...,
        timeout: TimeoutTypes = ...,
    ) -> Stream[CompletionChunk]: ...

    def create(
        self,
        *,
        prompt: str | list[str],
        model: str = "auto",
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Stop = None,
        seed: int | None = None,
        n: int | None = None,
        stream_options: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = None,
    ) -> Completion | Stream[CompletionChunk]:
        """Complete ``prompt``; ``stream=True`` returns a :class:`Stream` of chunks instead of one reply.

        ``extra_body`` adds fields the signature lacks (``{"top_k": 40}``); ``timeout`` overrides the client's.
        """
        params = {
            "prompt": prompt,
            "model": model,
            "stream": stream,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": stop,
            "seed": seed,
            "n": n,
            "stream_options": stream_options,
        }
        body = build_body(params, extra_body)
        if stream:
            return self._client._stream(PATH, CompletionChunk, body=body, timeout=timeout)
        return self._client._request("POST", PATH, Completion, body=body, timeout=timeout)


class AsyncCompletions:
    """Async twin of :class:`Completions`.

    Usage::

        completion = await client.completions.create(prompt="The capital of France is")
        async with await client.completions.create(prompt="Once upon a time", stream=True) as stream:
            async for chunk in stream:
                ...
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    @overload
    async def create(
        self,
        *,
        prompt: str | list[str],
        model: str = ...,
        stream: Literal[False] = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        stop: Stop = ...,
        seed: int | None = ...,
        n: int | None = ...,
        stream_options: Mapping[str, Any] | None = ...,
        extra_body: Mapping[str, Any] | None = ...,
        timeout: TimeoutTypes = ...,
    ) -> Completion: ...

    @overload
    async def create(
        self,
        *,
        prompt: str | list[str],
        model: str = ...,
        stream: Literal[True],
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        top_p: float | None = ...,
        stop: Stop = ...,
        seed: int | None = ...,
        n: int | None = ...,
        stream_options: Mapping[str, Any] | None = ...,
        extra_body: Mapping[str, Any] | None = ...,
        timeout: TimeoutTypes = ...,
    ) -> AsyncStream[CompletionChunk]: ...

    async def create(
        self,
        *,
        prompt: str | list[str],
        model: str = "auto",
        stream: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Stop = None,
        seed: int | None = None,
        n: int | None = None,
        stream_options: Mapping[str, Any] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: TimeoutTypes = None,
    ) -> Completion | AsyncStream[CompletionChunk]:
        """Complete ``prompt``; ``stream=True`` returns an :class:`AsyncStream` of chunks instead of one reply."""
        params = {
            "prompt": prompt,
            "model": model,
            "stream": stream,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": stop,
            "seed": seed,
            "n": n,
            "stream_options": stream_options,
        }
        body = build_body(params, extra_body)
        if stream:
            return await self._client._stream(PATH, CompletionChunk, body=body, timeout=timeout)
        return await self._client._request("POST", PATH, Completion, body=body, timeout=timeout)
