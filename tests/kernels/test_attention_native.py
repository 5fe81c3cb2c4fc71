"""The native CPU decode-attention op (C++, ``kernels/attention/csrc``) against the plain reference.

The op must build on our machines (a C++ compiler and ninja are part of them): every test here uses it,
none skips. Both of its loops are held to the reference: the AVX2/FMA one the build picks on this CPU and
the portable one (``portable=True``) that other CPUs get.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.attention import AttentionMetadata, attention, native, paged_decode, paged_decode_ref, write_kv_ref
from tests.kernels.tolerances import tolerance

HEADS = [(4, 4), (9, 3), (8, 2), (5, 1)]
SEQ_LENS = [1, 3, 15, 16, 17, 100, 257]


def _case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, seed, packed=False):
    """Decode step: one new token per sequence; blocks shuffled through the cache, with garbage in unused slots."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(-(-s // block_size))] for s in seq_lens]
    meta = AttentionMetadata.build(tables, [s - 1 for s in seq_lens], [1] * len(seq_lens), block_size, "cpu")
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=g)
    new = torch.randn(2, len(seq_lens), num_kv_heads, head_dim, generator=g)
    return q, cache, new, meta


def test_the_op_builds_here():
    assert native.available(), native.unavailable_reason()
    assert native.unavailable_reason() is None
    assert native.build_dir().is_dir()


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128, 96, 40])  # 64/128: every loop vectorised; 96: the dot only; 40: none
@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_decode_matches_reference(portable, heads, head_dim, block_size):
    q, cache, _, meta = _case(SEQ_LENS, *heads, head_dim, block_size, seed=head_dim + block_size)
    out = torch.full_like(q, float("nan"))
    module = native.load()
    module.paged_decode_cpu(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.1, out, portable=portable)
    torch.testing.assert_close(out, paged_decode_ref(q, cache[0], cache[1], meta, 0.1), **tolerance(torch.float32))


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_writing_the_new_rows_first_equals_write_then_decode(portable, skip):
    q, cache, new, meta = _case([5, 16, 33], 9, 3, 64, 16, seed=7)
    if skip:
        meta.slot_mapping[1] = -1
    expected = cache.clone()
    write_kv_ref(new[0], new[1], expected[0], expected[1], meta.slot_mapping)
    want = paged_decode_ref(q, expected[0], expected[1], meta, 0.125)
    out = torch.empty_like(q)
    native.load().paged_decode_cpu(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.125, out,
                                   new[0], new[1], meta.slot_mapping, portable=portable)
    assert torch.equal(cache, expected)  # exactly the written slots changed
    torch.testing.assert_close(out, want, **tolerance(torch.float32))


@pytest.mark.parametrize("portable", [False, True])
def test_worker_threads_give_bit_identical_results(portable):
    """Large steps are shared with worker threads; every (sequence, KV head) item is computed the same way."""
    q, cache, _, meta = _case([1000, 37, 512, 1, 700], 8, 2, 64, 16, seed=11)
    module = native.load()
    outs = []
    for threads in (1, 2, 4, 1, 3):  # a bigger pool after a smaller one, then back to one thread
        out = torch.full_like(q, float("nan"))
        module.paged_decode_cpu(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.125, out,
                                portable=portable, threads=threads)
        outs.append(out)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    torch.testing.assert_close(outs[0], paged_decode_ref(q, cache[0], cache[1], meta, 0.125),
                               **tolerance(torch.float32))
    with pytest.raises(RuntimeError, match="threads must be in"):
        module.paged_decode_cpu(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.125, outs[0], threads=0)


def test_concurrent_callers_share_the_pool_safely():
    """Two engines in one process: the op releases the GIL, one caller gets the workers, the other works alone."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [_case([900, 300, 64], 8, 2, 64, 16, seed=s) for s in range(4)]
    want = [paged_decode_ref(q, c[0], c[1], m, 0.125) for q, c, _, m in cases]

    def run(i):
        q, cache, _, meta = cases[i % 4]
        out = torch.empty_like(q)
        for _ in range(20):
            native.paged_decode(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 0.125, out, threads=2)
        return out

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(run, range(8)))
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, want[i % 4], **tolerance(torch.float32))


def test_long_sequence_and_extreme_scores_stay_finite():
    q, cache, _, meta = _case([4096, 2], 8, 2, 64, 32, seed=1)
    q *= 30  # scores in the hundreds: the softmax must subtract its max
    out = native.paged_decode(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, 1.0, torch.empty_like(q))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, paged_decode_ref(q, cache[0], cache[1], meta, 1.0), **tolerance(torch.float32))


def test_the_public_ops_use_it_and_agree_with_the_torch_path():
    q, cache, new, meta = _case(SEQ_LENS, 9, 3, 64, 16, seed=3)
    caches = {impl: cache.clone() for impl in ("torch", "native")}
    outs = {impl: attention(q, new[0], new[1], c[0], c[1], meta, 0.125, impl=impl) for impl, c in caches.items()}
    assert torch.equal(caches["torch"], caches["native"])
    torch.testing.assert_close(outs["native"], outs["torch"], **tolerance(torch.float32))
    torch.testing.assert_close(paged_decode(q, cache[0], cache[1], meta, 0.1, impl="native"),
                               paged_decode_ref(q, cache[0], cache[1], meta, 0.1), **tolerance(torch.float32))
    # float16 is not the native op's: the torch path serves it under impl="native" too
    half = cache.half()
    torch.testing.assert_close(paged_decode(q.half(), half[0], half[1], meta, 0.1, impl="native"),
                               paged_decode_ref(q.half(), half[0], half[1], meta, 0.1), **tolerance(torch.float16))


def test_attention_kv_binds_the_call_for_the_layers_of_a_step():
    """A runner reuses one q / kv / out buffer for every layer (new values each time): after the first layer
    attention_kv calls the op straight away; every layer still matches the reference, and a cache of another
    shape goes through the checks again."""
    from kernels.attention import attention_kv

    q, cache, new, meta = _case([5, 16, 33, 100], 9, 3, 64, 4, seed=5)
    g = torch.Generator().manual_seed(9)
    layers = torch.stack([cache] + [torch.randn(cache.shape, generator=g) for _ in range(3)])
    expected = layers.clone()
    kv, out = torch.empty_like(new), torch.empty_like(q)
    for layer in range(layers.shape[0]):
        kv.copy_(torch.randn(new.shape, generator=g))
        q.copy_(torch.randn(q.shape, generator=g))
        write_kv_ref(kv[0], kv[1], expected[layer, 0], expected[layer, 1], meta.slot_mapping)
        want = paged_decode_ref(q, expected[layer, 0], expected[layer, 1], meta, 0.125)
        assert attention_kv(q, kv, layers[layer], meta, 0.125, "auto", out=out, threads=2) is out
        torch.testing.assert_close(out, want, **tolerance(torch.float32))
        assert "attention_kv_native_call" in meta.derived
    assert torch.equal(layers, expected)
    with pytest.raises(ValueError, match="the cache holds"):
        attention_kv(q, kv, layers[0, :, :-1, :, :1], meta, 0.125, "auto", out=out, threads=2)


def test_bad_arguments_raise_instead_of_reading_out_of_bounds():
    q, cache, new, meta = _case([5, 20], 4, 2, 64, 16, seed=2)
    module = native.load()
    out = torch.empty_like(q)

    def call(**changes):
        args = dict(q=q, k_cache=cache[0], v_cache=cache[1], block_tables=meta.block_tables, seq_lens=meta.seq_lens,
                    scale=0.1, out=out)
        args.update(changes)
        module.paged_decode_cpu(**args)

    bad_table = meta.block_tables.clone()
    bad_table[1, 1] = cache.shape[1]
    with pytest.raises(RuntimeError, match=r"block_tables\[1, 1\] = .* is not a block of the cache"):
        call(block_tables=bad_table)
    with pytest.raises(RuntimeError, match=r"seq_lens\[0\] = 0 is outside"):
        call(seq_lens=torch.tensor([0, 20], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"seq_lens\[1\] = 999 is outside"):
        call(seq_lens=torch.tensor([5, 999], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="q must be a contiguous float32"):
        call(q=q.double())
    with pytest.raises(RuntimeError, match="out must be"):
        call(out=torch.empty(2, 4, 32))
    with pytest.raises(RuntimeError, match="num_heads must be a multiple of num_kv_heads"):
        call(q=torch.randn(2, 3, 64), out=torch.empty(2, 3, 64))
    with pytest.raises(RuntimeError, match="block_tables must be contiguous int32"):
        call(block_tables=meta.block_tables.long())
    slots = torch.tensor([0, cache.shape[1] * cache.shape[2]])
    with pytest.raises(RuntimeError, match=r"slot_mapping\[1\] = .* is past the cache"):
        call(k_new=new[0], v_new=new[1], slot_mapping=slots)
    with pytest.raises(RuntimeError, match="k_new must be"):
        call(k_new=new[0, :, :1], v_new=new[1], slot_mapping=meta.slot_mapping)
