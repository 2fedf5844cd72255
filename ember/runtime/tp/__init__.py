"""Tensor-parallel decoder runtime (docs/design.md §4.4): one process per rank, rank 0 schedules.

``load_tp_engine`` (called by ``ember.load`` for folders compiled with ``--tp N``) returns
an ordinary ``DecoderEngine`` whose executor is a ``TPExecutor``: same submit / generate /
stats / close. Ranks 1..N-1 are started here with ``torch.multiprocessing`` (spawn), or,
when the process was launched by ``torchrun`` (RANK/WORLD_SIZE set), ranks != 0 serve ops
inside ``load_tp_engine`` and then exit the process -- so the very same command line
(``torchrun --nproc-per-node N $(which ember) generate FOLDER ...``) runs on every rank.

torch is needed here (torch.distributed is the transport); the TP=1 runtime stays torch-free.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ember.engine_format.manifest import Manifest
from ember.errors import InputError

__all__ = ["load_tp_engine"]


def _startup_wait(store, procs, world: int, timeout_s: float) -> None:
    """Wait until every worker loaded its shard; fail naming the rank that could not."""
    from ember.runtime.tp.comm import PREFIX, RankFailure

    deadline = time.monotonic() + timeout_s
    pending = set(range(1, world))
    while pending:
        for r in sorted(pending):
            if store.check([f"{PREFIX}/ready/{r}"]):
                pending.discard(r)
            elif store.check([f"{PREFIX}/error/{r}"]):
                raise RankFailure(f"tensor-parallel rank {r} failed to start: {store.get(f'{PREFIX}/error/{r}').decode()}")
            elif procs and procs[r - 1].exitcode is not None:
                raise RankFailure(f"tensor-parallel rank {r} exited during start-up (exit code {procs[r - 1].exitcode}); "
                                  f"see its output above")
        if pending and time.monotonic() > deadline:
            raise RankFailure(f"tensor-parallel ranks {sorted(pending)} did not start within {timeout_s:.0f} s")
        if pending:
            time.sleep(0.05)


def load_tp_engine(folder: str | os.PathLike, manifest: Manifest, *, max_batch: int = 32,
                   kv_memory: int | str | None = None, max_queue: int = 1024, prefill_chunk: int | None = None,
                   threads: int | None = None, compaction: str = "min-move", device: str = "cpu",
                   timeout_s: float = 30.0, heartbeat_s: float | None = None, startup_timeout_s: float = 180.0,
                   tp: int | None = None, admit_batch: int | None = None):
    """Start the ranks of a ``--tp N`` engine folder and return rank 0's DecoderEngine.

    ``kv_memory`` is the KV budget of each rank (each holds kv_heads/N of every layer);
    ``threads`` are ONNX Runtime threads per rank (default: cores // N); ``device`` "cpu"
    (gloo) or "cuda" (rank r on cuda:r, NCCL); a collective that waits longer than
    ``timeout_s`` fails the engine with an error naming the rank at fault; idle keep-alives
    and heartbeats go every ``heartbeat_s`` (default timeout_s / 6).
    """
    import datetime

    import torch.distributed as dist
    import torch.multiprocessing as mp

    from ember.engine_format.decoder_spec import kv_geometry
    from ember.runtime.engine_builder import SchedulerOptions, make_engine, make_scheduler
    from ember.runtime.loader import load_tokenizer
    from ember.runtime.tp.comm import PREFIX, Comm
    from ember.runtime.tp.executor import TPExecutor
    from ember.engine_format.roles import PAST_KEY
    from ember.engine_format.tp_spec import rank_parts, tp_size
    from ember.runtime.tp.shard import shard_executor
    from ember.runtime.tp.worker import WorkerSpec, exit_worker, rank_device, serve_rank, spawn_main

    folder = Path(folder)
    if not (device == "cpu" or device.startswith("cuda")):
        raise InputError(f"device {device!r} is not understood; use 'cpu' or 'cuda' (rank r runs on cuda:r)")
    if device.startswith("cuda"):
        import onnxruntime as ort

        if not dist.is_nccl_available():
            raise InputError(f"device={device!r}: this torch has no NCCL; install a CUDA build of torch for GPU ranks")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(f"device={device!r}: ONNX Runtime has no CUDA provider here; `pip install onnxruntime-gpu`")
    if timeout_s <= 0:
        raise InputError(f"timeout_s={timeout_s} must be > 0")
    heartbeat_s = heartbeat_s or max(0.2, timeout_s / 6)
    world = tp_size(manifest)
    if tp is not None and tp != world:
        raise InputError(f"--tp {tp} does not match {folder}, compiled for {world} ranks; pass --tp {world} (or omit it) "
                         f"or recompile with `ember compile SOURCE --tp {tp}`")
    cfg = manifest.model["config"]
    kv = rank_parts(manifest, 0)[1].tensor(PAST_KEY, layer=0)
    rank_geometry = kv_geometry(cfg)._replace(num_kv_heads=int(kv.shape[1]))  # a rank holds its share of the kv heads
    options = SchedulerOptions(max_batch, kv_memory, max_queue, prefill_chunk, compaction, admit_batch)
    scheduler = make_scheduler(options, max_positions=int(cfg["max_positions"]), geometry=rank_geometry,
                               kv_dtype=kv.dtype, device=device)

    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ
    if torchrun:
        rank, env_world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if env_world != world:
            raise InputError(f"torchrun started {env_world} processes but {folder} was compiled with --tp {world}; "
                             f"use --nproc-per-node {world} (x nodes)")
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]) + 1
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        spec = WorkerSpec(str(folder), host, port, world, max_batch, scheduler.max_seq_len, threads, device,
                          timeout_s, heartbeat_s)
        if rank != 0:
            exit_worker(serve_rank(spec, rank, local_rank))  # this process is a worker: it never returns an engine
        store = dist.TCPStore(host, port, world, is_master=True, timeout=datetime.timedelta(seconds=startup_timeout_s),
                              wait_for_workers=False)
        procs = None
    else:
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True,
                              timeout=datetime.timedelta(seconds=startup_timeout_s), wait_for_workers=False)
        spec = WorkerSpec(str(folder), "127.0.0.1", store.port, world, max_batch, scheduler.max_seq_len, threads,
                          device, timeout_s, heartbeat_s)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=spawn_main, args=(spec, r), name=f"ember-tp-rank{r}", daemon=True)
                 for r in range(1, world)]
        for p in procs:
            p.start()
    try:
        local = shard_executor(folder, manifest, 0, world, max_batch=max_batch, max_seq_len=scheduler.max_seq_len,
                               threads=threads, device=rank_device(device, 0))
        _startup_wait(store, procs, world, startup_timeout_s)
        comm = Comm(store, 0, world, timeout_s, rank_device(device, 0), prefix=PREFIX)
        local.session.comm = comm
    except BaseException:
        for p in procs or []:
            p.terminate()
        raise
    comm.start_heartbeat(heartbeat_s)
    executor = TPExecutor(local, comm, heartbeat_s, procs)
    executor.store = store  # keep the store (and its server) alive as long as the executor
    return make_engine(manifest, scheduler, executor, load_tokenizer(folder, manifest))
