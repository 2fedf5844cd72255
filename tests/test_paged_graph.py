"""The paged step graph (export/paged_step.py): packed tokens of several sequences through
PagedAttention over a shared block pool, run on the CPU with the operator's numpy semantics
(export/paged_reference.py) and checked against the torch model running each sequence alone.

Blocks are handed out from a shuffled free list as sequences grow, so every sequence's blocks
are scattered and interleaved with the others'; the pool starts as random values, so reading
any slot a sequence does not own changes its logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.errors import ConfigError
from ember.export.config import BUILTIN, DecoderConfig
from ember.export.paged_reference import reference_session
from ember.export.paged_step import INPUTS, PackedSequence, build_paged_graph, cache_bindings, packed_inputs
from ember.export.sources import random_init_, step_model_class

BLOCK = 4
NUM_BLOCKS = 24
TOL = 3e-2  # float16 graph vs float32 torch, relative to the largest logit

SMALL = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
             max_positions=64, norm_eps=1e-6, tie_word_embeddings=False)
CONFIGS = {
    "llama-tiny": BUILTIN["llama-tiny"],
    "qwen2-bias-tied": DecoderConfig(family="qwen2", **{**SMALL, "tie_word_embeddings": True}, qkv_bias=True, rope_theta=1e6),
    # layer 0 sees only the last 5 positions: prompts and generations run past it
    "mistral-window": DecoderConfig(family="mistral", **SMALL, layer_windows=(5, 0)),
    "gpt2-tiny": BUILTIN["gpt2-tiny"],  # learned positions gathered per packed token, no rotary
    "qwen3-qknorm-softcap-scale": DecoderConfig(family="qwen3", **{**SMALL, "num_kv_heads": 1}, head_dim=32,
                                                attn_softcap=2.0, attn_scale=0.3),
}


def _model(cfg):
    m = step_model_class(cfg.family)(cfg)
    random_init_(m, seed=3)
    with torch.no_grad():  # norms at 1 and zero biases would hide a misplaced norm or bias
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)  # scores of order 1: the window, soft-cap and scale change the result
    return m.eval()


def _solo_logits(model, cfg, tokens: list[int]) -> np.ndarray:
    """The torch step model on one sequence from empty: its last token's logits [V]."""
    t = len(tokens)
    kv = [torch.zeros(1, cfg.num_kv_heads, 1, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    with torch.no_grad():
        out = model(torch.tensor([tokens]), torch.arange(t).reshape(1, t), torch.zeros(1, dtype=torch.int64),
                    torch.tensor([t]), *kv)
    return out[0][0].numpy()


class _Pool:
    """The block pool of a paged run: random contents, blocks handed out from a shuffled free list."""

    def __init__(self, cfg, seed: int = 0):
        rng = np.random.default_rng(seed)
        shape = (NUM_BLOCKS, BLOCK, cfg.num_kv_heads, cfg.head_dim)
        self.caches = {name: rng.standard_normal(shape).astype(np.float16) for name, _ in cache_bindings(cfg.num_layers)}
        self.free = [int(b) for b in rng.permutation(NUM_BLOCKS)]
        self.owned: dict[int, list[int]] = {}

    def share(self, seq: int, past: int, tokens: list[int]) -> PackedSequence:
        blocks = self.owned.setdefault(seq, [])
        while len(blocks) * BLOCK < past + len(tokens):
            blocks.append(self.free.pop())
        return PackedSequence(tuple(tokens), past, tuple(blocks))


def _step(sess, pool: _Pool, cfg, shares: list[PackedSequence]) -> np.ndarray:
    """One call; the updated pools replace the old ones (the evaluator cannot update in place)."""
    outs = dict(zip(sess.output_names, sess.run(None, {**packed_inputs(shares, BLOCK), **pool.caches})))
    for cache_in, cache_out in cache_bindings(cfg.num_layers):
        pool.caches[cache_in] = outs[cache_out]
    return outs["logits"]


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_prefill_chunks_and_decodes_match_each_sequence_alone(name):
    cfg = CONFIGS[name]
    model = _model(cfg)
    sess = reference_session(build_paged_graph(model, cfg))
    pool = _Pool(cfg)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (7, 3, 12)]
    history = [[], [], []]  # each sequence's tokens in the pool

    def call(plan: list[tuple[int, list[int]]]) -> None:
        shares = [pool.share(s, len(history[s]), toks) for s, toks in plan]
        logits = _step(sess, pool, cfg, shares)
        for row, (s, toks) in enumerate(plan):
            history[s] += toks
            want = _solo_logits(model, cfg, history[s])
            err = _rel_err(logits[row], want)
            assert err < TOL, f"{name}: sequence {s} after {len(history[s])} tokens differs from alone by {err:.3g}"

    # 1: two whole prompts and the first chunk of a third, packed
    call([(0, prompts[0]), (1, prompts[1]), (2, prompts[2][:5])])
    # 2: the mixed call -- two decodes and the rest of the third prompt (past 5)
    call([(0, [11]), (2, prompts[2][5:]), (1, [12])])
    # 3-6: decodes of all three, one sequence at a time leaving and coming back
    for step in range(4):
        seqs = [0, 1, 2] if step != 2 else [2, 0]
        call([(s, [int(rng.integers(1, cfg.vocab_size))]) for s in seqs])
    assert all(len(pool.owned[s]) * BLOCK >= len(history[s]) for s in range(3))


def test_only_the_new_tokens_slots_change():
    cfg = CONFIGS["llama-tiny"]
    sess = reference_session(build_paged_graph(_model(cfg), cfg))
    pool = _Pool(cfg)
    shares = [pool.share(0, 0, [5, 6, 7, 8, 9]), pool.share(1, 0, [3, 4])]
    before = {k: v.copy() for k, v in pool.caches.items()}
    _step(sess, pool, cfg, shares)
    written = {(s.blocks[p // BLOCK], p % BLOCK) for s in shares for p in range(s.past, s.past + len(s.tokens))}
    for name, after in pool.caches.items():
        changed = {(int(b), int(o)) for b, o in zip(*np.nonzero((after != before[name]).any(axis=(2, 3))))}
        assert changed == written, name


def test_a_wrong_block_table_changes_the_logits():
    """The check is sensitive to the block table: decoding sequence 0 over sequence 1's blocks
    gives other logits than sequence 0 alone."""
    cfg = CONFIGS["llama-tiny"]
    model = _model(cfg)
    sess = reference_session(build_paged_graph(model, cfg))
    pool = _Pool(cfg)
    a, b = [5, 6, 7, 8, 9, 10], [3, 4, 200, 201, 202, 17]
    _step(sess, pool, cfg, [pool.share(0, 0, a), pool.share(1, 0, b)])
    right = pool.share(0, len(a), [42])
    wrong = PackedSequence(right.tokens, right.past, tuple(pool.owned[1][:len(right.blocks)]))
    want = _solo_logits(model, cfg, a + [42])
    caches = {k: v.copy() for k, v in pool.caches.items()}
    assert _rel_err(_step(sess, pool, cfg, [right])[0], want) < TOL
    pool.caches = caches
    assert _rel_err(_step(sess, pool, cfg, [wrong])[0], want) > 10 * TOL


def test_graph_contract():
    cfg = CONFIGS["mistral-window"]
    proto = build_paged_graph(_model(cfg), cfg)
    ins = [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input]
    outs = [o.name for o in proto.graph.output]
    assert tuple(n for n, _ in ins[:4]) == INPUTS == ("input_ids", "cumulative_sequence_length", "past_seqlens",
                                                      "block_table")
    assert [n for n, _ in ins[4:]] == [i for i, _ in cache_bindings(2)] and all(t == 10 for _, t in ins[4:])  # FLOAT16
    assert outs == ["logits"] + [o for _, o in cache_bindings(2)]
    attn = [n for n in proto.graph.node if n.op_type == "PagedAttention"]
    windows = [next((a.i for a in n.attribute if a.name == "local_window_size"), -1) for n in attn]
    assert windows == [5, -1]
    assert all(len(n.input) == 10 for n in attn)  # only the inputs ONNX Runtime 1.31 has


def test_every_tensor_has_a_role():
    from ember.engine_format.io_specs import io_specs

    cfg = CONFIGS["llama-tiny"]
    inputs, outputs = io_specs(build_paged_graph(_model(cfg), cfg, host_bounds=True))
    roles = {t.name: (t.role, t.layer) for t in inputs + outputs}
    assert roles["input_ids"] == ("token_ids", None) and roles["cumulative_sequence_length"] == ("cu_seqlens", None)
    assert roles["past_seqlens"] == ("past_lengths", None) and roles["block_table"] == ("block_table", None)
    assert roles["attention_metadata"] == ("attention_bounds", None) and roles["logits"] == ("logits", None)
    assert roles["key_cache.1"] == ("key_cache", 1) and roles["value_cache_out.0"] == ("value_cache_out", 0)
    assert all(role is not None for role, _ in roles.values())


def test_host_bounds_feed_the_operator_and_change_nothing():
    cfg = CONFIGS["llama-tiny"]
    model = _model(cfg)
    proto = build_paged_graph(model, cfg, host_bounds=True)
    assert proto.graph.input[4].name == "attention_metadata"
    attn = [n for n in proto.graph.node if n.op_type == "PagedAttention"]
    assert all(len(n.input) == 17 and n.input[16] == "attention_metadata" for n in attn)
    feeds = packed_inputs([PackedSequence((1, 2, 3), 2, (4, 5)), PackedSequence((9,), 6, (0, 2))], BLOCK, host_bounds=True)
    assert feeds["attention_metadata"].tolist() == [3, 7]
    pool = _Pool(cfg)
    outs = reference_session(proto).run(None, {**feeds, **pool.caches})
    without = {k: v for k, v in feeds.items() if k != "attention_metadata"}
    plain = reference_session(build_paged_graph(model, cfg)).run(None, {**without, **pool.caches})
    np.testing.assert_array_equal(outs[0], plain[0])


@pytest.mark.parametrize("cfg,field", [
    (DecoderConfig(family="gemma3_text", **SMALL, head_dim=16), r"\(1 \+ w\) RMSNorm"),
    (DecoderConfig(family="llama", **SMALL, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_positions": 16}),
     "rope_scaling.type yarn"),
    (DecoderConfig(family="llama", **{**SMALL, "hidden_size": 72, "num_heads": 6, "num_kv_heads": 2}), "head_dim 12"),
])
def test_refuses_what_the_operator_cannot_express(cfg, field):
    with pytest.raises(ConfigError, match=field):
        build_paged_graph(None, cfg)


def test_packed_inputs_refuse_a_short_block_list():
    with pytest.raises(ValueError, match="sequence 1 holds 9 tokens in 2 blocks of 4: it needs 3"):
        packed_inputs([PackedSequence((1,), 0, (0,)), PackedSequence((1, 2), 7, (1, 2))], BLOCK)
    feeds = packed_inputs([PackedSequence((1, 2, 3), 0, (4,)), PackedSequence((9,), 4, (0, 2))], BLOCK)
    assert feeds["cumulative_sequence_length"].tolist() == [0, 3, 4]
    assert feeds["block_table"].tolist() == [[4, -1], [0, 2]]
