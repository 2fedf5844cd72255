"""The paged step graph (the folder's ``paged`` part, ``paged_step.onnx``) as a ``PagedExecutor``
(``executor_protocol.py``, docs/kv.md): ONNX Runtime's ``com.microsoft.PagedAttention`` over one
block pool per layer, on the CUDA provider.

One graph runs every step, prefill chunks and decodes of many sequences packed into one call
(``engine_format.paged_feeds``), so the device holds one copy of the weights: the step graph
and the fused decode part are not loaded. Decode-only calls replay CUDA graphs captured in the
same session (``paged_graphs``). The pools are torch tensors [num_blocks, block_size, Hkv, D]
of the part's KV dtype (float16, or int8 / float8_e4m3fn from ``--kv-dtype``), each bound as
both the layer's ``*_cache`` input and ``*_cache_out`` output: the operator writes the new
tokens' K/V into their blocks in place. The executor keeps no per-sequence state; the
scheduler's ``BlockManager`` says which block holds which token.

``PagedGraphExecutor`` is independent of the session that runs the graph (``run(feeds, pools)``
-> device logits): ``cuda_paged_session`` (``OrtPagedRunner`` under ``paged_graphs.PagedSession``)
on the GPU; the CPU tests use the numpy reference of the operator, under the same
``PagedSession`` or alone.
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
from onnx import TensorProto

from ember.engine_format.paged_feeds import HOST_BOUNDS, cache_bindings, pack_rows
from ember.errors import ConfigError, InputError
from ember.runtime.cuda_session import PendingGreedy, _np_of, _ort_cuda, joined_stream, ort_run_options
from ember.runtime.device_kv_pool import require_torch
from ember.runtime.paged_graphs import PagedSession

# a pool's dtype (the part's key_cache spec; torch's name for it too) -> the ONNX element type that
# IOBinding.bind_input takes in place of a numpy type (numpy has no float8)
POOL_DTYPES = {"float16": TensorProto.FLOAT16, "int8": TensorProto.INT8, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN}


class PagedGraphSession(Protocol):
    """What ``PagedGraphExecutor`` needs from a session of the paged graph."""

    host_bounds: bool  # the graph takes ``attention_metadata``
    scratch_blocks: int  # blocks the executor adds past the scheduler's at the end of each pool, for the session

    def run(self, feeds: dict[str, np.ndarray], pools: dict[str, Any], device_ids: Any = None) -> Any:
        """One call: host ``feeds`` (``pack_rows``), the pools by input name (updated in place);
        returns the logits [B, V] float32 as a torch tensor. ``device_ids``: the ids as a tensor
        (a chained decode call; those in ``feeds`` are placeholders)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Its counters for ``engine.stats()`` (CUDA graphs); may be empty."""
        ...

    def forget_graphs(self) -> None:
        """Drop whatever was captured over the pools being freed (a no-op where nothing is)."""
        ...


class OrtPagedRunner:
    """``paged_step.onnx`` on ONNX Runtime's CUDA provider (``paged_graphs.PagedRunner``): a
    stream of its own (``user_compute_stream``: graphs cannot be captured on the legacy default
    stream), every input and output bound to device memory through IOBinding.

    Allocation (docs/gpu.md, "Device memory"): initializers in exact-size device allocations
    (``session.use_device_allocator_for_initializers``), the arena grown by what is asked
    (``kSameAsRequested``, not the next power of two), no memory pattern (shapes change every
    call). ``graphs``: made with ``enable_cuda_graph``."""

    def __init__(self, path, device_index: int, graphs: bool, async_launch: bool):
        ort = _ort_cuda()
        self.torch = require_torch()
        self.path, self.device_index, self.graphs, self.async_launch = path, device_index, graphs, async_launch
        self.device = self.torch.device("cuda", device_index)
        self.torch.cuda.set_device(self.device)
        self.stream = self.torch.cuda.Stream(self.device)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_mem_pattern = False
        so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        opts = {"device_id": str(device_index), "user_compute_stream": str(self.stream.cuda_stream),
                "arena_extend_strategy": "kSameAsRequested", "enable_cuda_graph": "1" if graphs else "0",
                "use_tf32": "0"}
        self.sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", opts)])
        if "CUDAExecutionProvider" not in self.sess.get_providers():
            raise ConfigError(f"{path}: ONNX Runtime did not place the paged step graph on CUDA")
        self.input_names = [i.name for i in self.sess.get_inputs()]
        # in a graph-enabled session a run naming no graph id is captured as graph 0: -1 opts out
        self._plain = ort_run_options(-1 if graphs else None, async_launch)
        self._graph_options: dict[int, Any] = {}

    def ordered(self):
        return joined_stream(self.stream, self.device)

    def bind(self, device_feeds: dict[str, Any], host_feeds: dict[str, np.ndarray], pools: dict[str, Any], logits):
        io, idx = self.sess.io_binding(), self.device_index
        for name, t in device_feeds.items():
            io.bind_input(name, "cuda", idx, _np_of(t), tuple(t.shape), t.data_ptr())
        for name, a in host_feeds.items():
            io.bind_cpu_input(name, a)  # host memory, by the operator's contract
        for cache_in, cache_out in cache_bindings(len(pools) // 2):
            t = pools[cache_in]
            kind = POOL_DTYPES[str(t.dtype).removeprefix("torch.")]
            io.bind_input(cache_in, "cuda", idx, kind, tuple(t.shape), t.data_ptr())
            io.bind_output(cache_out, "cuda", idx, kind, tuple(t.shape), t.data_ptr())
        io.bind_output("logits", "cuda", idx, np.float32, tuple(logits.shape), logits.data_ptr())
        return _Binding(io, [device_feeds, host_feeds])

    def rebind(self, binding, device_feeds: dict[str, Any], host_feeds: dict[str, np.ndarray], logits) -> None:
        io, idx = binding.io, self.device_index  # a name bound again replaces its earlier binding
        for name, t in device_feeds.items():
            io.bind_input(name, "cuda", idx, _np_of(t), tuple(t.shape), t.data_ptr())
        for name, a in host_feeds.items():
            io.bind_cpu_input(name, a)
        io.bind_output("logits", "cuda", idx, np.float32, tuple(logits.shape), logits.data_ptr())
        binding.keep = [device_feeds, host_feeds]

    def run(self, binding, graph_id: int | None) -> None:
        if graph_id is None:
            ro = self._plain
        else:
            ro = self._graph_options.get(graph_id)
            if ro is None:
                ro = self._graph_options[graph_id] = ort_run_options(graph_id, self.async_launch)
        self.sess.run_with_iobinding(binding.io, ro)

    def without_graphs(self) -> OrtPagedRunner:
        self.sess = None  # its weights go before the new session's arrive
        return OrtPagedRunner(self.path, self.device_index, graphs=False, async_launch=self.async_launch)


class _Binding:
    """An IOBinding and what it points at (kept alive as long as a captured graph may replay it)."""

    def __init__(self, io, keep: list):
        self.io, self.keep = io, keep


def cuda_paged_session(path, vocab: int, max_rows: int, max_blocks: int, device_index: int = 0,
                       cuda_graph: bool | None = None) -> PagedSession:
    """The paged step graph on ONNX Runtime CUDA as a ``PagedGraphSession``: decode-only calls
    replay CUDA graphs (``paged_graphs``) unless ``cuda_graph`` is False (None: on, unless
    ``EMBER_CUDA_GRAPH=0``); when ONNX Runtime refuses them the session launches plainly and its
    ``cuda_graph_status`` says why. ``max_rows`` / ``max_blocks``: the scheduler's max_batch and
    block-table width (``max_seq_len`` / block size)."""
    if cuda_graph is None:
        cuda_graph = os.environ.get("EMBER_CUDA_GRAPH", "1") != "0"
    async_launch = os.environ.get("EMBER_ASYNC_LAUNCH", "1") != "0"
    status, runner = "off", None
    if cuda_graph:
        try:
            runner, status = OrtPagedRunner(path, device_index, True, async_launch), "on"
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 -- e.g. a node ONNX Runtime places on the CPU: plain launches
            status = f"unavailable: {str(e).splitlines()[0][:300]}"
    if runner is None:
        try:
            runner = OrtPagedRunner(path, device_index, False, async_launch)
        except ConfigError:
            raise
        except Exception as e:
            import onnxruntime as ort

            raise ConfigError(f"{path}: ONNX Runtime {ort.__version__} could not load the paged step graph "
                              f"({str(e).splitlines()[0][:300]}); it needs onnxruntime-gpu >= 1.31 "
                              "(com.microsoft.PagedAttention), or load with kv_layout='slots'") from None
    return PagedSession(runner, vocab, runner.device, max_rows, max_blocks,
                        host_bounds=HOST_BOUNDS in runner.input_names, cuda_graph_status=status)


class PagedGraphExecutor:
    """The ``PagedExecutor`` protocol over a paged-graph session and its block pools.

    Each pool holds the scheduler's ``num_blocks`` plus the session's ``scratch_blocks`` (the
    decode graphs' padding rows write there); a session with scratch blocks captures its first
    decode graph here, on a padding row alone, so a refusal shows in ``stats()`` at load.
    ``memory_plan``: the loader's ``paged_memory.memory_plan``, reported by ``stats()``."""

    supports_chaining = True  # a pure-decode step runs behind the last, its ids that step's argmax on the device
    mixed_steps = True  # prefill chunks and decodes in one call: the rows are packed, no padding is computed

    def __init__(self, session: PagedGraphSession, num_layers: int, kv_heads: int, head_dim: int,
                 num_blocks: int, block_size: int, device: str = "cuda:0", kv_dtype: str = "float16"):
        torch = require_torch(need_cuda=device != "cpu")
        if kv_dtype not in POOL_DTYPES:
            raise ConfigError(f"the paged graph's KV pools are {kv_dtype}; this runtime holds {', '.join(POOL_DTYPES)}")
        self.session, self.num_blocks, self.block_size = session, num_blocks, block_size
        self.memory_plan: dict | None = None
        shape = (num_blocks + session.scratch_blocks, block_size, kv_heads, head_dim)
        dtype = {"float16": torch.float16, "int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}[kv_dtype]
        self.pools = {name: torch.zeros(shape, dtype=dtype, device=device)
                      for name, _ in cache_bindings(num_layers)}
        if session.scratch_blocks:
            scratch = np.array([[num_blocks]], np.int32)
            PendingGreedy(session.run(pack_rows([np.zeros(1, np.int64)], np.zeros(1, np.int64), scratch, block_size,
                                                host_bounds=session.host_bounds), self.pools)).result()

    def launch_paged(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray,
                     new_lengths: np.ndarray, block_tables: np.ndarray, logit_rows=(),
                     chain: PendingGreedy | None = None) -> PendingGreedy:
        """Rows as in ``PagedExecutor.launch_paged``; the graph rotates each token at its position
        ``past + i``, so ``positions`` must say the same (an InputError otherwise). ``chain``: the
        ids are its argmax, on the device (one token per row)."""
        new = np.asarray(new_lengths, dtype=np.int64)
        past = np.asarray(past_lengths, dtype=np.int64)
        tokens = [np.asarray(input_ids[r, :n]) for r, n in enumerate(new)]
        for r, n in enumerate(new):
            if not np.array_equal(positions[r, :n], past[r] + np.arange(n)):
                raise InputError(f"paged step row {r}: positions {positions[r, :n].tolist()} are not its past length "
                                 f"{int(past[r])} onward, which the paged graph assumes")
        feeds = pack_rows(tokens, past, block_tables, self.block_size, host_bounds=self.session.host_bounds)
        device_ids = None
        if chain is not None:
            device_ids = chain.device_tokens.reshape(-1)
            if len(device_ids) != len(new) or (new != 1).any():
                raise ValueError(f"a chained paged call feeds one token per row of the call it follows "
                                 f"({len(device_ids)} rows); got {new.tolist()}")
        return PendingGreedy(self.session.run(feeds, self.pools, device_ids=device_ids), logit_rows)

    @property
    def pool_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pools.values())

    def stats(self) -> dict[str, Any]:
        """The session's counters (CUDA graphs: status, captures, replays) and the memory plan."""
        out = dict(self.session.stats())
        if self.memory_plan is not None:
            out["memory_plan"] = self.memory_plan
        return out

    def maybe_shrink(self) -> None:
        pass  # the pool is sized once, from the KV budget

    def close(self) -> None:
        self.pools = {}
        self.session.forget_graphs()
