"""Diffusion engine parts on ONNX Runtime with device-resident I/O: IOBinding over torch tensors.

``DevicePartSession`` runs one part on ``cuda:N`` (the CUDA provider, on the pipeline's own
stream as ``user_compute_stream``: ORT cannot capture CUDA graphs on the legacy default stream)
or on ``cpu`` (the CPU provider with the same binding code: what the CPU tests exercise).
Inputs are cast to the graph's types on the device (an FP16 engine takes the loop's float32
latents); outputs are fresh tensors the caller owns.

CUDA graphs (``cuda_graph=True``), per engine and batch size, into static input/output buffers
bound once (the loop's tensors are copied in, the outputs cloned out):

- ``shared`` (tried first): one session with ``enable_cuda_graph``, a ``gpu_graph_id`` per batch
  size (as ``cuda_session.py`` does for decode). ORT allows it when the only CPU nodes are shape
  arithmetic with no copies between devices.
- ``per-batch`` (when ORT refuses the shared session): each batch size gets a session of its own
  with the batch fixed (``add_free_dimension_override_by_name``: its shape arithmetic folds to
  constants). Each holds its own copy of the weights.

At most ``max_graph_batches`` batch sizes are captured; other batches run the dynamic session, and
so does every batch once ORT refuses a graph. ``cuda_graph_status`` says which ("on", "off",
"unavailable: <why>"), ``graph_mode`` how, ``graph_batches`` lists the captured batch sizes. On the
CPU the same sessions, buffers and run options run without a capture (what the CPU tests exercise).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ember.engine_format.manifest import EnginePart
from ember.engine_format.tensorrt_part import PLAN_TITLES, is_plan
from ember.errors import ArtifactError, ConfigError, InputError
from ember.runtime.backend_choice import onnx_graph, runs_plan
from ember.runtime.cuda_session import _np_of, ort_run_options

BATCH_DIM = "batch"  # the dynamic dim name of every diffusion part (export/diffusion/onnx_export.py)
MAX_GRAPH_BATCHES = 6  # a fused loop of 3 requests under CFG: batches 2, 4, 6


@dataclass
class DeviceContext:
    """Where a pipeline's device path runs: a torch device and (CUDA) the stream every part and
    every torch op of the loop run on, so they are ordered without host synchronisation."""

    device: Any  # torch.device
    stream: Any = None  # torch.cuda.Stream on CUDA

    @staticmethod
    def make(device: str) -> "DeviceContext":
        """'cpu' -> the CPU provider over CPU tensors; 'cuda' / 'cuda:N' -> ORT CUDA on GPU N."""
        import torch

        if device == "cpu":
            return DeviceContext(torch.device("cpu"))
        from ember.runtime.cuda_session import _ort_cuda, parse_device

        index = parse_device(device)
        _ort_cuda()
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
        return DeviceContext(dev, torch.cuda.Stream(dev))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def index(self) -> int:
        return self.device.index or 0

    def active(self):
        """Run the body on the context's stream (CUDA) or as is (CPU)."""
        if self.stream is None:
            return contextlib.nullcontext()
        import torch

        return torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


_TORCH_OF_ORT = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                 "tensor(int32)": "int32"}


@dataclass
class _Graph:
    """One captured CUDA graph: its session, static buffers, binding and run options."""

    sess: Any
    inputs: dict[str, Any]
    outputs: list[Any]
    binding: Any
    run_options: Any


class DevicePartSession:
    """One engine part on ``ctx``. ``run(feeds)`` takes torch tensors (any float dtype, any device)
    and returns the outputs in the manifest's order as fresh tensors on ``ctx.device``."""

    def __init__(self, folder: Path, part: EnginePart, ctx: DeviceContext, threads: int | None = None,
                 backend: str | None = None, cuda_graph: bool = False, max_graph_batches: int = MAX_GRAPH_BATCHES,
                 conv_algo: str = "HEURISTIC") -> None:
        import torch

        if runs_plan(part, backend):
            raise InputError(f"{folder}: part {part.name!r} is a {PLAN_TITLES[part.backend]} plan ({part.file}); the "
                             f"diffusion device path runs ONNX Runtime only: load with backend='onnxruntime'")
        if part.backend != "onnxruntime" and not is_plan(part):
            raise ArtifactError(f"part {part.name!r} was built for {part.backend}; recompile the folder")
        self.torch, self.ctx, self.name = torch, ctx, part.name
        self.path = onnx_graph(Path(folder), part)
        self.threads, self.conv_algo = threads, conv_algo
        self.disabled_optimizers = list(part.extra.get("ort_disabled_optimizers") or [])
        self.max_graph_batches = max_graph_batches
        self.cuda_graph_status = "off"
        self.graph_mode: str | None = None  # "shared" | "per-batch" while graphs are on
        self.sess = None
        if cuda_graph:
            try:
                self.sess = self._session(None, graph=True)
                self.cuda_graph_status, self.graph_mode = "on", "shared"
            except Exception as e:  # ORT refuses graphs when a node needs a copy to or from the CPU
                self.cuda_graph_status, self.graph_mode = "on", "per-batch"
                self.shared_refusal = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if self.sess is None:
            self.sess = self._session(None)
        have = {i.name for i in self.sess.get_inputs()}
        if have != {t.name for t in part.inputs}:
            raise ArtifactError(f"{folder / part.file}: graph inputs {sorted(have)} differ from the manifest's "
                                f"{sorted(t.name for t in part.inputs)}; recompile")
        self.input_dtypes = {i.name: getattr(torch, _TORCH_OF_ORT[i.type]) for i in self.sess.get_inputs()}
        outs = {o.name: o for o in self.sess.get_outputs()}
        self.outputs = [(t.name, getattr(torch, _TORCH_OF_ORT[outs[t.name].type])) for t in part.outputs]
        self._out_dims: list[list[int]] | None = None  # each output's dims after the batch (learned on first run)
        self._graphs: dict[int, _Graph] = {}
        self.use_graphs = True  # False: plain launches though graphs are on (what benchmarks compare against)
        # In a graph-enabled session a run without a graph id is captured as graph 0 and replayed
        # for every later such run, whatever its shapes: -1 opts out of capture.
        self._plain = self._run_options(-1 if self.graph_mode == "shared" else None)

    @property
    def graph_batches(self) -> list[int]:
        return sorted(self._graphs)

    # -- sessions --------------------------------------------------------------------------
    def _session(self, batch: int | None, graph: bool = False):
        """A session over the dynamic batch (``batch`` None) or with the batch fixed at ``batch``
        (its shape arithmetic folds to constants); ``graph``: CUDA graphs enabled."""
        import onnxruntime as ort

        from ember.ort.session import session_options

        so = session_options(self.threads, None)
        if batch is not None:
            so.add_free_dimension_override_by_name(BATCH_DIM, batch)
        kwargs = {"disabled_optimizers": self.disabled_optimizers} if self.disabled_optimizers else {}
        if not self.ctx.is_cuda:
            providers: list = ["CPUExecutionProvider"]
        else:
            opts = {"device_id": str(self.ctx.index), "user_compute_stream": str(self.ctx.stream.cuda_stream),
                    "cudnn_conv_algo_search": self.conv_algo, "enable_cuda_graph": "1" if graph else "0",
                    "use_tf32": "0"}
            providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        try:
            sess = ort.InferenceSession(str(self.path), so, providers=providers, **kwargs)
        except Exception as e:  # ORT's own exception types
            if graph:
                raise
            raise ArtifactError(f"{self.path} could not be loaded by ONNX Runtime ({e}); recompile the folder") from e
        if self.ctx.is_cuda and "CUDAExecutionProvider" not in sess.get_providers():
            raise ConfigError("ONNX Runtime could not start its CUDA provider (CUDA / cuDNN libraries not found?); "
                              "install onnxruntime-gpu's CUDA dependencies (pip install onnxruntime-gpu[cuda,cudnn])")
        return sess

    def _run_options(self, graph_id: int | None):
        """``cuda_session.ort_run_options``: no synchronisation at the end of a CUDA run (ordered on
        the stream; the host reads results through synchronising copies)."""
        return ort_run_options(graph_id, async_launch=self.ctx.is_cuda)

    # -- binding ---------------------------------------------------------------------------
    def _bind(self, binding, name: str, t, output: bool = False) -> None:
        kind = "cuda" if self.ctx.is_cuda else "cpu"
        args = (name, kind, self.ctx.index, _np_of(t), list(t.shape), t.data_ptr())
        (binding.bind_output if output else binding.bind_input)(*args)

    def _alloc_outputs(self, inputs: dict) -> list:
        """Output tensors for a run over ``inputs``. The dims after the batch are not all in the
        graph (symbolic after export): the first run lets ORT allocate and reads them off."""
        torch = self.torch
        batch = int(next(iter(inputs.values())).shape[0])
        if self._out_dims is None:
            binding = self.sess.io_binding()
            for name, t in inputs.items():
                self._bind(binding, name, t)
            for name, _ in self.outputs:
                binding.bind_output(name, "cuda" if self.ctx.is_cuda else "cpu", self.ctx.index)
            self.sess.run_with_iobinding(binding, self._plain)
            self._out_dims = [list(v.shape())[1:] for v in binding.get_outputs()]
        return [torch.empty([batch, *dims], dtype=dtype, device=self.ctx.device)
                for (_, dtype), dims in zip(self.outputs, self._out_dims)]

    def _binding(self, sess, inputs: dict, outputs: list):
        binding = sess.io_binding()
        for name, t in inputs.items():
            self._bind(binding, name, t)
        for (name, _), t in zip(self.outputs, outputs):
            self._bind(binding, name, t, output=True)
        return binding

    # -- running ---------------------------------------------------------------------------
    def run(self, feeds: dict[str, Any]) -> list:
        unknown = set(feeds) - set(self.input_dtypes)
        if unknown:
            raise InputError(f"part {self.name!r} has no inputs {sorted(unknown)}; it takes {sorted(self.input_dtypes)}")
        batch = int(next(iter(feeds.values())).shape[0])
        g = self._graph(batch, feeds) if self.cuda_graph_status == "on" and self.use_graphs else None
        if g is not None:
            for name, t in feeds.items():
                g.inputs[name].copy_(t)
            g.sess.run_with_iobinding(g.binding, g.run_options)
            return [o.clone() for o in g.outputs]  # the graph's buffers are overwritten by its next replay
        inputs = self._device_inputs(feeds)
        outputs = self._alloc_outputs(inputs)
        self.sess.run_with_iobinding(self._binding(self.sess, inputs, outputs), self._plain)
        return outputs

    def run_host(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``run`` from and to host arrays (calibration's numpy feeds), on the context's stream,
        synchronised before the outputs are read."""
        torch = self.torch
        with self.ctx.active():
            outs = self.run({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feeds.items()})
            self.ctx.synchronize()
            return [o.cpu().numpy() for o in outs]

    def _device_inputs(self, feeds: dict) -> dict:
        return {n: t.to(device=self.ctx.device, dtype=self.input_dtypes[n]).contiguous() for n, t in feeds.items()}

    def _graph(self, batch: int, feeds: dict) -> _Graph | None:
        """The captured graph of ``batch`` (made on first use; None: run the dynamic session)."""
        g = self._graphs.get(batch)
        if g is not None or len(self._graphs) >= self.max_graph_batches:
            return g
        try:
            if self.graph_mode == "shared":  # one session, a graph id per batch size
                sess, ro = self.sess, self._run_options(len(self._graphs) + 1)
            else:
                sess, ro = self._session(batch, graph=True), self._run_options(None)
            inputs = {n: t.clone() for n, t in self._device_inputs(feeds).items()}  # the graph's static buffers
            outputs = self._alloc_outputs(inputs)
            g = _Graph(sess, inputs, outputs, self._binding(sess, inputs, outputs), ro)
            sess.run_with_iobinding(g.binding, ro)  # warm-up and capture
        except Exception as e:  # ORT refuses graphs when a node is placed on the CPU, and so on
            why = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            if self.graph_mode == "per-batch" and getattr(self, "shared_refusal", None):
                why = f"{self.shared_refusal}; per batch: {why}"
            self.cuda_graph_status, self.graph_mode = f"unavailable: {why}", None
            return None
        self._graphs[batch] = g
        return g
