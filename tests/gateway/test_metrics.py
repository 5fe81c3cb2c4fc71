"""GatewayMetrics: vLLM-style names with the hybrid: prefix, labels and values in the exposition text."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics


def _samples(metrics: GatewayMetrics) -> dict[tuple[str, tuple], float]:
    body, _ = metrics.render()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_requests_latency_and_tokens():
    m = GatewayMetrics()
    m.observe_request("edge", 200, e2e_s=0.4)
    m.observe_request("edge", 200, e2e_s=3.0)
    m.observe_request("cloud", 503, e2e_s=0.1)
    m.observe_request("none", "429", e2e_s=0.0)
    m.observe_ttft("edge", 0.05)
    m.observe_tpot("cloud", 0.02)
    m.observe_tokens("edge", prompt=12, generation=30)
    m.observe_tokens("edge", prompt=3, generation=4)
    s = _samples(m)
    assert s["hybrid:requests_total", (("status", "200"), ("tier", "edge"))] == 2
    assert s["hybrid:requests_total", (("status", "503"), ("tier", "cloud"))] == 1
    assert s["hybrid:requests_total", (("status", "429"), ("tier", "none"))] == 1
    assert s["hybrid:request_success_total", (("tier", "edge"),)] == 2
    assert ("hybrid:request_success_total", (("tier", "cloud"),)) not in s
    assert s["hybrid:e2e_request_latency_seconds_count", (("tier", "edge"),)] == 2  # failures excluded
    assert s["hybrid:e2e_request_latency_seconds_sum", (("tier", "edge"),)] == pytest.approx(3.4)
    assert s["hybrid:e2e_request_latency_seconds_bucket", (("le", "0.5"), ("tier", "edge"))] == 1
    assert s["hybrid:time_to_first_token_seconds_bucket", (("le", "0.06"), ("tier", "edge"))] == 1
    assert s["hybrid:time_to_first_token_seconds_bucket", (("le", "0.04"), ("tier", "edge"))] == 0
    assert s["hybrid:time_per_output_token_seconds_count", (("tier", "cloud"),)] == 1
    assert s["hybrid:prompt_tokens_total", (("tier", "edge"),)] == 15
    assert s["hybrid:generation_tokens_total", (("tier", "edge"),)] == 34


def test_routing_and_router_score_buckets():
    m = GatewayMetrics()
    m.observe_route("cloud", "router", 0.73)
    m.observe_route("edge", "router", 0.05)
    m.observe_route("edge", "sticky")  # no score: the router was not asked
    s = _samples(m)
    assert s["hybrid:routing_decisions_total", (("reason", "router"), ("tier", "cloud"))] == 1
    assert s["hybrid:routing_decisions_total", (("reason", "sticky"), ("tier", "edge"))] == 1
    assert s["hybrid:router_score_count", ()] == 2
    les = [dict(labels)["le"] for name, labels in s if name == "hybrid:router_score_bucket"]
    assert les == ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0", "+Inf"]
    assert s["hybrid:router_score_bucket", (("le", "0.1"),)] == 1
    assert s["hybrid:router_score_bucket", (("le", "0.8"),)] == 2


def test_engine_state_and_cloud_health():
    m = GatewayMetrics()
    m.set_engine_state("edge", running=3, waiting=2, blocks_used=30, blocks_free=90)
    m.set_engine_state("cloud", running=0, waiting=0, blocks_used=0, blocks_free=0)
    m.set_queue_depth("cloud", 4)
    m.set_cloud_health("http://gpu-1:8001", True)
    m.set_cloud_health("http://gpu-2:8001", False)
    s = _samples(m)
    assert s["hybrid:num_requests_running", (("tier", "edge"),)] == 3
    assert s["hybrid:num_requests_waiting", (("tier", "edge"),)] == 2
    assert s["hybrid:kv_cache_blocks", (("state", "used"), ("tier", "edge"))] == 30
    assert s["hybrid:kv_cache_blocks", (("state", "free"), ("tier", "edge"))] == 90
    assert s["hybrid:kv_cache_usage_perc", (("tier", "edge"),)] == 0.25
    assert s["hybrid:kv_cache_usage_perc", (("tier", "cloud"),)] == 0.0
    assert s["hybrid:queue_depth", (("tier", "cloud"),)] == 4
    assert s["hybrid:cloud_healthy", (("replica", "http://gpu-1:8001"),)] == 1
    assert s["hybrid:cloud_healthy", (("replica", "http://gpu-2:8001"),)] == 0
    m.set_cloud_health("http://gpu-2:8001", True)
    assert _samples(m)["hybrid:cloud_healthy", (("replica", "http://gpu-2:8001"),)] == 1


def test_render_text_and_content_type():
    m = GatewayMetrics()
    m.observe_request("edge", 200, e2e_s=0.4)
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert 'hybrid:requests_total{status="200",tier="edge"} 1.0' in text
    assert "# TYPE hybrid:time_to_first_token_seconds histogram" in text
    assert "# TYPE hybrid:num_requests_running gauge" in text


def test_instances_do_not_share_state():
    a, b = GatewayMetrics(), GatewayMetrics()
    a.observe_request("edge", 200, e2e_s=1.0)
    assert b"hybrid:requests_total{" not in b.render()[0]
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        GatewayMetrics(registry)  # one GatewayMetrics per registry
