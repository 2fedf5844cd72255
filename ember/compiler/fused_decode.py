"""The fused (GroupQueryAttention) decode part of a compile (``export/gqa_decode.py``): the graph,
its checks against the torch model and the step graph, and its block-wise quantization.

Two stages around the step graph's passes: ``export_float_decode`` takes from the torch model all
the part needs (the float graph, written a weight at a time, and torch's answers on the checks'
decode state) right after the step graph's export; the compile then frees the torch weights, and
``fused_decode_part`` checks, quantizes and records the part from files (issue 18: a llama-1b
compile with the part within 2x the FP32 weight bytes of RSS)."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ember.compiler.compile import STEP_FILE, CompileOptions, _build_part
from ember.engine_format import manifest as mf
from ember.errors import EmberError
from ember.export.gqa_decode import DecodeReference
from ember.progress import StageLog


FLOAT_DIR = ".decode-float"  # block-wise schemes: the float graph's folder inside the engine folder, until quantized


@dataclass(frozen=True)
class FloatDecode:
    """The float decode graph ``export_float_decode`` wrote, and what its checks compare it with."""

    path: Path  # decode.onnx in the engine folder; block-wise schemes: in FLOAT_DIR (fused_decode_part removes it)
    reference: DecodeReference | None  # the torch model's answers on check_decode_graph's decode state; None: no validate


def export_float_decode(src, folder: Path, options: CompileOptions) -> FloatDecode:
    """Write the float decode graph (``gqa_decode.write_decode_graph``: each weight goes to its data
    file as it is made) and, with ``validate``, record the torch model's answers on the checks' decode
    state: all ``fused_decode_part`` needs from the torch model, which the compile then frees before
    any ONNX Runtime session or quantizer maps its own weights (issue 18). Block-wise schemes
    (``linears="matmul"``) write it to ``folder/FLOAT_DIR``, where it waits to be quantized."""
    from ember.export.gqa_decode import DECODE_FILE, recorded_reference, torch_reference, write_decode_graph

    path = folder / DECODE_FILE
    if options.blockwise:
        (folder / FLOAT_DIR).mkdir()
        path = folder / FLOAT_DIR / DECODE_FILE
    write_decode_graph(src.model, src.config, path, _dtype(options), linears="matmul" if options.blockwise else "gemm")
    reference = None
    if options.validate:
        kv_dtype = np.float16 if options.dtype == "fp16" else np.float32
        reference = recorded_reference(torch_reference(src.model), src.config, kv_dtype)
    return FloatDecode(path, reference)


def fused_decode_part(decode: FloatDecode, cfg, folder: Path, options: CompileOptions, log: StageLog,
                      nbits_cache=None) -> tuple[mf.EnginePart, list[str]]:
    """Check ``decode`` (``export_float_decode``) against the torch model and make it the part
    ``folder/decode.onnx``. Under a block-wise ``--quantize`` its weight MatMuls become MatMulNBits
    exactly as the step graph's (``quantize_step.quantize_decode_part``, a weight at a time): the float
    graph is checked against torch first, then the quantized part against the quantized step graph
    (``folder/step.onnx``), which runs the prefills the part's decodes continue; the part's
    ``extra["quantization"]`` records both. ``cfg``: the model's DecoderConfig. ``nbits_cache``: the
    ``NBitsCache`` the step graph's quantization recorded (its weights read back from ``folder/step.onnx``
    where the part holds the same float weight), or None to quantize every weight."""
    from ember.export.gqa_decode import DECODE_FILE, DECODE_PART
    from ember.export.onnx_export import save_onnx

    dtype, path = _dtype(options), folder / DECODE_FILE
    if decode.path != (folder / FLOAT_DIR / DECODE_FILE if options.blockwise else path):
        raise ValueError(f"fused decode part: {decode.path} is not where export_float_decode writes the float graph "
                         f"for these options in {folder}; export it with the same folder and options")
    if options.validate:  # a block-wise graph's structure, before its weights are quantized
        _check_decode_against_torch(decode, cfg, dtype, options, log, "float " if options.blockwise else "")
    quant_info = None
    if options.blockwise:
        from ember.compiler.quantize_step import quantize_decode_part

        proto = onnx.load(str(decode.path), load_external_data=False)  # past 1 GiB its weights stay in the .data file
        if nbits_cache is not None:
            nbits_cache.attach(folder / STEP_FILE)
        proto, quant_info = quantize_decode_part(proto, options, base_dir=decode.path.parent, cache=nbits_cache)
        reused = f"; {nbits_cache.hits} weights as quantized for the step graph" if nbits_cache is not None else ""
        log.note(f"fused decode part: {quant_info['summary']}{reused}")
        save_onnx(proto, path, base_dir=decode.path.parent, keep_in_memory=False)
        del proto
        shutil.rmtree(decode.path.parent)
        quant_info["check"] = _check_quantized_decode(decode, cfg, folder, path, dtype, options, log)
    files = sorted(f.name for f in folder.glob(DECODE_FILE + "*"))
    part = _build_part(folder, DECODE_PART, path, files, options)
    if quant_info is not None:
        part.extra["quantization"] = quant_info
    return part, files


def _dtype(options: CompileOptions) -> str:
    return "float16" if options.dtype == "fp16" else "float32"


# Quantized decode part vs the quantized step graph (same MatMulNBits weights): relative logits/K/V
# error allowed, by dtype. Both graphs run on the CPU with float activations (``_float_activations``):
# they then differ only in kernels (GroupQueryAttention vs the step graph's attention, packed Q/K/V).
# With the CPU's int8 activations (accuracy_level 4) the rounding flips differently in the two graphs
# and the K/V of a 22-layer random-weight TinyLlama-shape model drift apart by 1e-1 (measured), which
# a tolerance wide enough for it would not tell from a broken part (doubled scales in one layer).
QUANT_DECODE_TOLERANCE = {"float16": 3e-2, "float32": 3e-2}


@contextmanager
def _float_activations(*paths: Path) -> Iterator[list[Path]]:
    """Copies of the graphs at ``paths`` whose MatMulNBits run with accuracy_level 0 (float
    activations), written beside them (they read the same external data files) and removed on exit."""
    copies = []
    try:
        for path in paths:
            model = onnx.load(str(path), load_external_data=False)
            for node in model.graph.node:
                for a in node.attribute:
                    if node.op_type == "MatMulNBits" and a.name == "accuracy_level":
                        a.i = 0
            copy = path.with_name(f".float-activations-{path.name}")
            copies.append(copy)
            onnx.save(model, str(copy))
        yield copies
    finally:
        for copy in copies:
            copy.unlink(missing_ok=True)


def _check_decode_against_torch(decode: FloatDecode, cfg, dtype: str, options: CompileOptions, log: StageLog,
                                what: str = "") -> float:
    from ember.export.gqa_decode import check_decode_graph

    err = check_decode_graph(None, cfg, decode.path, reference=decode.reference)
    log.note(f"{what}fused decode vs torch: max rel error {err:.2e} (logits), K/V written in place")
    limit = 3e-2 if dtype == "float16" else options.max_validation_error
    if err > limit:
        raise EmberError(f"the fused decode graph differs from the torch model (relative error {err:.2e} > {limit}); "
                         "this is an Ember bug: please report it, and compile with --fused-decode off meanwhile")
    return err


def _check_quantized_decode(decode: FloatDecode, cfg, folder: Path, path: Path, dtype: str, options: CompileOptions,
                            log: StageLog) -> dict:
    """The quantized part against the quantized step graph (gate), and against torch (recorded,
    with ``validate``: the quantization error itself, which the step graph's accuracy report gates)."""
    from ember.export.gqa_decode import check_decode_graph, step_graph_reference

    c, tol = cfg, QUANT_DECODE_TOLERANCE[dtype]
    fix = "this is an Ember bug: please report it, and compile with --fused-decode off meanwhile"
    try:
        with _float_activations(path, folder / STEP_FILE) as (part, step):
            err = check_decode_graph(None, c, part, reference=step_graph_reference(step, c.num_layers), kv_tol=tol)
    except EmberError as e:  # the K/V written in place
        raise EmberError(f"the quantized fused decode graph differs from the quantized step graph ({e}); {fix}") from e
    record = {"vs_step_graph_rel_error": err, "tolerance": tol}
    note = f"quantized fused decode vs quantized step graph: max rel error {err:.2e} (logits), K/V within {tol:g}"
    if options.validate:
        record["vs_torch_rel_error"] = check_decode_graph(None, c, path, reference=decode.reference,
                                                          kv_tol=float("inf"))
        note += f"; vs torch {record['vs_torch_rel_error']:.2e}"
    log.note(note)
    if err > tol:
        raise EmberError(f"the quantized fused decode graph differs from the quantized step graph (relative error "
                         f"{err:.2e} > {tol}); {fix}")
    return record


