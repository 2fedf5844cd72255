"""The step executor: runs one step-graph call over a slot range of the KV pool.

It is the seam between the engine loop and the hardware: the engine decides what to run
(from the scheduler's plan), the executor runs it and keeps the KV memory. The local
executor drives one session + one pool; a tensor-parallel executor can drive N ranks
behind the same four methods.
"""
from __future__ import annotations

import numpy as np

from ember.runtime.decode_session import decode_positions_ok
from ember.runtime.kv_pool import KVPool
from ember.runtime.session import StepSession


class LocalExecutor:
    """``decode``: an optional fused decode session (``decode_session.DecodeSession``) that
    runs one-token calls and writes their K/V in place; everything else runs the step graph."""

    def __init__(self, session: StepSession, pool: KVPool, decode=None):
        self.session, self.pool, self.decode = session, pool, decode

    def move(self, moves: list[tuple[int, int]]) -> None:
        for src, dst in moves:
            self.pool.move(src, dst)

    def run(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray) -> np.ndarray:
        """Run slots [start, start+B) with new tokens ``input_ids`` [B,T]; rows with
        ``new_lengths`` 0 are computed but their K/V is not kept. Returns logits [B,V]."""
        b, t = input_ids.shape
        stop = start + b
        past = self.pool.lengths[start:stop].copy()
        if self.decode is not None and decode_positions_ok(positions, past, new_lengths):
            # every row (kept or not) gets its token written at its past length: room for one more
            self.pool.ensure_capacity(int(past.max()) + 1)
            logits = self.decode.run(input_ids, past, self.pool.views(start, stop))
            self.pool.advance(start, new_lengths)
            return logits
        self.pool.ensure_capacity(int((past + new_lengths).max()))
        run_lengths = np.maximum(new_lengths, 1)  # a skipped row still needs one valid query
        logits, new_kv = self.session.run(input_ids, positions, past, run_lengths, self.pool.views(start, stop))
        self.pool.write(start, new_kv, new_lengths)
        return logits

    def release(self, slot: int) -> None:
        self.pool.release(slot)

    def maybe_shrink(self) -> None:
        self.pool.maybe_shrink()

    @property
    def used_tokens(self) -> int:
        return self.pool.used_tokens

    def close(self) -> None:
        pass
