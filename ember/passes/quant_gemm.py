"""Rewrite Gemm with a constant weight as MatMul (+ Add of the bias), in place.

Why: ONNX Runtime fuses DQ->MatMul into MatMulIntegerToFloat (int8 GEMM, float output), but a
Gemm with dequantized inputs and a float output stays a float Gemm that dequantizes its weight
on every call (measured in benchmarks/quantize.py: the UNet stand-in's time-embedding Linears).
TensorRT treats MatMul + Add like Gemm. The numerics are unchanged.

Cases rewritten: alpha == 1, beta == 1 (or no C), transA == 0, B constant (through Transpose
nodes); transB folds into the stored weight ([N, K] -> [K, N]). Others are left alone.
"""
from __future__ import annotations

from collections.abc import Container

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ember.passes.quant_graph import GraphIndex, all_names, unique_name


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == onnx.AttributeProto.FLOAT else a.i
    return default


def gemm_to_matmul(model: onnx.ModelProto, keep: Container[str] = (), base_dir=None) -> int:
    """Rewrite every eligible Gemm (see the module docstring) except those named in ``keep``;
    returns how many were rewritten. Weights kept in external files are read from ``base_dir``."""
    idx = GraphIndex.build(model.graph, base_dir)
    taken = all_names(model)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = 0
    for node in model.graph.node:
        found = idx.constant_weight(node.input[1]) if node.op_type == "Gemm" else None
        if (found is None or node.name in keep or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0
                or _attr(node, "transA", 0) != 0 or found[0].ndim != 2):
            nodes.append(node)
            continue
        weight = found[0].T if _attr(node, "transB", 0) else found[0]
        name = node.name or f"Gemm_{node.output[0]}"
        w_name = unique_name(taken, f"{name}.weight_kn")
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight), w_name))
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = unique_name(taken, f"{node.output[0]}_matmul") if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{name}_bias"))
        count += 1
    if count:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(inits)
    return count
