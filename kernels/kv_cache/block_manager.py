"""Block manager: hands out KV-cache blocks to sequences, with reference counts and prefix reuse.

Automatic prefix caching (as in vLLM's APC): a *full* block is named by a chained hash of
(parent block's hash, its token ids, model fingerprint), so two requests that share a prompt
prefix share the blocks holding it. A block whose reference count drops to zero returns to the
free queue but keeps its hash until it is handed out again, so a later request can still hit it;
the free queue is least-recently-freed first, which makes eviction LRU.

Lifecycle of one sequence (the scheduler drives it)::

    n_cached = bm.allocate(seq_id, prompt_ids)   # reuse hits, fresh blocks for the rest
    ... forward computes KV for positions [n_cached, len(prompt_ids)) ...
    bm.commit(seq_id, prompt_ids)                 # full blocks now hold real KV: publish their hashes
    bm.reserve(seq_id, num_tokens + 1)            # room for the next decode token
    ... forward, sample, append token ...
    bm.commit(seq_id, all_token_ids)
    bm.free(seq_id)                               # finished, aborted or preempted

Hashes are published only by ``commit`` (after the KV is written), never at allocation, so a
request admitted in the same step can never read a block that is still being filled.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from kernels.errors import OutOfBlocksError


def block_hash(parent: bytes, token_ids: list[int] | tuple[int, ...], fingerprint: str) -> bytes:
    """Chained hash of one full block: depends on every token before it and on the model."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent)
    h.update(fingerprint.encode())
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and committed
    token_ids: tuple[int, ...] = ()  # kept beside the hash to rule out collisions


@dataclass(slots=True)
class _SeqState:
    block_ids: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # hashes of its first len(hashes) blocks


@dataclass(slots=True)
class BlockStats:
    num_blocks: int
    num_free: int
    num_used: int
    num_cached_free: int  # free blocks still holding a reusable prefix
    prefix_queries: int  # full prompt blocks looked up
    prefix_hits: int

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class BlockManager:
    """Reference-counted pool of ``num_blocks`` KV blocks of ``block_size`` tokens.

    >>> bm = BlockManager(num_blocks=4, block_size=2)
    >>> bm.allocate("a", [1, 2, 3])
    0
    >>> bm.block_table("a")
    [0, 1]
    """

    def __init__(self, num_blocks: int, block_size: int, fingerprint: str = "",
                 enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.fingerprint = fingerprint
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[bytes, int] = {}
        self._seqs: dict[object, _SeqState] = {}
        self._prefix_queries = 0
        self._prefix_hits = 0

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def block_table(self, seq_id: object) -> list[int]:
        return list(self._state(seq_id).block_ids)

    def has_seq(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def stats(self) -> BlockStats:
        cached_free = sum(1 for b in self._free if self.blocks[b].hash is not None)
        return BlockStats(self.num_blocks, len(self._free), self.num_used_blocks, cached_free,
                          self._prefix_queries, self._prefix_hits)

    def _state(self, seq_id: object) -> _SeqState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"sequence {seq_id!r} holds no blocks") from None

    # ------------------------------------------------------------ prefix match
    def _full_block_hashes(self, token_ids: list[int], parent: bytes = b"", start: int = 0) -> list[bytes]:
        hashes = []
        bs = self.block_size
        for i in range(start, len(token_ids) // bs):
            parent = block_hash(parent, token_ids[i * bs:(i + 1) * bs], self.fingerprint)
            hashes.append(parent)
        return hashes

    def _match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[bytes]]:
        """Block ids of the longest cached prefix of full blocks, and the prompt's full-block hashes."""
        if not self.enable_prefix_caching:
            return [], []
        hashes = self._full_block_hashes(token_ids)
        # At least one token must be computed to produce logits: never reuse the block that
        # holds the prompt's last token.
        usable = (len(token_ids) - 1) // self.block_size
        hits: list[int] = []
        bs = self.block_size
        for i, h in enumerate(hashes[:usable]):
            block_id = self._by_hash.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(block_id)
        return hits, hashes

    def num_blocks_to_allocate(self, token_ids: list[int]) -> int:
        """Fresh blocks a prompt would take now (hits on free cached blocks count as taken)."""
        hits, _ = self._match_prefix(token_ids)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return -(-len(token_ids) // self.block_size) - len(hits) + revived

    def can_allocate(self, token_ids: list[int], reserve: int = 0) -> bool:
        """Whether ``allocate`` would succeed while leaving ``reserve`` blocks free."""
        return self.num_blocks_to_allocate(token_ids) + reserve <= len(self._free)

    # ---------------------------------------------------------------- mutation
    def allocate(self, seq_id: object, token_ids: list[int]) -> int:
        """Give ``seq_id`` blocks for ``token_ids``; returns how many leading tokens are already cached."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        if not token_ids:
            raise ValueError("cannot allocate blocks for an empty token list")
        hits, hashes = self._match_prefix(token_ids)
        needed = -(-len(token_ids) // self.block_size) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if needed + revived > len(self._free):
            raise OutOfBlocksError(
                f"need {needed + revived} free KV blocks for a {len(token_ids)}-token prompt, "
                f"{len(self._free)} of {self.num_blocks} are free")
        self._prefix_queries += min(len(hashes), (len(token_ids) - 1) // self.block_size)
        self._prefix_hits += len(hits)
        for b in hits:
            self._take(b)
        state = _SeqState(block_ids=list(hits), hashes=hashes[:len(hits)])
        state.block_ids.extend(self._take_fresh() for _ in range(needed))
        self._seqs[seq_id] = state
        return len(hits) * self.block_size

    def can_reserve(self, seq_id: object, num_tokens: int) -> bool:
        state = self._state(seq_id)
        return max(0, -(-num_tokens // self.block_size) - len(state.block_ids)) <= len(self._free)

    def reserve(self, seq_id: object, num_tokens: int) -> list[int]:
        """Grow the sequence's table to hold ``num_tokens`` tokens; returns the new block ids."""
        state = self._state(seq_id)
        missing = -(-num_tokens // self.block_size) - len(state.block_ids)
        if missing > len(self._free):
            raise OutOfBlocksError(f"sequence {seq_id!r} needs {missing} more KV blocks, "
                                   f"{len(self._free)} are free")
        new = [self._take_fresh() for _ in range(max(0, missing))]
        state.block_ids.extend(new)
        return new

    def commit(self, seq_id: object, token_ids: list[int]) -> None:
        """Publish the hashes of the sequence's full blocks: their KV for ``token_ids`` is written."""
        if not self.enable_prefix_caching:
            return
        state = self._state(seq_id)
        num_full = min(len(token_ids) // self.block_size, len(state.block_ids))
        if num_full <= len(state.hashes):
            return
        parent = state.hashes[-1] if state.hashes else b""
        new_hashes = self._full_block_hashes(token_ids[:num_full * self.block_size], parent, len(state.hashes))
        bs = self.block_size
        for i, h in enumerate(new_hashes, start=len(state.hashes)):
            block = self.blocks[state.block_ids[i]]
            if block.hash is None:
                block.hash = h
                block.token_ids = tuple(token_ids[i * bs:(i + 1) * bs])
                # An identical block committed earlier keeps the name; this one stays private.
                self._by_hash.setdefault(h, block.block_id)
        state.hashes.extend(new_hashes)

    def free(self, seq_id: object) -> None:
        """Release every block of ``seq_id`` (finished, aborted or preempted)."""
        state = self._seqs.pop(seq_id, None)
        if state is None:
            return
        # Tail first, so that a prefix's parent blocks are evicted after its children.
        for block_id in reversed(state.block_ids):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than taken"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    # ----------------------------------------------------------------- helpers
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        block_id, _ = self._free.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None:
            if self._by_hash.get(block.hash) == block_id:
                del self._by_hash[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def check_invariants(self) -> None:
        """Every block is either free with ref 0 or held exactly as often as tables name it."""
        counts = [0] * self.num_blocks
        for state in self._seqs.values():
            for b in state.block_ids:
                counts[b] += 1
        for block in self.blocks:
            in_free = block.block_id in self._free
            assert block.ref_count == counts[block.block_id], (block, counts[block.block_id])
            assert in_free == (block.ref_count == 0), block
        for h, b in self._by_hash.items():
            assert self.blocks[b].hash == h
