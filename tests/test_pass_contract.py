"""The pass contract (``passes/contract.py``) and the decoder compile pipeline as a list of
passes (``compiler/decoder_passes.py``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ember.compiler.compile import CompileOptions
from ember.compiler.decoder_passes import FP16, LM_HEAD_GEMM, decoder_passes, quantize_pass, segment_passes
from ember.engine_format.manifest import read_manifest
from ember.errors import ConfigError
from ember.passes.contract import PassContext, PassResult, run_passes


@pytest.mark.parametrize("options,names", [
    (CompileOptions(), []),
    (CompileOptions(dtype="fp16"), ["fp16"]),
    (CompileOptions(quantize="int8"), ["quantize"]),
    (CompileOptions(dtype="fp16", quantize="int4"), ["fp16", "quantize"]),
])
def test_the_pipeline_is_the_list_of_passes_the_options_choose(options, names):
    assert [p.name for p in decoder_passes(options)] == names


def test_a_tensor_parallel_segment_goes_fp16_through_its_pass_list_with_float32_logits():
    assert segment_passes(CompileOptions(tp=2)) == []
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["h", "w"], ["logits_shard"]),
                           helper.make_node("MatMul", ["h", "w"], ["partial"])], "seg",
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("logits_shard", TensorProto.FLOAT, [2, 6]),
                           helper.make_tensor_value_info("partial", TensorProto.FLOAT, [2, 6])], [w])
    passes = segment_passes(CompileOptions(tp=2, dtype="fp16"))
    model, records = run_passes(passes, helper.make_model(g), PassContext())
    out_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert [r.name for r in records] == ["fp16"] and records[0].changed
    assert out_types == {"logits_shard": TensorProto.FLOAT, "partial": TensorProto.FLOAT16}


def test_a_pass_stage_says_what_it_does():
    assert quantize_pass(CompileOptions(quantize="int4", block_size=64)).stage == \
        "quantizing (int4, block-wise MatMulNBits, block 64)"
    assert quantize_pass(CompileOptions(quantize="int8", calib_method="entropy")).stage == \
        "quantizing (int8, calibration entropy)"


def _lm_head_graph(tied: bool = True) -> onnx.ModelProto:
    """h [2,4] @ W^T -> logits [2,6]; with ``tied`` the embedding [6,4] holds W."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((6, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(np.ascontiguousarray(emb.T), "w_t")]
    if tied:
        inits.append(numpy_helper.from_array(emb, "embed"))
    g = helper.make_graph([helper.make_node("MatMul", ["h", "w_t"], ["logits"], name="lm_head")], "g",
                          [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 6])], inits)
    return helper.make_model(g)


def test_every_result_is_recorded_in_order():
    noop = dataclasses.replace(FP16, name="noop", fn=lambda m, c: PassResult(m, False, {"why": "nothing to do"}))
    model, records = run_passes([LM_HEAD_GEMM, noop], _lm_head_graph(), PassContext())
    assert [n.op_type for n in model.graph.node] == ["Gemm"]
    assert [r.to_dict() for r in records] == [{"name": "lm-head-gemm", "changed": True},
                                              {"name": "noop", "changed": False, "record": {"why": "nothing to do"}}]
    _, again = run_passes([LM_HEAD_GEMM], model, PassContext())  # no MatMul left: nothing changes
    assert again[0].changed is False


def test_a_pass_whose_requirement_is_unmet_fails_before_it_runs():
    ran = []
    quantize = dataclasses.replace(quantize_pass(CompileOptions(quantize="int8")),
                                   fn=lambda m, c: PassResult(m, True))  # the facts without the calibration
    fp16 = dataclasses.replace(FP16, fn=lambda m, c: ran.append("fp16") or PassResult(m, True))
    context = PassContext()
    with pytest.raises(ConfigError, match="pass 'fp16' requires float-weights"):
        run_passes([quantize, fp16], _lm_head_graph(), context)
    assert ran == [] and "quantized" in context.facts and "float-weights" not in context.facts
    run_passes([fp16, quantize], _lm_head_graph(), PassContext())  # the pipeline's order
    assert ran == ["fp16"]


def test_a_pass_must_return_a_pass_result():
    bad = dataclasses.replace(LM_HEAD_GEMM, fn=lambda m, c: (m, True))
    with pytest.raises(TypeError, match="not a PassResult"):
        run_passes([bad], _lm_head_graph(), PassContext())


def test_the_manifest_records_the_export_pass(gpt2_tiny):
    """The LM-head rewrite's result was dropped by the export hook before the pass contract."""
    assert read_manifest(gpt2_tiny).extra["passes"] == [{"name": "lm-head-gemm", "changed": True}]
