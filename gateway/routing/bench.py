"""``hybrid-gateway bench router``: decisions/s, p50/p99 latency per query (single and batched), size, load time."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from gateway.routing.corpora import find_routing_data, load_source
from gateway.routing.errors import TrainingDataError
from gateway.routing.features import split_conversation
from gateway.routing.router import ACCURATE_DIR, DEFAULT_DIR, load_router


def _bench_prompts(num_prompts: int, seed: int) -> list[str]:
    """Real prompts (arena-hard + alpaca-eval: long and short) when routing-data is present, else synthetic ones."""
    try:
        find_routing_data()
        pool = [r.prompt for s in ("arena-hard", "alpaca-eval") for r in load_source(s) if isinstance(r.prompt, str)]
    except TrainingDataError:
        words = "the model must explain why a proof of the lemma holds for every integer n and write code".split()
        rng0 = np.random.default_rng(seed)
        pool = [" ".join(rng0.choice(words, size=int(rng0.integers(3, 400)))) for _ in range(512)]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.integers(0, len(pool), size=num_prompts)]


def _time_pytorch_encoder(encoder: Any, texts: list[str]) -> dict[str, float] | None:
    """The same all-MiniLM-L6-v2 forward + pooling in PyTorch (transformers' BertModel, the usual way to run
    it, e.g. under sentence-transformers), beside our ONNX Runtime graph on the same texts; None without
    transformers (a dev dependency)."""
    try:
        import torch
        import transformers
        from safetensors.torch import load_file
    except ImportError:
        return None
    from gateway.routing.embedding import MINILM, ensure_minilm

    weights, _ = ensure_minilm()
    config = transformers.BertConfig(
        vocab_size=MINILM.vocab, hidden_size=MINILM.hidden, num_hidden_layers=MINILM.layers,
        num_attention_heads=MINILM.heads, intermediate_size=MINILM.intermediate,
        max_position_embeddings=MINILM.max_positions, layer_norm_eps=MINILM.eps,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith("pooler")}
    model.load_state_dict(state, strict=False)

    def torch_one(text: str) -> None:
        ids, mask = encoder.token_ids([text])
        with torch.inference_mode():
            hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
            m = torch.from_numpy(mask).unsqueeze(-1).float()
            torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)

    def onnx_one(text: str) -> None:
        encoder.run(*encoder.token_ids([text]))

    times: dict[str, list[float]] = {"pytorch": [], "onnx": []}
    for text in texts[:20]:
        torch_one(text), onnx_one(text)
    for text in texts:  # alternate, so both see the same machine load
        for name, fn in (("pytorch", torch_one), ("onnx", onnx_one)):
            t = time.perf_counter_ns()
            fn(text)
            times[name].append((time.perf_counter_ns() - t) / 1e3)
    out = {f"{k}_{q}_us": float(np.percentile(v, p)) for k, v in times.items() for q, p in (("p50", 50), ("p99", 99))}
    out["num_prompts"] = len(texts)
    out["torch_threads"] = torch.get_num_threads()
    out["pytorch_over_onnx_p50"] = out["pytorch_p50_us"] / out["onnx_p50_us"]
    return out


def run_router_bench(
    router_dir: str | Path = DEFAULT_DIR,
    *,
    num_prompts: int = 2000,
    batch_size: int = 64,
    warmup: int = 200,
    seed: int = 0,
    compare_pytorch: int = 300,
) -> dict[str, Any]:
    """Time loading and scoring; returns a JSON-able dict of the figures. For an accurate-mode router the
    encoder's text cache is off (every prompt is embedded) and, when transformers is installed, the encoder
    is also timed against PyTorch on ``compare_pytorch`` prompts."""
    router_dir = Path(router_dir)
    t0 = time.perf_counter()
    router = load_router(router_dir)
    encoder = router.extractor.encoder  # the accurate mode loads its encoder here, inside the load time
    load_s = time.perf_counter() - t0
    if encoder is not None and hasattr(encoder, "set_cache_size"):
        encoder.set_cache_size(0)
    prompts = _bench_prompts(num_prompts, seed)
    for p in prompts[:warmup]:
        router.score(p)
    single = np.empty(len(prompts))
    for i, p in enumerate(prompts):
        t = time.perf_counter_ns()
        router.decide(p)
        single[i] = (time.perf_counter_ns() - t) / 1e3  # µs
    batch_per_query = []
    t_all = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        t = time.perf_counter_ns()
        router.score_batch(chunk)
        batch_per_query.append((time.perf_counter_ns() - t) / 1e3 / len(chunk))
    batch_total = time.perf_counter() - t_all
    huge = "Explain step by step why this holds. " * 3000  # ~110k characters: the worst case is bounded by max_chars
    worst = []
    for _ in range(50):
        t = time.perf_counter_ns()
        router.score(huge)
        worst.append((time.perf_counter_ns() - t) / 1e3)
    size = sum(f.stat().st_size for f in router_dir.iterdir() if f.is_file())
    encoder_bytes = 0
    if encoder is not None and getattr(encoder, "onnx_path", None) is not None:
        encoder_bytes = Path(encoder.onnx_path).stat().st_size
    chars = np.array([len(p) for p in prompts])
    peer = None
    if encoder is not None and compare_pytorch > 0 and hasattr(encoder, "run"):
        peer = _time_pytorch_encoder(encoder, [split_conversation(p)[0] for p in prompts[:compare_pytorch]])
    return {
        "router": str(router_dir),
        "mode": "accurate" if router.spec.embedding else "fast",
        "feature_spec": router.spec.to_dict(),
        "encoder_bytes": encoder_bytes,
        "encoder_vs_pytorch": peer,
        "num_prompts": len(prompts),
        "prompt_chars_p50": float(np.percentile(chars, 50)),
        "prompt_chars_p99": float(np.percentile(chars, 99)),
        "single": {
            "decisions_per_s": float(1e6 / single.mean()),
            "p50_us": float(np.percentile(single, 50)),
            "p99_us": float(np.percentile(single, 99)),
            "mean_us": float(single.mean()),
        },
        "batched": {
            "batch_size": batch_size,
            "decisions_per_s": float(len(prompts) / batch_total),
            "p50_us_per_query": float(np.percentile(batch_per_query, 50)),
            "p99_us_per_query": float(np.percentile(batch_per_query, 99)),
        },
        "huge_prompt_chars": len(huge),
        "huge_prompt_p50_us": float(np.percentile(worst, 50)),
        "model_bytes": int(size),
        "load_ms": load_s * 1e3,
        "cpu_count": os.cpu_count(),
    }


def bench_router_command(
    router_dir: Annotated[
        Path | None, typer.Option("--router", help="Router directory (default: the shipped router of --mode).")
    ] = None,
    mode: Annotated[str, typer.Option(help="Shipped router to time: fast or accurate.")] = "fast",
    num_prompts: Annotated[int, typer.Option(help="Prompts to score.")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Batch size of the batched run.")] = 64,
    output: Annotated[Path | None, typer.Option("--output", help="Also write the figures as JSON here.")] = None,
) -> None:
    """Router speed: decisions/s and p50/p99 latency per query (single and batched), model size, load time."""
    if mode not in ("fast", "accurate"):
        raise typer.BadParameter(f"--mode must be fast or accurate, got {mode!r}")
    if router_dir is None:
        router_dir = ACCURATE_DIR if mode == "accurate" else DEFAULT_DIR
    result = run_router_bench(router_dir, num_prompts=num_prompts, batch_size=batch_size)
    table = Table(
        title=f"router bench ({result['num_prompts']} prompts, median {result['prompt_chars_p50']:.0f} chars)"
    )
    for col in ("mode", "decisions/s", "p50 µs/query", "p99 µs/query"):
        table.add_column(col, justify="right")
    s, b = result["single"], result["batched"]
    table.add_row("single", f"{s['decisions_per_s']:,.0f}", f"{s['p50_us']:.1f}", f"{s['p99_us']:.1f}")
    table.add_row(
        f"batch {b['batch_size']}",
        f"{b['decisions_per_s']:,.0f}",
        f"{b['p50_us_per_query']:.1f}",
        f"{b['p99_us_per_query']:.1f}",
    )
    console = Console()
    console.print(table)
    console.print(
        f"model size {result['model_bytes'] / 1024:.1f} KiB"
        + (f" + encoder {result['encoder_bytes'] / 2**20:.1f} MiB" if result["encoder_bytes"] else "")
        + f", load {result['load_ms']:.1f} ms, "
        f"{result['huge_prompt_chars']:,}-char prompt {result['huge_prompt_p50_us']:.0f} µs"
    )
    peer = result["encoder_vs_pytorch"]
    if peer:
        console.print(
            f"encoder alone, {peer['num_prompts']} prompts alternated: ONNX Runtime p50 {peer['onnx_p50_us']:.0f} µs "
            f"(p99 {peer['onnx_p99_us']:.0f}) vs PyTorch p50 {peer['pytorch_p50_us']:.0f} µs "
            f"(p99 {peer['pytorch_p99_us']:.0f}): {peer['pytorch_over_onnx_p50']:.2f}x"
        )
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2) + "\n")


bench_app = typer.Typer(help="Benchmarks of the router.")
bench_app.command("router")(bench_router_command)

if __name__ == "__main__":
    typer.run(bench_router_command)
