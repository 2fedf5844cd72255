"""TensorRT-compatibility check of a Q/DQ graph (docs/design.md §6); an analysis, it edits nothing.

Checks, each reported with the node at fault:
  V1 opset: INT8 Q/DQ needs default opset >= 13 (per-axis), FP8 E4M3 >= 19.
  V2 every Q/DQ is symmetric: constant zero point present and all 0; constant scales, finite, > 0;
     quantized type INT8 or FLOAT8E4M3FN (one type per graph).
  V3 activations (Q inputs) are per tensor, never a Concat/Softmax/Reshape/Transpose output,
     and every Q is read only by DQs with the same scale.
  V4 weights (DQ of a constant) feed Conv/ConvTranspose/MatMul/Gemm with the right per-channel
     axis (Conv 0, ConvTranspose 1, MatMul 1, Gemm 0 if transB else 1) and one scale per channel;
     INT8 weights lie in [-127, 127].
  V5 (W8A8 only) an op with a quantized weight also has its data input dequantized.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from ember.errors import ConfigError
from ember.passes.quant_graph import NO_QDQ_OUTPUT_OPS, GraphIndex, default_opset

MIN_OPSET = {TensorProto.INT8: 13, TensorProto.FLOAT8E4M3FN: 19}
_TYPE_NAMES = {TensorProto.INT8: "INT8", TensorProto.FLOAT8E4M3FN: "FLOAT8E4M3FN"}


@dataclass
class QdqValidation:
    problems: list[str] = field(default_factory=list)
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    quantized_types: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.problems


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def expected_weight_axis(consumer: onnx.NodeProto, input_index: int, weight_ndim: int) -> int | None:
    """The per-channel axis TensorRT expects for a weight at ``consumer.input[input_index]``."""
    op = consumer.op_type
    if input_index != 1:
        return None
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if _attr(consumer, "transB", 0) else 1
    if op == "MatMul":
        return 1 if weight_ndim == 2 else weight_ndim - 1
    return None


def _check_qdq_node(node: onnx.NodeProto, idx: GraphIndex, v: QdqValidation) -> None:  # V2
    where = f"{node.op_type} {node.name!r}"
    if len(node.input) < 3 or not node.input[2]:
        v.problems.append(f"{where}: no zero point (TensorRT needs an explicit zero point of 0)")
        return
    scale, zp = idx.constant(node.input[1]), idx.constant(node.input[2])
    if scale is None or zp is None:
        v.problems.append(f"{where}: scale and zero point must be constants")
        return
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        v.problems.append(f"{where}: scales must be finite and > 0")
    if np.any(zp.astype(np.float32) != 0):
        v.problems.append(f"{where}: zero point is not 0 (Ember's Q/DQ is symmetric)")
    zp_type = idx.initializers[node.input[2]].data_type if node.input[2] in idx.initializers else None
    if zp_type is not None:
        if zp_type not in _TYPE_NAMES:
            v.problems.append(f"{where}: quantized type {TensorProto.DataType.Name(zp_type)} is not INT8/FLOAT8E4M3FN")
        else:
            v.quantized_types.add(_TYPE_NAMES[zp_type])


def _check_weight(dq: onnx.NodeProto, idx: GraphIndex, v: QdqValidation, weights_only: bool) -> None:  # V4, V5
    w = idx.constant(dq.input[0])
    scale = idx.constant(dq.input[1])
    axis = _attr(dq, "axis", 1) if scale is not None and scale.ndim == 1 and scale.size > 1 else None
    if w is not None and w.dtype == np.int8 and (w.min(initial=0) < -127):
        v.problems.append(f"DequantizeLinear {dq.name!r}: INT8 weight has -128 (use [-127, 127] for symmetry)")
    for consumer in idx.consumers[dq.output[0]]:
        where = f"weight of {consumer.op_type} {consumer.name!r}"
        positions = [i for i, x in enumerate(consumer.input) if x == dq.output[0]]
        if consumer.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            v.problems.append(f"{where}: a dequantized constant feeds {consumer.op_type}, not a weight op")
            continue
        want = expected_weight_axis(consumer, positions[0], w.ndim)
        if axis is not None:
            if want is None or axis % w.ndim != want:
                v.problems.append(f"{where}: per-channel axis {axis}, expected {want}")
            elif scale.size != w.shape[want]:
                v.problems.append(f"{where}: {scale.size} scales for {w.shape[want]} channels on axis {want}")
        if not weights_only and positions[0] != 0 and not _dequantized(consumer.input[0], idx):
            v.problems.append(f"{where}: the data input {consumer.input[0]!r} has no Q/DQ (W8A8 quantizes both inputs)")


def _dequantized(name: str, idx: GraphIndex) -> bool:
    """Whether ``name`` is a DQ output, possibly through data-movement ops placed after the DQ,
    or a Concat of such outputs (Q/DQ on every Concat input, one shared scale)."""
    node = idx.producer.get(name)
    while node is not None and node.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"):
        node = idx.producer.get(node.input[0])
    if node is not None and node.op_type == "Concat":
        return all(_dequantized(i, idx) for i in node.input)
    return node is not None and node.op_type == "DequantizeLinear"


def validate_qdq(model: onnx.ModelProto, weights_only: bool = False) -> QdqValidation:
    """Check ``model``'s Q/DQ against V1-V5; never raises on a bad graph (see ``problems``)."""
    idx = GraphIndex.build(model.graph)
    v = QdqValidation()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            v.quantize_nodes += 1
            _check_qdq_node(node, idx, v)
            scale = idx.constant(node.input[1])
            if scale is not None and scale.size != 1:  # V3
                v.problems.append(f"QuantizeLinear {node.name!r}: activation scale is not per tensor")
            prod = idx.producer.get(node.input[0])
            if prod is not None and prod.op_type in NO_QDQ_OUTPUT_OPS:
                v.problems.append(f"QuantizeLinear {node.name!r}: quantizes a {prod.op_type} output ({node.input[0]!r})")
            for reader in idx.consumers[node.output[0]]:
                if reader.op_type != "DequantizeLinear":
                    v.problems.append(f"QuantizeLinear {node.name!r}: read by {reader.op_type} {reader.name!r}, not a DQ")
                elif reader.input[1:3] != node.input[1:3] and not np.array_equal(
                        idx.constant(reader.input[1]), idx.constant(node.input[1])):
                    v.problems.append(f"DequantizeLinear {reader.name!r}: scale differs from its QuantizeLinear")
        elif node.op_type == "DequantizeLinear":
            v.dequantize_nodes += 1
            _check_qdq_node(node, idx, v)
            if idx.is_constant(node.input[0]):
                _check_weight(node, idx, v, weights_only)
    opset = default_opset(model)  # V1
    for t in v.quantized_types:
        need = 13 if t == "INT8" else 19
        if opset < need:
            v.problems.append(f"{t} Q/DQ needs opset >= {need}; the model has opset {opset}")
    if len(v.quantized_types) > 1:
        v.problems.append(f"mixed quantized types {sorted(v.quantized_types)}")
    return v


def assert_trt_compatible(model: onnx.ModelProto, weights_only: bool = False) -> QdqValidation:
    """``validate_qdq`` that raises ConfigError listing the first problems."""
    v = validate_qdq(model, weights_only)
    if not v.ok:
        listed = "\n  ".join(v.problems[:10])
        more = f"\n  ... and {len(v.problems) - 10} more" if len(v.problems) > 10 else ""
        raise ConfigError(f"the Q/DQ graph is not TensorRT-compatible:\n  {listed}{more}")
    return v
