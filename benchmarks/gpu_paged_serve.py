"""Paged KV on the GPU (issue 19): one folder, two engines, one run -- the slot engine (step graph +
fused GroupQueryAttention decode part, CUDA graphs) and the paged engine (``kv_layout="paged"``:
the paged step graph alone, PagedAttention over a block pool, prefix caching).

Workload: ``--requests`` requests submitted at once, each a shared ``--system``-token system
prompt plus ``--own`` tokens of its own, ``--new`` tokens each (greedy, EOS ignored). Each arm
runs in its own process (clean device memory), twice: a warm-up burst with other system-prompt
tokens, then the timed burst. Reported per arm: wall time of the burst, output tokens/s, median
and p90 time to first token, prompt tokens computed, and the process's peak device memory
(nvidia-smi's view: ``torch.cuda.mem_get_info`` polled every 20 ms -- ONNX Runtime's arena is
outside torch's own count), against the weights + the KV the burst holds at its peak.
Tokens: the arms' greedy tokens for every request must be equal (reported).

    python benchmarks/gpu_paged_serve.py --model llama-1b --out DIR
Writes DIR/gpu_paged_serve.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = {"slots": {}, "paged": {"kv_layout": "paged"}}


def burst(eng, prompts, new: int):
    t0 = time.perf_counter()
    handles = [eng.submit(p, max_new_tokens=new, ignore_eos=True) for p in prompts]
    outs = [h.result(timeout=600) for h in handles]
    wall = time.perf_counter() - t0
    ttft = sorted(o.ttft for o in outs)
    return outs, {"wall_s": wall, "tok_per_s": sum(len(o.token_ids) for o in outs) / wall,
                  "ttft_median_ms": 1e3 * statistics.median(ttft), "ttft_p90_ms": 1e3 * ttft[int(0.9 * (len(ttft) - 1))]}


def arm(folder: str, name: str, load: dict, warm, timed, new: int, q, device: str = "cuda:0") -> None:
    import torch

    import ember

    on_gpu = device.startswith("cuda")

    def used() -> int:  # the whole device's use (nvidia-smi's view); 0 on the CPU smoke run
        if not on_gpu:
            return 0
        free, total = torch.cuda.mem_get_info()
        return total - free

    base_used = used()
    peak = [base_used]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], used())
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        with ember.load(folder, device=device, **load) as eng:
            loaded = used()
            burst(eng, warm, new)
            outs, res = burst(eng, timed, new)
            st = eng.stats()
        stop.set()
        th.join()
        res.update({"arm": name, "load": load, "tokens": [o.token_ids for o in outs],
                    "device_used_before_load_mib": base_used / 2**20, "device_used_after_load_mib": loaded / 2**20,
                    "device_peak_mib": peak[0] / 2**20,
                    "stats": {k: v for k, v in st.items() if isinstance(v, (int, float))}})
        q.put(res)
    except Exception as e:  # report it; the other arm still runs
        import traceback

        q.put({"arm": name, "error": repr(e), "traceback": traceback.format_exc()[-3000:]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--system", type=int, default=256)
    ap.add_argument("--own", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--kv-memory", default="1GB", help="the paged arm's block pool")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device", default="cuda:0", help="cpu: a smoke run of the harness (no device memory figures)")
    a = ap.parse_args()
    from machine import machine_info, machine_line

    from ember.compiler.compile import CompileOptions, compile_decoder
    from ember.engine_format.decoder_spec import kv_geometry
    from ember.engine_format.manifest import read_manifest

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.gettempdir()) / f"ember_gpu_paged_serve_{Path(a.model).name}"  # reused by a rerun
    t0 = time.time()
    if not (folder / "manifest.json").exists():
        compile_decoder(a.model, folder, CompileOptions(dtype="fp16", paged="on", validate=False, quiet=True))
    compile_s = time.time() - t0
    m = read_manifest(folder)
    cfg = m.model["config"]
    v = int(cfg["vocab_size"])

    def prompts(seed: int):
        r = np.random.default_rng(seed)
        system = r.integers(3, v, a.system).tolist()
        return [system + r.integers(3, v, a.own).tolist() for _ in range(a.requests)]

    warm, timed = prompts(1), prompts(2)
    g = kv_geometry(cfg)
    token_bytes = 2 * g.num_layers * g.num_kv_heads * g.head_dim * 2
    weights = sum(p.size for p in m.parts if p.name == "paged")
    # the KV the burst holds at its peak: the system prompt once (shared blocks) + every request's own and new tokens
    kv_paged = (a.system + a.requests * (a.own + a.new)) * token_bytes
    kv_unshared = a.requests * (a.system + a.own + a.new) * token_bytes
    ctx = mp.get_context("spawn")
    results = {}
    loads = {"slots": {"max_batch": a.requests},
             "paged": {"max_batch": a.requests, "kv_layout": "paged", "kv_memory": a.kv_memory}}
    for name, load in loads.items():
        q = ctx.Queue()
        p = ctx.Process(target=arm, args=(str(folder), name, load, warm, timed, a.new, q, a.device))
        p.start()
        results[name] = q.get(timeout=900)
        p.join()
        print(name, {k: v for k, v in results[name].items() if k != "tokens"}, flush=True)
    ok = [r for r in results.values() if "error" not in r]
    same = len(ok) == 2 and ok[0]["tokens"] == ok[1]["tokens"]
    doc = {"machine": machine_info(), "model": a.model, "requests": a.requests, "system": a.system, "own": a.own,
           "new": a.new, "compile_s": compile_s, "weights_bytes": weights, "kv_bytes_paged_peak": kv_paged,
           "kv_bytes_unshared": kv_unshared, "tokens_equal": same,
           "arms": {k: {kk: vv for kk, vv in r.items() if kk != "tokens"} for k, r in results.items()}}
    (out / "gpu_paged_serve.json").write_text(json.dumps(doc, indent=1, default=str))
    md = [f"# Paged KV vs slots on the GPU -- {a.model}", "", f"Machine: {machine_line(doc['machine'])}.",
          f"{a.requests} requests at once, each a shared {a.system}-token system prompt + {a.own} own tokens, "
          f"{a.new} new tokens (greedy); one warm-up burst with another system prompt first. Weights (FP16, the paged "
          f"graph's file): {weights / 2**30:.2f} GiB; KV held at the burst's peak: {kv_paged / 2**20:.0f} MiB with the "
          f"system prompt shared, {kv_unshared / 2**20:.0f} MiB without. Tokens of the two arms equal: {same}.", "",
          "| arm | burst s | tok/s | TTFT median ms | TTFT p90 ms | prompt tokens computed | device used after load MiB | "
          "device peak MiB | peak / (weights + KV held) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            md.append(f"| {name} | error: {r['error'][:200]} | | | | | | | |")
            continue
        held = weights + (kv_paged if name == "paged" else kv_unshared)
        used = r["device_peak_mib"] - r["device_used_before_load_mib"]
        md.append(f"| {name} | {r['wall_s']:.2f} | {r['tok_per_s']:.0f} | {r['ttft_median_ms']:.1f} | "
                  f"{r['ttft_p90_ms']:.1f} | {r['stats'].get('prefill_tokens_total', '-')} | "
                  f"{r['device_used_after_load_mib']:.0f} | {r['device_peak_mib']:.0f} | {used * 2**20 / held:.2f} |")
    md += ["", "Device memory is the whole device's use seen by the arm's process (CUDA context included) minus what "
           "was in use before it loaded; `peak / (weights + KV held)` divides that by the weights plus the KV the "
           "burst holds.", "", f"Reproduce: `python benchmarks/gpu_paged_serve.py --model {a.model} --out DIR`"]
    (out / "gpu_paged_serve.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
