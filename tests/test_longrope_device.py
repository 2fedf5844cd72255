"""The GPU path feeds a LongRoPE step graph's ``rope_long`` input (CPU tier: PyTorch's CPU device
and stand-ins for ONNX Runtime's session, so a GPU run is never the first time this executes).

``CudaStepSession`` binds the small step inputs by name (``session.small_step_inputs``), in its
plain runs and in its CUDA-graph static buffers; ``DeviceExecutor`` pads ``rope_long`` with
short rows when it widens a decode to the graph window.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ember.runtime.cuda_session import CudaStepSession, DeviceExecutor  # noqa: E402
from ember.runtime.device_kv_pool import DeviceKVPool, KVList  # noqa: E402
from ember.ort.session import kv_input_names, small_step_inputs  # noqa: E402

LAYERS, HKV, D, VOCAB = 2, 2, 3, 5
LONGROPE_INPUTS = ["input_ids", "positions", "past_lengths", "new_lengths", "rope_long",
                   "past_key.0", "past_value.0", "past_key.1", "past_value.1"]


def _pool(slots: int = 8) -> DeviceKVPool:
    return DeviceKVPool(LAYERS, HKV, D, slots=slots, max_capacity=64, dtype="float32", device="cpu")


def test_small_step_inputs_feed_rope_long_only_to_a_longrope_graph():
    ids, pos, lens = np.zeros((2, 1), np.int64), np.zeros((2, 1), np.int64), np.ones(2, np.int64)
    plain = small_step_inputs(LONGROPE_INPUTS[:4] + LONGROPE_INPUTS[5:], ids, pos, lens, lens, np.array([1, 0]))
    assert list(plain) == ["input_ids", "positions", "past_lengths", "new_lengths"]
    longrope = small_step_inputs(LONGROPE_INPUTS, ids, pos, lens, lens, np.array([True, False]))
    assert longrope["rope_long"].dtype == np.int64 and longrope["rope_long"].tolist() == [1, 0]
    assert small_step_inputs(LONGROPE_INPUTS, ids, pos, lens, lens)["rope_long"].tolist() == [0, 0]  # default: short
    assert kv_input_names(LONGROPE_INPUTS) == LONGROPE_INPUTS[5:]


class _RecordingOrt:
    """Stands in for an ONNX Runtime session: records, for each run, what its IOBinding bound
    to each input name (the values held at run time, as the device would read them)."""

    def __init__(self):
        self.runs: list[dict] = []

    def io_binding(self):
        return {}

    def run_with_iobinding(self, binding, run_options):
        self.runs.append({n: (t.tolist() if t.dtype == torch.int64 else t) for n, t in binding.items()})


def _cpu_step_session(graph: bool) -> CudaStepSession:
    """A ``CudaStepSession`` of a LongRoPE graph on PyTorch's CPU device, ORT replaced by ``_RecordingOrt``."""
    s = object.__new__(CudaStepSession)
    s.torch, s.device_index, s.device = torch, 0, torch.device("cpu")
    s.num_layers, s.vocab, s.logits_dtype = LAYERS, VOCAB, torch.float32
    s.input_names, s.kv_names = LONGROPE_INPUTS, kv_input_names(LONGROPE_INPUTS)
    s.output_names = ["logits"] + [f"new_{k}.{i}" for i in range(LAYERS) for k in ("key", "value")]
    s.cuda_graph_status, s.async_launch = ("on" if graph else "off"), False
    s._graphs, s._graph_ids, s.lock = {}, 0, threading.RLock()
    s._no_graph = s._run_options(-1 if graph else None)
    s.sess = _RecordingOrt()
    s._bind = lambda binding, name, t: binding.__setitem__(name, t)  # the tensor itself, not its address
    s._bind_out = lambda binding, name, t: None
    s.on_own_stream = contextlib.nullcontext  # no CUDA streams on the CPU
    return s


@pytest.mark.parametrize("graph", [False, True])
def test_cuda_step_session_binds_rope_long_by_name(graph, monkeypatch):
    """Plain runs and CUDA-graph replays (static buffers refilled) feed each row's factor set."""
    monkeypatch.setattr("ember.runtime.cuda_session._torch", lambda: torch)  # PyTorch without a CUDA device
    s = _cpu_step_session(graph)
    kv = _pool(4).views(0, 3)
    ids, pos = np.array([[7], [8], [9]]), np.array([[4], [5], [6]])
    for long in ([1, 0, 1], [0, 1, 1]):
        s.run(ids, pos, np.array([4, 5, 6]), np.ones(3, np.int64), kv, rope_long=np.array(long))
    runs = s.sess.runs
    assert [set(r) for r in runs] == [set(LONGROPE_INPUTS)] * 2
    assert all(runs[0][n] is a for n, a in zip(LONGROPE_INPUTS[5:], kv))  # the K/V by their own names
    assert [r["input_ids"] for r in runs] == [[[7], [8], [9]]] * 2
    assert [r["rope_long"] for r in runs] == [[1, 0, 1], [0, 1, 1]]
    assert len(s._graphs) == (1 if graph else 0)  # a graph is captured once and replayed, its buffers refilled


class _RopeRecordingSession:
    """Stands in for a graph-captured step session; records the ``rope_long`` of each run."""

    cuda_graph_status = "on"
    supports_chaining = False

    def __init__(self):
        self.rope_long: list = []
        self.lock = threading.Lock()

    def forget_graphs(self):
        pass

    def run(self, ids, pos, past, new, kv, rope_long=None):
        self.rope_long.append(None if rope_long is None else list(rope_long))
        b, t = ids.shape
        stacked = torch.zeros((LAYERS, 2, b, HKV, t, D))
        out = KVList(stacked[l, j] for l in range(LAYERS) for j in (0, 1))
        out.stacked = stacked
        return torch.zeros((b, VOCAB)), out


def test_device_executor_pads_rope_long_to_the_graph_window():
    pool = _pool(8)
    sess = _RopeRecordingSession()
    ex = DeviceExecutor(sess, pool)
    pool.lengths[:] = [0, 0, 0, 4, 5, 6, 0, 0]
    ex.run_device(3, np.array([[7], [8], [9]]), np.array([[4], [5], [6]]), np.ones(3, np.int64),
                  rope_long=np.array([1, 0, 1]))
    assert sess.rope_long == [[0, 0, 0, 1, 0, 1, 0, 0]]  # window [0, 8): the caller's rows, padding short
    ex.run_device(3, np.array([[1, 2]]), np.array([[7, 8]]), np.array([2]), rope_long=np.array([1]))  # a prefill
    ex.run_device(4, np.array([[1]]), np.array([[6]]), np.ones(1, np.int64))  # a model without LongRoPE
    assert sess.rope_long[1:] == [[1], None]
