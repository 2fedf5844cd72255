"""The decoder step graph's passes, as ``passes.contract.Pass`` objects, and the list the
compile options choose (``decoder_passes``). Each wraps a pass function without changing it.

Order and facts: the LM-head rewrite runs while the graph is exported (it reads float
weights); FP16 conversion next (it rewrites float weights, so it needs ``float-weights``);
quantization last (it turns the weights into int8/int4 codes: ``float-weights`` no longer
holds, so nothing that needs float weights can follow it).
"""
from __future__ import annotations

import onnx

from ember.passes.contract import Pass, PassContext, PassResult


def _lm_head_gemm(model: onnx.ModelProto, context: PassContext) -> PassResult:
    from ember.passes.lm_head_gemm import lm_head_gemm

    model, changed = lm_head_gemm(model, base_dir=context.folder)
    return PassResult(model, changed)


def _fp16(model: onnx.ModelProto, context: PassContext) -> PassResult:
    from ember.export.external_data import load_all
    from ember.passes.fp16 import convert_to_fp16, default_keep_fp32, fp16_report

    model = convert_to_fp16(load_all(model, context.folder), keep_fp32=default_keep_fp32(context.options.backend))
    return PassResult(model, True, fp16_report(model) or {})


def _quantize(model: onnx.ModelProto, context: PassContext) -> PassResult:
    from ember.compiler.quantize_step import quantize_step_graph

    model, info = quantize_step_graph(model, context.source, context.options, context.folder, context.log,
                                      cache=context.nbits_cache)
    return PassResult(model, True, info)


LM_HEAD_GEMM = Pass("lm-head-gemm", _lm_head_gemm, requires=frozenset({"step-graph", "float-weights"}),
                    ensures=frozenset({"lm-head-gemm"}), stage="LM head MatMul -> Gemm")
FP16 = Pass("fp16", _fp16, requires=frozenset({"step-graph", "float-weights"}), ensures=frozenset({"fp16"}),
            stage="converting to FP16")


def _fp16_segment(model: onnx.ModelProto, context: PassContext) -> PassResult:
    from ember.passes.fp16 import convert_to_fp16, fp16_report

    # a shard's logits stay float32 (as the TP=1 step graph's); partials/hidden/K/V go FP16
    model = convert_to_fp16(model, fp32_outputs=("logits_shard",))
    return PassResult(model, True, fp16_report(model) or {})


FP16_SEGMENT = Pass("fp16", _fp16_segment, requires=frozenset({"float-weights"}), ensures=frozenset({"fp16"}),
                    stage="converting the segment to FP16")


def quantize_pass(options) -> Pass:
    """The quantization pass of ``options`` (CompileOptions with ``quantize`` set)."""
    how = (f"block-wise MatMulNBits, block {options.block_size or 32}" if options.blockwise
           else f"calibration {options.calib_method}")
    if options.quantize_sites:
        from ember.compiler.quantize_sites import format_sites

        how += f", sites {format_sites(options.quantize_sites)}"
    return Pass("quantize", _quantize, requires=frozenset({"step-graph", "float-weights"}),
                ensures=frozenset({"quantized"}), removes=frozenset({"float-weights"}),
                stage=f"quantizing ({options.quantize}, {how})")


def segment_passes(options) -> list[Pass]:
    """The passes run on each exported tensor-parallel segment (``tp_compile``), in order."""
    return [FP16_SEGMENT] if options.dtype == "fp16" else []


def decoder_passes(options) -> list[Pass]:
    """The passes run on the exported step graph, in order, for ``options`` (CompileOptions)."""
    passes = []
    if options.dtype == "fp16":
        passes.append(FP16)
    if options.quantize:
        passes.append(quantize_pass(options))
    return passes
