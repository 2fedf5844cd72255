"""Ranks 1..N-1 of a tensor-parallel engine: replay every op rank 0 broadcasts.

An op message is a list of ``(kind, *args)`` tuples applied in order to this rank's
``LocalExecutor`` (its KV shard + segment chain), so every rank's KV shard follows exactly
the slot moves, releases and shrinks of rank 0's:

- ``("run", start, input_ids, positions, new_lengths)``: one step over slots [start, start+B)
- ``("move", [(src, dst), ...])``, ``("release", slot)``, ``("shrink",)``: KV pool bookkeeping
- ``("ping",)``: keep-alive from an idle rank 0, answered by a control-group barrier
- ``("close",)``: leave the loop

A worker whose collective fails or times out (rank 0 gone or hung) prints an error naming
the rank at fault and exits with status 1.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to join: where the engine is and how to reach rank 0's store."""

    folder: str
    host: str
    port: int
    world: int
    max_batch: int
    max_seq_len: int
    threads: int | None
    device: str  # "cpu" or "cuda" (rank r then uses cuda:<local rank>)
    timeout_s: float
    heartbeat_s: float


def rank_device(device: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if device.startswith("cuda") else "cpu"


def apply_op(executor, op: tuple, comm):
    """Apply one op to this rank's executor; returns logits for ``run`` (rank 0), else None."""
    kind = op[0]
    if kind == "run":
        return executor.run(*op[1:])
    if kind == "move":
        executor.move(op[1])
    elif kind == "release":
        executor.release(op[1])
    elif kind == "shrink":
        executor.maybe_shrink()
    elif kind == "ping":
        comm.barrier()
    elif kind != "close":
        raise EmberError(f"internal: unknown tensor-parallel op {kind!r}")
    return None


def apply_ops(executor, msg: list[tuple], comm) -> tuple[object | None, bool]:
    """Apply one op message in order; returns (logits of the last run or None, close requested)."""
    logits = None
    for op in msg:
        out = apply_op(executor, op, comm)
        logits = out if op[0] == "run" else logits
    comm.ops_done += 1
    return logits, any(op[0] == "close" for op in msg)


def serve_rank(spec: WorkerSpec, rank: int, local_rank: int | None = None) -> int:
    """Join the engine as ``rank`` and replay ops until closed; returns the exit status."""
    import datetime

    import torch.distributed as dist

    from ember.engine_format.manifest import read_manifest
    from ember.runtime.tp.comm import PREFIX, Comm, CommError
    from ember.runtime.tp.shard import shard_executor

    store = dist.TCPStore(spec.host, spec.port, spec.world, is_master=False,
                          timeout=datetime.timedelta(seconds=max(spec.timeout_s, 60.0)), wait_for_workers=False)
    try:
        manifest = read_manifest(spec.folder)
        device = rank_device(spec.device, rank if local_rank is None else local_rank)
        executor = shard_executor(Path(spec.folder), manifest, rank, spec.world, max_batch=spec.max_batch,
                                  max_seq_len=spec.max_seq_len, threads=spec.threads, device=device)
        store.set(f"{PREFIX}/ready/{rank}", "1")
        comm = Comm(store, rank, spec.world, spec.timeout_s, device, prefix=PREFIX)
        executor.session.comm = comm
    except Exception as e:
        store.set(f"{PREFIX}/error/{rank}", f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    comm.start_heartbeat(spec.heartbeat_s)
    try:
        while True:
            try:
                msg = comm.broadcast_op()
                _, closing = apply_ops(executor, msg, comm)
            except CommError as e:  # rank 0 or a peer is gone or hung
                print(f"ember tp rank {rank}: {comm.diagnose(e, f'op {comm.ops_done}', stale_s=2 * spec.heartbeat_s)}",
                      file=sys.stderr, flush=True)
                return 1
            except Exception as e:  # the op failed before any collective, on every rank alike (e.g. InputError)
                comm.ops_done += 1
                print(f"ember tp rank {rank}: op {comm.ops_done} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                continue
            if closing:
                return 0
    finally:
        comm.close()


def spawn_main(spec: WorkerSpec, rank: int) -> None:
    """Entry point of a worker started by ``torch.multiprocessing`` (spawn)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_worker(serve_rank(spec, rank))


def exit_worker(code: int) -> None:
    """End a worker process with ``code``."""
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: destroying gloo's process groups and the store client from
    # finalizers aborts the process ("terminate called without an active exception").
    os._exit(code)
