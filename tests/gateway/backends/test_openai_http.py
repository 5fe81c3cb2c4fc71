"""OpenAIHTTPBackend against httpx.MockTransport: rewriting, errors, retries, breakers, balancing, discovery."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import pytest

from gateway.backends import Backend, BackendUnavailable, OpenAIHTTPBackend, UpstreamError

from .conftest import byte_pieces, chunk, completion, run, sse


async def _settle(predicate, timeout_s: float = 5.0) -> None:
    """Yield to the event loop until ``predicate()`` holds (a loaded machine may need more than a tick)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)

URLS = ["http://r0", "http://r1/v1", "http://r2/"]


def backend(handler, urls=URLS, **kwargs) -> OpenAIHTTPBackend:
    kwargs = {"model_id": "real-model", "health_interval_s": 0, **kwargs}
    return OpenAIHTTPBackend(urls, transport=httpx.MockTransport(handler), **kwargs)


def test_is_a_backend_and_normalizes_urls():
    cloud = backend(lambda request: httpx.Response(200))
    assert isinstance(cloud, Backend)
    assert [s["url"] for s in cloud.replica_states()] == ["http://r0", "http://r1", "http://r2"]
    with pytest.raises(ValueError, match="http"):
        OpenAIHTTPBackend(["r0:8000"])
    run(cloud.aclose())


def test_non_stream_success_rewrites_model_and_sends_api_key():
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=completion(json.loads(request.content)["model"]))

    async def main() -> dict:
        cloud = backend(handler, urls=["http://r0:8001/v1"], api_key="sk-test")
        try:
            body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
            out = await cloud.chat_completions(body, stream=False)
            assert body["model"] == "auto"  # the caller's dict is left alone
            assert cloud.load().outstanding == 0
            return out
        finally:
            await cloud.aclose()

    assert run(main())["model"] == "real-model"
    (request,) = seen
    assert str(request.url) == "http://r0:8001/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert json.loads(request.content) == {"model": "real-model", "stream": False,
                                           "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("response, expected_body", [
    (httpx.Response(429, json={"error": {"message": "slow down", "type": "rate_limit_error", "code": "rl"}},
                    headers={"Retry-After": "3", "x-ratelimit-remaining-requests": "0", "server": "x"}),
     {"error": {"message": "slow down", "type": "rate_limit_error", "code": "rl"}}),
    (httpx.Response(400, text="bad prompt", headers={"Retry-After": "3"}),
     {"error": {"message": "bad prompt", "type": "invalid_request_error", "param": None, "code": None}}),
    (httpx.Response(422, json={"detail": "messages: field required"}, headers={"Retry-After": "3"}),
     {"error": {"message": "messages: field required", "type": "invalid_request_error", "param": None,
                "code": None}}),
])
def test_4xx_is_passed_through_and_never_retried(response, expected_body):
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        return response

    async def main() -> None:
        cloud = backend(handler)
        try:
            for stream in (False, True):
                with pytest.raises(UpstreamError) as info:
                    await cloud.completions({"prompt": "x"}, stream=stream)
                assert info.value.status_code == response.status_code
                assert info.value.body == expected_body
                assert info.value.headers["retry-after"] == "3" and "server" not in info.value.headers
            assert all(s["state"] == "closed" and s["outstanding"] == 0 for s in cloud.replica_states())
        finally:
            await cloud.aclose()

    run(main())
    assert len(calls) == 2  # one per call: no retries


def test_500_is_retried_on_the_next_replica():
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        if request.url.host == "r0":
            return httpx.Response(500, text="boom")
        return httpx.Response(200, json=completion("real-model", request.url.host))

    async def main() -> dict:
        cloud = backend(handler, urls=URLS[:2])
        try:
            return await cloud.chat_completions({"messages": []}, stream=False)
        finally:
            await cloud.aclose()

    assert run(main())["choices"][0]["message"]["content"] == "r1"
    assert calls == ["r0", "r1"]


@pytest.mark.parametrize("stream", [False, True])
def test_connect_error_everywhere_is_backend_unavailable_after_max_retries(stream):
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        raise httpx.ConnectError("connection refused", request=request)

    async def main() -> None:
        cloud = backend(handler, max_retries=4, breaker_failures=10)
        try:
            with pytest.raises(BackendUnavailable, match="after 5 attempt.*ConnectError") as info:
                await cloud.chat_completions({"messages": []}, stream=stream)
            assert "refused" in info.value.reason
            assert cloud.load().outstanding == 0
        finally:
            await cloud.aclose()

    run(main())
    assert len(calls) == 5 and set(calls[:3]) == {"r0", "r1", "r2"}  # each replica before any repeat


def test_breaker_opens_after_failures_and_the_replica_is_skipped():
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        if request.url.host == "r0":
            raise httpx.ConnectTimeout("timed out", request=request)
        return httpx.Response(200, json=completion("real-model"))

    async def main() -> None:
        cloud = backend(handler, urls=URLS[:2], breaker_failures=2, breaker_cooldown_s=60)
        try:
            for _ in range(6):
                await cloud.chat_completions({"messages": []}, stream=False)
            states = cloud.replica_states()
            assert states[0]["state"] == "open" and not states[0]["healthy"]
            assert states[0]["consecutive_failures"] == 2 and states[1]["state"] == "closed"
            assert cloud.healthy()
        finally:
            await cloud.aclose()

    run(main())
    assert calls.count("r0") == 2 and calls.count("r1") == 6


def test_all_circuits_open_fails_fast_without_a_request():
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        return httpx.Response(503)

    async def main() -> None:
        cloud = backend(handler, urls=URLS[:1], breaker_failures=1, breaker_cooldown_s=60, max_retries=0)
        try:
            with pytest.raises(BackendUnavailable, match="HTTP 503"):
                await cloud.chat_completions({"messages": []}, stream=False)
            assert not cloud.healthy()
            with pytest.raises(BackendUnavailable, match="circuits open"):
                await cloud.chat_completions({"messages": []}, stream=False)
        finally:
            await cloud.aclose()

    run(main())
    assert calls == ["r0"]


def test_least_outstanding_balancing_with_concurrent_slow_requests():
    gates: dict[str, asyncio.Event] = {}
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        calls.append(host)
        await gates.setdefault(host, asyncio.Event()).wait()
        return httpx.Response(200, json=completion("real-model", host))

    async def main() -> None:
        cloud = backend(handler)
        try:
            send = lambda: asyncio.create_task(cloud.chat_completions({"messages": []}, stream=False))  # noqa: E731
            first = [send() for _ in range(6)]
            await _settle(lambda: len(calls) == 6)
            assert Counter(calls) == {"r0": 2, "r1": 2, "r2": 2}
            assert cloud.load().outstanding == 6
            gates["r1"].set()  # r1 finishes both of its requests; the next two must go there
            while cloud.replica_states()[1]["outstanding"]:
                await asyncio.sleep(0.01)
            gates["r1"].clear()
            calls.clear()
            second = [send() for _ in range(2)]
            await _settle(lambda: len(calls) == 2)
            await asyncio.sleep(0.02)  # room for a wrong third call to show up
            assert calls == ["r1", "r1"]
            for gate in gates.values():
                gate.set()
            results = await asyncio.gather(*first, *second)
            assert Counter(r["choices"][0]["message"]["content"] for r in results) == {"r0": 2, "r1": 4, "r2": 2}
            assert cloud.load().outstanding == 0
        finally:
            await cloud.aclose()

    run(main())


def test_model_is_discovered_from_v1_models_at_start_and_at_first_use():
    models_calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            models_calls.append(request.url.host)
            return httpx.Response(200, json={"object": "list", "data": [{"id": "Qwen/Qwen2.5-7B"}, {"id": "b"}]})
        return httpx.Response(200, json=completion(json.loads(request.content)["model"]))

    async def main() -> None:
        started = backend(handler, model_id=None)
        lazy = backend(handler, model_id=None)
        try:
            await started.start()
            assert started.model_id == "Qwen/Qwen2.5-7B"
            assert lazy.model_id is None
            out = await lazy.chat_completions({"model": "auto", "messages": []}, stream=False)
            assert out["model"] == lazy.model_id == "Qwen/Qwen2.5-7B"
            await lazy.chat_completions({"model": "auto", "messages": []}, stream=False)
        finally:
            await started.aclose()
            await lazy.aclose()

    run(main())
    assert len(models_calls) == 2  # once per backend, not per request


def test_stream_rewrites_model_and_yields_chunks():
    seen = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        body = sse(": keep-alive\n\n", chunk("a"), 'data: {"id": "x",\ndata: "choices": []}\n\n', "data: [DONE]\n\n")
        return httpx.Response(200, content=byte_pieces(body), headers={"content-type": "text/event-stream"})

    async def main() -> list[dict]:
        cloud = backend(handler)
        try:
            stream = await cloud.chat_completions({"model": "auto", "messages": []}, stream=True)
            assert cloud.load().outstanding == 1
            chunks = [c async for c in stream]
            assert cloud.load().outstanding == 0
            return chunks
        finally:
            await cloud.aclose()

    assert run(main()) == [chunk("a"), {"id": "x", "choices": []}]
    assert seen[0]["model"] == "real-model" and seen[0]["stream"] is True


def test_error_event_mid_stream_is_backend_unavailable_and_counts_as_a_failure():
    async def handler(request: httpx.Request) -> httpx.Response:
        body = sse(chunk("a"), {"error": {"message": "CUDA out of memory", "type": "server_error"}}, "data: [DONE]\n\n")
        return httpx.Response(200, content=byte_pieces(body))

    async def main() -> None:
        cloud = backend(handler, urls=URLS[:1])
        try:
            stream = await cloud.chat_completions({"messages": []}, stream=True)
            assert await stream.__anext__() == chunk("a")
            with pytest.raises(BackendUnavailable, match="CUDA out of memory"):
                await stream.__anext__()
            (state,) = cloud.replica_states()
            assert state["outstanding"] == 0 and state["consecutive_failures"] == 1
        finally:
            await cloud.aclose()

    run(main())


def test_stream_5xx_before_first_byte_is_retried():
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        if request.url.host == "r0":
            return httpx.Response(502, text="bad gateway")
        return httpx.Response(200, content=sse(chunk(request.url.host), "data: [DONE]\n\n"))

    async def main() -> list[dict]:
        cloud = backend(handler, urls=URLS[:2])
        try:
            stream = await cloud.chat_completions({"messages": []}, stream=True)
            return [c async for c in stream]
        finally:
            await cloud.aclose()

    assert run(main()) == [chunk("r1")]
    assert calls == ["r0", "r1"]


def test_health_probe_falls_back_to_v1_models_and_tracks_the_replica():
    paths = []
    up = {"r0": True}

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if not up["r0"]:
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(404)
        return httpx.Response(200, json={"data": [{"id": "m"}]})

    async def until(predicate) -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    async def main() -> None:
        cloud = backend(handler, urls=URLS[:1], health_interval_s=0.01, breaker_failures=2, breaker_cooldown_s=60)
        try:
            await cloud.start()
            await until(lambda: paths.count("/v1/models") >= 3)
            assert paths.count("/health") == 1  # learnt that there is none
            up["r0"] = False
            await until(lambda: not cloud.healthy())
            up["r0"] = True
            await until(cloud.healthy)  # long before the 60 s cooldown
        finally:
            await cloud.aclose()

    run(main(), timeout=10)
