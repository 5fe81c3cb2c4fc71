"""Benchmark the paged attention ops: Triton vs the torch path vs dense scaled_dot_product_attention.

    python bench/attention_bench.py --out bench/results/attention-h100.json   # on a GPU machine
    python bench/attention_bench.py --cpu-smoke                               # tiny, interpreter, checks the script

Decode reports achieved memory bandwidth (K and V of every cached token read once, plus q and out);
prefill reports TFLOP/s over the causal score matrix (4 * num_heads * head_dim FLOPs per visible
query-key pair: QK^T and PV). Times are medians from ``triton.testing.do_bench`` (which flushes L2
between runs); with ``--cpu-smoke`` a perf_counter median stands in, since do_bench needs a GPU.
Dense SDPA runs on contiguous [batch, heads, len, head_dim] copies of the same K/V, so it is the
no-paging baseline; it is skipped for chunked prefill (context_len > 0), where SDPA has no varlen causal mask.
Each config first checks the Triton output against SDPA (or the torch path for chunked prefill) and
records the result as ``triton_check`` in its rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Model:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Config:
    op: str  # "decode" | "prefill"
    model: Model
    num_seqs: int
    context_len: int  # tokens already cached per sequence
    query_len: int  # new tokens per sequence (1 for decode)
    block_size: int
    dtype: str

    @property
    def seq_len(self) -> int:
        return self.context_len + self.query_len


TORCH_PATH_MAX_SCORE_BYTES = 2**31

SMOLLM2 = Model("smollm2-135m", 9, 3, 64)
LLAMA8B = Model("llama-8b", 32, 8, 128)


def gpu_configs(dtype: str, block_size: int) -> list[Config]:
    configs = []
    for model in (SMOLLM2, LLAMA8B):
        for num_seqs in (1, 8, 32, 128):
            for seq_len in (512, 2048, 8192):
                configs.append(Config("decode", model, num_seqs, seq_len - 1, 1, block_size, dtype))
        for num_seqs, context_len, query_len in ((1, 0, 512), (1, 0, 2048), (1, 0, 8192), (8, 0, 1024),
                                                 (4, 2048, 2048)):
            configs.append(Config("prefill", model, num_seqs, context_len, query_len, block_size, dtype))
    return configs


def smoke_configs() -> list[Config]:
    model = Model("tiny", 4, 2, 64)
    return [Config("decode", model, 2, 63, 1, 16, "float32"), Config("prefill", model, 2, 0, 32, 16, "float32"),
            Config("prefill", model, 1, 16, 16, 16, "float32")]


def make_inputs(cfg: Config, device: str) -> dict:
    """Paged inputs with shuffled block tables, plus dense copies of the same K/V for SDPA."""
    from kernels.attention import AttentionMetadata

    dtype = getattr(torch, cfg.dtype)
    m = cfg.model
    gen = torch.Generator(device=device).manual_seed(0)  # random data made on the device: GBs for big configs
    blocks_per_seq = -(-cfg.seq_len // cfg.block_size)
    num_blocks = cfg.num_seqs * blocks_per_seq
    tables = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).view(cfg.num_seqs, -1)
    shape = (num_blocks, cfg.block_size, m.num_kv_heads, m.head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    meta = AttentionMetadata.build(tables.tolist(), [cfg.context_len] * cfg.num_seqs, [cfg.query_len] * cfg.num_seqs,
                                   cfg.block_size, device)
    q = torch.randn(cfg.num_seqs * cfg.query_len, m.num_heads, m.head_dim, generator=gen, device=device, dtype=dtype)

    def dense(cache: torch.Tensor) -> torch.Tensor:  # [num_seqs, num_kv_heads, seq_len, head_dim]
        seqs = cache[tables.to(device)].flatten(1, 2)[:, : cfg.seq_len]
        return seqs.transpose(1, 2).contiguous()

    q_dense = q.view(cfg.num_seqs, cfg.query_len, m.num_heads, m.head_dim).transpose(1, 2).contiguous()
    return {"q": q, "k_cache": k_cache, "v_cache": v_cache, "meta": meta,
            "q_dense": q_dense, "k_dense": dense(k_cache), "v_dense": dense(v_cache)}


def work(cfg: Config) -> tuple[float, float]:
    """(bytes moved, FLOPs) of one call."""
    m = cfg.model
    elem = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    kv_bytes = cfg.num_seqs * cfg.seq_len * m.num_kv_heads * m.head_dim * 2 * elem
    q_out_bytes = 2 * cfg.num_seqs * cfg.query_len * m.num_heads * m.head_dim * elem
    # Query j (0-based) of a sequence sees context_len + j + 1 keys.
    pairs = cfg.num_seqs * (cfg.query_len * cfg.context_len + cfg.query_len * (cfg.query_len + 1) / 2)
    return kv_bytes + q_out_bytes, 4 * m.num_heads * m.head_dim * pairs


def median_ms(fn: Callable[[], object], use_do_bench: bool) -> float:
    if use_do_bench:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_config(cfg: Config, device: str, use_do_bench: bool, torch_path_max_seqs: int) -> list[dict]:
    import kernels.attention as attn
    from tests.kernels.tolerances import tolerance

    x = make_inputs(cfg, device)
    m = cfg.model
    scale = 1.0 / math.sqrt(m.head_dim)
    paged = attn.paged_decode if cfg.op == "decode" else attn.paged_prefill

    def paged_call(impl: str) -> Callable[[], torch.Tensor]:
        return lambda: paged(x["q"], x["k_cache"], x["v_cache"], x["meta"], scale, impl=impl)

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            x["q_dense"], x["k_dense"], x["v_dense"], is_causal=cfg.op == "prefill", scale=scale, enable_gqa=True)

    impls: dict[str, Callable[[], torch.Tensor]] = {"triton": paged_call("triton")}
    # The torch path loops over sequences in Python and materialises each one's float32 score matrix.
    score_bytes = 4 * m.num_heads * cfg.query_len * cfg.seq_len
    if cfg.num_seqs <= torch_path_max_seqs and score_bytes <= TORCH_PATH_MAX_SCORE_BYTES:
        impls["torch"] = paged_call("torch")
    if cfg.context_len == 0 or cfg.op == "decode":
        impls["sdpa"] = sdpa

    # Check before timing: the Triton output against SDPA (or the torch path when SDPA cannot express it).
    # A failure is recorded in every row of the config and printed, and the run goes on.
    out = impls["triton"]().float()
    if "sdpa" in impls:
        expected = impls["sdpa"]().transpose(1, 2).reshape(out.shape).float()
    else:
        expected = paged_call("torch")().float()
    tol = tolerance(getattr(torch, cfg.dtype))
    max_abs_err = (out - expected).abs().max().item()
    check = "ok" if torch.allclose(out, expected, **tol) else f"FAILED (tolerance {tol})"
    if check != "ok":
        print(f"WARNING {cfg}: triton differs from the baseline, max abs err {max_abs_err:.3g}", file=sys.stderr)

    nbytes, flops = work(cfg)
    rows = []
    for impl, fn in impls.items():
        ms = median_ms(fn, use_do_bench)
        row = {"op": cfg.op, "model": m.name, "num_heads": m.num_heads, "num_kv_heads": m.num_kv_heads,
               "head_dim": m.head_dim, "num_seqs": cfg.num_seqs, "context_len": cfg.context_len,
               "query_len": cfg.query_len, "block_size": cfg.block_size, "dtype": cfg.dtype, "impl": impl,
               "median_ms": ms, "triton_check": check, "triton_max_abs_err": max_abs_err}
        if cfg.op == "decode":
            row["gb_per_s"] = nbytes / (ms * 1e-3) / 1e9
        else:
            row["tflop_per_s"] = flops / (ms * 1e-3) / 1e12
        rows.append(row)
        metric = f"{row['gb_per_s']:8.1f} GB/s" if cfg.op == "decode" else f"{row['tflop_per_s']:8.2f} TFLOP/s"
        print(f"{cfg.op:7s} {m.name:13s} seqs={cfg.num_seqs:<4d} ctx={cfg.context_len:<5d} q={cfg.query_len:<5d} "
              f"{impl:6s} {ms:9.3f} ms {metric}", flush=True)
    return rows


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results path (default bench/results/attention-<device>.json)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--torch-path-max-seqs", type=int, default=8,
                        help="time the torch path only for batches up to this many sequences")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny float32 configs on CPU with the Triton interpreter; checks the script runs")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated, i.e. before importing them
        device, device_name, configs, use_do_bench = "cpu", f"cpu-smoke ({platform.processor() or 'cpu'})", \
            smoke_configs(), False
    elif torch.cuda.is_available():
        device, device_name, use_do_bench = "cuda", torch.cuda.get_device_name(), True
        configs = gpu_configs(args.dtype, args.block_size)
    else:
        print("no CUDA device: run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.kernels.tolerances
    import triton

    rows = []
    for cfg in configs:
        rows.extend(run_config(cfg, device, use_do_bench, args.torch_path_max_seqs))
        if device == "cuda":
            torch.cuda.empty_cache()

    out = args.out or Path(__file__).parent / "results" / f"attention-{device_slug(device_name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
              "timer": "triton.testing.do_bench median" if use_do_bench else "perf_counter median (smoke)",
              "configs": [asdict(c) for c in configs], "results": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {len(rows)} results to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
