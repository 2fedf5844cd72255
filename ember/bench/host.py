"""The host a benchmark runs on, as the results files name it."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where that is missing)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        return cpu


def machine_info() -> dict:
    """CPU, cores, vector ISA flags, memory, Python / ONNX Runtime versions and the load average."""
    cpu = cpu_model()
    flags = ""
    try:
        txt = open("/proc/cpuinfo").read()
        flags = " ".join(f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "avx2", "fma")
                         if f" {f} " in txt or txt.endswith(f" {f}"))
    except OSError:
        pass
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    import onnxruntime

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "isa": flags, "memory_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "system": f"{platform.system()} {platform.machine()}", "load_avg_1m_at_start": load}


def machine_line(info: dict) -> str:
    return (f"{info['cpu']} ({info['cores']} cores, {info['isa']}), {info['memory_gib']} GiB, "
            f"{info['system']}, onnxruntime {info['onnxruntime']}")
