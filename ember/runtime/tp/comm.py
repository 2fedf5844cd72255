"""The transport between tensor-parallel ranks: torch.distributed process groups over numpy.

torch is the transport here, and only here on the run path: ``torch.distributed`` gives
gloo (CPU) and NCCL (GPU) collectives. Process groups are built directly from a TCPStore
(no ``init_process_group`` global), so one process may hold several TP engines in turn.

- control plane (``broadcast_op``): always gloo, rank 0 -> all, a fixed 16 KiB buffer whose
  first 8 bytes are the payload length (longer payloads follow in a second broadcast).
- data plane (``all_reduce``, ``gather_to_first``): gloo on CPU, NCCL when ``device`` is
  ``cuda:N`` (tensors are staged to the GPU; ORT-CUDA IOBinding would keep them there).

Every collective waits at most ``timeout_s``; on failure ``diagnose`` names the rank at
fault from the heartbeats the ranks publish in the store (``hb/<rank>`` = "<ops> <time>").
"""
from __future__ import annotations

import datetime
import pickle
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ember.errors import EmberError

OP_BUFFER = 16 << 10
PREFIX = "ember-tp"  # store keys: <PREFIX>/ready/<r>, <PREFIX>/error/<r>, <PREFIX>/hb/<r>


class CommError(RuntimeError):
    """A collective failed or timed out (the transport's own error is chained)."""


class RankFailure(EmberError):
    """A tensor-parallel rank died, hung, or could not be reached; the message names it."""


@dataclass
class CommStats:
    all_reduce_s: float = 0.0
    all_reduces: int = 0
    gather_s: float = 0.0
    gathers: int = 0
    broadcast_s: float = 0.0
    broadcasts: int = 0

    def to_dict(self) -> dict:
        return {"all_reduce_s": self.all_reduce_s, "all_reduces": self.all_reduces, "gather_s": self.gather_s,
                "gathers": self.gathers, "broadcast_s": self.broadcast_s, "broadcasts": self.broadcasts}


class Comm:
    """Collectives of one rank. ``store`` is a connected ``torch.distributed.Store``."""

    def __init__(self, store: dist.Store, rank: int, world: int, timeout_s: float, device: str = "cpu",
                 prefix: str = PREFIX):
        self.rank, self.world, self.timeout_s, self.device = rank, world, timeout_s, device
        self.store = store
        self.prefix = prefix
        timeout = datetime.timedelta(seconds=timeout_s)
        self.solo = world == 1  # a --tp 1 segmented engine (measures segmentation alone): no collectives
        self.ctrl = None if self.solo else dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}/ctrl", store), rank, world, timeout)
        if self.solo:
            self.data = None
        elif device.startswith("cuda"):
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore(f"{prefix}/data", store), rank, world, opts)
        else:
            self.data = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}/data", store), rank, world, timeout)
        self._buf = torch.zeros(OP_BUFFER, dtype=torch.uint8)
        self.stats = CommStats()
        self.ops_done = 0  # ops this rank completed (published by the heartbeat)
        self._hb_stop = threading.Event()
        self._hb: threading.Thread | None = None

    # -- data plane ------------------------------------------------------------------------------
    def _wait(self, work) -> None:
        try:
            work.wait(datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:  # gloo/NCCL raise RuntimeError subclasses of their own
            raise CommError(str(e)) from e

    def all_reduce(self, a: np.ndarray) -> np.ndarray:
        """Sum ``a`` over ranks, in place where possible; returns the summed array."""
        if self.solo:
            return a
        t0 = time.perf_counter()
        a = np.ascontiguousarray(a)
        t = torch.from_numpy(a)
        if self.device.startswith("cuda"):
            g = t.to(self.device)
            self._wait(self.data.allreduce([g]))
            a = g.cpu().numpy()
        else:
            self._wait(self.data.allreduce([t]))
        self.stats.all_reduce_s += time.perf_counter() - t0
        self.stats.all_reduces += 1
        return a

    def gather_to_first(self, a: np.ndarray) -> list[np.ndarray] | None:
        """Every rank's ``a`` (same shape) on rank 0, in rank order; None on other ranks."""
        if self.solo:
            return [a]
        t0 = time.perf_counter()
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.device.startswith("cuda"):
            t = t.to(self.device)
        outs = [[torch.empty_like(t) for _ in range(self.world)]] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        self._wait(self.data.gather(outs, [t], opts))
        self.stats.gather_s += time.perf_counter() - t0
        self.stats.gathers += 1
        return [o.cpu().numpy() for o in outs[0]] if self.rank == 0 else None

    # -- control plane ---------------------------------------------------------------------------
    def broadcast_op(self, op: object | None = None) -> object:
        """Rank 0 sends ``op`` (any picklable object); every rank returns it."""
        if self.solo:
            return op
        t0 = time.perf_counter()
        buf = self._buf
        if self.rank == 0:
            payload = pickle.dumps(op, protocol=pickle.HIGHEST_PROTOCOL)
            n = len(payload)
            head = np.frombuffer(np.int64(n).tobytes() + payload[: OP_BUFFER - 8], dtype=np.uint8)
            buf[: len(head)] = torch.from_numpy(head.copy())
        self._wait(self.ctrl.broadcast(buf, 0))
        n = int(buf[:8].numpy().view(np.int64)[0])
        if n > OP_BUFFER - 8:
            rest = torch.zeros(n - (OP_BUFFER - 8), dtype=torch.uint8)
            if self.rank == 0:
                rest[:] = torch.from_numpy(np.frombuffer(payload[OP_BUFFER - 8:], dtype=np.uint8).copy())
            self._wait(self.ctrl.broadcast(rest, 0))
            data = bytes(buf[8:].numpy()) + bytes(rest.numpy())
        else:
            data = bytes(buf[8: 8 + n].numpy())
        self.stats.broadcast_s += time.perf_counter() - t0
        self.stats.broadcasts += 1
        return op if self.rank == 0 else pickle.loads(data)

    def barrier(self) -> None:
        """A one-element all-reduce on the control group: proves every rank is alive."""
        if not self.solo:
            self._wait(self.ctrl.allreduce([torch.zeros(1)]))

    # -- liveness ----------------------------------------------------------------------------------
    def start_heartbeat(self, interval_s: float) -> None:
        """Publish ``hb/<rank>`` = "<ops_done> <unix time>" every ``interval_s`` from a thread."""
        def beat() -> None:
            while not self._hb_stop.is_set():
                try:
                    self.store.set(f"{self.prefix}/hb/{self.rank}", f"{self.ops_done} {time.time():.3f}")
                except Exception:  # the store (rank 0) is gone: the main thread will time out and report it
                    return
                self._hb_stop.wait(interval_s)

        self._hb = threading.Thread(target=beat, name=f"ember-tp-heartbeat-{self.rank}", daemon=True)
        self._hb.start()

    def heartbeats(self) -> dict[int, tuple[int, float]]:
        """{rank: (ops_done, unix time of the beat)} for the ranks that have published one."""
        out = {}
        for r in range(self.world):
            key = f"{self.prefix}/hb/{r}"
            try:
                if self.store.check([key]):
                    ops, t = self.store.get(key).decode().split()
                    out[r] = (int(ops), float(t))
            except Exception:
                continue
        return out

    def diagnose(self, error: BaseException, what: str, stale_s: float, exit_codes: dict[int, int | None] | None = None) -> RankFailure:
        """Turn a failed collective into a RankFailure naming the rank(s) at fault."""
        now = time.time()
        faults = []
        for r, code in (exit_codes or {}).items():
            if code is not None:
                faults.append(f"rank {r} exited (exit code {code})")
        if not faults and self.rank == 0:
            beats = self.heartbeats()
            for r in range(1, self.world):
                if r not in beats:
                    faults.append(f"rank {r} never reported a heartbeat")
                    continue
                ops, t = beats[r]
                if now - t > stale_s:
                    faults.append(f"rank {r} stopped responding (no heartbeat for {now - t:.1f} s)")
                elif ops < self.ops_done:
                    faults.append(f"rank {r} is hung (it finished {ops} ops, rank 0 is at op {self.ops_done})")
        if not faults:
            faults.append("rank 0 (the scheduler) is gone or unreachable" if self.rank != 0
                          else "a peer rank could not be reached")
        msg = (f"tensor-parallel {what} failed on rank {self.rank}: {'; '.join(faults)} "
               f"[{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}]; "
               f"the engine is stopped: restart it (and check the failed rank's log)")
        return RankFailure(msg)

    def close(self) -> None:
        """Stop the heartbeat; the process groups close when dropped."""
        self._hb_stop.set()
