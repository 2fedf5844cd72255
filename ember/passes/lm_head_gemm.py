"""Pass: turn the LM head's ``MatMul(h, W^T)`` into ``Gemm(h, W, transB=1)``.

torch folds ``F.linear(h, W)`` into a MatMul against a transposed copy of W. For a tied
embedding that copy doubles the largest weight on disk and in memory; and ONNX Runtime's
CPU Gemm with transB reads W faster at small batch than MatMul reads W^T. Cases:
1. MatMul(A, B) whose B is a 2-D initializer and whose output is the graph output
   ``logits``, with A of rank 2 -> Gemm(A, B^T, transB=1).
2. As 1, and B^T equals another initializer (the tied embedding) -> Gemm on that one;
   B is removed.
Returns ``(model, modified)``; edits ``model`` in place. Weights stored in external files are read
from ``base_dir`` one at a time (``ember.export.external_data``).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ember.export.external_data import read_tensor
from ember.export.matmul_sites import read_sites, write_sites


def lm_head_gemm(model: onnx.ModelProto, base_dir=None, output: str = "logits") -> tuple[onnx.ModelProto, bool]:
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    node = next((n for n in g.node if n.op_type == "MatMul" and output in n.output), None)
    if node is None or node.input[1] not in inits:
        return model, False
    b = inits[node.input[1]]
    if len(b.dims) != 2:
        return model, False
    wt = read_tensor(b, base_dir).T
    tied = None
    for i in g.initializer:  # case 2: same shape, same values
        if i.name != b.name and list(i.dims) == list(wt.shape) and i.data_type == b.data_type:
            if np.array_equal(read_tensor(i, base_dir), wt):
                tied = i.name
                break
    if tied is None:
        tied = b.name + "_t"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(wt), tied))
    gemm = helper.make_node("Gemm", [node.input[0], tied], list(node.output), name=node.name + "_gemm", transB=1)
    idx = list(g.node).index(node)
    g.node.remove(node)
    g.node.insert(idx, gemm)
    sites = read_sites(model)  # the node's site record (export/matmul_sites.py) follows its new name
    sites.pop(node.name, None)
    write_sites(model, {**sites, gemm.name: "lm_head"})
    if not any(b.name in n.input for n in g.node):
        g.initializer.remove(b)
    return model, True
