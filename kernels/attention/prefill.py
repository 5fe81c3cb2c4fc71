"""Paged prefill attention: variable-length, causal, GQA, over keys already in the paged cache.

FlashAttention-2 (Dao, 2023) online softmax over the PagedAttention (Kwon et al., 2023) cache layout.
The new tokens' K/V have been written to the cache before this runs, so every key (reused prefix,
earlier chunks and the new tokens) is read through the block table the same way.

* One program per (sequence, query tile, kv head). Its ``BLOCK_M`` rows pack ``BLOCK_Q`` query tokens
  times the ``QUERIES_PER_KV`` query heads of one GQA group (row r = token r // QUERIES_PER_KV, head
  r % QUERIES_PER_KV), so each K/V tile is loaded once for the whole group.
* Query token j of a sequence sits at absolute position context_len + j and sees keys 0..context_len + j;
  key tiles past the tile's last query position are skipped entirely.
* Keys are walked ``TILE_SIZE`` positions at a time, each mapped to (block id, offset) through the
  block table, so the tile size does not depend on the cache block size.

Scores are kept in log2 units (scale * log2(e)) so the softmax uses ``exp2``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.kv_tile import load_kv_tile
from kernels.attention.metadata import AttentionMetadata

MIN_DOT_SIZE = 16  # tl.dot needs every dimension >= 16


@triton.jit
def paged_prefill_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    scale,  # float32, softmax scale
    stride_out_tok, stride_out_head, stride_out_dim,
    stride_q_tok, stride_q_head, stride_q_dim,
    stride_kc_block, stride_kc_offset, stride_kc_head, stride_kc_dim,
    stride_vc_block, stride_vc_offset, stride_vc_head, stride_vc_dim,
    stride_bt_seq,
    QUERIES_PER_KV: tl.constexpr,  # num_heads // num_kv_heads
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,  # max(16, next power of two >= HEAD_DIM)
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    TILE_SIZE: tl.constexpr,  # keys per iteration, >= 16
    BLOCK_M: tl.constexpr,  # rows per program (power of two >= 16)
    BLOCK_Q: tl.constexpr,  # query tokens per program = BLOCK_M // QUERIES_PER_KV
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 caches (no TF32 rounding), else None
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    query_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= query_len:  # the grid is sized for the longest query
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // QUERIES_PER_KV  # [BLOCK_M] query token within the sequence
    heads = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV  # [BLOCK_M] query head
    row_mask = (rows < BLOCK_Q * QUERIES_PER_KV) & (q_idx < query_len)
    q_pos = context_len + q_idx  # [BLOCK_M] absolute position of each row's token
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM
    tokens = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :] * stride_q_dim,
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_PADDED]

    qk_scale = scale * 1.4426950408889634  # log2(e): softmax via exp2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)
    # Causal: no row of this tile looks past the position of its last query token.
    kv_end = tl.minimum(seq_len, context_len + (q_tile + 1) * BLOCK_Q)
    offs_t = tl.arange(0, TILE_SIZE)
    for tile in range(0, tl.cdiv(kv_end, TILE_SIZE)):
        pos = tile * TILE_SIZE + offs_t  # [TILE_SIZE] absolute key positions
        pos_mask = pos < kv_end
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, stride_bt_seq, pos, pos_mask, kv_head,
                            dims, dim_mask, stride_kc_block, stride_kc_offset, stride_kc_head, stride_kc_dim,
                            stride_vc_block, stride_vc_offset, stride_vc_head, stride_vc_dim, BLOCK_SIZE)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_SIZE]
        s = tl.where((pos[None, :] <= q_pos[:, None]) & pos_mask[None, :], s, float("-inf"))
        # Position 0 is visible to every row (masked rows included), so the first tile makes m_i finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_out_tok + heads[:, None] * stride_out_head
             + dims[None, :] * stride_out_dim,
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def prefill_tile_sizes(queries_per_kv: int, head_dim: int, block_size: int) -> tuple[int, int]:
    """(BLOCK_M, TILE_SIZE): 64 x 64 tiles, halved along keys for wide heads to bound registers."""
    block_m = max(64, triton.next_power_of_2(queries_per_kv))
    tile_size = max(MIN_DOT_SIZE, triton.next_power_of_2(block_size), 64 if head_dim <= 128 else 32)
    return block_m, tile_size


def paged_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                         scale: float) -> torch.Tensor:
    """Launch ``paged_prefill_kernel``: q [num_tokens, num_heads, head_dim] -> same shape and dtype."""
    meta.check_inputs(q, k_cache, v_cache, decode=False)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    queries_per_kv = num_heads // num_kv_heads
    block_m, tile_size = prefill_tile_sizes(queries_per_kv, head_dim, block_size)
    block_q = block_m // queries_per_kv
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    grid = (meta.num_seqs, triton.cdiv(meta.max_query_len, block_q), num_kv_heads)
    paged_prefill_kernel[grid](
        out, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.cu_seqlens_q,
        float(scale),
        *out.stride(), *q.stride(), *k_cache.stride(), *v_cache.stride(), meta.block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size,
        TILE_SIZE=tile_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: the backend default
    )
    return out
