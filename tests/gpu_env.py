"""Why the GPU tier cannot run here (one home for the check the GPU test files share)."""
from __future__ import annotations


def cuda_reason() -> str | None:
    """None where torch sees a CUDA device and onnxruntime has its CUDA provider, else the reason."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDA provider (install onnxruntime-gpu)"
    return None if torch.cuda.is_available() else "no CUDA device"
