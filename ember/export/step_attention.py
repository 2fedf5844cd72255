"""The step graph's attention, shared by every decoder family (DESIGN §3).

Shapes: q [B, H, T, D]; k_new, v_new [B, Hkv, T, D]; past_k, past_v [B, Hkv, P, D] where P
is the KV pool's capacity and only the first ``past_lengths[b]`` positions of row b are
live. Scores against the past and against the new tokens are computed separately and
joined after the matmuls, so the graph never concatenates (copies) the cache; grouped
query heads are folded into the query axis ([B, Hkv, G*T, D]) so K/V are never repeated.
"""
from __future__ import annotations

import math

import torch


def attention_biases(past_lengths: torch.Tensor, new_lengths: torch.Tensor, p: int, t: int,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks, computed once per step and shared by every layer.

    past_bias [B,1,1,1,P]: 0 where position < past_lengths[b], -inf elsewhere.
    new_bias  [B,1,1,T,T]: 0 where key <= query (causal) and key < new_lengths[b].
    """
    b = past_lengths.shape[0]
    neg = torch.tensor(float("-inf"), dtype=dtype)
    zero = torch.tensor(0.0, dtype=dtype)
    past_ok = torch.arange(p).unsqueeze(0) < past_lengths.unsqueeze(1)  # [B, P]
    key = torch.arange(t)
    new_ok = (key.unsqueeze(0) <= key.unsqueeze(1)).unsqueeze(0) & (key.reshape(1, 1, t) < new_lengths.reshape(b, 1, 1))
    past_bias = torch.where(past_ok, zero, neg).reshape(b, 1, 1, 1, p)
    new_bias = torch.where(new_ok, zero, neg).reshape(b, 1, 1, t, t)
    return past_bias, new_bias


def step_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    past_bias: torch.Tensor,
    new_bias: torch.Tensor,
) -> torch.Tensor:
    """Returns the attention output [B, T, H*D]. Biases from ``attention_biases``."""
    b, h, t, d = q.shape
    hkv = k_new.shape[1]
    g = h // hkv
    p = past_k.shape[2]
    qg = q.reshape(b, hkv, g * t, d) * (1.0 / math.sqrt(d))
    s_past = torch.matmul(qg, past_k.transpose(2, 3)).reshape(b, hkv, g, t, p) + past_bias
    s_new = torch.matmul(qg, k_new.transpose(2, 3)).reshape(b, hkv, g, t, t) + new_bias
    probs = torch.softmax(torch.cat([s_past, s_new], dim=-1), dim=-1)
    p_past = probs[..., :p].reshape(b, hkv, g * t, p)
    p_new = probs[..., p:].reshape(b, hkv, g * t, t)
    out = torch.matmul(p_past, past_v) + torch.matmul(p_new, v_new)  # [B, Hkv, G*T, D]
    return out.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)


def last_valid(hidden: torch.Tensor, new_lengths: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, C] -> [B, C]: each row's last valid new token (index new_lengths-1)."""
    b, _, c = hidden.shape
    idx = (new_lengths - 1).reshape(b, 1, 1).expand(b, 1, c)
    return torch.gather(hidden, 1, idx).reshape(b, c)
