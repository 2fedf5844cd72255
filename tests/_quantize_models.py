"""Tiny ONNX graphs for the quantization tests (built with onnx.helper: fast and exact)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def exported_step_graph(source: str, folder) -> onnx.ModelProto:
    """A built-in model's step graph as ``ember compile`` exports it (LM head as Gemm), in memory."""
    from ember.export.onnx_export import export_step_graph
    from ember.export.sources import resolve_decoder_source
    from ember.passes.lm_head_gemm import lm_head_gemm

    src = resolve_decoder_source(source)
    graph = export_step_graph(src.model, src.config, folder)
    lm_head_gemm(graph)
    return graph


def _weights(seed: int):
    """A weight maker with its own generator, so each graph is the same whatever ran before."""
    rng = np.random.default_rng(seed)
    return lambda *shape, scale=0.2: (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    g = h.make_graph(nodes, "g", inputs, outputs, [nh.from_array(v, k) for k, v in inits.items()])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


def mlp(opset: int = 17) -> onnx.ModelProto:
    """x [N,16] -> LayerNorm -> MatMul [16,32] + b -> Relu -> MatMul [32,8] -> y [N,8]."""
    _w = _weights(1)
    inits = {"ln_s": (1 + _w(16, scale=0.1)), "ln_b": _w(16, scale=0.1), "w1": _w(16, 32), "b1": _w(32),
             "w2": _w(32, 8)}
    nodes = [h.make_node("LayerNormalization", ["x", "ln_s", "ln_b"], ["ln"], name="ln", axis=-1),
             h.make_node("MatMul", ["ln", "w1"], ["mm1"], name="fc1"), h.make_node("Add", ["mm1", "b1"], ["a1"], name="b1add"),
             h.make_node("Relu", ["a1"], ["r1"], name="relu"), h.make_node("MatMul", ["r1", "w2"], ["y"], name="fc2")]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", 8])], inits, opset)


def gemms() -> onnx.ModelProto:
    """x [N,12] -> Gemm(transB=1, W [20,12]) -> Tanh -> Gemm(transB=0, W [20,6]) -> y [N,6]."""
    _w = _weights(2)
    inits = {"wa": _w(20, 12), "ba": _w(20), "wb": _w(20, 6)}
    nodes = [h.make_node("Gemm", ["x", "wa", "ba"], ["g1"], name="gemm_tb", transB=1),
             h.make_node("Tanh", ["g1"], ["t1"], name="tanh"),
             h.make_node("Gemm", ["t1", "wb"], ["y"], name="gemm_n")]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 12])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", 6])], inits)


def convs() -> onnx.ModelProto:
    """x [N,3,8,8] -> Conv 3->8 -> Relu -> ConvTranspose 8->4 (stride 2) -> Concat with an
    upsampled x branch -> Conv 7->5 -> y; the last Conv reads a Concat output."""
    _w = _weights(3)
    inits = {"wc": _w(8, 3, 3, 3), "bc": _w(8), "wt": _w(8, 4, 2, 2), "wc2": _w(5, 7, 3, 3),
             "scales": np.array([1, 1, 2, 2], np.float32)}
    nodes = [h.make_node("Conv", ["x", "wc", "bc"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["c1"], ["r1"], name="relu"),
             h.make_node("ConvTranspose", ["r1", "wt"], ["ct"], name="convT", strides=[2, 2]),
             h.make_node("Resize", ["x", "", "scales"], ["up"], name="up", mode="nearest"),
             h.make_node("Concat", ["ct", "up"], ["cat"], name="cat", axis=1),
             h.make_node("Conv", ["cat", "wc2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", 5, 16, 16])], inits)


def attention() -> onnx.ModelProto:
    """q,k,v [N,4,6]: s = MatMul(q, Transpose(k)) -> Softmax -> MatMul(., v) -> Reshape [N,24] -> MatMul W."""
    _w = _weights(4)
    inits = {"wo": _w(24, 10), "shape": np.array([0, 24], np.int64)}
    nodes = [h.make_node("Transpose", ["k"], ["kt"], name="kT", perm=[0, 2, 1]),
             h.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
             h.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             h.make_node("MatMul", ["p", "v"], ["o"], name="pv"),
             h.make_node("Reshape", ["o", "shape"], ["o2"], name="merge"),
             h.make_node("MatMul", ["o2", "wo"], ["y"], name="out_proj")]
    ins = [h.make_tensor_value_info(n, T.FLOAT, ["N", 4, 6]) for n in ("q", "k", "v")]
    return _model(nodes, ins, [h.make_tensor_value_info("y", T.FLOAT, ["N", 10])], inits)


def no_weights() -> onnx.ModelProto:
    """x -> Relu -> Add(x) -> y: nothing to quantize."""
    nodes = [h.make_node("Relu", ["x"], ["r"], name="relu"), h.make_node("Add", ["r", "x"], ["y"], name="add")]
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 4])],
                  [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], {})


def feeds(model: onnx.ModelProto, n: int, batch: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` random float feeds for every graph input (symbolic dims -> ``batch``)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for v in model.graph.input:
            shape = [d.dim_value if d.HasField("dim_value") else batch for d in v.type.tensor_type.shape.dim]
            feed[v.name] = rng.standard_normal(shape).astype(np.float32)
        out.append(feed)
    return out
