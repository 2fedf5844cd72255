"""The pieces of ONNX Runtime's fused-operator decoder graphs that every such graph shares.

``gqa_decode.py`` (one new token per row, GroupQueryAttention over a slot pool) and
``paged_step.py`` (packed tokens, PagedAttention over a block pool) write the same layers
around a different attention node. The layers live here, once:

- ``SimplifiedLayerNormalization`` / ``com.microsoft.SkipSimplifiedLayerNormalization``:
  RMSNorm, fused with the residual add that precedes it (LayerNorm likewise for GPT-2);
- linear layers as ``Gemm(transB=1)`` on torch's [out, in] weight, or as MatMul on [in, out]
  (``linears="matmul"``, the form the block-wise quantizer turns into MatMulNBits);
- SwiGLU as gate/up ``Gemm`` + ``com.microsoft.QuickGelu(alpha=1)`` (= SiLU) + ``Mul``;
- the rotary cos/sin tables [max_positions, rotary_dim/2] the attention operators read.

Hidden states are 2-D rows [R, C] throughout (R = batch rows or packed tokens); the bodies
take the attention node as a callback ``attention(g, name, layer_index, layer, qkv) -> [R, H*D]``
where ``qkv`` is the packed [R, (H+2Hkv)D] projection.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from ember.export.external_data import INLINE_BYTES, TensorFileWriter
from ember.export.matmul_sites import linear_site

DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}
LINEARS = ("gemm", "matmul")


class FusedGraph:
    """Nodes + initializers under construction (numpy weights converted to the graph dtype). With
    ``data`` (an ``external_data.TensorFileWriter``), each weight of ``INLINE_BYTES`` or more goes
    to that file as it is made and its initializer is an external reference: the graph under
    construction holds no weights (``gqa_decode.write_decode_graph``)."""

    def __init__(self, np_dtype, linears: str = "gemm", data: TensorFileWriter | None = None):
        self.np_dtype = np_dtype
        self.linears = linears
        self.data = data
        self.nodes: list = []
        self.inits: list = []
        self._n = 0
        self._shapes: set[str] = set()
        self.sites: dict[str, str] = {}  # weight node name -> site (export/matmul_sites.py)

    def shape(self, name: str, dims: list[int]) -> str:
        """An int64 shape constant ``shape.<name>``, stored once however many nodes use it."""
        full = f"shape.{name}"
        if full not in self._shapes:
            self._shapes.add(full)
            self.weight(full, np.array(dims), np.int64)
        return full

    def weight(self, name: str, t: torch.Tensor | np.ndarray, dtype=None) -> str:
        if isinstance(t, torch.Tensor):  # torch lays out a transposed view 4x faster than numpy (llama-1b: 3 s, not 14)
            t = t.detach().to(torch.float32).contiguous().numpy()
        a = t.astype(dtype or self.np_dtype)
        if self.data is None or a.nbytes < INLINE_BYTES:
            self.inits.append(numpy_helper.from_array(a, name))
            return name
        tensor = TensorProto(name=name, dims=a.shape, data_type=helper.np_dtype_to_tensor_dtype(a.dtype))
        self.data.add(tensor, memoryview(a.reshape(-1).view(np.uint8)))  # the bytes from_array would hold
        self.inits.append(tensor)
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None, domain: str = "",
             outputs: list[str] | None = None, **attrs) -> list[str]:
        self._n += 1
        name = name or f"{op}_{self._n}"
        outs = outputs or [f"{name}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs


# (graph, node name, layer index, the torch layer, packed qkv [R, (H+2Hkv)D]) -> attention output [R, H*D]
Attention = Callable[[FusedGraph, str, int, torch.nn.Module, str], str]


def rotary_tables(g: FusedGraph, model, cfg) -> tuple[str, str]:
    """cos/sin initializers [max_positions, D/2] (``rope.cos``, ``rope.sin``), computed in float64
    and stored in the graph dtype; scaled RoPE (linear / llama3) through the step model's frequencies."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if cfg.rope_scaling is not None:
        inv_freq = model.inv_freq.double().numpy()
    freqs = np.arange(cfg.max_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return g.weight("rope.cos", np.cos(freqs)), g.weight("rope.sin", np.sin(freqs))


def llama_body(g: FusedGraph, model, cfg, ids: str, attention: Attention) -> tuple[str, str]:
    """RMSNorm (fused with the residual add), attention, SwiGLU over the rows of ``ids``;
    returns (final hidden [R, C], head weight)."""
    eps = float(cfg.norm_eps)
    embed = g.weight("embed_tokens.weight", model.embed_tokens.weight)
    x = g.node("Gather", [embed, ids], name="embed")[0]  # [R, C]: the residual stream
    pending = None  # the previous sublayer's output, added to the residual by the next norm
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        y, x = rms_norm(g, f"{p}.input_layernorm", layer.input_layernorm.weight, x, pending, eps)
        w_qkv = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight], 0)  # [(H+2Hkv)D, C]
        b_qkv = None if layer.q_proj.bias is None else torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias])
        attn = attention(g, f"{p}.attn", i, layer, linear(g, f"{p}.qkv", y, w_qkv, b_qkv))
        o = linear(g, f"{p}.o_proj", attn, layer.o_proj.weight, layer.o_proj.bias)
        y, x = rms_norm(g, f"{p}.post_attention_layernorm", layer.post_attention_layernorm.weight, x, o, eps)
        gate = linear(g, f"{p}.gate_proj", y, layer.gate_proj.weight)
        up = linear(g, f"{p}.up_proj", y, layer.up_proj.weight)
        act = g.node("QuickGelu", [gate], name=f"{p}.silu", domain="com.microsoft", alpha=1.0)[0]
        mlp = g.node("Mul", [act, up], name=f"{p}.swiglu")[0]
        pending = linear(g, f"{p}.down_proj", mlp, layer.down_proj.weight)
    hid, _ = rms_norm(g, "norm", model.norm.weight, x, pending, eps)
    # tied: the embedding matrix is the head, read in place
    head = embed if model.lm_head is None else g.weight("lm_head.weight", model.lm_head.weight)
    return hid, head


def gpt2_body(g: FusedGraph, model, cfg, ids: str, positions: str, attention: Attention) -> tuple[str, str]:
    """LayerNorm (fused with the residual add), learned positions (``positions``: each row's
    position), attention, tanh-GELU MLP; returns (final hidden [R, C], head weight)."""
    eps = float(cfg.norm_eps)
    wte = g.weight("wte.weight", model.wte.weight)
    tok = g.node("Gather", [wte, ids], name="embed")[0]
    pos = g.node("Gather", [g.weight("wpe.weight", model.wpe.weight), positions], name="embed_positions")[0]
    x, pending = tok, pos  # the residual stream [R, C] and the sublayer output the next norm adds to it
    for i, blk in enumerate(model.blocks):
        p = f"blocks.{i}"
        y, x = layer_norm(g, f"{p}.ln_1", blk.ln_1, x, pending, eps)
        attn = attention(g, f"{p}.attn", i, blk, linear(g, f"{p}.c_attn", y, blk.c_attn.weight, blk.c_attn.bias))
        o = linear(g, f"{p}.c_proj", attn, blk.c_proj.weight, blk.c_proj.bias)
        y, x = layer_norm(g, f"{p}.ln_2", blk.ln_2, x, o, eps)
        h = linear(g, f"{p}.c_fc", y, blk.c_fc.weight, blk.c_fc.bias)
        h = g.node("FastGelu", [h], name=f"{p}.gelu", domain="com.microsoft")[0]  # tanh approximation (gelu_new)
        pending = linear(g, f"{p}.mlp_proj", h, blk.mlp_proj.weight, blk.mlp_proj.bias)
    hid, _ = layer_norm(g, "ln_f", model.ln_f, x, pending, eps)
    head = wte if model.lm_head is None else g.weight("lm_head.weight", model.lm_head.weight)
    return hid, head


def layer_norm(g: FusedGraph, name: str, ln, x: str, pending: str, eps: float) -> tuple[str, str]:
    """LayerNorm of ``x + pending``; returns (normed, the new residual stream)."""
    out = g.node("SkipLayerNormalization", [pending, x, g.weight(f"{name}.weight", ln.weight), g.weight(f"{name}.bias", ln.bias)],
                 name=name, domain="com.microsoft", outputs=[f"{name}/out", "", "", f"{name}/residual"], epsilon=eps)
    return out[0], out[3]


def linear(g: FusedGraph, name: str, x: str, weight, bias=None) -> str:
    """``x @ weight.T + bias``: as ``Gemm(transB=1)`` on torch's [out, in] layout (on the GPU the
    one-row GEMMs of a decode read the weight faster this way than as MatMul's [in, out]), or,
    for the block-wise quantizer (``g.linears == "matmul"``), as MatMul on [in, out] + Add. ``name``
    ends in the torch Linear's name (or ``qkv``), which gives the node's site (``matmul_sites``)."""
    site = linear_site(name)
    if site is None:
        raise ValueError(f"fused-graph linear {name!r}: its last name part is none of matmul_sites.LINEAR_SITES")
    g.sites[name] = site
    if g.linears == "matmul":
        y = g.node("MatMul", [x, g.weight(f"{name}.weight_kn", weight.detach().T)], name=name)[0]
        return y if bias is None else g.node("Add", [y, g.weight(f"{name}.bias", bias)], name=f"{name}_bias")[0]
    inputs = [x, g.weight(f"{name}.weight", weight)]
    if bias is not None:
        inputs.append(g.weight(f"{name}.bias", bias))
    return g.node("Gemm", inputs, name=name, transB=1)[0]


def rms_norm(g: FusedGraph, name: str, weight, x: str, pending: str | None, eps: float) -> tuple[str, str]:
    """RMSNorm of ``x + pending`` (or of ``x``); returns (normed, the new residual stream)."""
    w = g.weight(f"{name}.weight", weight)
    if pending is None:
        return g.node("SimplifiedLayerNormalization", [x, w], name=name, axis=-1, epsilon=eps, stash_type=1)[0], x
    out = g.node("SkipSimplifiedLayerNormalization", [pending, x, w], name=name, domain="com.microsoft",
                 outputs=[f"{name}/out", "", "", f"{name}/residual"], epsilon=eps)
    return out[0], out[3]
