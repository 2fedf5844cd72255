"""TensorRT backends: ONNX graph -> ``<part>.plan``, one module for two libraries (docs/design.md §7).

``build_plan_part`` is the builder interface of ``--backend tensorrt`` (classic TensorRT, through
polygraphy) and ``--backend tensorrt-rtx`` (TensorRT-RTX, through its bindings:
``tensorrt_rtx.build_rtx_plan``). Shared here: the options (``TensorRTOptions``, checked per
library), the optimization profiles (``plan_profiles``, from compiler.profiles, checked before
any library is imported), the manifest part (``dtype``, ``quantize``, ``profiles``,
``source_onnx``, ``engine_bytes``, ``options`` plus the library's own keys) and the error
handling (a ``PlanBuildError`` from either library becomes one ConfigError line naming the
graph, the failing node where the library names it, and the fix).

Classic TensorRT, each stage a polygraphy loader, called once at the end::

    NetworkFromOnnxPath(onnx, strongly_typed=True)      # FP16 / Q/DQ types come from the graph
      -> CreateConfig(profiles=[decode, prefill],       # from compiler.profiles, checked first
                      load_timing_cache=cache,          # shared, file-locked, merged on save
                      version_compatible=..., hardware_compatibility_level=...)
      -> EngineFromNetwork(network, config, save_timing_cache=cache)
      -> SaveEngine(path=step.plan)

Classic TensorRT's builder ships from NVIDIA's package index only; without it the build fails
with a ConfigError that says how to install it. The plan's TensorRT version, CUDA version and
GPU compute capability go into the manifest part's ``extra``; the runtime compares them with
the loading machine before deserializing (``engine_format.tensorrt_part.check_plan_compat``) (a plan runs only where it was built unless
built version-/hardware-compatible). TensorRT-RTX plans record their targets instead
(``tensorrt_rtx`` module docstring). Plans can carry host code (version-compatible plans do):
load only folders you trust.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import onnx

from ember.engine_format import manifest as mf
from ember.engine_format.profiles import ProfileSpec, check_profile, profile_shapes, step_profiles
from ember.engine_format.tensorrt_part import (CLASSIC, PLAN_BACKENDS, PLAN_SUFFIX, PLAN_TITLES, RTX, gpu_environment,
                                             require_tensorrt)
from ember.errors import ConfigError
from ember.passes.quant_graph import ort_disabled_optimizers

HW_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-compute-capability": "SAME_COMPUTE_CAPABILITY"}
# Options only one of the two libraries has: option -> what to do instead with the other library
CLASSIC_ONLY = {
    "timing_cache": "TensorRT-RTX's timing cache is a no-op (it caches kernels at run time instead); drop --timing-cache",
    "version_compatible": "TensorRT-RTX plans run only on the release that built them; drop --version-compatible",
    "hardware_compatibility_level": "TensorRT-RTX plans run on the GPUs given with --trt-targets; "
                                    "drop --hardware-compatibility-level",
}
RTX_ONLY = {"targets": "classic TensorRT builds for the GPU it runs on; drop --trt-targets, or use "
                       "--backend tensorrt-rtx (or --hardware-compatibility-level ampere+)"}


@dataclass(frozen=True)
class TensorRTOptions:
    """Build options of both TensorRT backends (``CompileOptions.extra`` keys of the same names;
    CLI flags in docs/gpu.md). ``for_backend`` refuses the ones the chosen library lacks."""

    max_batch: int = 128  # decode profile: batch 1..max_batch
    max_past: int = 2048  # both profiles: KV capacity 1..max_past
    prefill_tokens: int = 512  # prefill profile: T 2..prefill_tokens
    prefill_batch: int = 8  # prefill profile: batch 1..prefill_batch
    timing_cache: str | None = None  # classic: default $EMBER_CACHE or ~/.cache/ember/tensorrt.timing
    version_compatible: bool = False  # classic: plan runs on later TensorRT versions of the same major
    hardware_compatibility_level: str = "none"  # classic: none | ampere+ | same-compute-capability
    builder_optimization_level: int | None = None  # 0..5 (default 3)
    profiles: tuple[dict, ...] | None = None  # explicit ProfileSpec dicts; overrides the derived ones
    targets: tuple[str, ...] | None = None  # tensorrt-rtx: compute capabilities ("8.6"); None = the default set

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_past", "prefill_tokens", "prefill_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"TensorRT option {name}={v!r} must be an integer >= 1")
        if self.hardware_compatibility_level not in HW_LEVELS:
            raise ConfigError(f"--hardware-compatibility-level {self.hardware_compatibility_level!r} is not one of "
                              f"{', '.join(HW_LEVELS)}")
        lvl = self.builder_optimization_level
        if lvl is not None and not (isinstance(lvl, int) and 0 <= lvl <= 5):
            raise ConfigError(f"builder_optimization_level={lvl!r} must be an integer in 0..5")
        if self.targets is not None:
            from ember.compiler.backends.tensorrt_rtx import parse_targets

            object.__setattr__(self, "targets", parse_targets(self.targets))

    @staticmethod
    def from_extra(extra: dict[str, Any], max_past: int | None = None) -> "TensorRTOptions":
        known = {f.name for f in fields(TensorRTOptions)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"unknown TensorRT option(s) {unknown}; known: {', '.join(sorted(known))}")
        kw = dict(extra)
        if max_past is not None and "max_past" not in kw:
            kw["max_past"] = max_past
        if kw.get("profiles") is not None:
            kw["profiles"] = tuple(kw["profiles"])
        return TensorRTOptions(**kw)

    def for_backend(self, backend: str) -> "TensorRTOptions":
        """These options, checked against what ``backend``'s library has (ConfigError naming the fix)."""
        if backend not in PLAN_BACKENDS:
            raise ConfigError(f"backend {backend!r} does not build TensorRT plans; use one of {', '.join(PLAN_BACKENDS)}")
        other_only = CLASSIC_ONLY if backend == RTX else RTX_ONLY
        for name, fix in other_only.items():
            if getattr(self, name) != getattr(DEFAULT_OPTIONS, name):
                raise ConfigError(f"TensorRT option {name} does not apply to --backend {backend}: {fix}")
        return self

    def record(self, backend: str) -> dict[str, Any]:
        """The options as the manifest part records them (those of ``backend``'s library)."""
        skip = {"profiles", *(CLASSIC_ONLY if backend == RTX else RTX_ONLY)}
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        if "targets" in out and out["targets"] is not None:
            out["targets"] = list(out["targets"])
        return out

    def cache_path(self) -> Path:
        if self.timing_cache:
            return Path(self.timing_cache)
        root = os.environ.get("EMBER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ember")
        return Path(root) / "tensorrt.timing"


DEFAULT_OPTIONS = TensorRTOptions()


def check_plan_options(backend: str, extra: dict[str, Any]) -> None:
    """Fail early (before an export) on options ``backend`` cannot build with; no library needed."""
    if backend in PLAN_BACKENDS:
        TensorRTOptions.from_extra(dict(extra or {})).for_backend(backend)
    elif extra:
        raise ConfigError(f"TensorRT options {sorted(extra)} need --backend tensorrt or --backend tensorrt-rtx")


class PlanBuildError(Exception):
    """A library could not parse (``stage="parse"``) or build a graph; ``build_plan_part`` turns it
    into one ConfigError line."""

    def __init__(self, stage: str, message: str, node: str | None = None, op: str | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message)
        self.stage, self.message, self.node, self.op, self.hint = stage, message, node, op, hint


def plan_profiles(inputs: list[mf.TensorSpec], opts: TensorRTOptions) -> list[ProfileSpec]:
    """The profiles to build, checked for consistency (shared dims share ranges) before any build."""
    if opts.profiles is not None:
        profiles = [ProfileSpec.from_dict(p) for p in opts.profiles]
    else:
        profiles = step_profiles(inputs, max_batch=opts.max_batch, max_past=opts.max_past,
                                 prefill_tokens=opts.prefill_tokens, prefill_batch=opts.prefill_batch)
    if not profiles:
        raise ConfigError("no optimization profiles: give at least one")
    for p in profiles:
        check_profile(inputs, profile_shapes(inputs, p), profile_name=f"profile {p.name!r}")
    return profiles


def build_plan_part(folder: Path, name: str, onnx_path: Path, inputs: list[mf.TensorSpec],
                    outputs: list[mf.TensorSpec], options, max_past: int | None = None) -> mf.EnginePart:
    """Build ``folder/<name>.plan`` from ``onnx_path`` and return its manifest part.

    ``options`` is a ``CompileOptions`` (or has its ``backend``, ``dtype``, ``quantize`` and
    ``extra``); the library is ``options.backend`` (``tensorrt`` or ``tensorrt-rtx``), its
    settings ``options.extra`` (``TensorRTOptions`` fields); ``max_past`` (the model's max
    positions) is the profiles' KV capacity limit unless ``extra`` sets one. The ONNX graph
    stays in the folder as the part's ``extra['source_onnx']`` (``ember check`` compares the plan
    against it; the caller lists its external data file).
    """
    backend = getattr(options, "backend", CLASSIC)
    quantize = getattr(options, "quantize", None)
    opts = TensorRTOptions.from_extra(dict(options.extra or {}), max_past=max_past).for_backend(backend)
    profiles = plan_profiles(inputs, opts)  # fail on bad profiles before touching a library
    plan_path = Path(folder) / f"{name}{PLAN_SUFFIX}"
    try:
        if backend == RTX:
            from ember.compiler.backends.tensorrt_rtx import build_rtx_plan, default_targets

            library = build_rtx_plan(onnx_path, plan_path, inputs, profiles, opts.targets or default_targets(quantize),
                                     opts.builder_optimization_level)
        else:
            library = _build_classic_plan(onnx_path, plan_path, inputs, profiles, opts)
    except PlanBuildError as e:
        raise ConfigError(plan_error_message(backend, onnx_path, e, options)) from e
    rec = mf.file_record(Path(folder), plan_path.name)
    extra = {
        **library,
        "dtype": options.dtype,
        "quantize": quantize,
        "profiles": [p.to_dict() for p in profiles],
        "source_onnx": mf.file_record(Path(folder), onnx_path.name),
        "engine_bytes": rec["size"],
        "options": opts.record(backend),
    }
    disabled = ort_disabled_optimizers(onnx.load(str(onnx_path), load_external_data=False))
    if disabled:  # for ONNX Runtime running the source graph instead (backend='onnxruntime'), as an ORT part has it
        extra["ort_disabled_optimizers"] = disabled
    return mf.EnginePart(name=name, backend=backend, file=rec["file"], sha256=rec["sha256"], size=rec["size"],
                         inputs=inputs, outputs=outputs, extra=extra)


def plan_error_message(backend: str, onnx_path: Path, e: PlanBuildError, options) -> str:
    """One line: which library failed on which graph (and node), what it said, and the fix."""
    library = PLAN_TITLES[backend]
    where = f" at node {e.node!r}" + (f" ({e.op})" if e.op else "") if e.node else (f" at a {e.op} node" if e.op else "")
    precision = getattr(options, "quantize", None) and f"--quantize {options.quantize}" or f"--dtype {options.dtype}"
    fix = e.hint or f"compile with --backend onnxruntime, or with another precision than {precision}"
    return f"{library} could not {e.stage} {onnx_path.name}{where}: {e.message}; {fix}"


def _build_classic_plan(onnx_path: Path, plan_path: Path, inputs: list[mf.TensorSpec], profiles: list[ProfileSpec],
                        opts: TensorRTOptions) -> dict[str, Any]:
    """Classic TensorRT through polygraphy; returns the library's manifest keys."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    cache = opts.cache_path()
    cache.parent.mkdir(parents=True, exist_ok=True)
    trt_profiles = []
    for p in profiles:
        prof = Profile()
        for tname, (lo, mid, hi) in profile_shapes(inputs, p).items():
            prof.add(tname, lo, mid, hi)
        trt_profiles.append(prof)
    config_kw: dict[str, Any] = {
        "profiles": trt_profiles,
        "load_timing_cache": str(cache) if cache.exists() else None,
        "version_compatible": opts.version_compatible or None,
        "builder_optimization_level": opts.builder_optimization_level,
    }
    if opts.hardware_compatibility_level != "none":
        config_kw["hardware_compatibility_level"] = getattr(trt.HardwareCompatibilityLevel,
                                                            HW_LEVELS[opts.hardware_compatibility_level])
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    config = CreateConfig(**config_kw)
    # polygraphy locks the cache file for the save and merges into what is there.
    build = SaveEngine(EngineFromNetwork(network, config, save_timing_cache=str(cache)), path=str(plan_path))
    try:
        engine = build()
    except Exception as e:  # polygraphy raises PolygraphyException with TensorRT's log above it
        raise PlanBuildError("build", f"{e} (see the TensorRT log above)") from e
    del engine
    env = gpu_environment()
    return {
        "library": CLASSIC,
        "tensorrt": env.get("tensorrt"),
        "cuda": env.get("cuda"),
        "compute_capability": env.get("compute_capability"),
        "gpu": env.get("gpu"),
        "version_compatible": opts.version_compatible,
        "hardware_compatibility_level": opts.hardware_compatibility_level,
    }
