"""The runtime-owned KV memory (DESIGN §3).

One K and one V array per layer, slot-major: ``k[l]`` is ``[slots, Hkv, S_cap, D]``. The
rows of a contiguous slot range are one contiguous view, which ONNX Runtime reads without a
copy; the engine returns only the new tokens' K/V and ``write`` puts them in place. The
capacity S_cap grows geometrically (x1.5, 32-aligned) as sequences grow, so attention reads at
most about 1.5x the longest live length, and shrinks back when the long sequences are gone.
The pool owns its arrays; views handed out are valid until the next ``grow``/``shrink``.
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
                 dtype: str | np.dtype = "float32", capacity: int = MIN_CAPACITY):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.slots, self.max_capacity = slots, max_capacity
        self.dtype = np.dtype(dtype)
        self.capacity = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.lengths = np.zeros(slots, dtype=np.int64)  # live tokens per slot
        self._resize(min(max_capacity, max(MIN_CAPACITY, _round_up(capacity))))

    # -- sizes -------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token * self.slots * self.capacity

    def _resize(self, capacity: int, keep: int | None = None) -> None:
        keep = self.capacity if keep is None else keep
        keep = min(keep, capacity, self.capacity)
        shape = (self.slots, self.num_kv_heads, capacity, self.head_dim)
        new_k, new_v = [], []
        for arrays, new in ((self.k, new_k), (self.v, new_v)):
            for old in arrays or [None] * self.num_layers:
                a = np.zeros(shape, dtype=self.dtype)
                if old is not None and keep:
                    a[:, :, :keep] = old[:, :, :keep]
                new.append(a)
        self.k, self.v, self.capacity = new_k, new_v, capacity

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
        if longest * 3 >= self.capacity or self.capacity <= MIN_CAPACITY:
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
        if t == 1:  # decode: one vectorised scatter per array, rows with new_lengths 0 skipped
            sel = np.nonzero(new_lengths)[0]
            rows, pos = start + sel, past[sel]
            for l in range(self.num_layers):
                self.k[l][rows, :, pos, :] = new_kv[2 * l][sel, :, 0, :]
                self.v[l][rows, :, pos, :] = new_kv[2 * l + 1][sel, :, 0, :]
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
        for arrays in (self.k, self.v):
            for a in arrays:
                a[dst, :, :n] = a[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    @property
    def used_tokens(self) -> int:
        return int(self.lengths.sum())
