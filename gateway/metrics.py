"""Prometheus metrics of the gateway, served at ``GET /metrics``.

Names follow vLLM's where they mean the same thing, with prefix ``hybrid:`` instead of ``vllm:`` and a ``tier``
label (``edge`` | ``cloud``; ``none`` for requests refused before routing), so vLLM dashboards carry over:

    hybrid:time_to_first_token_seconds{tier}      histogram   first token - arrival
    hybrid:time_per_output_token_seconds{tier}    histogram   mean gap between output tokens of a request
    hybrid:e2e_request_latency_seconds{tier}      histogram   arrival - last byte, successful requests only
    hybrid:num_requests_running{tier}             gauge       sequences in the engine's running batch
    hybrid:num_requests_waiting{tier}             gauge       sequences queued inside the engine
    hybrid:kv_cache_usage_perc{tier}              gauge       used / total KV blocks, 0..1
    hybrid:prompt_tokens_total{tier}              counter
    hybrid:generation_tokens_total{tier}          counter
    hybrid:request_success_total{tier}            counter     requests answered with a 2xx/3xx status

and ours:

    hybrid:requests_total{tier,status}            counter     every request, by HTTP status
    hybrid:routing_decisions_total{tier,reason}   counter     reason: router | sticky | forced | fallback …
    hybrid:router_score                           histogram   router win rates, buckets 0..1 by 0.1
    hybrid:kv_cache_blocks{tier,state}            gauge       state: used | free
    hybrid:cloud_healthy{replica}                 gauge       1 healthy, 0 not
    hybrid:queue_depth{tier}                      gauge       requests waiting in the gateway for a tier

Colons are legal in Prometheus metric names (they are reserved for recording rules by convention, which vLLM
ignores too). Each :class:`GatewayMetrics` owns its registry, so apps and tests never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["GatewayMetrics"]

PREFIX = "hybrid:"
# Buckets as in vLLM's metrics.py, so latency histograms of both servers line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, …, 1.0


class GatewayMetrics:
    """The gateway's metrics in their own registry; the app calls the ``observe_*``/``set_*`` methods.

    >>> metrics = GatewayMetrics()
    >>> metrics.observe_request("edge", 200, e2e_s=0.4)
    >>> body, content_type = metrics.render()
    >>> b'hybrid:requests_total{status="200",tier="edge"} 1.0' in body
    True
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, PREFIX
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Time to first token, in seconds.", ["tier"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{p}time_per_output_token_seconds", "Time per output token after the first, "
                              "in seconds.", ["tier"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(f"{p}e2e_request_latency_seconds", "End-to-end latency of successful requests, "
                             "in seconds.", ["tier"], buckets=E2E_BUCKETS, registry=r)
        self.running = Gauge(f"{p}num_requests_running", "Requests in the engine's running batch.", ["tier"],
                             registry=r)
        self.waiting = Gauge(f"{p}num_requests_waiting", "Requests waiting inside the engine.", ["tier"],
                             registry=r)
        self.kv_usage = Gauge(f"{p}kv_cache_usage_perc", "KV-cache usage, 0..1 (1 = full).", ["tier"], registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens processed.", ["tier"], registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Tokens generated.", ["tier"], registry=r)
        self.success = Counter(f"{p}request_success", "Requests answered successfully.", ["tier"], registry=r)
        self.requests = Counter(f"{p}requests", "Requests by tier and HTTP status.", ["tier", "status"],
                                registry=r)
        self.routes = Counter(f"{p}routing_decisions", "Routing decisions by tier and reason.", ["tier", "reason"],
                              registry=r)
        self.router_score = Histogram(f"{p}router_score", "Router win-rate scores (higher = cloud).",
                                      buckets=SCORE_BUCKETS, registry=r)
        self.kv_blocks = Gauge(f"{p}kv_cache_blocks", "KV-cache blocks by state.", ["tier", "state"], registry=r)
        self.cloud_healthy = Gauge(f"{p}cloud_healthy", "Whether a cloud replica passes health checks (1/0).",
                                   ["replica"], registry=r)
        self.queue_depth = Gauge(f"{p}queue_depth", "Requests waiting in the gateway for a tier.", ["tier"],
                                 registry=r)

    def observe_request(self, tier: str, status: int | str, e2e_s: float) -> None:
        """Count a finished request with its HTTP status; successful ones also record their latency."""
        self.requests.labels(tier=tier, status=str(status)).inc()
        if str(status)[:1] in ("2", "3"):
            self.success.labels(tier=tier).inc()
            self.e2e.labels(tier=tier).observe(e2e_s)

    def observe_ttft(self, tier: str, s: float) -> None:
        self.ttft.labels(tier=tier).observe(s)

    def observe_tpot(self, tier: str, s: float) -> None:
        self.tpot.labels(tier=tier).observe(s)

    def observe_route(self, tier: str, reason: str, score: float | None = None) -> None:
        """Count a routing decision; ``score`` is the router's win rate when it was consulted."""
        self.routes.labels(tier=tier, reason=reason).inc()
        if score is not None:
            self.router_score.observe(score)

    def observe_tokens(self, tier: str, prompt: int, generation: int) -> None:
        self.prompt_tokens.labels(tier=tier).inc(prompt)
        self.generation_tokens.labels(tier=tier).inc(generation)

    def set_engine_state(self, tier: str, running: int, waiting: int, blocks_used: int, blocks_free: int) -> None:
        """Snapshot of one engine's scheduler and KV cache (call it after steps or from a poller)."""
        self.running.labels(tier=tier).set(running)
        self.waiting.labels(tier=tier).set(waiting)
        self.kv_blocks.labels(tier=tier, state="used").set(blocks_used)
        self.kv_blocks.labels(tier=tier, state="free").set(blocks_free)
        total = blocks_used + blocks_free
        self.kv_usage.labels(tier=tier).set(blocks_used / total if total else 0.0)

    def set_queue_depth(self, tier: str, depth: int) -> None:
        self.queue_depth.labels(tier=tier).set(depth)

    def set_cloud_health(self, replica: str, healthy: bool) -> None:
        self.cloud_healthy.labels(replica=replica).set(1 if healthy else 0)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``Response(content=body, media_type=content_type)``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
