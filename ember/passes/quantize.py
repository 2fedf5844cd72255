"""The quantization pass: ONNX float graph -> TensorRT-compatible Q/DQ graph (docs/design.md §6).

Contract: ``quantize_model`` returns a NEW model (the input is not modified) in which
  * planned weights (quant_plan R1) are stored quantized (INT8 or FP8 E4M3, per output channel)
    behind a DequantizeLinear,
  * planned activations (R2-R4) get a per-tensor QuantizeLinear/DequantizeLinear pair whose
    scale comes from calibration on ``calib_feeds`` (unless the scheme is weights-only),
  * embedding tables (R5, INT8 schemes) are stored INT8 with a per-row scale,
  * constant-weight Gemms are MatMul + Add (``gemm_as_matmul``, on by default),
  * optionally SmoothQuant has moved activation outliers into the weights first,
and which passes ``qdq_validate.validate_qdq`` (raises ConfigError otherwise).
Everything else (op set, I/O names, dtypes, shapes) is unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ember.errors import ConfigError
from ember.passes.calibration import CALIB_METHODS, TensorStats, collect_stats, threshold
from ember.passes.qdq_validate import MIN_OPSET, QdqValidation, assert_trt_compatible
from ember.passes.quant_gemm import gemm_to_matmul
from ember.passes.quant_graph import default_opset, ort_disabled_optimizers, upgrade_opset
from ember.passes.quant_insert import FP8, INT8, INT8_REDUCED, apply_plan
from ember.passes.quant_plan import QUANTIZABLE_OPS, WEIGHT_OPS, PlanRules, QuantPlan, plan_quantization
from ember.passes.smoothquant import apply_smoothquant, smooth_groups

SCHEMES = ("int8", "fp8", "int8-weights")


@dataclass(frozen=True)
class QuantOptions:
    """What to quantize and how. Defaults: INT8 W8A8, max calibration, no SmoothQuant."""

    scheme: str = "int8"  # "int8" (W8A8) | "fp8" (E4M3 W8A8) | "int8-weights" (W8, float activations)
    calib_method: str = "max"  # "max" | "percentile" | "entropy"
    percentile: float = 99.99  # for calib_method="percentile", in %
    histogram_bins: int = 2048  # for percentile / entropy
    smoothquant_alpha: float | None = None  # 0..1; None = off
    include_ops: tuple[str, ...] = WEIGHT_OPS  # op types that may be quantized
    exclude_ops: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = ()  # regexes searched in node names
    quantize_residual_add: bool = False  # Q/DQ on both inputs of Adds of two run-time tensors
    quantize_activation_matmul: bool = False  # MatMuls of two run-time tensors (attention)
    quantize_conv_outputs: bool = False  # Q/DQ on single-reader Conv outputs (ORT's QLinearConv form)
    quantize_embeddings: bool = True  # INT8 schemes: Gather tables stored int8 per row
    gemm_as_matmul: bool = True  # rewrite constant-weight Gemm as MatMul + Add (quant_gemm: ORT fuses it)
    upgrade_opset: bool = False  # convert a too-old opset instead of failing
    # INT8 weights in [-63, 63]: needed by ONNX Runtime on x86 CPUs without VNNI (see
    # cpu_int8_needs_reduced_range). None = decide for this machine; TensorRT builds pass False.
    reduce_range: bool | None = None
    threads: int = 0  # ONNX Runtime intra-op threads for calibration (0 = default)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"quantization scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.calib_method not in CALIB_METHODS:
            raise ConfigError(f"calibration method {self.calib_method!r} is not one of {', '.join(CALIB_METHODS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must be in (0, 100]")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"SmoothQuant alpha={self.smoothquant_alpha} must be in [0, 1] (0.5 is typical)")
        unknown = set(self.include_ops) - set(QUANTIZABLE_OPS)
        if unknown:
            raise ConfigError(f"include_ops {sorted(unknown)} cannot be quantized; choose from {', '.join(QUANTIZABLE_OPS)}")

    @property
    def weights_only(self) -> bool:
        return self.scheme == "int8-weights"

    @property
    def min_opset(self) -> int:
        return 19 if self.scheme == "fp8" else 13


@dataclass
class QuantReport:
    """What the pass did. ``tables`` (name -> array) is the scales table for the artifact."""

    scheme: str
    calib_method: str | None
    smoothquant_alpha: float | None
    opset: int
    quantized_nodes: list[str]
    skipped: dict[str, str]
    activation_scales: dict[str, float]
    tables: dict[str, np.ndarray]
    smoothed: list[str] = field(default_factory=list)
    not_smoothed: dict[str, str] = field(default_factory=dict)
    weight_bytes_float: int = 0  # bytes of the float weights that were quantized
    weight_bytes_quantized: int = 0  # bytes of their quantized replacement (scales included)
    validation: QdqValidation | None = None
    ort_disabled_optimizers: list[str] = field(default_factory=list)  # for ORT sessions of this graph
    weight_qmax: float = 127.0  # weights lie in [-weight_qmax, weight_qmax] (63 with reduce_range)

    def scale_tables(self) -> dict[str, np.ndarray]:
        """Per-tensor scales as float32 arrays, ready for safetensors/np.savez."""
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tables.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the manifest (no arrays)."""
        v = self.validation
        return {
            "scheme": self.scheme,
            "calib_method": self.calib_method,
            "smoothquant_alpha": self.smoothquant_alpha,
            "opset": self.opset,
            "quantized_nodes": len(self.quantized_nodes),
            "skipped_nodes": len(self.skipped),
            "activation_tensors": len(self.activation_scales),
            "smoothed_activations": len(self.smoothed),
            "weight_bytes_float": self.weight_bytes_float,
            "weight_bytes_quantized": self.weight_bytes_quantized,
            "weight_compression": round(self.weight_bytes_float / max(self.weight_bytes_quantized, 1), 3),
            "qdq_nodes": None if v is None else {"quantize": v.quantize_nodes, "dequantize": v.dequantize_nodes},
            "ort_disabled_optimizers": list(self.ort_disabled_optimizers),
            "weight_qmax": self.weight_qmax,
        }


def cpu_int8_needs_reduced_range() -> bool:
    """True on x86 CPUs without VNNI: there ONNX Runtime's u8s8 int8 GEMM (vpmaddubsw) saturates
    int16 pair sums with full-range INT8 weights (measured: 10-14% output error instead of 1.5%
    on gpt2-tiny), so ORT-CPU engines need ``reduce_range=True``."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return True
    return not any(v in flags for v in ("avx512_vnni", "avx_vnni", "amx_int8"))


def check_calib_feeds(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]]) -> None:
    """Every feed names exactly the graph's inputs, with their dtype, rank and fixed dims."""
    inits = {t.name for t in model.graph.initializer}
    inputs = {v.name: v.type.tensor_type for v in model.graph.input if v.name not in inits}
    for k, feed in enumerate(feeds):
        missing, extra = sorted(set(inputs) - set(feed)), sorted(set(feed) - set(inputs))
        if missing or extra:
            raise ConfigError(f"calibration feed {k}: missing inputs {missing}, unknown inputs {extra}; "
                              f"the graph's inputs are {sorted(inputs)}")
        for name, t in inputs.items():
            arr = np.asarray(feed[name])
            want = helper.tensor_dtype_to_np_dtype(t.elem_type)
            if arr.dtype != want:
                raise ConfigError(f"calibration feed {k}: input {name!r} is {arr.dtype}, the graph takes {want}")
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            if arr.ndim != len(dims) or any(d is not None and d != s for d, s in zip(dims, arr.shape)):
                shape = [d if d is not None else "?" for d in dims]
                raise ConfigError(f"calibration feed {k}: input {name!r} has shape {list(arr.shape)}, "
                                  f"the graph takes {shape}")


def _ensure_opset(model: onnx.ModelProto, options: QuantOptions) -> onnx.ModelProto:
    opset = default_opset(model)
    if opset >= options.min_opset:
        return model
    if not options.upgrade_opset:
        raise ConfigError(
            f"{options.scheme.upper()} Q/DQ needs ONNX opset >= {options.min_opset} but the model has opset {opset}: "
            f"pass QuantOptions(upgrade_opset=True) to convert it, or re-export with "
            f"torch.onnx.export(opset_version={options.min_opset})")
    return upgrade_opset(model, options.min_opset)


def _rules(options: QuantOptions) -> PlanRules:
    return PlanRules(
        include_ops=tuple(options.include_ops) + (("Gather",) if options.quantize_embeddings else ())
        + (("Add",) if options.quantize_residual_add else ()),
        exclude_ops=tuple(options.exclude_ops), exclude_names=tuple(options.exclude_names),
        activations=not options.weights_only, activation_matmul=options.quantize_activation_matmul,
        residual_add=options.quantize_residual_add,
        embeddings=options.quantize_embeddings and options.scheme != "fp8",
        conv_outputs=options.quantize_conv_outputs)


def _no_quantizable_ops(plan: QuantPlan, options: QuantOptions) -> ConfigError:
    reasons = "; ".join(f"{n}: {why}" for n, why in list(plan.skipped.items())[:5]) or "the graph has none of them"
    return ConfigError(f"no quantizable ops: no {'/'.join(options.include_ops)} node with a constant float weight "
                       f"was selected ({reasons}); check include_ops/exclude_ops/exclude_names, or compile without --quantize")


def activation_tensors(model: onnx.ModelProto, options: QuantOptions = QuantOptions(), base_dir=None) -> list[str]:
    """The tensors ``quantize_model(model, feeds, options)`` calibrates (none for weights-only schemes).
    Observe them in the runs that make the feeds (``calibration.StatsCollector``,
    ``calibration_data.decoder_step_feeds(observe=)``) and hand the stats to ``quantize_model`` as
    ``activation_stats``, so calibration does not run the feeds again. Planned on a copy of ``model``
    as given: a constant-weight Gemm reads the same activation as the MatMul ``gemm_as_matmul`` makes
    of it; a tensor the pass plans that the stats lack is calibrated by the pass itself."""
    if options.weights_only:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # planning names unnamed nodes
    return plan_quantization(probe, _rules(options), base_dir).activation_tensors()


def quantize_model(model: onnx.ModelProto, calib_feeds: Sequence[dict[str, np.ndarray]],
                   options: QuantOptions = QuantOptions(), base_dir=None,
                   activation_stats: dict[str, TensorStats] | None = None) -> tuple[onnx.ModelProto, QuantReport]:
    """Quantize ``model`` (left untouched) with calibration on ``calib_feeds`` (graph input name -> array).
    ``activation_stats``: max |x| of activation tensors already observed over exactly ``calib_feeds``
    (``activation_tensors``); the graph runs again only for tensors it lacks (and for histograms).
    Ignored under SmoothQuant, which changes the activations it scales.

    Feeds may be empty only for the weights-only scheme. Returns (new model, report). Weights ``model``
    keeps in external files are read from ``base_dir`` one at a time (calibration sessions map them);
    the float weights the new model still reads stay external references into the same files.
    SmoothQuant and an opset upgrade rewrite every weight: give them a model held in memory.
    """
    from ember.export.external_data import has_external

    if has_external(model) and (options.smoothquant_alpha is not None or default_opset(model) < options.min_opset):
        raise ConfigError("SmoothQuant and the FP8 opset upgrade rewrite every weight: load the model's external "
                          "weights first (ember.export.external_data.load_all)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out = _ensure_opset(out, options)
    if options.gemm_as_matmul and "Gemm" in options.include_ops:
        gemm_to_matmul(out, base_dir=base_dir)
    if not options.weights_only:
        if not calib_feeds:
            raise ConfigError(f"scheme {options.scheme!r} needs calibration feeds (give --calib FILE or use the "
                              "built-in prompts); only 'int8-weights' runs without them")
        check_calib_feeds(out, calib_feeds)
    rules = _rules(options)
    plan = plan_quantization(out, rules, base_dir)
    if not plan.weights and not plan.activations:
        raise _no_quantizable_ops(plan, options)

    smoothed, not_smoothed = [], {}
    if options.smoothquant_alpha is not None and not options.weights_only:
        groups = smooth_groups(out, plan)
        stats = collect_stats(out, calib_feeds, [], channel_tensors=[g.activation for g in groups], threads=options.threads)
        result = apply_smoothquant(out, groups, {k: s.channel_amax for k, s in stats.items()}, options.smoothquant_alpha)
        smoothed, not_smoothed = result.smoothed, result.not_smoothed
        plan = plan_quantization(out, rules)  # the weights changed

    # weights-only graphs run as MatMulNBits (float compute): only W8A8 hits the int16 saturation
    reduce = not options.weights_only and (
        cpu_int8_needs_reduced_range() if options.reduce_range is None else options.reduce_range)
    fmt = FP8 if options.scheme == "fp8" else INT8_REDUCED if reduce else INT8
    scales: dict[str, float] = {}
    if plan.activations:
        bins = options.histogram_bins if options.calib_method != "max" else 0
        stats = collect_stats(out, calib_feeds, plan.activation_tensors(), histogram_bins=bins, threads=options.threads,
                              base_dir=base_dir, observed=activation_stats if options.smoothquant_alpha is None else None)
        scales = {t: threshold(s, options.calib_method, options.percentile) / fmt.act_max for t, s in stats.items()}

    bytes_float = 4 * (sum(w.size for w in plan.weights) + sum(e.size for e in plan.embeddings))
    tables = apply_plan(out, plan, scales, fmt)
    bytes_quant = sum(w.size for w in plan.weights) + sum(e.size for e in plan.embeddings) + \
        sum(v.nbytes for k, v in tables.items() if not k.endswith(".act_scale"))
    validation = assert_trt_compatible(out, weights_only=options.weights_only)
    report = QuantReport(
        scheme=options.scheme, calib_method=None if options.weights_only else options.calib_method,
        smoothquant_alpha=options.smoothquant_alpha, opset=default_opset(out),
        quantized_nodes=plan.quantized_nodes, skipped=plan.skipped, activation_scales=scales, tables=tables,
        smoothed=smoothed, not_smoothed=not_smoothed, weight_bytes_float=bytes_float,
        weight_bytes_quantized=bytes_quant, validation=validation, ort_disabled_optimizers=ort_disabled_optimizers(out),
        weight_qmax=fmt.weight_max)
    return out, report


__all__ = ["SCHEMES", "MIN_OPSET", "QuantOptions", "QuantReport", "activation_tensors", "check_calib_feeds",
           "cpu_int8_needs_reduced_range", "quantize_model"]
