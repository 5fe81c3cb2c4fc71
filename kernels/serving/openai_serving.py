"""The OpenAI API over an :class:`~kernels.async_engine.AsyncEngine`: requests in, response dicts out.

Both tiers use it: the cloud server puts it behind FastAPI routes, the gateway calls it in-process
for the edge engine. One request's path::

    ChatCompletionRequest ──chat template──► prompt ids ─┐
    sampling fields ─────────────────────► SamplingParams ├─► engine.add_request()  (errors raise here,
                                                          │    before any response byte is sent)
    engine.stream(id) ──► RequestOutput deltas ──► chunk dicts (stream) or one response dict

A stream is a :class:`ResponseStream`: iterate it for chunk dicts; ``aclose()`` aborts the request,
so its KV blocks are free at once (the server calls it when the client goes away).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from kernels.async_engine import AsyncEngine
from kernels.engine import RequestOutput
from kernels.sampling import SamplingParams
from kernels.serving.errors import OpenAIError, error_body
from kernels.serving.protocol import ChatCompletionRequest, CompletionRequest
from kernels.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ChatLike = ChatCompletionRequest | dict[str, Any]
CompletionLike = CompletionRequest | dict[str, Any]


def _validate(model: type[ChatCompletionRequest] | type[CompletionRequest], body: Any) -> Any:
    if isinstance(body, model):
        return body
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise OpenAIError(422, f"{param}: {first.get('msg')}" if param else str(first.get("msg")),
                          param=param, code="invalid_value") from None


def _check_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    if req.n != 1:
        raise OpenAIError(400, f"n={req.n} is not supported: only one choice per request (n=1)",
                          param="n", code="unsupported_parameter")
    if req.logprobs:
        raise OpenAIError(400, "logprobs are not supported", param="logprobs", code="unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise OpenAIError(400, f"{name} is not supported (only 0)", param=name, code="unsupported_parameter")


def usage_dict(out: RequestOutput) -> dict[str, Any]:
    return {"prompt_tokens": out.num_prompt_tokens, "completion_tokens": out.num_output_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


class ResponseStream:
    """Chunk dicts of one streamed request; ``aclose()`` (or leaving early) aborts it in the engine."""

    def __init__(self, engine: AsyncEngine, request_id: str, chunks: AsyncIterator[dict[str, Any]]) -> None:
        self.engine = engine
        self.request_id = request_id
        self._chunks = chunks

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        self.engine.abort(self.request_id)  # a no-op once the request finished
        await self._chunks.aclose()  # type: ignore[attr-defined]


class OpenAIServing:
    """Serve ``/v1/chat/completions`` and ``/v1/completions`` from one engine.

    >>> serving = OpenAIServing(engine, tokenizer, "smollm2-135m")                      # doctest: +SKIP
    >>> body = await serving.chat_completions({"messages": [{"role": "user", "content": "Hi"}]})  # doctest: +SKIP
    >>> body["choices"][0]["message"]["content"]                                       # doctest: +SKIP
    """

    def __init__(self, engine: AsyncEngine, tokenizer: Tokenizer, model_id: str,
                 max_model_len: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_model_len = max_model_len or engine.core.max_model_len
        self.created = int(time.time())

    # ------------------------------------------------------------------ requests -> engine inputs
    def _params(self, req: ChatCompletionRequest | CompletionRequest, num_prompt: int, default_max: int | None,
                max_tokens: int | None) -> SamplingParams:
        _check_unsupported(req)
        if max_tokens is None:
            max_tokens = default_max if default_max is not None else max(1, self.max_model_len - num_prompt)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        return SamplingParams(temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
                              max_tokens=max_tokens, seed=req.seed, stop=stop, ignore_eos=req.ignore_eos)

    def chat_inputs(self, req: ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
        prompt_ids = self.tokenizer.encode_chat(req.plain_messages())
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return prompt_ids, self._params(req, len(prompt_ids), None, max_tokens)

    def completion_inputs(self, req: CompletionRequest) -> tuple[list[int], SamplingParams]:
        if req.echo or req.suffix:
            raise OpenAIError(400, "echo and suffix are not supported", param="echo" if req.echo else "suffix",
                              code="unsupported_parameter")
        text = req.prompt_text()
        prompt_ids = self.tokenizer.encode(text, add_special_tokens=True) if text is not None else list(req.prompt)
        return prompt_ids, self._params(req, len(prompt_ids), 16, req.max_tokens)

    # ------------------------------------------------------------------ endpoints
    async def chat_completions(self, body: ChatLike, *, stream: bool | None = None) -> dict[str, Any] | ResponseStream:
        req = _validate(ChatCompletionRequest, body)
        prompt_ids, params = self.chat_inputs(req)
        return await self._run("chat", prompt_ids, params, req.stream if stream is None else stream,
                               req.include_usage)

    async def completions(self, body: CompletionLike, *, stream: bool | None = None) -> dict[str, Any] | ResponseStream:
        req = _validate(CompletionRequest, body)
        prompt_ids, params = self.completion_inputs(req)
        return await self._run("completion", prompt_ids, params, req.stream if stream is None else stream,
                               req.include_usage)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "hybrid-gateway",
                "max_model_len": self.max_model_len}

    async def _run(self, kind: str, prompt_ids: list[int], params: SamplingParams, stream: bool,
                   include_usage: bool) -> dict[str, Any] | ResponseStream:
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.engine.add_request(prompt_ids, params, request_id)  # raises InvalidRequestError -> 400
        if stream:
            outputs = self.engine.stream(request_id)  # bound now: the request may finish before it is read
            return ResponseStream(self.engine, request_id, self._chunks(kind, request_id, outputs, include_usage))
        text: list[str] = []
        last: RequestOutput | None = None
        async for out in self.engine.stream(request_id):
            text.append(out.text)
            last = out
        assert last is not None and last.finished
        finish = str(last.finish_reason)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish}
        return {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model_id, "choices": [choice], "usage": usage_dict(last)}

    async def _chunks(self, kind: str, request_id: str, outputs: AsyncIterator[RequestOutput],
                      include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if kind == "chat":
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = {"id": request_id, "object": obj, "created": created, "model": self.model_id, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return body

        if kind == "chat":
            yield chunk(None, None, role=True)
        async for out in outputs:
            if out.text:
                yield chunk(out.text, None)
            if out.finished:
                yield chunk(None, str(out.finish_reason))
                if include_usage:
                    yield {"id": request_id, "object": obj, "created": created, "model": self.model_id,
                           "choices": [], "usage": usage_dict(out)}


# ---------------------------------------------------------------------- HTTP helpers
SSE_DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def sse_bytes(chunks: AsyncIterator[dict[str, Any]],
                    on_error: Callable[[Exception], dict[str, Any]] | None = None) -> AsyncIterator[bytes]:
    """Server-sent events for a chunk stream, ending with ``[DONE]``; a failure mid-stream becomes an
    OpenAI-style ``{"error": …}`` event (the status line was sent long ago). Closing this generator
    closes ``chunks`` — which aborts the request."""
    try:
        async for chunk in chunks:
            yield sse_event(chunk)
    except Exception as exc:  # noqa: BLE001 - every failure must reach the client as an event, not a hang
        log.warning("stream failed mid-way: %s", exc)
        body = on_error(exc) if on_error else error_body(str(exc) or type(exc).__name__, "server_error")
        yield sse_event(body)
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    yield SSE_DONE


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work`` but cancel it if the HTTP client goes away first.

    Used for non-streamed completions, which would otherwise keep generating for nobody: cancelling
    leaves ``engine.stream`` early, which aborts the request and frees its blocks. ``work`` runs in
    the calling task (no extra task hop on the hot path); a watcher task cancels it on disconnect.
    """
    current = asyncio.current_task()
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while (await request.receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        if current is not None:
            current.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if disconnected:
            current.uncancel()  # the cancellation was ours, turned into this error
            raise OpenAIError(499, "client closed the request", code="client_closed_request") from None
        raise
    finally:
        watcher.cancel()
