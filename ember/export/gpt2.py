"""GPT-2 family as a step graph (DESIGN §3). Weights load from a Hugging Face GPT-2 folder."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ember.export.config import DecoderConfig
from ember.export.step_attention import (StepDims, attention_biases, last_valid, query_scale, scaled_linear,
                                         split_heads, step_attention)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        c = cfg.hidden_size
        self.heads = cfg.num_heads
        self.ln_1 = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=cfg.norm_eps)
        self.c_fc = nn.Linear(c, cfg.intermediate_size)
        self.mlp_proj = nn.Linear(cfg.intermediate_size, c)

    def forward(self, x, past_k, past_v, past_bias, new_bias, dims: StepDims):
        """x [N, C] (N = B*T rows) -> (x [N, C], new k, new v [B, H, T, D])."""
        c = self.c_proj.out_features
        q_scale = torch.cat([torch.full((c,), query_scale(c // self.heads)), torch.ones(2 * c)])  # q rows only
        qkv = split_heads(scaled_linear(self.ln_1(x), self.c_attn, q_scale), dims, 3 * self.heads)  # [B, 3H, T, D]
        q, k, v = torch.split(qkv, self.heads, dim=1)
        a = step_attention(q, k, v, past_k, past_v, past_bias, new_bias, dims)
        x = x + self.c_proj(a)
        x = x + self.mlp_proj(gelu_tanh(self.c_fc(self.ln_2(x))))
        return x, k, v


class GPT2Step(nn.Module):
    """forward(input_ids, positions, past_lengths, new_lengths, *past_kv) -> (logits, *new_kv)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.blocks = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids, positions, past_lengths, new_lengths, *past_kv):
        dims = StepDims.of(input_ids, past_kv[0])
        x = self.wte(input_ids.reshape(-1)) + self.wpe(positions.reshape(-1))  # [N, C]
        past_bias, new_bias = attention_biases(past_lengths, new_lengths, dims, 1, x.dtype)
        new_kv = []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, past_kv[2 * i], past_kv[2 * i + 1], past_bias, new_bias, dims)
            new_kv += [k, v]
        h = self.ln_f(last_valid(x, new_lengths, dims.t))
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return (F.linear(h, w), *new_kv)

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a GPT2LMHeadModel/GPT2Model state dict (Conv1D weights are [in, out])."""
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        own: dict[str, torch.Tensor] = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"],
                                        "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
        names = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}
        for i in range(self.cfg.num_layers):
            for ln in ("ln_1", "ln_2"):
                for p in ("weight", "bias"):
                    own[f"blocks.{i}.{ln}.{p}"] = sd[f"h.{i}.{ln}.{p}"]
            for hf, mine in names.items():
                own[f"blocks.{i}.{mine}.weight"] = sd[f"h.{i}.{hf}.weight"].t().contiguous()
                own[f"blocks.{i}.{mine}.bias"] = sd[f"h.{i}.{hf}.bias"]
        if self.lm_head is not None:
            own["lm_head.weight"] = sd["lm_head.weight"]
        missing = set(self.state_dict()) - set(own)
        if missing:
            raise KeyError(f"weights missing for {sorted(missing)[:5]}")
        self.load_state_dict(own)
