"""Write the new tokens' K/V into the paged cache through the slot mapping (PagedAttention layout).

One program per token copies all its kv heads; slot -1 (padding) is skipped. Its PyTorch twin is
``write_kv_ref`` (one ``index_copy_``); both must match a per-token loop exactly, it is a copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.attention.metadata import check_write_kv_inputs


@triton.jit
def write_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    stride_k_tok, stride_k_head, stride_k_dim,
    stride_v_tok, stride_v_head, stride_v_dim,
    stride_kc_block, stride_kc_offset, stride_kc_head, stride_kc_dim,
    stride_vc_block, stride_vc_offset, stride_vc_head, stride_vc_dim,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS_PADDED: tl.constexpr,  # next power of two >= NUM_KV_HEADS
    HEAD_DIM_PADDED: tl.constexpr,  # next power of two >= HEAD_DIM
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding token: nothing to write
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    heads = tl.arange(0, NUM_KV_HEADS_PADDED)
    dims = tl.arange(0, HEAD_DIM_PADDED)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)  # [NUM_KV_HEADS_PADDED, HEAD_DIM_PADDED]

    k = tl.load(key_ptr + token * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :] * stride_k_dim,
                mask=mask)
    v = tl.load(value_ptr + token * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :] * stride_v_dim,
                mask=mask)
    kc = block * stride_kc_block + offset * stride_kc_offset + heads[:, None] * stride_kc_head
    vc = block * stride_vc_block + offset * stride_vc_offset + heads[:, None] * stride_vc_head
    tl.store(k_cache_ptr + kc + dims[None, :] * stride_kc_dim, k, mask=mask)
    tl.store(v_cache_ptr + vc + dims[None, :] * stride_vc_dim, v, mask=mask)


def write_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Launch ``write_kv_kernel``: one program per token, all its kv heads at once."""
    check_write_kv_inputs(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        NUM_KV_HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
    )
