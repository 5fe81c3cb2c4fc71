"""The production PyTorch attention path (fused SDPA over a per-step gather) against the plain reference."""

from __future__ import annotations

import random

import pytest
import torch

from kernels.attention import AttentionMetadata, paged_decode_ref, paged_prefill_ref
from kernels.attention.torch_ops import paged_decode_torch, paged_prefill_torch
from tests.kernels.tolerances import tolerance

HEADS = [(4, 4), (9, 3), (8, 2), (5, 1)]


def _batch(query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-(c + q) // block_size) for c, q in zip(query_lens, context_lens, strict=True)) + 4
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = []
    for q_len, c_len in zip(query_lens, context_lens, strict=True):
        n = -(-(q_len + c_len) // block_size)
        tables.append([pool.pop() for _ in range(n)])
    if len(tables) > 1 and context_lens[1] >= block_size:  # second sequence shares the first's first block
        tables[1][0] = tables[0][0]
    meta = AttentionMetadata.build(tables, list(context_lens), list(query_lens), block_size, "cpu")
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference(dtype, heads, head_dim, block_size):
    seq_lens = [1, 15, 16, 17, 100]
    q, kc, vc, meta = _batch([1] * 5, [s - 1 for s in seq_lens], *heads, head_dim, block_size, dtype, seed=head_dim)
    tol = tolerance(dtype)
    torch.testing.assert_close(paged_decode_torch(q, kc, vc, meta, 0.1), paged_decode_ref(q, kc, vc, meta, 0.1),
                               **tol, msg="decode: torch path vs reference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("case", [
    ([1, 15, 16, 17, 100], [0, 0, 0, 0, 0]),  # fresh prompts
    ([7, 1, 20, 1], [33, 40, 16, 0]),  # chunked prefill mixed with decodes
    ([100], [0]),
    ([1], [0]),
])
def test_prefill_matches_reference(dtype, heads, block_size, case):
    query_lens, context_lens = case
    q, kc, vc, meta = _batch(query_lens, context_lens, *heads, 64, block_size, dtype, seed=len(query_lens))
    tol = tolerance(dtype)
    torch.testing.assert_close(paged_prefill_torch(q, kc, vc, meta, 0.125), paged_prefill_ref(q, kc, vc, meta, 0.125),
                               **tol, msg=f"prefill {case}: torch path vs reference")


def test_derived_index_is_computed_once_per_step():
    q, kc, vc, meta = _batch([1, 1], [20, 3], 4, 2, 64, 16, torch.float32, seed=0)
    paged_decode_torch(q, kc, vc, meta, 0.1)
    first = meta.derived["slots_16"]
    paged_decode_torch(q, kc, vc, meta, 0.1)
    assert meta.derived["slots_16"] is first
