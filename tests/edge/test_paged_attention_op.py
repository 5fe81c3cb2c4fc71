"""hybrid_gateway::PagedAttention alone (edge/csrc/ort_ops.cpp) against kernels.attention.reference, on float32 and
float16 caches: RoPE on q and k, this step's K/V written into their slots (rounded to nearest-even in a half
cache), causal attention through the block tables in float32 over what the cache holds; prefill chunks beside
decodes, non-contiguous tables, both head-dim paths (16: portable loops; 64: AVX2), the layer offset, a step large
enough for ORT's pool; and a cache of another type refused."""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from edge import ortop
from kernels.attention.metadata import AttentionMetadata
from kernels.attention.reference import paged_prefill_ref, write_kv_ref

pytestmark = pytest.mark.skipif(not ortop.available(), reason="needs a C++ compiler (edge.ortop)")

NUM_LAYERS, BLOCK = 2, 4
ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.float64: TensorProto.DOUBLE}


def _session(heads: int, kv_heads: int, layer: int, scale: float, cache_type: int) -> ort.InferenceSession:
    names = ["qkv", "cos", "sin", "kv_cache", "block_tables", "seq_lens", "cu_seqlens_q", "slot_mapping"]
    types = [TensorProto.FLOAT] * 3 + [cache_type] + [TensorProto.INT32] * 3 + [TensorProto.INT64]
    node = helper.make_node("PagedAttention", names, ["attn"], domain=ortop.DOMAIN, layer=layer, num_heads=heads,
                            num_kv_heads=kv_heads, scale=scale)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types)],
                              [helper.make_tensor_value_info("attn", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid(ortop.DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(ortop.library_path()))
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], cache: torch.Tensor) -> np.ndarray:
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
    binding.bind_ortvalue_input("kv_cache", ort.OrtValue.ortvalue_from_numpy(cache.numpy()))  # written in place
    binding.bind_output("attn")
    sess.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x [T, heads, D]; cos [T, D/2]
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def _step(chunks: list[int], contexts: list[int], tables: list[list[int]], heads: int, kv_heads: int, dim: int,
          seed: int):
    gen = torch.Generator().manual_seed(seed)
    meta = AttentionMetadata.build(tables, contexts, chunks, BLOCK, "cpu")
    tokens = sum(chunks)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen) * 2
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(contexts, chunks)]).float()
    freqs = positions[:, None] / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    return meta, qkv, freqs.cos(), freqs.sin()


CASES = list(itertools.product((torch.float32, torch.float16), (16, 64), (0, 1)))


@pytest.mark.parametrize("dtype, dim, layer", CASES, ids=[f"{str(d)[6:]}-d{h}-l{layer}" for d, h, layer in CASES])
def test_op_matches_reference(dtype: torch.dtype, dim: int, layer: int) -> None:
    heads, kv_heads, scale = 6, 2, dim ** -0.5
    sess = _session(heads, kv_heads, layer, scale, ONNX_TYPES[dtype])
    gen = torch.Generator().manual_seed(dim + layer)
    cache = (torch.randn(NUM_LAYERS, 2, 24, BLOCK, kv_heads, dim, generator=gen) * 2).to(dtype)
    expected_cache = cache.clone()
    # Step 1: a 9-token prefill chunk after 6 cached tokens beside a 1-token decode at 13, tables out of order.
    # Step 2: a 2-token chunk and a decode; one new token left unwritten (slot -1), as a middle chunk's may be.
    tables = [[7, 2, 9, 0, 11], [5, 1, 3, 20]]
    steps = [_step([9, 1], [6, 13], tables, heads, kv_heads, dim, 1), _step([2, 1], [15, 14], tables, heads,
                                                                              kv_heads, dim, 2)]
    steps[1][0].slot_mapping[1] = -1
    for meta, qkv, cos, sin in steps:
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
        q = _rope(q.view(-1, heads, dim), cos, sin)
        k = _rope(k.view(-1, kv_heads, dim), cos, sin)
        write_kv_ref(k.to(dtype), v.view(-1, kv_heads, dim).to(dtype), expected_cache[layer, 0],
                     expected_cache[layer, 1], meta.slot_mapping)
        feeds = {"qkv": qkv.numpy(), "cos": cos.numpy(), "sin": sin.numpy(),
                 "block_tables": meta.block_tables.numpy(), "seq_lens": meta.seq_lens.numpy(),
                 "cu_seqlens_q": meta.cu_seqlens_q.numpy(), "slot_mapping": meta.slot_mapping.numpy()}
        got = _run(sess, feeds, cache)
        # K is rotated in float32 by both sides (the C++ side may fuse a multiply-add): within an ulp of the
        # cache's type; V is copied (rounded once), so exact; untouched slots and the other layer stay as they were.
        torch.testing.assert_close(cache[layer, 0].float(), expected_cache[layer, 0].float(),
                                   rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-6)
        assert torch.equal(cache[layer, 1], expected_cache[layer, 1])
        assert torch.equal(cache[1 - layer], expected_cache[1 - layer])
        # Attention over what the cache holds (a rotated key may sit an ulp away from torch's rounding of it).
        want = paged_prefill_ref(q, cache[layer, 0].float(), cache[layer, 1].float(), meta, scale)
        torch.testing.assert_close(torch.from_numpy(got), want.reshape(got.shape), rtol=1e-5, atol=3e-5)
        expected_cache.copy_(cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_large_step_on_the_pool_matches_reference(dtype: torch.dtype) -> None:
    """Two 300-token prefills: enough K/V that the op hands its tiles to ORT's pool."""
    heads, kv_heads, dim, scale = 4, 2, 64, 0.125
    sess = _session(heads, kv_heads, 0, scale, ONNX_TYPES[dtype])
    cache = torch.zeros(1, 2, 160, BLOCK, kv_heads, dim, dtype=dtype)
    tables = [list(range(0, 80, 1))[::-1], list(range(80, 160))]
    meta, qkv, cos, sin = _step([300, 300], [0, 0], tables, heads, kv_heads, dim, 3)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    expected = cache.clone()
    write_kv_ref(_rope(k.view(-1, kv_heads, dim), cos, sin).to(dtype), v.view(-1, kv_heads, dim).to(dtype),
                 expected[0, 0], expected[0, 1], meta.slot_mapping)
    feeds = {"qkv": qkv.numpy(), "cos": cos.numpy(), "sin": sin.numpy(), "block_tables": meta.block_tables.numpy(),
             "seq_lens": meta.seq_lens.numpy(), "cu_seqlens_q": meta.cu_seqlens_q.numpy(),
             "slot_mapping": meta.slot_mapping.numpy()}
    got = _run(sess, feeds, cache)
    torch.testing.assert_close(cache.float(), expected.float(), rtol=1e-3 if dtype == torch.float16 else 1e-5,
                               atol=1e-5)
    want = paged_prefill_ref(_rope(q.view(-1, heads, dim), cos, sin), cache[0, 0].float(), cache[0, 1].float(), meta,
                             scale)
    torch.testing.assert_close(torch.from_numpy(got), want.reshape(got.shape), rtol=1e-5, atol=3e-5)


def test_cache_of_another_type_is_refused() -> None:
    sess = _session(2, 1, 0, 0.25, TensorProto.DOUBLE)
    meta, qkv, cos, sin = _step([1], [0], [[0]], 2, 1, 16, 4)
    feeds = {"qkv": qkv.numpy(), "cos": cos.numpy(), "sin": sin.numpy(), "block_tables": meta.block_tables.numpy(),
             "seq_lens": meta.seq_lens.numpy(), "cu_seqlens_q": meta.cu_seqlens_q.numpy(),
             "slot_mapping": meta.slot_mapping.numpy()}
    with pytest.raises(Exception, match=r"kv_cache must be float or float16 \[num_layers, 2"):
        _run(sess, feeds, torch.zeros(1, 2, 1, BLOCK, 1, 16, dtype=torch.float64))
