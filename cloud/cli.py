"""``hybrid-gateway cloud serve``: the cloud tier's ranks plus its OpenAI-compatible HTTP server.

    hybrid-gateway cloud serve --tp 3                      # this process is rank 0 and spawns ranks 1..2
    torchrun --nproc-per-node 4 -m gateway.cli cloud serve --model /models/llama   # multi-GPU / multi-node

Rank 0 serves HTTP. SIGINT / SIGTERM stop uvicorn, whose lifespan shuts the engine down (workers
joined, process group destroyed). A rank that dies makes the engine call ``on_failure``, which logs
one line and stops the server; the command then exits with status 1.
"""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="The cloud tier: tensor-parallel engine + OpenAI-compatible server.")
log = logging.getLogger("hybrid_gateway.cloud")

DTYPES = ("float32", "bfloat16", "float16")


@app.command("serve")
def serve(
    model: Annotated[str | None, typer.Option(help="GGUF file, HF directory or cached model name "
                                                   "(default: the embedded SmolLM2-135M-Instruct).")] = None,
    tp: Annotated[int, typer.Option(help="Tensor-parallel degree: must divide the attention and KV head counts "
                                         "(ignored under torchrun, which sets WORLD_SIZE).")] = 1,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8001,
    dtype: Annotated[str | None, typer.Option(help="Activations: float32 | bfloat16 | float16 "
                                                   "(default: float32 on CPU, bfloat16 on GPU).")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Most sequences in one batch.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Token budget of one engine step.")] = 512,
    kv_cache_mb: Annotated[int, typer.Option(help="KV cache per rank, MiB.")] = 1024,
    threads_per_rank: Annotated[int | None, typer.Option(help="Torch threads per rank (default: cores / tp).")]
    = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model id clients see (default: the file's name).")]
    = None,
    log_level: Annotated[str, typer.Option(help="critical | error | warning | info | debug.")] = "info",
) -> int:
    """Start the cloud engine (TP ranks via torch.multiprocessing, or join torchrun) and serve it over HTTP."""
    import torch
    import uvicorn

    from cloud.engine import CloudEngine, run_torchrun_rank
    from cloud.server import create_app
    from kernels.engine import EngineConfig
    from kernels.serving.server import GracefulServer

    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; use one of {DTYPES}", param_hint="--dtype")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch_dtype = getattr(torch, dtype) if dtype else None
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          kv_cache_bytes=kv_cache_mb << 20)
    server: GracefulServer | None = None
    failure: list[str] = []

    def on_failure(reason: str) -> None:
        failure.append(reason)
        log.error("cloud engine failed: %s; stopping the server", reason)
        if server is not None:
            server.should_exit = True

    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if under_torchrun and int(os.environ.get("RANK", "0")) != 0:
        run_torchrun_rank(model, dtype=torch_dtype, config=config, threads_per_rank=threads_per_rank)
        return 0

    def factory() -> CloudEngine:
        if under_torchrun:
            return run_torchrun_rank(model, dtype=torch_dtype, config=config, threads_per_rank=threads_per_rank,
                                     on_failure=on_failure)
        return CloudEngine.from_model(model, tp=tp, dtype=torch_dtype, config=config,
                                      threads_per_rank=threads_per_rank, on_failure=on_failure)

    # Ranks are spawned from the lifespan, so the engine is built on the main thread: children then
    # die with this process (PR_SET_PDEATHSIG is per thread).
    engine = factory()
    app_ = create_app(lambda: engine, served_model_name=served_model_name)
    server = GracefulServer(uvicorn.Config(app_, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    typer.echo(f"cloud: serving {served_model_name or engine.model_id} (tp={engine.tp}) on http://{host}:{port}/v1",
               err=True)
    try:
        server.run()
    finally:
        engine.shutdown()  # idempotent; covers a server that failed to start
    if failure:
        typer.echo(f"cloud: exiting after a failure: {failure[0]}", err=True)
        return 1
    return 0
