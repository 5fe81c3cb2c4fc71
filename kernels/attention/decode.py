"""Paged decode attention: one new query token per sequence over its block table.

PagedAttention (Kwon et al., 2023) read pattern with the FlashAttention-2 online softmax (Dao, 2023),
specialised for decode as in FlashDecoding (split-K):

* one program per (sequence, kv head, split); the program loads the GQA group's query heads as the
  rows of one tile (padded to 16 rows so ``tl.dot`` applies), so each K/V tile is read once per group;
* keys are walked in tiles of ``TILE_SIZE`` positions, each position mapped to (block id, offset) through
  the block table, so the tile size is independent of the cache's block size;
* with ``NUM_SPLITS > 1`` each split covers a contiguous range of tiles and writes an unnormalised partial
  result, its running max and its sum; ``paged_decode_reduce_kernel`` merges the splits. This keeps
  the GPU busy when num_seqs * num_kv_heads is small (batch-1 decode).

Scores are kept in log2 units (scale * log2(e)) so the softmax uses ``exp2``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.kv_tile import load_kv_tile
from kernels.attention.metadata import AttentionMetadata

MIN_DOT_SIZE = 16  # tl.dot needs every dimension >= 16
DECODE_TILE_SIZE = 64  # keys per loop iteration
MAX_NUM_SPLITS = 64
MIN_TILES_PER_SPLIT = 2


@triton.jit
def paged_decode_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim], written when NUM_SPLITS == 1
    partial_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM_PADDED] float32, unnormalised
    partial_max_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32, running max (log2 units)
    partial_sum_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32, softmax denominator
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    scale,  # float32, softmax scale
    stride_out_seq, stride_out_head, stride_out_dim,
    stride_q_seq, stride_q_head, stride_q_dim,
    stride_kc_block, stride_kc_offset, stride_kc_head, stride_kc_dim,
    stride_vc_block, stride_vc_offset, stride_vc_head, stride_vc_dim,
    stride_bt_seq,
    QUERIES_PER_KV: tl.constexpr,  # num_heads // num_kv_heads
    QUERIES_PER_KV_PADDED: tl.constexpr,  # max(16, next power of two >= QUERIES_PER_KV)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,  # max(16, next power of two >= HEAD_DIM)
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    TILE_SIZE: tl.constexpr,  # keys per iteration, >= 16
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 caches (no TF32 rounding), else None
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, TILE_SIZE)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_start = split * tiles_per_split
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)

    rows = tl.arange(0, QUERIES_PER_KV_PADDED)
    heads = kv_head * QUERIES_PER_KV + rows
    row_mask = rows < QUERIES_PER_KV
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :] * stride_q_dim,
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [QUERIES_PER_KV_PADDED, HEAD_DIM_PADDED]

    qk_scale = scale * 1.4426950408889634  # log2(e): softmax via exp2
    m_i = tl.full([QUERIES_PER_KV_PADDED], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([QUERIES_PER_KV_PADDED], dtype=tl.float32)
    acc = tl.zeros([QUERIES_PER_KV_PADDED, HEAD_DIM_PADDED], dtype=tl.float32)
    offs_t = tl.arange(0, TILE_SIZE)
    for tile in range(tile_start, tile_end):
        pos = tile * TILE_SIZE + offs_t  # [TILE_SIZE] absolute key positions
        pos_mask = pos < seq_len
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, stride_bt_seq, pos, pos_mask, kv_head,
                            dims, dim_mask, stride_kc_block, stride_kc_offset, stride_kc_head, stride_kc_dim,
                            stride_vc_block, stride_vc_offset, stride_vc_head, stride_vc_dim, BLOCK_SIZE)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [QUERIES_PER_KV_PADDED, TILE_SIZE]
        s = tl.where(pos_mask[None, :], s, float("-inf"))
        # Every tile in [tile_start, tile_end) holds at least one valid key, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    mask = row_mask[:, None] & dim_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :] * stride_out_dim,
                 out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # An empty split (short sequence) stores max=-inf, sum=0, acc=0 and drops out of the merge.
        split_row = (seq * QUERIES_PER_KV * tl.num_programs(1) + heads) * NUM_SPLITS + split  # [QUERIES_PER_KV_PADDED]
        tl.store(partial_out_ptr + split_row[:, None] * HEAD_DIM_PADDED + dims[None, :], acc, mask=mask)
        tl.store(partial_max_ptr + split_row, m_i, mask=row_mask)
        tl.store(partial_sum_ptr + split_row, l_i, mask=row_mask)


@triton.jit
def paged_decode_reduce_kernel(
    out_ptr,  # [num_seqs, num_heads, head_dim]
    partial_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM_PADDED] float32
    partial_max_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32
    partial_sum_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32
    stride_out_seq, stride_out_head, stride_out_dim,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_SPLITS_PADDED: tl.constexpr,  # next power of two >= NUM_SPLITS
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS_PADDED)
    split_mask = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_DIM_PADDED)
    dim_mask = dims < HEAD_DIM
    row = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits  # [NUM_SPLITS_PADDED]

    m = tl.load(partial_max_ptr + row, mask=split_mask, other=float("-inf"))
    l_split = tl.load(partial_sum_ptr + row, mask=split_mask, other=0.0)
    acc = tl.load(partial_out_ptr + row[:, None] * HEAD_DIM_PADDED + dims[None, :],
                  mask=split_mask[:, None] & dim_mask[None, :], other=0.0)  # [NUM_SPLITS_PADDED, HEAD_DIM_PADDED]
    m_max = tl.max(m, 0)  # finite: split 0 always covers the first tile
    w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_split * w, 0)
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + dims * stride_out_dim,
             out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def decode_tile_size(block_size: int) -> int:
    return max(DECODE_TILE_SIZE, triton.next_power_of_2(block_size))


def default_num_splits(meta: AttentionMetadata, num_kv_heads: int, block_size: int, device: torch.device) -> int:
    """Split the keys until there are about two programs per SM, keeping at least two tiles per split.

    Rounded down to a power of two: NUM_SPLITS is a compile-time constant, so this bounds the number of
    kernel variants a growing sequence compiles to seven.
    """
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = meta.num_seqs * num_kv_heads
    num_tiles = triton.cdiv(meta.max_seq_len, decode_tile_size(block_size))
    wanted = triton.cdiv(2 * num_sms, programs)
    num_splits = max(1, min(wanted, num_tiles // MIN_TILES_PER_SPLIT, MAX_NUM_SPLITS))
    return 1 << (num_splits.bit_length() - 1)


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                        scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Launch ``paged_decode_kernel`` (and the split merge): q [num_seqs, num_heads, head_dim] -> same shape."""
    meta.check_inputs(q, k_cache, v_cache, decode=True)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_splits is None:
        num_splits = default_num_splits(meta, num_kv_heads, block_size, q.device)
    if num_splits < 1:
        raise ValueError(f"paged_decode: num_splits must be >= 1, got {num_splits}")
    queries_per_kv = num_heads // num_kv_heads
    head_dim_padded = max(MIN_DOT_SIZE, triton.next_power_of_2(head_dim))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_splits == 1:
        partial_out = partial_max = partial_sum = out  # unused by the kernel
    else:
        partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim_padded, dtype=torch.float32,
                                  device=q.device)
        partial_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        partial_sum = torch.empty_like(partial_max)
    paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, partial_out, partial_max, partial_sum, q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
        float(scale),
        *out.stride(), *q.stride(), *k_cache.stride(), *v_cache.stride(), meta.block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        QUERIES_PER_KV_PADDED=max(MIN_DOT_SIZE, triton.next_power_of_2(queries_per_kv)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PADDED=head_dim_padded,
        BLOCK_SIZE=block_size,
        TILE_SIZE=decode_tile_size(block_size),
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: the backend default
    )
    if num_splits > 1:
        paged_decode_reduce_kernel[(num_seqs, num_heads)](
            out, partial_out, partial_max, partial_sum, *out.stride(),
            HEAD_DIM=head_dim,
            HEAD_DIM_PADDED=head_dim_padded,
            NUM_SPLITS=num_splits,
            NUM_SPLITS_PADDED=triton.next_power_of_2(num_splits),
        )
    return out
