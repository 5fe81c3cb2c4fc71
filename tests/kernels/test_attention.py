"""Paged attention: Triton kernels against the PyTorch reference, the reference against dense attention.

Every batch is built the way an engine builds it: each sequence has its full K/V (the dense truth);
its cached context is written through the layout's slot mapping into shuffled, non-contiguous blocks
(two sequences may share prefix blocks), then the step's new tokens are written with ``write_kv``.
Slots no sequence owns hold NaN, so a kernel that reads past a sequence's blocks fails loudly.

The reference runs the full parameter grid against dense attention. The Triton kernels run under the
interpreter on CPU, which is slow, so they get a covering subset: every (heads, head_dim, block_size,
dtype) combination, with the scenarios rotated over them so that each scenario meets every value of
every other dimension (``test_triton_grids_cover_every_value`` checks it). bfloat16 (which the
interpreter cannot compute) and large shapes are in the ``gpu``-marked tests at the end.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import pytest
import torch

import kernels.attention as attn
from kernels.attention import (
    AttentionMetadata,
    attention,
    dense_attention_ref,
    paged_decode,
    paged_decode_ref,
    paged_prefill,
    paged_prefill_ref,
    write_kv_ref,
)
from kernels.attention.decode import paged_decode_triton
from kernels.kv_cache.layout import slot_mapping as layout_slot_mapping
from tests.kernels.tolerances import tolerance

HEADS = [(4, 4), (9, 3), (8, 2), (5, 1)]  # (num_heads, num_kv_heads): GQA ratios 1, 3, 4, 5
HEAD_DIMS = [64, 128]
BLOCK_SIZES = [16, 32]
DTYPES = [torch.float32, torch.float16]


@dataclass(frozen=True)
class Scenario:
    """A batch shape: per sequence, tokens already cached and new tokens this step."""

    name: str
    context_lens: tuple[int, ...]
    query_lens: tuple[int, ...]
    shared_prefix: int = 0  # leading tokens sequences 0 and 1 share by prefix reuse (whole blocks)


PREFILL_SCENARIOS = [
    Scenario("prompt-1", (0,), (1,)),
    Scenario("prompt-15", (0,), (15,)),
    Scenario("prompt-16", (0,), (16,)),
    Scenario("prompt-17", (0,), (17,)),
    Scenario("prompt-100", (0,), (100,)),
    Scenario("varlen", (0, 0, 0, 0, 0), (17, 1, 100, 16, 15)),
    Scenario("cached-prefix", (16, 37, 64, 3), (17, 1, 100, 40)),  # prefix hits and later chunks
    Scenario("shared-prefix", (64, 64, 10), (15, 33, 20), shared_prefix=64),
]
DECODE_SCENARIOS = [
    Scenario("len-1", (0,), (1,)),
    Scenario("varlen", (0, 14, 15, 16, 99), (1, 1, 1, 1, 1)),  # seq_lens 1, 15, 16, 17, 100
    Scenario("long", (299, 64), (1, 1)),
    Scenario("shared-prefix", (64, 70, 5), (1, 1, 1), shared_prefix=64),
]


def covering_grid(scenarios: list[Scenario], per_combo: int) -> list[tuple]:
    """Every (heads, head_dim, block_size, dtype) combination with ``per_combo`` rotated scenarios."""
    cases = []
    combos = itertools.product(HEADS, HEAD_DIMS, BLOCK_SIZES, DTYPES)
    for i, (heads, head_dim, block_size, dtype) in enumerate(combos):
        for j in range(per_combo):
            # The i // 8 shift keeps a scenario from always meeting the same dtype / block_size.
            scenario = scenarios[(i + j + i // 8) % len(scenarios)]
            cases.append(pytest.param(*heads, head_dim, block_size, dtype, scenario,
                                      id=f"{heads[0]}x{heads[1]}-d{head_dim}-b{block_size}-{_dtype_id(dtype)}-"
                                         f"{scenario.name}"))
    return cases


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    new_k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    new_v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    meta: AttentionMetadata
    k_full: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim], the dense truth
    v_full: list[torch.Tensor]

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.q.shape[-1])


def make_batch(scenario: Scenario, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, device: str = "cpu", seed: int = 0, write_new: bool = True) -> Batch:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    seq_lens = [c + q for c, q in zip(scenario.context_lens, scenario.query_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    shared_blocks = scenario.shared_prefix // block_size
    assert scenario.shared_prefix % block_size == 0 and min(scenario.context_lens[:2]) >= scenario.shared_prefix
    num_blocks = sum(blocks_per_seq) - shared_blocks + 3  # three spare blocks nobody owns
    free = torch.randperm(num_blocks, generator=gen).tolist()  # shuffled, non-contiguous block ids
    tables: list[list[int]] = []
    for i, n in enumerate(blocks_per_seq):
        prefix = tables[0][:shared_blocks] if i == 1 else []
        tables.append(prefix + [free.pop() for _ in range(n - len(prefix))])

    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()
    k_full = [randn(s, num_kv_heads, head_dim) for s in seq_lens]
    v_full = [randn(s, num_kv_heads, head_dim) for s in seq_lens]
    if shared_blocks:  # prefix reuse: the shared blocks hold the same tokens for both sequences
        k_full[1][: scenario.shared_prefix] = k_full[0][: scenario.shared_prefix]
        v_full[1][: scenario.shared_prefix] = v_full[0][: scenario.shared_prefix]
    for table, context_len, k, v in zip(tables, scenario.context_lens, k_full, v_full):
        slots = torch.tensor(layout_slot_mapping(table, 0, context_len, block_size), dtype=torch.int64, device=device)
        write_kv_ref(k[:context_len], v[:context_len], k_cache, v_cache, slots)

    meta = AttentionMetadata.build(tables, list(scenario.context_lens), list(scenario.query_lens), block_size, device)
    # Pad the tables with -1, not build()'s 0: a kernel that reads a padding entry goes out of bounds.
    for i, n in enumerate(blocks_per_seq):
        meta.block_tables[i, n:] = -1
    new_k = torch.cat([k[c:] for k, c in zip(k_full, scenario.context_lens)])
    new_v = torch.cat([v[c:] for v, c in zip(v_full, scenario.context_lens)])
    q = randn(meta.num_tokens, num_heads, head_dim)
    if write_new:
        write_kv_ref(new_k, new_v, k_cache, v_cache, meta.slot_mapping)
    return Batch(q, new_k, new_v, k_cache, v_cache, meta, k_full, v_full)


def dense_expected(batch: Batch) -> torch.Tensor:
    """Each sequence's new queries against its full dense K/V, concatenated like ``q``."""
    cu = batch.meta.cu_seqlens_q.tolist()
    outs = [dense_attention_ref(batch.q[cu[i]:cu[i + 1]], k, v, causal=True, scale=batch.scale)
            for i, (k, v) in enumerate(zip(batch.k_full, batch.v_full))]
    return torch.cat(outs)


def describe(op: str, **params: object):
    """``msg=`` callable for assert_close: the op and parameters, then torch's mismatch report."""
    text = ", ".join(f"{k}={v}" for k, v in params.items())
    return lambda report: f"{op} ({text}):\n{report}"


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


# --- the reference against dense attention: full grid ------------------------------------------------


@pytest.mark.parametrize("scenario", PREFILL_SCENARIOS, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
def test_prefill_reference_matches_dense(num_heads, num_kv_heads, head_dim, block_size, dtype, scenario):
    batch = make_batch(scenario, num_heads, num_kv_heads, head_dim, block_size, dtype)
    out = paged_prefill_ref(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out, dense_expected(batch), **tolerance(dtype),
                               msg=describe("paged_prefill_ref vs dense", scenario=scenario.name, block=block_size))


@pytest.mark.parametrize("scenario", DECODE_SCENARIOS, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
def test_decode_reference_matches_dense(num_heads, num_kv_heads, head_dim, block_size, dtype, scenario):
    batch = make_batch(scenario, num_heads, num_kv_heads, head_dim, block_size, dtype)
    out = paged_decode_ref(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out, dense_expected(batch), **tolerance(dtype),
                               msg=describe("paged_decode_ref vs dense", scenario=scenario.name, block=block_size))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("query_len", "kv_len"), [(1, 1), (7, 7), (5, 40)])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
def test_dense_reference_matches_sdpa(num_heads, num_kv_heads, query_len, kv_len, causal):
    """Hold the referee itself to PyTorch's scaled_dot_product_attention (bottom-right causal mask)."""
    q = torch.randn(query_len, num_heads, 64)
    k = torch.randn(kv_len, num_kv_heads, 64)
    v = torch.randn(kv_len, num_kv_heads, 64)
    out = dense_attention_ref(q, k, v, causal=causal)
    group = num_heads // num_kv_heads
    mask = torch.ones(query_len, kv_len, dtype=torch.bool).tril(kv_len - query_len) if causal else None
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(group, 1).transpose(0, 1),
        attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(out, expected, **tolerance(torch.float32),
                               msg=describe("dense_attention_ref vs sdpa", causal=causal))


# --- the Triton kernels against the reference: covering grid -----------------------------------------


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "block_size", "dtype", "scenario"),
                         covering_grid(PREFILL_SCENARIOS, per_combo=2))
def test_prefill_triton_matches_reference(num_heads, num_kv_heads, head_dim, block_size, dtype, scenario):
    batch = make_batch(scenario, num_heads, num_kv_heads, head_dim, block_size, dtype)
    out = paged_prefill(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale, impl="triton")
    expected = paged_prefill_ref(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out, expected, **tolerance(dtype),
                               msg=describe("paged_prefill triton vs ref", scenario=scenario.name))


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim", "block_size", "dtype", "scenario"),
                         covering_grid(DECODE_SCENARIOS, per_combo=1))
def test_decode_triton_matches_reference(num_heads, num_kv_heads, head_dim, block_size, dtype, scenario):
    batch = make_batch(scenario, num_heads, num_kv_heads, head_dim, block_size, dtype)
    out = paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale, impl="triton")
    expected = paged_decode_ref(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out, expected, **tolerance(dtype),
                               msg=describe("paged_decode triton vs ref", scenario=scenario.name))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(9, 3), (5, 1)])
def test_decode_triton_split_k(num_heads, num_kv_heads, dtype, num_splits):
    """Split-K partial results merge exactly; short sequences leave some splits empty."""
    scenario = Scenario("split-k", (0, 16, 99, 299, 520), (1, 1, 1, 1, 1))
    batch = make_batch(scenario, num_heads, num_kv_heads, 64, 16, dtype)
    out = paged_decode_triton(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale, num_splits=num_splits)
    expected = paged_decode_ref(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out, expected, **tolerance(dtype),
                               msg=describe("paged_decode triton split-k vs ref", num_splits=num_splits))


@pytest.mark.parametrize(("head_dim", "block_size"), [(80, 8), (16, 64), (256, 16), (8, 24)])
@pytest.mark.parametrize("op", ["prefill", "decode"])
def test_triton_odd_head_dims_and_block_sizes(op, head_dim, block_size):
    """head_dim padded (to a power of two, at least 16) with masks; blocks smaller, larger, not a power of two."""
    decode = op == "decode"
    scenario = DECODE_SCENARIOS[1] if decode else PREFILL_SCENARIOS[6]
    batch = make_batch(scenario, 6, 2, head_dim, block_size, torch.float32)
    fn, ref = (paged_decode, paged_decode_ref) if decode else (paged_prefill, paged_prefill_ref)
    out = fn(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale, impl="triton")
    torch.testing.assert_close(out, ref(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale),
                               **tolerance(torch.float32), msg=describe(f"paged_{op} triton vs ref",
                                                                        head_dim=head_dim, block=block_size))


def test_triton_grids_cover_every_value():
    """The covering grids meet the promise in the module docstring."""
    for grid, scenarios in ((covering_grid(PREFILL_SCENARIOS, 2), PREFILL_SCENARIOS),
                            (covering_grid(DECODE_SCENARIOS, 1), DECODE_SCENARIOS)):
        for scenario in scenarios:
            seen = [p.values for p in grid if p.values[-1] == scenario]
            assert {(v[0], v[1]) for v in seen} == set(HEADS), scenario.name
            assert {v[2] for v in seen} == set(HEAD_DIMS), scenario.name
            assert {v[3] for v in seen} == set(BLOCK_SIZES), scenario.name
            assert {v[4] for v in seen} == set(DTYPES), scenario.name


# --- the public entry point, as a model forward uses it ------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_attention_prefill_then_decode(impl, dtype):
    """attention() caches K/V then attends: chunked prefill of two prompts, then decode steps, vs dense."""
    num_heads, num_kv_heads, head_dim, block_size = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(1)
    prompt_lens, num_decode_steps = [40, 7], 3
    total = [n + num_decode_steps for n in prompt_lens]
    # Fused projections, sliced per step: q/k/v are strided views, as they come out of a qkv linear.
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv_full = [torch.randn(n, width, generator=gen).to(dtype) for n in total]
    cache = torch.zeros(2, 2, 16, block_size, num_kv_heads, head_dim, dtype=dtype)  # [layers, K/V, ...]
    k_cache, v_cache = cache[1, 0], cache[1, 1]
    tables = [[7, 2, 12], [5]]

    def split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
        return (q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim),
                v.view(-1, num_kv_heads, head_dim))

    def step(context_lens: list[int], query_lens: list[int]) -> None:
        meta = AttentionMetadata.build(tables, context_lens, query_lens, block_size, "cpu")
        qkv = torch.cat([x[c:c + n] for x, c, n in zip(qkv_full, context_lens, query_lens)])
        q, k, v = split(qkv)
        out = attention(q, k, v, k_cache, v_cache, meta, 1 / math.sqrt(head_dim), impl=impl)
        cu = meta.cu_seqlens_q.tolist()
        for i, (c, n) in enumerate(zip(context_lens, query_lens)):
            q_all, k_all, v_all = split(qkv_full[i][: c + n])
            expected = dense_attention_ref(q_all[c:], k_all, v_all, causal=True)
            torch.testing.assert_close(out[cu[i]:cu[i + 1]], expected, **tolerance(dtype),
                                       msg=describe(f"attention {impl}", seq=i, context_len=c, query_len=n))

    step([0, 0], [25, 7])  # first chunk of prompt 0, all of prompt 1
    step([25, 7], [15, 1])  # rest of prompt 0 (chunked prefill) alongside a decode
    for t in range(num_decode_steps - 1):
        step([40 + t, 8 + t], [1, 1])
    assert cache[0].abs().sum() == 0, "attention() wrote outside its layer's cache"


# --- metadata and dispatch ------------------------------------------------------------------------------


def test_metadata_build():
    meta = AttentionMetadata.build([[3, 0], [5], [1, 4]], context_lens=[16, 0, 3], query_lens=[1, 4, 14],
                                   block_size=16, device="cpu")
    assert meta.slot_mapping.tolist() == [0, 80, 81, 82, 83] + [19 + i for i in range(13)] + [64]
    assert meta.block_tables.tolist() == [[3, 0], [5, 0], [1, 4]]
    assert meta.seq_lens.tolist() == [17, 4, 17]
    assert meta.cu_seqlens_q.tolist() == [0, 1, 5, 19]
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs, meta.num_tokens) == (14, 17, 3, 19)
    assert not meta.is_decode
    assert AttentionMetadata.build([[3, 0], [5]], [16, 2], [1, 1], 16, "cpu").is_decode


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"block_tables": [[0]], "context_lens": [10], "query_lens": [10]}, "cannot hold seq_len=20"),
    ({"block_tables": [[0]], "context_lens": [0], "query_lens": [0]}, "query_len >= 1"),
    ({"block_tables": [[0], [1]], "context_lens": [0], "query_lens": [1]}, "one block table"),
])
def test_metadata_build_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionMetadata.build(**kwargs, block_size=16, device="cpu")


def test_metadata_rejects_bad_fields():
    good = AttentionMetadata.build([[0]], [0], [3], 16, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens_q must have num_seqs \\+ 1"):
        AttentionMetadata(good.slot_mapping, good.block_tables, good.seq_lens, good.cu_seqlens_q[:1], 3, 3)
    with pytest.raises(ValueError, match="block_tables must be a 2-d torch.int32"):
        AttentionMetadata(good.slot_mapping, good.block_tables.long(), good.seq_lens, good.cu_seqlens_q, 3, 3)
    with pytest.raises(ValueError, match="slot_mapping must be a 1-d torch.int64"):
        AttentionMetadata(good.slot_mapping.int(), good.block_tables, good.seq_lens, good.cu_seqlens_q, 3, 3)


def _valid_prefill() -> Batch:
    return make_batch(PREFILL_SCENARIOS[5], 4, 2, 64, 16, torch.float32)


BAD_INPUTS = [
    ("head_dim", lambda b: (b.q[..., :32], b.k_cache, b.v_cache, b.meta), "head_dim mismatch"),
    ("gqa", lambda b: (b.q[:, :3], b.k_cache, b.v_cache, b.meta), "num_heads=3 is not a multiple of num_kv_heads=2"),
    ("dtype", lambda b: (b.q.half(), b.k_cache, b.v_cache, b.meta), "dtype mismatch"),
    ("q-rank", lambda b: (b.q[0], b.k_cache, b.v_cache, b.meta), "q must be \\[num_tokens, num_heads, head_dim\\]"),
    ("cache-rank", lambda b: (b.q, b.k_cache[0], b.v_cache[0], b.meta), "k_cache must be \\[num_blocks"),
    ("cache-shapes", lambda b: (b.q, b.k_cache, b.v_cache[:-1], b.meta), "differ in shape"),
    ("num-tokens", lambda b: (b.q[:-1], b.k_cache, b.v_cache, b.meta), "q has 148 rows but the metadata has"),
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(("make_args", "match"), [pytest.param(f, m, id=n) for n, f, m in BAD_INPUTS])
def test_prefill_rejects_bad_inputs(impl, make_args, match):
    q, k_cache, v_cache, meta = make_args(_valid_prefill())
    with pytest.raises(ValueError, match=match):
        paged_prefill(q, k_cache, v_cache, meta, 0.125, impl=impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_decode_rejects_prefill_batch_and_bad_shapes(impl):
    batch = _valid_prefill()
    with pytest.raises(ValueError, match="q has 149 rows but the metadata has num_seqs"):
        paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.125, impl=impl)
    decode = make_batch(DECODE_SCENARIOS[1], 4, 2, 64, 16, torch.float16)
    with pytest.raises(ValueError, match="head_dim mismatch, q has 32 and the cache has 64"):
        paged_decode(decode.q[..., :32], decode.k_cache, decode.v_cache, decode.meta, 0.125, impl=impl)
    with pytest.raises(ValueError, match="dtype mismatch, q is torch.float32, k_cache torch.float16"):
        paged_decode(decode.q.float(), decode.k_cache, decode.v_cache, decode.meta, 0.125, impl=impl)


def test_resolve_impl(monkeypatch):
    q = torch.zeros(1, 1, 16)
    assert attn.resolve_impl("auto", q) == "native"  # CPU tensors, and the C++ op builds on our machines
    assert attn.resolve_impl("torch", q) == "torch"
    assert attn.resolve_impl("native", q) == "native"
    assert attn.resolve_impl("triton", q) == "triton"  # the tests run under TRITON_INTERPRET=1
    with pytest.raises(ValueError, match="impl must be one of"):
        attn.resolve_impl("cuda", q)
    monkeypatch.setattr(attn, "TRITON_INTERPRETED", False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        attn.resolve_impl("triton", q)
    monkeypatch.setattr(attn.native, "_module", None)  # as if HYBRID_GATEWAY_NATIVE=0 had been set
    monkeypatch.setattr(attn.native, "_error", "disabled by HYBRID_GATEWAY_NATIVE=0")
    assert attn.resolve_impl("auto", q) == "torch"
    with pytest.raises(ValueError, match="impl='native' but the native CPU attention op is unavailable: disabled"):
        attn.resolve_impl("native", q)


def test_all_is_sorted_and_complete():
    assert attn.__all__ == sorted(attn.__all__)
    missing = [name for name in attn.__all__ if not hasattr(attn, name)]
    assert not missing, f"__all__ names that do not exist: {missing}"
    public = {name for name, obj in vars(attn).items() if not name.startswith("_")
              and getattr(obj, "__module__", None) == attn.__name__ and callable(obj)}
    assert public <= set(attn.__all__), f"public functions missing from __all__: {public - set(attn.__all__)}"


# --- GPU: bfloat16 and larger shapes (run with -m gpu on a CUDA machine) ---------------------------------


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("gpu-marked test: torch.cuda.is_available() is False on this machine")


GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_HEADS = [(9, 3), (32, 8), (5, 1)]
GPU_PREFILL = Scenario("gpu-varlen", (128, 64, 0, 1000, 0, 200), (513, 7, 300, 1024, 1, 64), shared_prefix=64)
GPU_DECODE = Scenario("gpu-decode", (64, 70, 0, 15, 511, 4095, 2000, 300), (1,) * 8, shared_prefix=64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), GPU_HEADS)
def test_prefill_triton_gpu(num_heads, num_kv_heads, head_dim, block_size, dtype):
    _require_cuda()
    batch = make_batch(GPU_PREFILL, num_heads, num_kv_heads, head_dim, block_size, dtype, device="cuda")
    out = paged_prefill(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)  # auto -> triton on CUDA
    expected = paged_prefill_ref(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out, expected, **tolerance(dtype), msg=describe("paged_prefill gpu vs ref"))
    torch.testing.assert_close(expected, dense_expected(batch), **tolerance(dtype),
                               msg=describe("paged_prefill_ref gpu vs dense"))


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), GPU_HEADS)
def test_decode_triton_gpu(num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits):
    _require_cuda()
    batch = make_batch(GPU_DECODE, num_heads, num_kv_heads, head_dim, block_size, dtype, device="cuda")
    out = paged_decode_triton(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale, num_splits=num_splits)
    expected = paged_decode_ref(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out, expected, **tolerance(dtype),
                               msg=describe("paged_decode gpu vs ref", num_splits=num_splits))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_dtype_id)
def test_attention_gpu_auto_is_triton(dtype):
    _require_cuda()
    q = torch.zeros(1, 1, 16, device="cuda", dtype=dtype)
    assert attn.resolve_impl("auto", q) == "triton"
    batch = make_batch(PREFILL_SCENARIOS[6], 9, 3, 64, 16, dtype, device="cuda", write_new=False)
    out = attention(batch.q, batch.new_k, batch.new_v, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out, dense_expected(batch), **tolerance(dtype), msg=describe("attention gpu vs dense"))
