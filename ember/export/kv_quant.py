"""Quantized KV caches of the paged step graph (``--kv-dtype int8|fp8``, docs/kv.md "Quantized KV").

PagedAttention stores K/V as int8 or float8 e4m3fn with a symmetric **dequantization** scale
(no zero point): the operator writes ``saturate(round(x / scale))`` and reads ``q * scale``.
Ember sets the scales at compile time, per channel (``PER_CHANNEL``: float32 [Hkv, 1, D], one per
KV head and feature) as graph initializers feeding ``k_scale`` / ``v_scale``:
``scale = headroom * bound / QMAX`` (127 for int8, 448 for e4m3fn), where ``bound`` comes from the
torch step model run on calibration prompts and ``headroom`` is 1.25 for int8, 1 for fp8:

- V: the absolute maximum of each channel over every calibration token.
- K: the operator rotates K (RoPE, rotate-half over the whole head) *before* it writes the
  cache, so the cache holds rotated K at positions the calibration never saw. A rotation keeps
  the norm of each pair (i, i + D/2), so the bound of both channels of a pair is the largest
  pair norm ``sqrt(k_i^2 + k_{i+D/2}^2)`` over the calibration tokens: it covers rotated K at
  *every* position. (The step model returns K after its rotary; the pair norm is the same
  before and after.) Without rotary (GPT-2) K's bound is its per-channel absmax, as V's.

Headroom: a calibration bound is the largest value a few hundred tokens produced, and text the
engine serves goes past it in some channels; int8 saturates there (its step is uniform), which
cost the trained reference model's int8 pool 1-2 % of top-1 agreement with the FP16 pool on its
held-out text. A 25 % coarser step that seldom saturates did better on both window sets measured
(97.45 -> 99.62 % and 98.85 -> 99.11 %; `benchmarks/kv_quant_reference.py`, docs/kv.md). fp8 keeps
its relative precision at any scale below saturation, and showed no steady gain: 1.

The numpy semantics of the storage (``quantize`` / ``dequantize``) are here too, the one home
the reference evaluator (``paged_reference.py``) reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ember.errors import ConfigError


@dataclass(frozen=True)
class KVCacheDtype:
    option: str  # the --kv-dtype value
    name: str  # the numpy / manifest dtype name of the pool
    onnx_type: int  # TensorProto element type
    qmax: float | None  # the largest magnitude stored; None: not quantized
    headroom: float = 1.0  # the scale's margin over the calibration bound (module doc)


KV_DTYPES = {d.option: d for d in (KVCacheDtype("fp16", "float16", TensorProto.FLOAT16, None),
                                   KVCacheDtype("int8", "int8", TensorProto.INT8, 127.0, headroom=1.25),
                                   KVCacheDtype("fp8", "float8_e4m3fn", TensorProto.FLOAT8E4M3FN, 448.0))}
QUANT_TYPE = "PER_CHANNEL"  # what the compile writes; ``per_tensor`` gives the schema's other layout
CALIB_LENGTHS = (16, 48, 96)  # token counts of the seeded random prompts when no text prompt is at hand
CALIB_TOKENS = 512  # prompts are truncated to this many tokens


def kv_cache_dtype(option: str) -> KVCacheDtype:
    if option not in KV_DTYPES:
        raise ConfigError(f"--kv-dtype {option!r} is not one of {', '.join(KV_DTYPES)}")
    return KV_DTYPES[option]


def quantize(x: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` [..., Hkv, D] (float) stored as ``dtype`` (int8 | float8_e4m3fn) with the dequantization
    ``scale`` ([1] or [Hkv, 1, D]): round to nearest (ties to even), saturated to the type's range."""
    import ml_dtypes

    y = x.astype(np.float32) / _broadcast(scale)
    if dtype == "int8":
        return np.clip(np.rint(y), -128, 127).astype(np.int8)
    if dtype == "float8_e4m3fn":  # e4m3fn has no infinity: a cast beyond 448 would give NaN
        return np.clip(y, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)
    raise ValueError(f"KV cache dtype {dtype!r} is not quantized")


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 values of a quantized cache ``q`` [..., Hkv, D]."""
    return q.astype(np.float32) * _broadcast(scale)


def _broadcast(scale: np.ndarray) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float32)
    return s.reshape(s.shape[0], s.shape[2]) if s.ndim == 3 else s  # [Hkv, 1, D] -> [Hkv, D] over [..., Hkv, D]


def calibration_prompts(src, calib: str | None, seed: int) -> tuple[list[list[int]], str]:
    """Token prompts for the KV scales and where they come from: ``--calib`` (needs the model's
    tokenizer), else the built-in calibration text where the model has a tokenizer, else seeded
    random tokens of ``CALIB_LENGTHS``."""
    if calib is not None or src.tokenizer is not None:
        from ember.passes.calibration_data import default_prompts, load_prompts

        if src.tokenizer is None:
            raise ConfigError(f"--calib {calib}: this model has no tokenizer to encode the prompts; compile "
                              "without --calib (the KV scales then come from random token prompts)")
        texts = load_prompts(calib) if calib is not None else default_prompts("calib")
        ids = [src.tokenizer.encode(t).ids[:CALIB_TOKENS] for t in texts]
        ids = [i for i in ids if i]
        if ids:
            return ids, (str(calib) if calib is not None else "built-in calibration prompts")
    rng = np.random.default_rng(seed)
    vocab = int(src.config.vocab_size)
    return [rng.integers(0, vocab, n).tolist() for n in CALIB_LENGTHS], f"random tokens (seed {seed})"


def kv_bounds(model, cfg, prompts: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each layer's (K bound, V bound), float32 [Hkv, D], from the torch step model on ``prompts``
    (each alone, from position 0): the module docstring says what each bound covers."""
    import torch

    hkv, d = cfg.num_kv_heads, cfg.head_dim
    bounds = [(np.zeros((hkv, d), np.float32), np.zeros((hkv, d), np.float32)) for _ in range(cfg.num_layers)]
    rotary = cfg.positions != "learned"
    for p in prompts:
        t = len(p)
        past = [torch.zeros(1, hkv, 1, d) for _ in range(2 * cfg.num_layers)]
        with torch.no_grad():
            out = model(torch.tensor([p]), torch.arange(t).reshape(1, t), torch.zeros(1, dtype=torch.int64),
                        torch.tensor([t]), *past)
        for i, (kb, vb) in enumerate(bounds):
            k = out[1 + 2 * i][0].float().numpy()  # [Hkv, T, D], after the module's rotary
            v = out[2 + 2 * i][0].float().numpy()
            if rotary:
                pair = np.sqrt(k[..., :d // 2] ** 2 + k[..., d // 2:] ** 2)
                k = np.concatenate([pair, pair], axis=-1)
            np.maximum(kb, np.abs(k).max(axis=1), out=kb)
            np.maximum(vb, np.abs(v).max(axis=1), out=vb)
    return bounds


def quant_type(scale: np.ndarray) -> str:
    """The schema's ``*_quant_type`` of a scale: [1] is PER_TENSOR, [Hkv, 1, D] PER_CHANNEL."""
    if scale.shape == (1,):
        return "PER_TENSOR"
    if scale.ndim == 3 and scale.shape[1] == 1:
        return "PER_CHANNEL"
    raise ValueError(f"a KV scale of shape {scale.shape} is neither PER_TENSOR [1] nor PER_CHANNEL [Hkv, 1, D]")


def per_tensor(scales: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """PER_TENSOR scales [1] covering per-channel ones (each layer's largest), for a kernel that
    takes no per-channel scales (coarser: small channels get the large channels' steps)."""
    return [tuple(np.array([s.max()], np.float32) for s in kv) for kv in scales]


def kv_scales(bounds: list[tuple[np.ndarray, np.ndarray]], dtype: KVCacheDtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """Dequantization scales [Hkv, 1, D] float32 of each layer's K and V: headroom * bound / qmax (a
    channel the calibration never moved gets the smallest normal float32, so no scale is zero)."""
    tiny = np.finfo(np.float32).tiny
    return [tuple(np.maximum(dtype.headroom * b / dtype.qmax, tiny).astype(np.float32)[:, None, :] for b in kv)
            for kv in bounds]
