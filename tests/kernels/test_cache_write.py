"""write_kv: the Triton kernel and the torch path against one per-token loop (vLLM test_cache.py style).

A cache write is a copy, so results must be bit-identical. bfloat16 is included on CPU too: the
interpreter moves bf16 as raw 16-bit words, and a copy does no bf16 arithmetic.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.attention import write_kv
from kernels.kv_cache.layout import KVCacheSpec
from tests.kernels.tolerances import EXACT

IMPLS = ("triton", "torch")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def write_kv_loop(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """The loop reference: token i goes to block slot // block_size at offset slot % block_size; -1 is skipped."""
    block_size = k_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot == -1:
            continue
        block, offset = divmod(slot, block_size)
        k_cache[block, offset] = key[i]
        v_cache[block, offset] = value[i]


def random_slots(num_tokens: int, num_slots: int, gen: torch.Generator, skip_every: int = 5) -> torch.Tensor:
    """Distinct random slots, with every ``skip_every``-th token marked -1 (padding)."""
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[::skip_every] = -1
    return slots


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.mark.parametrize("num_tokens", [1, 17, 100])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(3, 64), (1, 128), (4, 80), (2, 16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("impl", IMPLS)
def test_write_kv_matches_loop(impl, dtype, num_kv_heads, head_dim, block_size, num_tokens):
    gen = torch.Generator().manual_seed(num_tokens * 1000 + block_size)
    num_blocks = 20
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = random_slots(num_tokens, num_blocks * block_size, gen)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    write_kv_loop(key, value, k_expected, v_expected, slots)

    write_kv(key, value, k_cache, v_cache, slots, impl=impl)
    torch.testing.assert_close(k_cache, k_expected, **EXACT, msg=lambda m: f"write_kv {impl} K cache:\n{m}")
    torch.testing.assert_close(v_cache, v_expected, **EXACT, msg=lambda m: f"write_kv {impl} V cache:\n{m}")


@pytest.mark.parametrize("impl", IMPLS)
def test_write_kv_into_one_layer_of_the_full_cache(impl):
    """cache[layer, 0] / cache[layer, 1] views are written in place; strided K/V from a fused qkv projection."""
    spec = KVCacheSpec(num_layers=3, num_kv_heads=3, head_dim=64, num_blocks=10, block_size=16)
    cache = spec.allocate()
    expected = cache.clone()
    gen = torch.Generator().manual_seed(7)
    num_tokens, num_heads = 37, 9
    qkv = torch.randn(num_tokens, (num_heads + 2 * spec.num_kv_heads) * spec.head_dim, generator=gen)
    _, key, value = qkv.split([num_heads * 64, 3 * 64, 3 * 64], dim=-1)
    key, value = key.view(num_tokens, 3, 64), value.view(num_tokens, 3, 64)  # non-contiguous rows
    slots = random_slots(num_tokens, spec.num_slots, gen, skip_every=4)

    write_kv_loop(key, value, expected[1, 0], expected[1, 1], slots)
    write_kv(key, value, cache[1, 0], cache[1, 1], slots, impl=impl)
    torch.testing.assert_close(cache, expected, **EXACT, msg=lambda m: f"write_kv {impl} into layer 1:\n{m}")


@pytest.mark.parametrize("impl", IMPLS)
def test_write_kv_all_skipped_leaves_cache_unchanged(impl):
    k_cache, v_cache = torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64)
    before = (k_cache.clone(), v_cache.clone())
    key = value = torch.randn(5, 2, 64)
    write_kv(key, value, k_cache, v_cache, torch.full((5,), -1, dtype=torch.int64), impl=impl)
    torch.testing.assert_close((k_cache, v_cache), before, **EXACT,
                               msg=lambda m: f"write_kv {impl} wrote a -1 slot:\n{m}")


BAD_WRITES = [
    ("value-shape", lambda k, v, kc, vc, s: (k, v[:, :1], kc, vc, s), "key and value must both be"),
    ("cache-shape", lambda k, v, kc, vc, s: (k, v, kc, vc[:2], s), "k_cache and v_cache must both be"),
    ("heads", lambda k, v, kc, vc, s: (k[:, :1], v[:, :1], kc, vc, s), "cache holds \\(num_kv_heads, head_dim\\)"),
    ("dtype", lambda k, v, kc, vc, s: (k.half(), v.half(), kc, vc, s), "dtype mismatch"),
    ("slot-dtype", lambda k, v, kc, vc, s: (k, v, kc, vc, s.int()), "slot_mapping must be int64"),
    ("slot-len", lambda k, v, kc, vc, s: (k, v, kc, vc, s[:-1]), "slot_mapping must be int64 \\[num_tokens=3\\]"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("make_args", "match"), [pytest.param(f, m, id=n) for n, f, m in BAD_WRITES])
def test_write_kv_rejects_bad_inputs(impl, make_args, match):
    args = (torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.zeros(4, 16, 2, 64), torch.zeros(4, 16, 2, 64),
            torch.tensor([0, 5, -1]))
    with pytest.raises(ValueError, match=match):
        write_kv(*make_args(*args), impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("impl", IMPLS)
def test_write_kv_gpu(impl, dtype):
    if not torch.cuda.is_available():
        pytest.skip("gpu-marked test: torch.cuda.is_available() is False on this machine")
    gen = torch.Generator().manual_seed(3)
    num_blocks, block_size, num_tokens = 512, 16, 3000
    key = torch.randn(num_tokens, 8, 128, generator=gen).to(dtype)
    value = torch.randn(num_tokens, 8, 128, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, block_size, 8, 128, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, 8, 128, generator=gen).to(dtype)
    slots = random_slots(num_tokens, num_blocks * block_size, gen)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    write_kv_loop(key, value, k_expected, v_expected, slots)
    k_gpu, v_gpu = k_cache.cuda(), v_cache.cuda()
    write_kv(key.cuda(), value.cuda(), k_gpu, v_gpu, slots.cuda(), impl=impl)
    torch.testing.assert_close((k_gpu.cpu(), v_gpu.cpu()), (k_expected, v_expected), **EXACT,
                               msg=lambda m: f"write_kv {impl} on GPU:\n{m}")
