"""Block manager: allocate / reserve / commit / free, prefix hits, out-of-blocks, no leaks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.errors import OutOfBlocksError
from kernels.kv_cache.block_manager import BlockManager
from kernels.kv_cache.layout import KVCacheSpec, slot_mapping, slot_of


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", list(range(9))) == 0
    assert len(bm.block_table("a")) == 3
    assert bm.num_free_blocks == 5
    bm.free("a")
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_reserve_grows_only_at_block_boundaries():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", [1, 2, 3])
    assert bm.reserve("a", 4) == []
    new = bm.reserve("a", 5)
    assert len(new) == 1 and bm.block_table("a")[-1] == new[0]
    bm.check_invariants()


def test_prefix_hit_shares_committed_blocks_and_counts_references():
    bm = BlockManager(num_blocks=16, block_size=4, fingerprint="m")
    prompt = list(range(10))
    bm.allocate("a", prompt)
    bm.commit("a", prompt)  # blocks [0:4] and [4:8] are full
    cached = bm.allocate("b", prompt[:8] + [99, 98, 97])
    assert cached == 8
    assert bm.block_table("a")[:2] == bm.block_table("b")[:2]
    assert bm.block_table("a")[2] != bm.block_table("b")[2]
    assert bm.blocks[bm.block_table("a")[0]].ref_count == 2
    assert bm.stats().prefix_hits == 2
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 16
    bm.check_invariants()


def test_uncommitted_blocks_are_never_hit():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(12))
    bm.allocate("a", prompt)  # KV not yet computed: nothing published
    assert bm.allocate("b", prompt) == 0


def test_prefix_hit_survives_free_until_block_is_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    prompt = list(range(9))
    bm.allocate("a", prompt)
    bm.commit("a", prompt)
    bm.free("a")
    assert bm.stats().num_cached_free == 2
    assert bm.allocate("b", prompt) == 8  # revived from the free queue
    bm.free("b")
    # Fill the pool with other tokens: the cached blocks get evicted and the hashes forgotten.
    bm.allocate("c", [7] * 16)
    bm.free("c")
    assert bm.allocate("d", prompt) == 0
    bm.check_invariants()


def test_last_prompt_token_is_always_recomputed():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(8))
    bm.allocate("a", prompt)
    bm.commit("a", prompt)
    # Identical block-aligned prompt: only the first block may be reused, the last must be computed.
    assert bm.allocate("b", prompt) == 4


def test_different_fingerprints_do_not_share():
    prompt = list(range(8))
    a = BlockManager(num_blocks=8, block_size=4, fingerprint="model-a")
    a.allocate("x", prompt + [1])
    a.commit("x", prompt + [1])
    hashes_a = {b.hash for b in a.blocks if b.hash}
    b = BlockManager(num_blocks=8, block_size=4, fingerprint="model-b")
    b.allocate("x", prompt + [1])
    b.commit("x", prompt + [1])
    assert hashes_a.isdisjoint({blk.hash for blk in b.blocks if blk.hash})


def test_out_of_blocks_is_clear_and_allocates_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(OutOfBlocksError, match="need 3 free KV blocks"):
        bm.allocate("a", list(range(9)))
    assert bm.num_free_blocks == 2 and not bm.has_seq("a")
    bm.allocate("b", list(range(8)))
    assert not bm.can_reserve("b", 9)
    with pytest.raises(OutOfBlocksError):
        bm.reserve("b", 9)
    bm.check_invariants()


def test_bad_calls_raise():
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="empty"):
        bm.allocate("a", [])
    bm.allocate("a", [1])
    with pytest.raises(ValueError, match="already"):
        bm.allocate("a", [1])
    with pytest.raises(KeyError):
        bm.block_table("nope")
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    prompt = list(range(9))
    bm.allocate("a", prompt)
    bm.commit("a", prompt)
    assert bm.allocate("b", prompt) == 0


def test_slot_arithmetic_matches_layout():
    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=4, block_size=4)
    table = [3, 0, 2]
    assert slot_of(table, 0, spec.block_size) == 12
    assert slot_of(table, 5, spec.block_size) == 1
    assert slot_mapping(table, 3, 9, spec.block_size) == [15, 0, 1, 2, 3, 8]


# --------------------------------------------------------------------------- property test
ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "grow", "commit", "free"]), st.integers(0, 5),
              st.lists(st.integers(0, 3), min_size=1, max_size=20)),
    min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_operation_sequences_never_leak(operations):
    """Any interleaving keeps ref counts exact, and freeing everything empties the pool."""
    bm = BlockManager(num_blocks=12, block_size=4, fingerprint="f")
    tokens: dict[int, list[int]] = {}
    for op, seq, ids in operations:
        if op == "alloc" and seq not in tokens:
            if bm.can_allocate(ids):
                cached = bm.allocate(seq, ids)
                assert cached % 4 == 0 and cached < len(ids)
                tokens[seq] = list(ids)
            else:
                with pytest.raises(OutOfBlocksError):
                    bm.allocate(seq, ids)
        elif op == "grow" and seq in tokens:
            want = len(tokens[seq]) + len(ids)
            if bm.can_reserve(seq, want):
                bm.reserve(seq, want)
                tokens[seq].extend(ids)
        elif op == "commit" and seq in tokens:
            bm.commit(seq, tokens[seq])
        elif op == "free" and seq in tokens:
            bm.free(seq)
            del tokens[seq]
        bm.check_invariants()
        for s, t in tokens.items():
            assert len(bm.block_table(s)) * 4 >= len(t)
    for s in list(tokens):
        bm.free(s)
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()
