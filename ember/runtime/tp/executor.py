"""Rank 0's tensor-parallel executor: the ``Executor`` protocol, replicated to N ranks.

The engine loop (``DecoderEngine``) and its scheduler run in rank 0's process only. Every
executor call becomes an op broadcast to the other ranks before rank 0 runs it itself, so
all ranks run the same batch and every KV shard follows the same slot moves. Bookkeeping
ops (move, release, shrink) are queued and sent with the next ``run`` (one broadcast per
step call). While the engine is idle, a keep-alive thread sends a ``ping`` every
``heartbeat_s`` so idle workers do not time out and a dead worker is noticed.

After a rank fails, every call raises the same ``RankFailure`` (naming the rank): requests
in flight finish with FinishReason.ERROR and that message; the engine must be restarted.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from ember.runtime.executor import HostGreedy
from ember.runtime.tp.comm import Comm, CommError, RankFailure


class TPExecutor(HostGreedy):
    """The ``Executor`` protocol over N ranks; steps run to completion (``HostGreedy``: no chaining)."""

    def __init__(self, local, comm: Comm, heartbeat_s: float, procs: list | None = None):
        """``local``: rank 0's LocalExecutor over its shard; ``procs``: spawned workers
        (index r-1 is rank r), None when launched by torchrun."""
        self.local, self.comm, self.heartbeat_s = local, comm, heartbeat_s
        self.procs = procs
        self._lock = threading.Lock()
        self._pending: list[tuple] = []
        self._last_sent = time.monotonic()
        self.failure: RankFailure | None = None
        self._closed = False
        self._stop = threading.Event()
        self._keepalive = threading.Thread(target=self._keepalive_loop, name="ember-tp-keepalive", daemon=True)
        self._keepalive.start()

    # -- the executor interface (see ember.runtime.executor.LocalExecutor) -------------------
    def move(self, moves: list[tuple[int, int]]) -> None:
        self._book(("move", list(moves)))

    def release(self, slot: int) -> None:
        self._book(("release", int(slot)))

    def maybe_shrink(self) -> None:
        self._book(("shrink",))

    def _book(self, op: tuple) -> None:
        """Apply a bookkeeping op to rank 0's shard now; the others get it with the next message
        (before that message's run), so every shard sees the same order of ops."""
        from ember.runtime.tp.worker import apply_op

        with self._lock:
            apply_op(self.local, op, self.comm)
            self._pending.append(op)

    def run(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray) -> np.ndarray:
        """Same contract as LocalExecutor.run; returns the full logits [B, V]."""
        with self._lock:
            logits = self._send([("run", int(start), input_ids, positions, np.asarray(new_lengths, dtype=np.int64))])
        assert logits is not None
        return logits

    @property
    def used_tokens(self) -> int:
        return self.local.used_tokens

    # -- internals --------------------------------------------------------------------------------
    def _send(self, ops: list[tuple]):
        """Broadcast pending + ``ops`` and apply them here (caller holds the lock)."""
        from ember.runtime.tp.worker import apply_ops

        if self.failure is not None:
            raise self.failure
        msg, self._pending = self._pending + ops, []
        try:
            self.comm.broadcast_op(msg)
            logits, _ = apply_ops(self.local, ops, self.comm)  # rank 0 applied the pending ones already
        except CommError as e:
            self.failure = self.comm.diagnose(e, f"step (op {self.comm.ops_done})", stale_s=2 * self.heartbeat_s,
                                              exit_codes=self._exit_codes())
            raise self.failure from e
        except Exception:
            # Failed before any collective (e.g. InputError from the KV pool): every rank failed the
            # same way on the same state, so the ranks stay in step; the engine fails this plan only.
            self.comm.ops_done += 1
            raise
        finally:
            self._last_sent = time.monotonic()
        return logits

    def _exit_codes(self) -> dict[int, int | None]:
        if not self.procs:
            return {}
        deadline = time.monotonic() + min(2.0, self.heartbeat_s * 2)
        codes = {}
        for r, p in enumerate(self.procs, start=1):  # a killed worker needs a moment to be reaped
            p.join(max(0.0, deadline - time.monotonic()))
            codes[r] = p.exitcode
        return codes

    def _keepalive_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s / 2):
            if time.monotonic() - self._last_sent < self.heartbeat_s:
                continue
            with self._lock:
                if self._closed or self.failure is not None:
                    return
                if time.monotonic() - self._last_sent < self.heartbeat_s:
                    continue
                try:
                    self._send([("ping",)])
                except RankFailure:
                    return

    def comm_stats(self) -> dict:
        """Rank 0's time in collectives (seconds, counts) since load or the last reset."""
        return self.comm.stats.to_dict()

    def reset_comm_stats(self) -> None:
        from ember.runtime.tp.comm import CommStats

        self.comm.stats = CommStats()

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs or []]

    def close(self) -> None:
        """Tell the workers to exit, wait for them (terminating stragglers). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            if self.failure is None:
                try:
                    self.comm.broadcast_op(self._pending + [("close",)])
                except Exception:
                    pass
        for p in self.procs or []:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self.comm.close()
