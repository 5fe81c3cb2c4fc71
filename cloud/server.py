"""The cloud tier's OpenAI-compatible HTTP server (FastAPI), run by rank 0.

    POST /v1/chat/completions   POST /v1/completions     stream (SSE) or not; usage; include_usage
    GET  /v1/models             GET  /health             GET /stats (scheduler and KV blocks)

The engine (a :class:`~cloud.engine.CloudEngine`, or any AsyncEngine with ``tokenizer`` and
``model_id``) is built in the lifespan by ``engine_factory``, so importing or creating the app loads
nothing. A client that disconnects aborts its request: the stream's generator is closed (or the
non-streamed wait cancelled), which aborts the sequence in rank 0's scheduler and frees its blocks.
Block tables live only on rank 0 and every rank indexes its KV shard by them, so that frees the
sequence's blocks on every rank. The gateway reaches this server with httpx like any other
OpenAI-compatible server (vLLM, TGI).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kernels.async_engine import AsyncEngine
from kernels.serving import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    OpenAIServing,
    ResponseStream,
    install_error_handlers,
    sse_bytes,
    unless_disconnected,
)

log = logging.getLogger(__name__)

# Names a client may use for the one served model besides its id (the gateway forwards the id).
MODEL_ALIASES = ("auto", "cloud", "default")


def create_app(engine_factory: Callable[[], AsyncEngine], *, served_model_name: str | None = None) -> FastAPI:
    """The server app; ``engine_factory`` runs in the lifespan (in a thread: loading takes seconds).

    >>> app = create_app(lambda: CloudEngine.from_model(tp=3))   # doctest: +SKIP
    >>> uvicorn.run(app, port=8001)                             # doctest: +SKIP
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = await asyncio.to_thread(engine_factory)
        engine.start()
        model_id = served_model_name or getattr(engine, "model_id", "model")
        app.state.engine = engine
        app.state.serving = OpenAIServing(engine, engine.tokenizer, model_id)
        log.info("serving %s", model_id)
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="hybrid-gateway cloud", lifespan=lifespan)
    install_error_handlers(app)

    def serving(request: Request, model: str | None) -> OpenAIServing:
        srv: OpenAIServing = request.app.state.serving
        failure = getattr(request.app.state.engine, "failure", None)
        if failure:
            raise OpenAIError(503, f"cloud engine failed: {failure}", code="engine_failed")
        if model not in (None, srv.model_id, *MODEL_ALIASES):
            raise OpenAIError(404, f"The model {model!r} does not exist; this server serves {srv.model_id!r}",
                              param="model", code="model_not_found")
        return srv

    async def respond(request: Request, result: dict[str, Any] | ResponseStream) -> Any:
        if isinstance(result, ResponseStream):
            return StreamingResponse(sse_bytes(result), media_type="text/event-stream",
                                     headers={"x-request-id": result.request_id, "cache-control": "no-cache"})
        return JSONResponse(result, headers={"x-request-id": result["id"]})

    async def complete(request: Request, body: ChatCompletionRequest | CompletionRequest, kind: str) -> Any:
        srv = serving(request, body.model)
        work = srv.chat_completions(body) if kind == "chat" else srv.completions(body)
        return await respond(request, await (work if body.stream else unless_disconnected(request, work)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await complete(request, body, "chat")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await complete(request, body, "completion")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return request.app.state.serving.models()

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        engine = request.app.state.engine
        failure = getattr(engine, "failure", None)
        if failure or not engine.is_running:
            return JSONResponse({"status": "failed", "reason": failure or "engine loop stopped"}, status_code=503)
        return JSONResponse({"status": "ok", "model": request.app.state.serving.model_id,
                             "tp": getattr(engine, "tp", 1)})

    @app.get("/stats")
    async def stats(request: Request) -> dict[str, Any]:
        engine = request.app.state.engine
        return {**asdict(engine.stats()), "tokens_per_second": engine.tokens_per_second(),
                "tp": getattr(engine, "tp", 1),
                "worker_pids": {str(r): p for r, p in getattr(engine, "worker_pids", {}).items()}}

    return app
