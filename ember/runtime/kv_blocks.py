"""Paged KV bookkeeping with prefix caching: which blocks of a shared block pool hold which
sequence's tokens (docs/kv.md). Pure bookkeeping: no K/V array lives here; an executor keeps
the pool ``[num_blocks, block_size, ...]`` and reads/writes it through the block tables.

Rules:
- A sequence's tokens live in its *block table*: token i is at block ``table[i // block_size]``,
  offset ``i % block_size``. ``allocate`` gives a new sequence the blocks of its first tokens,
  ``append_slots`` adds blocks as it grows, ``free`` ends it (finish, cancel, preemption).
- Prefix caching: once every token of a block has K/V (``mark_computed``), the block gets a
  hash chained over the prefix, ``blake2b(parent hash + the block's token ids as int64)``, so
  the same tokens after a different prefix hash differently. ``allocate`` looks the new
  sequence's full blocks up hash by hash and shares the hits (reference counts); it returns
  how many leading tokens are cached: whole blocks only, and never the whole token list (the
  last token must be computed for its logits).
- A block whose reference count drops to 0 goes back to the free pool: without a hash, to the
  free list; with one, to the *evictable* LRU list, still findable by its hash. A block is
  taken from the free list first, else the least recently freed evictable block is evicted
  (its hash forgotten).
- Only full, computed blocks are shared, and a sequence only writes past its cached tokens,
  so a shared block is never written: no copy-on-write is needed.
Also the paged layout's two facts about a model: how many blocks a KV budget holds
(``kv_blocks_within``) and that sliding-window rings are refused (``refuse_rings``).
"""
from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

from ember.engine_format.decoder_spec import KVGeometry
from ember.errors import InputError

ROOT_HASH = b""  # the parent hash of a sequence's first block


def block_hash(parent: bytes, token_ids: np.ndarray) -> bytes:
    """The chained hash of one full block: stable across processes (not Python's salted ``hash``)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.ascontiguousarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def refuse_rings(geometry: KVGeometry) -> None:
    """InputError when the model has sliding-window layers (the paged layouts keep every position)."""
    if any(geometry.layer_rings):
        raise InputError("kv_layout='paged' does not support sliding-window layers (model.config.kv_rings) yet; "
                         "load with kv_layout='slots' (CLI: --kv-layout slots)")


def kv_itemsize(kv_dtype: str) -> int:
    """Bytes per KV element of a pool of ``kv_dtype`` (float8_e4m3fn: the paged graph's ``--kv-dtype fp8``,
    a name numpy knows only once ml_dtypes is imported)."""
    return 1 if kv_dtype == "float8_e4m3fn" else np.dtype(kv_dtype).itemsize


PAGED_BLOCK_SIZE = 16  # the paged layout's block on the CPU (the host executor)


def default_kv_block_size(device: str, head_dim: int) -> int:
    """The paged layout's block size when ``kv_block_size`` is not given, whatever the pool's dtype. On CUDA, the tile ONNX
    Runtime's FlashAttention reads K/V in (256 tokens at head size <= 64, 128 above): smaller blocks
    send PagedAttention's prefill and mixed calls over a float pool to its gathering backend, which
    copies every row's past into a dense workspace (llama-1b, H100, mixed workload at one KV budget:
    16-token blocks peaked at 32.9 GB and 3,052 output tok/s, 256-token blocks at 5.0 GB and 5,555
    tok/s), and an int8 pool decoded at a third of the speed (1,585 vs 5,423 tok/s; docs/kv.md).
    Elsewhere (the host executor) ``PAGED_BLOCK_SIZE``."""
    if device.startswith("cuda"):
        return 256 if head_dim <= 64 else 128
    return PAGED_BLOCK_SIZE


def kv_blocks_within(geometry: KVGeometry, itemsize: int, block_size: int, kv_bytes: int) -> int:
    """How many blocks of ``block_size`` positions fit ``kv_bytes`` (every layer's K and V: a block
    holds what a slot of ``block_size`` positions does; paged geometries have no rings)."""
    return kv_bytes // geometry.slot_bytes(block_size, itemsize)


@dataclass
class BlockStats:
    """Prefix-cache counters, in tokens: ``queries`` prompt tokens looked up, ``hits`` found cached."""

    queries: int = 0
    hits: int = 0
    evictions: int = 0


@dataclass
class _SeqBlocks:
    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # hashes of the first len(hashes) blocks (full, computed)
    planned: collections.deque = field(default_factory=collections.deque)  # hashes of its full blocks to compute


class BlockManager:
    """Block tables of live sequences over ``num_blocks`` blocks of ``block_size`` tokens.

    Sequences are named by any hashable key (the scheduler uses its ``Sequence``).
    ``prefix_caching=False`` keeps every rule but the hash lookups (no block is ever shared)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise InputError(f"a block pool needs num_blocks >= 1 and block_size >= 1 (got {num_blocks}, {block_size})")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free_list: collections.deque[int] = collections.deque(range(num_blocks))
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self.seqs: dict[Hashable, _SeqBlocks] = {}
        self.in_flight: collections.Counter[bytes] = collections.Counter()  # hash -> live sequences computing it
        self.stats = BlockStats()

    # -- sizes -------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks a new allocation can take: free ones plus evictable cached ones."""
        return len(self.free_list) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by a live sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks with a hash (shared or evictable)."""
        return len(self.by_hash)

    def table(self, key: Hashable) -> list[int]:
        """The block ids of ``key``'s tokens, in order (owned by the manager: do not modify)."""
        return self.seqs[key].table

    def hashed_blocks(self, key: Hashable) -> int:
        """How many of ``key``'s leading blocks are full, computed and hashed."""
        return len(self.seqs[key].hashes)

    def capacity(self, key: Hashable) -> int:
        """Tokens ``key``'s blocks have room for."""
        return len(self.seqs[key].table) * self.block_size

    # -- prefix lookup -------------------------------------------------------------------------
    def _block_hashes(self, token_ids: np.ndarray) -> list[bytes]:
        """The chained hashes of every full block of ``token_ids``."""
        out, parent, bs = [], ROOT_HASH, self.block_size
        for i in range(len(token_ids) // bs):
            parent = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            out.append(parent)
        return out

    def _cached_prefix(self, token_ids: np.ndarray, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest cached run of full blocks of ``token_ids``
        (``hashes``: their ``_block_hashes``), leaving at least the last token uncached."""
        blocks: list[int] = []
        if not self.prefix_caching:
            return blocks
        for h in hashes[:(len(token_ids) - 1) // self.block_size]:  # full blocks, never the last token
            b = self.by_hash.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks

    def prefix_in_flight(self, token_ids: np.ndarray) -> bool:
        """Whether the first block of ``token_ids`` that is not cached (a full block that
        ``allocate`` could share) is being computed by a live sequence: admitting after it is
        computed turns it into a hit."""
        if not self.prefix_caching:
            return False
        hashes = self._block_hashes(token_ids)
        i = len(self._cached_prefix(token_ids, hashes))
        return i < (len(token_ids) - 1) // self.block_size and hashes[i] in self.in_flight

    def can_allocate(self, token_ids: np.ndarray, extra_tokens: int = 0) -> bool:
        """Whether ``allocate(key, token_ids, extra_tokens)`` would find enough blocks."""
        hits = self._cached_prefix(token_ids, self._block_hashes(token_ids) if self.prefix_caching else [])
        return self._blocks_to_draw(hits, len(token_ids) + extra_tokens) <= self.num_free

    def _blocks_to_draw(self, hits: list[int], tokens: int) -> int:
        """Blocks taken out of the free pool: the new ones plus the evictable hits revived."""
        return self.blocks_for(tokens) - len(hits) + sum(self.ref[b] == 0 for b in hits)

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, key: Hashable, token_ids: np.ndarray, extra_tokens: int = 0) -> int | None:
        """Give the new sequence ``key`` blocks for ``token_ids`` plus ``extra_tokens``, sharing its
        cached prefix. Returns the number of leading tokens already cached (a multiple of
        ``block_size``, < len(token_ids)), or None (nothing changed) when the blocks are not there."""
        if key in self.seqs:
            raise ValueError(f"sequence {key!r} already has blocks")
        hashes = self._block_hashes(token_ids) if self.prefix_caching else []
        hits = self._cached_prefix(token_ids, hashes)
        if self._blocks_to_draw(hits, len(token_ids) + extra_tokens) > self.num_free:
            return None
        for b in hits:
            self._take(b)
        seq = _SeqBlocks(table=list(hits), hashes=hashes[:len(hits)], planned=collections.deque(hashes[len(hits):]))
        self.in_flight.update(seq.planned)
        self.seqs[key] = seq
        while len(seq.table) < self.blocks_for(len(token_ids) + extra_tokens):
            seq.table.append(self._new_block())
        self.stats.queries += len(token_ids)
        self.stats.hits += len(hits) * self.block_size
        return len(hits) * self.block_size

    def append_slots(self, key: Hashable, tokens: int) -> bool:
        """Make room for ``key`` to hold ``tokens`` tokens in all; False (nothing changed) when
        the free pool lacks the blocks."""
        seq = self.seqs[key]
        need = self.blocks_for(tokens) - len(seq.table)
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.table.append(self._new_block())
        return True

    def mark_computed(self, key: Hashable, token_ids: np.ndarray, num_computed: int) -> None:
        """``key``'s first ``num_computed`` tokens (of ``token_ids``) have K/V: hash its newly full
        blocks so later sequences can share them. A block whose hash another block already
        holds stays private (the first copy is the one shared)."""
        if not self.prefix_caching:
            return
        seq, bs = self.seqs[key], self.block_size
        for i in range(len(seq.hashes), min(num_computed // bs, len(seq.table))):
            parent = seq.hashes[-1] if seq.hashes else ROOT_HASH
            h = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            seq.hashes.append(h)
            if seq.planned:
                self._unplan(seq.planned.popleft())
            b = seq.table[i]
            if h not in self.by_hash and self.hash_of[b] is None:
                self.by_hash[h] = b
                self.hash_of[b] = h

    def free(self, key: Hashable) -> None:
        """End ``key``: each of its blocks loses a reference; unreferenced cached blocks become
        evictable (the sequence's last blocks first, so a shared prefix outlives its tails), the
        others free. Unknown keys are ignored (a sequence freed twice, or never admitted)."""
        seq = self.seqs.pop(key, None)
        if seq is None:
            return
        for h in seq.planned:
            self._unplan(h)
        for b in reversed(seq.table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.hash_of[b] is not None:
                    self.evictable[b] = None
                else:
                    self.free_list.append(b)

    # -- blocks --------------------------------------------------------------------------------
    def _unplan(self, h: bytes) -> None:
        self.in_flight[h] -= 1
        if not self.in_flight[h]:
            del self.in_flight[h]

    def _take(self, b: int) -> None:
        """One more reference to cached block ``b`` (reviving it when evictable)."""
        if self.ref[b] == 0:
            del self.evictable[b]
        self.ref[b] += 1

    def _new_block(self) -> int:
        if self.free_list:
            b = self.free_list.popleft()
        else:
            b, _ = self.evictable.popitem(last=False)  # the least recently freed
            del self.by_hash[self.hash_of[b]]
            self.hash_of[b] = None
            self.stats.evictions += 1
        self.ref[b] = 1
        return b

    def summary(self) -> dict[str, float | int]:
        """Counters for ``DecoderEngine.stats``."""
        s = self.stats
        return {"kv_blocks_total": self.num_blocks, "kv_block_size": self.block_size,
                "kv_blocks_used": self.num_used, "kv_blocks_cached": self.num_cached, "kv_blocks_free": self.num_free,
                "prefix_cache_queries_total": s.queries, "prefix_cache_hits_total": s.hits,
                "prefix_cache_hit_rate": s.hits / s.queries if s.queries else 0.0,
                "prefix_cache_evictions_total": s.evictions}
