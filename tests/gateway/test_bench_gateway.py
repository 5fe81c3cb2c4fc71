"""``bench gateway`` end to end on the tiny random engine, with tiny sizes: the report's shape, not its speed."""

from __future__ import annotations

import io
import json

from rich.console import Console

from gateway.bench_gateway import parse_ints, run_gateway_bench
from tests.support.engines import TinyServedEngine


def test_bench_gateway_report(tiny, tmp_path):
    engine = TinyServedEngine(tiny, model_id="tiny-edge", name="edge")
    console = Console(file=io.StringIO(), width=200)
    try:
        report = run_gateway_bench(engine, requests=6, warmup=2, concurrency=(2, 3), rounds=2, max_tokens=4,
                                   route_requests=12, route_concurrency=4, score_iters=50, out_dir=tmp_path,
                                   console=console)
    finally:
        engine.shutdown()

    json_path, png_path = (tmp_path / f for f in (report["files"][0].rsplit("/", 1)[1],
                                                  report["files"][1].rsplit("/", 1)[1]))
    assert json_path.name.startswith("gateway-") and json_path.suffix == ".json" and png_path.stat().st_size > 0
    saved = json.loads(json_path.read_text())
    assert saved["kind"] == "bench-gateway" and saved["errors"] == 0
    assert {"cpu_count", "python", "torch", "date"} <= set(saved["machine"])
    o = saved["overhead"]
    assert o["errors"] == 0
    for path in ("direct", "asgi", "http"):
        lat = o["latency_ms"][path]
        assert lat["n"] == 6 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    for path in ("asgi", "http"):
        assert {"p50", "p99"} <= set(o["added_ms"][path])
        assert o["paired_added_ms"][path]["n"] == 6 and o["inside_gateway_ms"][path]["n"] == 6
        assert o["inside_gateway_ms"][path]["p50"] > 0
    assert saved["stream_ttft"]["errors"] == 0 and saved["stream_ttft"]["ttft_ms"]["http"]["n"] == 6
    r = saved["routing"]
    assert r["errors"] == 0
    assert r["router_score_per_s"] > 0 and r["route_sequential_per_s"] > 0 and r["route_concurrent_per_s"] > 0
    assert [t["concurrency"] for t in saved["throughput"]] == [2, 3]
    for row in saved["throughput"]:
        for side in ("direct", "gateway"):
            run = row[side]
            assert run["errors"] == 0 and run["tokens"] == run["requests"] * 4 == row["concurrency"] * 2 * 4
            assert run["tok_per_s"] > 0 and run["ttft_p50_ms"] > 0 and run["loop_lag_ms"]["max"] >= 0
        assert row["ratio_gateway_over_direct"] > 0
    assert {"p50_added_ms", "met_asgi", "met_http"} <= set(saved["goal"])
    assert "bench gateway" in console.file.getvalue()


def test_parse_ints():
    assert parse_ints("16,64") == [16, 64] and parse_ints("4, 8,") == [4, 8]
