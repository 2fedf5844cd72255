"""The paged engine's device-memory plan (docs/gpu.md, "Device memory"): what the paged layout
holds on the GPU besides the CUDA context, as a formula the benchmark compares with nvidia-smi.

    peak ~= context + W + P + L + A

W: the paged graph's weights, one copy (ONNX Runtime puts initializers in exact-size device
allocations: ``session.use_device_allocator_for_initializers``); P: the block pools (the
scheduler's blocks plus the decode graphs' scratch block); L: the logits buffer [rows, V]
float32 and the decode graphs' static inputs; A: ONNX Runtime's arena at its high-water mark,
the activations of the largest packed call (``kSameAsRequested``: the arena grows by what is
asked, not to the next power of two). A is estimated per layer (ONNX Runtime frees a layer's
intermediates before the next) from the largest call the scheduler makes: ``max_tokens`` packed
tokens over ``max_rows`` rows holding up to ``max_seq_len`` tokens each:

    A ~= N (3C + (H + 2Hkv) D + (H + Hkv) D + H D) 2        residual stream, QKV, rotary prologue, output
       + max(N 3I 2,  2 R K H D 2 + N H D 4)                 MLP | attention's dense K/V + accumulator
       + R V 2                                               lm_head's fp16 logits

(bytes; N tokens, R rows, K KV-length bound, C hidden, I intermediate, H / Hkv heads, D head
size, V vocabulary). The dense K/V term is PagedAttention's gathering backend (prefill and
mixed calls when FlashAttention cannot read the pool: FP16 pools of blocks smaller than
FlashAttention's tile, e.g. 16-token blocks at head size 64), which ONNX Runtime sizes
``rows x KV bound`` when ``attention_metadata`` gives the bounds: it is an upper estimate, and
usually the largest term for many-row mixed calls. The context (driver, cuBLAS / cuDNN
handles, kernels) is measured, not planned: ``benchmarks/gpu_paged.py``'s ``memory`` section.
"""
from __future__ import annotations

from pathlib import Path

import onnx

FP16, FP32 = 2, 4
_ITEMSIZE = {onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.FLOAT: 4,
             onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT64: 8,
             onnx.TensorProto.INT32: 4, onnx.TensorProto.FLOAT8E4M3FN: 1, onnx.TensorProto.DOUBLE: 8}


def weight_bytes(path: str | Path) -> int:
    """Bytes of the graph's initializers, from its protobuf alone (external data is not read)."""
    proto = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in proto.graph.initializer:
        n = 1
        for d in t.dims:
            n *= d
        total += n * _ITEMSIZE.get(t.data_type, 4)
    return total


def activation_bytes(cfg: dict, max_tokens: int, max_rows: int, max_seq_len: int) -> dict[str, int]:
    """ONNX Runtime's workspace for the largest packed call (the module's formula for A), by term."""
    c, i, v = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    h, hkv = int(cfg["num_heads"]), int(cfg["num_kv_heads"])
    d = int(cfg.get("head_dim") or c // h)
    n, r, k = max_tokens, max_rows, max_seq_len
    dense = n * (3 * c + (h + 2 * hkv) * d + (h + hkv) * d + h * d) * FP16
    mlp = n * 3 * i * FP16
    attention = 2 * r * k * h * d * FP16 + n * h * d * FP32
    return {"dense": dense, "mlp": mlp, "attention_gather": attention, "lm_head": r * v * FP16,
            "total": dense + max(mlp, attention) + r * v * FP16}


def memory_plan(cfg: dict, weights: int, pools: int, buffers: int, max_tokens: int, max_rows: int,
                max_seq_len: int) -> dict[str, int | dict]:
    """The plan (bytes): ``weights`` W, ``pools`` P, ``buffers`` L (logits, static inputs), the
    activation estimate A for the largest call; ``planned`` = W + P + L + A (the CUDA context aside)."""
    act = activation_bytes(cfg, max_tokens, max_rows, max_seq_len)
    return {"weights": weights, "pools": pools, "buffers": buffers, "activations": act["total"],
            "activation_terms": act, "largest_call": {"tokens": max_tokens, "rows": max_rows, "kv_bound": max_seq_len},
            "planned": weights + pools + buffers + act["total"]}
