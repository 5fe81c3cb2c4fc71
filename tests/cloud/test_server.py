"""The cloud HTTP server on a real uvicorn socket: the official ``openai`` client, errors, disconnects.

The engine behind it is the tiny random Llama on the reference runner (TP engines have their own
tests in this folder; ``test_server_tp.py`` puts a TP=2 engine behind the same server).
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from cloud.server import create_app
from tests.support.engines import TinyServedEngine
from tests.support.live_server import live_server

MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def base_url(tiny):
    with live_server(create_app(lambda: TinyServedEngine(tiny))) as url:
        yield url


@pytest.fixture()
def client(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _wait_idle(base_url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(base_url + "/stats").json()
        if stats["num_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: {stats}")
        time.sleep(0.05)


def test_openai_client_chat_non_stream(client):
    reply = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.model == "tiny-llama" and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5 and reply.usage.total_tokens == reply.usage.prompt_tokens + 5


def test_openai_client_stream_with_usage_matches_non_stream(client):
    args = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    full = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_openai_client_completions_and_models(client):
    out = client.completions.create(model="tiny-llama", prompt="one two", max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.usage.completion_tokens == 4
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]


def test_health(base_url):
    body = httpx.get(base_url + "/health").json()
    assert body["status"] == "ok" and body["model"] == "tiny-llama"


@pytest.mark.parametrize(("payload", "status", "code"), [
    ({"model": "gpt-9", "messages": MESSAGES}, 404, "model_not_found"),
    ({"messages": MESSAGES, "n": 3}, 400, "unsupported_parameter"),
    ({"messages": MESSAGES, "max_tokens": 0}, 400, None),
    ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded"),
    ({"messages": MESSAGES, "temperature": "hot"}, 422, "invalid_value"),
    ({"model": "tiny-llama"}, 422, "invalid_value"),
])
def test_bad_input_gets_openai_error_json(base_url, payload, status, code):
    r = httpx.post(base_url + "/v1/chat/completions", json=payload)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == code
    _wait_idle(base_url)


def test_malformed_json_and_unknown_route(base_url):
    r = httpx.post(base_url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(base_url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=0)


def test_disconnect_mid_stream_frees_blocks(base_url):
    payload = {"messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=payload, timeout=30) as r:
        lines = r.iter_lines()
        received = [next(lines) for _ in range(4)]
    assert any(line.startswith("data: {") for line in received)
    stats = _wait_idle(base_url)
    assert stats["generated_tokens"] < 200 + 40  # it stopped long before its 200 tokens


def test_disconnect_during_non_stream_request_frees_blocks(base_url):
    payload = {"messages": MESSAGES, "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/chat/completions", json=payload, timeout=httpx.Timeout(5, read=0.05))
    _wait_idle(base_url)
