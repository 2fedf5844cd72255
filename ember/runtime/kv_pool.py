"""The runtime-owned KV memory (docs/design.md §3.3).

One K and one V array per layer, slot-major: ``k[l]`` is ``[slots, Hkv, S_cap, D]``. The
rows of a contiguous slot range are one contiguous view, which ONNX Runtime reads without a
copy; the engine returns only the new tokens' K/V and ``write`` puts them in place. The
capacity S_cap grows geometrically (x1.5, 32-aligned) as sequences grow, so attention reads at
most about 1.5x the longest live length, and shrinks back when the long sequences are gone.
The pool owns its arrays (one buffer per layer group, in an arena reserved once for the
maximum capacity and paged in as used, so growth moves data in place instead of
reallocating); views handed out are valid until the next ``grow``/``shrink``.

Sliding-window layers (``layer_rings[l]`` = M > 0) keep only their last M positions, a ring
(``kv_ring.py``: position p at index p % M): their arrays are ``[slots, Hkv, min(S_cap, M), D]``,
so a window layer's memory stops growing at M positions. Layers with the same ring share one
buffer (a *layer group*; the full-attention layers are one group too). The ring's capacity
only changes while it is below M, and then every live sequence is shorter than it (it has
not wrapped): growth and shrink keep each slot's first entries, as for full layers.

``preallocate=True`` lays the pool out at its maximum capacity once and never resizes it: for
executors whose one-token steps read only each row's live positions (the fused decode part's
GroupQueryAttention), where a larger capacity costs memory the budget already reserved but no
decode time, and a fixed layout keeps captured CUDA graphs valid (docs/gpu.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.engine_format.decoder_spec import KVGeometry
from ember.errors import InputError
from ember.engine_format.kv_ring import held, ring_index, ring_spans

MIN_CAPACITY = 16


GROWTH = 1.5  # capacity grows by this factor, in multiples of ALIGN positions
ALIGN = 32


def _round_up(n: int, m: int = ALIGN) -> int:
    return -(-int(n) // m) * m


@dataclass
class LayerGroup:
    """Layers whose K/V share one buffer ``storage`` [len(layers), 2, slots, Hkv, capacity, D]:
    the full-attention layers (``ring`` 0) or the sliding-window layers of one ring size."""

    layers: tuple[int, ...]
    ring: int
    storage: Any = None
    capacity: int = 0
    arena: Any = None  # numpy pools: the buffer reserved for the group's maximum capacity (False: none)

    def capacity_for(self, pool_capacity: int) -> int:
        return min(pool_capacity, self.ring) if self.ring else pool_capacity


def layer_groups(num_layers: int, layer_rings: tuple[int, ...]) -> list[LayerGroup]:
    rings = tuple(layer_rings) or (0,) * num_layers
    if len(rings) != num_layers or any(r < 0 for r in rings):
        raise ValueError(f"layer_rings {layer_rings} must hold one ring size >= 0 per layer ({num_layers})")
    return [LayerGroup(tuple(l for l in range(num_layers) if rings[l] == r), r) for r in sorted(set(rings))]


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, slots: int, max_capacity: int,
                 dtype: str | np.dtype = "float32", capacity: int = MIN_CAPACITY, preallocate: bool = False,
                 layer_rings: tuple[int, ...] = ()):
        """``layer_rings``: per layer, the ring of a sliding-window layer (0: every position), as
        ``KVGeometry.layer_rings`` reads it from the manifest; empty: no rings."""
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.geometry = KVGeometry(num_layers, num_kv_heads, head_dim, tuple(layer_rings))
        self.groups = layer_groups(num_layers, self.geometry.layer_rings)
        self.preallocated = preallocate
        if preallocate:
            capacity = max_capacity
        self.slots, self.max_capacity = slots, max_capacity
        self.dtype = np.dtype(dtype)
        self.capacity = 0
        self.k: list[Any] = [None] * num_layers
        self.v: list[Any] = [None] * num_layers
        self.lengths = np.zeros(slots, dtype=np.int64)  # live tokens per slot
        self._resize(min(max_capacity, max(MIN_CAPACITY, _round_up(capacity))))

    # -- sizes -------------------------------------------------------------------------
    def slot_bytes(self, positions: int) -> int:
        """Bytes one slot takes laid out for ``positions`` positions (window layers: at most their ring)."""
        return self.geometry.slot_bytes(positions, self.dtype.itemsize)

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes(self.capacity)

    @property
    def storage(self):
        """The one buffer [L, 2, slots, Hkv, S_cap, D] of a pool without rings (see ``groups`` otherwise)."""
        if len(self.groups) != 1 or self.groups[0].ring:
            raise AttributeError("this pool keeps sliding-window layers in rings: read pool.groups[i].storage")
        return self.groups[0].storage

    def _resize(self, capacity: int, keep: int | None = None) -> None:
        """Lay the pool out at ``capacity`` positions, keeping each slot's first ``keep`` entries
        (a ring group keeps its layout when its capacity does not change)."""
        keep = self.capacity if keep is None else keep
        for g in self.groups:
            new = g.capacity_for(capacity)
            if g.storage is None or new != g.capacity:
                self._lay_out(g, new, min(keep, new, g.capacity))
                g.capacity = new
        self.capacity = capacity
        for g in self.groups:
            for j, l in enumerate(g.layers):
                self.k[l], self.v[l] = g.storage[j, 0], g.storage[j, 1]

    def _lay_out(self, g: LayerGroup, capacity: int, keep: int) -> None:
        """Give group ``g`` a buffer of ``capacity`` positions holding each slot's first ``keep``.

        The buffer is carved from an arena sized for the group's maximum capacity and
        allocated once with calloc: a resize moves each (layer, K/V, slot, head) block to its
        new offset in place, so memory already paged in is reused instead of allocating,
        page-faulting and copying a whole new pool (~0.7 s per growth at 377 MB here, a stall
        every running request would see). Positions past a slot's length hold stale finite
        values, which attention masks exactly as before.
        """
        blocks, d = 2 * len(g.layers) * self.slots * self.num_kv_heads, self.head_dim
        if g.arena is None:
            try:
                g.arena = np.zeros(blocks * g.capacity_for(self.max_capacity) * d, dtype=self.dtype)
            except MemoryError:  # no room to reserve the arena: a fresh buffer per resize
                g.arena = False
        if g.arena is False:
            buf = np.zeros(blocks * capacity * d, dtype=self.dtype)
            if g.storage is not None and keep:
                buf.reshape(blocks, capacity, d)[:, :keep] = g.storage.reshape(blocks, g.capacity, d)[:, :keep]
        else:
            buf = g.arena[:blocks * capacity * d]
            if g.storage is not None and keep:
                src = g.arena[:blocks * g.capacity * d].reshape(blocks, g.capacity, d)
                dst = buf.reshape(blocks, capacity, d)
                # growing moves blocks to higher offsets: go from the last block back (and the
                # other way when shrinking), so no block is overwritten before it has moved
                for i in (range(blocks - 1, -1, -1) if capacity > g.capacity else range(blocks)):
                    dst[i, :keep] = src[i, :keep]
        g.storage = buf.reshape(len(g.layers), 2, self.slots, self.num_kv_heads, capacity, d)

    def ensure_capacity(self, tokens: int) -> None:
        """Make room for ``tokens`` positions per slot (geometric growth; never past max_capacity)."""
        if tokens <= self.capacity:
            return
        if tokens > self.max_capacity:
            raise InputError(f"sequence of {tokens} tokens exceeds the model's maximum of {self.max_capacity}")
        self._resize(min(self.max_capacity, max(_round_up(tokens), _round_up(self.capacity * GROWTH))))

    def maybe_shrink(self) -> None:
        """Shrink to ~1.5x the longest live slot once that is under a third of the capacity."""
        longest = int(self.lengths.max())
        if self.preallocated or longest * 3 >= self.capacity or self.capacity <= MIN_CAPACITY:
            return
        target = max(MIN_CAPACITY, _round_up(longest * GROWTH))
        if target < self.capacity:
            self._resize(target, keep=longest)

    # -- access --------------------------------------------------------------------------
    def views(self, start: int, stop: int) -> list[np.ndarray]:
        """[k0, v0, k1, v1, ...] for slots [start, stop): contiguous, zero-copy views."""
        out = []
        for k, v in zip(self.k, self.v):
            out += [k[start:stop], v[start:stop]]
        return out

    def write(self, start: int, new_kv: list[np.ndarray], new_lengths: np.ndarray) -> None:
        """Append each row's first ``new_lengths[r]`` new tokens to slots start+r (0 = skip the row).

        ``new_kv`` is [k0, v0, k1, v1, ...], each [B, Hkv, T, D] as the step graph returns them.
        Ring layers store position p at index p % ring (``kv_ring.ring_spans``).
        """
        b = len(new_lengths)
        past = self.lengths[start:start + b]
        end = int((past + new_lengths).max()) if b else 0
        self.ensure_capacity(end)
        t = new_kv[0].shape[2] if new_kv else 0
        if t == 1:  # decode: one scatter per layer group, K and V, rows with new_lengths 0 skipped
            sel = np.nonzero(new_lengths)[0]
            for g in self.groups:
                new = np.stack([new_kv[2 * l + j][sel, :, 0, :] for l in g.layers for j in (0, 1)])
                new = new.reshape(len(g.layers), 2, len(sel), self.num_kv_heads, self.head_dim)
                # advanced indices on dims 2 and 4 (split by a slice) put the rows first: [n, Lg, 2, Hkv, D]
                g.storage[:, :, start + sel, :, ring_index(past[sel], g.ring), :] = new.transpose(2, 0, 1, 3, 4)
        else:
            for r in range(b):
                for g in self.groups:
                    for src, dst, n in ring_spans(int(past[r]), int(new_lengths[r]), g.ring):
                        for l in g.layers:
                            self.k[l][start + r, :, dst:dst + n] = new_kv[2 * l][r, :, src:src + n]
                            self.v[l][start + r, :, dst:dst + n] = new_kv[2 * l + 1][r, :, src:src + n]
        self.lengths[start:start + b] += new_lengths

    def advance(self, start: int, new_lengths: np.ndarray) -> None:
        """Count new tokens that a fused decode graph already wrote in place (no copy)."""
        if any(g.ring for g in self.groups):  # the fused decode part writes at the past length, never a ring index
            raise ValueError("a fused decode part cannot run on a pool with sliding-window rings; the step graph must")
        self.lengths[start:start + len(new_lengths)] += new_lengths

    def move(self, src: int, dst: int) -> None:
        """Move slot ``src``'s live entries to slot ``dst`` (compaction); ``src`` becomes empty.
        A ring's positions follow from the length, so copying its entries keeps the mapping."""
        n = int(self.lengths[src])
        for g in self.groups:
            m = held(n, g.ring)
            g.storage[:, :, dst, :, :m] = g.storage[:, :, src, :, :m]
        self.lengths[dst], self.lengths[src] = n, 0

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    @property
    def used_tokens(self) -> int:
        return int(self.lengths.sum())
