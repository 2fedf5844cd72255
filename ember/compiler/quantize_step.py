"""Compile-time quantization of the decoder step graph: calibration feeds from prompts, the
Q/DQ pass (or, for the block-wise schemes, the MatMulNBits pass), the scales table, and the
accuracy report (``--max-error`` gate)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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


def quantize_step_graph(proto: onnx.ModelProto, src, options, folder: Path, log: StageLog, cache=None
                        ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize ``proto`` per ``options`` (CompileOptions); write ``tables/quant_scales.safetensors``
    under ``folder``; return the new graph and the manifest's ``quantization`` record. The Q/DQ graph's
    weights may come back spilled into ``folder`` (``spill_weights``): save it with ``base_dir=folder``,
    then ``remove_spilled(folder)``. ``cache``: block-wise schemes, an ``NBitsCache`` recording each
    weight's result for the fused decode part (``quantize_decode_part``)."""
    if options.blockwise:
        return quantize_blockwise(proto, src, options, log, base_dir=folder, cache=cache)
    from safetensors.numpy import save_file

    from ember.export.external_data import load_all

    from ember.passes.calibration import StatsCollector
    from ember.passes.calibration_data import decoder_step_feeds, default_prompts, float_step_session, load_prompts
    from ember.passes.quant_accuracy import accuracy_report, format_accuracy
    from ember.passes.quantize import QuantOptions, activation_tensors, cpu_int8_needs_reduced_range, quantize_model

    qopts = QuantOptions(scheme=options.quantize, calib_method=options.calib_method,
                         smoothquant_alpha=options.smoothquant, upgrade_opset=options.quantize == "fp8",
                         reduce_range=options.backend == "onnxruntime" and options.quantize != "fp8"
                         and cpu_int8_needs_reduced_range(),
                         # an int8 table read by Gather + Cast is an ONNX Runtime pattern; TensorRT builders
                         # accept quantized constants only in front of a DequantizeLinear
                         quantize_embeddings=options.backend == "onnxruntime")
    if qopts.smoothquant_alpha is not None or qopts.upgrade_opset:
        load_all(proto, folder)  # SmoothQuant and the opset converter rewrite every weight: bring them into memory
    limit = CALIB_CAPACITY - CALIB_DECODE_STEPS
    calib_prompts = load_prompts(options.calib) if options.calib else default_prompts("calib")
    held_out = default_prompts("heldout")
    calib_ids = _prompt_ids(src, calib_prompts, limit)
    held_ids = _prompt_ids(src, held_out, limit)
    # the float runs that make the feeds also record the activation ranges calibration needs (SmoothQuant
    # excepted: it rescales those activations first, so quantize_model measures them after it)
    observed = activation_tensors(proto, qopts, folder) if qopts.smoothquant_alpha is None else []
    observe = StatsCollector(observed) if observed else None
    # one float session runs the calibration prompts and the held-out ones (the accuracy report's
    # reference, made here so that session is opened once); closed before the quantized graph is built
    session = float_step_session(proto, observe, base_dir=folder)
    feeds = [] if qopts.weights_only else decoder_step_feeds(proto, calib_ids, CALIB_CAPACITY, decode_steps=CALIB_DECODE_STEPS,
                                                             base_dir=folder, observe=observe, session=session)
    log.note(f"calibration: {len(calib_ids)} prompts ({'user file' if options.calib else 'built-in set'}), "
             f"{len(feeds)} step feeds")
    float_outputs: list = []
    held_feeds = decoder_step_feeds(proto, held_ids, CALIB_CAPACITY, decode_steps=CALIB_DECODE_STEPS,
                                    base_dir=folder, outputs=float_outputs, session=session)
    del session
    # weights are read one at a time from the step graph's data file; the float ones the quantized
    # graph still reads (norms) stay references into it, streamed into the engine's file by save_onnx
    quant, report = quantize_model(proto, feeds, qopts, base_dir=folder,
                                   activation_stats=None if observe is None else observe.stats)
    n_feeds = len(feeds)
    del feeds  # their K/V pools (~60 MB a feed for llama-1b) are not read again
    log.note(f"{len(report.quantized_nodes)} nodes quantized; weights {report.weight_bytes_float / 1e6:.1f} MB -> "
             f"{report.weight_bytes_quantized / 1e6:.1f} MB")
    spill_weights(quant, folder)  # out of memory: the quantized graph's session maps them
    try:
        acc = accuracy_report(proto, quant, held_feeds, base_dir=folder, float_outputs=float_outputs)
    except Exception as e:  # ONNX Runtime has no CPU kernels for some FP8 patterns
        if options.quantize != "fp8":
            raise
        acc = {"skipped": f"ONNX Runtime could not run the FP8 graph on this machine ({type(e).__name__}); "
                          "the graph was validated structurally for TensorRT"}
    del held_feeds, float_outputs
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
                           "feeds": n_feeds, "held_out_prompts": len(held_ids)}
    return quant, info


SPILL_FILE = ".quantized-step.onnx"  # spill_weights' graph file in the compile folder (remove_spilled removes it)


def spill_weights(model: onnx.ModelProto, folder: Path) -> bool:
    """Where ``save_onnx`` will write ``model``'s weights to a data file anyway (``saves_external``: a large
    model), move them out of memory now, into ``folder/SPILL_FILE.data`` (page-aligned: ONNX Runtime sessions
    over it, ``ort_session(model, base_dir=folder)``, map them); ``model`` refers to that file from then on,
    and saving it (``save_onnx(model, path, base_dir=folder)``) copies them file to file, the same bytes.
    Whoever saves it calls ``remove_spilled(folder)`` next. Returns whether it spilled."""
    from ember.export.external_data import write_model
    from ember.export.onnx_export import saves_external

    if not saves_external(model):
        return False
    write_model(model, Path(folder) / SPILL_FILE, base_dir=folder)
    return True


def remove_spilled(folder: Path) -> None:
    """Remove ``spill_weights``' files from ``folder`` (none there: nothing to do)."""
    path = Path(folder) / SPILL_FILE
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def blockwise_options(options, graph: onnx.ModelProto):
    """The ``NBitsOptions`` of ``options`` (CompileOptions) for ``graph``, the step graph or the
    fused decode part: one scheme for both, the same width at the same site. The LM head is found through the Cast (FP16) or
    Identity that may sit between it and the ``logits`` output."""
    from ember.passes.matmul_nbits import SCHEMES, NBitsOptions

    bits = {scheme: b for b, scheme in SCHEMES.items()}
    return NBitsOptions(bits=bits[options.quantize], block_size=options.block_size or 32,
                        method=options.int4_method, symmetric=options.symmetric,
                        quantize_lm_head=options.quantize_lm_head, lm_head_output=lm_head_output(graph),
                        site_bits={site: bits[scheme] for site, scheme in options.quantize_sites.items()})


def lm_head_output(graph: onnx.ModelProto, output: str = "logits") -> str:
    """Name of the tensor the LM head (MatMul/Gemm) writes: ``output`` itself, or the input of
    the Cast/Identity chain that ends in ``output``."""
    producer = {o: n for n in graph.graph.node for o in n.output}
    name = output
    while name in producer and producer[name].op_type in ("Cast", "Identity"):
        name = producer[name].input[0]
    return name


def activation_dtype(graph: onnx.ModelProto) -> np.dtype:
    """float16 for an FP16 step graph or decode part (its K/V inputs are FLOAT16), else float32."""
    kv = next((i for i in graph.graph.input if i.name.startswith("past_key")), None)
    fp16 = kv is not None and kv.type.tensor_type.elem_type == TensorProto.FLOAT16
    return np.dtype(np.float16 if fp16 else np.float32)


def match_scales_to_activations(model: onnx.ModelProto, dtype: np.dtype) -> int:
    """Store every MatMulNBits scale (and float zero point, HQQ) in ``dtype``, the graph's
    activation type; returns how many tensors changed. MatMulNBits binds A and its scales to one
    type, but ``quant_gemm.gemm_to_matmul`` writes each rewritten Gemm's weight in float32, so
    in an FP16 graph the quantizer gives those (GPT-2's Linears, a quantized LM head) float32
    scales. The codes were rounded with the float32 scale; its FP16 value differs by < 2^-11."""
    target = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = {i.name: i for i in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for name in node.input[2:4]:  # scales, zero_points
            t = inits.get(name)
            if t is not None and t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and t.data_type != target:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), name))
                changed += 1
    return changed


@contextmanager
def float32_feeds(*models: onnx.ModelProto) -> Iterator[None]:
    """For the duration, FP16 graphs take float32 feeds: each FLOAT16 graph input becomes FLOAT
    with a Cast to FLOAT16 in front of its readers; restored on exit. The calibration helpers
    (``passes/calibration_data.decoder_step_feeds``) build float32 K/V pools, so the FP16 graphs
    of ``--dtype fp16 --quantize int4|int8-weights`` are measured through this view."""
    undo = []
    for model in models:
        g = model.graph
        fp16 = {i.name: i for i in g.input if i.type.tensor_type.elem_type == TensorProto.FLOAT16}
        if not fp16:
            continue
        inner = {name: f"{name}/as_fp16" for name in fp16}
        renamed = [(node, k, name) for node in g.node for k, name in enumerate(node.input) if name in inner]
        for node, k, name in renamed:
            node.input[k] = inner[name]
        casts = [helper.make_node("Cast", [name], [inner[name]], name=f"{name}/to_fp16", to=TensorProto.FLOAT16)
                 for name in fp16]
        for c in reversed(casts):
            g.node.insert(0, c)
        for v in fp16.values():
            v.type.tensor_type.elem_type = TensorProto.FLOAT
        undo.append((g, fp16, renamed, len(casts)))
    try:
        yield
    finally:
        for g, fp16, renamed, n_casts in undo:
            del g.node[:n_casts]
            for node, k, name in renamed:
                node.input[k] = name
            for v in fp16.values():
                v.type.tensor_type.elem_type = TensorProto.FLOAT16


def quantize_blockwise(proto: onnx.ModelProto, src, options, log: StageLog, base_dir=None, cache=None
                       ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``--quantize int4`` / ``int8-weights`` on ONNX Runtime: weight MatMuls -> MatMulNBits
    (passes/matmul_nbits.py), reading weights kept in external files from ``base_dir`` one at a time;
    the accuracy report and ``--max-error`` gate as for Q/DQ."""
    from ember.passes.calibration_data import decoder_step_feeds, default_prompts, load_prompts
    from ember.passes.matmul_nbits import quantize_matmul_nbits
    from ember.passes.quant_accuracy import accuracy_report, format_accuracy

    nb = blockwise_options(options, proto)
    limit = CALIB_CAPACITY - CALIB_DECODE_STEPS
    feeds, calib_info = [], {"prompts": 0, "source": "none (weights only)", "feeds": 0}
    if nb.method == "gptq":
        calib_prompts = load_prompts(options.calib) if options.calib else default_prompts("calib")
        calib_ids = _prompt_ids(src, calib_prompts, limit)
        feeds = decoder_step_feeds(proto, calib_ids, CALIB_CAPACITY, decode_steps=CALIB_DECODE_STEPS, base_dir=base_dir)
        calib_info = {"prompts": len(calib_ids), "source": str(options.calib or "built-in"), "feeds": len(feeds)}
    quant, report = quantize_matmul_nbits(proto, nb, feeds, base_dir=base_dir, cache=cache)
    match_scales_to_activations(quant, activation_dtype(proto))
    log.note(f"{report.summary()}; weights {report.weight_bytes_float / 1e6:.1f} MB -> "
             f"{report.weight_bytes_quantized / 1e6:.1f} MB (accuracy_level {nb.accuracy_level})")
    held_ids = _prompt_ids(src, default_prompts("heldout"), limit)
    with float32_feeds(proto, quant):
        float_outputs: list = []  # the float run that makes the feeds also gives the report's reference
        held_feeds = decoder_step_feeds(proto, held_ids, CALIB_CAPACITY, decode_steps=CALIB_DECODE_STEPS,
                                        base_dir=base_dir, outputs=float_outputs)
        acc = accuracy_report(proto, quant, held_feeds, base_dir=base_dir, float_outputs=float_outputs)
    log.note("accuracy on held-out prompts: " + format_accuracy(acc))
    if options.max_error is not None and acc["max_rel_error"] > options.max_error:
        hint = ("--block-size 32 or --int4-method hqq, or --quantize int8-weights" if 4 in nb.all_bits
                else "--block-size 32, or compile without --quantize")
        raise EmberError(f"quantized engine's relative error {acc['max_rel_error']:.3%} on {acc['worst_output']} "
                         f"exceeds --max-error {options.max_error:.3%}; try {hint}")
    info = {**report.to_dict(), "scheme": options.quantize}
    info["accuracy"] = {k: v for k, v in acc.items() if k != "outputs"}
    info["calibration"] = {**calib_info, "held_out_prompts": len(held_ids)}
    return quant, info


def quantize_decode_part(proto: onnx.ModelProto, options, base_dir=None, cache=None
                         ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The fused decode part (``export/gqa_decode.py``, built with ``linears="matmul"``) under the
    step graph's block-wise scheme: same bits, block size, method, zero points and LM-head rule;
    weights ``proto`` keeps in external files are read from ``base_dir``. ``cache``: the step graph's
    ``NBitsCache``, attached to its saved file: a weight the step graph holds too is not quantized again.
    Returns the new graph and its record (the manifest part's ``extra["quantization"]``)."""
    from ember.passes.matmul_nbits import quantize_matmul_nbits

    quant, report = quantize_matmul_nbits(proto, blockwise_options(options, proto), base_dir=base_dir, cache=cache)
    match_scales_to_activations(quant, activation_dtype(proto))
    return quant, {**report.to_dict(), "scheme": options.quantize}
