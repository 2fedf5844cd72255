"""Roles of a decoder part's inputs and outputs: what each tensor means (docs/engine-format.md).

Each manifest ``TensorSpec`` of a decoder part carries a ``role`` (and, for per-layer K/V, a
``layer``), so a loader finds its tensors by meaning, not by Ember's names. Roles:

step graph (``step``, TP ``attn.*`` segments)
    inputs ``token_ids`` [B,T] int64, ``positions`` [B,T] int64, ``past_lengths`` [B] int64
    (valid cached positions per row), ``new_lengths`` [B] int64 (valid new tokens per row, right
    padded), ``rope_long`` [B] int64 (LongRoPE models only: 1 = rotate the row's tokens with the
    long factors, docs/models.md), ``past_key`` / ``past_value`` [B,Hkv,P,D] per layer; outputs ``logits`` [B,V] (of
    each row's last valid new token), ``new_key`` / ``new_value`` [B,Hkv,T,D] per layer.
fused decode part (``decode``)
    inputs ``token_ids`` [B,1], ``past_lengths`` [B] int32 (``seqlens_k``), ``kv_capacity``
    scalar int32 (the K/V buffers' length), ``past_key`` / ``past_value`` [B,Hkv,S,D] per layer;
    outputs ``logits`` and ``present_key`` / ``present_value``: the same buffers, written in place.
paged step graph (``export/paged_step.py``, not yet a folder part)
    inputs ``token_ids`` [N] (the packed tokens of B sequences), ``cu_seqlens`` [B+1] int32
    (``cumulative_sequence_length``), ``past_lengths`` [B] int32 (``past_seqlens``),
    ``block_table`` [B, max_blocks] int32, optionally ``attention_bounds`` [2] int32 in host memory
    (``attention_metadata``), ``key_cache`` / ``value_cache`` [num_blocks, block_size, Hkv, D] per
    layer; outputs ``logits`` [B,V] and ``key_cache_out`` / ``value_cache_out``: the same pools,
    written in place (bound to the same buffers).
tensor-parallel segments
    ``hidden`` (input: the summed activations), ``partial_sum`` (output: to be all-reduced),
    ``logits_shard`` (output: this rank's vocabulary slice).

Folders written before roles were recorded (schema 1) get them from ``role_from_name``, the one
place Ember's tensor names are mapped to meanings.
"""
from __future__ import annotations

import re

TOKEN_IDS, POSITIONS, PAST_LENGTHS, NEW_LENGTHS = "token_ids", "positions", "past_lengths", "new_lengths"
KV_CAPACITY, LOGITS, ROPE_LONG = "kv_capacity", "logits", "rope_long"
PAST_KEY, PAST_VALUE, NEW_KEY, NEW_VALUE = "past_key", "past_value", "new_key", "new_value"
PRESENT_KEY, PRESENT_VALUE = "present_key", "present_value"
HIDDEN, PARTIAL_SUM, LOGITS_SHARD = "hidden", "partial_sum", "logits_shard"
CU_SEQLENS, BLOCK_TABLE, ATTENTION_BOUNDS = "cu_seqlens", "block_table", "attention_bounds"
KEY_CACHE, VALUE_CACHE, KEY_CACHE_OUT, VALUE_CACHE_OUT = "key_cache", "value_cache", "key_cache_out", "value_cache_out"
LAYERED = (PAST_KEY, PAST_VALUE, NEW_KEY, NEW_VALUE, PRESENT_KEY, PRESENT_VALUE,
           KEY_CACHE_OUT, VALUE_CACHE_OUT, KEY_CACHE, VALUE_CACHE)

_BY_NAME = {"input_ids": TOKEN_IDS, "positions": POSITIONS, "past_lengths": PAST_LENGTHS, "new_lengths": NEW_LENGTHS,
            "rope_long": ROPE_LONG, "seqlens_k": PAST_LENGTHS, "total_sequence_length": KV_CAPACITY, "logits": LOGITS, "hidden": HIDDEN,
            "partial": PARTIAL_SUM, "logits_shard": LOGITS_SHARD, "cumulative_sequence_length": CU_SEQLENS,
            "past_seqlens": PAST_LENGTHS, "block_table": BLOCK_TABLE, "attention_metadata": ATTENTION_BOUNDS}
_LAYERED_NAME = re.compile(rf"({'|'.join(LAYERED)})\.(\d+)")


def role_from_name(name: str) -> tuple[str | None, int | None]:
    """(role, layer) of the tensor Ember's exporters name ``name``; (None, None) for tensors
    without a decoder role (e.g. a diffusion UNet's ``sample``)."""
    m = _LAYERED_NAME.fullmatch(name)
    if m:
        return m.group(1), int(m.group(2))
    return _BY_NAME.get(name), None
