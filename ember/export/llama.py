"""LLaMA family (LLaMA, Mistral, Qwen2, TinyLlama) as a step graph (DESIGN §3).

RMSNorm, rotary positions from the per-token ``positions`` input, grouped-query attention,
SwiGLU MLP, optional q/k/v (and o) biases, tied or untied LM head.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ember.export.config import DecoderConfig
from ember.export.step_attention import (StepDims, attention_biases, fixed_size, last_valid, query_scale, scaled_linear,
                                         split_heads, step_attention)


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


def rotate_half(x):
    x1, x2 = torch.split(x, fixed_size(x, -1) // 2, dim=-1)  # one Split in the graph
    return torch.cat([-x2, x1], dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        c, d = cfg.hidden_size, cfg.head_dim
        self.h, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, d
        self.input_layernorm = RMSNorm(c, cfg.norm_eps)
        self.q_proj = nn.Linear(c, self.h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(c, self.hkv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(c, self.hkv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.h * d, c, bias=cfg.o_bias)
        self.post_attention_layernorm = RMSNorm(c, cfg.norm_eps)
        self.gate_proj = nn.Linear(c, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, c, bias=False)

    def forward(self, x, cos, sin, past_k, past_v, past_bias, new_bias, dims: StepDims):
        """x [N, C] (N = B*T rows) -> (x [N, C], new k, new v [B, Hkv, T, D])."""
        y = self.input_layernorm(x)
        q = split_heads(scaled_linear(y, self.q_proj, query_scale(self.d)), dims, self.h)
        k = split_heads(self.k_proj(y), dims, self.hkv)
        v = split_heads(self.v_proj(y), dims, self.hkv)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        a = step_attention(q, k, v, past_k, past_v, past_bias, new_bias, dims)
        x = x + self.o_proj(a)
        y = self.post_attention_layernorm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))
        return x, k, v


class LlamaStep(nn.Module):
    """forward(input_ids, positions, past_lengths, new_lengths, *past_kv) -> (logits, *new_kv)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        d = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids, positions, past_lengths, new_lengths, *past_kv):
        dims = StepDims.of(input_ids, past_kv[0])
        x = self.embed_tokens(input_ids.reshape(-1))  # [N, C]
        freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [B, 1, T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        past_bias, new_bias = attention_biases(past_lengths, new_lengths, dims, self.cfg.kv_group, x.dtype)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, past_kv[2 * i], past_kv[2 * i + 1], past_bias, new_bias, dims)
            new_kv += [k, v]
        h = self.norm(last_valid(x, new_lengths, dims.t))
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return (F.linear(h, w), *new_kv)

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a LlamaForCausalLM-style state dict (model.* prefix optional)."""
        own: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            k = k.removeprefix("model.")
            if k.startswith("layers."):
                k = k.replace(".self_attn.", ".").replace(".mlp.", ".")
            if "rotary_emb" in k:
                continue
            own[k] = v
        if self.lm_head is None:
            own.pop("lm_head.weight", None)
        missing = set(self.state_dict()) - set(own)
        if missing:
            raise KeyError(f"weights missing for {sorted(missing)[:5]}")
        unexpected = set(own) - set(self.state_dict())
        if unexpected:
            raise KeyError(f"unexpected weights {sorted(unexpected)[:5]} (an architecture variant Ember does not export)")
        self.load_state_dict(own)
