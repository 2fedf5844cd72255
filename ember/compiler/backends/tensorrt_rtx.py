"""The TensorRT-RTX library behind ``--backend tensorrt-rtx``: targets, the plan build, the plan header.

TensorRT-RTX (PyPI: ``tensorrt-rtx-cu13-libs`` + ``tensorrt-rtx-cu13-bindings``, module
``tensorrt_rtx_bindings``) builds plans ahead of time for a list of GPU compute capabilities,
without a GPU on the build machine. ``build_rtx_plan`` is this library's half of
``tensorrt.build_plan_part`` (options, profiles, errors and the manifest part are shared with
the classic TensorRT backend there)::

    Builder -> network (STRONGLY_TYPED: FP16 / Q/DQ types come from the graph)
      -> OnnxParser.parse_from_file(step.onnx)          # reads step.onnx.data beside it
      -> config: one optimization profile per ProfileSpec, set_compute_capability per target,
                 builder_optimization_level
      -> build_serialized_network -> <part>.plan

Targets are "major.minor" strings (``RTX_TARGETS``). The default is every Ampere-or-newer target
(the library's own default set), narrowed to 8.9+ for FP8 graphs (FP8 needs Ada or Blackwell).
TensorRT-RTX has no Hopper (sm90) or data-center Blackwell (sm100) target.

No timing cache: TensorRT-RTX's timing-cache calls are no-ops (the bindings say so when
called); what it caches is the kernels it compiles at run time (its *runtime cache*, used when
a plan is loaded, not here).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any, Iterable, Sequence

from ember.engine_format import manifest as mf
from ember.engine_format.profiles import ProfileSpec, profile_shapes
from ember.engine_format.tensorrt_part import RTX, RTX_NO_TARGET, RTX_TARGETS, require_tensorrt_rtx
from ember.errors import ConfigError

MODULE = "tensorrt_rtx_bindings"
DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0", "12.1")
FP8_TARGETS = ("8.9", "12.0", "12.1")
HOPPER_NOTE = ("TensorRT-RTX has no Hopper (sm90) target, so an H100/H200 runs the folder's ONNX graphs with ONNX "
               "Runtime: ember.load(FOLDER, backend='onnxruntime') (CLI: --backend onnxruntime)")


def _capability(text: str) -> str | None:
    """'sm80' / 'SM_80' / '80' / '8.0' -> '8.0'; None when ``text`` is not a compute capability."""
    t = str(text).strip().lower().removeprefix("sm").lstrip("_")
    if re.fullmatch(r"\d+\.\d", t):
        return f"{int(t.split('.')[0])}.{t.split('.')[1]}"
    if re.fullmatch(r"\d{2,3}", t):
        return f"{int(t[:-1])}.{t[-1]}"
    return None


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Targets as given (``"sm80,sm120"``, ``["8.6", "8.9"]``) -> sorted "major.minor" strings."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    items = [str(t).strip() for t in items if str(t).strip()]
    valid = ", ".join(f"sm{c.replace('.', '')} ({gpus})" for c, (_, gpus) in RTX_TARGETS.items())
    if not items:
        raise ConfigError(f"--trt-targets is empty; give one or more of {valid}")
    out: set[str] = set()
    for t in items:
        cc = _capability(t)
        if cc not in RTX_TARGETS:
            what = f"{t!r} is not a TensorRT-RTX target"
            if cc is not None and cc.split(".")[0] in RTX_NO_TARGET:
                what = f"{t!r} is {RTX_NO_TARGET[cc.split('.')[0]]}, which TensorRT-RTX has no target for"
            raise ConfigError(f"--trt-targets: {what}; valid targets: {valid}. {HOPPER_NOTE}")
        out.add(cc)
    return tuple(sorted(out, key=lambda c: tuple(map(int, c.split(".")))))


def default_targets(quantize: str | None) -> tuple[str, ...]:
    """The targets built when none are given: Ampere or newer; 8.9 or newer for FP8 graphs."""
    return FP8_TARGETS if quantize == "fp8" else DEFAULT_TARGETS


# The plan header (TensorRT-RTX 1.7; not a documented format, found by building a plan per target):
# bytes 0..3 b"vtrt", 24..27 the library version (major, minor, patch, build), 28..31 b"vtrt",
# 32..39 a little-endian bit mask of the targets, bit i = HEADER_TARGET_BITS[i].
HEADER_TARGET_BITS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
HEADER_BYTES = 64


def plan_header(data: bytes) -> dict[str, Any] | None:
    """``{"version": "1.7.1.116", "targets": [...]}`` read from a plan's first bytes without a GPU,
    or None when they do not have the layout above (another release may change it)."""
    if len(data) < HEADER_BYTES or data[0:4] != b"vtrt" or data[28:32] != b"vtrt":
        return None
    (mask,) = struct.unpack_from("<Q", data, 32)
    if mask == 0 or mask >> len(HEADER_TARGET_BITS):
        return None
    return {"version": ".".join(str(b) for b in data[24:28]),
            "targets": [cc for i, cc in enumerate(HEADER_TARGET_BITS) if mask >> i & 1]}


def build_rtx_plan(onnx_path: Path, plan_path: Path, inputs: list[mf.TensorSpec], profiles: list[ProfileSpec],
                   targets: Sequence[str], optimization_level: int | None) -> dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path``; return the library's manifest keys. Parser and
    builder failures raise ``PlanBuildError`` (turned into one ConfigError line by the caller)."""
    from ember.compiler.backends.tensorrt import PlanBuildError

    trt = require_tensorrt_rtx()
    logger = _recording_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        err = parser.get_error(0) if parser.num_errors else None
        raise PlanBuildError("parse", _clean(err.desc()) if err else logger.first_error(),
                             node=(err.node_name() or None) if err else None,
                             op=(err.node_operator() or None) if err else None)
    config = builder.create_builder_config()
    for spec in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(inputs, spec).items():
            prof.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(prof) < 0:
            raise PlanBuildError("build", f"profile {spec.name!r} was refused: {logger.first_error()}")
    config.num_compute_capabilities = len(targets)
    for i, cc in enumerate(targets):
        member = getattr(trt.ComputeCapability, RTX_TARGETS[cc][0], None)
        if member is None:
            raise ConfigError(f"TensorRT-RTX {trt.__version__} has no target sm{cc.replace('.', '')}; drop it from "
                              f"--trt-targets or install the release Ember pins: pip install 'ember[tensorrt-rtx]'")
        config.set_compute_capability(member, i)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        message = logger.first_error()
        node = re.search(r"operation '([^']+)'", message)
        raise PlanBuildError("build", message, node=node and node.group(1), hint=_build_hint(message, targets))
    data = bytes(serialized)
    header = plan_header(data)
    if header is not None and header["targets"] != list(targets):
        raise PlanBuildError("build", f"the plan's header names targets {header['targets']}, not the requested "
                                      f"{list(targets)}", hint="this is a TensorRT-RTX or Ember bug: please report it")
    plan_path.write_bytes(data)
    return {"library": RTX, "tensorrt_rtx": trt.__version__, "targets": list(targets)}


def _recording_logger(trt):
    """A TensorRT logger that keeps the errors (for the ConfigError) and prints nothing."""

    class RecordingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg) -> None:
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(_clean(msg))

        def first_error(self) -> str:
            real = [e for e in self.errors if "cudaError" not in e]  # no GPU here: expected, not the cause
            return (real or self.errors or ["no error message"])[0]

    return RecordingLogger()


def _clean(msg: str) -> str:
    """One line without TensorRT's source locations."""
    msg = re.sub(r"\s*In \w+ at /_src/[^\s)]+", "", str(msg))
    msg = re.sub(r"\[[\w.]+:\d+: \w+\]\s*", "", msg)
    return " ".join(msg.split())


def _build_hint(message: str, targets: Sequence[str]) -> str | None:
    if "fp8" in message.lower() and "HW-specific" in message:
        slow = [c for c in targets if c not in FP8_TARGETS]
        return (f"FP8 needs compute capability 8.9 or newer: drop {', '.join('sm' + c.replace('.', '') for c in slow)}"
                f" from --trt-targets (or leave it out: FP8 defaults to {', '.join(FP8_TARGETS)}), or use --quantize int8")
    if "Turing" in message and "FP32" in message:
        return "Turing (sm75) has no FP32 GEMM: compile with --dtype fp16, or drop sm75 from --trt-targets"
    return None
