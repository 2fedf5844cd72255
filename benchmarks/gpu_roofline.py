"""Decode-step roofline on a GPU: step time vs (weight bytes + live KV bytes) / copy bandwidth.

The bandwidth is measured in the same run by a large device-to-device copy (bytes read +
bytes written, docs/design.md §8). A decode step must read every weight once and every live K/V
position of every row once, so ``floor = (weights + live KV) / bandwidth`` and
``efficiency = floor / measured``. Steps run through the runtime's ``DeviceExecutor``
(graph + KV write + logits to the host: what serving pays) and, separately, the session
alone (timed with CUDA events).

Standalone: ``python benchmarks/gpu_roofline.py artifacts/llama-1b-fp16 --batches 1 16 64 128``
(needs onnxruntime-gpu and a CUDA build of torch). ``benchmarks/gpu_suite.py`` imports it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from ember.engine_format.decoder_spec import kv_geometry


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> dict:
    """Median device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    import torch

    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    t = statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_per_s": 2 * nbytes / t, "copy_bytes": nbytes, "median_s": t, "reps": reps}


def weight_bytes(folder: Path, manifest) -> int:
    """Bytes of the step graph's weights: the engine files minus the graph structure (small)."""
    part = manifest.part("step")
    return int(part.size + sum(r["size"] for r in part.external_data))


def kv_bytes(cfg: dict, batch: int, live: int, itemsize: int) -> int:
    return kv_geometry(cfg).slot_bytes(live, itemsize) * batch


def _fill_pool(pool, batch: int, live: int, steps: int) -> None:
    pool.ensure_capacity(live + steps)
    for arrays in (pool.k, pool.v):
        for a in arrays:
            a.normal_()  # never time on zeros (METHOD.md)
    pool.lengths[:] = 0
    pool.lengths[:batch] = live


def time_decode(executor, cfg: dict, batch: int, live: int, steps: int = 30, warmup: int = 5, seed: int = 0) -> dict:
    """Median decode-step time at ``batch`` rows with ``live`` past tokens each."""
    import torch

    from ember.runtime.executor import run_greedy

    rng = np.random.default_rng(seed)
    pool = executor.pool
    _fill_pool(pool, batch, live, warmup + 2 * steps + 2)
    vocab = cfg["vocab_size"]
    ones = np.ones(batch, np.int64)
    full, session_only = [], []
    for i in range(warmup + steps):
        ids = rng.integers(0, vocab, (batch, 1)).astype(np.int64)
        pos = pool.lengths[:batch].reshape(batch, 1).copy()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_greedy(executor, 0, ids, pos, ones)  # as the engine: argmax on the device, B tokens to the host
        dt = time.perf_counter() - t0
        if i >= warmup:
            full.append(dt)
    sess, decode = executor.session, getattr(executor, "decode", None)
    for i in range(warmup + steps):
        ids = rng.integers(0, vocab, (batch, 1)).astype(np.int64)
        past = pool.lengths[:batch].copy()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        if decode is not None:  # the fused decode part (writes its K/V in place)
            decode.run(ids, past, pool.views(0, batch))
        else:
            sess.run(ids, past.reshape(batch, 1), past, ones, pool.views(0, batch))
        b.record()
        b.synchronize()
        if i >= warmup:
            session_only.append(a.elapsed_time(b) / 1e3)
    return {"batch": batch, "live_tokens": live, "capacity": pool.capacity, "steps": steps,
            "step_s_median": statistics.median(full), "step_s_p90": float(np.percentile(full, 90)),
            "session_s_median": statistics.median(session_only)}


def roofline(executor, manifest, folder: Path, batches: list[int], live: int, bandwidth: float,
             steps: int = 30) -> list[dict]:
    cfg = manifest.model["config"]
    w = weight_bytes(folder, manifest)
    itemsize = executor.pool.dtype.itemsize
    rows = []
    for b in batches:
        r = time_decode(executor, cfg, b, live, steps=steps)
        kv = kv_bytes(cfg, b, r["live_tokens"], itemsize)
        floor = (w + kv) / bandwidth
        r.update({"weight_bytes": w, "kv_bytes": kv, "floor_s": floor,
                  "efficiency_step": floor / r["step_s_median"], "efficiency_session": floor / r["session_s_median"],
                  "tokens_per_s": b / r["step_s_median"]})
        rows.append(r)
    return rows


def markdown(rows: list[dict], bandwidth: float, device: str) -> str:
    out = [f"Decode-step roofline on {device}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read+write, same run).", "",
           "| batch | live KV tok/row | weights MB | KV MB | floor ms | step ms | session ms | floor/step | floor/session | tok/s |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['batch']} | {r['live_tokens']} | {r['weight_bytes'] / 1e6:.0f} | {r['kv_bytes'] / 1e6:.0f} | "
                   f"{r['floor_s'] * 1e3:.3f} | {r['step_s_median'] * 1e3:.3f} | {r['session_s_median'] * 1e3:.3f} | "
                   f"{r['efficiency_step']:.0%} | {r['efficiency_session']:.0%} | {r['tokens_per_s']:.0f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(b, [r["step_s_median"] * 1e3 for r in rows], "o-", label="runtime step (graph + KV write + argmax, tokens to host)")
    ax.plot(b, [r["session_s_median"] * 1e3 for r in rows], "s-", label="session only")
    ax.plot(b, [r["floor_s"] * 1e3 for r in rows], "k--", label="floor: (weights + live KV) / copy bandwidth")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (rows decoding)")
    ax.set_ylabel("ms per decode step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    ap.add_argument("--live", type=int, default=480)
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--fused-decode", action="store_true",
                    help="also time the folder's fused decode part (same pool, same run)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="gpu_roofline", help="output file stem")
    a = ap.parse_args()
    import torch

    from ember.engine_format.manifest import read_manifest
    from ember.runtime.cuda_session import DeviceExecutor, make_cuda_executor

    folder = Path(a.folder)
    m = read_manifest(folder)
    ex = make_cuda_executor(folder, m, m.part("step"), "cuda:0", max(a.batches), m.model["config"]["max_positions"],
                            cuda_graph=a.cuda_graph)
    bw = copy_bandwidth()["bytes_per_s"]
    dev = torch.cuda.get_device_name(0)
    doc = {"device": dev, "model": m.model["name"], "bandwidth": bw, "cuda_graph": a.cuda_graph,
           "rows": roofline(ex, m, folder, a.batches, a.live, bw)}
    md = [f"# {m.model['name']} decode roofline\n", "Step graph:\n", markdown(doc["rows"], bw, dev)]
    if a.fused_decode:
        fused = make_cuda_executor(folder, m, m.part("step"), "cuda:0", max(a.batches), m.model["config"]["max_positions"],
                                   cuda_graph=a.cuda_graph, decode_part=m.part("decode"))
        doc["fused_rows"] = roofline(DeviceExecutor(fused.session, ex.pool, decode=fused.decode), m, folder, a.batches,
                                     a.live, bw)
        md += ["\nFused decode part (GroupQueryAttention), same pool:\n", markdown(doc["fused_rows"], bw, dev)]
    md.append(f"\nCUDA graphs: {'on' if a.cuda_graph else 'off'}. Reproduce: `python benchmarks/gpu_roofline.py FOLDER "
              f"--batches {' '.join(map(str, a.batches))} --live {a.live}{' --cuda-graph' if a.cuda_graph else ''}"
              f"{' --fused-decode' if a.fused_decode else ''}`")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(doc, indent=2))
    (out / f"{a.name}.md").write_text("\n".join(md) + "\n")
    plot(doc.get("fused_rows") or doc["rows"], out / f"{a.name}.png", f"{m.model['name']} decode on {dev}")
    print("\n".join(md))


if __name__ == "__main__":
    main()
