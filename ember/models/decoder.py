"""The rotary decoder step module (every family but GPT-2), and its Hugging Face weight table.

``RotaryDecoderStep.forward(input_ids, positions, past_lengths, new_lengths, [rope_long,] *past_kv)``
follows the step-graph contract (docs/design.md §3.1); ``rope_long`` (int64 [B], 1 = the row's
tokens take LongRoPE's long factors) is there only for LongRoPE models (``cfg.longrope_switch``). The per-step work that layers share is done once:
cos/sin per rotary kind (global, local) and the attention masks per window size.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ember.export.step_attention import StepDims, attention_biases, last_valid, window_biases
from ember.models.description import DecoderConfig
from ember.models.layers import DecoderBlock, make_norm
from ember.models.registry import family
from ember.models.rope import cos_sin, rope_tables


class RotaryDecoderStep(nn.Module):
    """forward(input_ids, positions, past_lengths, new_lengths, [rope_long,] *past_kv) -> (logits, *new_kv)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope_kinds = sorted({cfg.rope_kind(i) for i in range(cfg.num_layers)})
        self.rope = {kind: rope_tables(cfg, kind) for kind in self.rope_kinds}
        # ``inv_freq``: the full-attention layers' frequencies (the fused decode part and TP read it)
        self.register_buffer("inv_freq", self.rope.get("global", self.rope[self.rope_kinds[0]])["inv_freq"],
                             persistent=False)
        # layers sharing a mask: (window, ring) -> the first such layer (its past gives the capacity P)
        self.mask_layers: dict[tuple[int, int], int] = {}
        for i, layer in enumerate(self.layers):
            self.mask_layers.setdefault(layer.mask_key, i)

    def forward(self, input_ids, positions, past_lengths, new_lengths, *rest):
        cfg = self.cfg
        rope_long, past_kv = (rest[0], rest[1:]) if cfg.longrope_switch is not None else (None, rest)
        x = self.embed_tokens(input_ids.reshape(-1))  # [N, C]
        if cfg.embed_scale != 1.0:
            x = x * torch.tensor(cfg.embed_scale, dtype=x.dtype)
        rope = {kind: cos_sin(positions, t["inv_freq"], t["factor"], x.dtype, t.get("long_inv_freq"), rope_long)
                for kind, t in self.rope.items()}
        masks = {}  # (window, ring) -> (dims, past_bias, new_bias); a ring layer's past has its own capacity
        for (w, ring), first in self.mask_layers.items():
            dims = StepDims.of(input_ids, past_kv[2 * first])
            masks[(w, ring)] = (dims, *(
                window_biases(positions, past_lengths, new_lengths, dims, cfg.kv_group, w, x.dtype, ring) if w else
                attention_biases(past_lengths, new_lengths, dims, cfg.kv_group, x.dtype)))
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, rope, masks, past_kv[2 * i], past_kv[2 * i + 1])
            new_kv += [k, v]
        h = self.norm(last_valid(x, new_lengths, input_ids.shape[1]))
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, w)
        if cfg.final_softcap is not None:
            logits = torch.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return (logits, *new_kv)

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a Hugging Face causal-LM state dict through the family's weight table."""
        own = hf_to_step(family(self.cfg.family), self, sd)
        self.load_state_dict(own)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The inverse: this module's weights under their Hugging Face names (fused tensors re-joined)."""
        return step_to_hf(family(self.cfg.family), self)


def _hf_name(fam, key: str) -> tuple[str, str | None]:
    """A step parameter -> (its Hugging Face tensor without prefix, the fused tensor it is a slice of or None)."""
    parts = key.split(".")
    if parts[0] != "layers":
        return ("lm_head.weight" if key == "lm_head.weight" else key), None
    i, mod, p = parts[1], parts[2], ".".join(parts[3:])
    for hf_mod, members in fam.fused.items():
        if mod in members:
            return f"layers.{i}.{hf_mod}.{p}", f"layers.{i}.{hf_mod}.{p}"
    return f"layers.{i}.{fam.layer_names[mod]}.{p}", None


def hf_to_step(fam, model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix(fam.weight_prefix): v for k, v in sd.items() if "rotary_emb" not in k}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    own, used = {}, set()
    for key, shape in shapes.items():
        name, fused = _hf_name(fam, key)
        if name not in sd:
            raise KeyError(f"weights missing for {name!r}")
        used.add(name)
        if fused is None:
            own[key] = sd[name]
            continue
        mod = key.split(".")[2]
        members = next(m for m in fam.fused.values() if mod in m)
        start = sum(shapes[key.replace(f".{mod}.", f".{m}.")][0] for m in members[:members.index(mod)])
        own[key] = sd[name][start:start + shape[0]]
    if model.lm_head is None:
        used.add("lm_head.weight")  # tied checkpoints may still store the head
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise KeyError(f"unexpected weights {unexpected[:5]} (an architecture variant Ember does not export)")
    return own


def step_to_hf(fam, model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, list[torch.Tensor]] = {}
    for key, v in model.state_dict().items():
        name, _ = _hf_name(fam, key)
        out.setdefault(name, []).append(v)
    return {(n if n == "lm_head.weight" else fam.weight_prefix + n): (v[0] if len(v) == 1 else torch.cat(v))
            for n, v in out.items()}
