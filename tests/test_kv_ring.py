"""Sliding-window layers keep a ring of their last positions in the KV pool (CPU tier, no model).

The pool side (write / wrap / move / grow / shrink, sizes and the memory budget) and the
graph side (``window_biases`` reading a wrapped ring) are each checked against the full
layout, where position p sits at index p.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.engine_format.decoder_spec import KVGeometry, check_decoder_config, kv_geometry
from ember.errors import ArtifactError, ConfigError
from ember.export.config import config_from_hf
from ember.export.step_attention import StepDims, step_attention, window_biases
from ember.models.description import DecoderConfig, ring_size
from ember.runtime.kv_pool import KVPool
from ember.engine_format.kv_ring import held, ring_spans
from ember.runtime.engine_builder import kv_capacity_tokens

RING = 16
HKV, D = 2, 3


def _token_kv(positions: list[int], b: int = 1) -> list[np.ndarray]:
    """New K/V [B, Hkv, T, D] for 2 layers whose every value is the token's position (+0.5 for V)."""
    k = np.broadcast_to(np.array(positions, np.float32).reshape(1, 1, -1, 1), (b, HKV, len(positions), D)).copy()
    return [k, k + 0.5, k, k + 0.5]


def _positions_held(pool: KVPool, slot: int, layer: int) -> list[int]:
    n = held(int(pool.lengths[slot]), pool.geometry.ring(layer))
    return sorted(int(x) for x in pool.k[layer][slot, 0, :n, 0])


def _pool(**kw) -> KVPool:
    args = dict(num_layers=2, num_kv_heads=HKV, head_dim=D, slots=3, max_capacity=200, layer_rings=(0, RING))
    return KVPool(**{**args, **kw})


def test_ring_spans_wrap_and_keep_only_the_last_ring_positions():
    assert ring_spans(5, 3, 0) == [(0, 5, 3)]
    assert ring_spans(14, 5, 16) == [(0, 14, 2), (2, 0, 3)]  # positions 14, 15 | 16, 17, 18
    assert ring_spans(3, 40, 16) == [(24, 11, 5), (29, 0, 11)]  # only positions 27..42 survive
    assert ring_spans(0, 0, 16) == [] and held(40, 16) == 16 and held(9, 16) == 9 and held(40, 0) == 40


@pytest.mark.parametrize("chunk", [1, 5, 40], ids=["decode", "prefill-chunks", "chunk-longer-than-ring"])
def test_writes_wrap_and_the_ring_holds_the_last_positions(chunk):
    pool = _pool()
    total = 61
    for p in range(0, total, chunk):
        n = min(chunk, total - p)
        pool.write(1, _token_kv(list(range(p, p + n))), np.array([n]))
    assert pool.capacity >= total and pool.k[1].shape[2] == RING  # the ring stops growing at its size
    assert _positions_held(pool, 1, 0) == list(range(total))  # full layer: every position at its index
    assert _positions_held(pool, 1, 1) == list(range(total - RING, total))
    for p in range(total - RING, total):  # position p at index p % ring, V beside it
        assert pool.k[1][1, 1, p % RING, 0] == p and pool.v[1][1, 1, p % RING, 2] == p + 0.5


def test_batched_decode_writes_each_row_at_its_ring_index():
    pool = _pool()
    lengths = [3, 17, 40]
    for r, n in enumerate(lengths):
        pool.write(r, _token_kv(list(range(n))), np.array([n]))
    pool.write(0, [a.repeat(3, axis=0) for a in _token_kv([-1.0])], np.array([1, 0, 1]))  # row 1 keeps nothing
    assert pool.lengths.tolist() == [4, 17, 41]
    assert pool.k[1][0, 0, 3, 0] == -1 and pool.k[1][2, 0, 40 % RING, 0] == -1
    assert _positions_held(pool, 1, 1) == list(range(1, 17))


def test_move_keeps_the_ring_mapping_and_shrink_and_growth_keep_unwrapped_rows():
    ring = 48  # above the pool's smallest capacity after a shrink (32), so the ring can shrink too
    pool = _pool(layer_rings=(0, ring))
    pool.write(2, _token_kv(list(range(100))), np.array([100]))
    pool.move(2, 0)
    assert pool.lengths.tolist() == [100, 0, 0]
    assert [int(pool.k[1][0, 0, p % ring, 0]) for p in range(100 - ring, 100)] == list(range(100 - ring, 100))
    pool.write(1, _token_kv(list(range(5))), np.array([5]))
    pool.release(0)
    pool.maybe_shrink()  # the wrapped row is gone: the ring shrinks below its size with the short row's entries
    assert pool.capacity < ring and pool.k[1].shape[2] == pool.capacity
    assert _positions_held(pool, 1, 1) == list(range(5))
    pool.write(1, _token_kv(list(range(5, 70))), np.array([65]))  # grows back to the full ring, then wraps
    assert pool.k[1].shape[2] == ring and _positions_held(pool, 1, 1) == list(range(70 - ring, 70))
    assert _positions_held(pool, 1, 0) == list(range(70))


def test_sizes_and_budget_count_the_ring():
    pool = _pool()
    pool.ensure_capacity(100)
    per_position = 2 * HKV * D * 4
    assert pool.slot_bytes(100) == per_position * (100 + RING)
    assert pool.nbytes == 3 * per_position * (pool.capacity + RING)
    assert sum(a.nbytes for a in pool.k + pool.v) == pool.nbytes
    geo = KVGeometry(2, HKV, D, (0, RING))
    assert geo.positions_within(per_position * (50 + RING), 4, 200) == 50
    assert geo.positions_within(per_position * 10, 4, 200) == 5  # below the ring both layers grow
    all_rings = KVGeometry(2, HKV, D, (RING, RING))
    assert all_rings.positions_within(per_position * 2 * RING, 4, 4096) == 4096  # memory stops at the ring
    assert kv_capacity_tokens(all_rings, "float32", 4, 4096, 4 * per_position * 2 * RING) == 4 * 4096
    assert kv_capacity_tokens(KVGeometry(2, HKV, D), "float32", 4, 4096, 4 * per_position * 2 * 100) == 4 * 100


def test_window_biases_read_a_wrapped_ring_as_the_full_layout():
    """Attention over a ring (position p at p % ring) == attention over every position at its index."""
    g = torch.Generator().manual_seed(0)
    window, ring, h, hkv, d, t = 8, 16, 4, 2, 8, 3
    past = torch.tensor([5, 16, 37, 64])  # unwrapped, exactly full, wrapped twice, wrapped 4x
    b, full_p = len(past), int(past.max())
    positions = past.unsqueeze(1) + torch.arange(t)
    new_lengths = torch.tensor([3, 1, 2, 3])
    q = torch.randn(b, h, t, d, generator=g)
    k_new, v_new = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    k_full, v_full = torch.randn(b, hkv, full_p, d, generator=g), torch.randn(b, hkv, full_p, d, generator=g)
    k_ring, v_ring = torch.zeros(b, hkv, ring, d), torch.zeros(b, hkv, ring, d)
    for r, n in enumerate(past.tolist()):
        for p in range(max(0, n - ring), n):
            k_ring[r, :, p % ring], v_ring[r, :, p % ring] = k_full[r, :, p], v_full[r, :, p]
    outs = []
    for k, v, rg in ((k_full, v_full, 0), (k_ring, v_ring, ring)):
        dims = StepDims(b=b, t=t, p=k.shape[2])
        masks = window_biases(positions, past, new_lengths, dims, h // hkv, window, torch.float32, rg)
        outs.append(step_attention(q, k_new, v_new, k, v, *masks, dims))
    valid = (torch.arange(t).unsqueeze(0) < new_lengths.unsqueeze(1)).reshape(-1)
    torch.testing.assert_close(outs[1][valid], outs[0][valid])


def test_config_records_rings_and_older_manifests_keep_the_full_layout():
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, max_position_embeddings=256)
    cfg = config_from_hf({"model_type": "mistral", **base, "sliding_window": 20})
    assert ring_size(20) == 32 and cfg.kv_rings == (32, 32) and cfg.kv_ring(1) == 32
    assert config_from_hf({"model_type": "mistral", **base, "sliding_window": 4096}).kv_rings == ()  # >= max_positions
    assert config_from_hf({"model_type": "llama", **base}).kv_rings == ()
    d = cfg.to_dict()
    assert DecoderConfig.from_dict(d).kv_rings == (32, 32)
    del d["kv_rings"]  # a folder compiled before rings: its graph reads every position at its index
    assert DecoderConfig.from_dict(d).kv_rings == ()
    with pytest.raises(ConfigError, match=r"kv_rings\[0\]=4"):
        DecoderConfig(**{**cfg.to_dict(), "kv_rings": (4, 32)})
    manifest_cfg = {**cfg.to_dict(), "layer_windows": [20, 20], "kv_rings": [32, 32]}
    assert kv_geometry(check_decoder_config({"config": manifest_cfg})).layer_rings == (32, 32)
    for bad in ([32], [8, 32], ["32", 32], [32, -1]):
        with pytest.raises(ArtifactError, match="kv_rings"):
            check_decoder_config({"config": {**manifest_cfg, "kv_rings": bad}})
