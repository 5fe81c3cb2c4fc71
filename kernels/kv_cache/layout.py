"""The paged KV-cache format: the one place that says how K and V are laid out.

Every engine, kernel and test imports this module; nothing restates the shape.

    cache tensor    [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
                                  ^ 0 = K, 1 = V
    one layer's K   cache[layer, 0]  -> [num_blocks, block_size, num_kv_heads, head_dim]

A token's *slot* is ``block_id * block_size + offset``; writes go through a slot mapping
(one slot per new token, ``-1`` = do not write). A sequence owns a block table: the list of
block ids holding its tokens in order, so token ``i`` lives in block ``table[i // block_size]``
at offset ``i % block_size``.

Tensor parallelism shards along ``num_kv_heads``: rank ``r`` of ``tp`` holds heads
``[r * num_kv_heads // tp, (r + 1) * num_kv_heads // tp)`` (see :meth:`KVCacheSpec.shard`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kernels import hostmem

DEFAULT_BLOCK_SIZE = 16
KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """Shape and dtype of one engine's paged KV cache.

    >>> spec = KVCacheSpec(num_layers=2, num_kv_heads=3, head_dim=64, num_blocks=8)
    >>> spec.shape
    (2, 2, 8, 16, 3, 64)
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_blocks", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCacheSpec.{name} must be a positive int, got {value!r}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"KVCacheSpec.dtype must be one of {KV_DTYPES}, got {self.dtype}")

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (K and V)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def allocate(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A zeroed cache tensor of :attr:`shape`; on CPU in 2 MiB pages (:mod:`kernels.hostmem`: fewer TLB
        misses when attention reads its blocks, and pages cost memory only once a block is used)."""
        if torch.device(device).type == "cpu":
            return hostmem.zeros(self.shape, self.dtype)
        return torch.zeros(self.shape, dtype=self.dtype, device=device)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def shard(self, rank: int, tp: int) -> KVCacheSpec:
        """The spec rank ``rank`` of a ``tp``-way tensor-parallel group holds."""
        if tp <= 0 or self.num_kv_heads % tp:
            raise ValueError(f"tensor-parallel degree {tp} does not divide num_kv_heads={self.num_kv_heads}")
        if not 0 <= rank < tp:
            raise ValueError(f"rank {rank} out of range for tp={tp}")
        return replace(self, num_kv_heads=self.num_kv_heads // tp)

    @staticmethod
    def num_blocks_for_bytes(nbytes: int, *, num_layers: int, num_kv_heads: int, head_dim: int,
                             block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> int:
        """How many blocks fit in ``nbytes`` of memory."""
        probe = KVCacheSpec(num_layers, num_kv_heads, head_dim, 1, block_size, dtype)
        return max(1, nbytes // probe.bytes_per_block)


def slot_of(block_table: list[int], position: int, block_size: int) -> int:
    """Slot of the token at ``position`` of a sequence with ``block_table``."""
    return block_table[position // block_size] * block_size + position % block_size


def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Slots of positions ``[start, end)`` of one sequence, in order."""
    return [slot_of(block_table, p, block_size) for p in range(start, end)]
