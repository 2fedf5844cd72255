"""The fused (GroupQueryAttention) decode part of a compile (``export/gqa_decode.py``): the graph,
its checks against the torch model and the step graph, and its block-wise quantization."""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ember.compiler.compile import STEP_FILE, CompileOptions, _build_part
from ember.engine_format import manifest as mf
from ember.errors import EmberError
from ember.progress import StageLog


def fused_decode_part(src, folder: Path, options: CompileOptions, log: StageLog) -> tuple[mf.EnginePart, list[str]]:
    """Write ``decode.onnx`` (export/gqa_decode.py) and check it against the torch model. Under a
    block-wise ``--quantize`` its weight MatMuls become MatMulNBits exactly as the step graph's
    (``quantize_step.quantize_decode_part``): the float graph is checked against torch first, then
    the quantized part against the quantized step graph (``folder/step.onnx``), which runs the
    prefills the part's decodes continue; the part's ``extra["quantization"]`` records both."""
    from ember.export.gqa_decode import DECODE_FILE, DECODE_PART, build_decode_graph
    from ember.export.onnx_export import save_onnx

    dtype = "float16" if options.dtype == "fp16" else "float32"
    path = folder / DECODE_FILE
    proto = build_decode_graph(src.model, src.config, dtype, linears="matmul" if options.blockwise else "gemm")
    quant_info = None
    if options.blockwise:
        from ember.compiler.quantize_step import quantize_decode_part

        with tempfile.TemporaryDirectory(dir=folder, prefix=".decode-float-") as tmp:
            float_path = Path(tmp) / DECODE_FILE
            save_onnx(proto, float_path, keep_in_memory=False)  # past 1 GiB its weights stay in the .data file
            if options.validate:  # the float graph's structure, before its weights are quantized
                _check_decode_against_torch(src, float_path, dtype, options, log, "float ")
            proto, quant_info = quantize_decode_part(proto, options, base_dir=tmp)  # a weight at a time
            log.note(f"fused decode part: {quant_info['summary']}")
            save_onnx(proto, path, base_dir=tmp, keep_in_memory=False)
    else:
        save_onnx(proto, path, keep_in_memory=False)
    del proto
    if quant_info is not None:
        quant_info["check"] = _check_quantized_decode(src, folder, path, dtype, options, log)
    elif options.validate:
        _check_decode_against_torch(src, path, dtype, options, log)
    files = sorted(f.name for f in folder.glob(DECODE_FILE + "*"))
    part = _build_part(folder, DECODE_PART, path, files, options)
    if quant_info is not None:
        part.extra["quantization"] = quant_info
    return part, files


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
    import onnx

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


def _check_decode_against_torch(src, path: Path, dtype: str, options: CompileOptions, log: StageLog,
                                what: str = "") -> float:
    from ember.export.gqa_decode import check_decode_graph

    err = check_decode_graph(src.model, src.config, path)
    log.note(f"{what}fused decode vs torch: max rel error {err:.2e} (logits), K/V written in place")
    limit = 3e-2 if dtype == "float16" else options.max_validation_error
    if err > limit:
        raise EmberError(f"the fused decode graph differs from the torch model (relative error {err:.2e} > {limit}); "
                         "this is an Ember bug: please report it, and compile with --fused-decode off meanwhile")
    return err


def _check_quantized_decode(src, folder: Path, path: Path, dtype: str, options: CompileOptions,
                            log: StageLog) -> dict:
    """The quantized part against the quantized step graph (gate), and against torch (recorded,
    with ``validate``: the quantization error itself, which the step graph's accuracy report gates)."""
    from ember.export.gqa_decode import check_decode_graph, step_graph_reference

    c, tol = src.config, QUANT_DECODE_TOLERANCE[dtype]
    fix = "this is an Ember bug: please report it, and compile with --fused-decode off meanwhile"
    try:
        with _float_activations(path, folder / STEP_FILE) as (part, step):
            err = check_decode_graph(src.model, c, part, reference=step_graph_reference(step, c.num_layers), kv_tol=tol)
    except EmberError as e:  # the K/V written in place
        raise EmberError(f"the quantized fused decode graph differs from the quantized step graph ({e}); {fix}") from e
    record = {"vs_step_graph_rel_error": err, "tolerance": tol}
    note = f"quantized fused decode vs quantized step graph: max rel error {err:.2e} (logits), K/V within {tol:g}"
    if options.validate:
        record["vs_torch_rel_error"] = check_decode_graph(src.model, c, path, kv_tol=float("inf"))
        note += f"; vs torch {record['vs_torch_rel_error']:.2e}"
    log.note(note)
    if err > tol:
        raise EmberError(f"the quantized fused decode graph differs from the quantized step graph (relative error "
                         f"{err:.2e} > {tol}); {fix}")
    return record


