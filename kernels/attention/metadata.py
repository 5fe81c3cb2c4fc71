"""Per-step attention metadata (where new K/V go, which cached blocks each sequence reads) and the
shape contract every attention op checks its arguments against.

The runner builds one :class:`AttentionMetadata` per forward step and passes it explicitly to
every attention call (no module-level "current context"). Length terms, per sequence::

    |<------------------- seq_len ------------------->|
    |<------- context_len ------->|<--- query_len --->|
    | already in the KV cache     | new tokens this   |
    | (reused prefix, earlier     | step: their K/V   |
    |  chunks, earlier decodes)   | are written first |
    position 0                    context_len         seq_len - 1

    context_len = seq_len - query_len
    query token j sits at absolute position context_len + j and (causal) attends to
    positions 0 .. context_len + j, all read from the paged cache through the block table.

Decode is the case query_len == 1 for every sequence: the one query sits at seq_len - 1.
Flat token order: the new tokens of sequence i are rows cu_seqlens_q[i] .. cu_seqlens_q[i+1] - 1
of ``q`` (and of ``slot_mapping``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.kv_cache.layout import slot_mapping as _slot_mapping


@dataclass(slots=True)
class AttentionMetadata:
    """Everything the attention ops need to know about one step's batch.

    >>> meta = AttentionMetadata.build([[3, 0], [5]], context_lens=[16, 0], query_lens=[1, 4],
    ...                                block_size=16, device="cpu")
    >>> meta.slot_mapping.tolist(), meta.seq_lens.tolist(), meta.cu_seqlens_q.tolist()
    ([0, 80, 81, 82, 83], [17, 4], [0, 1, 5])
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token's K/V; -1 = skip
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0 or -1
    seq_lens: torch.Tensor  # [num_seqs] int32, context_len + query_len
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32, offsets of each seq's new tokens
    max_query_len: int
    max_seq_len: int
    # Values derived once per step and shared by every layer (e.g. the torch path's gather index).
    derived: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Shape and dtype checks only: reading values would force a device sync every step.
        expected = {
            "slot_mapping": (1, torch.int64),
            "block_tables": (2, torch.int32),
            "seq_lens": (1, torch.int32),
            "cu_seqlens_q": (1, torch.int32),
        }
        for name, (ndim, dtype) in expected.items():
            tensor = getattr(self, name)
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim or tensor.dtype != dtype:
                got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor)
                raise ValueError(f"AttentionMetadata.{name} must be a {ndim}-d {dtype} tensor, got {got}")
        num_seqs = self.seq_lens.shape[0]
        if self.block_tables.shape[0] != num_seqs:
            raise ValueError(f"AttentionMetadata.block_tables has {self.block_tables.shape[0]} rows "
                             f"but seq_lens has {num_seqs} sequences")
        if self.cu_seqlens_q.shape[0] != num_seqs + 1:
            raise ValueError(f"AttentionMetadata.cu_seqlens_q must have num_seqs + 1 = {num_seqs + 1} "
                             f"entries, got {self.cu_seqlens_q.shape[0]}")
        if self.max_query_len < 1 or self.max_seq_len < self.max_query_len:
            raise ValueError(f"AttentionMetadata needs 1 <= max_query_len <= max_seq_len, got "
                             f"max_query_len={self.max_query_len}, max_seq_len={self.max_seq_len}")

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def is_decode(self) -> bool:
        """True when every sequence brings exactly one new token (query lengths are >= 1)."""
        return self.max_query_len == 1 and self.num_tokens == self.num_seqs

    @classmethod
    def build(cls, block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
              block_size: int, device: torch.device | str) -> AttentionMetadata:
        """Metadata for sequences that already cached ``context_lens`` tokens and bring ``query_lens`` new ones."""
        num_seqs = len(block_tables)
        if not (len(context_lens) == len(query_lens) == num_seqs) or num_seqs == 0:
            raise ValueError(f"need one block table, context_len and query_len per sequence (at least one), got "
                             f"{num_seqs} tables, {len(context_lens)} context_lens, {len(query_lens)} query_lens")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        slots: list[int] = []
        seq_lens: list[int] = []
        cu_seqlens_q = [0]
        for i, (table, context_len, query_len) in enumerate(zip(block_tables, context_lens, query_lens)):
            if context_len < 0 or query_len < 1:
                raise ValueError(f"sequence {i}: need context_len >= 0 and query_len >= 1, "
                                 f"got context_len={context_len}, query_len={query_len}")
            seq_len = context_len + query_len
            if len(table) * block_size < seq_len:
                raise ValueError(f"sequence {i}: {len(table)} blocks of {block_size} cannot hold seq_len={seq_len}")
            slots.extend(_slot_mapping(table, context_len, seq_len, block_size))
            seq_lens.append(seq_len)
            cu_seqlens_q.append(cu_seqlens_q[-1] + query_len)
        max_blocks = max(len(t) for t in block_tables)
        padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.tensor(cu_seqlens_q, dtype=torch.int32, device=device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )

    def check_inputs(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, decode: bool) -> None:
        """Raise ``ValueError`` unless ``q`` and the caches fit this metadata (shapes, dtypes, devices only)."""
        op = "paged_decode" if decode else "paged_prefill"
        if q.ndim != 3:
            raise ValueError(f"{op}: q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache.ndim != 4:
                raise ValueError(f"{op}: {name} must be [num_blocks, block_size, num_kv_heads, head_dim] "
                                 f"(one layer of the cache), got shape {tuple(cache.shape)}")
        if k_cache.shape != v_cache.shape:
            raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
        num_tokens, num_heads, head_dim = q.shape
        _, _, num_kv_heads, cache_head_dim = k_cache.shape
        if head_dim != cache_head_dim:
            raise ValueError(f"{op}: head_dim mismatch, q has {head_dim} and the cache has {cache_head_dim}")
        if num_heads % num_kv_heads:
            raise ValueError(f"{op}: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if not (q.dtype == k_cache.dtype == v_cache.dtype):
            raise ValueError(f"{op}: dtype mismatch, q is {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
        if not q.is_floating_point():
            raise ValueError(f"{op}: q must be floating point, got {q.dtype}")
        devices = {t.device for t in (q, k_cache, v_cache, self.block_tables, self.seq_lens, self.cu_seqlens_q)}
        if len(devices) != 1:
            raise ValueError(f"{op}: q, caches and metadata must be on one device, got {sorted(map(str, devices))}")
        expected_rows = self.num_seqs if decode else self.num_tokens
        if num_tokens != expected_rows:
            what = "num_seqs (one query per sequence)" if decode else "num_tokens (len(slot_mapping))"
            raise ValueError(f"{op}: q has {num_tokens} rows but the metadata has {what} = {expected_rows}")
        if decode and not self.is_decode:
            raise ValueError(f"{op}: metadata is not a decode batch (max_query_len={self.max_query_len})")


def check_write_kv_inputs(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the arguments of ``write_kv`` fit together (no device sync)."""
    if key.ndim != 3 or key.shape != value.shape:
        raise ValueError(f"write_kv: key and value must both be [num_tokens, num_kv_heads, head_dim], "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"write_kv: k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"write_kv: key is [num_tokens, num_kv_heads, head_dim] = {tuple(key.shape)} but the cache "
                         f"holds (num_kv_heads, head_dim) = {tuple(k_cache.shape[2:])}")
    if not (key.dtype == value.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"write_kv: dtype mismatch, key {key.dtype}, value {value.dtype}, "
                         f"k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if slot_mapping.ndim != 1 or slot_mapping.dtype != torch.int64 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"write_kv: slot_mapping must be int64 [num_tokens={key.shape[0]}], "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"write_kv: all tensors must be on one device, got {sorted(map(str, devices))}")
