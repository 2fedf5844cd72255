"""Prefix caching on the CPU: N requests behind one shared system prompt, slot layout vs paged KV.

One random-weight folder (the built-in ``gpt2-124m`` shape unless ``--folder``), loaded twice:
``slots`` (today's pool: every request prefills its whole prompt) and ``paged`` (``kv_layout=
"paged"``: full blocks of the system prompt are computed once and shared). ``--requests``
requests, each the system prompt + its own ``--suffix`` tokens, are submitted at once, greedy,
``--new-tokens`` each, in three runs (a fresh engine each, warmed up by an unrelated request):
``slots``; ``paged cold``: the system prompt is new, the burst's first request computes it and
the others wait for its blocks; ``paged warm``: one request with the system prompt ran before,
as earlier traffic would have. Reported: time to first token (median, max over the requests,
from submission), total wall time of the burst, prompt tokens computed. One run each, no
repetition: run on a quiet host for numbers.

    python benchmarks/prefix_cache.py [--folder F] [--requests 16] [--system 200] [--suffix 16]
        [--new-tokens 16] [--block-size 16] [--out benchmarks/results]
Writes prefix_cache_cpu.{json,md} under ``--out``. Without ``--folder`` it compiles the
built-in ``gpt2-124m`` shape (random weights) into a temporary folder first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line  # noqa: E402


def compiled_folder(name: str, root: Path) -> Path:
    from ember.compiler.compile import CompileOptions, compile_decoder

    out = root / name
    compile_decoder(name, out, CompileOptions(quiet=True))
    return out


def run_layout(folder: Path, name: str, prompts: list[list[int]], warm: list[int], args) -> dict:
    """One burst on a fresh engine; ``warm``: the request run alone first."""
    import ember

    opts = {"kv_layout": "paged", "kv_block_size": args.block_size} if name.startswith("paged") else {}
    with ember.load(folder, max_batch=len(prompts), verify="size", threads=args.threads, **opts) as eng:
        eng.submit(warm, max_new_tokens=2, ignore_eos=True).result(timeout=600)
        before = eng.stats()
        t0 = time.perf_counter()
        handles = [eng.submit(p, max_new_tokens=args.new_tokens, ignore_eos=True) for p in prompts]
        results = [h.result(timeout=3600) for h in handles]
        total = time.perf_counter() - t0
        st = eng.stats()
    ttft = [c.ttft for c in results]
    row = {"layout": name, "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft), "total_s": total,
           "tokens": [c.token_ids for c in results]}
    if opts:
        row.update(prompt_tokens_computed=st["prefill_tokens_total"] - before["prefill_tokens_total"],
                   prefix_cache_hit_rate=st["prefix_cache_hit_rate"], preemptions=st["preemptions_total"],
                   prefix_waits=st["prefix_waits_total"])
    else:
        row["prompt_tokens_computed"] = sum(len(p) for p in prompts)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=None, help="a compiled decoder folder (default: compile gpt2-124m)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--system", type=int, default=200, help="shared system prompt tokens")
    ap.add_argument("--suffix", type=int, default=16, help="each request's own tokens after the system prompt")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or compiled_folder("gpt2-124m", Path(tmp))
        rng = np.random.default_rng(0)
        system = rng.integers(1, 500, args.system).tolist()
        prompts = [system + rng.integers(1, 500, args.suffix).tolist() for _ in range(args.requests)]
        unrelated = rng.integers(1, 500, 8).tolist()
        rows = [run_layout(folder, "slots", prompts, unrelated, args),
                run_layout(folder, "paged cold", prompts, unrelated, args),
                run_layout(folder, "paged warm", prompts, system + [7], args)]
    tokens = [r.pop("tokens") for r in rows]
    same = all(t == tokens[0] for t in tokens)
    model = args.folder.name if args.folder else "gpt2-124m"
    report = {"benchmark": "prefix_cache_cpu", "machine": info, "machine_line": machine_line(info),
              "model": f"{model} (random weights)" if model in ("gpt2-124m", "gpt2-tiny") else model,
              "requests": args.requests, "system_tokens": args.system, "suffix_tokens": args.suffix,
              "new_tokens": args.new_tokens, "block_size": args.block_size, "same_tokens": same, "rows": rows,
              "ttft_median_speedup": {r["layout"]: rows[0]["ttft_median_s"] / r["ttft_median_s"] for r in rows[1:]},
              "total_speedup": {r["layout"]: rows[0]["total_s"] / r["total_s"] for r in rows[1:]}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Prefix caching on the CPU: slots vs paged ({report['model']})", "",
             f"Machine: {report['machine_line']}; 1-min load average at start "
             f"{info['load_avg_1m_at_start']:.1f} (other work on the host slows every run alike only roughly).", "",
             f"{args.requests} requests submitted at once, each a shared {args.system}-token system prompt + "
             f"{args.suffix} own tokens, {args.new_tokens} greedy tokens, max_batch {args.requests}. paged cold: "
             f"the system prompt is new; paged warm: one request with it ran before. Block size "
             f"{args.block_size}. One run each. Same tokens in every run: {same}.", "",
             "| run | TTFT median (s) | TTFT max (s) | total (s) | prompt tokens computed | TTFT median vs slots |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        gain = report["ttft_median_speedup"].get(r["layout"])
        lines.append(f"| {r['layout']} | {r['ttft_median_s']:.3f} | {r['ttft_max_s']:.3f} | {r['total_s']:.3f} | "
                     f"{r['prompt_tokens_computed']} | {'' if gain is None else f'{gain:.2f}x'} |")
    lines.append("")
    (args.out / "prefix_cache_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
