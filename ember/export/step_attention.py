"""The step graph's attention and shape plumbing, shared by every decoder family (docs/design.md §3.1).

Hidden states travel as 2-D ``[N, C]`` (N = B*T rows, batch-major) between the attention
blocks, so every linear layer exports as one 2-D MatMul + bias that ONNX Runtime fuses into
a Gemm. The step's dynamic sizes (``StepDims``) are read once, from the graph inputs, and
every reshape builds its target shape from them and constants: after ONNX Runtime's common
subexpression elimination the whole graph shares one small set of shape tensors instead of
a Shape->Gather->Unsqueeze->Concat chain per reshape.

The 1/sqrt(D) score scale is folded into the query projection's weights (``scaled_linear``;
the exporter constant-folds it), so the score MatMul has no scale: ONNX Runtime's CPU MatMul
takes its fast matrix-vector path (M=1, transposed B) only when the scale alpha is 1, which
makes the decode step's scores against the past ~1.4x faster at batch 32.

Attention shapes: q [B, H, T, D] (already scaled); k_new, v_new [B, Hkv, T, D]; past_k,
past_v [B, Hkv, P, D] where P is the layer's KV pool capacity and only the first
``past_lengths[b]`` positions of row b are live (a sliding-window layer's past can be a ring
of its last positions, ``window_biases``, with a P of its own). Scores against the past and
against the new tokens are computed separately and joined after the matmuls, so the graph never
concatenates (copies) the cache; grouped query heads are folded into the query axis
([B, Hkv, G*T, D]) so K/V are never repeated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class StepDims:
    """The step's dynamic sizes (0-d traced values during export): batch, new tokens, past capacity."""

    b: int
    t: int
    p: int

    @classmethod
    def of(cls, input_ids: torch.Tensor, past_k: torch.Tensor) -> StepDims:
        """From ``input_ids [B, T]`` and any layer's ``past_k [B, Hkv, P, D]``."""
        return cls(b=input_ids.shape[0], t=input_ids.shape[1], p=past_k.shape[2])


def attention_biases(past_lengths: torch.Tensor, new_lengths: torch.Tensor, dims: StepDims, group: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks, computed once per step and shared by every layer.

    past_bias [B,1,1,P]: 0 where position < past_lengths[b], -inf elsewhere.
    new_bias  [B,1,G*T,T]: 0 where key <= query (causal) and key < new_lengths[b]; the query
    axis is ``group`` copies of the T queries (grouped-query layout of ``step_attention``).
    """
    b, t, p = dims.b, dims.t, dims.p
    neg = torch.tensor(float("-inf"), dtype=dtype)
    zero = torch.tensor(0.0, dtype=dtype)
    past_ok = torch.arange(p).unsqueeze(0) < past_lengths.unsqueeze(1)  # [B, P]
    key = torch.arange(t)
    new_ok = (key.unsqueeze(0) <= key.unsqueeze(1)).unsqueeze(0) & (key.reshape(1, 1, t) < new_lengths.reshape(b, 1, 1))
    past_bias = torch.where(past_ok, zero, neg).unsqueeze(1).unsqueeze(1)
    new_bias = torch.where(new_ok, zero, neg)  # [B, T, T]
    if group > 1:
        new_bias = new_bias.repeat(1, group, 1)
    return past_bias, new_bias.unsqueeze(1)


def window_biases(positions: torch.Tensor, past_lengths: torch.Tensor, new_lengths: torch.Tensor, dims: StepDims,
                  group: int, window: int, dtype: torch.dtype, ring: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_biases`` for a sliding-window layer: a query at position q also needs key
    position k > q - ``window`` (transformers' sliding-window mask).

    ``ring`` (>= ``window``; 0 = none): the layer's past is a ring of that many positions
    (``ember/engine_format/kv_ring.py``: position p at index p % ring), so past index i of a row
    with L = past_lengths holds position ``L-1 - ((L-1-i) mod ring)`` for i < min(L, ring).
    That is i itself while the ring has not wrapped (L <= ring), so the graph serves any
    physical capacity up to ``ring``. Rotary is applied before caching and softmax does not
    care about key order, so only this mask knows about the ring.

    past_bias [B,1,G*T,P] and new_bias [B,1,G*T,T] are per query. A padding query always sees its
    own key, so no softmax row is empty (an empty row would be NaN, and 0 * NaN in the value
    product would spread it to valid rows)."""
    b, t, p = dims.b, dims.t, dims.p
    neg = torch.tensor(float("-inf"), dtype=dtype)
    zero = torch.tensor(0.0, dtype=dtype)
    q_pos = positions.unsqueeze(-1)  # [B, T, 1]
    slot = torch.arange(p).reshape(1, 1, p)
    length = past_lengths.reshape(b, 1, 1)
    if ring:
        key_pos = length - 1 - torch.remainder(length - 1 - slot, ring)  # [B, 1, P]
        live = (slot < length) & (slot < ring)
    else:
        key_pos, live = slot, slot < length
    past_ok = live & (q_pos - key_pos < window)  # [B, T, P]
    key = torch.arange(t)
    causal = key.unsqueeze(0) <= key.unsqueeze(1)  # [T(query), T(key)]
    in_window = q_pos - positions.unsqueeze(1) < window  # [B, T, T]
    new_ok = (causal.unsqueeze(0) & (key.reshape(1, 1, t) < new_lengths.reshape(b, 1, 1)) & in_window) | \
        (key.unsqueeze(0) == key.unsqueeze(1)).unsqueeze(0)
    past_bias, new_bias = torch.where(past_ok, zero, neg), torch.where(new_ok, zero, neg)
    if group > 1:
        past_bias, new_bias = past_bias.repeat(1, group, 1), new_bias.repeat(1, group, 1)
    return past_bias.unsqueeze(1), new_bias.unsqueeze(1)


def fixed_size(x: torch.Tensor, axis: int) -> int:
    """``x.shape[axis]`` as a Python int, for sizes the config fixes (heads, head_dim, hidden).

    During export ``x.shape[i]`` is a traced value that becomes a Shape->Gather chain in the
    graph; reading a fixed size as an int makes the reshapes that use it constant. Never use
    it for the batch, token or past axes (those are ``StepDims``).
    """
    return int(x.shape[axis])


def query_scale(head_dim: int) -> float:
    """The attention score scale that ``scaled_linear`` folds into the query projection."""
    return 1.0 / math.sqrt(head_dim)


def scaled_linear(x: torch.Tensor, linear: nn.Linear, scale: float | torch.Tensor) -> torch.Tensor:
    """``linear(x)`` with output feature j multiplied by ``scale`` (a float, or [out] per feature).

    The scale multiplies the weight and bias, which the exporter constant-folds: the graph
    has a single Gemm and no Mul.
    """
    s = scale if isinstance(scale, float) else scale.unsqueeze(1)
    bias = None if linear.bias is None else linear.bias * scale
    return F.linear(x, linear.weight * s, bias)


def split_heads(x: torch.Tensor, dims: StepDims, heads: int) -> torch.Tensor:
    """[N, heads*D] -> [B, heads, T, D] (one Transpose; a plain copy at T=1)."""
    return x.reshape(dims.b, dims.t, heads, fixed_size(x, -1) // heads).transpose(1, 2)


def step_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    past_bias: torch.Tensor,
    new_bias: torch.Tensor,
    dims: StepDims,
    softcap: float | None = None,
) -> torch.Tensor:
    """Returns the attention output [N, H*D] (rows batch-major).

    ``q`` must already carry the 1/sqrt(D) scale (``scaled_linear``); biases from ``attention_biases``.
    ``softcap``: scores become ``softcap * tanh(q.k)`` (q then carries scale / softcap), Gemma's capping.
    """
    h, d, hkv = fixed_size(q, 1), fixed_size(q, 3), fixed_size(k_new, 1)
    g = h // hkv
    b, t, p = dims.b, dims.t, dims.p
    qg = q if g == 1 else q.reshape(b, hkv, g * t, d)
    s_past = _capped(torch.matmul(qg, past_k.transpose(2, 3)), softcap) + past_bias  # [B, Hkv, G*T, P]
    s_new = _capped(torch.matmul(qg, k_new.transpose(2, 3)), softcap) + new_bias  # [B, Hkv, G*T, T]
    probs = torch.softmax(torch.cat([s_past, s_new], dim=-1), dim=-1)
    p_past, p_new = torch.split(probs, [p, t], dim=-1)
    out = torch.matmul(p_past, past_v) + torch.matmul(p_new, v_new)  # [B, Hkv, G*T, D]
    if g > 1:
        out = out.reshape(b, h, t, d)
    return out.transpose(1, 2).reshape(-1, h * d)  # [N, H*D]


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else torch.tanh(scores) * softcap


def last_valid(hidden: torch.Tensor, new_lengths: torch.Tensor, tokens) -> torch.Tensor:
    """hidden [N, C] (N = B*T, batch-major; ``tokens`` = T) -> [B, C]: each row's last valid new token.

    The gather index comes from ``new_lengths`` alone: a step size used as data (e.g.
    ``arange(B) * T``) would make ONNX Runtime's CUDA provider copy it from the host, and a
    graph with such a copy cannot be captured as a CUDA graph (tests/test_export.py checks)."""
    c = fixed_size(hidden, -1)
    idx = (new_lengths - 1).reshape(-1, 1, 1).expand(-1, 1, c)
    return torch.gather(hidden.reshape(-1, tokens, c), 1, idx).reshape(-1, c)
