"""The gateway on a real uvicorn socket, its cloud tier a real cloud server over HTTP, and the official
``openai`` client in front: chat, streaming, usage, routing headers, fallback when the cloud is
killed, failover back when it returns, and a client disconnect reaching the cloud engine.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from cloud.server import create_app as create_cloud_app
from gateway.app import create_app
from gateway.backends.inprocess import InProcessBackend
from gateway.config import GatewaySettings
from tests.support.engines import TinyServedEngine
from tests.support.live_server import live_server

MESSAGES = [{"role": "user", "content": "Explain how a B-tree rebalances."}]
ARGS = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


@pytest.fixture()
def stack(tiny):
    """(gateway url, cloud port, start_cloud) with the cloud running; routing threshold 0 = auto goes to cloud."""
    cloud_port = _free_port()

    def start_cloud():
        return live_server(create_cloud_app(lambda: TinyServedEngine(tiny, model_id="tiny-cloud")), port=cloud_port)

    settings = GatewaySettings(cloud_url=[f"http://127.0.0.1:{cloud_port}"], router_threshold=0.0,
                               health_interval_s=0.2, breaker_failures=1, breaker_cooldown_s=0.3,
                               cloud_max_retries=0, sticky_sessions=False)
    edge = InProcessBackend(TinyServedEngine(tiny, model_id="tiny-edge", name="edge"), name="edge")
    cloud_ctx = start_cloud()
    cloud_ctx.__enter__()
    try:
        with live_server(create_app(settings, edge=edge)) as url:
            yield url, cloud_port, start_cloud, cloud_ctx
    finally:
        cloud_ctx.__exit__(None, None, None)


def test_openai_client_through_gateway_to_cloud(stack):
    url, *_ = stack
    with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(model="auto", **ARGS)
        reply = raw.parse()
        assert raw.headers["x-hybrid-route"] == "cloud" and reply.model == "tiny-cloud"
        assert reply.usage.completion_tokens == 6
        chunks = list(client.chat.completions.create(model="auto", stream=True,
                                                     stream_options={"include_usage": True}, **ARGS))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == reply.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 6
        edge = client.chat.completions.with_raw_response.create(model="edge", **ARGS)
        assert edge.headers["x-hybrid-route"] == "edge" and edge.parse().model == "tiny-edge"
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-9", **ARGS)


def test_fallback_when_cloud_dies_and_failover_back(stack):
    url, cloud_port, start_cloud, cloud_ctx = stack
    assert httpx.post(url + "/v1/chat/completions", json={**ARGS["extra_body"], "messages": MESSAGES,
                                                         "max_tokens": 3}).headers["x-hybrid-route"] == "cloud"
    cloud_ctx.__exit__(None, None, None)  # kill the cloud
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.headers["x-hybrid-route"] == "edge"
    assert r.headers["x-hybrid-reason"] in ("cloud_failed", "cloud_unavailable")
    _wait_for(lambda: not httpx.get(url + "/health").json()["tiers"]["cloud"]["healthy"], what="cloud marked down")
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3, "ignore_eos": True})
    assert r.headers["x-hybrid-route"] == "edge" and r.headers["x-hybrid-reason"] == "cloud_unavailable"
    assert httpx.get(url + "/ready").status_code == 200  # the edge still serves
    with start_cloud():  # the cloud comes back on the same port
        _wait_for(lambda: httpx.get(url + "/health").json()["tiers"]["cloud"]["healthy"], what="cloud back")
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3})
        assert r.status_code == 200 and r.headers["x-hybrid-route"] == "cloud"


def test_client_disconnect_aborts_the_cloud_request(stack):
    url, cloud_port, *_ = stack
    cloud = f"http://127.0.0.1:{cloud_port}"
    payload = {"messages": MESSAGES, "max_tokens": 220, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=30) as r:
        assert r.headers["x-hybrid-route"] == "cloud"
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    stats = _wait_for(lambda: (s := httpx.get(cloud + "/stats").json())["num_running"] == 0
                      and s["num_blocks_used"] == 0 and s, what="cloud engine idle")
    assert stats["generated_tokens"] < 220


def test_metrics_include_the_remote_cloud_engine_state(stack):
    url, *_ = stack
    httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 3})
    _wait_for(lambda: 'hybrid:kv_cache_blocks{state="free",tier="cloud"}' in httpx.get(url + "/metrics").text,
              what="cloud KV blocks in /metrics")
    assert httpx.get(url + "/health").json()["tiers"]["cloud"]["healthy"]


def test_sdk_against_the_live_gateway(stack):
    import asyncio

    from gateway.sdk import AsyncClient, Client, NotFoundError

    url, *_ = stack
    with Client(url, max_retries=0) as client:
        reply = client.chat.completions.create(messages=MESSAGES, max_tokens=4, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert reply.route.tier == "cloud" and reply.model == "tiny-cloud" and reply.route.request_id
        assert reply.usage.completion_tokens == 4
        with client.chat.completions.create(messages=MESSAGES, model="edge", max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}) as stream:
            chunks = list(stream)
        assert stream.route.tier == "edge" and chunks[-1].usage.completion_tokens == 4
        decision = client.route(messages=MESSAGES)
        assert decision.tier == "cloud" and decision.model == "tiny-cloud" and decision.reasons
        assert {"auto", "edge", "cloud"} <= {m.id for m in client.models.list().data}
        with pytest.raises(NotFoundError):
            client.chat.completions.create(messages=MESSAGES, model="gpt-9")

    async def async_calls():
        async with AsyncClient(url, max_retries=0) as client:
            reply = await client.chat.completions.create(messages=MESSAGES, model="edge", max_tokens=3,
                                                         extra_body={"ignore_eos": True})
            stream = await client.chat.completions.create(messages=MESSAGES, max_tokens=3, stream=True,
                                                          extra_body={"ignore_eos": True})
            async with stream:
                n = len([c async for c in stream])
            return reply, n

    reply, n = asyncio.run(async_calls())
    assert reply.route.tier == "edge" and n >= 2
