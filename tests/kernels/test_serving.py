"""OpenAIServing over a real (tiny) engine: response shapes, usage, streams, errors, aborts."""

from __future__ import annotations

import asyncio

import pytest

from kernels.errors import InvalidRequestError
from kernels.serving import OpenAIError, OpenAIServing, ResponseStream, sse_bytes
from tests.support.engines import TinyServedEngine

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


@pytest.fixture()
def serving(tiny):
    engine = TinyServedEngine(tiny).start()
    yield OpenAIServing(engine, engine.tokenizer, engine.model_id)
    engine.shutdown()


def test_chat_non_stream_shape_and_usage(serving):
    body = _run(serving.chat_completions(CHAT))
    assert body["object"] == "chat.completion" and body["model"] == "tiny-llama"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt_len = len(serving.tokenizer.encode_chat(CHAT["messages"]))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 6, "total_tokens": prompt_len + 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_stream_text_equals_non_stream_and_usage_chunk_last(serving):
    async def main():
        full = await serving.chat_completions(CHAT)
        stream = await serving.chat_completions({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
        chunks = [c async for c in stream]
        return full, chunks

    full, chunks = _run(main())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completion_prompt_text_and_token_ids(serving):
    ids = serving.tokenizer.encode("once upon", add_special_tokens=True)
    a = _run(serving.completions({"prompt": "once upon", "max_tokens": 5, "temperature": 0, "ignore_eos": True}))
    b = _run(serving.completions({"prompt": ids, "max_tokens": 5, "temperature": 0, "ignore_eos": True}))
    assert a["object"] == "text_completion" and a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["prompt_tokens"] == len(ids) and a["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(("patch", "status", "param"), [
    ({"n": 2}, 400, "n"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 422, "messages.0.role"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
])
def test_bad_requests_raise_openai_errors(serving, patch, status, param):
    with pytest.raises(OpenAIError) as info:
        _run(serving.chat_completions({**CHAT, **patch}))
    assert info.value.status_code == status and info.value.param == param


@pytest.mark.parametrize("patch", [{"max_tokens": 0}, {"max_tokens": -3}, {"top_p": 0}, {"temperature": -1},
                                   {"messages": [{"role": "user", "content": "word " * 400}]}])
def test_value_errors_are_invalid_request_and_engine_keeps_serving(serving, patch):
    with pytest.raises(InvalidRequestError):
        _run(serving.chat_completions({**CHAT, **patch}))
    assert _run(serving.chat_completions(CHAT))["usage"]["completion_tokens"] == 6
    assert serving.engine.stats().num_blocks_used == 0


def test_closing_a_stream_early_frees_its_blocks(serving):
    async def main():
        stream = await serving.chat_completions({**CHAT, "max_tokens": 200, "stream": True})
        assert isinstance(stream, ResponseStream)
        first = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()
        return first

    first = _run(main())
    assert len(first) == 3
    stats = serving.engine.stats()
    assert stats.num_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_closing_an_unstarted_stream_aborts_it(serving):
    async def main():
        stream = await serving.chat_completions({**CHAT, "max_tokens": 200, "stream": True})
        await stream.aclose()

    _run(main())
    assert serving.engine.stats().num_running == 0 and serving.engine.stats().num_blocks_used == 0


def test_sse_bytes_frames_and_turns_failures_into_error_events():
    async def chunks():
        yield {"a": 1}
        raise RuntimeError("boom")

    async def main():
        return [b async for b in sse_bytes(chunks())]

    frames = _run(main())
    assert frames[0] == b'data: {"a":1}\n\n'
    assert b'"error"' in frames[1] and b"boom" in frames[1]
    assert frames[-1] == b"data: [DONE]\n\n"


def test_a_stream_read_only_after_its_request_finished_still_delivers_everything(serving):
    async def main():
        stream = await serving.chat_completions({**CHAT, "max_tokens": 3, "stream": True,
                                                 "stream_options": {"include_usage": True}})
        while serving.engine.stats().num_running or serving.engine.stats().num_waiting:
            await asyncio.sleep(0.01)  # the request finishes before anyone reads it
        return [c async for c in stream]

    chunks = _run(main())
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-2]["choices"][0]["finish_reason"] == "length"
