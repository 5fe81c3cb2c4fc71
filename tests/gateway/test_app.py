"""The gateway app in-process (``httpx.ASGITransport``) with two real tiny engines as its tiers.

Both tiers are the tiny random Llama on the reference runner, served in-process under different
model ids, so every routing outcome is visible in the response (``model`` and the x-hybrid headers).
The router is the shipped one; its threshold is pinned by settings to force outcomes.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from gateway.app import create_app
from gateway.backends.inprocess import InProcessBackend
from gateway.config import GatewaySettings
from tests.support.engines import TinyServedEngine

USER = [{"role": "user", "content": "What is the capital of France?"}]
CHAT = {"messages": USER, "max_tokens": 4, "temperature": 0, "ignore_eos": True}


def _settings(**kw) -> GatewaySettings:
    return GatewaySettings(**kw)  # the injected tiny tiers replace what these settings would start


def run(tiny, settings: GatewaySettings, scenario, *, cloud=True, edge=True, router=None):
    """Build the app with fresh tiny tiers, run its lifespan, and hand ``scenario`` an httpx client."""
    edge_b = InProcessBackend(TinyServedEngine(tiny, model_id="tiny-edge", name="edge"), name="edge") if edge else None
    cloud_b = (InProcessBackend(TinyServedEngine(tiny, model_id="tiny-cloud", name="cloud"), name="cloud")
               if cloud else None)
    app = create_app(settings, edge=edge_b, cloud=cloud_b, router=router)

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5000))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                return await scenario(client, app)

    return asyncio.run(asyncio.wait_for(main(), timeout=120))


@pytest.mark.parametrize(("threshold", "tier", "model"), [(1.0, "edge", "tiny-edge"), (0.0, "cloud", "tiny-cloud")])
def test_auto_routes_by_router_score(tiny, threshold, tier, model):
    async def scenario(client, app):
        return await client.post("/v1/chat/completions", json=CHAT)

    r = run(tiny, _settings(router_threshold=threshold), scenario)
    assert r.status_code == 200, r.text
    assert r.headers["x-hybrid-route"] == tier and r.headers["x-hybrid-reason"] == "complexity"
    assert 0.0 < float(r.headers["x-hybrid-score"]) < 1.0 and r.headers["x-request-id"]
    body = r.json()
    assert body["model"] == model and body["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(("requested", "tier"), [("edge", "edge"), ("cloud", "cloud"), ("tiny-cloud", "cloud"),
                                                  ("tiny-edge", "edge")])
def test_forced_tiers(tiny, requested, tier):
    async def scenario(client, app):
        return await client.post("/v1/chat/completions", json={**CHAT, "model": requested})

    r = run(tiny, _settings(router_threshold=0.5), scenario)
    assert r.status_code == 200 and r.headers["x-hybrid-route"] == tier and r.headers["x-hybrid-reason"] == "forced"


def test_stream_with_usage_and_headers(tiny):
    async def scenario(client, app):
        async with client.stream("POST", "/v1/chat/completions",
                                 json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}) as r:
            lines = [line async for line in r.aiter_lines() if line]
            return r.headers, lines

    headers, lines = run(tiny, _settings(router_threshold=1.0), scenario)
    assert headers["content-type"].startswith("text/event-stream") and headers["x-hybrid-route"] == "edge"
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    assert all(e["model"] == "tiny-edge" for e in events)


def test_route_endpoint_does_not_generate(tiny):
    async def scenario(client, app):
        r = await client.post("/v1/route", json={"messages": USER})
        stats = app.state.gateway.edge.engine.stats()
        return r, stats

    r, stats = run(tiny, _settings(router_threshold=1.0), scenario)
    body = r.json()
    assert body["tier"] == "edge" and body["model"] == "tiny-edge" and body["reason"] == "complexity"
    assert 0 < body["score"] < 1 and body["threshold"] == 1.0 and body["reasons"]
    assert stats.generated_tokens == 0


def test_sticky_conversation_stays_on_its_tier(tiny):
    async def scenario(client, app):
        first = await client.post("/v1/chat/completions", json=CHAT)
        app.state.gateway.policy.router.threshold = 0.0  # a new conversation would now go to the cloud
        follow = {**CHAT, "messages": [*USER, {"role": "assistant", "content": "Paris."},
                                       {"role": "user", "content": "Prove the Riemann hypothesis rigorously."}]}
        second = await client.post("/v1/chat/completions", json=follow)
        fresh = await client.post("/v1/chat/completions", json={**CHAT, "messages": [
            {"role": "user", "content": "Another conversation entirely"}]})
        return first, second, fresh

    first, second, fresh = run(tiny, _settings(router_threshold=1.0), scenario)
    assert first.headers["x-hybrid-route"] == "edge"
    assert second.headers["x-hybrid-route"] == "edge" and second.headers["x-hybrid-reason"] == "sticky"
    assert fresh.headers["x-hybrid-route"] == "cloud"


def test_edge_overloaded_goes_to_cloud(tiny):
    async def scenario(client, app):
        app.state.gateway.policy.ttft_target_s = 1e-9  # any queue misses this target
        return await client.post("/v1/chat/completions", json=CHAT)

    r = run(tiny, _settings(router_threshold=1.0), scenario)
    assert r.headers["x-hybrid-route"] == "cloud" and r.headers["x-hybrid-reason"] == "edge_overloaded"


def test_cloud_down_serves_on_edge_and_says_so(tiny):
    async def scenario(client, app):
        app.state.gateway.cloud.engine.shutdown()
        auto = await client.post("/v1/chat/completions", json=CHAT)
        forced = await client.post("/v1/chat/completions", json={**CHAT, "model": "cloud"})
        return auto, forced

    auto, forced = run(tiny, _settings(router_threshold=0.0), scenario)
    assert auto.status_code == 200 and auto.headers["x-hybrid-route"] == "edge"
    assert auto.headers["x-hybrid-reason"] == "cloud_unavailable" and auto.json()["model"] == "tiny-edge"
    assert forced.status_code == 503 and forced.json()["error"]["code"] == "tier_unavailable"
    assert forced.headers["retry-after"]


def test_single_tier_gateway(tiny):
    async def scenario(client, app):
        return (await client.post("/v1/chat/completions", json=CHAT),
                await client.post("/v1/chat/completions", json={**CHAT, "model": "cloud"}))

    only_edge, forced_cloud = run(tiny, _settings(router_threshold=0.0, cloud_enabled=False), scenario,
                                  cloud=False)
    assert only_edge.headers["x-hybrid-route"] == "edge" and only_edge.headers["x-hybrid-reason"] == "only_tier"
    assert forced_cloud.status_code == 503


@pytest.mark.parametrize(("payload", "status", "code"), [
    ({**CHAT, "model": "gpt-9"}, 404, "model_not_found"),
    ({**CHAT, "n": 2}, 400, "unsupported_parameter"),
    ({**CHAT, "max_tokens": 0}, 400, None),
    ({**CHAT, "max_tokens": -1}, 400, None),
    ({**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded"),
    ({**CHAT, "messages": [{"role": "user", "content": "x" * 3000}]}, 413, "prompt_too_large"),
    ({**CHAT, "temperature": "warm"}, 422, "invalid_value"),
    ({"max_tokens": 3}, 422, "invalid_value"),
    ({**CHAT, "messages": []}, 422, "invalid_value"),
])
def test_bad_input_is_an_openai_error_and_leaks_nothing(tiny, payload, status, code):
    async def scenario(client, app):
        r = await client.post("/v1/chat/completions", json=payload)
        ok = await client.post("/v1/chat/completions", json=CHAT)
        return r, ok, app.state.gateway.edge.engine.stats()

    r, ok, stats = run(tiny, _settings(router_threshold=1.0, max_prompt_chars=2500), scenario)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"] == code
    assert ok.status_code == 200 and stats.num_blocks_used == 0


def test_body_too_large_and_bad_json(tiny):
    async def scenario(client, app):
        big = await client.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 5000})
        bad = await client.post("/v1/chat/completions", content=b"{oops", headers={"content-type": "application/json"})
        return big, bad

    big, bad = run(tiny, _settings(router_threshold=1.0, max_body_bytes=4096), scenario)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_api_keys_and_rate_limit(tiny):
    async def scenario(client, app):
        no_key = await client.post("/v1/chat/completions", json=CHAT)
        wrong = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer nope"})
        good = [await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-a"})
                for _ in range(3)]
        other = await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-b"})
        return no_key, wrong, good, other

    no_key, wrong, good, other = run(tiny, _settings(router_threshold=1.0, api_keys=["sk-a", "sk-b"],
                                                     require_api_key=True, rate_limit_rpm=2, rate_limit_burst=2),
                                     scenario)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401
    assert [r.status_code for r in good] == [200, 200, 429]
    assert int(good[2].headers["retry-after"]) >= 1 and good[2].json()["error"]["type"] == "rate_limit_error"
    assert other.status_code == 200  # limits are per key


def test_models_health_ready_metrics(tiny):
    async def scenario(client, app):
        await client.post("/v1/chat/completions", json=CHAT)
        await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
        return (await client.get("/v1/models"), await client.get("/health"), await client.get("/ready"),
                await client.get("/metrics"))

    models, health, ready, metrics = run(tiny, _settings(router_threshold=1.0), scenario)
    ids = [m["id"] for m in models.json()["data"]]
    assert ids == ["auto", "edge", "tiny-edge", "cloud", "tiny-cloud"]
    assert health.json()["tiers"]["edge"]["healthy"] and ready.status_code == 200
    text = metrics.text
    assert 'hybrid:routing_decisions_total{reason="complexity",tier="edge"} 1.0' in text
    assert 'hybrid:requests_total{status="200",tier="edge"} 1.0' in text
    assert 'hybrid:generation_tokens_total{tier="edge"} 4.0' in text
    assert "hybrid:router_score_count 1.0" in text
    assert 'hybrid:kv_cache_blocks{state="free",tier="edge"}' in text


def test_ready_is_503_when_no_tier_can_serve(tiny):
    async def scenario(client, app):
        app.state.gateway.edge.engine.shutdown()
        return await client.get("/ready"), await client.post("/v1/chat/completions", json=CHAT)

    ready, chat = run(tiny, _settings(router_threshold=1.0, cloud_enabled=False), scenario, cloud=False)
    assert ready.status_code == 503 and chat.status_code == 503


def test_completions_endpoint(tiny):
    async def scenario(client, app):
        return await client.post("/v1/completions", json={"prompt": "one two three", "max_tokens": 3,
                                                         "temperature": 0, "ignore_eos": True})

    r = run(tiny, _settings(router_threshold=1.0), scenario)
    assert r.status_code == 200 and r.json()["object"] == "text_completion"
    assert r.headers["x-hybrid-route"] == "edge" and r.json()["usage"]["completion_tokens"] == 3


def test_metrics_count_refusals_by_status(tiny):
    async def scenario(client, app):
        await client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-9"})
        await client.post("/v1/chat/completions", json={"max_tokens": 3})
        await client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer wrong"})
        async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            [line async for line in r.aiter_lines()]
        return (await client.get("/metrics")).text

    text = run(tiny, _settings(router_threshold=1.0, api_keys=["sk-a"]), scenario)
    assert 'hybrid:requests_total{status="404",tier="none"} 1.0' in text
    assert 'hybrid:requests_total{status="422",tier="none"} 1.0' in text
    assert 'hybrid:requests_total{status="401",tier="none"} 1.0' in text
    assert 'hybrid:requests_total{status="200",tier="edge"} 1.0' in text
    assert 'hybrid:e2e_request_latency_seconds_count{tier="edge"} 1.0' in text


def test_stream_without_include_usage_hides_usage_but_limits_count_tokens(tiny):
    async def scenario(client, app):
        async with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            lines = [line async for line in r.aiter_lines() if line]
        return lines, (await client.get("/metrics")).text

    lines, text = run(tiny, _settings(router_threshold=1.0), scenario)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["choices"] and "usage" not in e for e in events)
    assert 'hybrid:generation_tokens_total{tier="edge"} 4.0' in text
    assert 'hybrid:time_to_first_token_seconds_count{tier="edge"} 1.0' in text
    assert 'hybrid:time_per_output_token_seconds_count{tier="edge"} 1.0' in text


@pytest.mark.slow
def test_accurate_router_mode_serves_and_scores(tiny):
    """router_mode=accurate: the shipped accurate router (MiniLM from PyPI) scores off the event loop."""
    from gateway.routing import default_router

    async def scenario(client, app):
        route = await client.post("/v1/route", json={"messages": USER})
        chat = await client.post("/v1/chat/completions", json=CHAT)
        return route, chat

    route, chat = run(tiny, _settings(router_mode="accurate"), scenario)
    assert route.status_code == 200 and chat.status_code == 200, (route.text, chat.text)
    expected = default_router("accurate").score(USER)
    assert route.json()["score"] == pytest.approx(expected, abs=1e-9)
    assert float(chat.headers["x-hybrid-score"]) == pytest.approx(expected, abs=1e-3)
