"""Plain-PyTorch twins of the attention ops: the truth the Triton kernels are held to.

The attention references loop over sequences; each gathers its K/V from its blocks (PagedAttention
layout, see ``kernels/kv_cache/layout.py``), builds an explicit causal mask and does the softmax in
float32, then casts back. ``write_kv_ref`` is one ``index_copy_`` (tests hold it to a per-token loop).
Nothing here loops over tokens, so these also serve as the ``impl="torch"`` path on CPU.
``dense_attention_ref`` is the same math without paging, to check the paged gather against.
"""

from __future__ import annotations

import math

import torch

from kernels.attention.metadata import AttentionMetadata


def write_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Copy token ``i``'s K/V into slot ``slot_mapping[i]`` of each cache, in place; slot -1 is skipped.

    key, value: [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
    head_dim], seen as [num_slots, num_kv_heads, head_dim] with slot = block_id * block_size + offset.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for src, cache in ((key, k_cache), (value, v_cache)):
        # flatten(0, 1) must be a view or the writes would land in a copy; a layer's cache[layer, 0] always is one.
        if cache.stride(0) != cache.shape[1] * cache.stride(1):
            raise ValueError(f"write_kv: cache strides {cache.stride()} do not let (num_blocks, block_size) merge "
                             "into one slot dimension")
        cache.flatten(0, 1).index_copy_(0, slots, src[keep])


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence: [seq_len, num_kv_heads, head_dim].

    cache: [num_blocks, block_size, num_kv_heads, head_dim]; only the sequence's own blocks are read.
    """
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    # index_select, not cache[ids]: on CPU advanced indexing is ~10x slower, and this runs every layer of every step.
    blocks = cache.index_select(0, block_table[:num_blocks])  # [num_blocks, block_size, num_kv_heads, head_dim]
    return blocks.flatten(0, 1)[:seq_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention in float32 with GQA; returns float32.

    q: [query_len, num_heads, head_dim]; k, v: [kv_len, num_kv_heads, head_dim];
    mask: [query_len, kv_len] bool (True = may attend) or None.
    """
    query_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group_size = num_heads // num_kv_heads
    # Query head h reads kv head h // group_size: view q as [num_kv_heads, group_size * query_len, head_dim].
    qg = q.float().view(query_len, num_kv_heads, group_size, head_dim).permute(1, 2, 0, 3)
    qg = qg.reshape(num_kv_heads, group_size * query_len, head_dim)
    kf = k.float().transpose(0, 1)  # [num_kv_heads, kv_len, head_dim]
    vf = v.float().transpose(0, 1)
    scores = torch.bmm(qg, kf.transpose(1, 2)) * scale  # [num_kv_heads, group_size * query_len, kv_len]
    if mask is not None:
        scores = scores.view(num_kv_heads, group_size, query_len, -1).masked_fill(~mask, float("-inf"))
        scores = scores.view(num_kv_heads, group_size * query_len, -1)
    out = torch.bmm(torch.softmax(scores, dim=-1), vf)  # [num_kv_heads, group_size * query_len, head_dim]
    out = out.view(num_kv_heads, group_size, query_len, head_dim).permute(2, 0, 1, 3)
    return out.reshape(query_len, num_heads, head_dim)


def causal_mask(query_len: int, kv_len: int, device: torch.device | str) -> torch.Tensor:
    """[query_len, kv_len] bool: query j (at absolute position kv_len - query_len + j) sees keys <= its position."""
    q_pos = torch.arange(kv_len - query_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def paged_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                      scale: float) -> torch.Tensor:
    """Causal varlen attention of the new tokens over all cached keys of their sequence.

    q: [num_tokens, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    Returns [num_tokens, num_heads, head_dim] in q's dtype.
    """
    out = torch.empty_like(q)
    cu_seqlens_q = meta.cu_seqlens_q.tolist()
    for i, seq_len in enumerate(meta.seq_lens.tolist()):
        start, end = cu_seqlens_q[i], cu_seqlens_q[i + 1]
        if start == end:
            continue
        k = gather_kv(k_cache, meta.block_tables[i], seq_len)
        v = gather_kv(v_cache, meta.block_tables[i], seq_len)
        mask = causal_mask(end - start, seq_len, q.device)
        out[start:end] = _attend(q[start:end], k, v, scale, mask).to(q.dtype)
    return out


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """One query per sequence, at position seq_len - 1, over the whole sequence (no mask needed).

    q: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    Returns [num_seqs, num_heads, head_dim] in q's dtype.
    """
    out = torch.empty_like(q)
    for i, seq_len in enumerate(meta.seq_lens.tolist()):
        k = gather_kv(k_cache, meta.block_tables[i], seq_len)
        v = gather_kv(v_cache, meta.block_tables[i], seq_len)
        out[i : i + 1] = _attend(q[i : i + 1], k, v, scale, None).to(q.dtype)
    return out


def dense_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        scale: float | None = None) -> torch.Tensor:
    """Textbook attention on contiguous tensors, no paging, no batching: the paged reference's referee.

    q: [query_len, num_heads, head_dim]; k, v: [kv_len, num_kv_heads, head_dim]. With ``causal`` the
    queries are the last ``query_len`` positions of the ``kv_len`` keys. Math in float32, result in q's dtype.
    """
    query_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads, _ = k.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group_size = num_heads // num_kv_heads
    kf = k.float().repeat_interleave(group_size, dim=1)  # [kv_len, num_heads, head_dim]
    vf = v.float().repeat_interleave(group_size, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    if causal:
        allowed = torch.ones(query_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - query_len)
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)
