"""Loading one tile of keys and values through a block table: the step both attention kernels share."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr, seq, stride_bt_seq, pos, pos_mask, kv_head, dims,
                 dim_mask, stride_kc_block, stride_kc_offset, stride_kc_head, stride_kc_dim,
                 stride_vc_block, stride_vc_offset, stride_vc_head, stride_vc_dim, BLOCK_SIZE: tl.constexpr):
    """K as [HEAD_DIM_PADDED, TILE_SIZE] (ready for q @ k) and V as [TILE_SIZE, HEAD_DIM_PADDED] at ``pos``."""
    # Masked so that no block-table entry past the sequence's own blocks is read.
    block_ids = tl.load(block_tables_ptr + seq * stride_bt_seq + pos // BLOCK_SIZE, mask=pos_mask, other=0)
    k_base = block_ids.to(tl.int64) * stride_kc_block + (pos % BLOCK_SIZE) * stride_kc_offset
    k = tl.load(k_cache_ptr + k_base[None, :] + kv_head * stride_kc_head + dims[:, None] * stride_kc_dim,
                mask=dim_mask[:, None] & pos_mask[None, :], other=0.0)
    v_base = block_ids.to(tl.int64) * stride_vc_block + (pos % BLOCK_SIZE) * stride_vc_offset
    v = tl.load(v_cache_ptr + v_base[:, None] + kv_head * stride_vc_head + dims[None, :] * stride_vc_dim,
                mask=pos_mask[:, None] & dim_mask[None, :], other=0.0)
    return k, v
