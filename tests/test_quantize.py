"""The Q/DQ pass on tiny graphs: runs in ONNX Runtime, right pattern, TensorRT-valid, close to float."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from _quantize_models import attention, convs, feeds, gemms, mlp, no_weights
from onnx import numpy_helper

from ember.errors import ConfigError
from ember.passes.quant_accuracy import accuracy_report
from ember.passes.quant_graph import GraphIndex, ort_session
from ember.passes.qdq_validate import validate_qdq
from ember.passes.quantize import QuantOptions, cpu_int8_needs_reduced_range, quantize_model

RR = cpu_int8_needs_reduced_range()  # ORT's AVX2 int8 GEMM needs 7-bit weights (docs/quantization.md)


def _q(model, opts=None, n=4):
    return quantize_model(model, feeds(model, n), opts or QuantOptions(reduce_range=RR))


def _weight_dq(model: onnx.ModelProto, consumer: str) -> tuple[onnx.NodeProto, np.ndarray, np.ndarray]:
    """(the DQ feeding ``consumer``'s weight, its quantized values, its scales)."""
    idx = GraphIndex.build(model.graph)
    node = next(n for n in model.graph.node if n.name == consumer)
    dq = idx.producer[node.input[1]]
    assert dq.op_type == "DequantizeLinear", f"{consumer}'s weight is not dequantized"
    return dq, idx.constant(dq.input[0]), idx.constant(dq.input[1])


def _axis(dq: onnx.NodeProto) -> int | None:
    return next((a.i for a in dq.attribute if a.name == "axis"), None)


def test_int8_mlp_pattern_runs_and_matches_float():
    m = mlp()
    q, rep = _q(m)
    counts = {op: sum(n.op_type == op for n in q.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    assert counts == {"QuantizeLinear": 2, "DequantizeLinear": 4}  # 2 activations (Q + DQ), 2 weights (DQ)
    dq, w, s = _weight_dq(q, "fc1")
    assert w.dtype == np.int8 and _axis(dq) == 1 and s.shape == (32,)
    zero_points = [numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_zero_point")]
    assert zero_points and all(np.all(z == 0) for z in zero_points)
    assert validate_qdq(q).ok
    acc = accuracy_report(m, q, feeds(m, 3, seed=7))
    assert acc["max_rel_error"] < 0.05, acc
    assert rep.weight_bytes_float / rep.weight_bytes_quantized > 3.0  # per-channel scales weigh on tiny weights
    json.dumps(rep.to_dict())
    tables = rep.scale_tables()
    assert all(v.dtype == np.float32 for v in tables.values()) and "fc1.weight_scale" in tables


def test_input_model_is_not_modified():
    m = mlp()
    before = m.SerializeToString()
    _q(m)
    assert m.SerializeToString() == before


@pytest.mark.parametrize("consumer, axis, channels", [("gemm_tb", 0, 20), ("gemm_n", 1, 6)])
def test_gemm_weight_axis_follows_transB(consumer, axis, channels):
    q, _ = _q(gemms(), QuantOptions(reduce_range=RR, gemm_as_matmul=False))
    dq, _, s = _weight_dq(q, consumer)
    assert _axis(dq) == axis and s.shape == (channels,)
    assert validate_qdq(q).ok


def test_gemms_become_matmuls_that_ort_fuses(tmp_path):
    m = gemms()
    q, rep = _q(m)
    assert not any(n.op_type == "Gemm" for n in q.graph.node)
    dq, _, s = _weight_dq(q, "gemm_tb")  # transB=1 folded: stored [K, N], per-channel axis 1
    assert _axis(dq) == 1 and s.shape == (20,)
    assert accuracy_report(m, q, feeds(m, 2, seed=5))["max_rel_error"] < 0.05
    ort_session(q, optimized_path=str(tmp_path / "opt.onnx"))
    ran = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ran.count("MatMulIntegerToFloat") == 2, ran


def test_conv_axes_and_concat_inputs_share_one_scale():
    m = convs()
    q, _ = _q(m)
    for consumer, axis, channels in (("conv1", 0, 8), ("convT", 1, 4), ("conv2", 0, 5)):
        dq, _, s = _weight_dq(q, consumer)
        assert _axis(dq) == axis and s.shape == (channels,), consumer
    idx = GraphIndex.build(q.graph)
    cat = next(n for n in q.graph.node if n.op_type == "Concat")
    dqs = [idx.producer[i] for i in cat.input]
    assert all(d.op_type == "DequantizeLinear" for d in dqs)
    assert len({float(idx.constant(d.input[1])) for d in dqs}) == 1  # one scale for all Concat inputs
    assert not any(n.op_type == "QuantizeLinear" and idx.producer.get(n.input[0], n).op_type == "Concat"
                   for n in q.graph.node)
    assert validate_qdq(q).ok
    assert accuracy_report(m, q, feeds(m, 2, seed=3))["max_rel_error"] < 0.05


def test_conv_outputs_form_runs_as_qlinearconv(tmp_path):
    m = convs()
    q, rep = _q(m, QuantOptions(reduce_range=RR, quantize_conv_outputs=True))
    idx = GraphIndex.build(q.graph)
    conv1 = next(n for n in q.graph.node if n.name == "conv1")  # read only by the Relu: gets an output Q
    assert [c.op_type for c in idx.consumers[conv1.output[0]]] == ["QuantizeLinear"]
    assert validate_qdq(q).ok
    assert accuracy_report(m, q, feeds(m, 2, seed=3))["max_rel_error"] < 0.06
    ort_session(q, optimized_path=str(tmp_path / "opt.onnx"))
    ran = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "QLinearConv" in ran, ran


def test_attention_no_qdq_on_softmax_reshape_transpose_outputs():
    m = attention()
    q, rep = _q(m, QuantOptions(reduce_range=RR, quantize_activation_matmul=True))
    idx = GraphIndex.build(q.graph)
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear":
            prod = idx.producer.get(n.input[0])
            assert prod is None or prod.op_type not in ("Softmax", "Reshape", "Transpose", "Concat"), n.name
    assert "qk" in rep.quantized_nodes and "out_proj" in rep.quantized_nodes
    assert "Softmax" in rep.skipped["pv"]
    assert validate_qdq(q).ok
    ort_session(q).run(None, feeds(m, 1)[0])


def test_run_time_matmuls_stay_float_by_default():
    _, rep = _q(attention())
    assert set(rep.quantized_nodes) == {"out_proj"}


def test_weights_only_has_no_activation_quantization_and_needs_no_feeds():
    m = mlp()
    q, rep = quantize_model(m, [], QuantOptions(scheme="int8-weights"))
    assert not any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) == 2
    assert validate_qdq(q, weights_only=True).ok and not validate_qdq(q).ok  # W8A8 would want both inputs
    assert rep.calib_method is None
    assert accuracy_report(m, q, feeds(m, 2))["max_rel_error"] < 0.02


def test_reduce_range_keeps_weights_in_7_bits():
    q, _ = quantize_model(mlp(), feeds(mlp(), 2), QuantOptions(reduce_range=True))
    _, w, _ = _weight_dq(q, "fc1")
    assert w.min() >= -63 and w.max() <= 63 and w.max() == 63


def test_fp8_structure_and_ort_run():
    m = mlp(opset=19)
    q, rep = quantize_model(m, feeds(m, 3), QuantOptions(scheme="fp8"))
    v = validate_qdq(q)
    assert v.ok and v.quantized_types == {"FLOAT8E4M3FN"}
    _, w, _ = _weight_dq(q, "fc1")
    assert w.dtype.name == "float8_e4m3fn"
    assert rep.opset == 19
    try:  # ORT's CPU FP8 coverage is partial (docs/quantization.md): run it where it can
        acc = accuracy_report(m, q, feeds(m, 2, seed=9))
    except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/NotImplemented types
        pytest.skip(f"ONNX Runtime CPU cannot run this FP8 graph: {e}")
    assert acc["max_rel_error"] < 0.12  # E4M3 keeps 3 mantissa bits: ~4% rms error per value and layer


def test_fp8_on_old_opset_names_the_fix_and_upgrade_works():
    m = mlp(opset=17)
    with pytest.raises(ConfigError, match="opset >= 19.*upgrade_opset=True"):
        quantize_model(m, feeds(m, 2), QuantOptions(scheme="fp8"))
    q, rep = quantize_model(m, feeds(m, 2), QuantOptions(scheme="fp8", upgrade_opset=True))
    assert rep.opset == 19 and validate_qdq(q).ok


def test_no_quantizable_ops_is_a_clear_error():
    with pytest.raises(ConfigError, match="no quantizable ops"):
        _q(no_weights())
    with pytest.raises(ConfigError, match="no quantizable ops.*exclude pattern"):
        _q(mlp(), QuantOptions(exclude_names=("fc",)))


def test_exclude_names_and_ops():
    _, rep = _q(mlp(), QuantOptions(reduce_range=RR, exclude_names=("^fc2$",)))
    assert rep.quantized_nodes == ["fc1"] and "exclude pattern" in rep.skipped["fc2"]
    _, rep = _q(convs(), QuantOptions(reduce_range=RR, exclude_ops=("ConvTranspose",)))
    assert "convT" not in rep.quantized_nodes and "conv1" in rep.quantized_nodes


def test_calibration_feed_errors_name_the_input():
    m = mlp()
    good = feeds(m, 1)[0]
    with pytest.raises(ConfigError, match="missing inputs \\['x'\\].*unknown inputs \\['y'\\]"):
        quantize_model(m, [{"y": good["x"]}], QuantOptions())
    with pytest.raises(ConfigError, match="'x' has shape \\[4, 15\\].*\\['\\?', 16\\]"):
        quantize_model(m, [{"x": good["x"][:, :15]}], QuantOptions())
    with pytest.raises(ConfigError, match="'x' is float64"):
        quantize_model(m, [{"x": good["x"].astype(np.float64)}], QuantOptions())
    with pytest.raises(ConfigError, match="needs calibration feeds"):
        quantize_model(m, [], QuantOptions())


def test_bad_options_are_rejected():
    with pytest.raises(ConfigError, match="scheme"):
        QuantOptions(scheme="int4")
    with pytest.raises(ConfigError, match="calibration method"):
        QuantOptions(calib_method="mse")
    with pytest.raises(ConfigError, match="alpha"):
        QuantOptions(smoothquant_alpha=1.5)


@pytest.mark.parametrize("method", ["max", "percentile", "entropy"])
def test_calibration_methods_all_produce_valid_graphs(method):
    m = convs()
    q, rep = _q(m, QuantOptions(reduce_range=RR, calib_method=method, percentile=99.9))
    assert validate_qdq(q).ok and rep.calib_method == method
    assert accuracy_report(m, q, feeds(m, 2, seed=4))["max_rel_error"] < 0.08


def test_residual_add_quantization_puts_qdq_on_both_inputs():
    m = no_weights()
    q, rep = _q(m, QuantOptions(reduce_range=RR, quantize_residual_add=True))
    idx = GraphIndex.build(q.graph)
    add = next(n for n in q.graph.node if n.op_type == "Add")
    assert [idx.producer[i].op_type for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]
    assert rep.quantized_nodes == ["add"] and validate_qdq(q).ok


def test_thresholds_clip_outliers_but_keep_the_bulk():
    from ember.passes.calibration import TensorStats, threshold

    rng = np.random.default_rng(0)
    x = np.abs(np.concatenate([rng.standard_normal(200_000), [60.0, -55.0]]))
    amax = float(x.max())
    hist, _ = np.histogram(x, bins=2048, range=(0.0, amax))
    st = TensorStats(amax, hist=hist)
    assert threshold(st, "max") == amax
    p = threshold(st, "percentile", 99.99)
    assert 3.5 < p < 5.0  # the 99.99th percentile of |N(0,1)| is ~3.9
    e = threshold(st, "entropy")
    assert 2.0 < e < 20.0 < amax  # clips the two outliers, keeps the Gaussian bulk
    assert threshold(TensorStats(0.0), "entropy") == 1.0  # an all-zero tensor still gets a valid scale


def test_models_past_the_protobuf_limit_go_through_a_file_and_stay_whole(monkeypatch):
    import ember.passes.quant_graph as qg

    monkeypatch.setattr(qg, "_INLINE_LIMIT", 0)  # force the external-data path
    m = mlp()
    q, _ = _q(m)
    acc = accuracy_report(m, q, feeds(m, 2, seed=7))
    assert acc["max_rel_error"] < 0.05
    assert all(t.HasField("raw_data") or t.float_data or t.int32_data for t in m.graph.initializer)
