"""Compile time and peak memory of a large decoder (issue 18: llama-1b FP32, int4 and int8 within 2 min and
2x the FP32 weight bytes of RSS on the 2-core host), each compile in its own process.

Each precision runs ``ember compile SOURCE -o DIR [--quantize ...]`` as a child process; peak RSS is
the child's ``VmHWM`` sampled every 50 ms (``ember.bench.peers.arms.run_child``), wall time its whole
run (model load, export, validation, quantization with its held-out accuracy report, engine files).
The engine folder's files and size are recorded, then the folder is removed (``--keep DIR``: kept as
``DIR/PRECISION``). The host's 1-minute load average is recorded before and after each compile, and the
compile's CPU seconds (user + system): on a shared host the wall time depends on the load, the CPU time
much less.

    python benchmarks/compile_memory.py                      # llama-1b: fp32, int4, int8 (W8A8), fp32 and int4 with
                                                             # --fused-decode on: the committed compile_llama1b.md
    python benchmarks/compile_memory.py --source gpt2-124m --precisions fp32,int4 --name compile_gpt2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402

from ember.bench.peers.arms import dir_bytes, run_child  # noqa: E402

RESULTS = Path(__file__).with_name("results")
PRECISIONS = {"fp32": [], "int4": ["--quantize", "int4"], "int8-weights": ["--quantize", "int8-weights"],
              "int8": ["--quantize", "int8"], "fp16": ["--dtype", "fp16"],
              # with the fused (GroupQueryAttention) decode part: a second graph of the same weights
              "fp32-fused": ["--fused-decode", "on"], "int4-fused": ["--quantize", "int4", "--fused-decode", "on"]}
DEFAULT_PRECISIONS = "fp32,int4,int8,fp32-fused,int4-fused"  # the committed compile_llama1b.md
TARGET_S = 120.0
TARGET_RSS_X = 2.0


def fp32_weight_bytes(source: str) -> int:
    import torch

    from ember.export.sources import is_builtin, step_model_class
    from ember.export.config import BUILTIN

    if not is_builtin(source):
        return sum(p.stat().st_size for p in Path(source).glob("*.safetensors"))
    with torch.device("meta"):
        model = step_model_class(BUILTIN[source].family)(BUILTIN[source])
    return 4 * sum(p.numel() for p in model.parameters())


def stage_times(log: Path) -> dict[str, float]:
    """``{stage: seconds}`` from the compile's progress lines (``[2/5] exporting ... / done (12.3 s)``)."""
    out, stage = {}, None
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"\[\d+/\d+\] (.*?) \.\.\.", line.strip())
        if m:
            stage = m.group(1)
        m = re.match(r"done \(([\d.]+) s\)", line.strip())
        if m and stage:
            out[stage] = float(m.group(1))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="llama-1b")
    ap.add_argument("--precisions", default=DEFAULT_PRECISIONS, help=f"comma-separated, of {', '.join(PRECISIONS)}")
    ap.add_argument("--name", default="compile_llama1b")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", default=None, help="keep each engine folder as KEEP/PRECISION (e.g. to compare bytes)")
    args = ap.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"--precisions: {bad} not among {', '.join(PRECISIONS)}")
    weights = fp32_weight_bytes(args.source)
    info = machine_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ember-compile-mem-", dir=args.workdir) as tmp:
        for p in precisions:
            out, log = (Path(args.keep) if args.keep else Path(tmp)) / p, Path(tmp) / f"{p}.log"
            load_before = os.getloadavg()[0]
            cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            cmd = [sys.executable, "-m", "ember.cli", "compile", args.source, "-o", str(out), *PRECISIONS[p]]
            t0 = time.perf_counter()
            try:
                wall, peak_mib = run_child(cmd, log, timeout_s=3600)
            except RuntimeError as e:
                rows.append({"precision": p, "failed": str(e)})
                print(f"{p}: failed: {e}", flush=True)
                continue
            cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu_s = cpu.ru_utime - cpu_before.ru_utime + cpu.ru_stime - cpu_before.ru_stime
            files = sorted(q.relative_to(out).as_posix() for q in out.rglob("*") if q.is_file())
            row = {"precision": p, "wall_s": round(wall, 1), "peak_rss_gb": round(peak_mib * 2**20 / 1e9, 2),
                   "rss_over_fp32_weights": round(peak_mib * 2**20 / weights, 2),
                   "engine_gb": round(dir_bytes(out) / 1e9, 3), "files": files, "stages_s": stage_times(log),
                   "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)], "cpu_s": round(cpu_s, 1)}
            row["meets_time"] = wall <= TARGET_S
            row["meets_rss"] = row["rss_over_fp32_weights"] <= TARGET_RSS_X
            rows.append(row)
            print(f"{p}: {row['wall_s']} s ({row['cpu_s']} CPU s), peak RSS {row['peak_rss_gb']} GB ({row['rss_over_fp32_weights']}x), "
                  f"engine {row['engine_gb']} GB ({time.perf_counter() - t0:.0f} s), load {row['load_avg_1m']}", flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    doc = {"machine": info, "source": args.source, "fp32_weight_bytes": weights, "targets":
           {"wall_s": TARGET_S, "rss_over_fp32_weights": TARGET_RSS_X}, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
    md = [f"# Compile time and peak memory: `{args.source}`", "",
          f"Machine: {machine_line(info)}", f"FP32 weights: {weights / 1e9:.2f} GB. Targets (issue 18): wall <= "
          f"{TARGET_S:.0f} s, peak RSS <= {TARGET_RSS_X:.0f}x the FP32 weight bytes. Each compile is its own process "
          f"(`ember compile {args.source} -o DIR [options]`, export validation and the quantization accuracy report on).",
          "", "| precision | wall s | CPU s | peak RSS GB | RSS / FP32 weights | engine GB | files | stages (s) | load avg before/after | time | memory |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            md.append(f"| {r['precision']} | failed: {r['failed'][:200]} |||||||||")
            continue
        stages = ", ".join(f"{k.split(' ')[0]} {v:.0f}" for k, v in r["stages_s"].items())
        md.append(f"| {r['precision']} | {r['wall_s']:.0f} | {r.get('cpu_s', float('nan')):.0f} | {r['peak_rss_gb']:.2f} | {r['rss_over_fp32_weights']:.2f}x | "
                  f"{r['engine_gb']:.2f} | {', '.join(r['files'])} | {stages} | "
                  f"{' / '.join(f'{x:.1f}' for x in r['load_avg_1m'])} | {'met' if r['meets_time'] else 'NOT met'} | "
                  f"{'met' if r['meets_rss'] else 'NOT met'} |")
    md += ["", f"Reproduce: `python benchmarks/compile_memory.py --source {args.source} --precisions {args.precisions}`"]
    (RESULTS / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {RESULTS / args.name}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
