"""The Q/DQ pass on exported tiny decoders (step graphs), calibration data and SmoothQuant."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from _quantize_models import feeds, mlp

from ember.errors import ConfigError
from ember.export.onnx_export import export_step_graph
from ember.export.sources import resolve_decoder_source
from ember.passes import calibration
from ember.passes.calibration import StatsCollector
from ember.passes.calibration_data import decoder_step_feeds, default_prompts, load_prompts
from ember.passes.quant_accuracy import accuracy_report
from ember.passes.quant_graph import ort_session
from ember.passes.quant_plan import PlanRules, plan_quantization
from ember.passes.qdq_validate import validate_qdq
from ember.passes.quantize import QuantOptions, activation_tensors, cpu_int8_needs_reduced_range, quantize_model
from ember.passes.smoothquant import apply_smoothquant, smooth_groups

RR = cpu_int8_needs_reduced_range()
CAPACITY = 96


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def decoder(request, tmp_path_factory):
    """(float step graph, calibration feeds, held-out feeds) of a built-in tiny decoder."""
    src = resolve_decoder_source(request.param)
    model = export_step_graph(src.model, src.config, tmp_path_factory.mktemp(request.param))
    ids = [src.tokenizer.encode(p).ids for p in default_prompts("calib")[:16]]
    held = [src.tokenizer.encode(p).ids for p in default_prompts("heldout")[:16]]
    return (request.param, model, decoder_step_feeds(model, ids, CAPACITY, batch_size=8, decode_steps=1),
            decoder_step_feeds(model, held, CAPACITY, batch_size=16, decode_steps=3))


def test_int8_step_graph_matches_float_and_uses_fused_int8_kernels(decoder, tmp_path):
    name, model, calib, held = decoder
    q, rep = quantize_model(model, calib, QuantOptions(reduce_range=RR))
    assert validate_qdq(q).ok
    acc = accuracy_report(model, q, held)
    assert acc["top1_agreement"] >= 0.95 and acc["rows"] == 64, acc
    assert acc["max_rel_error"] < 0.06, acc
    # 2-D Linears export as Gemm, which quantize_model rewrites to MatMul under the Gemm's name
    weight_matmuls = sum(1 for n in rep.quantized_nodes if n.endswith(("MatMul", "Gemm")))
    opt = tmp_path / "opt.onnx"
    ort_session(q, optimized_path=str(opt))
    ops = Counter(n.op_type for n in onnx.load(str(opt)).graph.node)
    assert ops["MatMulIntegerToFloat"] == weight_matmuls, ops  # every quantized Linear runs int8 in ORT
    assert rep.to_dict()["weight_compression"] > 3.5
    json.dumps(rep.to_dict())


def test_calibration_reuses_the_runs_that_made_the_feeds(decoder, monkeypatch):
    """Issue 18: the float runs that make the calibration feeds record the activation ranges, so
    quantize_model does not run the feeds again, and its scales equal a separate calibration pass's."""
    name, model, _, _ = decoder
    src = resolve_decoder_source(name)
    ids = [src.tokenizer.encode(p).ids for p in default_prompts("calib")[:12]]
    opts = QuantOptions(reduce_range=RR)
    observe = StatsCollector(activation_tensors(model, opts))
    feeds = decoder_step_feeds(model, ids, CAPACITY, batch_size=8, decode_steps=2, observe=observe)
    assert len(feeds) == 2 * 3 and observe.names
    _, separate = quantize_model(model, feeds, opts)
    real_runs, runs = calibration._runs, []
    monkeypatch.setattr(calibration, "_runs", lambda *a, **k: runs.append(a[2]) or real_runs(*a, **k))
    _, reused = quantize_model(model, feeds, opts, activation_stats=observe.stats)
    assert runs == [], f"calibration ran the feeds again for {runs}"
    assert reused.activation_scales.keys() == separate.activation_scales.keys()
    for t, scale in separate.activation_scales.items():
        assert reused.activation_scales[t] == pytest.approx(scale, rel=1e-6), t
    # a tensor the stats lack is still calibrated by the pass itself
    partial = dict(list(observe.stats.items())[1:])
    _, filled = quantize_model(model, feeds, opts, activation_stats=partial)
    assert len(runs) == 1 and runs[0] == [next(iter(observe.stats))]
    assert filled.activation_scales == pytest.approx(separate.activation_scales, rel=1e-6)


@pytest.mark.skipif(not RR, reason="this CPU has VNNI: ONNX Runtime's int8 GEMM does not saturate")
def test_full_range_weights_saturate_ort_avx2_int8_gemm(decoder):
    """Why reduce_range exists: without VNNI, u8*s8 pair sums overflow int16 in ORT's kernel."""
    _, model, calib, held = decoder
    err = {rr: accuracy_report(model, quantize_model(model, calib, QuantOptions(reduce_range=rr))[0], held)["max_rel_error"]
           for rr in (False, True)}
    assert err[False] > 2 * err[True], err


def test_smoothquant_folds_into_norms_of_decoders(decoder):
    name, model, calib, held = decoder
    q, rep = quantize_model(model, calib, QuantOptions(reduce_range=RR, smoothquant_alpha=0.5))
    assert len(rep.smoothed) == 2 * 2 + 1  # pre-attention and pre-MLP norms of both layers + final norm
    assert validate_qdq(q).ok
    # random-init weights have no activation outliers, so SmoothQuant cannot help here (see the
    # outlier test below); it must not break the model either
    assert accuracy_report(model, q, held)["top1_agreement"] >= 0.85


def test_smoothquant_reduces_error_with_outlier_channels():
    m = mlp()
    ln_scale = next(t for t in m.graph.initializer if t.name == "ln_s")
    value = onnx.numpy_helper.to_array(ln_scale).copy()
    value[[3, 11]] = 150.0  # two outlier channels, as in LLM activations
    ln_scale.CopyFrom(onnx.numpy_helper.from_array(value, "ln_s"))
    calib, held = feeds(m, 4), feeds(m, 3, seed=11)
    errors = {}
    for alpha in (None, 0.5):
        q, _ = quantize_model(m, calib, QuantOptions(reduce_range=RR, smoothquant_alpha=alpha, exclude_names=("fc2",)))
        errors[alpha] = accuracy_report(m, q, held)["max_rel_error"]
    assert errors[0.5] < 0.7 * errors[None], errors


def test_smoothquant_preserves_the_float_function():
    m = mlp()
    rules = PlanRules(("MatMul",), (), (), True, False, False, False)
    plan = plan_quantization(m, rules)
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(m)
    groups = smooth_groups(smoothed, plan)
    amax = {"ln": np.linspace(0.1, 30.0, 16).astype(np.float32)}  # one outlier-heavy channel range
    result = apply_smoothquant(smoothed, groups, amax, alpha=0.5)
    assert result.smoothed == ["ln"] and "r1" in result.not_smoothed  # Relu output: no foldable producer
    x = feeds(m, 1)[0]
    ref, got = ort_session(m).run(None, x)[0], ort_session(smoothed).run(None, x)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_step_feeds_follow_the_step_graph_contract(decoder):
    name, model, calib, _ = decoder
    prefill, decode = calib[0], calib[1]
    b = prefill["input_ids"].shape[0]
    assert decode["input_ids"].shape == (b, 1) and np.all(decode["new_lengths"] == 1)
    np.testing.assert_array_equal(decode["past_lengths"], prefill["new_lengths"])
    np.testing.assert_array_equal(decode["positions"][:, 0], prefill["new_lengths"])
    assert decode["past_key.0"].shape[2] == CAPACITY
    row_len = int(prefill["new_lengths"][0])
    assert np.any(decode["past_key.0"][0, :, :row_len] != 0) and np.all(decode["past_key.0"][0, :, row_len:] == 0)


def test_step_feeds_reject_a_too_small_pool(decoder):
    _, model, _, _ = decoder
    with pytest.raises(ConfigError, match="past_capacity=4 is too small"):
        decoder_step_feeds(model, [[1, 2, 3, 4]], 4, decode_steps=1)


def test_load_prompts_text_and_json(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(text) == ["first prompt", "second prompt"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["a\nmulti-line prompt", "b"]))
    assert load_prompts(js) == ["a\nmulti-line prompt", "b"]
    bad = tmp_path / "bad.json"
    bad.write_text('["a", 3]')
    with pytest.raises(ConfigError, match="list of strings"):
        load_prompts(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompts(empty)


def test_default_prompt_splits_are_disjoint():
    calib, held = default_prompts("calib"), default_prompts("heldout")
    assert len(calib) == len(held) == 32 and not set(calib) & set(held)
