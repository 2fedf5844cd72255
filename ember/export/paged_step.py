"""The paged step graph: packed tokens of many sequences through ONNX Runtime's
``com.microsoft.PagedAttention`` over a shared KV block pool (issue 19).

One call serves any mix of prefill chunks and decodes: the tokens of B sequences are packed
back to back (no padding), ``cumulative_sequence_length`` marks where each sequence's tokens
start, ``past_seqlens`` says how many of its tokens are already cached, and ``block_table`` maps
each sequence's positions to blocks of the pool: position p of sequence b lives in block
``block_table[b, p // block_size]`` at offset ``p % block_size``. The operator writes the new
tokens' K/V into those slots **in place** and attends over the sequence's cached tokens plus
its new ones (causal, rotary inside at position ``past_seqlens[b] + j``). Blocks need not be
contiguous nor in order; which blocks a sequence owns is the block manager's business.

The layers around the attention are those of the fused decode part (``fused_graph.py``).
PagedAttention is CUDA-only and takes float16 / bfloat16 only, so the graph is float16; the
CPU checks it with the numpy semantics in ``paged_reference.py``.

Contract -- inputs:
  ``input_ids`` int64 [N] (the packed tokens), ``cumulative_sequence_length`` int32 [B+1]
  (0, n_0, n_0+n_1, ...; every n_b >= 1), ``past_seqlens`` int32 [B], ``block_table`` int32
  [B, max_blocks] (-1: unmapped), ``key_cache.i`` / ``value_cache.i`` [num_blocks, block_size,
  Hkv, D] for each layer i: float16, or int8 / float8e4m3fn with per-channel scales held in
  the graph (``--kv-dtype``, ``export/kv_quant.py``);
outputs:
  ``logits`` float32 [B, V] (each sequence's last new token), ``key_cache_out.i`` /
  ``value_cache_out.i``: the pools updated in place. ONNX Runtime's kernel requires each output
  to be the **same buffer** as its input: bind both names to one device allocation
  (``cache_bindings``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ember.engine_format.paged_feeds import HOST_BOUNDS, INPUTS, cache_bindings, pack_rows  # noqa: F401 (re-exported)
from ember.errors import ConfigError
from ember.export.fused_graph import DTYPES, FusedGraph, gpt2_body, llama_body, rotary_tables
from ember.export.kv_quant import kv_cache_dtype, quant_type

PAGED_FILE = "paged_step.onnx"
PAGED_PART = "paged"  # the part's name in the manifest
DTYPE = "float16"  # PagedAttention's T is float16 | bfloat16
@dataclass(frozen=True)
class PackedSequence:
    """One sequence's share of a paged step: its new tokens, how many of its tokens are already
    in the pool, and its blocks in position order (enough for ``past + len(tokens)`` positions)."""

    tokens: tuple[int, ...]
    past: int
    blocks: tuple[int, ...]


def packed_inputs(seqs: list[PackedSequence], block_size: int, max_blocks: int | None = None,
                  host_bounds: bool = False) -> dict[str, np.ndarray]:
    """The graph's non-cache inputs for ``seqs`` (``block_table`` padded with -1 to ``max_blocks``
    columns, default: the longest block list; ``attention_metadata`` for a graph built with
    ``host_bounds``: this call's exact bounds). The packing is ``engine_format.paged_feeds``'s."""
    width = max_blocks if max_blocks is not None else max(len(s.blocks) for s in seqs)
    table = np.full((len(seqs), width), -1, np.int32)
    for b, s in enumerate(seqs):
        if len(s.blocks) > width:
            raise ValueError(f"sequence {b} has {len(s.blocks)} blocks, more than the table's {width} columns")
        table[b, :len(s.blocks)] = s.blocks
        need = -(-(s.past + len(s.tokens)) // block_size)
        if len(s.blocks) < need:
            raise ValueError(f"sequence {b} holds {s.past + len(s.tokens)} tokens in {len(s.blocks)} blocks of "
                             f"{block_size}: it needs {need}")
    return pack_rows([np.asarray(s.tokens, dtype=np.int64) for s in seqs], np.array([s.past for s in seqs]), table,
                     block_size, host_bounds)


def check_supported(cfg) -> None:
    """The paged step graph expresses ``cfg`` (a DecoderConfig), or ConfigError naming the field."""
    refusal = cfg.paged_refusal()
    if refusal:
        raise ConfigError(f"the paged step graph (PagedAttention) cannot express this {cfg.family} model: {refusal}; "
                          "serve it with the slot KV pool (kv_layout=\"slots\")")
    if cfg.head_dim % 8 or cfg.head_dim > 256:
        raise ConfigError(f"head_dim {cfg.head_dim} is not a multiple of 8 up to 256, which ONNX Runtime's "
                          "PagedAttention kernels require; serve it with the slot KV pool (kv_layout=\"slots\")")
    if cfg.qk_norm and cfg.norm != "rms":
        raise ConfigError(f"q/k norms of kind norm={cfg.norm!r}: the paged step graph writes them as RMSNorm * w")


def build_paged_graph(model, cfg, linears: str = "gemm", host_bounds: bool = False,
                      kv_scales: list[tuple[np.ndarray, np.ndarray]] | None = None, kv_dtype: str = "fp16"
                      ) -> onnx.ModelProto:
    """The paged step graph of ``model`` (the family's torch step module with weights), float16.
    ``linears`` as in ``gqa_decode.build_decode_graph``. ``kv_dtype`` (``--kv-dtype``): the pools'
    element type; int8 / fp8 take each layer's (K, V) dequantization ``kv_scales`` ([Hkv, 1, D]
    PER_CHANNEL or [1] PER_TENSOR, ``export/kv_quant.py``), stored as initializers feeding the
    operator's ``k_scale`` / ``v_scale``. ``host_bounds`` adds the input
    ``attention_metadata`` int32 [2] in host memory, [max new tokens of any sequence, max
    past + new of any sequence] (upper bounds): without it the CUDA kernel copies the lengths back
    from the device at every layer of every call. It is an input of newer ONNX Runtime builds
    (index 16 of the operator's schema): build with it only where the installed schema has it."""
    check_supported(cfg)
    np_dtype, onnx_dtype = DTYPES[DTYPE]
    cache = kv_cache_dtype(kv_dtype)
    if (cache.qmax is None) != (kv_scales is None):
        raise ValueError(f"--kv-dtype {kv_dtype} {'takes no' if cache.qmax is None else 'needs'} KV scales")
    g = FusedGraph(np_dtype, linears)
    rotary = None if cfg.positions == "learned" else rotary_tables(g, model, cfg)

    def attention(g: FusedGraph, name: str, i: int, layer, qkv: str) -> str:
        scales = None if kv_scales is None else [
            (g.weight(f"kv_scale.{kind}.{i}", scale, np.float32), quant_type(scale))
            for kind, scale in zip(("key", "value"), kv_scales[i])]
        return _paged_attention(g, name, i, layer, qkv, cfg, rotary, host_bounds, scales)

    if cfg.positions == "learned":  # GPT-2: position embeddings at each token's position, no rotary
        hid, head = gpt2_body(g, model, cfg, "input_ids", _token_positions(g), attention)
    else:
        hid, head = llama_body(g, model, cfg, "input_ids", attention)
    # each sequence's last new token: row cumulative_sequence_length[b+1] - 1 of the packed tokens
    ends = g.node("Slice", ["cumulative_sequence_length", g.weight("seq.one", np.array([1]), np.int64),
                            g.weight("seq.end", np.array([np.iinfo(np.int64).max]), np.int64)], name="seq_ends")[0]
    last = g.node("Sub", [ends, g.weight("seq.one_i32", np.array(1), np.int32)], name="last_token")[0]
    rows = g.node("Gather", [hid, last], name="last_rows", axis=0)[0]  # [B, C]
    logits = g.node("Gemm", [rows, head], name="lm_head", transB=1)[0]
    g.node("Cast", [logits], name="logits_fp32", outputs=["logits"], to=TensorProto.FLOAT)

    hkv, d = cfg.num_kv_heads, cfg.head_dim
    pool = ["num_blocks", "block_size", hkv, d]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["tokens"]),
              helper.make_tensor_value_info("cumulative_sequence_length", TensorProto.INT32, ["batch_plus_1"]),
              helper.make_tensor_value_info("past_seqlens", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("block_table", TensorProto.INT32, ["batch", "max_blocks"])]
    if host_bounds:
        inputs.append(helper.make_tensor_value_info(HOST_BOUNDS, TensorProto.INT32, [2]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])]
    for cache_in, cache_out in cache_bindings(cfg.num_layers):
        inputs.append(helper.make_tensor_value_info(cache_in, cache.onnx_type, pool))
        outputs.append(helper.make_tensor_value_info(cache_out, cache.onnx_type, pool))
    graph = helper.make_graph(g.nodes, f"ember_paged_step_{cfg.family}", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="ember")
    proto.ir_version = 8
    return proto


def _paged_attention(g: FusedGraph, name: str, i: int, layer, qkv: str, cfg, rotary: tuple[str, str] | None,
                     host_bounds: bool, scales: list[tuple[str, str]] | None = None) -> str:
    """PagedAttention over the packed [N, (H+2Hkv)D] projections; returns [N, H*D]. With q/k
    norms the projections are split and each head normed here, before the operator's rotary
    (the order of Qwen3 / Gemma 3): the graph never depends on the operator's newer
    ``q_norm_weight`` inputs."""
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv_inputs = [qkv, "", ""]
    if cfg.qk_norm:
        sizes = g.weight("shape.qkv_split", np.array([h * d, hkv * d, hkv * d]), np.int64)
        q, k, v = g.node("Split", [qkv, sizes], n_out=3, name=f"{name}_split", axis=1)
        q = _head_norm(g, f"{name}.q_norm", layer.q_norm.weight, q, h, d, cfg.norm_eps)
        k = _head_norm(g, f"{name}.k_norm", layer.k_norm.weight, k, hkv, d, cfg.norm_eps)
        qkv_inputs = [q, k, v]
    attrs = dict(num_heads=h, kv_num_heads=hkv, do_rotary=int(rotary is not None), rotary_interleaved=0,
                 scale=float(cfg.score_scale))
    if cfg.window(i):  # keys within the last w positions, the step graph's window_biases
        attrs["local_window_size"] = cfg.window(i)
    if cfg.attn_softcap is not None:
        attrs["softcap"] = float(cfg.attn_softcap)
    later = [""] * 7  # inputs 10-16: slot_mapping, head_sink, q/k norm weights, k_scale, v_scale, attention_metadata
    if scales is not None:  # [(name, quant type)] of K's and V's scale
        (later[4], attrs["k_quant_type"]), (later[5], attrs["v_quant_type"]) = scales
    if host_bounds:
        later[6] = HOST_BOUNDS
    while later and not later[-1]:
        later.pop()
    return g.node("PagedAttention",
                  [*qkv_inputs, f"key_cache.{i}", f"value_cache.{i}", "cumulative_sequence_length", "past_seqlens",
                   "block_table", *(rotary or ("", "")), *later],
                  name=name, domain="com.microsoft", outputs=[f"{name}/out", f"key_cache_out.{i}", f"value_cache_out.{i}"],
                  **attrs)[0]


def _token_positions(g: FusedGraph) -> str:
    """Each packed token's position, int64 [N]: ``past_seqlens[b] + j`` for the j-th new token of
    sequence b (b = how many sequence ends ``cumulative_sequence_length[1:]`` are <= its index).
    PagedAttention derives the same positions for rotary inside; GPT-2's table needs them here."""
    i64 = TensorProto.INT64
    n = g.node("Shape", ["input_ids"], name="tokens_n")[0]
    n = g.node("Squeeze", [n, g.weight("pos.axis0", np.array([0]), np.int64)], name="tokens_n_scalar")[0]
    index = g.node("Range", [g.weight("pos.zero", np.array(0), np.int64), n, g.weight("pos.one", np.array(1), np.int64)],
                   name="token_index")[0]  # [N]
    cum = g.node("Cast", ["cumulative_sequence_length"], name="cum_i64", to=i64)[0]
    ends = g.node("Slice", [cum, g.weight("pos.start1", np.array([1]), np.int64),
                            g.weight("pos.end", np.array([np.iinfo(np.int64).max]), np.int64)], name="pos_seq_ends")[0]
    axis1 = g.weight("pos.axis1", np.array([1]), np.int64)
    column = g.node("Unsqueeze", [index, axis1], name="token_col")[0]  # [N, 1]
    after = g.node("GreaterOrEqual", [column, ends], name="token_after_end")[0]  # [N, B]
    seq = g.node("ReduceSum", [g.node("Cast", [after], name="after_i64", to=i64)[0], axis1], name="token_seq",
                 keepdims=0)[0]  # [N]
    start = g.node("Gather", [cum, seq], name="token_seq_start", axis=0)[0]
    past = g.node("Gather", [g.node("Cast", ["past_seqlens"], name="past_i64", to=i64)[0], seq], name="token_seq_past", axis=0)[0]
    return g.node("Add", [past, g.node("Sub", [index, start], name="token_offset")[0]], name="token_positions")[0]


def _head_norm(g: FusedGraph, name: str, weight, x: str, heads: int, d: int, eps: float) -> str:
    """RMSNorm of each head of x [N, heads*D] (weight [D]); returns [N, heads*D]."""
    per_head = g.node("Reshape", [x, g.shape(f"heads{heads}", [0, heads, d])], name=f"{name}_heads")[0]
    normed = g.node("SimplifiedLayerNormalization", [per_head, g.weight(f"{name}.weight", weight)], name=name,
                    axis=-1, epsilon=float(eps), stash_type=1)[0]
    return g.node("Reshape", [normed, g.shape("rows", [0, -1])], name=f"{name}_rows")[0]


def cache_np_dtype(proto: onnx.ModelProto) -> np.dtype:
    """The numpy dtype of the paged graph's KV pools (float16, int8 or ml_dtypes' float8_e4m3fn)."""
    first = next(i for i in proto.graph.input if i.name == cache_bindings(1)[0][0])
    return helper.tensor_dtype_to_np_dtype(first.type.tensor_type.elem_type)


def check_paged_against_torch(model, cfg, path, prompts: tuple[int, ...] = (3, 5), block_size: int = 16) -> float:
    """The graph at ``path`` on ONNX Runtime's reference evaluator with numpy PagedAttention
    (``paged_reference``): one packed call of ``prompts`` (token counts) against the torch step
    model ``model`` on each prompt alone. Returns the largest logits error relative to the
    largest logit."""
    import torch

    from ember.export.paged_reference import reference_session

    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, cfg.vocab_size, n).tolist() for n in prompts]
    blocks = [-(-n // block_size) for n in prompts]
    shares = [PackedSequence(tuple(p), 0, tuple(range(sum(blocks[:i]), sum(blocks[:i + 1])))) for i, p in enumerate(seqs)]
    proto = onnx.load(str(path))
    sess = reference_session(proto)
    pool = np.zeros((sum(blocks), block_size, cfg.num_kv_heads, cfg.head_dim), cache_np_dtype(proto))
    feeds = {**packed_inputs(shares, block_size, host_bounds=HOST_BOUNDS in sess.input_names),
             **{name: pool.copy() for name, _ in cache_bindings(cfg.num_layers)}}
    got = dict(zip(sess.output_names, sess.run(None, feeds)))["logits"]
    worst = 0.0
    for b, p in enumerate(seqs):
        t = len(p)
        kv = [torch.zeros(1, cfg.num_kv_heads, 1, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
        with torch.no_grad():
            want = model(torch.tensor([p]), torch.arange(t).reshape(1, t), torch.zeros(1, dtype=torch.int64),
                         torch.tensor([t]), *kv)[0][0].float().numpy()
        worst = max(worst, float(np.abs(got[b] - want).max() / max(np.abs(want).max(), 1e-6)))
    return worst
