"""GPT-2: LayerNorm, learned positions, fused ``c_attn`` (Conv1D weights stored [in, out]), GELU MLP."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ember.errors import ConfigError
from ember.export.step_attention import (StepDims, attention_biases, last_valid, query_scale, scaled_linear,
                                         split_heads, step_attention)
from ember.models.description import DecoderConfig
from ember.models.family import Family
from ember.models.hf_fields import bool_field, float_field, int_field, reject, token_id_field
from ember.models.layers import gelu_tanh

_LINEARS = {"attn.c_attn": "c_attn", "attn.c_proj": "c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp_proj"}


class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    ARCH = {"positions": "learned", "norm": "layer", "mlp": "gelu"}
    hf_field_names = {"vocab_size": "vocab_size", "hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
                      "num_kv_heads": "n_head", "intermediate_size": "n_inner", "max_positions": "n_positions"}
    weight_prefix, layer_prefix = "transformer.", "h"
    size_tensors = (("vocab_size", "wte.weight", 0, 1), ("hidden_size", "wte.weight", 1, 1),
                    ("max_positions", "wpe.weight", 0, 1), ("intermediate_size", "h.0.mlp.c_fc.weight", 1, 1))

    def from_hf(self, cfg: dict[str, Any], where: str) -> DecoderConfig:
        reject(cfg, "scale_attn_by_inverse_layer_idx", lambda v: not v, where, "per-layer attention scaling")
        reject(cfg, "add_cross_attention", lambda v: not v, where, "cross-attention")
        reject(cfg, "activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), where,
               "only the tanh-approximated GELU of GPT-2 is exported")
        reject(cfg, "scale_attn_weights", lambda v: bool(v), where, "unscaled attention")
        n_embd = int_field(cfg, "n_embd", where)
        vocab, layers = int_field(cfg, "vocab_size", where), int_field(cfg, "n_layer", where)
        heads = int_field(cfg, "n_head", where)
        inner = int_field(cfg, "n_inner", where, default=4 * n_embd)
        positions = int_field(cfg, "n_positions", where)
        if n_embd % heads:
            raise ConfigError(f"{where}: n_embd={n_embd} is not divisible by n_head={heads}; set them to the model's values")
        return DecoderConfig(
            family="gpt2", model_type="gpt2", vocab_size=vocab, hidden_size=n_embd, num_layers=layers,
            num_heads=heads, num_kv_heads=heads, intermediate_size=inner, max_positions=positions,
            norm_eps=float_field(cfg, "layer_norm_epsilon", where, 1e-5),
            tie_word_embeddings=bool_field(cfg, "tie_word_embeddings", where, True),
            bos_token_id=token_id_field(cfg, "bos_token_id", where), eos_token_id=token_id_field(cfg, "eos_token_id", where))

    def to_hf(self, cfg: DecoderConfig) -> dict[str, Any]:
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
                "n_inner": cfg.intermediate_size, "n_positions": cfg.max_positions, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": cfg.tie_word_embeddings,
                "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}

    def step_model(self, cfg: DecoderConfig):
        return GPT2Step(cfg)


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
        own = {k: sd[k] for k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
        for i in range(self.cfg.num_layers):
            for ln in ("ln_1", "ln_2"):
                for p in ("weight", "bias"):
                    own[f"blocks.{i}.{ln}.{p}"] = sd[f"h.{i}.{ln}.{p}"]
            for hf, mine in _LINEARS.items():
                own[f"blocks.{i}.{mine}.weight"] = sd[f"h.{i}.{hf}.weight"].t().contiguous()
                own[f"blocks.{i}.{mine}.bias"] = sd[f"h.{i}.{hf}.bias"]
        if self.lm_head is not None:
            own["lm_head.weight"] = sd["lm_head.weight"]
        missing = set(self.state_dict()) - set(own)
        if missing:
            raise KeyError(f"weights missing for {sorted(missing)[:5]}")
        self.load_state_dict(own)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The inverse of ``load_hf_state_dict``: GPT2LMHeadModel names, Conv1D layout."""
        names = {mine: hf for hf, mine in _LINEARS.items()}
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith("blocks."):
                _, i, mod, p = k.split(".")
                transposed = mod in names and p == "weight"
                out[f"transformer.h.{i}.{names.get(mod, mod)}.{p}"] = v.t().contiguous() if transposed else v
            else:
                out[k if k == "lm_head.weight" else f"transformer.{k}"] = v
        return out


FAMILY = GPT2()
