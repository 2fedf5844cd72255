"""``ember bench serve artifacts/NAME``: the serving benchmark from the command line."""
from __future__ import annotations

import math

from ember.errors import InputError


def _rates(text: str) -> list[float]:
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        try:
            out.append(math.inf if t in ("inf", "burst") else float(t))
        except ValueError:
            raise InputError(f"--rate {text!r}: write numbers in req/s separated by commas, 'inf' = all at once") from None
    return out


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks")
    sub = p.add_subparsers(dest="bench_command", required=True)
    s = sub.add_parser("serve", help="serving benchmark: Ember's fused scheduler vs batching baselines")
    s.add_argument("folder", help="a compiled decoder folder (artifacts/NAME)")
    s.add_argument("--arms", default="fused,static,dynamic,sequential",
                   help="comma list of: fused, holes, static, dynamic, concurrent, sequential, hf")
    s.add_argument("-n", "--num-requests", type=int, default=32)
    s.add_argument("--rate", default="inf", help="req/s, comma list for a sweep; inf = all at once")
    s.add_argument("--sizes", default=None, help="requests per rate of a sweep (comma list; default -n)")
    s.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"])
    s.add_argument("--gamma-cv", type=float, default=2.0, help="gap coefficient of variation (gamma)")
    s.add_argument("--prompt-len", default="8", help="N (fixed) or LO:HI (uniform)")
    s.add_argument("--output-len", default="128", help="N (fixed) or LO:HI (uniform)")
    s.add_argument("--no-ignore-eos", action="store_true", help="stop requests at EOS (default: ignore EOS)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-batch", type=int, default=32, help="fused slots = static/dynamic/hf batch size")
    s.add_argument("--prefill-chunk", type=int, default=None,
                   help="fused arm's prompt tokens per iteration (default: the runtime's, 128 on the CPU)")
    s.add_argument("--admit-batch", type=int, default=None,
                   help="fused arm's admission batching (default: the runtime's, 1 on the CPU)")
    s.add_argument("--window", type=float, default=1.0, help="dynamic batching window (s)")
    s.add_argument("--cap", type=float, default=None,
                   help="time cap (s) per sequential/concurrent/hf arm; total time is then extrapolated")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("-o", "--output", default=None, help="write STEM.json/.md/.png")
    s.add_argument("--name", default="serve")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_serve)


def _cmd_serve(a) -> int:
    from ember.bench.model import BenchModel
    from ember.bench.report import markdown, write_report
    from ember.bench.runner import ServeOptions, run_serve
    from ember.bench.workload import LengthDist, WorkloadSpec

    rates = _rates(a.rate)
    sizes = [int(x) for x in a.sizes.split(",")] if a.sizes else None
    spec = WorkloadSpec(num_requests=a.num_requests, rate=rates[0], prompt_len=LengthDist.parse(a.prompt_len),
                        output_len=LengthDist.parse(a.output_len), arrival=a.arrival, gamma_cv=a.gamma_cv,
                        seed=a.seed, ignore_eos=not a.no_ignore_eos)
    opts = ServeOptions(max_batch=a.max_batch, prefill_chunk=a.prefill_chunk, admit_batch=a.admit_batch,
                        window_s=a.window, cap_s=a.cap)
    model = BenchModel(a.folder, threads=a.threads)
    doc = run_serve(model, spec, [x.strip() for x in a.arms.split(",") if x.strip()], opts, rates=rates,
                    sizes=sizes, name=a.name, show_progress=not a.quiet)
    if a.output:
        for p in write_report(doc, a.output):
            print(f"wrote {p}")
    print(markdown(doc))
    return 0
