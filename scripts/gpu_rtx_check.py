"""A TensorRT-RTX decoder folder on a GPU machine: the load-time target check, then the same
folder run with ONNX Runtime (``backend='onnxruntime'``) on CUDA against the CPU.

Steps (each recorded; a failure does not stop the next):
  env        the GPU (name, compute capability), torch, onnxruntime and its providers, TensorRT-RTX
  plan       ember.load(FOLDER, device=DEVICE): on a GPU outside the plan's targets (the H200,
             sm90) an ArtifactError naming sm90 and backend='onnxruntime' is expected; on a
             target GPU the plan loads and its greedy tokens are recorded (and compared)
  cpu        greedy tokens from ember.load(FOLDER, device='cpu', backend='onnxruntime')
  cuda       greedy tokens from ember.load(FOLDER, device=DEVICE, backend='onnxruntime'),
             compared with the CPU's

Passes (exit 0) when the plan step behaved as the GPU's capability says (refused outside the
targets, loaded inside them) and the CUDA tokens equal the CPU tokens (an FP32 folder: all
of them; an FP16 one: the first token of each prompt, since later greedy steps may part at
near-ties). Writes the JSON result to OUT_JSON.

Usage: python scripts/gpu_rtx_check.py FOLDER OUT_JSON [--device cuda:0] [--max-new-tokens 8]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ember  # noqa: E402
from ember.engine_format.manifest import read_manifest  # noqa: E402
from ember.runtime.gpu_target import find_gpu  # noqa: E402

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11], [42], [5, 4, 3, 2, 1, 0]]


def environment(device_index: int) -> dict:
    env: dict = {"python": platform.python_version()}
    gpu = find_gpu(device_index)
    env["gpu"] = None if gpu is None else {"name": gpu.name, "capability": gpu.capability, "source": gpu.source}
    try:
        import torch

        env["torch"], env["torch_cuda"] = torch.__version__, torch.version.cuda
    except ImportError:
        env["torch"] = None
    import onnxruntime as ort

    env["onnxruntime"], env["providers"] = ort.__version__, ort.get_available_providers()
    try:
        import tensorrt_rtx_bindings as trt

        env["tensorrt_rtx"] = trt.__version__
    except ImportError:
        env["tensorrt_rtx"] = None
    return env


def greedy(folder: str, max_new_tokens: int, **load_opts) -> dict:
    t0 = time.perf_counter()
    with ember.load(folder, max_batch=len(PROMPTS), **load_opts) as eng:
        load_s = time.perf_counter() - t0
        out = eng.generate(PROMPTS, max_new_tokens=max_new_tokens, ignore_eos=True)
    return {"tokens": [c.token_ids for c in out], "load_s": round(load_s, 3),
            "total_s": round(time.perf_counter() - t0, 3)}


def step(result: dict, name: str, fn) -> None:
    try:
        result[name] = {"ok": True, **fn()}
    except Exception as e:  # recorded: the next step still runs
        result[name] = {"ok": False, "error_type": type(e).__name__, "error": str(e),
                        "traceback": traceback.format_exc()[-2000:]}
    print(f"[{name}] {json.dumps({k: v for k, v in result[name].items() if k != 'traceback'})}", flush=True)


def tokens_agree(a: list, b: list, dtype: str) -> bool:
    if dtype == "fp32":
        return a == b
    return len(a) == len(b) and all(x[:1] == y[:1] for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("out_json")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    a = ap.parse_args(argv)
    index = int(a.device.split(":")[1]) if ":" in a.device else 0
    part = read_manifest(a.folder).part("step")
    dtype = str(part.extra.get("dtype", "fp32"))
    targets = list(part.extra.get("targets") or [])
    result: dict = {"folder": str(a.folder), "device": a.device, "backend": part.backend, "dtype": dtype,
                    "targets": targets, "prompts": PROMPTS, "max_new_tokens": a.max_new_tokens}
    step(result, "env", lambda: environment(index))
    gpu = (result["env"].get("gpu") or {}) if result["env"]["ok"] else {}
    in_targets = gpu.get("capability") in targets

    def plan() -> dict:
        try:
            out = greedy(a.folder, a.max_new_tokens, device=a.device)
        except ember.ArtifactError as e:
            return {"refused": True, "message": str(e), "one_line": "\n" not in str(e)}
        return {"refused": False, **out}

    step(result, "plan", plan)
    step(result, "cpu", lambda: greedy(a.folder, a.max_new_tokens, device="cpu", backend="onnxruntime"))
    step(result, "cuda", lambda: greedy(a.folder, a.max_new_tokens, device=a.device, backend="onnxruntime"))

    checks = {}
    p = result["plan"]
    if in_targets:
        checks["plan_loaded_on_a_target_gpu"] = p["ok"] and not p.get("refused")
    else:
        sm = "sm" + str(gpu.get("capability", "?")).replace(".", "")
        checks["plan_refused_outside_targets"] = (p["ok"] and bool(p.get("refused")) and p.get("one_line", False)
                                                  and sm in p.get("message", "")
                                                  and "backend='onnxruntime'" in p.get("message", ""))
    cpu, cuda = result["cpu"], result["cuda"]
    checks["cuda_onnxruntime_matches_cpu"] = (cpu["ok"] and cuda["ok"]
                                             and tokens_agree(cuda["tokens"], cpu["tokens"], dtype))
    if cpu["ok"] and cuda["ok"]:
        result["cuda_equal_tokens"] = cuda["tokens"] == cpu["tokens"]
    if in_targets and p["ok"] and not p.get("refused") and cpu["ok"]:
        checks["plan_matches_cpu"] = tokens_agree(p["tokens"], cpu["tokens"], dtype)
    result["checks"], result["pass"] = checks, all(checks.values())
    Path(a.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out_json).write_text(json.dumps(result, indent=2))
    print(json.dumps({"checks": checks, "pass": result["pass"]}))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
