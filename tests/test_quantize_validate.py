"""The TensorRT-compatibility validator catches each rule it states (V1-V5 of qdq_validate)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from _quantize_models import mlp
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from ember.errors import ConfigError
from ember.passes.qdq_validate import assert_trt_compatible, validate_qdq


def _graph(weight_axis: int = 1, zp: int = 0, act_scale_shape: tuple = (), before_q: str = "Identity",
           opset: int = 17, weight_min: int = -127, data_qdq: bool = True) -> onnx.ModelProto:
    """x [N,8] -> <before_q> -> Q/DQ -> MatMul(DQ(W int8 [8,4], axis)) -> y."""
    w = np.clip(np.arange(32).reshape(8, 4) - 16, weight_min, 127).astype(np.int8)
    w[0, 0] = weight_min
    ws = np.full(w.shape[weight_axis], 0.01, np.float32)
    inits = [nh.from_array(w, "w_q"), nh.from_array(ws, "w_s"), nh.from_array(np.zeros(ws.shape, np.int8), "w_z"),
             nh.from_array(np.full(act_scale_shape, 0.05, np.float32), "a_s"),
             nh.from_array(np.full(act_scale_shape, zp, np.int8), "a_z")]
    nodes = [h.make_node(before_q, ["x"], ["x1"], name="pre", **({"perm": [0, 1]} if before_q == "Transpose" else {})),
             h.make_node("QuantizeLinear", ["x1", "a_s", "a_z"], ["x_q"], name="q"),
             h.make_node("DequantizeLinear", ["x_q", "a_s", "a_z"], ["x_dq"], name="dq"),
             h.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w_dq"], name="w_dq", axis=weight_axis),
             h.make_node("MatMul", ["x_dq" if data_qdq else "x1", "w_dq"], ["y"], name="mm")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", 4])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)])


def test_a_correct_graph_passes():
    v = validate_qdq(_graph())
    assert v.ok, v.problems
    assert (v.quantize_nodes, v.dequantize_nodes, v.quantized_types) == (1, 2, {"INT8"})


@pytest.mark.parametrize("kwargs, message", [
    ({"weight_axis": 0}, "per-channel axis 0, expected 1"),
    ({"zp": 3}, "zero point is not 0"),
    ({"act_scale_shape": (1,)}, None),  # a 1-element scale is still per tensor
    ({"before_q": "Transpose"}, "quantizes a Transpose output"),
    ({"opset": 12}, "needs opset >= 13"),
    ({"weight_min": -128}, "has -128"),
    ({"data_qdq": False}, "has no Q/DQ"),
])
def test_each_rule_is_enforced(kwargs, message):
    v = validate_qdq(_graph(**kwargs))
    if message is None:
        assert v.ok, v.problems
    else:
        assert any(message in p for p in v.problems), v.problems


def test_assert_raises_config_error_listing_problems():
    with pytest.raises(ConfigError, match="(?s)not TensorRT-compatible.*zero point"):
        assert_trt_compatible(_graph(zp=1))


def test_a_float_graph_has_nothing_to_flag():
    v = validate_qdq(mlp())
    assert v.ok and v.quantize_nodes == 0
