"""GPU step execution: ONNX Runtime's CUDA provider with device-resident buffers (docs/design.md §7).

The KV pool lives on the GPU (``device_kv_pool.DeviceKVPool``: a slot range is one
contiguous device view per layer), and every step input and output is bound to device
memory through IOBinding: per step the host sends the
new tokens' ids/positions/lengths (a few hundred bytes) and receives the logits it samples
from; the K/V never leave the device. Each session runs ORT on a CUDA stream of its own
(``user_compute_stream``; ORT cannot capture CUDA graphs on the legacy default stream), joined
to the caller's current stream before and after every run by device-side stream waits, so the
pool's K/V writes (PyTorch kernels), the graph and what the caller does with its outputs are
ordered without host synchronisation.

Device memory is held in PyTorch CUDA tensors (PyTorch is the array library of the GPU
path; the CPU path never imports it). ``DeviceExecutor`` implements the ``Executor`` protocol
(``executor_protocol.py``) and serves both the ORT CUDA and the TensorRT step sessions
(``DeviceSession``).

Runs are launched asynchronously (``async_launch``): ``DeviceExecutor.launch_greedy`` queues
the step, the argmax and the tokens' copy to pinned memory, and returns; the engine streams
the previous step's tokens while the device works and then waits on an event.

CUDA graphs (``cuda_graph=True``; ``make_cuda_executor``'s default, ``EMBER_CUDA_GRAPH=0``
turns them off): decode calls (T = 1) are captured once per (batch, KV addresses) into
static device buffers and replayed; ``DeviceExecutor`` runs decodes over a power-of-two
window from slot 0 (``graph_window``) so few shapes get captured. Prefill calls (T > 1)
launch normally. When ONNX Runtime refuses graphs for a graph, the session falls back to
plain launches and says why in ``cuda_graph_status``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ember.engine_format.decoder_spec import kv_geometry
from ember.engine_format.roles import PAST_KEY
from ember.errors import ArtifactError, ConfigError, InputError
from ember.ort.decode_session import decode_positions_ok
from ember.ort.session import kv_input_names, small_step_inputs
from ember.runtime.device_kv_pool import DeviceKVPool, KVList
from ember.runtime.device_kv_pool import require_torch as _torch
from ember.runtime.executor import PoolSlots, step_on_pool
from ember.runtime.executor_protocol import DeviceSession


def parse_device(device: str) -> int:
    """'cuda' -> 0, 'cuda:N' -> N; anything else is an InputError."""
    if device == "cuda":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    raise InputError(f"device {device!r} is not understood; use 'cpu', 'cuda' or 'cuda:N'")


def _ort_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ConfigError(
            f"onnxruntime {ort.__version__} here has no CUDA provider (available: {ort.get_available_providers()}); "
            f"install onnxruntime-gpu in place of onnxruntime (pip uninstall onnxruntime && pip install onnxruntime-gpu)"
        )
    _torch()  # loads the CUDA runtime, cuBLAS and cuDNN that ONNX Runtime's CUDA provider links against
    return ort


def ort_run_options(graph_id: int | None, async_launch: bool):
    """Run options: a CUDA graph id (``-1``: never capture) and, with ``async_launch``, no
    stream synchronisation at the end of the run. The run is ordered with the caller's
    stream (``joined_stream``), and the host reads results only through a synchronising
    copy or an event (``logits_to_host``, ``PendingGreedy``), so the engine can do host
    work meanwhile."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    if graph_id is not None:
        ro.add_run_config_entry("gpu_graph_id", str(graph_id))
    if async_launch:
        ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return ro


@contextlib.contextmanager
def joined_stream(stream, device):
    """Run the body on ``stream`` (a session's own), ordered after the caller's stream's work so
    far; the caller's stream then waits for it (device-side waits: the host goes on)."""
    torch = _torch()
    caller = torch.cuda.current_stream(device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        caller.wait_stream(stream)


class CudaStepSession:
    """The step graph on ONNX Runtime's CUDA provider, all I/O bound to device memory.

    ``run`` takes host int64 arrays for ids/positions/lengths and the pool's device views;
    it returns device tensors: logits [B,V] and the new K/V (2L tensors [B,Hkv,T,D]), which
    the caller owns. A ``DeviceSession`` (``executor_protocol.py``).
    """

    # ``DeviceSession`` members, set per session in ``__init__``
    supports_chaining: bool = False  # true with ``async_launch``
    cuda_graph_status: str = "off"  # "on" / "off" / "unavailable: <why>"

    def __init__(self, onnx_path: str | os.PathLike, num_layers: int, device_index: int = 0,
                 cuda_graph: bool = False, optimized_model_path: str | None = None, tf32: bool = False,
                 async_launch: bool = True):
        ort = _ort_cuda()
        torch = _torch()
        self.torch, self.device_index = torch, device_index
        self.device = torch.device("cuda", device_index)
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(self.device)
        self.num_layers, self.tf32 = num_layers, tf32
        self.cuda_graph_status = "off"
        self.sess = None
        if cuda_graph:
            try:
                self.sess = self._make(ort, onnx_path, True, optimized_model_path)
                self.cuda_graph_status = "on"
            except Exception as e:  # ORT refuses graphs when a node is placed on the CPU
                self.cuda_graph_status = f"unavailable: {str(e).splitlines()[0][:300]}"
        if self.sess is None:
            self.sess = self._make(ort, onnx_path, False, optimized_model_path)
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.kv_names = kv_input_names(self.input_names)
        self.output_names = [o.name for o in self.sess.get_outputs()]
        out_types = {o.name: o.type for o in self.sess.get_outputs()}
        self.logits_dtype = torch.float16 if out_types["logits"] == "tensor(float16)" else torch.float32
        self.vocab = int(self.sess.get_outputs()[0].shape[1])
        self._graphs: dict[tuple, dict[str, Any]] = {}
        self._graph_ids = 0
        # ORT captures with the global capture mode: while one thread captures, no other thread
        # may touch CUDA. Executors take this lock around everything they do on the device.
        self.lock = threading.RLock()
        self.async_launch = async_launch
        # a chained step's ids are a device tensor, and a run that does not wait for the device
        # lets the host launch the next one behind it
        self.supports_chaining = async_launch
        self._no_graph = self._run_options(-1 if self.cuda_graph_status == "on" else None)

    def _run_options(self, graph_id: int | None):
        return ort_run_options(graph_id, self.async_launch)

    def _make(self, ort, path, graph: bool, optimized_model_path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized_model_path:
            so.optimized_model_filepath = optimized_model_path
        opts = {"device_id": str(self.device_index), "user_compute_stream": str(self.stream.cuda_stream),
                "arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC",
                "enable_cuda_graph": "1" if graph else "0",
                # TF32 matmuls differ from the CPU engine's FP32 beyond float ties: off unless asked.
                "use_tf32": "1" if self.tf32 else "0"}
        try:
            sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", opts), "CPUExecutionProvider"])
        except Exception as e:
            if graph:
                raise
            raise ArtifactError(f"{Path(path)} could not be loaded on the CUDA provider ({e}); recompile the folder") from e
        if "CUDAExecutionProvider" not in sess.get_providers():  # ORT falls back to the CPU silently
            raise ConfigError("ONNX Runtime could not start its CUDA provider (CUDA 13 / cuDNN 9 libraries not found?); "
                              "install onnxruntime-gpu's CUDA dependencies (pip install onnxruntime-gpu[cuda,cudnn])")
        return sess

    # -- binding ---------------------------------------------------------------------------
    def _bind(self, binding, name: str, t) -> None:
        binding.bind_input(name, "cuda", self.device_index, _np_of(t), list(t.shape), t.data_ptr())

    def _bind_out(self, binding, name: str, t) -> None:
        binding.bind_output(name, "cuda", self.device_index, _np_of(t), list(t.shape), t.data_ptr())

    def _outputs(self, b: int, t: int, kv: list) -> tuple[Any, KVList]:
        """Output buffers: logits [B,V] and the new K/V as views of one [L, 2, B, Hkv, T, D] buffer."""
        torch = self.torch
        logits = torch.empty((b, self.vocab), dtype=self.logits_dtype, device=self.device)
        hkv, d = kv[0].shape[1], kv[0].shape[3]
        stacked = torch.empty((self.num_layers, 2, b, hkv, t, d), dtype=kv[0].dtype, device=self.device)
        new = KVList(stacked[l, j] for l in range(self.num_layers) for j in (0, 1))
        new.stacked = stacked
        return logits, new

    def run(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray, new_lengths: np.ndarray,
            kv: list, rope_long: np.ndarray | None = None) -> tuple[Any, list]:
        """ids/positions int64 [B,T], lengths int64 [B] (host); kv 2L device views [B,Hkv,P,D];
        ``rope_long`` int64 [B] for a LongRoPE graph (``session.small_step_inputs``)."""
        b, t = input_ids.shape
        small = small_step_inputs(self.input_names, input_ids, positions, past_lengths, new_lengths, rope_long)
        with self.lock, self.on_own_stream():
            if self.cuda_graph_status == "on" and t == 1:
                return self._run_graph(small, kv)
            return self._run_plain(small, kv)

    def on_own_stream(self):
        return joined_stream(self.stream, self.device)

    def _binding(self, small: dict, kv: list, logits, new: list):
        """An IOBinding of the small inputs (by name), the KV views and the preallocated outputs."""
        binding = self.sess.io_binding()
        for name, a in small.items():
            self._bind(binding, name, a)
        for name, a in zip(self.kv_names, kv):
            self._bind(binding, name, a)
        self._bind_out(binding, "logits", logits)
        for name, a in zip(self.output_names[1:], new):
            self._bind_out(binding, name, a)
        return binding

    def _run_plain(self, small: dict, kv) -> tuple[Any, list]:
        b, t = small["input_ids"].shape
        small = {n: _int64_tensor(a).to(self.device) for n, a in small.items()}
        logits, new = self._outputs(b, t, kv)
        binding = self._binding(small, kv, logits, new)
        # In a graph-enabled session a run without a graph id is captured as graph 0 and
        # replayed for every later such run, whatever its shapes: -1 opts out of capture.
        self.sess.run_with_iobinding(binding, self._no_graph)
        return logits, new

    def _run_graph(self, small: dict, kv) -> tuple[Any, list]:
        """Decode through a captured CUDA graph: inputs copied into static buffers, same addresses."""
        torch = self.torch
        b = small["input_ids"].shape[0]
        key = (b, tuple(int(a.data_ptr()) for a in kv), tuple(kv[0].shape))
        g = self._graphs.get(key)
        if g is None:  # static int64 buffers: [B, 1] for ids/positions, [B] for the per-row inputs
            static = {n: torch.zeros((b, 1) if n in ("input_ids", "positions") else (b,), dtype=torch.int64,
                                     device=self.device) for n in small}
            logits, new = self._outputs(b, 1, kv)
            binding = self._binding(static, kv, logits, new)
            self._graph_ids += 1
            ro = self._run_options(self._graph_ids)
            g = {"small": static, "logits": logits, "new": new, "binding": binding, "ro": ro}
            self._graphs[key] = g
        for name, src in small.items():
            _fill(g["small"][name], src)
        self.sess.run_with_iobinding(g["binding"], g["ro"])
        # Static buffers: valid until the next replay, by which time the executor has consumed them.
        return g["logits"], g["new"]

    def forget_graphs(self) -> None:
        """Drop captured graphs (their addresses are stale after the KV pool reallocates)."""
        self._graphs.clear()


class CudaDecodeSession(CudaStepSession):
    """The fused decode part (``export/gqa_decode.py``) on the CUDA provider.

    Each layer's ``past_*`` and ``present_*`` are bound to the same pool view, so the graph
    reads the slot range's cache and appends every row's new token at its past length in
    place: there is no separate K/V write. ``run`` returns the device logits [B,V]. With
    CUDA graphs, each (batch, KV addresses, capacity) is captured once; the ids and past
    lengths are copied into its static buffers before a replay (``total_sequence_length``,
    a host scalar, is the capacity: fixed per capture).
    """

    writes_kv_in_place = True

    def run(self, input_ids: np.ndarray, past_lengths: np.ndarray, kv: list):
        b = input_ids.shape[0]
        torch = self.torch
        with self.lock, self.on_own_stream():
            key = (b, tuple(int(a.data_ptr()) for a in kv), tuple(kv[0].shape))
            g = self._graphs.get(key) if self.cuda_graph_status == "on" else None
            if g is None:
                ids = torch.zeros((b, 1), dtype=torch.int64, device=self.device)
                seqlens = torch.zeros((b,), dtype=torch.int32, device=self.device)
                logits = torch.empty((b, self.vocab), dtype=self.logits_dtype, device=self.device)
                total = np.array(kv[0].shape[2], np.int32)
                binding = self.sess.io_binding()
                self._bind(binding, "input_ids", ids)
                self._bind(binding, "seqlens_k", seqlens)
                binding.bind_cpu_input("total_sequence_length", total)
                self._bind_out(binding, "logits", logits)
                for i in range(self.num_layers):
                    for j, kind in enumerate(("key", "value")):
                        self._bind(binding, f"past_{kind}.{i}", kv[2 * i + j])
                        self._bind_out(binding, f"present_{kind}.{i}", kv[2 * i + j])
                ro = self._no_graph
                if self.cuda_graph_status == "on":
                    self._graph_ids += 1
                    ro = self._run_options(self._graph_ids)
                g = {"ids": ids, "seqlens": seqlens, "logits": logits, "total": total, "binding": binding, "ro": ro}
                if self.cuda_graph_status == "on":
                    self._graphs[key] = g
            _fill(g["ids"], input_ids)
            g["seqlens"].copy_(torch.from_numpy(np.ascontiguousarray(past_lengths, dtype=np.int32)))
            self.sess.run_with_iobinding(g["binding"], g["ro"])
            return g["logits"]


def _int64_tensor(src):
    """Host ints (numpy) as a CPU int64 tensor; a torch tensor (a chained step's device ids) as is."""
    if isinstance(src, np.ndarray):
        return _torch().from_numpy(np.ascontiguousarray(src, dtype=np.int64))
    return src


def _fill(dst, src) -> None:
    """Copy host ints or a device tensor into a static buffer."""
    dst.copy_(_int64_tensor(src).reshape(dst.shape))


def _np_of(t) -> type:
    import torch

    return {torch.float16: np.float16, torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32,
            torch.bool: np.bool_}[t.dtype]


def logits_to_host(logits) -> np.ndarray:
    """Device logits [B,V] -> a float32 host array the caller owns (the step's one transfer).

    Goes through pinned memory (PyTorch caches the blocks), about twice as fast as pageable.
    (A CPU tensor, as in the CPU-tier tests, is copied plainly.)
    """
    import torch  # loaded already: ``logits`` is a torch tensor
    host = torch.empty(tuple(logits.shape), dtype=torch.float32, pin_memory=logits.is_cuda)
    host.copy_(logits, non_blocking=logits.is_cuda)
    if logits.is_cuda:
        torch.cuda.current_stream(logits.device).synchronize()
    return host.numpy()


class PendingGreedy:
    """The host copies of a step's argmax (and of the logits rows that sample), queued on the
    device behind the step; ``result`` waits for them (``executor.launch_greedy``'s contract)."""

    def __init__(self, logits, logit_rows=()):
        import torch  # loaded already: ``logits`` is a torch tensor
        on_gpu = logits.is_cuda
        self.device_tokens = logits.argmax(dim=1)  # what a chained step reads as its ids
        self._tokens = torch.empty((logits.shape[0],), dtype=torch.int64, pin_memory=on_gpu)
        self._tokens.copy_(self.device_tokens, non_blocking=on_gpu)
        rows = np.asarray(logit_rows, dtype=np.int64)
        self._rows = torch.empty((len(rows), logits.shape[1]), dtype=torch.float32, pin_memory=on_gpu and len(rows) > 0)
        if len(rows):
            self._rows.copy_(logits[torch.as_tensor(rows, device=logits.device)], non_blocking=on_gpu)
        self._event = None
        if on_gpu:
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(logits.device))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._tokens.numpy(), self._rows.numpy()


def greedy_to_host(logits, logit_rows=()) -> tuple[np.ndarray, np.ndarray]:
    """Device logits [B,V] -> (each row's argmax as int64 [B], float32 logits of ``logit_rows``)
    on the host: the argmax runs on the device (first index of the maximum, as numpy's)."""
    return PendingGreedy(logits, logit_rows).result()


def graph_window(start: int, stop: int, slots: int) -> tuple[int, int]:
    """The slot window a graph-replayed decode runs over: ``[0, bucket(stop))``.

    Captured graphs are tied to shapes and addresses, so decode over an arbitrary
    ``[start, stop)`` would capture a graph per (start, B). Running from slot 0 and rounding
    the end up to a power of two (capped at ``slots``) leaves at most log2(slots) + 1 shapes
    per pool allocation; the extra rows are computed and discarded (a decode step costs
    little more at a larger batch: it is bound by reading the weights).
    """
    end = 1
    while end < stop:
        end *= 2
    return 0, min(end, slots)


class DeviceExecutor(PoolSlots):
    """The ``Executor`` protocol over a ``DeviceSession`` + ``DeviceKVPool``; it chains steps
    where its session does (``supports_chaining``)."""

    def __init__(self, session: DeviceSession, pool: DeviceKVPool, decode: DeviceSession | None = None):
        self.session, self.pool, self.decode = session, pool, decode
        # steps chain on the device (``launch_greedy(chain=)``) where launches are asynchronous
        # (ONNX Runtime sessions; ``EMBER_ASYNC_LAUNCH=0`` turns both off)
        self.supports_chaining = session.supports_chaining
        self._generation = pool.generation
        # one lock per session: executors sharing it (one per thread) never overlap on the device
        self.lock = session.lock
        if decode is not None:  # ORT captures graphs in global mode: both sessions under one lock
            decode.lock = self.lock

    def move(self, moves: list[tuple[int, int]]) -> None:
        with self.lock:
            for src, dst in moves:
                self.pool.move(src, dst)

    def run_device(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray,
                   rope_long: np.ndarray | None = None):
        """One step over slots [start, start+B); returns the logits as a device tensor [B,V].

        Rows with ``new_lengths`` 0 are computed but keep no K/V. With CUDA graphs on, a
        decode (T = 1) runs over ``graph_window`` with padding rows of that kind. ``rope_long``:
        LongRoPE's per-row factor set (``executor.step_on_pool``).
        """
        with self.lock:
            return self._run_device(start, input_ids, positions, new_lengths, rope_long)

    def _run_device(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray,
                    rope_long: np.ndarray | None = None):
        b, t = input_ids.shape
        stop = start + b
        lo, hi = start, stop
        decode = None
        if self.decode is not None and decode_positions_ok(positions, self.pool.lengths[start:stop], new_lengths):
            decode = self.decode
        if t == 1 and (decode or self.session).cuda_graph_status == "on":
            lo, hi = graph_window(start, stop, self.pool.slots)
            if (lo, hi) != (start, stop):
                ids = np.zeros((hi - lo, 1), np.int64) if isinstance(input_ids, np.ndarray) else \
                    _torch().zeros((hi - lo, 1), dtype=_torch().int64, device=input_ids.device)
                pos = self.pool.lengths[lo:hi].reshape(-1, 1).copy()
                new = np.zeros(hi - lo, np.int64)
                ids[start - lo:stop - lo], pos[start - lo:stop - lo] = input_ids, positions
                new[start - lo:stop - lo] = new_lengths
                if rope_long is not None:  # padding rows: short (their tokens are not kept)
                    long = np.zeros(hi - lo, np.int64)
                    long[start - lo:stop - lo] = rope_long
                    rope_long = long
                input_ids, positions, new_lengths = ids, pos, new
        logits = step_on_pool(self.pool, self.session, decode, lo, input_ids, positions, new_lengths,
                              before_run=self._forget_stale_graphs, rope_long=rope_long)
        return logits[start - lo:stop - lo]

    def _forget_stale_graphs(self) -> None:
        """Captured graphs hold the pool's addresses: drop them after it reallocates."""
        if self.pool.generation != self._generation:
            for s in (self.session, self.decode):
                if s is not None:
                    s.forget_graphs()
            self._generation = self.pool.generation

    def run(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray,
            rope_long: np.ndarray | None = None) -> np.ndarray:
        """As ``LocalExecutor.run``: logits [B,V] float32 on the host."""
        with self.lock:
            return logits_to_host(self._run_device(start, input_ids, positions, new_lengths, rope_long))

    def launch_greedy(self, start: int, input_ids: np.ndarray, positions: np.ndarray, new_lengths: np.ndarray,
                      logit_rows=(), chain: PendingGreedy | None = None,
                      rope_long: np.ndarray | None = None) -> PendingGreedy:
        """``executor.launch_greedy`` on the device: the step, every row's argmax and the copy
        of the B tokens (plus the ``logit_rows`` that sample; not B x V logits) are queued on
        the stream; the host goes on until it asks for ``result()``. With ``chain`` (a pending
        step over the same rows) the ids are that step's argmax, copied on the device."""
        if chain is not None:
            input_ids = chain.device_tokens.reshape(-1, 1)
        with self.lock:
            return PendingGreedy(self._run_device(start, input_ids, positions, new_lengths, rope_long), logit_rows)



def make_cuda_executor(folder: Path, manifest, part, device: str, max_batch: int, max_seq_len: int,
                       cuda_graph: bool | None = None, decode_part=None, backend: str | None = None) -> DeviceExecutor:
    """The executor ``loader.load_decoder`` uses for ``device='cuda:N'`` (ORT CUDA, TensorRT or
    TensorRT-RTX part; ``backend='onnxruntime'`` runs a plan's source ONNX on ORT CUDA).

    ``decode_part``: the folder's fused decode part, which then runs every one-token step
    (ONNX Runtime's CUDA GroupQueryAttention is FP16/BF16 only: an FP32 part is refused)."""
    from ember.runtime.backend_choice import onnx_graph, runs_plan

    index = parse_device(device)
    cfg = manifest.model["config"]
    geometry = kv_geometry(cfg)
    layers = geometry.num_layers
    kv_dtype = part.tensor(PAST_KEY, layer=0).dtype
    if cuda_graph is None:  # on by default: 4.4x faster decode on llama-1b (docs/gpu.md)
        cuda_graph = os.environ.get("EMBER_CUDA_GRAPH", "1") != "0"
    # on by default: the engine streams the last step's tokens while the device runs the next
    # and chains pure-decode steps on the device (docs/scheduler.md); EMBER_ASYNC_LAUNCH=0 makes
    # every run wait for the device
    async_launch = os.environ.get("EMBER_ASYNC_LAUNCH", "1") != "0"
    if runs_plan(part, backend):
        from ember.runtime.trt_session import TensorRTStepSession

        session = TensorRTStepSession(Path(folder) / part.file, part, layers, device_index=index)
    else:
        session = CudaStepSession(onnx_graph(Path(folder), part), layers, device_index=index, cuda_graph=cuda_graph,
                                  async_launch=async_launch)
    decode = None
    if decode_part is not None:
        decode_kv = decode_part.tensor(PAST_KEY, layer=0).dtype
        if decode_kv != "float16":
            raise ConfigError(f"{folder}: the fused decode part is {decode_kv}, and ONNX Runtime's CUDA "
                              "GroupQueryAttention runs FP16 only: recompile with --dtype fp16, or load with "
                              "fused_decode=False (CLI: EMBER_FUSED_DECODE=0)")
        decode = CudaDecodeSession(Path(folder) / decode_part.file, layers, device_index=index, cuda_graph=cuda_graph,
                                   async_launch=async_launch)
    pool = device_pool(*geometry[:3], max_batch, max_seq_len, kv_dtype, index, fused_decode=decode is not None,
                       layer_rings=geometry.layer_rings)
    return DeviceExecutor(session, pool, decode=decode)


def device_pool(layers: int, kv_heads: int, head_dim: int, slots: int, max_seq_len: int, kv_dtype: str,
                device_index: int = 0, fused_decode: bool = False, layer_rings: tuple[int, ...] = ()) -> DeviceKVPool:
    """The device KV pool of a GPU executor. With the fused decode part, decode cost follows
    the live lengths, not the capacity: the pool is laid out once at its budget, so growth
    never stalls a step or invalidates captured CUDA graphs. ``layer_rings``: the sliding-window
    layers' rings (``KVGeometry.layer_rings``)."""
    return DeviceKVPool(layers, kv_heads, head_dim, slots=slots, max_capacity=max_seq_len, dtype=kv_dtype,
                        device_index=device_index, preallocate=fused_decode, layer_rings=layer_rings)
