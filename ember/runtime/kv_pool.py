"""The runtime-owned KV memory (docs/design.md §3.3).

One K and one V array per layer, slot-major: ``k[l]`` is ``[slots, Hkv, S_cap, D]``. The
rows of a contiguous slot range are one contiguous view, which ONNX Runtime reads without a
copy; the engine returns only the new tokens' K/V and ``write`` puts them in place. The
capacity S_cap grows geometrically (x1.5, 32-aligned) as sequences grow, so attention reads at
most about 1.5x the longest live length, and shrinks back when the long sequences are gone.
The pool owns its arrays (one buffer for every layer, in an arena reserved once for the
maximum capacity and paged in as used, so growth moves data in place instead of
reallocating); views handed out are valid until the next ``grow``/``shrink``.

``preallocate=True`` lays the pool out at its maximum capacity once and never resizes it: for
executors whose one-token steps read only each row's live positions (the fused decode part's
GroupQueryAttention), where a larger capacity costs memory the budget already reserved but no
decode time, and a fixed layout keeps captured CUDA graphs valid (docs/gpu.md).
"""
from __future__ import annotations

import numpy as np

from ember.errors import InputError

MIN_CAPACITY = 16


GROWTH = 1.5  # capacity grows by this factor, in multiples of ALIGN positions
ALIGN = 32


def _round_up(n: int, m: int = ALIGN) -> int:
    return -(-int(n) // m) * m


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, slots: int, max_capacity: int,
                 dtype: str | np.dtype = "float32", capacity: int = MIN_CAPACITY, preallocate: bool = False):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.preallocated = preallocate
        if preallocate:
            capacity = max_capacity
        self.slots, self.max_capacity = slots, max_capacity
        self.dtype = np.dtype(dtype)
        self.capacity = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.lengths = np.zeros(slots, dtype=np.int64)  # live tokens per slot
        self.storage: np.ndarray | None = None
        self._arena = None
        self._resize(min(max_capacity, max(MIN_CAPACITY, _round_up(capacity))))

    # -- sizes -------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.slots * self.capacity

    def _resize(self, capacity: int, keep: int | None = None) -> None:
        """Lay the pool out at ``capacity`` positions, keeping each slot's first ``keep``.

        All layers live in one buffer ``storage`` [L, 2, slots, Hkv, S_cap, D] (``k[l]``/``v[l]``
        are contiguous views of it), carved from an arena sized for ``max_capacity`` and
        allocated once with calloc: a resize moves each (layer, K/V, slot, head) block to its
        new offset in place, so memory already paged in is reused instead of allocating,
        page-faulting and copying a whole new pool (~0.7 s per growth at 377 MB here, a stall
        every running request would see). Positions past a slot's length hold stale finite
        values, which attention masks exactly as before.
        """
        keep = self.capacity if keep is None else keep
        keep = min(keep, capacity, self.capacity)
        blocks, d = 2 * self.num_layers * self.slots * self.num_kv_heads, self.head_dim
        if self._arena is None:
            try:
                self._arena = np.zeros(blocks * self.max_capacity * d, dtype=self.dtype)
            except MemoryError:  # no room to reserve the arena: a fresh buffer per resize
                self._arena = False
        if self._arena is False:
            buf = np.zeros(blocks * capacity * d, dtype=self.dtype)
            old = None if self.storage is None else self.storage.reshape(blocks, self.capacity, d)
            if old is not None and keep:
                buf.reshape(blocks, capacity, d)[:, :keep] = old[:, :keep]
        else:
            buf = self._arena[:blocks * capacity * d]
            if self.storage is not None and keep:
                src = self._arena[:blocks * self.capacity * d].reshape(blocks, self.capacity, d)
                dst = buf.reshape(blocks, capacity, d)
                # growing moves blocks to higher offsets: go from the last block back (and the
                # other way when shrinking), so no block is overwritten before it has moved
                for i in (range(blocks - 1, -1, -1) if capacity > self.capacity else range(blocks)):
                    dst[i, :keep] = src[i, :keep]
        self.storage = buf.reshape(self.num_layers, 2, self.slots, self.num_kv_heads, capacity, d)
        self.k = [self.storage[l, 0] for l in range(self.num_layers)]
        self.v = [self.storage[l, 1] for l in range(self.num_layers)]
        self.capacity = capacity

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
        """
        b = len(new_lengths)
        past = self.lengths[start:start + b]
        end = int((past + new_lengths).max()) if b else 0
        self.ensure_capacity(end)
        t = new_kv[0].shape[2] if new_kv else 0
        if t == 1:  # decode: one scatter for every layer, K and V, rows with new_lengths 0 skipped
            sel = np.nonzero(new_lengths)[0]
            new = np.stack([a[sel, :, 0, :] for a in new_kv])  # [2L, n, Hkv, D]
            new = new.reshape(self.num_layers, 2, len(sel), self.num_kv_heads, self.head_dim)
            # advanced indices on dims 2 and 4 (split by a slice) put the rows first: [n, L, 2, Hkv, D]
            self.storage[:, :, start + sel, :, past[sel], :] = new.transpose(2, 0, 1, 3, 4)
        else:
            for r in range(b):
                n, p = int(new_lengths[r]), int(past[r])
                for l in range(self.num_layers):
                    self.k[l][start + r, :, p:p + n] = new_kv[2 * l][r, :, :n]
                    self.v[l][start + r, :, p:p + n] = new_kv[2 * l + 1][r, :, :n]
        self.lengths[start:start + b] += new_lengths

    def advance(self, start: int, new_lengths: np.ndarray) -> None:
        """Count new tokens that a fused decode graph already wrote in place (no copy)."""
        self.lengths[start:start + len(new_lengths)] += new_lengths

    def move(self, src: int, dst: int) -> None:
        """Move slot ``src``'s live tokens to slot ``dst`` (compaction); ``src`` becomes empty."""
        n = int(self.lengths[src])
        self.storage[:, :, dst, :, :n] = self.storage[:, :, src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    @property
    def used_tokens(self) -> int:
        return int(self.lengths.sum())
