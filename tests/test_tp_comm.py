"""The TP transport (ember/runtime/tp/comm.py) with two ranks as two threads of this process:
op broadcast (one buffer and the multi-buffer path), all-reduce, gather, and the diagnosis
of a hung rank. No model, no processes."""
from __future__ import annotations

import datetime
import threading

import numpy as np
import pytest
import torch.distributed as dist

from ember.runtime.tp.comm import OP_BUFFER, Comm, CommError


def _pair(timeout_s: float = 10.0) -> list[Comm]:
    master = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=datetime.timedelta(seconds=30),
                           wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", master.port, 2, is_master=False, timeout=datetime.timedelta(seconds=30))
    comms: list[Comm | None] = [None, None]

    def make(rank: int, store) -> None:
        comms[rank] = Comm(store, rank, 2, timeout_s)

    t = threading.Thread(target=make, args=(1, client))
    t.start()
    make(0, master)
    t.join()
    comms[0]._keep = (master, client)  # the stores must outlive the groups
    return comms  # type: ignore[return-value]


def _both(fn0, fn1):
    out = [None, None]
    t = threading.Thread(target=lambda: out.__setitem__(1, fn1()))
    t.start()
    out[0] = fn0()
    t.join()
    return out


def test_collectives_between_two_ranks():
    c0, c1 = _pair()
    small = [("run", 0, np.arange(6).reshape(2, 3), np.ones((2, 3), np.int64), np.array([3, 1]))]
    big = [("run", 4, np.arange(4 * OP_BUFFER // 8).reshape(4, -1), None, None)]  # > one buffer: second broadcast
    for msg in (small, big):
        _, got = _both(lambda: c0.broadcast_op(msg), c1.broadcast_op)
        assert got[0][:2] == msg[0][:2]
        np.testing.assert_array_equal(got[0][2], msg[0][2])
    a0, a1 = np.full((2, 1, 8), 1.5, np.float32), np.full((2, 1, 8), 2.0, np.float32)
    r0, r1 = _both(lambda: c0.all_reduce(a0), lambda: c1.all_reduce(a1))
    np.testing.assert_array_equal(r0, np.full((2, 1, 8), 3.5, np.float32))
    np.testing.assert_array_equal(r1, r0)
    g0, g1 = _both(lambda: c0.gather_to_first(np.zeros((2, 3), np.float32)),
                   lambda: c1.gather_to_first(np.ones((2, 3), np.float32)))
    assert g1 is None and [float(g.sum()) for g in g0] == [0.0, 6.0]
    assert c0.stats.all_reduces == 1 and c0.stats.gathers == 1 and c0.stats.broadcasts == 2


def test_hung_rank_is_named():
    """Rank 1 keeps beating but never joins the collective: rank 0 times out and names it."""
    c0, c1 = _pair(timeout_s=1.0)
    c1.start_heartbeat(0.1)
    c0.ops_done = 3
    c1.ops_done = 2
    import time

    time.sleep(0.3)  # let a heartbeat land
    with pytest.raises(CommError) as err:
        c0.all_reduce(np.zeros(4, np.float32))
    failure = c0.diagnose(err.value, "step", stale_s=5.0)
    assert "rank 1 is hung (it finished 2 ops, rank 0 is at op 3)" in str(failure)
    c1.close()
    with pytest.raises(CommError):  # rank 1's side of the abandoned collective fails too
        c1.all_reduce(np.zeros(4, np.float32))
