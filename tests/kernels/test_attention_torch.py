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


def _packed_case(query_lens, context_lens, heads, block_size, dtype, seed, skip_first_write=False):
    """A multi-layer packed cache [layers, 2, blocks, block_size, kv_heads, 64] and the new q / kv of a step."""
    num_heads, num_kv_heads = heads
    q, kc, vc, meta = _batch(query_lens, context_lens, num_heads, num_kv_heads, 64, block_size, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    layers = torch.stack([torch.stack([kc, vc]), torch.randn(2, *kc.shape, generator=g).to(dtype)])
    kv = torch.randn(2, 2, q.shape[0], num_kv_heads, 64, generator=g).to(dtype)  # per layer: new K, new V
    if skip_first_write:
        meta.slot_mapping[0] = -1
    return q, layers, kv, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("case", [
    ([1, 1, 1, 1, 1], [0, 14, 15, 16, 99]),  # decode
    ([7, 1, 20, 1], [33, 40, 16, 0]),  # chunked prefill mixed with decodes
    ([1], [0]),
])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("impl", ["torch", "native"])
def test_attention_kv_matches_reference_on_every_layer(dtype, heads, block_size, case, skip, impl):
    """attention_kv (packed K/V, per-step plans shared by the layers) = write_kv_ref + paged_*_ref, layer by layer."""
    from kernels.attention import attention_kv, write_kv_ref

    query_lens, context_lens = case
    q, layers, kv, meta = _packed_case(query_lens, context_lens, heads, block_size, dtype, seed=block_size,
                                       skip_first_write=skip)
    expected_cache = layers.clone()
    out = torch.full_like(q, float("nan"))
    tol = tolerance(dtype)
    for layer in range(layers.shape[0]):
        ref_k, ref_v = expected_cache[layer, 0], expected_cache[layer, 1]
        write_kv_ref(kv[layer, 0], kv[layer, 1], ref_k, ref_v, meta.slot_mapping)
        ref = (paged_decode_ref if meta.is_decode else paged_prefill_ref)(q, ref_k, ref_v, meta, 0.125)
        got = attention_kv(q, kv[layer], layers[layer], meta, 0.125, impl=impl, out=out)
        assert got is out
        torch.testing.assert_close(out, ref, **tol, msg=f"layer {layer}: attention_kv vs reference")
        torch.testing.assert_close(layers[layer], expected_cache[layer], rtol=0, atol=0)
    assert torch.equal(layers, expected_cache)  # nothing else in the cache was touched


def test_attention_kv_rejects_bad_shapes_and_rechecks_when_they_change():
    from kernels.attention import attention_kv

    q, layers, kv, meta = _packed_case([1, 1], [5, 9], (4, 2), 4, torch.float32, seed=3)
    with pytest.raises(ValueError, match="kv must be"):
        attention_kv(q, kv[0, 0], layers[0], meta, 0.1, impl="torch")
    with pytest.raises(ValueError, match="kv must be"):
        attention_kv(q, kv[0], layers[0, 0], meta, 0.1, impl="torch")
    attention_kv(q, kv[0], layers[0], meta, 0.1, impl="torch")  # fine, and remembered for the step
    with pytest.raises(ValueError, match="q has 1 rows"):
        attention_kv(q[:1], kv[0], layers[0], meta, 0.1, impl="torch")
    with pytest.raises(ValueError, match="out must be shaped like q"):
        attention_kv(q, kv[0], layers[0], meta, 0.1, impl="torch", out=torch.empty(2, 4, 32))
    with pytest.raises(ValueError, match="dtype mismatch"):
        attention_kv(q, kv[0].half(), layers[0], meta, 0.1, impl="torch")
