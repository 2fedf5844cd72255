"""Rotary embeddings: inverse frequencies for each scaling type, and the rotation itself.

The formulas follow the published definitions (and transformers' ``modeling_rope_utils``,
which the tests compare against): ``linear`` divides every frequency by ``factor``;
``llama3`` divides the low frequencies and blends the middle band; ``yarn`` blends
interpolated and extrapolated frequencies over a ramp and scales cos/sin by an attention
factor; ``longrope`` (Phi-3 "su") divides frequencies by per-frequency factors: the long
set for every token of a sequence longer than ``original_max_positions``, the short set
otherwise, chosen per row by the step graph's ``rope_long`` input (the runtime recomputes a
sequence's cache when it crosses that length, as transformers' ``generate`` does:
docs/models.md). ``dynamic`` NTK scaling is not supported (it changes every cached key's
frequencies as the sequence grows).

Each step computes cos/sin once per rotary kind (global, local) and every layer of that kind
shares them; frequencies are float32 constants in the graph.
"""
from __future__ import annotations

import math

import torch

from ember.export.step_attention import fixed_size
from ember.models.description import DecoderConfig, RopeScaling


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def inv_freq_and_factor(theta: float, dim: int, scaling: RopeScaling | None, max_positions: int,
                        long: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2] float32, cos/sin multiplier) for one rotary kind.

    ``long`` picks LongRoPE's long factors (sequences past ``original_max_positions``)."""
    inv = base_inv_freq(theta, dim)
    s = scaling
    if s is None or s.type == "default":
        return inv, 1.0
    if s.type == "linear":
        return inv / s.factor, 1.0
    if s.type == "llama3":
        old = s.original_max_positions
        low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if s.type == "yarn":
        return _yarn(theta, dim, s)
    # longrope
    factor = s.factor if s.factor != 1.0 else max_positions / s.original_max_positions
    attention = s.attention_factor
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(s.original_max_positions))
    ext = torch.tensor(s.long_factor if long else s.short_factor, dtype=torch.float32)
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * theta ** shape), attention


def _yarn(theta: float, dim: int, s: RopeScaling) -> tuple[torch.Tensor, float]:
    attention = s.attention_factor if s.attention_factor is not None else (
        0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(s.original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention


def rope_tables(cfg: DecoderConfig, kind: str) -> dict[str, torch.Tensor | float]:
    """The constants of rotary kind ``kind`` (``global`` | ``local``): inverse frequencies, the
    cos/sin factor, and for LongRoPE the long set (``long_inv_freq``)."""
    if kind == "local":  # sliding-window layers of Gemma 3: plain RoPE at their own base
        inv, att = inv_freq_and_factor(cfg.local_rope_theta, cfg.rotary_dim, None, cfg.max_positions)
        return {"inv_freq": inv, "factor": att}
    s = cfg.rope_scaling
    inv, att = inv_freq_and_factor(cfg.rope_theta, cfg.rotary_dim, s, cfg.max_positions)
    out: dict = {"inv_freq": inv, "factor": att}
    if s is not None and s.type == "longrope":
        out["long_inv_freq"] = inv_freq_and_factor(cfg.rope_theta, cfg.rotary_dim, s, cfg.max_positions, long=True)[0]
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.split(x, fixed_size(x, -1) // 2, dim=-1)  # one Split in the graph
    return torch.cat([-x2, x1], dim=-1)


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float, dtype: torch.dtype,
            long_inv_freq: torch.Tensor | None = None,
            rope_long: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, rotary_dim] for ``positions`` [B, T].

    LongRoPE: row b's tokens are all rotated with ``long_inv_freq`` where ``rope_long[b]`` (int64
    [B]) is non-zero, else with ``inv_freq``. The choice is the runtime's, per sequence (long once
    its length passes original_max_position_embeddings): never the batch's or the chunk's."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, T, D/2]
    if long_inv_freq is not None:
        long = positions.to(torch.float32).unsqueeze(-1) * long_inv_freq
        freqs = torch.where((rope_long > 0).reshape(-1, 1, 1), long, freqs)
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [B, 1, T, D]
    if factor == 1.0:
        return emb.cos().to(dtype), emb.sin().to(dtype)
    return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` features of each head of x [B, H, T, D]; the rest pass through."""
    if rotary_dim == fixed_size(x, -1):
        return x * cos + rotate_half(x) * sin
    rot, rest = torch.split(x, [rotary_dim, fixed_size(x, -1) - rotary_dim], dim=-1)
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)
