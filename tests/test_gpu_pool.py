"""DeviceKVPool (the GPU KV memory) against the numpy KVPool, on PyTorch's CPU device (CPU tier).

The same code runs on CUDA tensors in tests/test_gpu.py; here it checks the write / move /
grow / shrink logic, so a GPU run is never the first time it executes.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ember.errors import InputError  # noqa: E402
from ember.runtime.cuda_session import parse_device  # noqa: E402
from ember.runtime.device_kv_pool import DeviceKVPool, KVList  # noqa: E402
from ember.runtime.kv_pool import KVPool  # noqa: E402
from ember.engine_format.kv_ring import held  # noqa: E402


def _pair(dtype="float32", slots=4, max_capacity=200, layer_rings=()):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=3, slots=slots, max_capacity=max_capacity, dtype=dtype,
                layer_rings=layer_rings)
    return KVPool(**args), DeviceKVPool(**args, device="cpu")


def _same(ref: KVPool, dev: DeviceKVPool) -> None:
    """Same capacity, lengths and live K/V (positions past a slot's length are unspecified:
    the CPU pool moves blocks in place on a resize and leaves stale values there)."""
    assert ref.capacity == dev.capacity
    np.testing.assert_array_equal(ref.lengths, dev.lengths)
    for layer, (a, b) in enumerate(zip(ref.k + ref.v, dev.k + dev.v)):
        for slot, n in enumerate(ref.lengths):
            n = held(int(n), ref.geometry.ring(layer % ref.num_layers))
            np.testing.assert_array_equal(a[slot, :, :n], b.numpy()[slot, :, :n])


@pytest.mark.parametrize("rings", [(), (0, 16)], ids=["full", "layer1-ring16"])
@pytest.mark.parametrize("arena", [True, False], ids=["arena-in-place", "fresh-buffer-per-resize"])
def test_write_move_grow_shrink_match_numpy_pool(arena, rings):
    rng = np.random.default_rng(0)
    ref, dev = _pair(layer_rings=rings)
    if not arena:  # what the CPU pool does when the arena cannot be reserved (MemoryError)
        for g in ref.groups:
            g.arena = False
    assert all((g.arena is not False) == arena for g in ref.groups)
    # prefill rows of different lengths into slots 1..3 (row 1 padded), then decodes
    lens = np.array([5, 2, 7], np.int64)
    new = [rng.standard_normal((3, 2, 7, 3)).astype(np.float32) for _ in range(4)]
    ref.write(1, new, lens)
    dev.write(1, [torch.from_numpy(a) for a in new], lens)
    _same(ref, dev)
    for _ in range(40):  # crosses the initial capacity: grows
        step = [rng.standard_normal((3, 2, 1, 3)).astype(np.float32) for _ in range(4)]
        ones = np.ones(3, np.int64)
        ref.write(1, step, ones)
        dev.write(1, [torch.from_numpy(a) for a in step], ones)
    _same(ref, dev)
    assert dev.generation > 1
    ref.move(3, 0)
    dev.move(3, 0)
    _same(ref, dev)
    for s in (0, 1, 2):
        ref.release(s), dev.release(s)
    ref.maybe_shrink(), dev.maybe_shrink()
    assert dev.capacity == ref.capacity
    _same(ref, dev)  # the slot that stayed live survives the shrink


def test_views_are_contiguous_slot_ranges():
    _, dev = _pair()
    v = dev.views(1, 3)
    assert len(v) == 4 and all(t.is_contiguous() and t.shape[0] == 2 for t in v)
    assert v[0].data_ptr() == dev.k[0][1:].data_ptr()  # a view, not a copy


def test_fp16_pool_and_limits():
    ref, dev = _pair("float16", max_capacity=40)
    assert dev.k[0].dtype == torch.float16 and dev.slot_bytes(7) == ref.slot_bytes(7) == 2 * 2 * 2 * 3 * 2 * 7
    with pytest.raises(InputError):
        dev.ensure_capacity(41)


def test_parse_device():
    assert parse_device("cuda") == 0 and parse_device("cuda:3") == 3
    with pytest.raises(InputError, match="cuda:N"):
        parse_device("gpu0")


def test_stacked_write_matches_list_write():
    """Sessions hand the pool one [L, 2, B, Hkv, T, D] buffer; it must land like the 2L arrays."""
    rng = np.random.default_rng(2)
    ref, dev = _pair()
    for t in (6, 1, 1, 3):
        stacked = torch.from_numpy(rng.standard_normal((2, 2, 3, 2, t, 3)).astype(np.float32))
        lens = np.array([t, max(t - 1, 1), t], np.int64)
        arrays = [stacked[l, j].numpy() for l in range(2) for j in (0, 1)]
        ref.write(0, arrays, lens)
        new = KVList(stacked[l, j] for l in range(2) for j in (0, 1))
        new.stacked = stacked
        dev.write(0, new, lens)
    _same(ref, dev)


def test_decode_write_skips_rows_without_new_tokens():
    ref, dev = _pair()
    rng = np.random.default_rng(3)
    new = [rng.standard_normal((4, 2, 1, 3)).astype(np.float32) for _ in range(4)]
    lens = np.array([1, 0, 1, 0], np.int64)
    ref.write(0, new, lens)
    dev.write(0, [torch.from_numpy(a) for a in new], lens)
    _same(ref, dev)


def test_graph_window_buckets():
    from ember.runtime.cuda_session import graph_window

    assert graph_window(3, 4, 32) == (0, 4)
    assert graph_window(5, 9, 32) == (0, 16)
    assert graph_window(0, 1, 32) == (0, 1)
    assert graph_window(20, 30, 24) == (0, 24)


class _FakeDeviceSession:
    """The ``DeviceSession`` members ``DeviceExecutor`` reads, as a CUDA-graph session declares them."""

    cuda_graph_status = "on"
    supports_chaining = False

    def __init__(self):
        self.calls = []
        self.lock = threading.RLock()
        self.forgotten = 0

    def forget_graphs(self):
        self.forgotten += 1


class _FakeGraphSession(_FakeDeviceSession):
    """Stands in for a CUDA-graph session: returns logits = row's input id, records the window."""

    def run(self, ids, pos, past, new, kv):
        b, t = ids.shape
        self.calls.append((b, kv[0].data_ptr()))
        logits = torch.from_numpy(np.repeat(ids[:, -1:].astype(np.float32), 5, axis=1))
        stacked = torch.ones((2, 2, b, 2, t, 3))
        out = KVList(stacked[l, j] for l in range(2) for j in (0, 1))
        out.stacked = stacked
        return logits, out


def test_executor_pads_graph_decodes_to_a_bucket_from_slot_zero():
    from ember.runtime.cuda_session import DeviceExecutor

    _, pool = _pair(slots=8)
    sess = _FakeGraphSession()
    ex = DeviceExecutor(sess, pool)
    pool.lengths[:] = [0, 0, 0, 4, 5, 6, 0, 0]
    logits = ex.run_device(3, np.array([[7], [8], [9]]), np.array([[4], [5], [6]]), np.ones(3, np.int64))
    assert sess.calls[-1][0] == 8  # rows [0, 8): bucket of stop=6
    assert logits[:, 0].tolist() == [7.0, 8.0, 9.0]  # the caller's rows, in order
    assert pool.lengths.tolist() == [0, 0, 0, 5, 6, 7, 0, 0]  # padding rows kept nothing


class _FakeDecodeSession(_FakeDeviceSession):
    """Stands in for ``CudaDecodeSession``: writes each row's 'K/V' (its token id) in place at
    its past length, as GroupQueryAttention does with a shared past/present buffer."""

    def run(self, input_ids, past_lengths, kv):
        self.calls.append((len(input_ids), list(past_lengths)))
        for a in kv:
            for r, p in enumerate(past_lengths):
                a[r, :, int(p)] = float(input_ids[r, 0])
        return torch.from_numpy(input_ids.astype(np.float32))


def test_executor_runs_decodes_through_the_fused_part_in_place():
    from ember.runtime.cuda_session import DeviceExecutor

    _, pool = _pair(slots=8)
    step, decode = _FakeGraphSession(), _FakeDecodeSession()
    ex = DeviceExecutor(step, pool, decode=decode)
    assert decode.lock is ex.lock  # one lock: ORT captures graphs in global mode
    pool.lengths[:] = [0, 0, 0, 4, 5, 6, 0, 0]
    logits = ex.run_device(3, np.array([[7], [8], [9]]), np.array([[4], [5], [6]]), np.ones(3, np.int64))
    assert decode.calls == [(8, [0, 0, 0, 4, 5, 6, 0, 0])] and not step.calls  # graph window, past lengths
    assert logits[:, 0].tolist() == [7.0, 8.0, 9.0]
    assert pool.lengths.tolist() == [0, 0, 0, 5, 6, 7, 0, 0]  # counted, not written again
    assert [float(pool.k[1][s, 0, p, 0]) for s, p in ((3, 4), (4, 5), (5, 6))] == [7.0, 8.0, 9.0]
    # positions that are not the past lengths (not produced by Ember's loop) take the step graph
    ex.run_device(3, np.array([[1]]), np.array([[2]]), np.ones(1, np.int64))
    assert len(decode.calls) == 1 and step.calls


def test_preallocated_pool_never_resizes():
    """The layout the fused decode part runs on (GPU): full capacity once, so the views and the
    CUDA graphs captured on their addresses stay valid through growth and shrink points."""
    rng = np.random.default_rng(1)
    args = dict(num_layers=2, num_kv_heads=2, head_dim=3, slots=4, max_capacity=200, dtype="float32")
    ref, dev = KVPool(**args, preallocate=True), DeviceKVPool(**args, device="cpu", preallocate=True)
    assert ref.capacity == dev.capacity == 200
    ptr = dev.k[0].data_ptr()
    for n in (30, 150, 1):  # grow past the default growth points, then leave a short slot only
        new = [rng.standard_normal((4, 2, n, 3)).astype(np.float32) for _ in range(4)]
        for p in (ref, dev):
            p.lengths[:] = 0
            p.write(0, new if p is ref else [torch.from_numpy(a) for a in new], np.full(4, n))
            p.maybe_shrink()
        _same(ref, dev)
    assert ref.capacity == dev.capacity == 200 and dev.generation == 1 and dev.k[0].data_ptr() == ptr


class _RandomLogitsSession(_FakeGraphSession):
    """Random logits [B, 50] with a tie in row 0 (the first index must win, as numpy's argmax)."""

    def run(self, ids, pos, past, new, kv):
        _, out = super().run(ids, pos, past, new, kv)
        logits = torch.from_numpy(np.random.default_rng(len(self.calls)).standard_normal((ids.shape[0], 50))
                                  .astype(np.float32))
        logits[0, 7] = logits[0, 3] = logits[0].max() + 1
        return logits, out


def test_device_greedy_matches_host_argmax_and_returns_only_sampled_rows():
    from ember.runtime.cuda_session import DeviceExecutor
    from ember.runtime.executor import run_greedy

    args = (np.array([[7], [8], [9]]), np.array([[0], [0], [0]]), np.ones(3, np.int64))
    want = DeviceExecutor(_RandomLogitsSession(), _pair(slots=4)[1]).run(0, *args)
    ex = DeviceExecutor(_RandomLogitsSession(), _pair(slots=4)[1])
    greedy, rows = run_greedy(ex, 0, *args, logit_rows=[2])
    assert greedy.dtype == np.int64 and greedy.tolist() == want.argmax(axis=1).tolist() and greedy[0] == 3
    np.testing.assert_array_equal(rows, want[[2]])
    greedy, rows = run_greedy(ex, 0, *args)
    assert rows.shape == (0, 50)


def test_run_greedy_falls_back_to_full_logits():
    from ember.runtime.executor import HostGreedy, run_greedy

    class HostOnly(HostGreedy):  # an executor whose steps run on the host (the CPU and tensor-parallel ones)
        def run(self, start, ids, pos, new):
            return np.array([[0.0, 2.0, 1.0], [5.0, 1.0, 5.0]], np.float32)

    greedy, rows = run_greedy(HostOnly(), 0, None, None, None, logit_rows=[1])
    assert greedy.tolist() == [1, 0] and rows.tolist() == [[5.0, 1.0, 5.0]]
