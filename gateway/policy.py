"""Routing policy: which tier serves a request, and why.

The router's complexity score is the first word; load and health have the last::

    model="edge" | edge model id   → edge                       reason "forced"
    model="cloud" | cloud model id → cloud                      reason "forced"
    model="auto" (default)
        sticky conversation seen before → its tier               reason "sticky"
        score >= threshold              → cloud, else edge       reason "complexity"
        edge chosen, but its queue would miss the TTFT target and the cloud is healthy
                                        → cloud                  reason "edge_overloaded"
        cloud chosen, but the cloud is down (circuit open)
                                        → edge                   reason "cloud_unavailable"
        one tier not configured         → the other              reason "only_tier"

A forced tier that cannot serve is an error (503), never a silent switch; ``auto`` always says what
it did in the ``x-hybrid-reason`` header. Stickiness keys a conversation by its first user turn
(and system prompt) plus the caller's identity, or by an explicit ``x-hybrid-session`` header.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.backends.base import Backend
from gateway.routing import Router
from kernels.serving import OpenAIError

Tier = Literal["edge", "cloud"]


@dataclass(slots=True)
class Decision:
    """Where one request goes. ``score`` is the router's (None when no router ran)."""

    tier: Tier
    score: float | None
    threshold: float | None
    reason: str
    reasons: list[str] = field(default_factory=list)
    forced: bool = False

    def headers(self) -> dict[str, str]:
        return {"x-hybrid-route": self.tier, "x-hybrid-score": "" if self.score is None else f"{self.score:.4f}",
                "x-hybrid-reason": self.reason}


class StickyTable:
    """conversation key -> tier, least recently used evicted, entries expire after ``ttl_s``."""

    def __init__(self, ttl_s: float = 1800.0, max_entries: int = 100_000, clock=time.monotonic) -> None:
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._entries: OrderedDict[str, tuple[Tier, float]] = OrderedDict()

    def get(self, key: str) -> Tier | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        tier, at = hit
        if self.clock() - at > self.ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return tier

    def put(self, key: str, tier: Tier) -> None:
        self._entries[key] = (tier, self.clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


def conversation_key(identity: str, messages: list[dict[str, Any]], session: str | None = None) -> str:
    """Same key for every turn of one conversation: identity + system prompt + first user turn."""
    if session:
        basis = f"session\0{identity}\0{session}"
    else:
        system = next((m["content"] for m in messages if m["role"] in ("system", "developer")), "")
        first = next((m["content"] for m in messages if m["role"] == "user"), "")
        basis = f"conv\0{identity}\0{system}\0{first}"
    return hashlib.blake2b(basis.encode(), digest_size=16).hexdigest()


class RoutingPolicy:
    """Picks a tier per request from the router score, the requested model, load and health.

    >>> policy = RoutingPolicy(router, edge=edge_backend, cloud=cloud_backend, ttft_target_s=2.0)  # doctest: +SKIP
    >>> policy.decide("auto", messages, identity="anon").tier                                       # doctest: +SKIP
    'edge'
    """

    def __init__(self, router: Router | None, *, edge: Backend | None, cloud: Backend | None,
                 ttft_target_s: float = 2.0, sticky: bool = True, sticky_ttl_s: float = 1800.0) -> None:
        self.router = router
        self.edge = edge
        self.cloud = cloud
        self.ttft_target_s = ttft_target_s
        self.sticky = StickyTable(sticky_ttl_s) if sticky else None

    def backend(self, tier: Tier) -> Backend:
        backend = self.edge if tier == "edge" else self.cloud
        if backend is None:
            raise OpenAIError(503, f"the {tier} tier is not configured on this gateway", code="tier_unavailable")
        return backend

    def forced_tier(self, model: str | None) -> Tier | None:
        """The tier a requested model name forces; None for auto. Unknown names are a 404."""
        if model in (None, "", "auto"):
            return None
        if model == "edge" or (self.edge is not None and model == self.edge.model_id):
            return "edge"
        if model == "cloud" or (self.cloud is not None and model == self.cloud.model_id):
            return "cloud"
        served = [m for m in ("auto", "edge", "cloud", self.edge and self.edge.model_id,
                              self.cloud and self.cloud.model_id) if m]
        raise OpenAIError(404, f"The model {model!r} does not exist; use one of {served}", param="model",
                          code="model_not_found")

    def score(self, prompt: str | list[dict[str, Any]]) -> tuple[float | None, float | None]:
        if self.router is None:
            return None, None
        return self.router.score(prompt), self.router.threshold

    async def score_async(self, prompt: str | list[dict[str, Any]]) -> tuple[float | None, float | None]:
        """:meth:`score` for request handlers: an accurate-mode router (milliseconds of ONNX Runtime per prompt)
        scores in a worker thread so the event loop keeps serving streams; the fast one (µs) scores inline."""
        if self.router is not None and self.router.spec.embedding:
            return await asyncio.to_thread(self.score, prompt)
        return self.score(prompt)

    def decide(self, model: str | None, prompt: str | list[dict[str, Any]], *, identity: str = "anon",
               session: str | None = None, record: bool = True,
               scored: tuple[float | None, float | None] | None = None) -> Decision:
        """The tier for one request; ``record=False`` (``/v1/route``) leaves the sticky table untouched.
        ``scored`` is a (score, threshold) pair from :meth:`score_async`, computed here when not given."""
        forced = self.forced_tier(model)
        score, threshold = self.score(prompt) if scored is None else scored
        if forced is not None:
            backend = self.backend(forced)
            if not backend.healthy():
                raise OpenAIError(503, f"the {forced} tier is unavailable right now (model {model!r} forces it); "
                                  "retry later or use model='auto'", code="tier_unavailable",
                                  headers={"Retry-After": "5"})
            return Decision(forced, score, threshold, "forced", [f"model {model!r} forces the {forced} tier"], True)

        reasons: list[str] = []
        key = None
        tier: Tier | None = None
        if self.sticky is not None and isinstance(prompt, list):
            key = conversation_key(identity, prompt, session)
            tier = self.sticky.get(key)
            if tier is not None:
                reasons.append(f"conversation is sticky to {tier}")
                reason = "sticky"
        if tier is None:
            if score is None:
                tier, reason = ("edge" if self.edge is not None else "cloud"), "no_router"
                reasons.append("no router configured")
            else:
                tier = "cloud" if score >= threshold else "edge"
                reason = "complexity"
                reasons.append(f"score {score:.3f} {'>=' if tier == 'cloud' else '<'} threshold {threshold:.3f}")

        edge_ok = self.edge is not None and self.edge.healthy()
        cloud_ok = self.cloud is not None and self.cloud.healthy()
        if tier == "edge" and edge_ok and cloud_ok and reason != "sticky":
            est = self.edge.load().est_ttft_s
            if est is not None and est > self.ttft_target_s:
                tier, reason = "cloud", "edge_overloaded"
                reasons.append(f"edge queue would take ~{est:.2f}s to first token > target {self.ttft_target_s:.2f}s")
        if tier == "cloud" and not cloud_ok:
            if not edge_ok:
                raise OpenAIError(503, "no tier can serve right now: the cloud is down and the edge is not running",
                                  code="no_tier_available", headers={"Retry-After": "5"})
            tier = "edge"
            reason = "cloud_unavailable" if self.cloud is not None else "only_tier"
            reasons.append("cloud is down (circuit open): served on edge" if self.cloud is not None
                           else "no cloud tier configured")
        elif tier == "edge" and not edge_ok:
            if not cloud_ok:
                raise OpenAIError(503, "no tier can serve right now", code="no_tier_available",
                                  headers={"Retry-After": "5"})
            tier = "cloud"
            reason = "edge_unavailable" if self.edge is not None else "only_tier"
            reasons.append("edge is not running: served on cloud" if self.edge is not None
                           else "no edge tier configured")
        if record and key is not None and reason in ("complexity", "no_router"):
            self.sticky.put(key, tier)
        return Decision(tier, score, threshold, reason, reasons)

    def fallback(self, decision: Decision, error: Exception) -> Decision | None:
        """After the chosen tier failed before answering: the other tier, if auto routing allows it."""
        if decision.forced:
            return None
        other: Tier = "edge" if decision.tier == "cloud" else "cloud"
        backend = self.edge if other == "edge" else self.cloud
        if backend is None or not backend.healthy():
            return None
        return Decision(other, decision.score, decision.threshold, f"{decision.tier}_failed",
                        [*decision.reasons, f"{decision.tier} failed ({error}); served on {other}"])
