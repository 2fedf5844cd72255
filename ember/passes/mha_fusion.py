"""Fuse exported scaled-dot-product attention into ``com.microsoft.MultiHeadAttention``.

torch's ONNX export of ``F.scaled_dot_product_attention`` (diffusers' attention processor) writes
the attention out op by op, and ONNX Runtime's own UNet fusion (``onnxruntime.transformers``,
``model_type='unet'``) does not recognise that form (it fails reading the head count). On the
CUDA provider the unfused form materialises the [B, H, S, S] score matrix per layer (the
64x64-latent self-attention of SD-1.5: 4096 x 4096 per head); ``MultiHeadAttention`` runs a
flash / memory-efficient kernel instead. ONNX Runtime's CPU provider implements it too, which is
how the rewrite is checked (tests/test_diffusion_device.py).

Pattern (per Softmax; q, k, v are [B, S, H*d] projections, ``T(p)`` a Transpose with perm p)::

    scores = MatMul(Mul?(T(0,2,1,3)(Reshape(q, [B,-1,H,d])), f), Mul?(T(0,2,3,1)(Reshape(k, ..)), f'))
    out    = Reshape(T(0,2,1,3)(MatMul(Softmax(scores, axis=-1), T(0,2,1,3)(Reshape(v, ..)))), [B,-1,H*d])

becomes ``out = MultiHeadAttention(q, k, v, num_heads=H, scale=s)``. The scale: the product of
the two factors when they are constants, 1 without them, and MultiHeadAttention's default
1/sqrt(d) when they are computed from the tensors' shapes (SDPA's default scale, as exported).
Every intermediate must feed only the pattern (Shape reads aside; else that attention is left
as is). Nodes left without consumers are removed.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ember.passes.quant_graph import GraphIndex, unique_name, all_names

MS_DOMAIN = "com.microsoft"
# ops of a scale factor computed from shapes only (SDPA's default scale, 1/sqrt(sqrt(d)) per side)
_SHAPE_OPS = frozenset({"Shape", "Slice", "Gather", "Cast", "Sqrt", "Div", "Mul", "Reciprocal", "Constant",
                        "Unsqueeze", "Squeeze", "Identity", "Pow"})


def fuse_attention(model: onnx.ModelProto) -> int:
    """Rewrite every matching attention of ``model`` in place; returns how many were fused."""
    idx = GraphIndex.build(model.graph)
    taken = all_names(model)
    fused, drop = [], set()
    for sm in [n for n in model.graph.node if n.op_type == "Softmax"]:
        match = _match(idx, sm)
        if match is None:
            continue
        (q, k, v, heads, scale, out), nodes = match
        attrs = {"num_heads": heads}
        if scale is not None:
            attrs["scale"] = float(scale)
        name = unique_name(taken, (sm.name or "attention").rsplit("/", 1)[0] + "/MultiHeadAttention")
        fused.append((nodes[-1], helper.make_node("MultiHeadAttention", [q, k, v], [out], name=name,
                                                  domain=MS_DOMAIN, **attrs)))
        drop |= {id(n) for n in nodes}
    if not fused:
        return 0
    replace = {id(last): mha for last, mha in fused}
    kept = []
    for n in model.graph.node:
        if id(n) in replace:
            kept.append(replace[id(n)])
        elif id(n) not in drop:
            kept.append(n)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    _remove_dead(model.graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(fused)


def _only(idx: GraphIndex, name: str, op: str, perm: list[int] | None = None):
    """The single consumer of ``name`` if it is an ``op`` (with Transpose ``perm``), else None."""
    cons = idx.consumers.get(name, [])
    if len(cons) != 1 or name in idx.graph_outputs or cons[0].op_type != op:
        return None
    return cons[0] if perm is None or _perm(cons[0]) == perm else None


def _perm(node: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _producer(idx: GraphIndex, name: str, op: str, perm: list[int] | None = None):
    """The ``op`` (with Transpose ``perm``) producing ``name``, read by nothing but one node and
    Shape nodes (the exported scale reads the query's shape), else None."""
    node = idx.producer.get(name)
    if node is None or node.op_type != op or (perm is not None and _perm(node) != perm):
        return None
    readers = [c for c in idx.consumers.get(name, []) if c.op_type != "Shape"]
    if len(readers) != 1 or name in idx.graph_outputs:
        return None
    return node


def _heads(idx: GraphIndex, reshape: onnx.NodeProto) -> int | None:
    """H of a ``Reshape(x, [B, -1, H, d])``: a constant shape, or a Concat with a constant third part."""
    shape = idx.constant(reshape.input[1])
    if shape is not None:
        return int(shape[2]) if shape.size == 4 else None
    concat = idx.producer.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    h = idx.constant(concat.input[2])
    return int(np.asarray(h).reshape(-1)[0]) if h is not None and np.asarray(h).size == 1 else None


def _side(idx: GraphIndex, name: str, perm: list[int]):
    """(projection, heads, factor, nodes) of a score-MatMul input: Mul?(T(perm)(Reshape(proj)), factor)."""
    nodes, factor = [], None
    node = idx.producer.get(name)
    if node is not None and node.op_type == "Mul" and len(idx.consumers.get(name, [])) == 1:
        nodes.append(node)
        t_in = [i for i in node.input if (p := idx.producer.get(i)) is not None and p.op_type == "Transpose"]
        if len(t_in) != 1:
            return None
        factor = node.input[1] if node.input[0] == t_in[0] else node.input[0]
        name = t_in[0]
    tr = _producer(idx, name, "Transpose", perm)
    if tr is None:
        return None
    rs = _producer(idx, tr.input[0], "Reshape")
    if rs is None:
        return None
    heads = _heads(idx, rs)
    return (rs.input[0], heads, factor, [rs, tr, *nodes]) if heads else None


def _factor_value(idx: GraphIndex, factor: str | None):
    """('const', value) | ('shape', None) | None when the factor is neither."""
    if factor is None:
        return ("const", 1.0)
    c = idx.constant(factor)
    if c is not None:
        return ("const", float(np.asarray(c).reshape(-1)[0])) if np.asarray(c).size == 1 else None
    stack, seen = [factor], set()
    while stack:
        name = stack.pop()
        if name in seen or idx.constant(name) is not None:
            continue
        seen.add(name)
        node = idx.producer.get(name)
        if node is None or node.op_type not in _SHAPE_OPS:
            return None
        if node.op_type != "Shape":
            stack.extend(i for i in node.input if i)
    return ("shape", None)


def _match(idx: GraphIndex, sm: onnx.NodeProto):
    axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3):
        return None
    scores = _producer(idx, sm.input[0], "MatMul")
    if scores is None:
        return None
    q_side, k_side = _side(idx, scores.input[0], [0, 2, 1, 3]), _side(idx, scores.input[1], [0, 2, 3, 1])
    if q_side is None or k_side is None:
        return None
    pv = _only(idx, sm.output[0], "MatMul")
    if pv is None or pv.input[0] != sm.output[0]:
        return None
    v_tr = _producer(idx, pv.input[1], "Transpose", [0, 2, 1, 3])
    v_rs = _producer(idx, v_tr.input[0], "Reshape") if v_tr is not None else None
    o_tr = _only(idx, pv.output[0], "Transpose", [0, 2, 1, 3])
    o_rs = _only(idx, o_tr.output[0], "Reshape") if o_tr is not None else None
    if v_rs is None or o_rs is None:
        return None
    heads = {q_side[1], k_side[1], _heads(idx, v_rs)}
    if len(heads) != 1:
        return None
    fq, fk = _factor_value(idx, q_side[2]), _factor_value(idx, k_side[2])
    if fq is None or fk is None:
        return None
    if fq[0] == fk[0] == "const":
        scale = fq[1] * fk[1]
    elif fq[0] == fk[0] == "shape":
        scale = None  # SDPA's default 1/sqrt(d), MultiHeadAttention's default
    else:
        return None
    # the projections' Reshape/Transpose/Mul and the scale arithmetic go with the dead-node sweep
    nodes = [scores, sm, pv, o_tr, o_rs]
    return (q_side[0], k_side[0], v_rs.input[0], heads.pop(), scale, o_rs.output[0]), nodes


def _remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is read (repeated until none is left)."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output if o)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)
