"""Prefix caching on the CPU: N requests behind one shared system prompt, slot layout vs paged KV.

One random-weight folder (the built-in ``gpt2-124m`` shape unless ``--folder``), loaded twice:
``slots`` (today's pool: every request prefills its whole prompt) and ``paged`` (``kv_layout=
"paged"``: full blocks of the system prompt are computed once and shared). In each engine one
request first runs alone with the system prompt (it fills the cache of the paged engine, as
earlier traffic would; the slot engine only warms up), then ``--requests`` requests, each the
system prompt + its own ``--suffix`` tokens, are submitted at once, greedy, ``--new-tokens``
each. Reported per layout: time to first token (median, max over the requests, from
submission), total wall time of the batch, prompt tokens computed. One run, no repetition:
run on a quiet host for numbers.

    python benchmarks/prefix_cache.py [--folder F] [--requests 16] [--system 200] [--suffix 16]
        [--new-tokens 16] [--block-size 16] [--out benchmarks/results]
Writes prefix_cache_cpu.{json,md} under ``--out``.
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


def run_layout(folder: Path, layout: str, prompts: list[list[int]], warm: list[int], args) -> dict:
    import ember

    opts = {"kv_layout": layout, "kv_block_size": args.block_size} if layout == "paged" else {}
    with ember.load(folder, max_batch=len(prompts), verify="size", threads=args.threads, **opts) as eng:
        eng.submit(warm, max_new_tokens=2, ignore_eos=True).result(timeout=600)
        before = eng.stats()
        t0 = time.perf_counter()
        handles = [eng.submit(p, max_new_tokens=args.new_tokens, ignore_eos=True) for p in prompts]
        results = [h.result(timeout=3600) for h in handles]
        total = time.perf_counter() - t0
        st = eng.stats()
    ttft = [c.ttft for c in results]
    row = {"layout": layout, "ttft_median_s": statistics.median(ttft), "ttft_max_s": max(ttft), "total_s": total,
           "tokens": [c.token_ids for c in results]}
    if layout == "paged":
        row.update(prompt_tokens_computed=st["prefill_tokens_total"] - before["prefill_tokens_total"],
                   prefix_cache_hit_rate=st["prefix_cache_hit_rate"], preemptions=st["preemptions_total"])
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
        warm = system + [7]
        rows = [run_layout(folder, layout, prompts, warm, args) for layout in ("slots", "paged")]
    same = rows[0].pop("tokens") == rows[1].pop("tokens")
    report = {"benchmark": "prefix_cache_cpu", "machine": info, "machine_line": machine_line(info),
              "model": str(args.folder or "gpt2-124m (built-in shape, random weights)"),
              "requests": args.requests, "system_tokens": args.system, "suffix_tokens": args.suffix,
              "new_tokens": args.new_tokens, "block_size": args.block_size, "same_tokens": same, "rows": rows,
              "ttft_median_speedup": rows[0]["ttft_median_s"] / rows[1]["ttft_median_s"],
              "total_speedup": rows[0]["total_s"] / rows[1]["total_s"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefix_cache_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Prefix caching on the CPU: slots vs paged ({report['model']})", "",
             f"Machine: {report['machine_line']}", "",
             f"{args.requests} requests submitted at once, each a shared {args.system}-token system prompt + "
             f"{args.suffix} own tokens, {args.new_tokens} greedy tokens; the system prompt ran once before "
             f"(one request) in both engines. Block size {args.block_size}. One run. Same tokens in both "
             f"layouts: {same}.", "",
             "| layout | TTFT median (s) | TTFT max (s) | total (s) | prompt tokens computed |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['ttft_median_s']:.3f} | {r['ttft_max_s']:.3f} | {r['total_s']:.3f} | "
                     f"{r['prompt_tokens_computed']} |")
    lines += ["", f"TTFT median: {report['ttft_median_speedup']:.2f}x faster paged; total: "
                  f"{report['total_speedup']:.2f}x.", ""]
    (args.out / "prefix_cache_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
