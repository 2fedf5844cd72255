"""The paged step graph's inputs (docs/engine-format.md, "paged step graph"): the one home of
how the rows of a step are packed for it, shared by the graph's builder and tests
(``export/paged_step.py``) and the runtime's executor (``runtime/cuda_paged.py``).

A step of B sequences feeds only their new tokens, packed back to back (no padding):
``input_ids`` int64 [N], ``cumulative_sequence_length`` int32 [B+1] (row b's tokens are
[cu[b], cu[b+1])), ``past_seqlens`` int32 [B] (tokens of row b already in the pool: the first
new token's position), ``block_table`` int32 [B, M] (row b's blocks in position order; token p
lives in block ``table[b, p // block_size]`` at offset ``p % block_size``; -1 = unmapped), and,
in graphs that take it, ``attention_metadata`` int32 [2] in host memory: [max new tokens of a
row, max past + new of a row] (upper bounds; without it the CUDA kernel reads the lengths back
from the device at every layer). Each layer's ``key_cache.i`` / ``value_cache.i`` [num_blocks,
block_size, Hkv, D] and its ``*_cache_out.i`` are one buffer, updated in place.
"""
from __future__ import annotations

import numpy as np

INPUTS = ("input_ids", "cumulative_sequence_length", "past_seqlens", "block_table")
HOST_BOUNDS = "attention_metadata"


def cache_bindings(num_layers: int) -> list[tuple[str, str]]:
    """(input, output) names of every layer's K and V pool; each pair must be bound to one buffer."""
    return [(f"{kind}_cache.{i}", f"{kind}_cache_out.{i}") for i in range(num_layers) for kind in ("key", "value")]


def pack_rows(tokens: list[np.ndarray], past: np.ndarray, block_table: np.ndarray, block_size: int,
              host_bounds: bool = False) -> dict[str, np.ndarray]:
    """The non-cache inputs of one paged step: row b feeds ``tokens[b]`` (≥ 1 token) after
    ``past[b]`` cached ones, over the blocks of ``block_table[b]`` (int32 [B, M]; entries past the
    row's blocks are ignored). ValueError when a row has no token or too few blocks."""
    table = np.ascontiguousarray(block_table, dtype=np.int32)
    past = np.asarray(past, dtype=np.int64)
    counts = np.array([len(t) for t in tokens], dtype=np.int64)
    if len(tokens) != len(past) or table.ndim != 2 or len(table) != len(past):
        raise ValueError(f"a paged step of {len(tokens)} rows needs {len(tokens)} past lengths and block-table rows "
                         f"(got {len(past)} and {table.shape})")
    if (counts < 1).any():
        raise ValueError(f"row {int(np.argmin(counts))} of the paged step has no new tokens; leave it out of the call")
    need = -(-(past + counts) // block_size)
    short = np.nonzero(need > table.shape[1])[0]
    if len(short):
        b = int(short[0])
        raise ValueError(f"row {b} holds {int(past[b] + counts[b])} tokens: it needs {int(need[b])} blocks of "
                         f"{block_size}, and the block table has {table.shape[1]} columns")
    feeds = {"input_ids": np.concatenate([np.asarray(t, dtype=np.int64) for t in tokens]),
             "cumulative_sequence_length": np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
             "past_seqlens": past.astype(np.int32),
             "block_table": table}
    if host_bounds:
        feeds[HOST_BOUNDS] = np.array([counts.max(), (past + counts).max()], np.int32)
    return feeds
