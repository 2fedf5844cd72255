"""The paged-KV block manager's rules (ember/runtime/kv_blocks.py), without a model."""
from __future__ import annotations

import numpy as np
import pytest

from ember.errors import InputError
from ember.runtime.kv_blocks import BlockManager, block_hash


def ids(*xs) -> np.ndarray:
    return np.asarray(xs, dtype=np.int64)


def computed(bm: BlockManager, key, tokens: np.ndarray) -> None:
    """``key`` was allocated for ``tokens`` and all of them were computed."""
    bm.mark_computed(key, tokens, len(tokens))


def test_allocate_append_free_accounting():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate("a", ids(*range(6))) == 0
    assert len(bm.table("a")) == 2 and bm.num_used == 2 and bm.num_free == 2
    assert bm.append_slots("a", 8) and len(bm.table("a")) == 2  # still fits its 2 blocks
    assert bm.append_slots("a", 9) and len(bm.table("a")) == 3
    assert not bm.append_slots("a", 17) and len(bm.table("a")) == 3  # needs 2 more, 1 free: nothing changes
    assert len(set(bm.table("a"))) == 3
    assert not bm.can_allocate(ids(*range(100, 106)))
    assert bm.allocate("b", ids(*range(100, 106))) is None and "b" not in bm.seqs
    bm.free("a")
    assert bm.num_free == 4 and bm.num_used == 0
    bm.free("a")  # twice: ignored
    assert bm.num_free == 4


def test_shared_prefix_hits_full_blocks_and_counts_references():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = ids(*range(10))  # 2 full blocks + 2 tokens
    assert bm.allocate("a", prompt) == 0
    computed(bm, "a", prompt)
    other = ids(*range(8), 50, 51, 52)  # same 2 full blocks, different tail
    assert bm.allocate("b", other) == 8
    assert bm.table("b")[:2] == bm.table("a")[:2] and bm.table("b")[2] != bm.table("a")[2]
    shared = bm.table("a")[0]
    assert bm.ref[shared] == 2
    assert bm.stats.hits == 8 and bm.stats.queries == len(prompt) + len(other)
    bm.free("a")
    assert bm.ref[shared] == 1 and shared not in bm.evictable  # b still holds it
    bm.free("b")
    assert bm.ref[shared] == 0 and shared in bm.evictable and bm.num_free == 8
    assert bm.num_cached == 2  # a's tail block was partial: never hashed


def test_uncomputed_blocks_are_not_shared():
    """A block is findable only once its tokens have K/V (``mark_computed``)."""
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = ids(*range(9))
    bm.allocate("a", prompt)
    bm.mark_computed("a", prompt, 4)  # a first chunk of 4 tokens
    assert bm.allocate("b", prompt) == 4
    bm.mark_computed("a", prompt, 9)
    assert bm.allocate("c", prompt) == 8


def test_never_the_whole_prompt():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = ids(*range(8))  # exactly 2 full blocks
    bm.allocate("a", prompt)
    computed(bm, "a", prompt)
    assert bm.allocate("b", prompt) == 4  # the last token's block is computed again
    assert bm.allocate("c", ids(*range(9))) == 8


def test_chained_hash_same_block_after_other_prefix_misses():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = ids(1, 2, 3, 4, 9)
    bm.allocate("a", a)
    computed(bm, "a", a)
    assert bm.allocate("b", ids(7, 7, 3, 4, 9)) == 0  # block [3, 4] after another prefix: no hit
    assert block_hash(b"", ids(3, 4)) != block_hash(block_hash(b"", ids(1, 2)), ids(3, 4))
    assert block_hash(b"", ids(3, 4)) == block_hash(b"", [3, 4])  # stable: int64 bytes, not hash()


def test_freed_cached_blocks_are_evicted_lru_only_when_needed():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = ids(1, 2, 0), ids(5, 6, 0)
    for key, p in (("old", old), ("new", new)):
        bm.allocate(key, p)
        computed(bm, key, p)
    bm.free("old")  # its cached block [1, 2] is freed first: least recently used
    bm.free("new")
    assert bm.num_cached == 2 and bm.stats.evictions == 0
    bm.allocate("x", ids(9, 9, 9, 9, 9, 9, 9))  # 4 blocks: the 2 free ones, then evicts both cached, oldest first
    assert bm.stats.evictions == 2 and bm.num_cached == 0
    bm.free("x")
    for key, p in (("old", old), ("new", new)):
        bm.allocate(key, p)
        computed(bm, key, p)
    bm.free("old")
    bm.free("new")
    bm.allocate("y", ids(8, 8, 8, 8, 8))  # 3 blocks: 2 uncached free ones + evicts one: old's
    assert bm.stats.evictions == 3 and bm.num_cached == 1
    bm.free("y")
    assert bm.allocate("z", ids(5, 6, 7)) == 2  # new's block survived
    assert bm.allocate("w", ids(1, 2, 7)) == 0  # old's was evicted


def freed_after_computing(p) -> BlockManager:
    """A 3-block manager of 2-token blocks in which sequence "a" computed ``p`` and finished."""
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.allocate("a", p)
    computed(bm, "a", p)
    bm.free("a")
    return bm


def test_revived_cached_blocks_count_against_the_free_pool():
    p = ids(1, 2, 3, 4, 5)
    bm = freed_after_computing(p)
    assert bm.num_free == 3 and bm.num_cached == 2
    assert bm.can_allocate(p) and not bm.can_allocate(p, extra_tokens=2)
    assert bm.allocate("b", p) == 4 and bm.num_free == 0 and bm.stats.evictions == 0


def test_cached_tail_blocks_are_evicted_before_the_prefix():
    """A finished sequence's blocks become evictable tail first, so its shared prefix stays longest."""
    p = ids(1, 2, 3, 4, 5)
    bm = freed_after_computing(p)
    bm.allocate("b", ids(9, 9, 9, 9))  # takes the free block and evicts one cached block: [3, 4]
    assert bm.stats.evictions == 1 and bm.num_cached == 1
    bm.free("b")
    assert bm.allocate("c", p) == 2  # [1, 2] is still cached


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=8, block_size=2, prefix_caching=False)
    p = ids(1, 2, 3)
    bm.allocate("a", p)
    computed(bm, "a", p)
    assert bm.allocate("b", p) == 0 and bm.num_cached == 0


def test_bad_sizes_are_input_errors():
    with pytest.raises(InputError, match="num_blocks"):
        BlockManager(0, 16)


def test_a_prefix_being_computed_is_in_flight_until_computed_or_freed():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = ids(*range(10))
    bm.allocate("a", a)
    later = ids(*range(8), 70, 71)
    assert bm.prefix_in_flight(later)  # its first block is a's, not computed yet
    assert not bm.prefix_in_flight(ids(*range(3)))  # no full block to share
    assert not bm.prefix_in_flight(ids(9, *range(1, 10)))  # another first block
    bm.mark_computed("a", a, 4)
    assert bm.prefix_in_flight(later)  # block 0 cached, block 1 still being computed
    bm.mark_computed("a", a, 10)
    assert not bm.prefix_in_flight(later) and bm.allocate("b", later) == 8
    bm.allocate("c", ids(*range(50, 60)))
    assert bm.prefix_in_flight(ids(*range(50, 58), 1))
    bm.free("c")  # freed before computing: nothing to wait for
    assert not bm.prefix_in_flight(ids(*range(50, 58), 1)) and not bm.in_flight


def test_default_block_size_is_flash_attentions_tile_on_cuda() -> None:
    from ember.runtime.kv_blocks import PAGED_BLOCK_SIZE, default_kv_block_size

    # any pool dtype (int8 measured: 3.4x the tok/s of 16-token blocks; the mixed workload's int8 arm
    # takes the FP16 arm's layout: tests/test_paged_workloads.py)
    assert default_kv_block_size("cuda:0", 64) == 256  # llama-1b, TinyLlama
    assert default_kv_block_size("cuda:1", 128) == 128  # Llama 3 8B, Qwen3
    assert default_kv_block_size("cpu", 64) == PAGED_BLOCK_SIZE
