"""The peers benchmark's arms: which exist, why one is skipped, and how one is built and run.

Precisions are named as Ember names them; each peer maps them to its own format:
  fp32 -> ONNX Runtime GenAI fp32, llama.cpp F32, transformers (torch FP32)
  int8-weights -> ONNX Runtime GenAI int8, llama.cpp Q8_0
  int4 -> ONNX Runtime GenAI int4, llama.cpp Q4_K_M
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import ConfigError

PRECISIONS = ("fp32", "int8-weights", "int4")
# Ember's compile options per precision, set like the peers' formats: ONNX Runtime GenAI's builder quantizes
# every MatMul, the LM head included, symmetrically in blocks of 32 (its defaults); llama.cpp's Q8_0/Q4_K_M
# quantize the output matrix too. So the Ember arms quantize the LM head, symmetric, block 32. With 4- and
# 8-bit weights the step graph's many small nodes, not the weights, bound a decode step on the CPU, so the
# quantized arms decode through the fused part (GroupQueryAttention, skip-norms; --fused-decode on).
EMBER_OPTIONS = {"fp32": {},
                 "int8-weights": {"quantize": "int8-weights", "symmetric": True, "quantize_lm_head": True,
                                  "fused_decode": "on"},
                 "int4": {"quantize": "int4", "symmetric": True, "quantize_lm_head": True, "fused_decode": "on"}}
PEER_PRECISION = {"onnxruntime-genai": {"fp32": "fp32", "int8-weights": "int8", "int4": "int4"},
                  "llama.cpp": {"fp32": "F32", "int8-weights": "Q8_0", "int4": "Q4_K_M"},
                  "transformers": {"fp32": "fp32"}}
ENGINE_LABEL = {"ember": "Ember", "onnxruntime-genai": "ONNX Runtime GenAI", "llama.cpp": "llama.cpp",
                "transformers": "transformers"}
NEEDS = {"onnxruntime-genai": ("onnxruntime_genai", "pip install onnxruntime-genai"),
         "llama.cpp": ("llama_cpp", "pip install llama-cpp-python gguf; PyPI has only its source, whose build "
                                    "ran past 11 min on the 2-core host"),
         "transformers": ("transformers", "pip install transformers torch")}
ENGINES = ("ember", "onnxruntime-genai", "llama.cpp", "transformers")


@dataclass
class Arm:
    engine: str
    precision: str  # Ember's name
    peer_precision: str
    skipped: str | None = None
    row: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{ENGINE_LABEL[self.engine]} {self.peer_precision}"


def parse_list(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ConfigError(f"{flag} {value!r}: each item must be one of {', '.join(allowed)}")
    return items


def ember_skip_reason(precision: str) -> str | None:
    """Why Ember cannot compile ``precision`` (its compile options' own validation), or None."""
    from ember.compiler.compile import CompileOptions

    try:
        CompileOptions(**EMBER_OPTIONS[precision])
    except ConfigError as e:
        return f"Ember does not support it yet ({e})"
    return None


def plan_arms(precisions: list[str], engines: list[str]) -> list[Arm]:
    """Arms grouped by precision, Ember first in each group; unavailable ones carry their reason."""
    arms = []
    for p in precisions:
        for e in engines:
            if e == "ember":
                arms.append(Arm(e, p, p, ember_skip_reason(p)))
                continue
            if p not in PEER_PRECISION[e]:
                continue
            mod, how = NEEDS[e]
            extra = "gguf" if e == "llama.cpp" else None
            missing = [m for m in (mod, extra) if m and importlib.util.find_spec(m) is None]
            arms.append(Arm(e, p, PEER_PRECISION[e][p], f"{', '.join(missing)} not installed ({how})" if missing else None))
    return arms


def vm_hwm_mib(pid: int | str = "self") -> float:
    """Peak RSS (``VmHWM``) of a live process, MiB; 0 where /proc is missing. Unlike ``ru_maxrss``
    it does not inherit the parent's RSS through fork + exec."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:")), 0.0)
    except (OSError, ValueError):
        return 0.0


def run_child(cmd: list[str], log: Path, timeout_s: float) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS MiB of that process, sampled every 50 ms).
    A failure is one line with the log's last line."""
    t0 = time.perf_counter()
    peak = 0.0
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = t0 + timeout_s
        while True:
            peak = max(peak, vm_hwm_mib(proc.pid))
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                raise RuntimeError(f"{' '.join(cmd[:4])} ran past {timeout_s:.0f} s (log: {log})")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise RuntimeError(f"{' '.join(cmd[:4])} exited {proc.returncode}: {tail[0][:300] if tail else ''} (log: {log})")
    return wall, peak


def dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_arm(arm: Arm, hf: Path, work: Path, workload: dict, timeout_s: float) -> dict:
    """Build (timed, own process) then run (own process) one arm; its row of the results."""
    slug = arm.name.replace(" ", "_").replace(".", "")
    out, job_path = work / slug, work / f"{slug}.job.json"
    job = {"engine": arm.engine, "hf": str(hf), "out": str(out), "peer_precision": arm.peer_precision,
           "options": EMBER_OPTIONS.get(arm.precision, {}), "workload": workload, "result": str(work / f"{slug}.result.json")}
    job_path.write_text(json.dumps(job))
    worker = [sys.executable, "-m", "ember.bench.peers.worker"]
    row: dict = {"arm": arm.name, "engine": arm.engine, "precision": arm.precision, "peer_precision": arm.peer_precision}
    if arm.engine == "transformers":
        job["out"] = str(hf)
        job_path.write_text(json.dumps(job))
        row.update(build_s=0.0, build_rss_mib=None)
    else:
        if arm.engine == "onnxruntime-genai":
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf), "-o", str(out),
                   "-p", arm.peer_precision, "-e", "cpu", "-c", str(work / f"{slug}.cache")]
        else:
            cmd = worker + ["build", str(job_path)]
        build_s, build_rss = run_child(cmd, work / f"{slug}.build.log", timeout_s)
        shutil.rmtree(work / f"{slug}.cache", ignore_errors=True)
        row.update(build_s=build_s, build_rss_mib=build_rss)
    row["engine_mb"] = dir_bytes(Path(job["out"]) if arm.engine != "transformers" else hf) / 1e6
    _, run_rss = run_child(worker + ["run", str(job_path)], work / f"{slug}.run.log", timeout_s)
    row.update(json.loads(Path(job["result"]).read_text()))
    row["peak_rss_mib"] = max(row["peak_rss_mib"], run_rss)
    return row
