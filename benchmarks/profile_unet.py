"""Where a diffusion UNet call spends its time, FP32 vs W8A8: ONNX Runtime kernel time per op
type for the full and the shallow engine of two engine folders (benchmarks/diffusion.py builds
them), on random inputs at batch 2 (the CFG rows), with the runtime's session options.

    python benchmarks/profile_unet.py [--root artifacts/bench-diffusion-sd-small-50] [--runs 5] [--name profile_unet]
Writes benchmarks/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line  # noqa: E402

RESULTS = Path(__file__).parent / "results"
WARMUP = 3


def profile(folder: Path, part_name: str, runs: int) -> dict:
    import onnxruntime as ort

    from ember.engine_format.manifest import read_manifest
    from ember.ort.session import session_options

    part = read_manifest(folder).part(part_name)
    so = session_options(None, None)
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / part_name)
    disabled = list(part.extra.get("ort_disabled_optimizers") or [])
    sess = ort.InferenceSession(str(folder / part.file), so, providers=["CPUExecutionProvider"],
                                **({"disabled_optimizers": disabled} if disabled else {}))
    rng = np.random.default_rng(0)
    feeds = {}
    for i in sess.get_inputs():
        shape = [2 if isinstance(d, str) else d for d in i.shape]
        if i.type == "tensor(int64)":
            feeds[i.name] = np.full(shape, 500, np.int64)
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    for _ in range(WARMUP):
        sess.run(None, feeds)
    t = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feeds)
    wall = (time.perf_counter() - t) / runs
    events = json.loads(Path(sess.end_profiling()).read_text())
    first_timed = sorted(e["ts"] for e in events if e.get("name") == "model_run")[WARMUP]
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_timed:
            by_op[e["args"]["op_name"]] += e["dur"]
    return {"wall_ms": wall * 1e3, "kernel_ms": sum(by_op.values()) / runs / 1e3,
            "ops_ms": {k: v / runs / 1e3 for k, v in by_op.most_common()}}


def markdown(doc: dict) -> str:
    out = [f"# UNet call profile, FP32 vs W8A8 ({doc['root']})", "",
           f"Machine: {machine_line(doc['machine'])}. Batch 2 (CFG rows), random inputs, {doc['runs']} timed runs after "
           f"{WARMUP}; ms = ONNX Runtime kernel time per call by op type (after its fusions).", ""]
    for engine in ("unet_full", "unet_shallow"):
        f32, q = doc["engines"][f"fp32/{engine}"], doc["engines"][f"w8a8/{engine}"]
        ops = sorted(set(f32["ops_ms"]) | set(q["ops_ms"]), key=lambda o: -(f32["ops_ms"].get(o, 0) + q["ops_ms"].get(o, 0)))
        out += [f"## {engine}: wall {f32['wall_ms']:.1f} ms FP32, {q['wall_ms']:.1f} ms W8A8 "
                f"({f32['wall_ms'] / q['wall_ms']:.2f}x)", "", "| op type | FP32 ms | W8A8 ms |", "|---|---:|---:|"]
        out += [f"| {o} | {f32['ops_ms'].get(o, 0):.2f} | {q['ops_ms'].get(o, 0):.2f} |" for o in ops[:12]]
        out += [f"| **all kernels** | **{f32['kernel_ms']:.1f}** | **{q['kernel_ms']:.1f}** |", ""]
    out.append("Reproduce: `python benchmarks/profile_unet.py`")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="artifacts/bench-diffusion-sd-small-50")
    ap.add_argument("--fp32", default="float_dp5", help="FP32 engine folder under --root")
    ap.add_argument("--w8a8", default="w8a8_dp5", help="W8A8 engine folder under --root")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--name", default="profile_unet")
    a = ap.parse_args()
    root = Path(a.root)
    doc = {"machine": machine_info(), "root": str(root), "runs": a.runs, "engines": {}}
    for label, sub in (("fp32", a.fp32), ("w8a8", a.w8a8)):
        for engine in ("unet_full", "unet_shallow"):
            doc["engines"][f"{label}/{engine}"] = profile(root / sub, engine, a.runs)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / f"{a.name}.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
