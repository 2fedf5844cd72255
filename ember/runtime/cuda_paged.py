"""The paged step graph (the folder's ``paged`` part, ``paged_step.onnx``) as a ``PagedExecutor``
(``executor_protocol.py``, docs/kv.md): ONNX Runtime's ``com.microsoft.PagedAttention`` over one
block pool per layer, on the CUDA provider.

One graph runs every step, prefill chunks and decodes of many sequences packed into one call
(``engine_format.paged_feeds``), so the device holds one copy of the weights: the step graph
and the fused decode part are not loaded. The pools are torch tensors [num_blocks, block_size,
Hkv, D] of the part's KV dtype (float16, or int8 / float8_e4m3fn from ``--kv-dtype``), each bound as both the layer's ``*_cache`` input and ``*_cache_out`` output:
the operator writes the new tokens' K/V into their blocks in place. The executor keeps no
per-sequence state; the scheduler's ``BlockManager`` says which block holds which token.

``PagedGraphExecutor`` is independent of the session that runs the graph (``run(feeds, pools)``
-> device logits): ``CudaPagedSession`` on the GPU; the CPU tests use the numpy reference of
the operator.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from onnx import TensorProto

from ember.engine_format.paged_feeds import HOST_BOUNDS, cache_bindings, pack_rows
from ember.errors import ConfigError, InputError
from ember.runtime.cuda_session import PendingGreedy, _ort_cuda
from ember.runtime.device_kv_pool import require_torch

# a pool's dtype (the part's key_cache spec; torch's name for it too) -> the ONNX element type that
# IOBinding.bind_input takes in place of a numpy type (numpy has no float8)
POOL_DTYPES = {"float16": TensorProto.FLOAT16, "int8": TensorProto.INT8, "float8_e4m3fn": TensorProto.FLOAT8E4M3FN}


class PagedGraphSession(Protocol):
    """What ``PagedGraphExecutor`` needs from a session of the paged graph."""

    host_bounds: bool  # the graph takes ``attention_metadata``

    def run(self, feeds: dict[str, np.ndarray], pools: dict[str, Any]) -> Any:
        """One call: host ``feeds`` (``pack_rows``), the pools by input name (updated in place);
        returns the logits [B, V] float32 as a torch tensor."""
        ...


class CudaPagedSession:
    """``paged_step.onnx`` on ONNX Runtime's CUDA provider, pools and logits in device memory."""

    def __init__(self, path, num_layers: int, vocab: int, device_index: int = 0):
        ort = _ort_cuda()
        self.torch = require_torch()
        self.device_index, self.vocab = device_index, vocab
        self.device = self.torch.device("cuda", device_index)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", {"device_id": device_index})])
        except Exception as e:
            raise ConfigError(f"{path}: ONNX Runtime {ort.__version__} could not load the paged step graph "
                              f"({str(e).splitlines()[0][:300]}); it needs onnxruntime-gpu >= 1.31 "
                              "(com.microsoft.PagedAttention), or load with kv_layout='slots'") from None
        if "CUDAExecutionProvider" not in self.sess.get_providers():
            raise ConfigError(f"{path}: ONNX Runtime did not place the paged step graph on CUDA")
        names = [i.name for i in self.sess.get_inputs()]
        self.host_bounds = HOST_BOUNDS in names
        self.bindings = cache_bindings(num_layers)

    def run(self, feeds: dict[str, np.ndarray], pools: dict[str, Any]):
        torch, idx = self.torch, self.device_index
        io = self.sess.io_binding()
        keep = []  # device copies of the small inputs, alive until the run is done
        for name, a in feeds.items():
            if name == HOST_BOUNDS:
                io.bind_cpu_input(name, a)  # host memory, by the operator's contract
                continue
            t = torch.from_numpy(a).to(self.device)
            keep.append(t)
            io.bind_input(name, "cuda", idx, a.dtype.type, tuple(t.shape), t.data_ptr())
        for cache_in, cache_out in self.bindings:
            t = pools[cache_in]
            kind = POOL_DTYPES[str(t.dtype).removeprefix("torch.")]
            io.bind_input(cache_in, "cuda", idx, kind, tuple(t.shape), t.data_ptr())
            io.bind_output(cache_out, "cuda", idx, kind, tuple(t.shape), t.data_ptr())
        b = len(feeds["past_seqlens"])
        logits = torch.empty((b, self.vocab), dtype=torch.float32, device=self.device)
        io.bind_output("logits", "cuda", idx, np.float32, tuple(logits.shape), logits.data_ptr())
        self.sess.run_with_iobinding(io)
        return logits


class PagedGraphExecutor:
    """The ``PagedExecutor`` protocol over a paged-graph session and its block pools."""

    supports_chaining = False  # paged plans are never chained (docs/kv.md)
    mixed_steps = True  # prefill chunks and decodes in one call: the rows are packed, no padding is computed

    def __init__(self, session: PagedGraphSession, num_layers: int, kv_heads: int, head_dim: int,
                 num_blocks: int, block_size: int, device: str = "cuda:0", kv_dtype: str = "float16"):
        torch = require_torch(need_cuda=device != "cpu")
        if kv_dtype not in POOL_DTYPES:
            raise ConfigError(f"the paged graph's KV pools are {kv_dtype}; this runtime holds {', '.join(POOL_DTYPES)}")
        self.session, self.num_blocks, self.block_size = session, num_blocks, block_size
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.pools = {name: torch.zeros(shape, dtype=getattr(torch, kv_dtype), device=device)
                      for name, _ in cache_bindings(num_layers)}

    def launch_paged(self, input_ids: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray,
                     new_lengths: np.ndarray, block_tables: np.ndarray, logit_rows=()) -> PendingGreedy:
        """Rows as in ``PagedExecutor.launch_paged``; the graph rotates each token at its position
        ``past + i``, so ``positions`` must say the same (an InputError otherwise)."""
        new = np.asarray(new_lengths, dtype=np.int64)
        past = np.asarray(past_lengths, dtype=np.int64)
        tokens = [np.asarray(input_ids[r, :n]) for r, n in enumerate(new)]
        for r, n in enumerate(new):
            if not np.array_equal(positions[r, :n], past[r] + np.arange(n)):
                raise InputError(f"paged step row {r}: positions {positions[r, :n].tolist()} are not its past length "
                                 f"{int(past[r])} onward, which the paged graph assumes")
        feeds = pack_rows(tokens, past, block_tables, self.block_size, host_bounds=self.session.host_bounds)
        return PendingGreedy(self.session.run(feeds, self.pools), logit_rows)

    @property
    def pool_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pools.values())

    def maybe_shrink(self) -> None:
        pass  # the pool is sized once, from the KV budget

    def close(self) -> None:
        self.pools = {}
