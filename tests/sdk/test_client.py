"""Requests the clients build and the typed results they return (non-streaming)."""

from __future__ import annotations

import json

import httpx
import pytest

from gateway.sdk import (
    APIResponseValidationError,
    AsyncClient,
    ChatCompletion,
    Client,
    Completion,
    ModelList,
    RouteDecision,
    RouteInfo,
)
from tests.sdk.fakes import MESSAGES, MODEL_ID, ROUTE_HEADERS, chat_completion, resolve

pytestmark = pytest.mark.anyio


async def test_chat_completion_parses_body_and_route_headers(make_client) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={**chat_completion(), "tier": "cloud"}, headers=ROUTE_HEADERS)

    client = make_client(handler)
    completion = await resolve(
        client.chat.completions.create(messages=MESSAGES, max_tokens=16, temperature=0.0, extra_body={"top_k": 4})
    )
    assert isinstance(completion, ChatCompletion)
    assert completion.choices[0].message.content == "Hello!"
    assert completion.model == MODEL_ID
    assert completion.usage is not None and completion.usage.total_tokens == 7
    assert completion.route == RouteInfo(tier="cloud", score=0.73, reason="code request", request_id="req-123")
    assert completion.model_extra == {"tier": "cloud"}, "unknown server fields are kept"
    assert "route" not in completion.model_dump(), "route comes from headers and is not part of the body"

    (request,) = seen
    assert request.method == "POST"
    assert request.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert request.headers["accept"] == "application/json"
    assert json.loads(request.content) == {
        "messages": MESSAGES,
        "model": "auto",
        "stream": False,
        "max_tokens": 16,
        "temperature": 0.0,
        "top_k": 4,
    }


async def test_completion_without_route_headers(make_client) -> None:
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        choice = {"index": 0, "text": " Paris.", "finish_reason": "stop"}
        return httpx.Response(
            200, json={"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [choice]}
        )

    client = make_client(handler)
    completion = await resolve(client.completions.create(prompt="The capital of France is", model="edge", stop=["."]))
    assert isinstance(completion, Completion)
    assert completion.choices[0].text == " Paris."
    assert completion.route is None
    assert seen == [{"prompt": "The capital of France is", "model": "edge", "stream": False, "stop": ["."]}]


@pytest.mark.parametrize("kwargs", [{"messages": MESSAGES}, {"prompt": "Prove it", "model": "cloud"}])
async def test_route(make_client, kwargs: dict) -> None:
    seen: list[httpx.Request] = []
    decision = {"tier": "cloud", "model": "big", "score": 0.8, "threshold": 0.5, "reason": "math", "reasons": ["math"]}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=decision)

    result = await resolve(make_client(handler).route(**kwargs))
    assert result == RouteDecision(**decision)
    assert seen[0].url.path == "/v1/route"
    assert json.loads(seen[0].content) == {"model": "auto", **kwargs}


@pytest.mark.parametrize("kwargs", [{}, {"messages": MESSAGES, "prompt": "both"}])
async def test_route_needs_exactly_one_input(make_client, kwargs: dict) -> None:
    client = make_client(lambda request: httpx.Response(500))
    with pytest.raises(ValueError, match="exactly one"):
        await resolve(client.route(**kwargs))


async def test_models_list_and_health(make_client) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        assert request.method == "GET" and request.url.path == "/v1/models"
        models = [{"id": "edge", "object": "model", "owned_by": "hybrid-gateway"}, {"id": MODEL_ID, "tier": "edge"}]
        return httpx.Response(200, json={"object": "list", "data": models})

    client = make_client(handler)
    models = await resolve(client.models.list())
    assert isinstance(models, ModelList)
    assert [model.id for model in models.data] == ["edge", MODEL_ID]
    assert models.data[1].model_extra == {"tier": "edge"}
    assert await resolve(client.health()) == {"status": "ok"}


async def test_api_key_argument_and_headers(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRID_GATEWAY_API_KEY", "from-env")
    seen: list[httpx.Request] = []
    client = make_client(
        lambda request: seen.append(request) or httpx.Response(200, json={"status": "ok"}),
        api_key="sk-test",
        base_url="http://gw.local/prefix/",
        default_headers={"X-Team": "search"},
    )
    await resolve(client.health())
    assert seen[0].headers["authorization"] == "Bearer sk-test"
    assert seen[0].headers["x-team"] == "search"
    assert seen[0].url == "http://gw.local/prefix/health"


async def test_api_key_from_environment(make_client, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    monkeypatch.setenv("HYBRID_GATEWAY_API_KEY", "from-env")
    await resolve(make_client(handler).health())
    monkeypatch.delenv("HYBRID_GATEWAY_API_KEY")
    await resolve(make_client(handler).health())
    assert seen[0].headers["authorization"] == "Bearer from-env"
    assert "authorization" not in seen[1].headers


async def test_with_options_and_per_call_timeout(make_client) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    client = make_client(handler, timeout=30, max_retries=3)
    quick = client.with_options(max_retries=0, timeout=2.5)
    assert (client.max_retries, quick.max_retries) == (3, 0)
    await resolve(quick.health())
    await resolve(client.health(timeout=httpx.Timeout(1.0, connect=0.5)))
    await resolve(client.health())
    timeouts = [request.extensions["timeout"] for request in seen]
    assert timeouts[0] == httpx.Timeout(2.5).as_dict()
    assert timeouts[1] == httpx.Timeout(1.0, connect=0.5).as_dict()
    assert timeouts[2] == httpx.Timeout(30).as_dict()
    await resolve(quick.aclose() if isinstance(quick, AsyncClient) else quick.close())
    assert await resolve(client.health()) == {"status": "ok"}, "closing a with_options copy keeps the shared pool open"


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"object": "chat.completion"}'])
async def test_malformed_success_body(make_client, body: bytes) -> None:
    client = make_client(lambda request: httpx.Response(200, content=body, headers={"x-request-id": "req-7"}))
    with pytest.raises(APIResponseValidationError) as info:
        await resolve(client.chat.completions.create(messages=MESSAGES))
    assert info.value.request_id == "req-7"


def test_client_owns_only_its_own_pool() -> None:
    http_client = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json={})))
    with Client(http_client=http_client) as client:
        client.health()
    assert not http_client.is_closed, "a caller's http_client stays the caller's to close"
    http_client.close()
    owned = Client(transport=httpx.MockTransport(lambda request: httpx.Response(200)))
    owned.close()
    assert owned._http.is_closed


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_constructor_rejects_bad_arguments(cls: type[Client] | type[AsyncClient]) -> None:
    with pytest.raises(ValueError, match="max_retries"):
        cls(max_retries=-1)
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    with pytest.raises(ValueError, match="not both"):
        cls(transport=transport, http_client=object())  # type: ignore[arg-type]


def test_route_info_from_headers() -> None:
    assert RouteInfo.from_headers(httpx.Headers({})) is None
    pinned = RouteInfo.from_headers(httpx.Headers({"x-hybrid-route": "edge", "x-hybrid-score": ""}))
    assert pinned == RouteInfo(tier="edge"), "a pinned tier has no score"
