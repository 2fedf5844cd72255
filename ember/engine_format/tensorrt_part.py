"""What a TensorRT or TensorRT-RTX part of an engine folder is, and whether it can run here.

A *plan part* (``EnginePart.backend`` in ``PLAN_BACKENDS``) is a serialized TensorRT or
TensorRT-RTX engine; its ``extra`` records the optimization profiles it was built with
(``profiles``: ``ProfileSpec`` dicts), the ONNX graph it was built from (``source_onnx``),
and what it is tied to: classic TensorRT plans the TensorRT version, CUDA version and compute
capability of the build (``check_plan_compat`` compares them with this machine), TensorRT-RTX
plans the release and the compute capabilities they target (``RTX_TARGETS``). The compiler
writes these records (``compiler/backends``), the runtime checks them before loading a plan.
"""
from __future__ import annotations

from typing import Any

from ember.engine_format.manifest import EnginePart
from ember.engine_format.profiles import ProfileSpec
from ember.errors import ArtifactError, ConfigError

CLASSIC = "tensorrt"
RTX = "tensorrt-rtx"
PLAN_TITLES = {CLASSIC: "TensorRT", RTX: "TensorRT-RTX"}  # backends that build plans -> their library's name
PLAN_BACKENDS = tuple(PLAN_TITLES)
PLAN_SUFFIX = ".plan"
INSTALL_HINT = ("TensorRT is not installed: its builder ships from NVIDIA's package index, not PyPI "
                "(pip install --extra-index-url https://pypi.nvidia.com tensorrt); or compile with --backend onnxruntime")

RTX_INSTALL = "pip install 'ember[tensorrt-rtx]' (the tensorrt-rtx-cu13-libs and tensorrt-rtx-cu13-bindings wheels from PyPI)"
RTX_INSTALL_HINT = f"TensorRT-RTX is not installed: {RTX_INSTALL}; or compile with --backend onnxruntime"
# compute capability -> (ComputeCapability member, GPUs)
RTX_TARGETS: dict[str, tuple[str, str]] = {
    "7.5": ("SM75", "Turing: RTX 20, T4"),
    "8.0": ("SM80", "A100, A30"),
    "8.6": ("SM86", "RTX 30, RTX A-series, A10, A40"),
    "8.9": ("SM89", "RTX 40, RTX Ada, L4, L40"),
    "12.0": ("SM120", "RTX 50, RTX PRO Blackwell"),
    "12.1": ("SM121", "GB10 / DGX Spark"),
}
RTX_NO_TARGET = {"9": "Hopper (H100/H200)", "10": "data-center Blackwell (B200)", "11": "Thor"}


def is_plan(part: EnginePart) -> bool:
    """Whether ``part`` is a TensorRT or TensorRT-RTX plan (not an ONNX graph)."""
    return part.backend in PLAN_BACKENDS


def part_profiles(part: EnginePart) -> list[ProfileSpec]:
    """The optimization profiles a plan part was built with, in the plan's order."""
    try:
        return [ProfileSpec.from_dict(p) for p in part.extra["profiles"]]
    except KeyError:
        raise ArtifactError(f"manifest part {part.name!r} ({part.file}) records no optimization profiles "
                            f"(extra.profiles); recompile the folder") from None


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return trt


def gpu_environment(device_index: int = 0) -> dict[str, Any]:
    """This machine's TensorRT / CUDA versions and GPU (what a plan is tied to)."""
    env: dict[str, Any] = {}
    try:
        import tensorrt as trt

        env["tensorrt"] = trt.__version__
    except ImportError:
        env["tensorrt"] = None
    try:
        import torch

        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device_index)
            env["compute_capability"] = f"{major}.{minor}"
            env["gpu"] = torch.cuda.get_device_name(device_index)
    except ImportError:
        pass
    return env


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for p in str(v).split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_plan_compat(extra: dict[str, Any], env: dict[str, Any], plan: str = "step.plan", rebuild: str = "") -> None:
    """Raise ArtifactError (naming the fix) when a plan built as ``extra`` says cannot run in ``env``.

    Rules: without version compatibility the TensorRT version must match exactly; with it,
    the same major and a runtime at least as new. Without a hardware-compatibility level the
    compute capability must match; ``ampere+`` needs sm_80 or newer; ``same-compute-capability``
    needs the same one.
    """
    rebuild = rebuild or "ember compile SOURCE --backend tensorrt -o FOLDER"
    built_trt, here_trt = extra.get("tensorrt"), env.get("tensorrt")
    built_cc, here_cc = extra.get("compute_capability"), env.get("compute_capability")
    where = f"{plan} was built with TensorRT {built_trt} for sm_{str(built_cc).replace('.', '')}"
    if here_trt is None:
        raise ArtifactError(f"{where}, but TensorRT is not installed here: {INSTALL_HINT.split(': ', 1)[1]}")
    vc = bool(extra.get("version_compatible"))
    bt, ht = _version_tuple(built_trt), _version_tuple(here_trt)
    trt_ok = (bt[:1] == ht[:1] and ht >= bt) if vc else bt == ht
    level = extra.get("hardware_compatibility_level", "none")
    if here_cc is None:
        cc_ok = False
    elif level == "ampere+":
        cc_ok = _version_tuple(here_cc) >= (8, 0)
    else:
        cc_ok = here_cc == built_cc
    if trt_ok and cc_ok:
        return
    here = f"this machine has TensorRT {here_trt} / sm_{str(here_cc).replace('.', '')}"
    fixes = [f"rebuild here with `{rebuild}`"]
    if not trt_ok and not vc:
        fixes.append("or build with --version-compatible (runs on later TensorRT of the same major)")
    if not cc_ok and level == "none":
        fixes.append("or build with --hardware-compatibility-level ampere+ (runs on any sm_80+ GPU)")
    raise ArtifactError(f"{where}; {here}: " + " ".join(fixes))


def require_tensorrt_rtx(hint: str = RTX_INSTALL_HINT):
    """The ``tensorrt_rtx_bindings`` module, or a ConfigError with ``hint`` (the install and the fix)."""
    try:
        import tensorrt_rtx_bindings as trt
    except ImportError as e:
        raise ConfigError(hint) from e
    return trt
