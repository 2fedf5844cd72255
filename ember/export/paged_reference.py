"""The paged step graph on the CPU: numpy semantics of the ONNX Runtime contrib operators it
uses, for ``onnx.reference.ReferenceEvaluator`` (``PagedAttention`` has only a CUDA kernel).

``PagedAttention`` follows the operator's schema (onnxruntime ``com.microsoft`` opset 1) for
the inputs the paged step graph uses (indices 0-9): packed or separate Q/K/V, rotary at
position ``past_seqlens[b] + j`` from the cos/sin caches (non-interleaved, the first
2 * cos_cache.shape[1] features of each head), the new tokens' K/V written into their slots
``block_table[b, p // block_size] * block_size + p % block_size`` before attending, causal
attention over each sequence's ``past_seqlens[b] + n_b`` keys, ``scale`` (0: 1/sqrt(D)),
``softcap`` (scores -> cap * tanh(scores / cap)) and ``local_window_size`` w (a query at
position q sees keys k > q - w, as the CUDA kernel passes w - 1 to FlashAttention's left
window). Scores and softmax in float32, outputs in the query's dtype, as the CUDA kernels.
Quantized caches (int8 / float8e4m3fn, inputs 14-15 ``k_scale`` / ``v_scale``, PER_TENSOR [1] or
PER_CHANNEL [Hkv, 1, D]): each new K/V is stored as ``saturate(round(x / scale))`` (ties to even)
and every cached one read back as ``q * scale`` (``export/kv_quant.py``).

The evaluator cannot alias outputs to inputs: ``key_cache_out`` / ``value_cache_out`` are new
arrays holding the updated pools, which the caller feeds to the next call.

``ReplayingReferenceRunner`` runs the graph under ``runtime/paged_graphs.PagedSession`` on the
CPU with ONNX Runtime's CUDA-graph semantics (capture on a graph id's first run, replay of the
captured buffers after), so the decode graphs' control flow is checked without a GPU.
"""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from ember.engine_format.paged_feeds import HOST_BOUNDS, cache_bindings
from ember.export.kv_quant import dequantize, quantize


class PagedAttention(OpRun):
    op_domain = "com.microsoft"

    def _run(self, query, key=None, value=None, key_cache=None, value_cache=None, cumulative_sequence_length=None,
             past_seqlens=None, block_table=None, cos_cache=None, sin_cache=None, *later, num_heads=None,
             kv_num_heads=None, scale=0.0, softcap=0.0, local_window_size=-1, do_rotary=0, rotary_interleaved=0,
             k_quant_type="NONE", v_quant_type="NONE", k_cache_dtype="", v_cache_dtype="", **other_attrs):
        if any(u is not None for u in later[:4]):  # attention_metadata (16) only bounds the work: ignored
            raise NotImplementedError("PagedAttention reference: slot_mapping, head_sink and q/k norm weights "
                                      "(inputs 10-13) are not modelled")
        if rotary_interleaved:
            raise NotImplementedError("PagedAttention reference: rotary_interleaved=1 is not modelled")
        k_scale, v_scale = (later[4] if len(later) > 4 else None), (later[5] if len(later) > 5 else None)
        k_store = _Storage(key_cache.dtype, k_quant_type, k_scale, k_cache_dtype, "key")
        v_store = _Storage(value_cache.dtype, v_quant_type, v_scale, v_cache_dtype, "value")
        h, hkv = int(num_heads), int(kv_num_heads)
        num_blocks, block_size, _, d = key_cache.shape
        n = query.shape[0]
        if key is None:  # packed [N, (H + 2Hkv) D]
            key, value = query[:, h * d:(h + hkv) * d], query[:, (h + hkv) * d:]
            query = query[:, :h * d]
        q = query.reshape(n, h, d).astype(np.float32)
        k = key.reshape(n, hkv, d).astype(np.float32)
        v = value.reshape(n, hkv, d)
        cum, past = cumulative_sequence_length.astype(np.int64), past_seqlens.astype(np.int64)
        seq_of = np.searchsorted(cum[1:], np.arange(n), side="right")  # each token's sequence
        pos = past[seq_of] + np.arange(n) - cum[seq_of]  # each token's position
        if do_rotary:  # in float32, rounded to T as the kernel's rotated K is
            q, k = _rotate(q, pos, cos_cache, sin_cache), _rotate(k, pos, cos_cache, sin_cache).astype(query.dtype)
        k_out, v_out = key_cache.copy(), value_cache.copy()
        blocks = block_table[seq_of, pos // block_size]
        if (blocks < 0).any() or (blocks >= num_blocks).any():
            raise ValueError(f"PagedAttention reference: a new token's position maps to block "
                             f"{int(blocks[(blocks < 0) | (blocks >= num_blocks)][0])} (pool of {num_blocks})")
        k_out[blocks, pos % block_size] = k_store.write(k)
        v_out[blocks, pos % block_size] = v_store.write(v)
        scale = float(scale) or 1.0 / np.sqrt(d)
        out = np.zeros((n, h, d), np.float32)
        for b in range(len(past)):
            lo, hi = int(cum[b]), int(cum[b + 1])
            total = int(past[b]) + hi - lo
            kpos = np.arange(total)
            slots = block_table[b, kpos // block_size]
            keys = k_store.read(k_out[slots, kpos % block_size])  # [L, Hkv, D] float32
            vals = v_store.read(v_out[slots, kpos % block_size])
            keys, vals = np.repeat(keys, h // hkv, axis=1), np.repeat(vals, h // hkv, axis=1)  # [L, H, D]
            scores = np.einsum("thd,khd->htk", q[lo:hi], keys) * scale  # [H, T, L]
            if softcap:
                scores = softcap * np.tanh(scores / softcap)
            qpos = pos[lo:hi].reshape(1, -1, 1)
            ok = kpos.reshape(1, 1, -1) <= qpos
            if local_window_size is not None and local_window_size > 0:
                ok &= qpos - kpos.reshape(1, 1, -1) < local_window_size
            scores = np.where(ok, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[lo:hi] = np.einsum("htk,khd->thd", probs, vals)
        return out.reshape(n, h * d).astype(query.dtype), k_out, v_out


class _Storage:
    """How one cache stores values: as its own float type, or quantized (int8 / float8 e4m3fn) with
    a symmetric dequantization scale (``export/kv_quant.py``), checked against the attributes."""

    def __init__(self, dtype: np.dtype, quant_type: str, scale, logical: str, which: str):
        self.dtype, self.scale = dtype, scale
        self.quantized = dtype.name in ("int8", "float8_e4m3fn")
        if logical and logical.replace("float8e4m3fn", "float8_e4m3fn") != dtype.name:
            raise ValueError(f"PagedAttention reference: {which[0]}_cache_dtype={logical!r} but the {which} cache "
                             f"is {dtype.name}")
        if self.quantized != (quant_type != "NONE"):
            raise ValueError(f"PagedAttention reference: {which[0]}_quant_type={quant_type} with a {dtype.name} "
                             f"{which} cache (the schema: non-NONE exactly when the cache is quantized)")
        if not self.quantized:
            return
        want = (1,) if quant_type == "PER_TENSOR" else None
        if scale is None or (want is not None and scale.shape != want) or (want is None and scale.ndim != 3):
            raise ValueError(f"PagedAttention reference: {which[0]}_scale of shape "
                             f"{None if scale is None else scale.shape} does not fit {which[0]}_quant_type={quant_type}")

    def write(self, x: np.ndarray) -> np.ndarray:
        return quantize(x, self.scale, self.dtype.name) if self.quantized else x.astype(self.dtype)

    def read(self, stored: np.ndarray) -> np.ndarray:
        return dequantize(stored, self.scale) if self.quantized else stored.astype(np.float32)


def _rotate(x: np.ndarray, pos: np.ndarray, cos_cache: np.ndarray, sin_cache: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of the first 2 * cos_cache.shape[1] features of x [N, heads, D] (float32)."""
    half = cos_cache.shape[1]
    cos = cos_cache[pos].astype(np.float32)[:, None, :]
    sin = sin_cache[pos].astype(np.float32)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], axis=-1)


def _rms(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    x32 = x.astype(np.float32)
    return x32 / np.sqrt((x32 * x32).mean(-1, keepdims=True) + eps) * gamma.astype(np.float32)


class SimplifiedLayerNormalization(OpRun):
    op_domain = ""

    def _run(self, x, scale, axis=-1, epsilon=1e-5, stash_type=1):
        if axis != -1 and axis != x.ndim - 1:
            raise NotImplementedError("SimplifiedLayerNormalization reference: only the last axis")
        return (_rms(x, scale, epsilon).astype(x.dtype),)


class SkipSimplifiedLayerNormalization(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, skip, gamma, bias=None, epsilon=1e-5):
        total = x.astype(np.float32) + skip.astype(np.float32)
        if bias is not None:
            total = total + bias.astype(np.float32)
        empty = np.zeros(0, np.float32)  # mean and inv_std_var: never read by the graph
        return _rms(total, gamma, epsilon).astype(x.dtype), empty, empty, total.astype(x.dtype)


class SkipLayerNormalization(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, skip, gamma, beta=None, bias=None, epsilon=1e-5):
        total = x.astype(np.float32) + skip.astype(np.float32)
        if bias is not None:
            total = total + bias.astype(np.float32)
        centred = total - total.mean(-1, keepdims=True)
        out = centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + epsilon) * gamma.astype(np.float32)
        if beta is not None:
            out = out + beta.astype(np.float32)
        empty = np.zeros(0, np.float32)
        return out.astype(x.dtype), empty, empty, total.astype(x.dtype)


class FastGelu(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, bias=None):
        x32 = x.astype(np.float32) + (0 if bias is None else bias.astype(np.float32))
        return ((0.5 * x32 * (1.0 + np.tanh(0.7978845608028654 * (x32 + 0.044715 * x32 ** 3)))).astype(x.dtype),)


class QuickGelu(OpRun):
    op_domain = "com.microsoft"

    def _run(self, x, alpha=1.702):
        x32 = x.astype(np.float32)
        return ((x32 / (1.0 + np.exp(-alpha * x32))).astype(x.dtype),)


CONTRIB_OPS = [PagedAttention, SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, SkipLayerNormalization,
               QuickGelu, FastGelu]


def reference_session(model: onnx.ModelProto) -> ReferenceEvaluator:
    """``onnx.reference`` evaluator of a paged step graph. Unused optional outputs (named "")
    get names of their own in a copy: the evaluator stores every output under its name, and a
    value stored under "" would stand in for every absent optional input after it."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        for j, out in enumerate(node.output):
            if not out:
                node.output[j] = f"{node.name}/unused{j}"
    return ReferenceEvaluator(model, new_ops=CONTRIB_OPS)


class ReplayingReferenceRunner:
    """``runtime/paged_graphs.PagedRunner`` on the CPU: the paged graph ``model`` through
    ``reference_session``, pools and buffers torch CPU tensors, with ONNX Runtime's CUDA-graph
    semantics. The first run of a graph id captures its binding; every later run of that id
    replays it -- it reads the *captured* buffers' current contents and host bounds, whatever
    binding it is handed -- and checks PagedAttention's contract that the captured bounds hold for
    the rows it serves (an AssertionError otherwise). ``refuse``: captures raise, as ONNX
    Runtime's do where it cannot capture."""

    def __init__(self, model: onnx.ModelProto, num_layers: int, graphs: bool = True, refuse: bool = False):
        self.model, self.num_layers, self.graphs, self.refuse = model, num_layers, graphs, refuse
        self.sess = reference_session(model)
        self.captured: dict[int, dict] = {}
        self.replays = self.rebinds = 0

    def ordered(self):
        return contextlib.nullcontext()

    def bind(self, device_feeds: dict, host_feeds: dict, pools: dict, logits) -> dict:
        return {"device": dict(device_feeds), "host": dict(host_feeds), "pools": dict(pools), "logits": logits}

    def rebind(self, binding: dict, device_feeds: dict, host_feeds: dict, logits) -> None:
        binding.update(device=dict(device_feeds), host=dict(host_feeds), logits=logits)
        self.rebinds += 1

    def run(self, binding: dict, graph_id: int | None) -> None:
        import torch

        if graph_id is not None:
            if not self.graphs:
                raise AssertionError("a graph id on a session made without CUDA graphs")
            if graph_id in self.captured:
                binding = self.captured[graph_id]
                self.replays += 1
            elif self.refuse:
                raise RuntimeError("CUDA graph capture is not supported for this graph (reference runner, refuse=True)")
            else:
                self.captured[graph_id] = binding
        feeds = {n: t.numpy() for n, t in binding["device"].items()} | binding["host"]
        new = np.diff(feeds["cumulative_sequence_length"])
        if HOST_BOUNDS in feeds:
            bounds = feeds[HOST_BOUNDS]
            if new.max() > bounds[0] or (feeds["past_seqlens"] + new).max() > bounds[1]:
                raise AssertionError(f"attention_metadata {bounds.tolist()} does not bound the call's rows "
                                     f"(new {new.tolist()}, past {feeds['past_seqlens'].tolist()})")
        outs = dict(zip(self.sess.output_names,
                        self.sess.run(None, {**feeds, **{k: v.numpy() for k, v in binding["pools"].items()}})))
        for cache_in, cache_out in cache_bindings(self.num_layers):
            binding["pools"][cache_in].copy_(torch.from_numpy(outs[cache_out]))
        binding["logits"].copy_(torch.from_numpy(outs["logits"]))

    def without_graphs(self) -> ReplayingReferenceRunner:
        return ReplayingReferenceRunner(self.model, self.num_layers, graphs=False)
