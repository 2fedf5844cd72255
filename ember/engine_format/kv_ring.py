"""Where a position's K/V lives in a layer's KV storage: the one home of the ring index math.

A full-attention layer keeps position p of a sequence at index p. A sliding-window layer
keeps only its last ``ring`` positions (``ring`` >= the window, recorded per layer in the
manifest's ``model.config.kv_rings``): position p lives at index ``p % ring``, so a
sequence of length L holds positions max(0, L - ring) .. L - 1 in its first
``held(L, ring)`` entries. The step graph reads them back with the inverse mapping
(``window_biases`` in ``ember/export/step_attention.py``). ``ring`` 0 means no ring: the
formulas below then reduce to the full layout.
"""
from __future__ import annotations

import numpy as np


def held(length: int, ring: int) -> int:
    """How many entries of a slot hold live positions for a sequence of ``length`` tokens."""
    return min(length, ring) if ring else length


def ring_index(positions: np.ndarray | int, ring: int) -> np.ndarray | int:
    """The storage index of each position (numpy arrays or ints)."""
    return positions % ring if ring else positions


def ring_spans(past: int, n: int, ring: int) -> list[tuple[int, int, int]]:
    """Contiguous copies that store ``n`` new tokens at positions past .. past+n-1:
    ``(first new token, first storage index, count)``. With ``n`` > ``ring`` only the last
    ``ring`` tokens are stored (the earlier ones would be overwritten in the same write)."""
    if not n:
        return []
    if not ring:
        return [(0, past, n)]
    skip = max(0, n - ring)
    first, count = (past + skip) % ring, n - skip
    head = min(count, ring - first)
    return [(skip, first, head)] + ([(skip + head, 0, count - head)] if count > head else [])
