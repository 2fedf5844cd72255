"""Where a compiled decoder's step spends its time: ONNX Runtime kernel time per op type.

Runs the engine's step graph (CPU, the runtime's session options) on a decode step of
``--batch`` rows with ``--context`` live tokens each, with ONNX Runtime's profiler on, and
sums the kernel time of every node by op type (after ORT's graph fusions, so the op types
are the ones that actually run: Gemm, FusedMatMul, LayerNormalization, ...).

    python benchmarks/profile_step.py ENGINE_FOLDER [--batch 1 32] [--context 128] [--reps 10]
    python benchmarks/profile_step.py ENGINE_FOLDER --optimized-model /tmp/opt.onnx   # also save ORT's fused graph

Writes ``--out`` (default benchmarks/results/profile_step.{json,md}): one column of ms/step per
batch, op types sorted by time at the largest batch, plus node counts and the wall time.
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

from ember.engine_format.decoder_spec import kv_geometry

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3


def _session(onnx_path: Path, threads: int, profile_prefix: str | None, optimized_model: str | None,
             disabled_optimizers: list[str] | None):
    """An ORT CPU session with the runtime's options (``session_options``) + profiling."""
    import onnxruntime as ort

    from ember.ort.session import session_options

    so = session_options(threads, optimized_model, profile_prefix)
    kwargs = {"disabled_optimizers": disabled_optimizers} if disabled_optimizers else {}
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"], **kwargs)


def _step_feeds(cfg: dict, batch: int, context: int, capacity: int) -> dict[str, np.ndarray]:
    """One decode step: each of ``batch`` rows has ``context`` live tokens in a pool of ``capacity``."""
    from ember.runtime.kv_pool import KVPool

    geometry = kv_geometry(cfg)
    pool = KVPool(*geometry[:3], slots=batch, max_capacity=max(capacity, cfg["max_positions"]), capacity=capacity,
                  layer_rings=geometry.layer_rings)
    pool.lengths[:] = context
    feeds = {"input_ids": np.ones((batch, 1), np.int64), "positions": np.full((batch, 1), context, np.int64),
             "past_lengths": np.full(batch, context, np.int64), "new_lengths": np.ones(batch, np.int64)}
    for i, a in enumerate(pool.views(0, batch)):
        feeds[f"past_{'key' if i % 2 == 0 else 'value'}.{i // 2}"] = a
    return feeds


def _timed_runs(sess, feeds: dict[str, np.ndarray], reps: int) -> list[float]:
    """Seconds of ``reps`` session runs after ``WARMUP`` untimed ones."""
    names = [o.name for o in sess.get_outputs()]
    for _ in range(WARMUP):
        sess.run(names, feeds)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(names, feeds)
        out.append(time.perf_counter() - t)
    return out


def profile_batch(onnx_path: Path, cfg: dict, batch: int, context: int, capacity: int, threads: int, reps: int,
                  optimized_model: str | None = None, disabled_optimizers: list[str] | None = None,
                  top: int = 0) -> dict:
    """Per-op-type kernel ms per step (mean over ``reps`` profiled runs), the ``top`` slowest
    nodes, and the median wall ms of ``reps`` runs with the profiler off and on (the profiler
    adds a few microseconds per node)."""
    if context + 1 > capacity:
        raise ValueError(f"--capacity {capacity} must exceed --context {context}")
    feeds = _step_feeds(cfg, batch, context, capacity)
    sess = _session(onnx_path, threads, None, optimized_model, disabled_optimizers)
    wall = _timed_runs(sess, feeds, reps)
    del sess
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(onnx_path, threads, f"{tmp}/prof", None, disabled_optimizers)
        profiled_wall = _timed_runs(sess, feeds, reps)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # keep only the timed runs: the last ``reps`` model_run events bound them
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    first_ts = runs[-reps]["ts"] if len(runs) >= reps else 0
    ms: dict[str, float] = collections.defaultdict(float)
    nodes: collections.Counter = collections.Counter()
    per_node: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_ts:
            op = e["args"]["op_name"]
            ms[op] += e["dur"] / 1e3 / reps
            nodes[op] += 1
            per_node[f"{op} {e['name'].removesuffix('_kernel_time')}"] += e["dur"] / 1e3 / reps
    slowest = sorted(per_node.items(), key=lambda kv: -kv[1])[:top]
    return {"batch": batch, "context": context, "capacity": capacity, "wall_ms_median": 1e3 * float(np.median(wall)),
            "profiled_wall_ms_median": 1e3 * float(np.median(profiled_wall)),
            "kernel_ms": sum(ms.values()), "ops": {op: {"ms": ms[op], "nodes": nodes[op] // reps} for op in ms},
            "slowest_nodes": [{"node": n, "ms": v} for n, v in slowest]}


def markdown(rows: list[dict], title: str, info: dict, threads: int, command: str) -> str:
    last = rows[-1]["ops"]
    ops = sorted({op for r in rows for op in r["ops"]}, key=lambda op: -last.get(op, {"ms": 0})["ms"])
    head = "| op type | " + " | ".join(f"nodes | ms @ B={r['batch']}" for r in rows) + " |"
    lines = [f"# Step-graph kernel time by op type — {title}", "",
             f"Machine: {machine_line(info)}; {threads} threads. Context {rows[0]['context']} live tokens per row, "
             f"KV pool capacity {rows[0]['capacity']}; ms = ONNX Runtime profiler kernel time per step, "
             "mean of the timed runs (after ORT's graph fusions). The profiler adds a few microseconds per node, so "
             "compare graphs by the profiler-off wall time.", "",
             head, "|---|" + "---:|---:|" * len(rows)]
    for op in ops:
        cells = []
        for r in rows:
            o = r["ops"].get(op)
            cells += [str(o["nodes"]) if o else "", f"{o['ms']:.2f}" if o else ""]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **all kernels** | " + " | ".join(f" | **{r['kernel_ms']:.1f}**" for r in rows) + " |")
    lines.append("| wall, profiler on (session.run, median) | "
                 + " | ".join(f" | {r['profiled_wall_ms_median']:.1f}" for r in rows) + " |")
    lines.append("| **wall, profiler off** (session.run, median) | "
                 + " | ".join(f" | **{r['wall_ms_median']:.1f}**" for r in rows) + " |")
    for r in rows:
        if r["slowest_nodes"]:
            lines += ["", f"Slowest nodes at B={r['batch']} (ms per step):", ""]
            lines += [f"- {n['node']}: {n['ms']:.2f}" for n in r["slowest_nodes"]]
    lines += ["", f"Reproduce: `{command}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", help="compiled decoder folder (ember compile ... -o FOLDER)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=128, help="live tokens per row")
    ap.add_argument("--capacity", type=int, default=None, help="KV pool capacity (default: context + 32)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=0, help="also list the N slowest nodes per batch")
    ap.add_argument("--optimized-model", default=None, help="also save ORT's optimized graph here (inspect fusions)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_step"))
    a = ap.parse_args()
    from ember.engine_format.manifest import read_manifest
    from ember.ort.session import default_threads

    folder = Path(a.engine)
    m = read_manifest(folder)
    if m.kind != "decoder":
        raise SystemExit(f"{folder} holds a {m.kind!r} engine; profile_step profiles decoder step graphs")
    part = m.part("step")
    if part.backend != "onnxruntime":
        raise SystemExit(f"{folder}'s step is a {part.backend} engine; profile_step profiles ONNX Runtime CPU engines")
    cfg = m.model["config"]
    threads = a.threads or default_threads()
    capacity = a.capacity or a.context + 32
    info = machine_info()
    rows = []
    for b in a.batch:
        r = profile_batch(folder / part.file, cfg, b, a.context, capacity, threads, a.reps, a.optimized_model,
                          part.extra.get("ort_disabled_optimizers"), a.top)
        print(f"batch {b}: kernels {r['kernel_ms']:.1f} ms, wall {r['wall_ms_median']:.1f} ms "
              f"({r['profiled_wall_ms_median']:.1f} ms profiled)", file=sys.stderr)
        rows.append(r)
    command = "python benchmarks/profile_step.py " + " ".join(sys.argv[1:])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"engine": str(folder), "model": m.model["name"], "machine": info,
                                                    "threads": threads, "rows": rows, "command": command}, indent=2))
    md = markdown(rows, f"{m.model['name']} ({folder.name})", info, threads, command)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
