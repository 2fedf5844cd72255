"""Committed serving benchmarks of the temporal fusion scheduler (issue 3, docs/design.md §8).

    flock /tmp/ember-bench.lock python benchmarks/serve.py [--only flover,poisson,compaction]

Needs ``artifacts/gpt2-124m`` (``ember compile gpt2-124m -o artifacts/gpt2-124m``). Writes
benchmarks/results/serve_<experiment>.{json,md,png}. Sizes are chosen so the whole run
takes about 15 minutes on a 2-core CPU; every ratio is measured within one run.

1. flover: Flover's setup scaled down -- 32 requests at once, 8-token prompts, 128 tokens
   (ignore EOS): fused vs concurrent instances, sequential, static batching, HF generate.
2. poisson: Poisson arrivals from light to saturating, prompts U[8,128], outputs U[16,256]:
   fused vs dynamic batching (1 s window) and static batching.
3. compaction: min-move compaction vs leaving holes, outputs U[16,512].
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from ember.bench.model import BenchModel
from ember.bench.report import markdown, write_report
from ember.bench.runner import ServeOptions, run_serve
from ember.bench.workload import LengthDist, WorkloadSpec

RESULTS = Path(__file__).parent / "results"


def flover(model: BenchModel) -> dict:
    spec = WorkloadSpec(32, math.inf, LengthDist(8, 8), LengthDist(128, 128), seed=0)
    opts = ServeOptions(max_batch=32, cap_s=30.0)
    return run_serve(model, spec, ["fused", "static", "concurrent", "sequential", "hf"], opts, name="serve_flover")


def poisson(model: BenchModel) -> dict:
    spec = WorkloadSpec(32, 1.0, LengthDist(8, 128), LengthDist(16, 256), seed=0)
    opts = ServeOptions(max_batch=16, window_s=1.0)
    return run_serve(model, spec, ["fused", "dynamic", "static"], opts, rates=[0.15, 0.5, 4.0], sizes=[8, 16, 24],
                     name="serve_poisson")


def compaction(model: BenchModel) -> dict:
    spec = WorkloadSpec(16, 4.0, LengthDist(8, 128), LengthDist(16, 512), seed=1)
    opts = ServeOptions(max_batch=8)
    return run_serve(model, spec, ["fused", "holes"], opts, name="serve_compaction")


EXPERIMENTS = {"flover": flover, "poisson": poisson, "compaction": compaction}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default="artifacts/gpt2-124m")
    ap.add_argument("--only", default=",".join(EXPERIMENTS), help="comma list of: " + ", ".join(EXPERIMENTS))
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    model = BenchModel(a.folder)
    t0 = time.perf_counter()
    for name in a.only.split(","):
        doc = EXPERIMENTS[name.strip()](model)
        for p in write_report(doc, Path(a.out) / doc["name"]):
            print(f"wrote {p}", file=sys.stderr)
        print(markdown(doc))
    print(f"all done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
