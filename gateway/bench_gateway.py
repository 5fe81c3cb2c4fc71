"""``hybrid-gateway bench gateway``: what the gateway adds on top of calling the edge engine in-process.

One engine (the same running :class:`~kernels.async_engine.AsyncEngine`) sits behind three paths::

    direct   await OpenAIServing.chat_completions(body)          the baseline: the engine in-process
    asgi     gateway app over httpx.ASGITransport                 + validation, auth, routing, metrics, JSON
    http     gateway app on a real uvicorn socket, httpx client   + HTTP/1.1 over loopback

Sections, all in one run so that ratios compare like with like on a noisy machine:

1. **overhead** — ``max_tokens=1``, greedy, one short prompt (prefix-cached, so engine time is small
   and constant), one request at a time. The three paths are interleaved round by round, with the
   order rotated each round, so engine drift cancels in the per-round paired differences. Also the
   gateway's own time measured inside: app time (ASGI call to the last body message) minus the
   backend call. A streaming variant compares time to first token, direct vs http (ASGITransport
   buffers whole responses, so it has no streaming figure).
2. **routing** — ``POST /v1/route`` decisions/s over ASGITransport, sequential and concurrent, and the
   raw ``Router.score`` rate in-process for reference.
3. **throughput** — ``c`` concurrent closed-loop streams (``ignore_eos``, ``max_tokens`` each), direct
   vs the uvicorn gateway: aggregate tokens/s, TTFT p50/p99, errors.

The client, the uvicorn server (on this event loop) and the engine thread share this process and
its cores: a pessimistic setup for the gateway, since a real client runs elsewhere.

    report = run_gateway_bench(EdgeEngine.from_model().start(), requests=200, concurrency=(16, 64))
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gateway.app import create_app
from gateway.backends.inprocess import InProcessBackend
from gateway.config import GatewaySettings
from gateway.routing import Router, default_router
from kernels.async_engine import AsyncEngine
from kernels.bench_report import machine_info, save_report
from kernels.serving import OpenAIServing

GOAL_P50_ADDED_MS = 1.0  # the issue's goal: at most 1 ms p50 added vs the in-process engine
OVERHEAD_PROMPT = [{"role": "user", "content": "Say hi."}]
ROUTE_PROMPTS = [
    "Hi!",
    "What is the capital of France?",
    "Translate 'good morning' into Spanish and German.",
    "Write a haiku about the sea at night.",
    "Explain step by step why the square root of 2 is irrational, then generalise the proof to every "
    "integer that is not a perfect square.",
    "Write a Python function that parses an ISO 8601 duration such as P3DT4H5M into seconds, with tests "
    "for the edge cases, and explain the regular expression you used.",
    "Summarise the plot of Hamlet in three sentences.",
    "Compare the CAP theorem's trade-offs for a globally replicated key-value store used for shopping carts "
    "versus one used for bank balances, and propose a design for each.",
]
PATHS = ("direct", "asgi", "http")
LAG_BLOCKED_S = 0.02  # an event-loop tick later than this counts as time the loop was blocked


# ---------------------------------------------------------------------------------------------- plumbing
class _BenchBackend(InProcessBackend):
    """The bench's engine as a gateway tier: times each call, and leaves the engine running when an app stops.

    The same engine serves every path, so the app lifespans must not shut it down (the bench owns it).
    """

    def __init__(self, engine: AsyncEngine, *, name: str = "edge") -> None:
        super().__init__(engine, name=name)
        self.last_call_s = 0.0

    async def chat_completions(self, body: Any, *, stream: bool) -> Any:
        t = time.perf_counter()
        try:
            return await super().chat_completions(body, stream=stream)
        finally:
            self.last_call_s = time.perf_counter() - t

    async def aclose(self) -> None:
        pass


class _TimedApp:
    """ASGI wrapper recording how long the app took from the call to handing over its last body message."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last_s = 0.0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def timed_send(message: dict) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.last_s = time.perf_counter() - start
            await send(message)

        return await self.app(scope, receive, timed_send)


class _QuietServer:
    """uvicorn on this event loop, binding 127.0.0.1 on a free port the way ``serve`` binds its host and port.

    No signal handlers (Ctrl-C stays the bench's). uvicorn binds the socket itself: a socket made here
    with ``socket.socket(AF_INET, SOCK_STREAM)`` has proto 0, so asyncio would not set TCP_NODELAY on
    accepted connections and every response would wait ~40 ms for a delayed ACK (Nagle).
    """

    def __init__(self, app: Any) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def capture_signals(self):  # type: ignore[override]
                return contextlib.nullcontext()

        # log_level warning: no access log line per request (``serve`` logs them at info).
        self.server = Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                            timeout_graceful_shutdown=5))
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> str:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("uvicorn exited during startup")
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


def _stats_ms(seconds: Sequence[float]) -> dict[str, float]:
    a = np.asarray(seconds, dtype=float) * 1e3
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "min": float(a.min()),
            "max": float(a.max())}


def _is_token(chunk: dict[str, Any]) -> bool:
    """A chunk carrying the first generated token: content text, or the finish (a token may decode to "")."""
    choices = chunk.get("choices") or []
    return bool(choices) and (bool(choices[0].get("delta", {}).get("content")) or choices[0].get("finish_reason")
                              is not None)


async def _sse_chunks(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


# ---------------------------------------------------------------------------------------------- runs
class _Paths:
    """The three ways to ask the engine for a chat completion, each returning (seconds, ok, gateway-inside s)."""

    def __init__(self, serving: OpenAIServing, asgi: httpx.AsyncClient, http: httpx.AsyncClient,
                 asgi_app: _TimedApp, http_app: _TimedApp, backends: dict[str, _BenchBackend]) -> None:
        self.serving, self.clients = serving, {"asgi": asgi, "http": http}
        self.apps, self.backends = {"asgi": asgi_app, "http": http_app}, backends

    async def complete(self, path: str, body: dict[str, Any]) -> tuple[float, bool, float | None]:
        t = time.perf_counter()
        if path == "direct":
            result = await self.serving.chat_completions(body, stream=False)
            return time.perf_counter() - t, bool(result.get("choices")), None
        r = await self.clients[path].post("/v1/chat/completions", json=body)
        elapsed = time.perf_counter() - t
        ok = r.status_code == 200 and bool(r.json().get("choices"))
        return elapsed, ok, self.apps[path].last_s - self.backends[path].last_call_s

    async def stream(self, path: str, body: dict[str, Any]) -> tuple[float | None, int, bool]:
        """(seconds to the first token, completion tokens, ok) of one streamed request."""
        t = time.perf_counter()
        first: float | None = None
        usage: dict[str, Any] | None = None
        if path == "direct":
            async for chunk in await self.serving.chat_completions(body, stream=True):
                if first is None and _is_token(chunk):
                    first = time.perf_counter() - t
                usage = chunk.get("usage") or usage
            return first, (usage or {}).get("completion_tokens", 0), first is not None
        async with self.clients[path].stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return None, 0, False
            async for chunk in _sse_chunks(r):
                if "error" in chunk:
                    return first, 0, False
                if first is None and _is_token(chunk):
                    first = time.perf_counter() - t
                usage = chunk.get("usage") or usage
        return first, (usage or {}).get("completion_tokens", 0), first is not None


async def _overhead(paths: _Paths, requests: int, warmup: int, progress: Progress) -> dict[str, Any]:
    body = {"model": "auto", "messages": OVERHEAD_PROMPT, "max_tokens": 1, "temperature": 0}
    task = progress.add_task("overhead: direct / asgi / http, max_tokens=1", total=warmup + requests)
    lat: dict[str, list[float]] = {p: [] for p in PATHS}
    inside: dict[str, list[float]] = {"asgi": [], "http": []}
    errors = 0
    for i in range(warmup + requests):
        order = PATHS[i % 3:] + PATHS[: i % 3]  # rotate so no path always runs right after another
        for path in order:
            try:
                seconds, ok, own = await paths.complete(path, body)
            except Exception:  # noqa: BLE001 - an error is a figure here, not a crash
                seconds, ok, own = 0.0, False, None
            errors += not ok
            if i >= warmup and ok:
                lat[path].append(seconds)
                if own is not None:
                    inside[path].append(own)
        progress.advance(task)
    n = min(len(v) for v in lat.values())
    paired = {p: [lat[p][k] - lat["direct"][k] for k in range(n)] for p in ("asgi", "http")}
    stats = {p: _stats_ms(lat[p]) for p in PATHS}
    return {
        "requests": requests, "warmup": warmup, "body": body, "errors": errors,
        "latency_ms": stats,
        "added_ms": {p: {q: stats[p][q] - stats["direct"][q] for q in ("p50", "p90", "p99")}
                     for p in ("asgi", "http") if stats[p]["n"] and stats["direct"]["n"]},
        "paired_added_ms": {p: _stats_ms(v) for p, v in paired.items()},
        "inside_gateway_ms": {p: _stats_ms(v) for p, v in inside.items()},
        "samples_ms": {p: [round(s * 1e3, 4) for s in v] for p, v in lat.items()},
    }


async def _stream_ttft(paths: _Paths, requests: int, warmup: int, progress: Progress) -> dict[str, Any]:
    body = {"model": "auto", "messages": OVERHEAD_PROMPT, "max_tokens": 1, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    task = progress.add_task("streaming TTFT: direct / http", total=warmup + requests)
    ttft: dict[str, list[float]] = {"direct": [], "http": []}
    errors = 0
    for i in range(warmup + requests):
        for path in (("direct", "http") if i % 2 == 0 else ("http", "direct")):
            try:
                first, _, ok = await paths.stream(path, body)
            except Exception:  # noqa: BLE001
                first, ok = None, False
            errors += not ok
            if i >= warmup and ok and first is not None:
                ttft[path].append(first)
        progress.advance(task)
    n = min(len(v) for v in ttft.values())
    stats = {p: _stats_ms(v) for p, v in ttft.items()}
    return {"requests": requests, "errors": errors, "ttft_ms": stats,
            "paired_added_ms": {"http": _stats_ms([ttft["http"][k] - ttft["direct"][k] for k in range(n)])}}


async def _routing(client: httpx.AsyncClient, router: Router, route_requests: int, concurrency: int,
                   score_iters: int, progress: Progress) -> dict[str, Any]:
    bodies = [{"messages": [{"role": "user", "content": p}]} for p in ROUTE_PROMPTS]
    task = progress.add_task("routing: POST /v1/route", total=2 * route_requests + score_iters)
    errors = 0
    for b in bodies:  # warm-up
        await client.post("/v1/route", json=b)

    async def one(i: int) -> float:
        nonlocal errors
        t = time.perf_counter()
        r = await client.post("/v1/route", json=bodies[i % len(bodies)])
        errors += r.status_code != 200 or r.json().get("tier") not in ("edge", "cloud")
        progress.advance(task)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    seq = [await one(i) for i in range(route_requests)]
    seq_s = time.perf_counter() - t0

    async def worker(w: int) -> None:
        for i in range(w, route_requests, concurrency):
            await one(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    conc_s = time.perf_counter() - t0
    messages = [b["messages"] for b in bodies]
    for m in messages:
        router.score(m)
    t0 = time.perf_counter()
    for i in range(score_iters):
        router.score(messages[i % len(messages)])
    score_s = time.perf_counter() - t0
    progress.advance(task, score_iters)
    return {"route_requests": route_requests, "concurrency": concurrency, "errors": errors,
            "route_sequential_per_s": route_requests / seq_s, "route_latency_ms": _stats_ms(seq),
            "route_concurrent_per_s": route_requests / conc_s,
            "score_iters": score_iters, "router_score_per_s": score_iters / score_s}


async def _throughput(paths: _Paths, path: str, concurrency: int, rounds: int, max_tokens: int, tag: str,
                      progress: Progress) -> dict[str, Any]:
    task = progress.add_task(f"throughput: {path}, {concurrency} streams", total=concurrency * rounds)
    ttft: list[float] = []
    tokens = errors = 0
    samples: list[str] = []

    async def worker(w: int) -> None:
        nonlocal tokens, errors
        for r in range(rounds):
            # Unique prompts, same length for every path: only the chat template's prefix is cached.
            content = f"[{tag}-{w:03d}-{r:02d}] Tell me a story about a lighthouse keeper and a storm."
            body = {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            try:
                first, n, ok = await paths.stream(path, body)
                ok = ok and n == max_tokens
            except Exception as exc:  # noqa: BLE001
                first, n, ok = None, 0, False
                if len(samples) < 3:
                    samples.append(f"{type(exc).__name__}: {exc}")
            tokens += n
            errors += not ok
            if first is not None:
                ttft.append(first)
            progress.advance(task)

    lag: list[float] = []
    monitor = asyncio.create_task(_loop_lag(lag))
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    monitor.cancel()
    stats, lags = _stats_ms(ttft), _stats_ms(lag)
    return {"requests": concurrency * rounds, "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "errors": errors, "error_samples": samples, "ttft_p50_ms": stats.get("p50"),
            "ttft_p99_ms": stats.get("p99"), "loop_lag_ms": {k: lags.get(k) for k in ("p50", "p99", "max")},
            "loop_blocked_s": float(sum(x for x in lag if x > LAG_BLOCKED_S))}


async def _loop_lag(sink: list[float], tick_s: float = 0.005) -> None:
    """How late each tick of this event loop runs (seconds): time the loop spent blocked, e.g. on a lock."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(tick_s)
        sink.append(max(0.0, time.perf_counter() - t - tick_s))


async def _run(engine: AsyncEngine, router: Router, *, requests: int, warmup: int, concurrency: Sequence[int],
               rounds: int, max_tokens: int, route_requests: int, route_concurrency: int, score_iters: int,
               console: Console) -> dict[str, Any]:
    settings = GatewaySettings(cloud_enabled=False, log_level="warning")  # the edge is injected below
    backends = {p: _BenchBackend(engine) for p in ("asgi", "http")}
    apps = {p: create_app(settings, edge=backends[p], router=router) for p in ("asgi", "http")}
    timed = {p: _TimedApp(a) for p, a in apps.items()}
    serving = OpenAIServing(engine, engine.tokenizer, getattr(engine, "model_id", "edge"))
    limits = httpx.Limits(max_connections=max([*concurrency, route_concurrency]) + 8, max_keepalive_connections=None)
    transport = httpx.ASGITransport(app=timed["asgi"], client=("127.0.0.1", 50000))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    async with (apps["asgi"].router.lifespan_context(apps["asgi"]), _QuietServer(timed["http"]) as url,
                httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=None) as asgi,
                httpx.AsyncClient(base_url=url, timeout=None, limits=limits, trust_env=False) as http):
        paths = _Paths(serving, asgi, http, timed["asgi"], timed["http"], backends)
        with progress:
            overhead = await _overhead(paths, requests, warmup, progress)
            stream = await _stream_ttft(paths, requests, warmup, progress)
            routing = await _routing(asgi, router, route_requests, route_concurrency, score_iters, progress)
            throughput = []
            for c in concurrency:
                direct = await _throughput(paths, "direct", c, rounds, max_tokens, f"d{c}", progress)
                gateway = await _throughput(paths, "http", c, rounds, max_tokens, f"g{c}", progress)
                throughput.append({"concurrency": c, "direct": direct, "gateway": gateway,
                                   "ratio_gateway_over_direct": gateway["tok_per_s"] / direct["tok_per_s"]
                                   if direct["tok_per_s"] else None})
    return {"overhead": overhead, "stream_ttft": stream, "routing": routing, "throughput": throughput}


def run_gateway_bench(engine: AsyncEngine, *, requests: int = 200, warmup: int = 20,
                      concurrency: Sequence[int] = (16, 64), rounds: int = 2, max_tokens: int = 32,
                      route_requests: int = 1000, route_concurrency: int = 16, score_iters: int = 5000,
                      router: Router | None = None, out_dir: Path | None = Path("bench/results"),
                      describe: dict[str, Any] | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run every section on ``engine`` (an AsyncEngine with ``tokenizer``; started here, left running).

    Returns the report; with ``out_dir`` also writes ``gateway-<timestamp>.json`` and ``.png`` there.

    >>> report = run_gateway_bench(engine, requests=20, concurrency=(4,), out_dir=None)   # doctest: +SKIP
    >>> report["overhead"]["paired_added_ms"]["http"]["p50"]                              # doctest: +SKIP
    """
    console = console or Console(stderr=True)
    router = router or default_router()
    engine.start()
    machine = machine_info()
    results = asyncio.run(_run(engine, router, requests=requests, warmup=warmup, concurrency=list(concurrency),
                               rounds=rounds, max_tokens=max_tokens, route_requests=route_requests,
                               route_concurrency=route_concurrency, score_iters=score_iters, console=console))
    o = results["overhead"]
    errors = (o["errors"] + results["stream_ttft"]["errors"] + results["routing"]["errors"]
              + sum(t[k]["errors"] for t in results["throughput"] for k in ("direct", "gateway")))
    report = {
        "kind": "bench-gateway",
        "time": machine["date"],
        "machine": machine,
        "engine": {"model_id": getattr(engine, "model_id", None), **(describe or {})},
        "protocol": {"requests": requests, "warmup": warmup, "concurrency": list(concurrency), "rounds": rounds,
                     "max_tokens": max_tokens, "route_requests": route_requests,
                     "route_concurrency": route_concurrency, "score_iters": score_iters},
        **results,
        "goal": {"p50_added_ms": GOAL_P50_ADDED_MS,
                 **{f"met_{p}": o["paired_added_ms"][p].get("p50", float("inf")) <= GOAL_P50_ADDED_MS
                    for p in ("asgi", "http")}},
        "errors": errors,
        "files": [],
    }
    if out_dir is not None:
        save_report(report, out_dir, "gateway", plot_report)
    print_report(report, console)
    return report


# ---------------------------------------------------------------------------------------------- output
def _f(x: float | None, fmt: str = ",.2f") -> str:
    return "—" if x is None else format(x, fmt)


def _table(title: str, columns: Sequence[str], caption: str | None = None) -> Table:
    table = Table(title=title, caption=caption, caption_justify="left")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 or col == "path" else "right", no_wrap=True)
    return table


def print_report(report: dict[str, Any], console: Console) -> None:
    m, o, s, r = report["machine"], report["overhead"], report["stream_ttft"], report["routing"]
    console.print(f"[bold]bench gateway[/] — {report['engine'].get('model_id')}, {m['cpus_usable']} CPUs "
                  f"(load {_f((m.get('loadavg_at_start') or [None])[0], '.1f')} at start), {m['date']}")
    d = o["latency_ms"]["direct"]
    t = _table(f"max_tokens=1, one at a time, {o['requests']} interleaved rounds (ms)",
               ("path", "p50", "p90", "p99", "p50 ×direct", "p99 ×direct"))
    for p in PATHS:
        lat = o["latency_ms"][p]
        t.add_row(p, _f(lat.get("p50")), _f(lat.get("p90")), _f(lat.get("p99")),
                  _f(lat["p50"] / d["p50"] if lat.get("p50") and d.get("p50") else None, ".3f"),
                  _f(lat["p99"] / d["p99"] if lat.get("p99") and d.get("p99") else None, ".3f"))
    console.print(t)
    t = _table("added vs direct (ms)", ("path", "Δp50", "Δp99", "paired p50", "paired p99", "inside p50",
                                       "inside p99"),
               caption="Δ: difference of percentiles; paired: percentiles of per-round differences;\n"
                       "inside: the app's own time (ASGI call to last body message, minus the engine call)")
    for p in ("asgi", "http"):
        add, pair, ins = o["added_ms"].get(p, {}), o["paired_added_ms"].get(p, {}), o["inside_gateway_ms"].get(p, {})
        t.add_row(p, _f(add.get("p50")), _f(add.get("p99")), _f(pair.get("p50")), _f(pair.get("p99")),
                  _f(ins.get("p50")), _f(ins.get("p99")))
    sd, sh, sp = s["ttft_ms"]["direct"], s["ttft_ms"]["http"], s["paired_added_ms"]["http"]
    t.add_row("http TTFT", _f(sh["p50"] - sd["p50"] if sh.get("p50") and sd.get("p50") else None),
              _f(sh["p99"] - sd["p99"] if sh.get("p99") and sd.get("p99") else None), _f(sp.get("p50")),
              _f(sp.get("p99")), "", "")
    console.print(t)
    t = _table("routing decisions/s", ("what", "decisions/s", "p50 ms", "×score"))
    t.add_row("Router.score in-process", _f(r["router_score_per_s"], ",.0f"), "", "1.000")
    t.add_row("POST /v1/route sequential", _f(r["route_sequential_per_s"], ",.0f"),
              _f(r["route_latency_ms"].get("p50"), ".3f"), _f(r["route_sequential_per_s"] / r["router_score_per_s"],
                                                              ".3f"))
    t.add_row(f"POST /v1/route ×{r['concurrency']}", _f(r["route_concurrent_per_s"], ",.0f"), "",
              _f(r["route_concurrent_per_s"] / r["router_score_per_s"], ".3f"))
    console.print(t)
    t = _table(f"concurrent streams, max_tokens={report['protocol']['max_tokens']}, ignore_eos (gateway: over http)",
               ("conc", "path", "tok/s", "×direct", "TTFT p50", "TTFT p99", "blocked s", "errors"),
               caption="TTFT in ms; blocked s: total time the event loop ran > 20 ms late (e.g. waiting on the "
                       "engine lock)")
    for row in report["throughput"]:
        for side in ("direct", "gateway"):
            x = row[side]
            t.add_row(str(row["concurrency"]), side, _f(x["tok_per_s"], ",.1f"),
                      _f(x["tok_per_s"] / row["direct"]["tok_per_s"] if row["direct"]["tok_per_s"] else None, ".3f"),
                      _f(x["ttft_p50_ms"], ",.0f"), _f(x["ttft_p99_ms"], ",.0f"), _f(x["loop_blocked_s"], ",.1f"),
                      str(x["errors"]))
    console.print(t)
    goal = report["goal"]
    verdict = {True: "[green]met[/]", False: "[red]missed[/]"}
    console.print(f"goal ≤ {goal['p50_added_ms']} ms p50 added (paired): asgi {verdict[goal['met_asgi']]}, "
                  f"http {verdict[goal['met_http']]}; errors {report['errors']}")
    if report["files"]:
        console.print(f"saved {report['files'][0]} and {report['files'][1]}")


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    for p, samples in report["overhead"]["samples_ms"].items():
        if samples:
            xs = np.sort(samples)
            ax1.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=p)
    ax1.set_xscale("log")
    ax1.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax1.set_xlabel("latency (ms, log)")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("max_tokens=1 latency CDF")
    ax1.legend()
    r = report["routing"]
    names = ["Router.score", "/v1/route seq", f"/v1/route ×{r['concurrency']}"]
    ax2.bar(names, [r["router_score_per_s"], r["route_sequential_per_s"], r["route_concurrent_per_s"]],
            color=["tab:gray", "tab:blue", "tab:orange"])
    ax2.set_yscale("log")
    ax2.set_title("routing decisions/s (log)")
    rows = report["throughput"]
    x = np.arange(len(rows))
    ax3.bar(x - 0.2, [t["direct"]["tok_per_s"] for t in rows], 0.4, label="direct")
    ax3.bar(x + 0.2, [t["gateway"]["tok_per_s"] for t in rows], 0.4, label="gateway (http)")
    ax3.set_xticks(x, [f"{t['concurrency']} streams" for t in rows])
    ax3.set_title(f"aggregate tok/s, max_tokens={report['protocol']['max_tokens']}")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_ints(text: str) -> list[int]:
    """``"16,64"`` -> ``[16, 64]`` (the CLI's comma-separated lists)."""
    return [int(v) for v in text.split(",") if v.strip()]

