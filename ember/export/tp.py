"""Megatron-style tensor-parallel sharding of the decoder step models into per-rank segments.

A step of a TP=N engine is a chain of *segments*; between two segments every rank's
partial output is summed across ranks (one all-reduce). Per rank r the segments are

- ``embed``    (input_ids, positions) -> partial [B,T,C]: vocab-parallel embedding (rows of
  this rank's vocab shard, zero for ids outside it); rank 0 adds GPT-2's learned positions.
- ``attn.i``   (hidden, positions, past_lengths, new_lengths, past_key.i, past_value.i)
  -> (partial, new_key.i, new_value.i): norm, Q/K/V column-parallel by heads (GPT-2's fused
  c_attn is split into q/k/v first), attention over this rank's heads, output projection
  row-parallel.
- ``mlp.i``    (hidden) -> partial: norm, up/gate (c_fc) column-parallel, down (mlp_proj)
  row-parallel.
- ``head``     (hidden, new_lengths) -> logits_shard [B, V/N]: final norm of each row's last
  valid token, LM head vocab-parallel; the runtime gathers the shards to rank 0.

Rank 0's partial also carries the residual input and the row-parallel biases, so the sum of
the partials *is* the next hidden state (no extra residual tensor crosses segments).
2L + 2 backend calls and 2L + 1 all-reduces per step is the minimum for Megatron sharding
(one all-reduce after every row-parallel layer).

Shards that do not divide are padded with zero rows (vocabulary, MLP width), which is
exact: a padded MLP column gives act(0) * 0 = 0, a padded vocab row is cut off after the
gather. Heads must divide; key/value heads are split when N divides them and replicated
when they divide N (each rank's query heads then share one kv head); otherwise ConfigError.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ember.errors import ConfigError
from ember.export.config import DecoderConfig
from ember.models.layers import gelu_tanh
from ember.models.rope import rotate_half
from ember.export.step_attention import (StepDims, attention_biases, fixed_size, last_valid, query_scale, scaled_linear,
                                         split_heads, step_attention, window_biases)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TPLayout:
    """How a config splits over ``tp`` ranks (the same for every rank)."""

    tp: int
    heads: int  # query heads per rank
    kv_heads: int  # key/value heads per rank (1 when replicated)
    kv_replicated: bool  # kv heads are copied to several ranks (num_kv_heads < tp)
    inter: int  # MLP width per rank (padded)
    vocab: int  # vocabulary rows per rank (padded); logits are cut to vocab_size after the gather
    vocab_size: int

    def kv_head_start(self, rank: int, cfg: DecoderConfig) -> int:
        """First kv head of ``rank`` in the full model."""
        first_q = rank * self.heads
        return first_q // cfg.kv_group

    def to_dict(self) -> dict:
        return asdict(self)


def plan_tp(cfg: DecoderConfig, tp: int) -> TPLayout:
    """Check that ``cfg`` shards over ``tp`` ranks; ConfigError naming the field otherwise."""
    if tp < 1:
        raise ConfigError(f"--tp {tp} must be >= 1")
    refusal = cfg.tp_refusal() if tp > 1 else None
    if refusal:
        raise ConfigError(f"--tp {tp}: the tensor-parallel segments do not express this {cfg.family} model ({refusal}); "
                          "compile it with --tp 1")
    divisors = [d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0]
    if cfg.num_heads % tp:
        raise ConfigError(
            f"--tp {tp} does not divide num_attention_heads={cfg.num_heads}; attention heads are split whole "
            f"across ranks: use --tp in {divisors}"
        )
    hkv = cfg.num_kv_heads
    if hkv % tp == 0:
        kv_heads, replicated = hkv // tp, False
    elif tp % hkv == 0:
        kv_heads, replicated = 1, True  # each rank's query heads fall inside one kv group
    else:
        ok = [d for d in divisors if hkv % d == 0 or d % hkv == 0]
        raise ConfigError(
            f"--tp {tp}: num_key_value_heads={hkv} neither divides nor is divisible by {tp}, so key/value "
            f"heads can be neither split nor replicated across ranks; use --tp in {ok}"
        )
    return TPLayout(tp=tp, heads=cfg.num_heads // tp, kv_heads=kv_heads, kv_replicated=replicated,
                    inter=_ceil_div(cfg.intermediate_size, tp), vocab=_ceil_div(cfg.vocab_size, tp),
                    vocab_size=cfg.vocab_size)


# --- slicing helpers (weights are [out, in] like nn.Linear) --------------------------------------

def _rows(w: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows [start, start+n) of w, zero-padded past the end; a fresh contiguous tensor."""
    out = torch.zeros((n, *w.shape[1:]), dtype=w.dtype)
    part = w[start:start + n]
    out[: part.shape[0]] = part
    return out


def _cols(w: torch.Tensor, start: int, n: int) -> torch.Tensor:
    return _rows(w.t(), start, n).t().contiguous()


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def _clone(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)


# --- segments ------------------------------------------------------------------------------------

class EmbedSegment(nn.Module):
    """(input_ids [B,T], positions [B,T]) -> partial [B,T,C]."""

    def __init__(self, wte: torch.Tensor, start: int, n: int, wpe: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(_rows(wte, start, n), requires_grad=False)
        self.start, self.n = start, n
        self.wpe = None if wpe is None else nn.Parameter(wpe.clone(), requires_grad=False)

    def forward(self, input_ids, positions):
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.n)
        x = F.embedding(torch.where(inside, local, torch.zeros_like(local)), self.weight)
        x = x * inside.unsqueeze(-1).to(x.dtype)
        if self.wpe is not None:
            x = x + F.embedding(positions, self.wpe)
        return x


class AttnSegment(nn.Module):
    """(hidden, positions, past_lengths, new_lengths, past_k, past_v) -> (partial, new_k, new_v).

    past_k/past_v and new_k/new_v hold this rank's kv heads: [B, kv_heads, P|T, D].
    """

    def __init__(self, norm: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear,
                 heads: int, kv_heads: int, head_dim: int, residual: bool, inv_freq: torch.Tensor | None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, window: int = 0, ring: int = 0):
        super().__init__()
        self.norm, self.q, self.k, self.v, self.o = norm, q, k, v, o
        self.h, self.hkv, self.d, self.residual = heads, kv_heads, head_dim, residual
        self.q_norm, self.k_norm, self.window = q_norm, k_norm, window  # per-head norms: replicated
        self.ring = ring  # the window layer's past is a ring of this many positions (0: none; window_biases)
        if inv_freq is not None:
            self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)
        else:
            self.inv_freq = None

    def forward(self, hidden, positions, past_lengths, new_lengths, past_k, past_v):
        dims = StepDims(b=hidden.shape[0], t=hidden.shape[1], p=past_k.shape[2])
        y = self.norm(hidden.reshape(-1, fixed_size(hidden, 2)))  # [N, C]: 2-D linears export as Gemm
        if self.q_norm is None:
            q = split_heads(scaled_linear(y, self.q, query_scale(self.d)), dims, self.h)
            k = split_heads(self.k(y), dims, self.hkv)
        else:  # Qwen3: the score scale rides on the (scale-invariant) q norm, as in ember/models/layers.py
            q = self.q_norm(split_heads(self.q(y), dims, self.h), scale=query_scale(self.d))
            k = self.k_norm(split_heads(self.k(y), dims, self.hkv))
        v = split_heads(self.v(y), dims, self.hkv)
        if self.inv_freq is not None:  # rotary positions (LLaMA)
            freqs = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
            emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
            cos, sin = emb.cos().to(y.dtype), emb.sin().to(y.dtype)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if self.window:
            past_bias, new_bias = window_biases(positions, past_lengths, new_lengths, dims, self.h // self.hkv,
                                                self.window, y.dtype, self.ring)
        else:
            past_bias, new_bias = attention_biases(past_lengths, new_lengths, dims, self.h // self.hkv, y.dtype)
        a = step_attention(q, k, v, past_k, past_v, past_bias, new_bias, dims)
        out = self.o(a).reshape_as(hidden)
        return (out + hidden if self.residual else out), k, v


class MlpSegment(nn.Module):
    """(hidden [B,T,C]) -> partial [B,T,C]."""

    def __init__(self, norm: nn.Module, up: nn.Linear, gate: nn.Linear | None, down: nn.Linear, residual: bool):
        super().__init__()
        self.norm, self.up, self.gate, self.down, self.residual = norm, up, gate, down, residual

    def forward(self, hidden):
        y = self.norm(hidden.reshape(-1, fixed_size(hidden, 2)))  # [N, C]: 2-D linears export as Gemm
        if self.gate is None:  # GPT-2
            z = gelu_tanh(self.up(y))
        else:  # SwiGLU
            z = F.silu(self.gate(y)) * self.up(y)
        out = self.down(z).reshape_as(hidden)
        return out + hidden if self.residual else out


class HeadSegment(nn.Module):
    """(hidden [B,T,C], new_lengths [B]) -> logits_shard [B, vocab/N] (padded rows give 0)."""

    def __init__(self, norm: nn.Module, w: torch.Tensor, start: int, n: int):
        super().__init__()
        self.norm = norm
        self.weight = nn.Parameter(_rows(w, start, n), requires_grad=False)

    def forward(self, hidden, new_lengths):
        last = last_valid(hidden.reshape(-1, fixed_size(hidden, 2)), new_lengths, hidden.shape[1])
        return F.linear(self.norm(last), self.weight)


# --- building a rank's segments -------------------------------------------------------------------

@dataclass
class Segment:
    name: str  # "embed" | "attn.{i}" | "mlp.{i}" | "head"
    module: nn.Module
    inputs: list[str]
    outputs: list[str]


def _qkv_gpt2(blk, cfg: DecoderConfig) -> tuple[torch.Tensor, ...]:
    c = cfg.hidden_size
    w, b = blk.c_attn.weight.detach(), blk.c_attn.bias.detach()  # [3C, C]: q rows, then k, then v
    return w[:c], w[c:2 * c], w[2 * c:], b[:c], b[c:2 * c], b[2 * c:]


def shard_segments(model: nn.Module, cfg: DecoderConfig, layout: TPLayout, rank: int) -> list[Segment]:
    """Rank ``rank``'s segments of ``model`` (a GPT2Step or LlamaStep), in execution order."""
    if not 0 <= rank < layout.tp:
        raise ConfigError(f"rank {rank} is outside 0..{layout.tp - 1}")
    d, lay = cfg.head_dim, layout
    q0, qn = rank * lay.heads * d, lay.heads * d
    k0, kn = lay.kv_head_start(rank, cfg) * d, lay.kv_heads * d
    f0, v0 = rank * lay.inter, rank * lay.vocab
    lead = rank == 0
    gpt2 = cfg.positions == "learned"  # GPT-2's layout: fused c_attn, learned positions, LayerNorm

    def col(w, b, start, n):  # column-parallel: output features [start, start+n)
        return _linear(_rows(w.detach(), start, n), None if b is None else _rows(b.detach(), start, n))

    def row(w, b, start, n):  # row-parallel: input features [start, start+n); bias on rank 0 only
        return _linear(_cols(w.detach(), start, n), b.detach().clone() if (b is not None and lead) else None)

    segs: list[Segment] = []
    wte = (model.wte if gpt2 else model.embed_tokens).weight.detach()
    wpe = model.wpe.weight.detach() if (gpt2 and lead) else None
    segs.append(Segment("embed", EmbedSegment(wte, v0, lay.vocab, wpe), ["input_ids", "positions"], ["partial"]))
    blocks = model.blocks if gpt2 else model.layers
    inv_freq = None if gpt2 else model.inv_freq
    for i, blk in enumerate(blocks):
        if gpt2:
            wq, wk, wv, bq, bk, bv = _qkv_gpt2(blk, cfg)
            attn = AttnSegment(_clone(blk.ln_1), col(wq, bq, q0, qn), col(wk, bk, k0, kn), col(wv, bv, k0, kn),
                               row(blk.c_proj.weight, blk.c_proj.bias, q0, qn), lay.heads, lay.kv_heads, d, lead, None)
            mlp = MlpSegment(_clone(blk.ln_2), col(blk.c_fc.weight, blk.c_fc.bias, f0, lay.inter), None,
                             row(blk.mlp_proj.weight, blk.mlp_proj.bias, f0, lay.inter), lead)
        else:
            attn = AttnSegment(_clone(blk.input_layernorm), col(blk.q_proj.weight, blk.q_proj.bias, q0, qn),
                               col(blk.k_proj.weight, blk.k_proj.bias, k0, kn), col(blk.v_proj.weight, blk.v_proj.bias, k0, kn),
                               row(blk.o_proj.weight, blk.o_proj.bias, q0, qn), lay.heads, lay.kv_heads, d, lead, inv_freq,
                               _clone(blk.q_norm) if blk.q_norm is not None else None,
                               _clone(blk.k_norm) if blk.k_norm is not None else None, cfg.window(i),
                               cfg.kv_ring(i))
            mlp = MlpSegment(_clone(blk.post_attention_layernorm), col(blk.up_proj.weight, None, f0, lay.inter),
                             col(blk.gate_proj.weight, None, f0, lay.inter), row(blk.down_proj.weight, None, f0, lay.inter), lead)
        segs.append(Segment(f"attn.{i}", attn, ["hidden", "positions", "past_lengths", "new_lengths",
                                                 f"past_key.{i}", f"past_value.{i}"], ["partial", f"new_key.{i}", f"new_value.{i}"]))
        segs.append(Segment(f"mlp.{i}", mlp, ["hidden"], ["partial"]))
    head_w = model.lm_head.weight.detach() if model.lm_head is not None else wte
    segs.append(Segment("head", HeadSegment(_clone(model.ln_f if gpt2 else model.norm), head_w, v0, lay.vocab),
                        ["hidden", "new_lengths"], ["logits_shard"]))
    for s in segs:
        s.module.eval()
    return segs
