"""``GET /health`` (alive), ``GET /ready`` (some tier can serve), ``GET /metrics``, ``GET /v1/models``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from gateway.backends.inprocess import InProcessBackend

router = APIRouter()
CREATED = int(time.time())


def _tiers(gw) -> dict[str, Any]:
    tiers: dict[str, Any] = {}
    for name, backend in (("edge", gw.edge), ("cloud", gw.cloud)):
        if backend is None:
            tiers[name] = {"enabled": False}
            continue
        load = backend.load()
        info: dict[str, Any] = {"enabled": True, "healthy": backend.healthy(), "model": backend.model_id,
                                "outstanding": load.outstanding, "waiting": load.waiting, "running": load.running,
                                "est_ttft_s": load.est_ttft_s}
        states = getattr(backend, "replica_states", None)
        if states is not None:
            info["replicas"] = states()
        tiers[name] = info
    return tiers


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """Liveness: the gateway process answers. Tier health is in the body, not the status."""
    return {"status": "ok", "tiers": _tiers(request.app.state.gateway)}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when at least one tier can serve a request now, else 503."""
    tiers = _tiers(request.app.state.gateway)
    ok = any(t.get("healthy") for t in tiers.values())
    return JSONResponse({"status": "ready" if ok else "unavailable", "tiers": tiers}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw = request.app.state.gateway
    for name, backend in (("edge", gw.edge), ("cloud", gw.cloud)):
        if isinstance(backend, InProcessBackend):
            s = backend.engine.stats()
            gw.metrics.set_engine_state(name, s.num_running, s.num_waiting, s.num_blocks_used, s.num_blocks_free)
        elif (remote := getattr(backend, "engine_stats", lambda: None)()) is not None:
            gw.metrics.set_engine_state(name, remote["num_running"], remote["num_waiting"],
                                        remote["num_blocks_used"], remote["num_blocks_free"])
        if backend is not None:
            gw.metrics.set_queue_depth(name, backend.load().outstanding)
            for replica in getattr(backend, "replica_states", lambda: [])():
                gw.metrics.set_cloud_health(replica["url"], replica["healthy"])
    body, content_type = gw.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The real models behind each tier, plus the names that route: ``auto``, ``edge``, ``cloud``."""
    gw = request.app.state.gateway
    data = [{"id": "auto", "object": "model", "created": CREATED, "owned_by": "hybrid-gateway",
             "description": "routed per request by complexity, load and health"}]
    for name, backend in (("edge", gw.edge), ("cloud", gw.cloud)):
        if backend is not None:
            data.append({"id": name, "object": "model", "created": CREATED, "owned_by": "hybrid-gateway",
                         "description": f"forces the {name} tier ({backend.model_id})"})
            if backend.model_id:
                data.append({"id": backend.model_id, "object": "model", "created": CREATED,
                             "owned_by": "hybrid-gateway", "tier": name})
    return {"object": "list", "data": data}
