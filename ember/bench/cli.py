"""``ember bench serve artifacts/NAME`` (Ember's fused scheduler against batching baselines) and
``ember bench paged artifacts/NAME`` (issue 19's workloads: the slot KV layout against the paged
one) from the command line."""
from __future__ import annotations

import argparse
import math
import shlex
from pathlib import Path

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
    s = sub.add_parser("serve", help="serving benchmark: Ember's fused scheduler vs batching baselines "
                                     "(issue 19's slots-vs-paged workloads: ember bench paged)")
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
    _add_paged(sub)


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


PAGED_DESCRIPTION = """\
Issue 19's serving workloads on a compiled folder: the slot KV layout against the paged one
(kv_layout='paged': a pool of --kv-block-size-token blocks with prefix caching), each arm in a
process of its own, one after another. Greedy, EOS ignored.

  burst   --requests prompts at once behind a shared --system-token prompt: slots vs paged
          (--kv-memory: the paged arm's pool)
  prefix  --prefix-requests prompts behind one --prefix-system-token system prompt: paged with
          the prefix cache on and off (one pool that holds every request unshared), and slots;
          TTFT median off / on (issue 19's target: >= 5)
  mixed   --mixed-requests prompts of U[--mixed-prompt] tokens, U[--mixed-output] new tokens,
          all at once, under one KV budget in bytes (--mixed-slots slot rows x the longest
          request, which is also the paged arm's pool): peak running sequences and output
          tok/s, paged / slots (targets: >= 3, >= 1.3)
  ttft1   --ttft-requests requests one at a time: TTFT and decode ms/token of slots, paged and
          ONNX Runtime GenAI (--genai-folder; skipped with the reason without one)

Sizes default to issue 19's with --device cuda:N, and to a smoke run's with --device cpu (it
fits llama-tiny's 256 positions); every size has a flag. The budgets follow the folder's own
KV geometry and its slot KV dtype. On CUDA the paged arms run the folder's paged step graph
(`ember compile SOURCE --dtype fp16 --paged on`); without it they are skipped with that reason.
On the CPU they run the step graph over gathered blocks.

`ember bench serve` is the other harness (its own arms and arrival-rate workloads, one
process). benchmarks/gpu_paged_serve.py runs this same code on random-weight folders it builds."""


def _add_paged(sub) -> None:
    from ember.bench.paged_workloads import WORKLOADS, size_arguments

    p = sub.add_parser("paged", help="issue 19's workloads (burst, prefix, mixed, ttft1): slot vs paged KV",
                       description=PAGED_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a compiled decoder folder (artifacts/NAME)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    p.add_argument("--genai-folder", default=None,
                   help="ONNX Runtime GenAI's folder of the same model, for ttft1's GenAI arm (skipped without one)")
    p.add_argument("--timeout-s", type=float, default=900, help="per arm (default 900)")
    p.add_argument("-o", "--output", default=None, help="write STEM.json and STEM.md")
    size_arguments(p)
    p.set_defaults(func=_cmd_paged)


def _cmd_paged(a) -> int:
    from ember.bench.paged_report import markdown
    from ember.bench.paged_serve import PagedRun, genai_missing, make_log, run_workloads, write_report
    from ember.bench.paged_workloads import parse_workloads, size_flags, sizes_from_arguments

    workloads = tuple(parse_workloads(a.workloads))
    genai = Path(a.genai_folder) if a.genai_folder else None
    if genai is not None and not (genai / "genai_config.json").is_file():
        raise InputError(f"--genai-folder {genai}: no genai_config.json there; give the folder ONNX Runtime GenAI's "
                         f"model builder wrote (python -m onnxruntime_genai.models.builder ... -o FOLDER)")
    skipped = None
    if "ttft1" in workloads:
        skipped = genai_missing() or (None if genai else "no --genai-folder given")
    run = PagedRun(Path(a.folder), workloads, sizes_from_arguments(a, a.device), a.device, genai, skipped,
                   timeout_s=a.timeout_s)
    command = ["ember", "bench", "paged", a.folder, "--device", a.device, "--workloads", ",".join(workloads),
               *size_flags(a), *(["--genai-folder", str(genai)] if genai else [])]
    doc = run_workloads(run, {"command": shlex.join(command), "model_note": f"{a.folder}: "},
                        make_log("ember bench paged"))
    if a.output:
        for p in write_report(doc, Path(a.output)):
            print(f"wrote {p}")
    print(markdown(doc))
    return 0
