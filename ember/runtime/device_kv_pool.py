"""The KV pool in GPU memory: ``kv_pool.KVPool``'s contract on PyTorch device tensors.

One buffer ``[L, 2, slots, Hkv, S_cap, D]`` per layer group (``kv_pool.LayerGroup``: the
full-attention layers, the window layers of one ring); ``k[l]``/``v[l]`` are views with KVPool's
per-layer layout ``[slots, Hkv, S_cap, D]``, so a slot range is one contiguous view per
layer (the step graph reads it in place), while a decode's writes for every layer, a
compaction move and a growth copy are one operation each. Lengths stay on the host (the
scheduler reads them). PyTorch is the GPU path's array library; the CPU path never
imports this module.
"""
from __future__ import annotations

import numpy as np

from ember.errors import ConfigError
from ember.runtime.kv_pool import KVPool
from ember.engine_format.kv_ring import ring_index, ring_spans


def require_torch(need_cuda: bool = True):
    """PyTorch (and, with ``need_cuda``, a visible CUDA device), or a ConfigError naming the fix."""
    try:
        import torch
    except ImportError as e:
        raise ConfigError("the GPU runtime keeps its buffers in PyTorch CUDA tensors: install a CUDA build of torch "
                          "(pip install torch) or run with --device cpu") from e
    if need_cuda and not torch.cuda.is_available():
        raise ConfigError("no CUDA device is visible to PyTorch (torch.cuda.is_available() is False); "
                          "check the driver / CUDA_VISIBLE_DEVICES, or run with --device cpu")
    return torch


_TORCH_DTYPES = {"float16": "float16", "float32": "float32", "int64": "int64", "int32": "int32", "bool": "bool"}


def torch_dtype(np_name: str):
    """The torch dtype of a numpy dtype name ('float16' -> torch.float16)."""
    torch = require_torch(need_cuda=False)
    return getattr(torch, _TORCH_DTYPES[str(np.dtype(np_name))])


class KVList(list):
    """The new K/V of one step, ``[k0, v0, k1, v1, ...]``, each ``[B,Hkv,T,D]``; when the
    session wrote them into one buffer ``stacked`` ``[L, 2, B, Hkv, T, D]`` the pool appends
    them all with one scatter instead of 2L."""

    stacked = None


class DeviceKVPool(KVPool):
    """``KVPool`` in device memory (PyTorch tensors): one buffer ``[L, 2, slots, Hkv, S_cap, D]``
    per layer group (``KVPool``'s sliding-window rings included) whose ``k[l]``/``v[l]`` views
    have KVPool's per-layer layout, so a slot range is still one contiguous view per layer,
    while writes, moves and growth touch every layer of a group in one op.

    Lengths stay on the host (the scheduler reads them). Views are valid until the next
    grow/shrink, which reallocates (``generation`` counts reallocations).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, slots: int, max_capacity: int,
                 dtype: str = "float16", device_index: int = 0, capacity: int = 16, device=None,
                 preallocate: bool = False, layer_rings: tuple[int, ...] = ()):
        torch = require_torch(need_cuda=device is None)
        self.device = torch.device(device) if device is not None else torch.device("cuda", device_index)
        self.torch_dtype = torch_dtype(dtype)
        self.generation = 0
        super().__init__(num_layers, num_kv_heads, head_dim, slots, max_capacity, dtype=dtype, capacity=capacity,
                         preallocate=preallocate, layer_rings=layer_rings)
        # each group's rows of a step's stacked [L, ...] K/V (None: the group is every layer)
        self._rows = [None if len(g.layers) == num_layers else torch.tensor(g.layers, device=self.device)
                      for g in self.groups]

    def _resize(self, capacity: int, keep: int | None = None) -> None:
        super()._resize(capacity, keep)
        self.generation += 1

    def _lay_out(self, g, capacity: int, keep: int) -> None:
        torch = require_torch(need_cuda=False)
        new = torch.zeros((len(g.layers), 2, self.slots, self.num_kv_heads, capacity, self.head_dim),
                          dtype=self.torch_dtype, device=self.device)
        if g.storage is not None and keep:
            new[..., :keep, :] = g.storage[..., :keep, :]
        g.storage = new

    def write(self, start: int, new_kv: list, new_lengths: np.ndarray) -> None:
        """Append each row's first ``new_lengths[r]`` new tokens (device tensors [B,Hkv,T,D])."""
        torch = require_torch(need_cuda=False)
        b = len(new_lengths)
        past = self.lengths[start:start + b]
        end = int((past + new_lengths).max()) if b else 0
        self.ensure_capacity(end)
        stacked = getattr(new_kv, "stacked", None)
        if stacked is None:  # [L, 2, B, Hkv, T, D] from a plain list (one copy)
            stacked = torch.stack([torch.stack(new_kv[2 * l:2 * l + 2]) for l in range(self.num_layers)])
        t = stacked.shape[4]
        live = np.flatnonzero(new_lengths > 0)
        for g, rows in zip(self.groups, self._rows):
            mine = stacked if rows is None else stacked[rows]  # [Lg, 2, B, Hkv, T, D]
            if t == 1 and len(live):  # decode: one scatter for the group, K and V, of the live rows
                at = ring_index(past[live], g.ring)
                idx = torch.from_numpy(np.stack([live, start + live, at]).astype(np.int64)).to(self.device)
                src = mine[:, :, :, :, 0, :] if len(live) == b else mine[:, :, idx[0], :, 0, :]
                # advanced indices on dims 2 and 4 (split by a slice) put the rows first: [n, Lg, 2, Hkv, D]
                g.storage[:, :, idx[1], :, idx[2], :] = src.permute(2, 0, 1, 3, 4)
            elif t > 1:
                for r in live:
                    for src, dst, n in ring_spans(int(past[r]), int(new_lengths[r]), g.ring):
                        g.storage[:, :, start + r, :, dst:dst + n] = mine[:, :, r, :, src:src + n]
        self.lengths[start:start + b] += new_lengths
