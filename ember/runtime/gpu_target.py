"""Which GPU a device string names, and whether a TensorRT-RTX plan can run on it.

A TensorRT-RTX part records the compute capabilities its plan was built for
(``extra["targets"]``, "major.minor") and the library release that built it
(``extra["tensorrt_rtx"]``). ``check_rtx_plan`` compares both with this machine *before*
anything is deserialized, in this order: the GPU's compute capability against the targets
(needs no library: the H200, sm90, is refused here, since TensorRT-RTX has no Hopper
target), the library being installed, and its release against the recorded one (TensorRT-RTX
plans run only on the release that built them; there is no version-compatible mode).
Each refusal is one line naming the two fixes: rebuild, or run the folder's ONNX graphs
with ONNX Runtime (``backend='onnxruntime'``).

The compute capability comes from PyTorch when it sees a CUDA device, else from
``nvidia-smi`` (so the check needs neither torch nor a working CUDA runtime).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from ember.engine_format.tensorrt_part import RTX_INSTALL, RTX_NO_TARGET, RTX_TARGETS, require_tensorrt_rtx
from ember.errors import ArtifactError, InputError

RTX_EXTRA = "tensorrt-rtx"
ORT_FIX = "backend='onnxruntime'"


@dataclass(frozen=True)
class GpuInfo:
    """One GPU: compute capability ("major.minor"), its name, and where they were read."""

    capability: str
    name: str
    source: str  # "torch" | "nvidia-smi"

    @property
    def sm(self) -> str:
        return sm_name(self.capability)


def sm_name(capability: str) -> str:
    """'8.9' -> 'sm89', '12.0' -> 'sm120'."""
    return "sm" + str(capability).replace(".", "")


def find_gpu(index: int = 0) -> GpuInfo | None:
    """GPU ``index`` as CUDA numbers it here (``CUDA_VISIBLE_DEVICES`` applies), or None when
    neither PyTorch nor ``nvidia-smi`` sees one."""
    try:
        import torch

        if torch.cuda.is_available() and index < torch.cuda.device_count():
            major, minor = torch.cuda.get_device_capability(index)
            return GpuInfo(f"{major}.{minor}", torch.cuda.get_device_name(index), "torch")
    except ImportError:
        pass
    return _nvidia_smi_gpu(index)


def _nvidia_smi_gpu(index: int) -> GpuInfo | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
    if ids is not None and index >= len(ids):
        return None
    gpu_id = ids[index] if ids is not None else str(index)  # nvidia-smi ignores CUDA_VISIBLE_DEVICES
    try:
        res = subprocess.run([smi, "--query-gpu=compute_cap,name", "--format=csv,noheader", "-i", gpu_id],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    fields = [f.strip() for f in res.stdout.strip().splitlines()[0].split(",", 1)] if res.stdout.strip() else []
    if res.returncode != 0 or len(fields) != 2 or not fields[0].replace(".", "").isdigit():
        return None
    return GpuInfo(fields[0], fields[1], "nvidia-smi")


def device_gpu(index: int = 0) -> GpuInfo:
    """``find_gpu``, or an InputError when there is no such GPU."""
    gpu = find_gpu(index)
    if gpu is None:
        raise InputError(f"device 'cuda:{index}': no NVIDIA GPU is visible here (PyTorch sees no CUDA device and "
                         f"nvidia-smi finds none); check the driver and CUDA_VISIBLE_DEVICES, or load with "
                         f"device='cpu', {ORT_FIX} (CLI: --device cpu --backend onnxruntime)")
    return gpu


def plan_targets(part) -> list[str]:
    """The part's ``extra["targets"]``, checked: a non-empty list of "major.minor" strings."""
    targets = part.extra.get("targets")
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, str) and t.replace(".", "", 1).isdigit() and "." in t for t in targets)):
        raise ArtifactError(f"manifest part {part.name!r} ({part.file}) records targets {targets!r}, not a list of "
                            f"compute capabilities like ['8.6', '8.9']; recompile the folder")
    return targets


def check_targets(part, gpu: GpuInfo, device: str = "cuda:0") -> None:
    """ArtifactError unless ``gpu``'s compute capability is one of the plan's targets."""
    targets = plan_targets(part)
    if gpu.capability in targets:
        return
    built = part.extra.get("tensorrt_rtx", "?")
    raise ArtifactError(
        f"{part.file} was built by TensorRT-RTX {built} for {', '.join(sm_name(t) for t in targets)}; this GPU "
        f"({gpu.name}, {gpu.sm}) is not one of them: rebuild with `ember compile SOURCE --backend tensorrt-rtx "
        f"--trt-targets {gpu.sm}` where TensorRT-RTX supports it ({_support_note(gpu)}), or run this folder's ONNX "
        f"graphs with ONNX Runtime: ember.load(FOLDER, device='{device}', {ORT_FIX}) (CLI: --backend onnxruntime)")


def _support_note(gpu: GpuInfo) -> str:
    arch = RTX_NO_TARGET.get(gpu.capability.split(".")[0])
    return f"it has no {arch} target" if arch else f"its targets are {', '.join(sm_name(t) for t in RTX_TARGETS)}"


def import_rtx() -> Any:
    """The ``tensorrt_rtx_bindings`` module, or a ConfigError naming the install."""
    return require_tensorrt_rtx(f"TensorRT-RTX is not installed, and this folder's plans need it: {RTX_INSTALL}; or run "
                                f"the folder's ONNX graphs with ONNX Runtime: {ORT_FIX} (CLI: --backend onnxruntime)")


def check_release(part, installed: str) -> None:
    """ArtifactError unless the installed TensorRT-RTX is the release that built the plan."""
    built = part.extra.get("tensorrt_rtx")
    if not isinstance(built, str) or not built:
        raise ArtifactError(f"manifest part {part.name!r} ({part.file}) does not record the TensorRT-RTX release that "
                            f"built it (extra.tensorrt_rtx); recompile the folder")
    if built == installed:
        return
    raise ArtifactError(
        f"{part.file} was built by TensorRT-RTX {built}, but {installed} is installed here, and TensorRT-RTX plans run "
        f"only on the release that built them: install that release (pip install tensorrt-rtx-cu13-libs=={built} "
        f"tensorrt-rtx-cu13-bindings=={built}), or rebuild with `ember compile SOURCE --backend tensorrt-rtx`, or run "
        f"the ONNX graphs with {ORT_FIX} (CLI: --backend onnxruntime)")


def check_rtx_plan(part, device_index: int = 0) -> Any:
    """Every check that needs no plan bytes, in order (targets, library, release); returns
    the ``tensorrt_rtx_bindings`` module to deserialize with."""
    check_targets(part, device_gpu(device_index), device=f"cuda:{device_index}")
    trt = import_rtx()
    check_release(part, str(trt.__version__))
    return trt
