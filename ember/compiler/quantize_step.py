"""Compile-time quantization of the decoder step graph: calibration feeds from prompts, the
Q/DQ pass (or, for the block-wise schemes, the MatMulNBits pass), the scales table, and the
accuracy report (``--max-error`` gate)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from ember.errors import ConfigError, EmberError
from ember.progress import StageLog

CALIB_CAPACITY = 160  # KV positions of the calibration pool (prompts are truncated to fit)
CALIB_DECODE_STEPS = 4


def _prompt_ids(src, prompts: list[str], limit: int) -> list[list[int]]:
    if src.tokenizer is None:
        raise ConfigError("this model has no tokenizer, so prompts cannot calibrate it; compile without --quantize "
                          "or add tokenizer files to the model folder")
    ids = [src.tokenizer.encode(p).ids[:limit] for p in prompts]
    return [i for i in ids if i]


def quantize_step_graph(proto: onnx.ModelProto, src, options, folder: Path, log: StageLog
                        ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize ``proto`` per ``options`` (CompileOptions); write ``tables/quant_scales.safetensors``
    under ``folder``; return the new graph and the manifest's ``quantization`` record."""
    if options.blockwise:
        return quantize_blockwise(proto, src, options, log)
    from safetensors.numpy import save_file

    from ember.passes.calibration_data import decoder_step_feeds, default_prompts, load_prompts
    from ember.passes.quant_accuracy import accuracy_report, format_accuracy
    from ember.passes.quantize import QuantOptions, cpu_int8_needs_reduced_range, quantize_model

    qopts = QuantOptions(scheme=options.quantize, calib_method=options.calib_method,
                         smoothquant_alpha=options.smoothquant, upgrade_opset=options.quantize == "fp8",
                         reduce_range=options.backend == "onnxruntime" and options.quantize != "fp8"
                         and cpu_int8_needs_reduced_range(),
                         # an int8 table read by Gather + Cast is an ONNX Runtime pattern; TensorRT builders
                         # accept quantized constants only in front of a DequantizeLinear
                         quantize_embeddings=options.backend == "onnxruntime")
    limit = CALIB_CAPACITY - CALIB_DECODE_STEPS
    calib_prompts = load_prompts(options.calib) if options.calib else default_prompts("calib")
    held_out = default_prompts("heldout")
    calib_ids = _prompt_ids(src, calib_prompts, limit)
    held_ids = _prompt_ids(src, held_out, limit)
    feeds = [] if qopts.weights_only else decoder_step_feeds(proto, calib_ids, CALIB_CAPACITY,
                                                             decode_steps=CALIB_DECODE_STEPS)
    log.note(f"calibration: {len(calib_ids)} prompts ({'user file' if options.calib else 'built-in set'}), "
             f"{len(feeds)} step feeds")
    quant, report = quantize_model(proto, feeds, qopts)
    log.note(f"{len(report.quantized_nodes)} nodes quantized; weights {report.weight_bytes_float / 1e6:.1f} MB -> "
             f"{report.weight_bytes_quantized / 1e6:.1f} MB")
    held_feeds = decoder_step_feeds(proto, held_ids, CALIB_CAPACITY, decode_steps=CALIB_DECODE_STEPS)
    try:
        acc = accuracy_report(proto, quant, held_feeds)
    except Exception as e:  # ONNX Runtime has no CPU kernels for some FP8 patterns
        if options.quantize != "fp8":
            raise
        acc = {"skipped": f"ONNX Runtime could not run the FP8 graph on this machine ({type(e).__name__}); "
                          "the graph was validated structurally for TensorRT"}
    if "max_rel_error" in acc:
        log.note("accuracy on held-out prompts: " + format_accuracy(acc))
        if options.max_error is not None and acc["max_rel_error"] > options.max_error:
            raise EmberError(f"quantized engine's relative error {acc['max_rel_error']:.3%} on {acc['worst_output']} "
                             f"exceeds --max-error {options.max_error:.3%}; try --calib-method percentile, "
                             f"--smoothquant 0.5, or --quantize int8-weights")
    tables = report.scale_tables()
    if tables:
        (folder / "tables").mkdir(exist_ok=True)
        save_file(tables, str(folder / "tables" / "quant_scales.safetensors"))
    info = report.to_dict()
    info["accuracy"] = {k: v for k, v in acc.items() if k != "outputs"}
    info["calibration"] = {"prompts": len(calib_ids), "source": str(options.calib or "built-in"),
                           "feeds": len(feeds), "held_out_prompts": len(held_ids)}
    return quant, info


def quantize_blockwise(proto: onnx.ModelProto, src, options, log: StageLog) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``--quantize int4`` / ``int8-weights`` on ONNX Runtime: weight MatMuls -> MatMulNBits
    (passes/matmul_nbits.py); the accuracy report and ``--max-error`` gate as for Q/DQ."""
    from ember.passes.calibration_data import decoder_step_feeds, default_prompts, load_prompts
    from ember.passes.matmul_nbits import NBitsOptions, quantize_matmul_nbits
    from ember.passes.quant_accuracy import accuracy_report, format_accuracy

    nb = NBitsOptions(bits=4 if options.quantize == "int4" else 8, block_size=options.block_size or 32,
                      method=options.int4_method, symmetric=options.symmetric,
                      quantize_lm_head=options.quantize_lm_head)
    limit = CALIB_CAPACITY - CALIB_DECODE_STEPS
    feeds, calib_info = [], {"prompts": 0, "source": "none (weights only)", "feeds": 0}
    if nb.method == "gptq":
        calib_prompts = load_prompts(options.calib) if options.calib else default_prompts("calib")
        calib_ids = _prompt_ids(src, calib_prompts, limit)
        feeds = decoder_step_feeds(proto, calib_ids, CALIB_CAPACITY, decode_steps=CALIB_DECODE_STEPS)
        calib_info = {"prompts": len(calib_ids), "source": str(options.calib or "built-in"), "feeds": len(feeds)}
    quant, report = quantize_matmul_nbits(proto, nb, feeds)
    log.note(f"{report.summary()}; weights {report.weight_bytes_float / 1e6:.1f} MB -> "
             f"{report.weight_bytes_quantized / 1e6:.1f} MB (accuracy_level {nb.accuracy_level})")
    held_ids = _prompt_ids(src, default_prompts("heldout"), limit)
    acc = accuracy_report(proto, quant, decoder_step_feeds(proto, held_ids, CALIB_CAPACITY,
                                                           decode_steps=CALIB_DECODE_STEPS))
    log.note("accuracy on held-out prompts: " + format_accuracy(acc))
    if options.max_error is not None and acc["max_rel_error"] > options.max_error:
        hint = ("--block-size 32 or --int4-method hqq, or --quantize int8-weights" if nb.bits == 4
                else "--block-size 32, or compile without --quantize")
        raise EmberError(f"quantized engine's relative error {acc['max_rel_error']:.3%} on {acc['worst_output']} "
                         f"exceeds --max-error {options.max_error:.3%}; try {hint}")
    info = {**report.to_dict(), "scheme": options.quantize}
    info["accuracy"] = {k: v for k, v in acc.items() if k != "outputs"}
    info["calibration"] = {**calib_info, "held_out_prompts": len(held_ids)}
    return quant, info
