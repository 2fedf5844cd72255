"""Apply a QuantPlan: rewrite the graph with symmetric, zero-point-0 Q/DQ (in place).

Forms written (TensorRT's explicit-quantization forms, which ONNX Runtime also fuses):
  weight      W_q (int8 | float8e4m3fn constant) -> DequantizeLinear(axis) -> op
  activation  x -> QuantizeLinear -> DequantizeLinear -> op   (one Q/DQ pair per consuming edge)
  embedding   Gather(table int8, ids) -> Cast(float) -> Mul(Gather(row scales [V,1], ids))
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ember.passes.quant_graph import all_names, topological_order, unique_name
from ember.passes.quant_plan import QuantPlan

INT8_WEIGHT_MAX = 127.0  # weights use [-127, 127] so the range is symmetric
INT8_ACT_MAX = 127.0
FP8_E4M3_MAX = 448.0


@dataclass(frozen=True)
class QuantFormat:
    name: str  # "int8" | "fp8"
    elem_type: int  # TensorProto element type of quantized tensors
    weight_max: float
    act_max: float

    def quantize(self, x: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
        q = np.clip(x / scale, -self.weight_max, self.weight_max)
        if self.name == "int8":
            return np.round(q).astype(np.int8)
        import ml_dtypes

        return q.astype(ml_dtypes.float8_e4m3fn)

    def zero_point(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.quantize(np.zeros(shape, np.float32), 1.0)


INT8 = QuantFormat("int8", TensorProto.INT8, INT8_WEIGHT_MAX, INT8_ACT_MAX)
# ONNX Runtime's AVX2 int8 GEMM (no VNNI) adds pairs of u8*s8 products in int16 (vpmaddubsw),
# which saturates with full-range weights: 7-bit weights keep every pair below 2**15.
INT8_REDUCED = QuantFormat("int8", TensorProto.INT8, 63.0, INT8_ACT_MAX)
FP8 = QuantFormat("fp8", TensorProto.FLOAT8E4M3FN, FP8_E4M3_MAX, FP8_E4M3_MAX)


def weight_scales(value: np.ndarray, axis: int | None, fmt: QuantFormat) -> np.ndarray:
    """Per-channel (along ``axis``) or per-tensor scales: max|w| / weight_max, never 0."""
    a = np.abs(value)
    amax = a.max() if axis is None else a.max(axis=tuple(d for d in range(a.ndim) if d != axis))
    amax = np.where(amax > 0, amax, 1.0)
    return (amax / fmt.weight_max).astype(np.float32)


def _broadcast(scale: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def apply_plan(model: onnx.ModelProto, plan: QuantPlan, act_scales: dict[str, float],
               fmt: QuantFormat) -> dict[str, np.ndarray]:
    """Insert the planned Q/DQ into ``model`` (in place); returns the tables written (name -> array).

    ``act_scales`` maps each ActSite's calibration tensor to its scale (Concat inputs share one).
    """
    g = model.graph
    taken = all_names(model)
    before: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # node name -> nodes to emit before it
    rewire: dict[tuple[str, int], str] = {}
    inits: list[onnx.TensorProto] = []
    tables: dict[str, np.ndarray] = {}

    for w in plan.weights:
        value = w.value  # read now, dropped after its codes are made
        scale = weight_scales(value, w.axis, fmt)
        q = fmt.quantize(value, _broadcast(scale, w.axis, value.ndim))
        del value
        base = unique_name(taken, f"{w.node}.w{w.input_index}")
        inits += [numpy_helper.from_array(q, f"{base}_quantized"), numpy_helper.from_array(scale, f"{base}_scale"),
                  numpy_helper.from_array(fmt.zero_point(scale.shape), f"{base}_zero_point")]
        attrs = {"axis": w.axis} if w.axis is not None else {}
        before[w.node].append(helper.make_node(
            "DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"], [f"{base}_dequantized"],
            name=f"{base}_DequantizeLinear", **attrs))
        rewire[(w.node, w.input_index)] = f"{base}_dequantized"
        tables[f"{w.node}.weight_scale"] = scale

    for site in plan.activations:
        scale = np.float32(act_scales[site.calib_tensor])
        base = unique_name(taken, f"{site.tensor}")
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{base}_scale"),
                  numpy_helper.from_array(fmt.zero_point(()), f"{base}_zero_point")]
        tables[f"{site.tensor}.act_scale"] = np.array(scale, np.float32)
        for k, (node_name, idx) in enumerate(site.edges):
            # one Q per reading edge: ONNX Runtime fuses Q->DQ->MatMul into MatMulIntegerToFloat only
            # when the Q feeds that one DQ (measured: a Q shared by q/k/v projections left all three float)
            tag = base if len(site.edges) == 1 else f"{base}_{k}"
            before[node_name] += [
                helper.make_node("QuantizeLinear", [site.tensor, f"{base}_scale", f"{base}_zero_point"],
                                 [f"{tag}_quantized"], name=f"{tag}_QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{tag}_quantized", f"{base}_scale", f"{base}_zero_point"],
                                 [f"{tag}_dequantized"], name=f"{tag}_DequantizeLinear")]
            rewire[(node_name, idx)] = f"{tag}_dequantized"

    emb = {e.node: e for e in plan.embeddings}
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        nodes += before.get(node.name, [])
        for i in range(len(node.input)):
            if (node.name, i) in rewire:
                node.input[i] = rewire[(node.name, i)]
        if node.name in emb:
            nodes += _embedding_nodes(node, emb[node.name].value, taken, inits, tables)
        else:
            nodes.append(node)
    del g.node[:]
    g.node.extend(topological_order(nodes, {v.name for v in g.input} | {t.name for t in g.initializer} | {t.name for t in inits}))
    g.initializer.extend(inits)
    remove_dead_nodes(model)
    return tables


def _embedding_nodes(node: onnx.NodeProto, table: np.ndarray, taken: set[str], inits: list,
                     tables: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """Gather from an int8 table with per-row scales (R5 of quant_plan)."""
    scale = weight_scales(table, 0, INT8)  # [V]
    base = unique_name(taken, f"{node.name}.table")
    inits += [numpy_helper.from_array(INT8.quantize(table, scale[:, None]), f"{base}_quantized"),
              numpy_helper.from_array(scale[:, None], f"{base}_row_scale")]
    tables[f"{node.name}.row_scale"] = scale
    ids, out = node.input[1], node.output[0]
    return [
        helper.make_node("Gather", [f"{base}_quantized", ids], [f"{base}_rows_q"], name=f"{base}_Gather", axis=0),
        helper.make_node("Cast", [f"{base}_rows_q"], [f"{base}_rows"], name=f"{base}_Cast", to=TensorProto.FLOAT),
        helper.make_node("Gather", [f"{base}_row_scale", ids], [f"{base}_scales"], name=f"{base}_GatherScale", axis=0),
        helper.make_node("Mul", [f"{base}_rows", f"{base}_scales"], [out], name=f"{base}_Mul"),
    ]


def remove_dead_nodes(model: onnx.ModelProto) -> int:
    """Drop nodes whose outputs nobody reads and initializers nobody reads (in place); count removed."""
    g = model.graph
    removed = 0
    while True:
        used = {o.name for o in g.output}
        for node in g.node:
            used.update(i for i in node.input if i)
        keep = [n for n in g.node if any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        removed += len(g.node) - len(keep)
        del g.node[:]
        g.node.extend(keep)
    dead = {t.name for t in g.initializer if t.name not in used}
    if dead:
        live = [t for t in g.initializer if t.name not in dead]
        del g.initializer[:]
        g.initializer.extend(live)
        graph_inputs = [v for v in g.input if v.name not in dead]
        del g.input[:]
        g.input.extend(graph_inputs)
    return removed
