"""Where batch-1 time to first token and decode time go on the GPU (issue 19's ttft1 targets):
host work vs device kernels, for the paged engine (PagedAttention step graph) and the slot engine
(step graph + fused GroupQueryAttention decode part), in one process, on one compiled folder
(``ember compile SOURCE --dtype fp16 --paged on``; ``gpu_paged_serve.py`` builds one in its workdir).

Per arm:
  engine    TTFT (submit -> first token, ``ember.bench.peers.runners.EmberRunner``) and decode
            ms/token, median of ``--requests`` batch-1 requests after ``--warm``
  kernels   the same requests under ``torch.profiler`` (CUPTI sees ONNX Runtime's kernels too):
            device kernel time and kernel count per prefill (requests of one new token) and per
            decoded token, the busy share of the wall time, and the kernels that take the most
  raw       (paged) the session call alone (``PagedGraphExecutor.launch_paged`` of one prompt on
            spare blocks): host launch time, and launch to logits on the host; the plain and the
            CUDA-graph decode call the same way
  batches   (``--decode-batches``) B requests at once, decode ms/token once every row decodes (median
            over the requests), paged vs slots: issue 19's "decode at batch 1-128 no slower than the
            fused part"; ``--only-batches`` runs this section alone
  genai     (``--genai-folder``) ONNX Runtime GenAI in a process of its own (no torch there):
            ``append_tokens`` of the prompt and the first ``generate_next_token``, each timed
Writes OUT/NAME.{json,md}. Device:
    python benchmarks/gpu_paged_profile.py --folder artifacts/pw/.../ember-fp16-paged-fp16-kv --out $OUT
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_SEED = 11


def prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    r = np.random.default_rng(seed)
    return [r.integers(3, vocab, length).tolist() for _ in range(n)]


def kernel_table(prof, per: int) -> dict:
    """Device kernels of a profile: time and count per unit (``per`` units in the window), the busy
    share of the window, the 12 costliest kernels by total time."""
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time_total > 0
               and "Memcpy" not in e.name and "Memset" not in e.name]
    copies = [e for e in prof.events() if e.device_type.name == "CUDA" and ("Memcpy" in e.name or "Memset" in e.name)]
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_name[e.name].append(e.device_time_total)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:12]
    total_us = sum(e.device_time_total for e in kernels)
    return {"kernel_ms_per_unit": total_us / 1e3 / per, "kernels_per_unit": len(kernels) / per,
            "copies_per_unit": len(copies) / per, "copy_ms_per_unit": sum(e.device_time_total for e in copies) / 1e3 / per,
            "top": [{"kernel": name[:90], "calls_per_unit": len(t) / per, "us_per_unit": sum(t) / per,
                     "us_per_call": sum(t) / len(t)} for name, t in top]}


def profile_engine(eng, vocab: int, a) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ember.bench.peers.runners import EmberRunner

    runner = EmberRunner.over(eng)
    warm = prompts(vocab, a.warm, a.prompt, PROMPT_SEED)
    timed = prompts(vocab, a.requests, a.prompt, PROMPT_SEED + 1)
    for p in warm:
        runner.generate([p], a.new)
    runs = [runner.generate([p], a.new)[0] for p in timed]
    out = {"ttft_ms": 1e3 * statistics.median(t.ttft for t in runs),
           "decode_ms_per_token": 1e3 * statistics.median(t.decode_s_per_step for t in runs)}
    n = min(5, a.requests)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        firsts = [runner.generate([p], 1)[0].ttft for p in timed[:n]]
        wall = time.perf_counter() - t0
    out["prefill"] = {"ttft_ms_profiled": 1e3 * statistics.median(firsts), "wall_ms_per_request": 1e3 * wall / n,
                      **kernel_table(prof, n)}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t, _ = runner.generate([timed[0]], a.new + 1)
    dec = kernel_table(prof, a.new + 1)  # the prefill's kernels are in the window: subtracted below
    pre = out["prefill"]
    out["decode"] = {"ms_per_token": 1e3 * t.decode_s_per_step,
                     "kernel_ms_per_token": (dec["kernel_ms_per_unit"] * (a.new + 1) - pre["kernel_ms_per_unit"]) / a.new,
                     "kernels_per_token": (dec["kernels_per_unit"] * (a.new + 1) - pre["kernels_per_unit"]) / a.new,
                     "top": dec["top"]}
    return out


def batch_decode(eng, vocab: int, a) -> dict:
    """Decode ms/token with B requests at once, for each B of ``--decode-batches`` (a warm-up burst first)."""
    from ember.runtime.requests import SamplingParams

    params = SamplingParams(max_new_tokens=a.new, ignore_eos=True, temperature=0.0)
    out = {}
    for b in a.decode_batches:
        runs = []
        for k in range(2):  # warm-up, then timed (captures its graphs first)
            hs = [eng.submit(p, params) for p in prompts(vocab, b, a.prompt, PROMPT_SEED + 100 * b + k)]
            runs = [h.result(timeout=600) for h in hs]
        # steps after the last row's first token: every row decodes
        start = max(c.token_times[0] for c in runs)
        per = [(c.token_times[-1] - max(start, c.token_times[0])) / sum(t > start for t in c.token_times)
               for c in runs if sum(t > start for t in c.token_times) > 0]
        out[str(b)] = {"decode_ms_per_token": 1e3 * statistics.median(per), "requests": b,
                       "tok_per_s": b / statistics.median(per)}
    return out


def raw_paged_calls(eng, vocab: int, a) -> dict:
    """The paged session's own call time, on blocks past every request's (the engine is idle)."""
    import torch

    ex = eng.executor
    bs = ex.block_size
    need = -(-(a.prompt + 2) // bs)
    blocks = np.arange(ex.num_blocks - need, ex.num_blocks, dtype=np.int32)[None, :]
    ids = np.asarray(prompts(vocab, 1, a.prompt, PROMPT_SEED + 7)[0], np.int64)[None, :]

    def call(tokens, past, n):
        pos = past + np.arange(n)[None, :]
        return ex.launch_paged(tokens, pos, np.array([past]), np.array([n]), blocks)

    def timed(fn, reps=20):
        launch, total = [], []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pending = fn()
            t1 = time.perf_counter()
            pending.result()
            t2 = time.perf_counter()
            launch.append(t1 - t0)
            total.append(t2 - t0)
        return {"launch_ms": 1e3 * statistics.median(launch), "to_tokens_ms": 1e3 * statistics.median(total)}

    out = {"prefill": timed(lambda: call(ids, 0, a.prompt))}
    one = ids[:, :1]
    out["decode_graph"] = timed(lambda: call(one, a.prompt, 1))
    status = ex.session.cuda_graph_status
    ex.session.cuda_graph_status = "off"  # the same call, plainly launched
    out["decode_plain"] = timed(lambda: call(one, a.prompt, 1))
    ex.session.cuda_graph_status = status
    return out


GENAI_CHILD = r"""
import json, statistics, sys, time
import numpy as np
import onnxruntime_genai as og
folder, prompt_json, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
ps = json.load(open(prompt_json))
model = og.Model(folder)
app, first, dec = [], [], []
for k, p in enumerate(ps):
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(p) + new, min_length=len(p) + new, batch_size=1)
    gen = og.Generator(model, params)
    t0 = time.perf_counter(); gen.append_tokens(np.asarray([p], dtype=np.int32)); t1 = time.perf_counter()
    gen.generate_next_token(); gen.get_next_tokens(); t2 = time.perf_counter()
    steps = []
    for _ in range(new - 1):
        gen.generate_next_token(); gen.get_next_tokens(); steps.append(time.perf_counter())
    del gen
    if k >= 3:
        app.append(t1 - t0); first.append(t2 - t1); dec.append((steps[-1] - t2) / (new - 1))
print(json.dumps({"append_tokens_ms": 1e3 * statistics.median(app), "first_next_token_ms": 1e3 * statistics.median(first),
                  "ttft_ms": 1e3 * statistics.median(a + b for a, b in zip(app, first)),
                  "decode_ms_per_token": 1e3 * statistics.median(dec)}))
"""


def genai_section(folder: Path, vocab: int, a, work: Path) -> dict:
    ps = prompts(vocab, 3, a.prompt, PROMPT_SEED) + prompts(vocab, a.requests, a.prompt, PROMPT_SEED + 1)
    pj = work / "genai_prompts.json"
    pj.write_text(json.dumps(ps))
    r = subprocess.run([sys.executable, "-c", GENAI_CHILD, str(folder), str(pj), str(a.new)],
                       capture_output=True, text=True, timeout=900)
    if r.returncode:
        return {"error": r.stderr[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(doc: dict) -> str:
    lines = [f"# Batch-1 prefill and decode, where the time goes -- {doc['device']}", "",
             f"Folder: `{doc['folder']}`; prompts of {doc['prompt']} tokens, {doc['new']} new tokens, "
             f"median of {doc['requests']} requests after {doc['warm']}. Kernel times from torch.profiler (CUPTI), "
             "per prefill (requests of one new token, 5 of them) and per decoded token.", "",
             "| arm | TTFT ms | prefill kernel ms | kernels / prefill | H2D/D2H copies / prefill | decode ms/token | "
             "decode kernel ms/token | kernels / token |", "|---|---|---|---|---|---|---|---|"]
    for arm, r in doc["arms"].items():
        if "error" in r:
            lines.append(f"| {arm} | error: {r['error'][:200]} |")
            continue
        if "prefill" not in r:
            continue
        p, d = r["prefill"], r["decode"]
        lines.append(f"| {arm} | {r['ttft_ms']:.2f} | {p['kernel_ms_per_unit']:.2f} | {p['kernels_per_unit']:.0f} | "
                     f"{p['copies_per_unit']:.0f} | {r['decode_ms_per_token']:.2f} | {d['kernel_ms_per_token']:.2f} | "
                     f"{d['kernels_per_token']:.0f} |")
    batches = {arm: r["batches"] for arm, r in doc["arms"].items() if "batches" in r}
    if batches:
        sizes = sorted({int(b) for r in batches.values() for b in r})
        lines += ["", "Decode ms/token with B requests at once (every row decoding; median over the requests):", "",
                  "| arm | " + " | ".join(f"B={b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for arm, r in batches.items():
            lines.append(f"| {arm} | " + " | ".join(f"{r[str(b)]['decode_ms_per_token']:.2f}" if str(b) in r else "-"
                                                 for b in sizes) + " |")
        if {"paged", "slots"} <= batches.keys():
            lines.append("| paged / slots | " + " | ".join(
                f"{batches['paged'][str(b)]['decode_ms_per_token'] / batches['slots'][str(b)]['decode_ms_per_token']:.2f}x"
                for b in sizes) + " |")
        lines.append("")
    g = doc.get("genai")
    if g and "error" not in g:
        lines.append(f"| onnxruntime-genai | {g['ttft_ms']:.2f} (append_tokens {g['append_tokens_ms']:.2f} + first "
                     f"token {g['first_next_token_ms']:.2f}) | - | - | - | {g['decode_ms_per_token']:.2f} | - | - |")
    elif g:
        lines.append(f"| onnxruntime-genai | error: {g['error'][-300:]} |")
    raw = doc["arms"].get("paged", {}).get("raw")
    if raw:
        lines += ["", "Paged session calls alone (`launch_paged`, engine idle): host launch / launch to tokens on the host, ms", "",
                  "| call | launch | to tokens |", "|---|---|---|"]
        lines += [f"| {k} | {v['launch_ms']:.3f} | {v['to_tokens_ms']:.3f} |" for k, v in raw.items()]
    for arm, r in doc["arms"].items():
        if "error" in r or "prefill" not in r:
            continue
        for phase in ("prefill", "decode"):
            lines += ["", f"### {arm}: costliest kernels per {'prefill' if phase == 'prefill' else 'decoded token'}", "",
                      "| kernel | calls | us | us per call |", "|---|---|---|---|"]
            lines += [f"| `{t['kernel']}` | {t['calls_per_unit']:.1f} | {t['us_per_unit']:.1f} | {t['us_per_call']:.1f} |"
                      for t in r[phase]["top"]]
    lines += ["", f"Reproduce: `{doc['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", required=True, help="a folder compiled with --dtype fp16 --paged on")
    ap.add_argument("--genai-folder", default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--arms", default="paged,slots")
    ap.add_argument("--decode-batches", default="", type=lambda t: [int(x) for x in t.split(",") if x.strip()],
                    help="comma list of B: decode ms/token with B requests at once (e.g. 16,64,128)")
    ap.add_argument("--only-batches", action="store_true", help="run the --decode-batches section alone")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="gpu_paged_profile")
    a = ap.parse_args()
    import torch

    import ember
    from ember.engine_format.manifest import read_manifest

    folder = Path(a.folder)
    vocab = int(read_manifest(folder).model["config"]["vocab_size"])
    doc = {"device": torch.cuda.get_device_name(0), "folder": str(folder), "prompt": a.prompt, "new": a.new,
           "requests": a.requests, "warm": a.warm, "arms": {},
           "command": "python benchmarks/gpu_paged_profile.py " + " ".join(sys.argv[1:])}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for arm in a.arms.split(","):
        try:
            r = {}
            if not a.only_batches:
                with ember.load(folder, device="cuda:0", max_batch=16, kv_layout=arm) as eng:
                    r = profile_engine(eng, vocab, a)
                    r["stats"] = {k: v for k, v in eng.stats().items() if isinstance(v, (int, float, str))}
                    if arm == "paged":
                        r["raw"] = raw_paged_calls(eng, vocab, a)
            if a.decode_batches:
                with ember.load(folder, device="cuda:0", max_batch=max(a.decode_batches), kv_layout=arm) as eng:
                    r["batches"] = batch_decode(eng, vocab, a)
                    r["batch_stats"] = {k: v for k, v in eng.stats().items() if isinstance(v, (int, float, str))}
            doc["arms"][arm] = r
        except Exception as e:  # noqa: BLE001 -- reported; the other arms still run
            import traceback

            doc["arms"][arm] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(json.dumps({arm: {k: v for k, v in doc["arms"][arm].items()
                                if k in ("ttft_ms", "decode_ms_per_token", "batches", "error")}}), flush=True)
    if a.genai_folder:
        doc["genai"] = genai_section(Path(a.genai_folder), vocab, a, out)
        (out / "genai_prompts.json").unlink(missing_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(doc, indent=1))
    (out / f"{a.name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
