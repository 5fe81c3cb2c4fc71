"""Streamed completions: typed chunks, the usage chunk, [DONE], closing, and errors inside the stream."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from gateway.sdk import (
    APIConnectionError,
    AsyncStream,
    ChatCompletionChunk,
    CompletionChunk,
    RateLimitError,
    ServiceUnavailableError,
    Stream,
)
from gateway.sdk.streaming import SSEDecoder
from tests.sdk.fakes import (
    MESSAGES,
    ROUTE_HEADERS,
    TrackedStream,
    chat_chunk,
    collect,
    error_body,
    resolve,
    sse,
    sse_response,
    usage_chunk,
)


@pytest.mark.anyio
async def test_chat_stream_yields_chunks_then_usage_and_stops_at_done(make_client) -> None:
    body = TrackedStream(
        sse(chat_chunk("Hel"), chat_chunk("lo", "stop"), usage_chunk(), "[DONE]", chat_chunk("after done"))
    )
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return sse_response(body, ROUTE_HEADERS)

    client = make_client(handler)
    stream = await resolve(
        client.chat.completions.create(messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    )
    assert isinstance(stream, Stream | AsyncStream)
    assert stream.route is not None and (stream.route.tier, stream.route.request_id) == ("cloud", "req-123")
    chunks = await collect(stream)

    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content for chunk in chunks if chunk.choices) == "Hello"
    assert chunks[1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7
    assert len(chunks) == 3, "nothing after [DONE]"
    assert body.closed
    assert seen[0].headers["accept"] == "text/event-stream"
    sent = json.loads(seen[0].content)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


@pytest.mark.anyio
async def test_completion_stream(make_client) -> None:
    chunk = {"id": "c", "object": "text_completion", "model": "m", "choices": [{"index": 0, "text": "Once"}]}
    client = make_client(lambda request: sse_response(TrackedStream(sse(chunk, chunk, "[DONE]"))))
    stream = await resolve(client.completions.create(prompt="Tell me a story", stream=True))
    chunks = await collect(stream)
    assert [type(c) for c in chunks] == [CompletionChunk, CompletionChunk]
    assert "".join(c.choices[0].text for c in chunks) == "OnceOnce"


@pytest.mark.anyio
@pytest.mark.parametrize("use_context_manager", [True, False])
async def test_early_break_closes_the_response(make_client, use_context_manager: bool) -> None:
    body = TrackedStream(sse(chat_chunk("a"), chat_chunk("b"), chat_chunk("c"), "[DONE]"))
    client = make_client(lambda request: sse_response(body))
    stream = await resolve(client.chat.completions.create(messages=MESSAGES, stream=True))
    received = []
    if isinstance(stream, AsyncStream):
        if use_context_manager:
            async with stream:
                async for chunk in stream:
                    received.append(chunk)
                    break
        else:
            async for chunk in stream:
                received.append(chunk)
                break
            for _ in range(5):  # the event loop finalizes the abandoned async generator on its next turns
                await anyio.sleep(0)
    elif use_context_manager:
        with stream:
            for chunk in stream:
                received.append(chunk)
                break
    else:
        for chunk in stream:
            received.append(chunk)
            break
    assert [chunk.choices[0].delta.content for chunk in received] == ["a"]
    assert body.closed


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("event", "error_cls"),
    [
        (error_body("edge backend crashed", "server_error", code=503), ServiceUnavailableError),
        (error_body("slow down", "rate_limit_error"), RateLimitError),
    ],
)
async def test_error_event_mid_stream_raises_and_is_not_retried(make_client, sleeps, event, error_cls) -> None:
    body = TrackedStream(sse(chat_chunk("Hel"), event, "[DONE]"))
    calls: list[httpx.Request] = []
    client = make_client(lambda request: calls.append(request) or sse_response(body, ROUTE_HEADERS))
    stream = await resolve(client.chat.completions.create(messages=MESSAGES, stream=True))
    received = []
    with pytest.raises(error_cls) as info:
        if isinstance(stream, AsyncStream):
            async for chunk in stream:
                received.append(chunk)
        else:
            for chunk in stream:
                received.append(chunk)
    assert len(received) == 1
    assert info.value.message == event["error"]["message"]
    assert info.value.body == event
    assert info.value.request_id == "req-123"
    assert body.closed
    assert len(calls) == 1 and sleeps == [], "a stream whose body started is never retried"


@pytest.mark.anyio
async def test_connection_lost_mid_stream_raises_connection_error(make_client) -> None:
    body = TrackedStream(sse(chat_chunk("Hel")), fail_with=httpx.RemoteProtocolError("peer closed connection"))
    client = make_client(lambda request: sse_response(body))
    stream = await resolve(client.chat.completions.create(messages=MESSAGES, stream=True))
    with pytest.raises(APIConnectionError, match="peer closed"):
        await collect(stream)
    assert body.closed


@pytest.mark.anyio
async def test_stream_is_retried_until_its_headers_arrive(make_client, sleeps) -> None:
    responses = [
        httpx.Response(503, json=error_body("warming up", "service_unavailable"), headers={"retry-after": "1"}),
        sse_response(TrackedStream(sse(chat_chunk("ok"), "[DONE]"))),
    ]
    client = make_client(lambda request: responses.pop(0))
    stream = await resolve(client.chat.completions.create(messages=MESSAGES, stream=True))
    assert [chunk.choices[0].delta.content for chunk in await collect(stream)] == ["ok"]
    assert sleeps == [1.0]


def test_sse_decoder_joins_data_lines_and_skips_comments() -> None:
    lines = [
        ": keep-alive",
        "",
        "event: message",
        'data: {"a":',
        "data: 1}",
        "id: 7",
        "",
        "data:[DONE]",
        "",
        "data: cut",
    ]
    decoder = SSEDecoder()
    events = [event for event in map(decoder.feed, lines) if event is not None]
    assert events == ['{"a":\n1}', "[DONE]"], "an event cut off by the end of the stream is dropped"


def test_sse_over_crlf_lines() -> None:
    response = httpx.Response(200, content=b"data: 1\r\n\r\ndata: 2\r\n\r\n")
    decoder = SSEDecoder()
    assert [event for event in map(decoder.feed, response.iter_lines()) if event is not None] == ["1", "2"]
