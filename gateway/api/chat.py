"""``POST /v1/chat/completions``, ``POST /v1/completions`` and ``POST /v1/route``.

Route functions stay free of try/except except for the one thing only they can do: fall back to
the other tier when the chosen one fails before answering. Everything else is an exception that
the handlers registered in ``create_app`` turn into an OpenAI-style error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.background import BackgroundTask

from gateway.backends import Backend, BackendUnavailable
from gateway.backends.inprocess import InProcessBackend
from gateway.policy import Decision
from kernels.serving import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OpenAIError,
    StreamOptions,
    sse_bytes,
    unless_disconnected,
)

router = APIRouter()


def gateway(request: Request):
    return request.app.state.gateway


async def caller(request: Request) -> str:
    """Auth (401) then rate limit (429); returns the caller identity. Runs before the body is validated."""
    gw = gateway(request)
    identity = await gw.auth(request)
    gw.limiter.check(identity)
    return identity


class RouteRequest(BaseModel):
    """``POST /v1/route``: where a request would go, without generating."""

    model_config = ConfigDict(extra="allow")
    model: str = "auto"
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: str | None = None

    @model_validator(mode="after")
    def _one_input(self) -> RouteRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        return self


def _check_prompt_size(gw, prompt: str | list[dict[str, Any]]) -> None:
    chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
    if chars > gw.settings.max_prompt_chars:
        raise OpenAIError(413, f"prompt has {chars} characters; the limit is {gw.settings.max_prompt_chars}",
                          param="messages", code="prompt_too_large")


async def _body(request: Request, model: type[BaseModel]) -> Any:
    """The request body validated as ``model``, straight from bytes (pydantic-core parses the JSON).

    Done here rather than by FastAPI's body parameter, whose dependency machinery cost ~0.2 ms per
    request on our CPU; errors raise the same ``RequestValidationError`` (400 for non-JSON, else 422).
    """
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


@router.post("/v1/route")
async def route(request: Request) -> dict[str, Any]:
    identity = await caller(request)
    body = await _body(request, RouteRequest)
    gw = gateway(request)
    prompt = [{"role": m.role, "content": m.text()} for m in body.messages] if body.messages else body.prompt
    _check_prompt_size(gw, prompt)
    d = gw.policy.decide(body.model, prompt, identity=identity, session=request.headers.get("x-hybrid-session"),
                         record=False, scored=await gw.policy.score_async(prompt))
    backend = gw.policy.backend(d.tier)
    return {"tier": d.tier, "model": backend.model_id, "score": d.score, "threshold": d.threshold,
            "reason": d.reason, "reasons": d.reasons}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    identity = await caller(request)  # 401 / 429 before the body is even parsed
    body: ChatCompletionRequest = await _body(request, ChatCompletionRequest)
    return await _serve(request, "chat", body, body.plain_messages(), identity)


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    identity = await caller(request)
    body: CompletionRequest = await _body(request, CompletionRequest)
    text = body.prompt_text()
    return await _serve(request, "completion", body, text if text is not None else "", identity)


async def _call(backend: Backend, kind: str, body: ChatCompletionRequest | CompletionRequest) -> Any:
    # In-process engines take the validated object; HTTP backends get what the client sent (extras included).
    payload: Any = body if isinstance(backend, InProcessBackend) else body.model_dump(exclude_unset=True)
    method = backend.chat_completions if kind == "chat" else backend.completions
    return await method(payload, stream=body.stream)


async def _serve(request: Request, kind: str, body: ChatCompletionRequest | CompletionRequest,
                 prompt: str | list[dict[str, Any]], identity: str) -> Any:
    gw = gateway(request)
    start = time.perf_counter()
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    _check_prompt_size(gw, prompt)
    decision = gw.policy.decide(body.model, prompt, identity=identity,
                                session=request.headers.get("x-hybrid-session"),
                                scored=await gw.policy.score_async(prompt))
    strip_usage = body.stream and not body.include_usage
    if strip_usage:
        body.stream_options = StreamOptions(include_usage=True)  # exact token counts for limits and metrics
    try:
        result = await _call(gw.policy.backend(decision.tier), kind, body) if body.stream else \
            await unless_disconnected(request, _call(gw.policy.backend(decision.tier), kind, body))
    except BackendUnavailable as exc:
        fallback = gw.policy.fallback(decision, exc)
        if fallback is None:
            raise
        decision = fallback
        result = await _call(gw.policy.backend(decision.tier), kind, body) if body.stream else \
            await unless_disconnected(request, _call(gw.policy.backend(decision.tier), kind, body))
    gw.metrics.observe_route(decision.tier, decision.reason, decision.score)
    headers = {**decision.headers(), "x-request-id": request_id}
    if body.stream:
        chunks = _instrumented(gw, decision, identity, result, start, strip_usage)
        return StreamingResponse(sse_bytes(chunks), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"},
                                 background=BackgroundTask(_close, result))
    usage = result.get("usage") or {}
    gw.metrics.observe_tokens(decision.tier, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
    gw.limiter.record_tokens(identity, usage.get("total_tokens", 0))
    return JSONResponse(result, headers=headers)


async def _close(stream: Any) -> None:
    """Close a backend stream (idempotent): runs after the response, also when the client went away."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _carries_token(chunk: dict[str, Any]) -> bool:
    """A chunk with generated text or the finish (not the leading role-only chunk, not the usage chunk)."""
    choices = chunk.get("choices")
    if not choices:
        return False
    choice = choices[0]
    return bool((choice.get("delta") or {}).get("content") or choice.get("text")) or \
        choice.get("finish_reason") is not None


async def _instrumented(gw, decision: Decision, identity: str, chunks: Any, start: float,
                        strip_usage: bool) -> AsyncIterator[dict[str, Any]]:
    """Pass chunks through, timing the first token and the gaps after it, and count tokens for limits.

    The backend is always asked for usage (exact token counts for the rate limiter and metrics);
    ``strip_usage`` hides it again from a client that did not ask for it.
    """
    tier = decision.tier
    first = last = None
    num_tokens = 0
    usage: dict[str, Any] | None = None
    try:
        async for chunk in chunks:
            if chunk.get("usage"):
                usage = chunk["usage"]
            if _carries_token(chunk):
                now = time.perf_counter()
                if first is None:
                    first = now
                    gw.metrics.observe_ttft(tier, now - start)
                last = now
                num_tokens += 1
            if strip_usage:
                if not chunk.get("choices"):
                    continue  # the usage-only chunk the client did not ask for
                chunk.pop("usage", None)
            yield chunk
    finally:
        await _close(chunks)
        if first is not None and last is not None and num_tokens > 1:
            gw.metrics.observe_tpot(tier, (last - first) / (num_tokens - 1))
        prompt = usage.get("prompt_tokens", 0) if usage else 0
        generated = usage.get("completion_tokens", num_tokens) if usage else num_tokens
        gw.metrics.observe_tokens(tier, prompt, generated)
        gw.limiter.record_tokens(identity, prompt + generated)
