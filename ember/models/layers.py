"""Shared layers of the rotary decoder families, written for the step graph (docs/design.md §3.1).

Every module works on 2-D ``[N, C]`` rows (see ``ember.export.step_attention``). What varies
between families is read from the DecoderConfig: the norm kind, q/k normalisation, the MLP's
gate activation, biases, the score scale and soft-capping, the sandwich norms. Parameter
names follow LLaMA's (``q_proj``, ``input_layernorm``, ``post_attention_layernorm`` = the
norm before the MLP, ...), which the fused decode part and the tensor-parallel shards read.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ember.export.step_attention import StepDims, scaled_linear, split_heads, step_attention
from ember.models.description import DecoderConfig
from ember.models.rope import apply_rotary


class RMSNorm(nn.Module):
    """``x / rms(x) * w``, or Gemma's ``x / rms(x) * (1 + w)`` (``one_plus``).

    ``scale`` multiplies the effective weight (a constant the exporter folds): the attention
    score scale rides on the q normalisation of q/k-normed families."""

    def __init__(self, dim: int, eps: float, one_plus: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if not one_plus else torch.zeros(dim))
        self.eps, self.one_plus = eps, one_plus

    def forward(self, x, scale: float = 1.0):
        var = x.pow(2).mean(-1, keepdim=True)
        w = (1.0 + self.weight) if self.one_plus else self.weight
        return (w * scale if scale != 1.0 else w) * (x * torch.rsqrt(var + self.eps))


def make_norm(cfg: DecoderConfig, dim: int) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, one_plus=cfg.norm == "rms_one_plus")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


GATE_ACTIVATIONS = {"swiglu": F.silu, "geglu": gelu_tanh}


class DecoderBlock(nn.Module):
    """Pre-norm block: attention (GQA, rotary, optional q/k norm and window) then gated MLP."""

    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        c, d = cfg.hidden_size, cfg.head_dim
        self.h, self.hkv, self.d, self.rotary_dim = cfg.num_heads, cfg.num_kv_heads, d, cfg.rotary_dim
        self.window, self.rope_kind, self.softcap = cfg.window(layer), cfg.rope_kind(layer), cfg.attn_softcap
        self.mask_key = (self.window, cfg.kv_ring(layer))  # the attention mask this layer reads
        # the score scale (and 1/softcap) folded into the query weights: no Mul in the graph
        self.q_scale = cfg.score_scale / (cfg.attn_softcap or 1.0)
        self.input_layernorm = make_norm(cfg, c)
        self.q_proj = nn.Linear(c, self.h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(c, self.hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(c, self.hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.h * d, c, bias=cfg.o_bias)
        self.q_norm = RMSNorm(d, cfg.norm_eps, cfg.norm == "rms_one_plus") if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.norm_eps, cfg.norm == "rms_one_plus") if cfg.qk_norm else None
        self.attn_out_norm = make_norm(cfg, c) if cfg.sandwich_norm else None
        self.post_attention_layernorm = make_norm(cfg, c)  # the norm before the MLP
        self.gate_proj = nn.Linear(c, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, c, bias=False)
        self.mlp_out_norm = make_norm(cfg, c) if cfg.sandwich_norm else None
        self.act = GATE_ACTIVATIONS[cfg.mlp]

    def forward(self, x, rope: dict, masks: dict, past_k, past_v):
        """x [N, C] (N = B*T rows) -> (x [N, C], new k, new v [B, Hkv, T, D]); ``masks[mask_key]`` is
        (StepDims, past_bias, new_bias) for this layer's past."""
        dims, past_bias, new_bias = masks[self.mask_key]
        y = self.input_layernorm(x)
        if self.q_norm is None:
            q = split_heads(scaled_linear(y, self.q_proj, self.q_scale), dims, self.h)
            k = split_heads(self.k_proj(y), dims, self.hkv)
        else:  # RMSNorm is scale-invariant: the scale goes on the norm's weight, not the projection
            q = self.q_norm(split_heads(self.q_proj(y), dims, self.h), scale=self.q_scale)
            k = self.k_norm(split_heads(self.k_proj(y), dims, self.hkv))
        v = split_heads(self.v_proj(y), dims, self.hkv)
        cos, sin = rope[self.rope_kind]
        q, k = apply_rotary(q, cos, sin, self.rotary_dim), apply_rotary(k, cos, sin, self.rotary_dim)
        a = self.o_proj(step_attention(q, k, v, past_k, past_v, past_bias, new_bias, dims, self.softcap))
        x = x + (a if self.attn_out_norm is None else self.attn_out_norm(a))
        y = self.post_attention_layernorm(x)
        m = self.down_proj(self.act(self.gate_proj(y)) * self.up_proj(y))
        return x + (m if self.mlp_out_norm is None else self.mlp_out_norm(m)), k, v
