"""The gateway's FastAPI app: ``create_app(settings)``; models and backends load in the lifespan.

One request (``POST /v1/chat/completions``)::

    BodyLimit (413) → auth (401) → rate limit (429) → schema (422) → prompt size (413)
      → RoutingPolicy.decide(): router score + requested model + load + health → tier, reason
      → backend (edge in-process | cloud over HTTP); cloud failing before it answers → the other tier
      → JSON, or SSE chunks; headers x-hybrid-route / x-hybrid-score / x-hybrid-reason / x-request-id

Backends can be injected (tests pass tiny engines); otherwise the lifespan starts the edge engine in
this process and the cloud either as child processes (``cloud serve``) or as external URLs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from gateway.api import chat, health
from gateway.auth import APIKeyAuth
from gateway.backends import Backend, BackendUnavailable, OpenAIHTTPBackend, UpstreamError
from gateway.backends.inprocess import InProcessBackend
from gateway.config import GatewaySettings
from gateway.metrics import GatewayMetrics
from gateway.policy import RoutingPolicy
from gateway.ratelimit import RateLimiter
from gateway.routing import Router, default_router, load_router
from kernels.serving import OpenAIError, install_error_handlers

log = logging.getLogger("hybrid_gateway")

# Injected router value meaning "no router": auto routing then sends everything to the edge.
NO_ROUTER = "none"


@dataclass(slots=True)
class GatewayState:
    """What the routes need, built once in the lifespan (``app.state.gateway``)."""

    settings: GatewaySettings
    policy: RoutingPolicy
    metrics: GatewayMetrics
    auth: APIKeyAuth
    limiter: RateLimiter
    edge: Backend | None
    cloud: Backend | None
    local_cloud: Any = None  # gateway.cloud_process.LocalCloud when serve started one
    info: dict[str, Any] = field(default_factory=dict)


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes`` (by Content-Length, or while reading a chunked body).

    Pure ASGI (no BaseHTTPMiddleware) so streaming responses and disconnects pass straight through.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = _too_large(self.max_bytes).response()
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _too_large(self.max_bytes)
            return message

        return await self.app(scope, limited_receive, send)


class RequestMetricsMiddleware:
    """Counts every completion request by tier and final status, and times it to its last byte.

    Pure ASGI, outside the exception handlers, so refusals (401, 404, 413, 422, 429 …) are counted
    too; ``tier`` comes from the ``x-hybrid-route`` header ("none" when refused before routing). A
    stream counts when its last chunk is sent; a client that left first is status 499, a crash 500.
    """

    PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in self.PATHS:
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: int | None = None
        tier = "none"
        done = False

        async def send_and_watch(message: dict) -> None:
            nonlocal status, tier, done
            if message["type"] == "http.response.start":
                status = message["status"]
                tier = next((v.decode() for k, v in message.get("headers", ()) if k == b"x-hybrid-route"), "none")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception:
            status, done = 500, True
            raise
        finally:
            gw = getattr(scope["app"].state, "gateway", None) if "app" in scope else None
            if gw is not None:
                gw.metrics.observe_request(tier, status if done and status else 499, time.perf_counter() - start)


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"request body is larger than the limit of {max_bytes} bytes",
                       code="request_too_large")


def _load_router(settings: GatewaySettings, injected: Router | str | None) -> Router | None:
    if injected == NO_ROUTER:
        return None
    router = injected if isinstance(injected, Router) else (
        load_router(settings.router_dir) if settings.router_dir else default_router(settings.router_mode))
    if settings.router_threshold is not None:
        router.set_threshold(settings.router_threshold, {"kind": "direct", "source": "router_threshold setting"})
    return router


async def _start_edge(settings: GatewaySettings) -> Backend:
    import torch

    from edge.engine import EdgeEngine, default_block_size
    from edge.runner import use_global_thread_pool
    from kernels.engine import EngineConfig

    if settings.edge_global_thread_pool and not use_global_thread_pool(settings.edge_threads):
        log.warning("ONNX Runtime was already initialised in this process: the edge keeps one thread pool per "
                    "session")

    block_size = settings.edge_block_size or default_block_size("cuda" if torch.cuda.is_available() else "cpu")
    config = EngineConfig(block_size=block_size, max_num_seqs=settings.edge_max_num_seqs,
                          max_num_batched_tokens=settings.edge_max_batched_tokens,
                          kv_cache_bytes=settings.edge_kv_cache_mb << 20)
    engine = await asyncio.to_thread(EdgeEngine.from_model, settings.edge_model, quant=settings.edge_quant,
                                     config=config, threads=settings.edge_threads, source=settings.edge_source,
                                     lm_head=settings.edge_lm_head, kv_dtype=settings.edge_kv_dtype)
    return InProcessBackend(engine, name="edge")


def _cloud_backend(settings: GatewaySettings, urls: list[str]) -> Backend:
    return OpenAIHTTPBackend(urls, name="cloud", api_key=settings.cloud_api_key, model_id=settings.cloud_model_id,
                             timeout_s=settings.cloud_timeout_s, connect_timeout_s=settings.cloud_connect_timeout_s,
                             max_retries=settings.cloud_max_retries, breaker_failures=settings.breaker_failures,
                             breaker_cooldown_s=settings.breaker_cooldown_s,
                             health_interval_s=settings.health_interval_s)


def create_app(settings: GatewaySettings | None = None, *, edge: Backend | None = None,
               cloud: Backend | None = None, router: Router | str | None = None,
               metrics: GatewayMetrics | None = None,
               on_ready: Callable[[GatewayState], None] | None = None) -> FastAPI:
    """The gateway app. Injected ``edge`` / ``cloud`` backends replace the ones ``settings`` would start.

    >>> app = create_app(GatewaySettings(cloud_url=["http://10.0.0.5:8001"]))   # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                          # doctest: +SKIP
    """
    settings = settings or GatewaySettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            local_cloud = None
            edge_backend = edge
            if edge_backend is None and settings.edge_enabled:
                edge_backend = await _start_edge(settings)
            cloud_backend = cloud
            if cloud_backend is None and settings.cloud_enabled:
                urls = list(settings.cloud_url)
                if not urls:
                    from gateway.cloud_process import LocalCloud

                    local_cloud = LocalCloud(settings)
                    stack.callback(local_cloud.stop)
                    await local_cloud.start()
                    supervisor = asyncio.create_task(local_cloud.supervise(), name="cloud-supervisor")
                    stack.callback(supervisor.cancel)
                    urls = [local_cloud.url]
                cloud_backend = _cloud_backend(settings, urls)
            for backend in (edge_backend, cloud_backend):
                if backend is not None:
                    stack.push_async_callback(backend.aclose)
                    await backend.start()
            policy = RoutingPolicy(_load_router(settings, router), edge=edge_backend, cloud=cloud_backend,
                                   ttft_target_s=settings.ttft_target_s, sticky=settings.sticky_sessions,
                                   sticky_ttl_s=settings.sticky_ttl_s)
            app.state.gateway = GatewayState(settings, policy, metrics or GatewayMetrics(), APIKeyAuth(settings),
                                             RateLimiter(settings), edge_backend, cloud_backend, local_cloud)
            log.info("gateway ready: edge=%s cloud=%s", edge_backend and edge_backend.model_id,
                     cloud_backend and cloud_backend.model_id)
            if on_ready is not None:
                on_ready(app.state.gateway)
            yield

    app = FastAPI(title="hybrid-gateway", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware)  # added last = outermost: sees 413s from the body limit too
    install_error_handlers(app)

    @app.exception_handler(UpstreamError)
    async def _upstream(request, exc: UpstreamError):  # the cloud refused the request: pass it through
        return JSONResponse(exc.body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(BackendUnavailable)
    async def _unavailable(request, exc: BackendUnavailable):
        return OpenAIError(503, f"no tier could serve the request: {exc.reason}", code="backend_unavailable",
                           headers={"Retry-After": "5"}).response()

    app.include_router(chat.router)
    app.include_router(health.router)
    return app
