"""The step executor: runs one step-graph call over a slot range of the KV pool.

It is the seam between the engine loop and the hardware: the engine decides what to run
(from the scheduler's plan), the executor runs it and keeps the KV memory. The local
executor drives one session + one pool; a tensor-parallel executor can drive N ranks
behind the same methods (the ``Executor`` protocol, ``executor_protocol.py``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np

from ember.ort.decode_session import decode_positions_ok
from ember.ort.session import StepSession
from ember.runtime.executor_protocol import Executor
from ember.runtime.kv_pool import KVPool


def step_on_pool(pool, session, decode, start: int, input_ids: np.ndarray, positions: np.ndarray,
                 new_lengths: np.ndarray, before_run: Callable[[], None] | None = None,
                 rope_long: np.ndarray | None = None):
    """One step over ``pool`` slots [start, start+B), the one home of a step's KV bookkeeping
    (CPU and GPU executors): through the fused ``decode`` session when given (it writes each
    row's K/V in place at its past length; the pool only counts the tokens), else through the
    step ``session`` with the new K/V written into the pool. ``before_run`` runs once the
    capacity is settled (the GPU executor drops CUDA graphs a reallocation made stale).
    ``rope_long``: LongRoPE's per-row factor choice (int64 [B]; a LongRoPE step graph only, which
    never has a fused decode part). Returns the session's logits [B,V]."""
    stop = start + len(new_lengths)
    past = pool.lengths[start:stop].copy()
    # the fused decode writes every row's token (kept or not) at its past length: room for one more
    pool.ensure_capacity(int((past + (1 if decode is not None else new_lengths)).max()))
    if before_run is not None:
        before_run()
    if decode is not None:
        logits = decode.run(input_ids, past, pool.views(start, stop))
        pool.advance(start, new_lengths)
        return logits
    run_lengths = np.maximum(new_lengths, 1)  # a skipped row still needs one valid query
    kw = {} if rope_long is None else {"rope_long": rope_long}
    logits, new_kv = session.run(input_ids, positions, past, run_lengths, pool.views(start, stop), **kw)
    pool.write(start, new_kv, new_lengths)
    return logits


class DoneStep:
    """A step whose result is already on the host (what a synchronous executor returns from
    ``launch_greedy``); a GPU executor returns a pending step with the same ``result``
    (``executor_protocol.PendingStep``)."""

    def __init__(self, greedy: np.ndarray, rows: np.ndarray):
        self._result = (greedy, rows)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self._result


class HostGreedy:
    """``launch_greedy`` for an executor whose steps run on the host to completion (CPU,
    tensor parallel): the step runs in ``launch_greedy``, the full logits from ``run`` are
    reduced here, and the result is already there. Such an executor cannot chain: the tokens
    a chained step would read exist only once the previous step has been waited on."""

    supports_chaining = False

    def stats(self) -> dict[str, Any]:
        return {}

    def launch_greedy(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray,
                      logit_rows: np.ndarray | list[int] = (), chain=None, rope_long: np.ndarray | None = None
                      ) -> DoneStep:
        if chain is not None:
            raise ValueError(f"{type(self).__name__} cannot chain steps (supports_chaining is False)")
        kw = {} if rope_long is None else {"rope_long": rope_long}  # only a LongRoPE model's executor takes it
        logits = self.run(start, input_ids, positions, new_lengths, **kw)
        return DoneStep(logits.argmax(axis=1), logits[np.asarray(logit_rows, dtype=np.int64)])


def run_greedy(executor: Executor, start: int, input_ids: np.ndarray, positions: np.ndarray,
               new_lengths: np.ndarray, logit_rows: np.ndarray | list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """``executor.launch_greedy`` run to completion: (greedy tokens [B], logits of ``logit_rows``)."""
    return executor.launch_greedy(start, input_ids, positions, new_lengths, logit_rows).result()


class PoolSlots:
    """The pool bookkeeping of an executor that owns a slot pool (``self.pool``): the
    ``Executor`` protocol's ``release``, ``maybe_shrink``, ``used_tokens`` and ``close``.
    ``lock``: held around the shrink (a device executor's session lock; none on the host)."""

    lock = contextlib.nullcontext()

    def stats(self) -> dict[str, Any]:
        return {}

    def release(self, slot: int) -> None:
        self.pool.release(slot)

    def maybe_shrink(self) -> None:
        with self.lock:
            self.pool.maybe_shrink()

    @property
    def used_tokens(self) -> int:
        return self.pool.used_tokens

    def close(self) -> None:
        pass


class LocalExecutor(PoolSlots, HostGreedy):
    """``decode``: an optional fused decode session (``decode_session.DecodeSession``) that
    runs one-token calls and writes their K/V in place; everything else runs the step graph."""

    def __init__(self, session: StepSession, pool: KVPool, decode=None):
        self.session, self.pool, self.decode = session, pool, decode

    def move(self, moves: list[tuple[int, int]]) -> None:
        for src, dst in moves:
            self.pool.move(src, dst)

    def run(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray,
            rope_long: np.ndarray | None = None) -> np.ndarray:
        """Run slots [start, start+B) with new tokens ``input_ids`` [B,T]; rows with
        ``new_lengths`` 0 are computed but their K/V is not kept. ``rope_long``: see
        ``step_on_pool``. Returns logits [B,V]."""
        decode = self.decode if self.decode is not None and decode_positions_ok(
            positions, self.pool.lengths[start:start + len(new_lengths)], new_lengths) else None
        return step_on_pool(self.pool, self.session, decode, start, input_ids, positions, new_lengths,
                            rope_long=rope_long)

