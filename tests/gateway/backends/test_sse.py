"""SSE decoding and ChunkStream: multi-line data, comments, keep-alives, [DONE], error events, broken streams."""

from __future__ import annotations

import httpx
import pytest

from gateway.backends import BackendUnavailable, ChunkStream, ServerSentEvent, SSEDecoder

from .conftest import byte_pieces, chunk, run, sse


def test_decoder_joins_data_lines_and_skips_comments_and_unknown_fields():
    decoder = SSEDecoder()
    lines = [": keep-alive", "id: 7", "retry: 100", "event: delta", 'data: {"a":', "data:1}", ""]
    events = [decoder.decode(line) for line in lines]
    assert events[:-1] == [None] * (len(lines) - 1)
    assert events[-1] == ServerSentEvent('{"a":\n1}', "delta")
    assert decoder.decode("") is None  # a second blank line is not an event
    assert [decoder.decode(x) for x in ("event: ping", "")] == [None, None]  # no data, nothing dispatched


async def collect(body: bytes, fail_with: BaseException | None = None) -> tuple[list[dict], list[bool | None]]:
    outcomes: list[bool | None] = []
    response = httpx.Response(200, content=byte_pieces(body, fail_with=fail_with))
    chunks = []
    async with ChunkStream(response, on_close=outcomes.append) as stream:
        async for item in stream:
            chunks.append(item)
    return chunks, outcomes


def test_stream_yields_chunks_until_done():
    body = sse(": keep-alive\n\n", chunk("Hel"), ":\n", "\n", 'data: {"id": "x",\ndata:  "choices": []}\n\n',
               "event: message\r\n", f"data: {sse(chunk('lo'))[6:-2].decode()}\r\n\r\n", "data: [DONE]\n\n",
               chunk("after done is never read"))
    chunks, outcomes = run(collect(body))
    assert chunks == [chunk("Hel"), {"id": "x", "choices": []}, chunk("lo")]
    assert outcomes == [True]


def test_last_event_without_blank_line_is_still_read():
    chunks, outcomes = run(collect(sse(chunk("a")) + b"data: [DONE]"))
    assert chunks == [chunk("a")] and outcomes == [True]


@pytest.mark.parametrize("body, match", [
    (sse(chunk("a"), {"error": {"message": "engine died", "type": "server_error"}}, "data: [DONE]\n\n"),
     "engine died"),
    (sse(chunk("a"), 'event: error\ndata: {"message": "overloaded"}\n\n'), "overloaded"),
    (sse(chunk("a"), "data: not json\n\n"), "malformed"),
    (sse(chunk("a")), "without \\[DONE\\]"),
])
def test_bad_streams_raise_backend_unavailable(body, match):
    seen: list[dict] = []
    outcomes: list[bool | None] = []

    async def main() -> None:
        stream = ChunkStream(httpx.Response(200, content=byte_pieces(body)), on_close=outcomes.append)
        async for item in stream:
            seen.append(item)

    with pytest.raises(BackendUnavailable, match=match):
        run(main())
    assert seen == [chunk("a")] and outcomes == [False]


def test_broken_connection_raises_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="stream broken: ReadError"):
        run(collect(sse(chunk("a")), fail_with=httpx.ReadError("connection reset")))


def test_aclose_before_and_during_iteration_closes_once():
    async def main() -> list[bool | None]:
        outcomes: list[bool | None] = []
        untouched = ChunkStream(httpx.Response(200, content=byte_pieces(sse(chunk("a")))), on_close=outcomes.append)
        await untouched.aclose()
        await untouched.aclose()
        stream = ChunkStream(httpx.Response(200, content=byte_pieces(sse(chunk("a"), chunk("b")))),
                             on_close=outcomes.append)
        assert await stream.__anext__() == chunk("a")
        await stream.aclose()
        assert stream.response.is_closed
        assert [c async for c in stream] == []
        return outcomes

    assert run(main()) == [None, None]
