"""``HostPagedExecutor``: the step graph over a paged KV pool on the host (``kv_layout="paged"``
on the CPU; implements ``executor_protocol.PagedExecutor``, docs/kv.md).

Per layer one K and one V array ``[num_blocks, Hkv, block_size, D]`` (head-major inside a
block, so the gather copies whole block_size x D runs; the paged step graph's PagedAttention
keeps ``[num_blocks, block_size, Hkv, D]``, ``cuda_paged.py``'s own business). A step gathers each row's past blocks into the contiguous
``[B, Hkv, P, D]`` past the step graph takes (P = the longest past, rounded up to whole
blocks; positions past a row's length are masked by the graph), runs it, and scatters the
new tokens' K/V into the rows' blocks. The gather copies every row's past once per step:
the price of running the unchanged step graph (into one reused buffer, so the host holds the
live past twice); a CUDA executor reads the blocks in place.
Sliding-window layers (``kv_rings``) are refused: their ring layout is per slot.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ember.engine_format.decoder_spec import KVGeometry
from ember.runtime.executor import DoneStep
from ember.runtime.kv_blocks import refuse_rings


class HostPagedExecutor:
    """``session``: a ``StepSession`` (or one with its ``run``); it owns the block pool."""

    supports_chaining = False
    mixed_steps = False  # the step graph computes padding: decode rows are not padded to a prefill chunk

    def __init__(self, session, geometry: KVGeometry, num_blocks: int, block_size: int, dtype: str | np.dtype):
        refuse_rings(geometry)
        self.session, self.num_blocks, self.block_size = session, num_blocks, block_size
        shape = (num_blocks, geometry.num_kv_heads, block_size, geometry.head_dim)
        # np.zeros maps pages lazily: blocks never used cost no memory
        self.k = [np.zeros(shape, dtype=dtype) for _ in range(geometry.num_layers)]
        self.v = [np.zeros(shape, dtype=dtype) for _ in range(geometry.num_layers)]
        self._arena = np.empty(0, dtype=dtype)  # the gathered past, reused across steps

    def launch_paged(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray,
                     new_lengths: np.ndarray, block_tables: np.ndarray, logit_rows=()) -> DoneStep:
        logits = self.run_paged(input_ids, positions, past_lengths, new_lengths, block_tables)
        return DoneStep(logits.argmax(axis=1), logits[np.asarray(logit_rows, dtype=np.int64)])

    def run_paged(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray,
                  new_lengths: np.ndarray, block_tables: np.ndarray) -> np.ndarray:
        """One step (``PagedExecutor.launch_paged``'s arguments); returns logits [B,V] float32."""
        past_lengths = np.asarray(past_lengths, dtype=np.int64)
        new_lengths = np.asarray(new_lengths, dtype=np.int64)
        past_blocks = max(1, -(-int(past_lengths.max()) // self.block_size))
        tables = np.maximum(np.asarray(block_tables, dtype=np.int64), 0)  # -1 (unmapped) reads block 0, masked
        kv = self._past_buffers(len(tables), past_blocks * self.block_size)
        for l, (k, v) in enumerate(zip(self.k, self.v)):
            self._gather(k, tables[:, :past_blocks], kv[2 * l])
            self._gather(v, tables[:, :past_blocks], kv[2 * l + 1])
        logits, new_kv = self.session.run(input_ids, positions, past_lengths, new_lengths, kv)
        self._scatter(new_kv, tables, past_lengths, new_lengths)
        return logits

    def _past_buffers(self, rows: int, positions: int) -> list[np.ndarray]:
        """2L contiguous [rows, Hkv, positions, D] views of one reused arena (grown x1.5 as
        needed): fresh buffers every step would page-fault the whole past in again (measured
        ~3x the copy itself at batch 16)."""
        _, h, _, d = self.k[0].shape
        each = rows * h * positions * d
        if self._arena.size < 2 * len(self.k) * each:
            self._arena = np.empty(int(2 * len(self.k) * each * 1.5), dtype=self.k[0].dtype)
        return [self._arena[i * each:(i + 1) * each].reshape(rows, h, positions, d) for i in range(2 * len(self.k))]

    def _gather(self, pool: np.ndarray, tables: np.ndarray, out: np.ndarray) -> None:
        """``out`` [B, Hkv, M*block_size, D] <- the rows' first M blocks: one copy of whole
        (block, head) runs of block_size x D values."""
        b, m = tables.shape
        nb, h, bs, d = pool.shape
        runs = (tables[:, None, :] * h + np.arange(h)[None, :, None]).reshape(-1)  # [B, Hkv, M] -> (block, head)
        np.take(pool.reshape(nb * h, bs * d), runs, axis=0, out=out.reshape(-1, bs * d))

    def _scatter(self, new_kv: list[np.ndarray], tables: np.ndarray, past: np.ndarray, new: np.ndarray) -> None:
        """Write row r's first new[r] tokens of ``new_kv`` (2L arrays [B, Hkv, T, D]) at positions past[r]..."""
        row = np.repeat(np.arange(len(new)), new)
        t = np.arange(len(row)) - np.repeat(np.cumsum(new) - new, new)  # token index within its row
        pos = past[row] + t
        block, offset = tables[row, pos // self.block_size], pos % self.block_size
        for l, (k, v) in enumerate(zip(self.k, self.v)):
            k[block, :, offset] = new_kv[2 * l][row, :, t, :]
            v[block, :, offset] = new_kv[2 * l + 1][row, :, t, :]

    def maybe_shrink(self) -> None:
        """Nothing to give back: the pool is sized once (untouched blocks were never paged in)."""

    def stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)
