"""Batch-1 greedy decode speed of the edge runner (ONNX Runtime dense parts + kernels attention).

    python bench/edge_decode.py --quant int4 --new-tokens 64 --threads 2 [--global-pool] [--batches 1,16,64]
        [--layout auto|fused|split] [--matmul auto|ort|hgw] [--lm-head auto|stored|int4|rescore] [--no-huge-pages]
        [--kv-dtype auto|float32|float16]

Prints prefill time, decode tok/s and a per-step breakdown of a decode step: time inside ONNX Runtime
(sessions replayed alone on the same bound buffers), time inside ``kernels.attention`` (the layer calls
replayed alone; with the fused layout attention is inside the one ONNX Runtime call), and the Python glue
that remains.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from edge.runner import OnnxRunner, use_global_thread_pool
from kernels.attention import attention_kv
from kernels.checkpoints import load_checkpoint
from kernels.checkpoints.store import resolve_model
from kernels.kv_cache.layout import KVCacheSpec
from kernels.runner import ModelInput
from kernels.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--quant", default="int4", choices=("int4", "int8", "fp32"))
    parser.add_argument("--accuracy-level", type=int, default=None)
    parser.add_argument("--source", default="auto", choices=("auto", "fast", "requantize"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--global-pool", action="store_true", help="one ONNX Runtime thread pool for all sessions")
    parser.add_argument("--batches", default="", help="also time decode steps of these batch sizes, e.g. 1,16,64 "
                                                      "(every sequence at --context tokens)")
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--layout", default="auto", choices=("auto", "fused", "split"))
    parser.add_argument("--matmul", default="auto", choices=("auto", "ort", "hgw"))
    parser.add_argument("--lm-head", default="auto", choices=("auto", "stored", "int4", "rescore"))
    parser.add_argument("--no-huge-pages", action="store_true", help="leave the weights in ONNX Runtime's file "
                                                                      "mapping (4 KiB pages; edge/hugepages.py)")
    parser.add_argument("--kv-dtype", default="auto", choices=("auto", "float32", "float16"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    if args.global_pool and not use_global_thread_pool(args.threads):
        parser.error("ONNX Runtime is already initialised in this process")
    ckpt = load_checkpoint(resolve_model(args.model))
    t0 = time.perf_counter()
    runner = OnnxRunner(ckpt, args.quant, accuracy_level=args.accuracy_level, source=args.source,
                        intra_op_num_threads=args.threads, layout=args.layout,
                        matmul=args.matmul, lm_head=args.lm_head, huge_pages=not args.no_huge_pages,
                        kv_dtype=args.kv_dtype)
    print(f"load/build: {time.perf_counter() - t0:.2f}s (reused cache: {runner.model.reused}), "
          f"threads={runner.intra_op_num_threads}, layout={runner.layout}, matmul={runner.matmul}, "
          f"lm_head={runner.lm_head}, kv_dtype={runner.kv_dtype}, weights in huge pages={runner.weights_huge_pages}, "
          f"dir={runner.model.directory}")
    if runner.host_threads is not None:
        torch.set_num_threads(runner.host_threads)  # as EngineCore does around a step (argmax next to ORT's pool)
    tok = Tokenizer.from_checkpoint(ckpt)
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    cfg, bs = runner.config, 16
    total = len(prompt) + args.new_tokens
    spec = KVCacheSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks=-(-total // bs), block_size=bs,
                       dtype=runner.kv_dtype)
    table = list(range(spec.num_blocks))

    rates = []
    for _ in range(args.repeats):
        cache = spec.allocate()
        t0 = time.perf_counter()
        logits = runner.execute(ModelInput.build([prompt], [0], [table], [True], bs), cache)
        prefill_s = time.perf_counter() - t0
        tokens = [int(logits.argmax(-1))]
        t0 = time.perf_counter()
        for i in range(args.new_tokens - 1):
            batch = ModelInput.build([[tokens[-1]]], [len(prompt) + i], [table], [True], bs)
            tokens.append(int(runner.execute(batch, cache).argmax(-1)))
        decode_s = time.perf_counter() - t0
        rates.append((args.new_tokens - 1) / decode_s)
        print(f"prefill {len(prompt)} tokens: {prefill_s * 1e3:.1f} ms; decode {args.new_tokens - 1} tokens: "
              f"{rates[-1]:.1f} tok/s")
    print(f"text: {tok.decode(tokens)!r}")
    print(f"decode tok/s: median {statistics.median(rates):.1f}, best {max(rates):.1f}")

    # Breakdown of one decode step at position len(prompt) + new_tokens - 1 (cache full of real K/V).
    batch = ModelInput.build([[tokens[-1]]], [total - 1], [table], [True], bs)
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        runner.execute(batch, cache)
    step_s = (time.perf_counter() - t0) / n
    step = runner._step_buffers(1, 1)
    t0 = time.perf_counter()
    for _ in range(n):
        for run in step.runs:
            run(runner._run_options)
    ort_s = (time.perf_counter() - t0) / n
    c = cfg
    if runner.layout == "fused":
        print(f"decode step {step_s * 1e3:.2f} ms = ORT with attention inside {ort_s * 1e3:.2f} ms (1 session) + "
              f"glue {(step_s - ort_s) * 1e3:.2f} ms")
        for size in (int(b) for b in args.batches.split(",") if b):
            batched_step(runner, size, args.context)
        return 0
    attn_s = _split_attention_s(runner, step, cache, batch, n)
    t0 = time.perf_counter()
    for _ in range(n):
        ModelInput.build([[tokens[-1]]], [total - 1], [table], [True], bs)
    build_s = (time.perf_counter() - t0) / n
    print(f"decode step {step_s * 1e3:.2f} ms = ORT {ort_s * 1e3:.2f} ms ({len(runner.sessions)} sessions) + "
          f"attention {attn_s * 1e3:.2f} ms ({c.num_layers} calls) + glue {(step_s - ort_s - attn_s) * 1e3:.2f} ms; "
          f"(ModelInput.build outside the step: {build_s * 1e3:.2f} ms)")
    for size in (int(b) for b in args.batches.split(",") if b):
        batched_step(runner, size, args.context)
    return 0


def batched_step(runner: OnnxRunner, batch_size: int, context: int, block_size: int = 4, n: int = 10) -> None:
    """Time one decode step of ``batch_size`` sequences with ``context`` cached tokens each, split like above."""
    c = runner.config
    blocks = -(-(context + 1) // block_size)
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, num_blocks=blocks * batch_size, block_size=block_size,
                       dtype=runner.kv_dtype)
    cache = spec.allocate()
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(batch_size)]
    batch = ModelInput.build([[5]] * batch_size, [context] * batch_size, tables, [True] * batch_size, block_size)
    for _ in range(3):
        runner.execute(batch, cache)
    t0 = time.perf_counter()
    for _ in range(n):
        runner.execute(batch, cache)
    step_s = (time.perf_counter() - t0) / n
    step = runner._step_buffers(batch_size, batch_size)
    t0 = time.perf_counter()
    for _ in range(n):
        for run in step.runs:
            run(runner._run_options)
    ort_s = (time.perf_counter() - t0) / n
    if runner.layout == "fused":
        print(f"batch {batch_size} at context {context}: step {step_s * 1e3:.1f} ms ({batch_size / step_s:.0f} tok/s)"
              f" = ORT with attention {ort_s * 1e3:.1f} + glue {(step_s - ort_s) * 1e3:.1f} ms")
        return
    attn_s = _split_attention_s(runner, step, cache, batch, n)
    print(f"batch {batch_size} at context {context}: step {step_s * 1e3:.1f} ms ({batch_size / step_s:.0f} tok/s) = "
          f"ORT {ort_s * 1e3:.1f} + attention {attn_s * 1e3:.1f} + glue {(step_s - ort_s - attn_s) * 1e3:.1f} ms")


def _split_attention_s(runner: OnnxRunner, step, cache: torch.Tensor, batch: ModelInput, n: int) -> float:
    """Seconds of one split-layout step's attention: its layer calls replayed alone on the bound buffers."""
    c, size = runner.config, batch.input_ids.shape[0]
    q = step.q.view(size, c.num_heads, c.head_dim)
    kv = step.kv.view(2, size, c.num_kv_heads, c.head_dim)
    out = step.attn.view(size, c.num_heads, c.head_dim)
    saved = torch.get_num_threads()
    if runner.attention_threads is not None:
        torch.set_num_threads(runner.attention_threads)  # as execute() does
    t0 = time.perf_counter()
    for _ in range(n):
        for layer in range(c.num_layers):
            attention_kv(q, kv, cache[layer], batch.attn, runner.scale, runner.attention_impl, out=out,
                         threads=runner.intra_op_num_threads)
    torch.set_num_threads(saved)
    return (time.perf_counter() - t0) / n


if __name__ == "__main__":
    raise SystemExit(main())
