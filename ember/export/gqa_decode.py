"""The fused decode graph of the registry's decoder families for ONNX Runtime (docs/design.md §3.2).

The portable step graph (``llama.py`` through the TorchScript exporter) is ~50 ONNX Runtime
kernels per layer: on a GPU a batch-1 decode is bound by launching them, not by reading the
weights. This module writes the same model's **decode step** (one new token per row)
directly in ONNX Runtime's fused operators, ~10 kernels per layer:

- ``SimplifiedLayerNormalization`` / ``com.microsoft.SkipSimplifiedLayerNormalization``:
  RMSNorm, fused with the residual add that precedes it;
- linear layers as ``Gemm(transB=1)`` on [B, C] rows (torch's [out, in] weight layout, which
  the GPU's one-row GEMMs read faster than MatMul's [in, out]); for block-wise quantization
  (``linears="matmul"``) as MatMul on [in, out], which ``passes/matmul_nbits.py`` turns into
  MatMulNBits exactly as it does the step graph's;
- one packed Q/K/V ``Gemm`` and ``com.microsoft.GroupQueryAttention`` with rotary
  positions (``do_rotary``, cos/sin tables up to ``max_positions``), grouped K/V heads and a
  **shared past/present buffer**: the graph reads the KV pool's slot range in place and
  writes each row's new K/V at position ``seqlens_k[b]`` (its past length) -- the runtime
  binds ``present_*`` to the same memory as ``past_*``, so there is no separate KV write;
- SwiGLU as gate/up ``Gemm`` + ``com.microsoft.QuickGelu(alpha=1)`` (= SiLU) + ``Mul``;
- the LM head as ``Gemm(transB)`` on the embedding or head matrix; logits in float32.

Contract (``decode`` part): inputs ``input_ids`` int64 [B,1], ``seqlens_k`` int32 [B]
(each row's past length = the position of its new token), ``total_sequence_length`` int32
scalar (the KV buffer's capacity S), ``past_key.i``/``past_value.i`` [B,Hkv,S,D]; outputs
``logits`` float32 [B,V] and ``present_key.i``/``present_value.i`` [B,Hkv,S,D] (the same
buffers when bound in place). Positions are the past lengths: a decode whose positions
differ (none in Ember's runtime) must use the step graph.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ember.errors import ConfigError
from ember.export.external_data import TensorFileWriter, is_external, read_tensor
from ember.export.fused_graph import DTYPES, LINEARS, FusedGraph, gpt2_body, llama_body, rotary_tables
from ember.export.matmul_sites import write_sites
from ember.models.registry import FAMILY_MODULES

DECODE_PART = "decode"
DECODE_FILE = "decode.onnx"


def decode_input_names(num_layers: int) -> list[str]:
    names = ["input_ids", "seqlens_k", "total_sequence_length"]
    for i in range(num_layers):
        names += [f"past_key.{i}", f"past_value.{i}"]
    return names


def decode_output_names(num_layers: int) -> list[str]:
    names = ["logits"]
    for i in range(num_layers):
        names += [f"present_key.{i}", f"present_value.{i}"]
    return names


# Every registered family (ember/models/registry.py); a model whose description has a feature
# these operators do not express (``DecoderConfig.fused_decode_refusal``) uses the step graph.
# ``--fused-decode auto`` (FP16 folders) adds the part: timed on CUDA for LLaMA (H100 and H200,
# 1.7-1.9x faster per decode step than the step graph) and GPT-2 (H200, 1.5-1.9x,
# benchmarks/results/gpu_roofline_gpt2_h200.md).
FAMILIES = FAMILY_MODULES
AUTO_FAMILIES = FAMILY_MODULES


def check_supported(cfg) -> None:
    """The fused decode graph expresses ``cfg`` (a DecoderConfig), or ConfigError saying why not."""
    refusal = cfg.fused_decode_refusal()
    if refusal:
        raise ConfigError(f"the fused decode graph (--fused-decode) cannot express this {cfg.family} model: {refusal}; "
                          "compile with --fused-decode off (the portable step graph serves every family)")
    if cfg.head_dim % 16:
        raise ConfigError(f"head_dim {cfg.head_dim} is not a multiple of 16, which ONNX Runtime's "
                          "GroupQueryAttention requires; compile with --fused-decode off")


def write_decode_graph(model, cfg, path: str | os.PathLike, dtype: str = "float16", linears: str = "gemm"
                       ) -> onnx.ModelProto:
    """``build_decode_graph`` saved to ``path`` as ``onnx_export.save_onnx`` saves it (its weights in
    ``<name>.data`` past ``EXTERNAL_DATA_THRESHOLD``, else inline), each weight written to the data file
    as it is made: the graph never holds a copy of the torch model's weights (issue 18: 4.4 GB for
    llama-1b). Returns the graph, its big weights external references into ``path``'s folder."""
    from ember.export.onnx_export import save_onnx, saves_external

    path = Path(path)
    with TensorFileWriter(path.with_name(path.name + ".data")) as data:
        proto = build_decode_graph(model, cfg, dtype, linears, data=data)
    if not saves_external(proto):  # a small graph holds its weights, as ``numpy_helper.from_array`` writes them
        for t in proto.graph.initializer:
            if is_external(t):
                t.CopyFrom(numpy_helper.from_array(read_tensor(t, path.parent), t.name))
    save_onnx(proto, path, base_dir=path.parent, keep_in_memory=False)  # big weights are in place: nothing copied
    return proto


def build_decode_graph(model, cfg, dtype: str = "float16", linears: str = "gemm",
                       data: TensorFileWriter | None = None) -> onnx.ModelProto:
    """The fused decode graph of ``model`` (an ``llama.LlamaStep`` or ``gpt2.GPT2Step`` with
    weights) in ``dtype``. ``linears``: ``gemm`` writes every layer's linear as ``Gemm(transB=1)``
    on torch's [out, in] weight (the float GPU form, below); ``matmul`` as ``MatMul`` on the
    [in, out] weight (+ ``Add`` for a bias), the form ONNX Runtime's block-wise quantizer turns
    into ``MatMulNBits`` (``--quantize int4|int8-weights``) without a float32 copy of each weight.
    The LM head is a ``Gemm(transB=1)`` either way (kept float unless ``--quantize-lm-head``).
    ``data``: the file the big weights go to as they are made (``write_decode_graph``); without it
    the graph holds them."""
    check_supported(cfg)
    if dtype not in DTYPES:
        raise ConfigError(f"fused decode dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if linears not in LINEARS:
        raise ConfigError(f"fused decode linears {linears!r} is not one of {', '.join(LINEARS)}")
    np_dtype, onnx_dtype = DTYPES[dtype]
    g = FusedGraph(np_dtype, linears, data)
    ids = g.node("Reshape", ["input_ids", g.shape("flat", [-1])], name="ids_flat")[0]
    if cfg.positions == "learned":  # GPT-2: K/V heads = heads, no rotary; each row's position is its past length
        hid, head = gpt2_body(g, model, cfg, ids, "seqlens_k", lambda g, name, i, _, qkv: _attention(g, name, i, qkv, cfg, None))
    else:
        rotary = rotary_tables(g, model, cfg)
        hid, head = llama_body(g, model, cfg, ids, lambda g, name, i, _, qkv: _attention(g, name, i, qkv, cfg, rotary))
    logits = g.node("Gemm", [hid, head], name="lm_head", transB=1)[0]
    g.sites["lm_head"] = "lm_head"
    if onnx_dtype != TensorProto.FLOAT:
        g.node("Cast", [logits], name="logits_fp32", outputs=["logits"], to=TensorProto.FLOAT)
    else:
        g.node("Identity", [logits], name="logits_out", outputs=["logits"])

    L, hkv, d = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 1]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", cfg.vocab_size])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", onnx_dtype, ["batch", hkv, "capacity", d]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", onnx_dtype, ["batch", hkv, "capacity", d]))
    graph = helper.make_graph(g.nodes, f"ember_decode_gqa_{cfg.family}", inputs, outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="ember")
    proto.ir_version = 8
    write_sites(proto, g.sites)  # each weight node's site, for --quantize-sites
    return proto


def _attention(g: FusedGraph, name: str, i: int, qkv: str, cfg, rotary: tuple[str, str] | None) -> str:
    """GroupQueryAttention over the packed [B, (H+2Hkv)D] projections, K/V appended in place
    at each row's past length; returns [B, H*D]."""
    qkv = g.node("Reshape", [qkv, g.shape("tokens", [0, 1, -1])], name=f"{name}_tokens")[0]  # GQA takes [B, S, N]
    extra = list(rotary) if rotary else []
    attn = g.node("GroupQueryAttention",
                  [qkv, "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length", *extra],
                  name=name, domain="com.microsoft", outputs=[f"{name}/out", f"present_key.{i}", f"present_value.{i}"],
                  num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, do_rotary=int(rotary is not None),
                  rotary_interleaved=0, scale=1.0 / float(np.sqrt(cfg.head_dim)))[0]
    return g.node("Reshape", [attn, g.shape("rows", [0, -1])], name=f"{name}_rows")[0]


# (ids [B,1], past lengths [B], K/V 2L x [B,Hkv,S,D]) -> (logits [B,V], the new token's K/V 2L x [B,Hkv,1,D])
DecodeReference = Callable[[np.ndarray, np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]


def torch_reference(model) -> DecodeReference:
    """The torch step model seen as a decode reference: ``(ids [B,1], past [B], kv 2L x
    [B,Hkv,S,D]) -> (logits [B,V] float32, the new token's K/V 2L x [B,Hkv,1,D])``."""

    def run(ids: np.ndarray, past: np.ndarray, kv: list[np.ndarray]):
        b = len(past)
        with torch.no_grad():
            out = model(torch.from_numpy(ids), torch.from_numpy(past.reshape(b, 1)), torch.from_numpy(past),
                        torch.ones(b, dtype=torch.int64), *[torch.from_numpy(a.astype(np.float32)) for a in kv])
        return out[0].numpy(), [t.numpy() for t in out[1:]]
    return run


def step_graph_reference(step_path, num_layers: int) -> DecodeReference:
    """The step graph (ONNX Runtime CPU) as a decode reference, same contract as
    ``torch_reference``: the new token at each row's past length. A quantized step graph is
    the reference of a decode part quantized the same way (same weights, same blocks)."""
    from ember.ort.session import StepSession

    sess = StepSession(step_path, num_layers)

    def run(ids: np.ndarray, past: np.ndarray, kv: list[np.ndarray]):
        b = len(past)
        return sess.run(ids, past.reshape(b, 1).copy(), past, np.ones(b, np.int64), kv)
    return run


def decode_check_state(cfg, kv_dtype, batch: int = 3, capacity: int = 48, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``check_decode_graph``'s random decode state: ids [B,1], past lengths [B] (row 0 at the
    buffer's last position), K/V 2L x [B,Hkv,S,D] in ``kv_dtype``; S = ``capacity`` (at most
    ``max_positions``)."""
    capacity = min(capacity, cfg.max_positions)
    rng = np.random.default_rng(seed)
    past = rng.integers(0, capacity - 1, batch).astype(np.int64)
    past[0] = capacity - 1  # one row at the buffer's last position
    ids = rng.integers(0, cfg.vocab_size, (batch, 1)).astype(np.int64)
    kv = [rng.standard_normal((batch, cfg.num_kv_heads, capacity, cfg.head_dim)).astype(kv_dtype)
          for _ in range(2 * cfg.num_layers)]
    return ids, past, kv


def recorded_reference(reference: DecodeReference, cfg, kv_dtype, **state) -> DecodeReference:
    """``reference``'s answer on ``check_decode_graph``'s decode state (``state``: its batch, capacity
    and seed; ``kv_dtype``: the part's K/V type), computed now and given back later without
    ``reference``: the compile records the torch model's before it frees the torch weights."""
    ids, past, kv = decode_check_state(cfg, kv_dtype, **state)
    answer = reference(ids, past, kv)

    def run(ids_: np.ndarray, past_: np.ndarray, kv_: list[np.ndarray]):
        same = (np.array_equal(ids, ids_) and np.array_equal(past, past_) and len(kv) == len(kv_)
                and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(kv, kv_)))
        if not same:
            raise ValueError("a recorded decode reference answers only the decode state it was recorded on: call "
                             "check_decode_graph with the batch, capacity and seed given to recorded_reference")
        return answer
    return run


def check_decode_graph(model, cfg, onnx_path, batch: int = 3, capacity: int = 48, seed: int = 0,
                       reference: DecodeReference | None = None, kv_tol: float | None = None) -> float:
    """Run the fused graph (ONNX Runtime CPU, K/V bound in place) against a reference
    (``torch_reference(model)`` unless ``reference`` is given) on a random decode state whose
    rows are at different past lengths. Returns the logits' max error relative to their
    largest magnitude; raises ``EmberError`` when the K/V written in place differ from the
    reference's by more than ``kv_tol`` (default: 1e-4 in FP32, 2e-2 in FP16) relative to
    their largest magnitude, or any other cache position changed."""
    from ember.errors import EmberError
    from ember.ort.decode_session import DecodeSession

    sess = DecodeSession(onnx_path, cfg.num_layers)
    kv_dtype = np.float16 if sess.sess.get_inputs()[3].type == "tensor(float16)" else np.float32
    ids, past, kv = decode_check_state(cfg, kv_dtype, batch, capacity, seed)
    before = [a.copy() for a in kv]
    want, new_kv = (reference or torch_reference(model))(ids, past, kv)  # before the part updates kv in place
    logits = sess.run(ids, past, kv)
    want = want.astype(np.float32)
    err = float(np.abs(logits - want).max() / max(float(np.abs(want).max()), 1e-6))
    tol = kv_tol if kv_tol is not None else (2e-2 if kv_dtype == np.float16 else 1e-4)
    worst = (0.0, "")
    for i, (a, b, new) in enumerate(zip(kv, before, new_kv)):
        new = np.asarray(new, np.float32)
        for r in range(batch):
            p = int(past[r])
            got = a[r, :, p].astype(np.float32)
            scale = max(float(np.abs(new[r, :, 0]).max()), 1e-6)
            rel = float(np.abs(got - new[r, :, 0]).max()) / scale
            if rel > worst[0]:
                worst = (rel, f"layer {i // 2} {'kv'[i % 2]} of row {r} written at position {p}")
            a[r, :, p] = b[r, :, p]
        if not np.array_equal(a, b):
            raise EmberError(f"fused decode graph: layer {i // 2} changed cache positions other than the new token's")
    if worst[0] > tol:
        raise EmberError(f"fused decode graph: {worst[1]} differs from the reference by {worst[0]:.2e} of its "
                         f"largest value (tolerance {tol:g})")
    return err
