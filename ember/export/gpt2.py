"""GPT-2 family as a step graph (DESIGN §3). Weights load from a Hugging Face GPT-2 folder."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ember.export.config import DecoderConfig
from ember.export.step_attention import attention_biases, last_valid, step_attention


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

    def forward(self, x, past_k, past_v, past_bias, new_bias):
        b, t, c = x.shape
        d = c // self.heads
        qkv = self.c_attn(self.ln_1(x)).reshape(b, t, 3, self.heads, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, T, D]
        a = step_attention(q, k, v, past_k, past_v, past_bias, new_bias)
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
        x = self.wte(input_ids) + self.wpe(positions)
        past_bias, new_bias = attention_biases(past_lengths, new_lengths, past_kv[0].shape[2], input_ids.shape[1], x.dtype)
        new_kv = []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, past_kv[2 * i], past_kv[2 * i + 1], past_bias, new_bias)
            new_kv += [k, v]
        h = self.ln_f(last_valid(x, new_lengths))
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
