"""``hybrid-gateway bench cloud``: the cloud engine at TP=1 and TP=N on the same weights, one run, ratios.

Each degree's engine is built once and warmed up, then driven through ``engine.core`` directly (no HTTP,
no event loop) so that every figure is timed around ``step()``::

    decode b1     one request, greedy, ignore_eos: new tokens after the first / time after the first token
    concurrency   c requests added at once (prompts of 32-128 tokens): generated tokens / wall time,
                  prefill included
    prefill       one n-token prompt alone, max_tokens=1: TTFT (add_request -> first token) and n / TTFT
    per step      rank 0's wall time per step = compute + communication + host, from COMM_TIMER
                  (cloud.parallel): communication is the time inside the batch broadcast, the all-reduces
                  and the logits gather; compute is the rest of TPRunner.execute; host is scheduling, batch
                  building, sampling and detokenizing. Workers report the same, gathered after each run.

Every degree gets the same total threads (default: all cores), split evenly over its ranks with at least
one each, so on a machine with fewer cores than ranks TP=N oversubscribes: the report says so. Prefix
caching is off, since the repeats would hit it. On a GPU, collectives are timed by CUDA events (not
exercised by the tests, which run on CPU).

    report = run_cloud_bench(CloudBenchConfig(tp=(1, 3), repeats=2), out_dir=Path("bench/results"))
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cloud.engine import CloudEngine
from cloud.model import valid_tp_degrees
from cloud.parallel import COLLECTIVES
from kernels.bench_report import machine_info, save_report
from kernels.checkpoints import ModelConfig, load_checkpoint
from kernels.checkpoints.store import resolve_model
from kernels.engine import EngineConfig, EngineCore
from kernels.sampling import SamplingParams

DTYPES = ("float32", "bfloat16", "float16")
MAX_DEFAULT_TP = 3
# Prompt text: tiled, then cut into windows of the wanted lengths (the content does not change the compute).
PASSAGE = ("The harbour town woke slowly. Fishing boats came in with the tide, gulls argued over the nets, and "
           "the baker on the corner opened his shutters to a queue that already reached the fountain. Nobody "
           "in the queue talked about the storm forecast for the evening, although everyone had read it. ")


@dataclass(slots=True)
class CloudBenchConfig:
    """What ``hybrid-gateway bench cloud`` measures; every field is one of its flags."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    tp: tuple[int, ...] | None = None  # None: 1 and the largest valid degree <= 3
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    new_tokens: int = 64
    concurrency: tuple[int, ...] = (1, 16, 64)
    prompt_lengths: tuple[int, ...] = (128, 512)  # TTFT / prefill prompts, each alone
    prompt_range: tuple[int, int] = (32, 128)  # lengths of the concurrent requests' prompts
    repeats: int = 3  # runs per figure; medians are reported
    threads: int | None = None  # total per degree, split over its ranks; None: all cores
    max_num_batched_tokens: int = 512
    kv_cache_mb: int = 1024  # per rank
    attention_impl: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        counts = {"new_tokens": self.new_tokens, "repeats": self.repeats, "kv_cache_mb": self.kv_cache_mb,
                  "max_num_batched_tokens": self.max_num_batched_tokens,
                  "threads": 1 if self.threads is None else self.threads}
        for name, value in counts.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("tp", "concurrency", "prompt_lengths"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise ValueError(f"{name} must list integers >= 1, got {values!r}")
        low, high = self.prompt_range
        if not 1 <= low <= high:
            raise ValueError(f"prompt_range must be (low, high) with 1 <= low <= high, got {self.prompt_range!r}")

    @classmethod
    def quick(cls, **overrides: Any) -> CloudBenchConfig:
        """Tiny sizes for a smoke run."""
        sizes = {"new_tokens": 8, "concurrency": (1, 4), "prompt_lengths": (64,), "prompt_range": (16, 32),
                 "repeats": 1}
        return cls(**{**sizes, **overrides})


def default_tp_degrees(config: ModelConfig) -> tuple[int, ...]:
    """1 and the largest degree <= 3 that divides the model's heads, KV heads and MLP width."""
    top = max(d for d in valid_tp_degrees(config) if d <= MAX_DEFAULT_TP)
    return (1,) if top == 1 else (1, top)


def threads_per_rank(tp: int, total: int) -> int:
    return max(1, total // tp)


def make_prompts(tokenizer: Any, lengths: Sequence[int], vocab_size: int) -> list[list[int]]:
    """Windows of the tokenized passage with the given lengths, each starting at a different offset."""
    ids = [t for t in tokenizer.encode(PASSAGE) if 0 <= t < vocab_size] or list(range(3, min(vocab_size, 300)))
    longest = max(lengths) + len(ids) * len(lengths)
    stream = ids * (longest // len(ids) + 1)
    return [stream[i * 7 % len(ids):i * 7 % len(ids) + n] for i, n in enumerate(lengths)]


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------------------------- runs
@dataclass(slots=True)
class _Run:
    wall_s: float = 0.0  # add_request of the first prompt -> last step returned
    step_wall_s: float = 0.0  # inside core.step() calls
    generated: int = 0
    first_token_s: dict[str, float] | None = None  # request id -> seconds after the start


def _drive(core: EngineCore, prompts: Sequence[list[int]], params: SamplingParams) -> _Run:
    """Add every prompt at once and step until all finish, timing each ``step()``."""
    run = _Run(first_token_s={})
    start = time.perf_counter()
    for prompt in prompts:
        core.add_request(prompt, params)
    while core.has_unfinished():
        t0 = time.perf_counter()
        outputs = core.step()
        t1 = time.perf_counter()
        run.step_wall_s += t1 - t0
        for out in outputs:
            run.generated += len(out.token_ids)
            if out.token_ids:
                run.first_token_s.setdefault(out.request_id, t1 - start)
    run.wall_s = time.perf_counter() - start
    return run


def _first_token_s(run: _Run) -> float:
    """Time to the first token of a run's (only) request."""
    return next(iter(run.first_token_s.values()))


def _split(runs: Sequence[_Run], ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step averages (ms) of rank 0's wall time split into compute, communication and host work."""
    r0 = ranks[0]
    steps = max(1, r0["steps"])
    wall = sum(r.step_wall_s for r in runs)
    comm = sum(r0["comm_s"].values())

    def per_step(seconds: float) -> float:
        return 1e3 * seconds / steps

    return {"steps": r0["steps"], "step_ms": per_step(wall), "compute_ms": per_step(r0["step_s"] - comm),
            "comm_ms": per_step(comm), "host_ms": per_step(wall - r0["step_s"]),
            "comm_fraction": comm / wall if wall else 0.0,
            "comm_by_kind_ms": {k: per_step(v) for k, v in r0["comm_s"].items()},
            "calls_per_step": {k: v / steps for k, v in r0["calls"].items()},
            "ranks": [{"rank": i, "steps": r["steps"], "forward_ms": 1e3 * r["step_s"] / max(1, r["steps"]),
                       "comm_ms": 1e3 * sum(r["comm_s"].values()) / max(1, r["steps"])}
                      for i, r in enumerate(ranks)]}


def _measure(core: EngineCore, prompts: Sequence[list[int]], params: SamplingParams, repeats: int,
             advance: Callable[[], None]) -> tuple[list[_Run], dict[str, Any]]:
    """``repeats`` runs of ``prompts`` under every rank's collective timer."""
    core.runner.start_timing()
    runs = []
    for _ in range(repeats):
        runs.append(_drive(core, prompts, params))
        advance()
    return runs, _split(runs, core.runner.stop_timing())


def measure_engine(engine: CloudEngine, cfg: CloudBenchConfig, advance: Callable[[], None]) -> dict[str, Any]:
    """Every figure for one warm engine; ``advance()`` is called after each run (progress)."""
    core, tokenizer = engine.core, engine.tokenizer
    vocab = core.runner.config.vocab_size
    rng = np.random.default_rng(cfg.seed)
    greedy = SamplingParams(temperature=0.0, max_tokens=cfg.new_tokens, ignore_eos=True)
    first_only = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    per_step: dict[str, Any] = {}

    prompt = make_prompts(tokenizer, [cfg.prompt_range[0]], vocab)
    runs, per_step["decode_b1"] = _measure(core, prompt, greedy, cfg.repeats, advance)
    # Steady-state decode: the tokens after the first over the time after the first.
    decode_rates = [(r.generated - 1) / (r.wall_s - _first_token_s(r)) for r in runs]
    decode_tok_s = statistics.median(decode_rates)
    weight_bytes = sum(p.numel() * p.element_size() for p in core.runner.model.parameters())  # tied: once
    decode = {"tok_per_s": decode_tok_s, "runs_tok_per_s": decode_rates, "prompt_tokens": len(prompt[0]),
              "weight_bytes_per_rank": weight_bytes, "achieved_gb_s_per_rank": decode_tok_s * weight_bytes / 1e9}

    concurrency = []
    for c in cfg.concurrency:
        lengths = rng.integers(cfg.prompt_range[0], cfg.prompt_range[1] + 1, size=c).tolist()
        runs, per_step[f"concurrency_{c}"] = _measure(core, make_prompts(tokenizer, lengths, vocab), greedy,
                                                      cfg.repeats, advance)
        rates = [r.generated / r.wall_s for r in runs]
        ttfts = [1e3 * t for r in runs for t in r.first_token_s.values()]
        concurrency.append({"num_requests": c, "tok_per_s": statistics.median(rates), "runs_tok_per_s": rates,
                            "ttft_ms_p50": float(np.percentile(ttfts, 50)),
                            "ttft_ms_p99": float(np.percentile(ttfts, 99)), "prompt_tokens": lengths})

    prefill = []
    for n in cfg.prompt_lengths:
        runs, per_step[f"prefill_{n}"] = _measure(core, make_prompts(tokenizer, [n], vocab), first_only,
                                                  cfg.repeats, advance)
        ttfts = [_first_token_s(r) for r in runs]
        ttft = statistics.median(ttfts)
        prefill.append({"prompt_tokens": n, "ttft_ms": 1e3 * ttft, "tok_per_s": n / ttft,
                        "runs_ttft_ms": [1e3 * t for t in ttfts]})
    return {"decode": decode, "concurrency": concurrency, "prefill": prefill, "per_step": per_step}


def _warm_up(engine: CloudEngine, cfg: CloudBenchConfig) -> None:
    """A small concurrent run and the longest prefill: allocator, thread pools and gloo pairs all warm."""
    vocab = engine.core.runner.config.vocab_size
    lengths = [cfg.prompt_range[1]] * min(4, max(cfg.concurrency)) + [max(cfg.prompt_lengths)]
    _drive(engine.core, make_prompts(engine.tokenizer, lengths, vocab),
           SamplingParams(temperature=0.0, max_tokens=min(8, cfg.new_tokens), ignore_eos=True))


def bench_degree(path: Path, tp: int, threads: int, cfg: CloudBenchConfig, progress: Progress) -> dict[str, Any]:
    """Build the degree-``tp`` engine on ``path`` once, warm it up, measure it, shut it down."""
    runs_per_degree = cfg.repeats * (1 + len(cfg.concurrency) + len(cfg.prompt_lengths))
    task = progress.add_task(f"TP={tp}: loading", total=2 + runs_per_degree)
    per_rank = threads_per_rank(tp, threads)
    config = EngineConfig(max_num_seqs=max(64, *cfg.concurrency), max_num_batched_tokens=cfg.max_num_batched_tokens,
                          kv_cache_bytes=cfg.kv_cache_mb << 20, enable_prefix_caching=False)
    loadavg_start = _loadavg()
    start = time.perf_counter()
    engine = CloudEngine.from_model(path, tp=tp, dtype=getattr(torch, cfg.dtype) if cfg.dtype else None,
                                    config=config, threads_per_rank=per_rank, attention_impl=cfg.attention_impl)
    try:
        load_s = time.perf_counter() - start
        progress.update(task, advance=1, description=f"TP={tp}: warming up")
        _warm_up(engine, cfg)
        progress.update(task, advance=1, description=f"TP={tp}: measuring")
        result = measure_engine(engine, cfg, lambda: progress.advance(task))
        dtype = str(engine.core.config.kv_dtype).removeprefix("torch.")
    finally:
        engine.shutdown()
    progress.update(task, description=f"TP={tp}: done")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"tp": tp, "threads_per_rank": per_rank, "total_threads": per_rank * tp,
            "oversubscribed": per_rank * tp > cores, "dtype": dtype, "load_s": load_s,
            "loadavg_start": loadavg_start, "loadavg_end": _loadavg(), **result}


def ratios(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every figure of each TP=N as a ratio to TP=1 (``tpN_over_tp1``): tok/s > 1 and TTFT / step ms < 1 favour N."""
    base = next((r for r in results if r["tp"] == 1), None)
    out: dict[str, dict[str, float]] = {}
    for res in results:
        if base is None or res is base:
            continue
        r = {"decode_b1_tok_per_s": res["decode"]["tok_per_s"] / base["decode"]["tok_per_s"]}
        for mine, theirs in zip(res["concurrency"], base["concurrency"], strict=True):
            r[f"aggregate_{mine['num_requests']}_tok_per_s"] = mine["tok_per_s"] / theirs["tok_per_s"]
        for mine, theirs in zip(res["prefill"], base["prefill"], strict=True):
            r[f"ttft_{mine['prompt_tokens']}_ms"] = mine["ttft_ms"] / theirs["ttft_ms"]
            r[f"prefill_{mine['prompt_tokens']}_tok_per_s"] = mine["tok_per_s"] / theirs["tok_per_s"]
        for name, split in res["per_step"].items():
            r[f"step_ms_{name}"] = split["step_ms"] / base["per_step"][name]["step_ms"]
        out[f"tp{res['tp']}_over_tp1"] = r
    return out


def run_cloud_bench(cfg: CloudBenchConfig, *, out_dir: Path | None = Path("bench/results"),
                    console: Console | None = None) -> dict[str, Any]:
    """Measure every degree of ``cfg.tp`` on ``cfg.model``; print the tables, save JSON + PNG under ``out_dir``.

    >>> report = run_cloud_bench(CloudBenchConfig.quick(tp=(1, 3)), out_dir=None)      # doctest: +SKIP
    >>> report["ratios"]["tp3_over_tp1"]["decode_b1_tok_per_s"]                        # doctest: +SKIP
    """
    console = console or Console(stderr=True)
    path = resolve_model(cfg.model, console=console)
    checkpoint = load_checkpoint(path)
    degrees = cfg.tp or default_tp_degrees(checkpoint.config)
    machine = machine_info()
    threads = cfg.threads or machine["cpus_usable"] or 1
    torch_threads = torch.get_num_threads()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    try:
        with progress:
            results = [bench_degree(path, tp, threads, cfg, progress) for tp in degrees]
    finally:
        torch.set_num_threads(torch_threads)  # from_model set this process's (rank 0's) count
    report = {"kind": "bench-cloud", "time": machine["date"], "machine": machine,
              "model": {"name": path.stem if path.is_file() else path.name, "path": str(path),
                        "num_layers": checkpoint.config.num_layers, "num_heads": checkpoint.config.num_heads,
                        "num_kv_heads": checkpoint.config.num_kv_heads},
              "config": {**asdict(cfg), "tp": list(degrees), "threads": threads},
              "results": results, "ratios": ratios(results), "files": []}
    if out_dir is not None:
        save_report(report, out_dir, "cloud", plot_report)
    print_report(report, console)
    return report


# ---------------------------------------------------------------------------------------------- output
def _f(x: float | None, fmt: str = ",.1f") -> str:
    return "—" if x is None else format(x, fmt)


def _shown_steps(cfg: dict[str, Any]) -> list[str]:
    return ["decode_b1", f"concurrency_{max(cfg['concurrency'])}", f"prefill_{max(cfg['prompt_lengths'])}"]


def _label(name: str) -> str:
    """"concurrency_64" -> "64 requests", "prefill_512" -> "prefill 512", "decode_b1" -> "decode b1"."""
    if name.startswith("concurrency_"):
        return f"{name.removeprefix('concurrency_')} requests"
    return name.replace("_", " ")


def print_report(report: dict[str, Any], console: Console) -> None:
    results, m = report["results"], report["machine"]
    others = [r for r in results if r["tp"] != 1]
    base = next((r for r in results if r["tp"] == 1), None)
    table = Table(title=f"bench cloud — {report['model']['name']}, {results[0]['dtype']}, "
                        f"{m['gpu'] or m['cpu']} ({m['cpus_usable']} cores)")
    table.add_column("figure")
    for r in results:
        table.add_column(f"TP={r['tp']}", justify="right")
    if base is not None:
        for r in others:
            table.add_column(f"TP={r['tp']} / TP=1", justify="right")

    def row(label: str, values: list[float], fmt: str = ",.1f") -> None:
        by_tp = dict(zip((r["tp"] for r in results), values, strict=True))
        ratio = [f"{by_tp[o['tp']] / by_tp[1]:.2f}x" if by_tp[1] else "—" for o in others] if base else []
        table.add_row(label, *[_f(v, fmt) for v in values], *ratio)

    table.add_row("threads / rank (total)", *[f"{r['threads_per_rank']} ({r['total_threads']}"
                                              f"{', oversubscribed' if r['oversubscribed'] else ''})" for r in results])
    row("decode b1 tok/s", [r["decode"]["tok_per_s"] for r in results])
    for i, c in enumerate(report["config"]["concurrency"]):
        row(f"aggregate tok/s, {c} requests", [r["concurrency"][i]["tok_per_s"] for r in results])
    for i, n in enumerate(report["config"]["prompt_lengths"]):
        row(f"TTFT {n} tokens (ms)", [r["prefill"][i]["ttft_ms"] for r in results])
        row(f"prefill {n} tokens tok/s", [r["prefill"][i]["tok_per_s"] for r in results])
    row("decode b1 GB/s per rank", [r["decode"]["achieved_gb_s_per_rank"] for r in results], ",.2f")
    console.print(table)

    split = Table(title="per step on rank 0 (ms) = compute + comm + host")
    for col in ("run", "TP", "step", "compute", "comm", "host", "comm %", "b/ar/g comm", "workers' comm"):
        split.add_column(col, justify="left" if col == "run" else "right")
    for name in _shown_steps(report["config"]):
        for r in results:
            s = r["per_step"][name]
            kinds = "/".join(_f(s["comm_by_kind_ms"][k]) for k in COLLECTIVES) if r["tp"] > 1 else "—"
            workers = ", ".join(_f(w["comm_ms"]) for w in s["ranks"][1:]) or "—"
            split.add_row(_label(name), str(r["tp"]), _f(s["step_ms"]), _f(s["compute_ms"]), _f(s["comm_ms"]),
                          _f(s["host_ms"]), _f(100 * s["comm_fraction"], ".0f"), kinds, workers)
    console.print(split)
    timer = "CUDA events" if m["gpu"] else "wall time inside the gloo calls, waiting for slower ranks included"
    console.print(f"communication = {timer}")
    for r in results:
        if r["oversubscribed"]:
            console.print(f"[yellow]TP={r['tp']}: {r['total_threads']} threads on {m['cpus_usable']} cores: "
                          "the ranks share cores, so TP=N here measures time-slicing, not parallel speed-up[/]")
    if report["files"]:
        console.print(f"saved {report['files'][0]} and {report['files'][1]}")


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in results:
        xs = [c["num_requests"] for c in r["concurrency"]]
        line, = ax1.plot(xs, [c["tok_per_s"] for c in r["concurrency"]], marker="o",
                         label=f"TP={r['tp']} ({r['threads_per_rank']} thr/rank)")
        ax1.scatter([1], [r["decode"]["tok_per_s"]], marker="*", s=120, color=line.get_color(), zorder=3)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(report["config"]["concurrency"], [str(c) for c in report["config"]["concurrency"]])
    ax1.minorticks_off()
    ax1.set_xlabel("concurrent requests (★ = steady batch-1 decode)")
    ax1.set_ylabel("generated tok/s")
    ax1.set_title("aggregate tok/s vs concurrency")
    ax1.legend()

    parts = [("compute", "compute_ms", "tab:blue"), *[(k, k, c) for k, c in
             zip(COLLECTIVES, ("tab:orange", "tab:red", "tab:purple"), strict=True)], ("host", "host_ms", "tab:gray")]
    bars = [(name, r) for name in _shown_steps(report["config"]) for r in results]
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for label, key, color in parts:
        ms = np.array([r["per_step"][n]["comm_by_kind_ms"][key] if key in COLLECTIVES else r["per_step"][n][key]
                       for n, r in bars])
        frac = ms / np.array([r["per_step"][n]["step_ms"] for n, r in bars])
        ax2.bar(x, 100 * frac, bottom=100 * bottom, color=color, label=label)
        bottom += frac
    for i, (n, r) in enumerate(bars):
        ax2.text(i, 101, f"{r['per_step'][n]['step_ms']:.1f} ms", ha="center", fontsize=8)
    ax2.set_xticks(x, [f"{_label(n)}\nTP={r['tp']}" for n, r in bars], fontsize=8)
    ax2.set_ylim(0, 112)
    ax2.set_ylabel("% of rank 0's step time")
    ax2.set_title("per step: compute / communication / host")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_ints(text: str) -> tuple[int, ...]:
    """``"1,16,64"`` -> ``(1, 16, 64)`` (the CLI's comma-separated lists)."""
    return tuple(int(v) for v in text.split(",") if v.strip())
