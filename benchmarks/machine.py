"""Describe the machine a benchmark ran on (for the results files)."""
from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    from ember.bench.host import cpu_model

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
