"""Decode-step time of this checkout against an older commit, in one run (no-regression check).

Each side compiles the built-in models with its own code (``ember compile --fused-decode on``:
the step graph and the fused decode part in one folder) into a temporary folder, then a worker
process per side loads its engines with its own runtime (``decode_roofline.DecodeTimer`` from
that side's tree) and times decode steps when asked. The workers take turns in interleaved rounds
(old, new, old, new ... for every model, arm and batch), so a drift of the host's load lands on
both sides alike; only one worker runs at a time.

Also reported per model and part: whether the two sides' graphs are the same (node types,
attributes, wiring and initializer bytes): a graph that did not change runs the same on any
device, the GPU's fused decode part included.

With ``--serve``, a second section serves one workload through each side's own engine: new
workers (started after the decode workers have exited, so no side holds a model's sessions
twice) run ``ember.bench.engine_arms.run_fused`` -- the fused scheduler of ``ember bench
serve``'s 'fused' arm -- on ``--serve-requests`` requests arriving at once, prompts of
``--serve-prompt`` random tokens (seeded, no EOS), ``--serve-output`` new tokens ignoring EOS,
greedy, in the same interleaved rounds after one untimed run per side. The workload is made
once here and sent to both workers, so both serve the same prompts. Reported per model: total
wall time, output tokens/s and mean time to first token (medians over rounds), and whether the
two sides' output tokens are identical (same weights, greedy: they must be). ``--serve-only``
runs this section alone (the graphs are still compared).

    python benchmarks/commit_compare.py --old 21b657f [--models gpt2-124m llama-1b] [--batches 1 8 32] [--serve | --serve-only]
Writes benchmarks/results/commit_compare.{json,md} (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"step": False, "fused": True}  # arm -> time through the fused decode part


# -- the worker: one side's runtime ------------------------------------------------------
def step_handler(folders: dict[str, str], context: int, threads: int, max_steps: int):
    """Times decode steps (request: model, arm, batch, steps -> step seconds)."""
    from decode_roofline import DecodeTimer

    timers = {}
    for m, f in folders.items():  # one set of sessions per model: the step arm is the fused arm without its part
        fused = DecodeTimer(Path(f), context, threads, max_steps, fused=True)
        step = copy.copy(fused)
        step.decode, step.executors = None, {}
        timers[m, "fused"], timers[m, "step"] = fused, step
    return lambda q: {"times": timers[q["model"], q["arm"]](q["batch"], q["steps"])}


def serve_handler(folders: dict[str, str], threads: int):
    """Serves a workload with the fused scheduler (request: model, prompts, max_new_tokens,
    max_batch -> wall time, output tokens, TTFTs and every request's tokens). Uses only what
    both sides' ``ember.bench`` have (``BenchModel(folder, threads)``, ``run_fused``,
    ``BenchRequest``, ``ArmResult.summary``); prefill chunk and admit batch are left to the side's
    defaults for the CPU."""
    from ember.bench.engine_arms import run_fused
    from ember.bench.model import BenchModel
    from ember.bench.workload import BenchRequest

    models = {m: BenchModel(f, threads=threads) for m, f in folders.items()}

    def serve(q: dict) -> dict:
        requests = [BenchRequest(i, 0.0, ids, q["max_new_tokens"]) for i, ids in enumerate(q["prompts"])]
        res = run_fused(models[q["model"]], requests, q["max_batch"], ignore_eos=True)
        summary = res.summary()
        return {"total_s": summary["total_s"], "output_tokens": summary["output_tokens"],
                "completed": summary["completed"], "ttft_s": [r.ttft for r in res.records],
                "tokens": [r.token_ids for r in res.records], "notes": res.notes}
    return serve


def worker(root: str, section: str, folders: dict[str, str], options: dict) -> None:
    """Answer requests on stdin (one JSON line each) with one JSON line on stdout, with
    ``root``'s code on the path; ``section`` (decode or serve) picks the handler."""
    sys.path[:0] = [root, str(Path(root) / "benchmarks")]
    import ember

    assert Path(ember.__file__).resolve().is_relative_to(Path(root).resolve()), ember.__file__
    handle = step_handler(folders, **options) if section == "decode" else serve_handler(folders, **options)
    print(json.dumps({"ready": True, "ember": ember.__file__}), flush=True)
    for line in sys.stdin:
        print(json.dumps(handle(json.loads(line))), flush=True)


class Worker:
    """One side's worker process for one section (its handler's options: see ``worker``)."""

    def __init__(self, root: Path, section: str, folders: dict[str, Path], **options):
        self.root = root
        env = dict(os.environ, PYTHONPATH=str(root))
        args = json.dumps({"root": str(root), "section": section,
                           "folders": {m: str(f) for m, f in folders.items()}, "options": options})
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(root))
        hello = self._read()
        self.ember_file = hello["ember"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise RuntimeError(f"the worker running {self.root} exited with {rc}"
                               + (" (killed: out of memory?)" if rc == -9 else ""))
        return json.loads(line)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def time(self, model: str, arm: str, batch: int, steps: int) -> list[float]:
        return self.ask(model=model, arm=arm, batch=batch, steps=steps)["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def side_order(round_index: int) -> tuple[str, str]:
    """Which side goes first in a round: old on even rounds, new on odd ones."""
    return ("old", "new") if round_index % 2 == 0 else ("new", "old")


def load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# -- graphs ---------------------------------------------------------------------------
def graph_digest(path: Path) -> str:
    """A hash of a graph's nodes (type, domain, attributes, wiring), inputs, outputs and
    initializer bytes (external data read): equal digests = the same computation."""
    import onnx

    m = onnx.load(str(path))
    h = hashlib.sha256()
    for n in m.graph.node:
        attrs = sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute)
        h.update(repr((n.op_type, n.domain, list(n.input), list(n.output),
                       [(k, v if not hasattr(v, "SerializeToString") else v.SerializeToString()) for k, v in attrs])).encode())
    for v in list(m.graph.input) + list(m.graph.output):
        h.update(v.SerializeToString())
    for t in sorted(m.graph.initializer, key=lambda t: t.name):
        h.update(t.name.encode())
        h.update(onnx.numpy_helper.to_array(t).tobytes())
    return h.hexdigest()


def compile_side(root: Path, model: str, folder: Path) -> float:
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-m", "ember.cli", "compile", model, "-o", str(folder), "--fused-decode", "on",
                    "--quiet"], check=True, env=env, cwd=str(root))
    return time.perf_counter() - t


def run_decode(a, roots: dict[str, Path], folders: dict, threads: int) -> list[dict]:
    """The decode section: step times per model, arm and batch; one row each."""
    steps = max(3, -(-a.reps // a.rounds))
    workers = {s: Worker(root, "decode", folders[s], context=a.context, threads=threads, max_steps=steps)
               for s, root in roots.items()}
    times = {(s, m, arm, b): [] for s in roots for m in a.models for arm in ARMS for b in a.batches}
    try:
        for key in times:  # warm-up
            workers[key[0]].time(*key[1:], 3)
        for r in range(a.rounds):
            print(f"decode round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
            for m in a.models:
                for arm in ARMS:
                    for b in a.batches:
                        for s in side_order(r):
                            times[s, m, arm, b] += workers[s].time(m, arm, b, steps)
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for m in a.models:
        for arm in ARMS:
            for b in a.batches:
                old, new = (1e3 * float(np.median(times[s, m, arm, b])) for s in ("old", "new"))
                rows.append({"model": m, "arm": arm, "batch": b, "old_ms": old, "new_ms": new, "new_over_old": new / old,
                             "old_ms_min": 1e3 * min(times["old", m, arm, b]),
                             "new_ms_min": 1e3 * min(times["new", m, arm, b])})
    return rows


def serve_workload(a, folder: Path) -> list[list[int]]:
    """The serve section's prompts (this tree's ``make_workload``, seeded): the same for both sides."""
    from ember.bench.workload import LengthDist, WorkloadSpec, make_workload
    from ember.engine_format.manifest import read_manifest

    cfg = read_manifest(folder).model["config"]
    spec = WorkloadSpec(a.serve_requests, math.inf, LengthDist.parse(a.serve_prompt),
                        LengthDist(a.serve_output, a.serve_output), seed=a.serve_seed)
    return [r.prompt_ids for r in make_workload(spec, int(cfg["vocab_size"]), avoid_token=cfg.get("eos_token_id"))]


def run_serve(a, roots: dict[str, Path], folders: dict, threads: int) -> list[dict]:
    """The serve section: one workload per model through each side's fused scheduler; one row
    per model with every round's figures and whether the sides' tokens agree."""
    prompts = {m: serve_workload(a, folders["new"][m]) for m in a.models}
    workers = {s: Worker(root, "serve", folders[s], threads=threads) for s, root in roots.items()}
    runs = {(s, m): [] for s in roots for m in a.models}
    warm_tokens = {}
    load = [load_avg()]
    try:
        def serve(s: str, m: str) -> dict:
            return workers[s].ask(model=m, prompts=prompts[m], max_new_tokens=a.serve_output,
                                  max_batch=a.serve_requests)

        for s in roots:  # untimed: first runs of each prefill and decode shape
            for m in a.models:
                warm_tokens[s, m] = serve(s, m)["tokens"]
        for r in range(a.rounds):
            print(f"serve round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
            for m in a.models:
                for s in side_order(r):
                    runs[s, m].append(serve(s, m))
            load.append(load_avg())
    finally:
        for w in workers.values():
            w.close()
    rows = []
    for m in a.models:
        row = {"model": m, "requests": a.serve_requests, "prompt": a.serve_prompt, "output": a.serve_output,
               "load_avg_1m": load}
        for s in roots:
            rs = runs[s, m]
            row[s] = {"total_s": [x["total_s"] for x in rs], "output_tokens": [x["output_tokens"] for x in rs],
                      "completed": [x["completed"] for x in rs],
                      "ttft_mean_s": [float(np.mean(x["ttft_s"])) for x in rs],
                      "ttft_max_s": [float(np.max(x["ttft_s"])) for x in rs], "notes": rs[0]["notes"]}
            row[s]["tok_s"] = [t / w for t, w in zip(row[s]["output_tokens"], row[s]["total_s"])]
            row[s]["same_tokens_every_round"] = all(x["tokens"] == warm_tokens[s, m] for x in rs)
        for key in ("total_s", "tok_s", "ttft_mean_s"):
            for s in roots:
                row[f"{s}_{key}_median"] = float(np.median(row[s][key]))
            row[f"new_over_old_{key}"] = row[f"new_{key}_median"] / row[f"old_{key}_median"]
        row["tokens_identical"] = warm_tokens["old", m] == warm_tokens["new", m] and all(
            row[s]["same_tokens_every_round"] for s in roots)
        row["all_tokens"] = all(c == a.serve_requests for s in roots for c in row[s]["completed"]) and all(
            len(t) == a.serve_output for t in warm_tokens["new", m])
        rows.append(row)
    return rows


def decode_markdown(a, rows: list[dict], same: dict) -> list[str]:
    md = [f"Each side compiled the model with its own code (`ember compile MODEL --fused-decode on`) and times its "
          f"engine with its own runtime (`decode_roofline.DecodeTimer`: session run + KV write, {a.context} live "
          f"tokens per row), {a.reps} steps per cell in {a.rounds} interleaved rounds (old/new alternate).", "",
          "| model | arm | batch | old ms (median) | new ms (median) | new / old | old min | new min |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['arm']} | {r['batch']} | {r['old_ms']:.2f} | {r['new_ms']:.2f} | {r['new_over_old']:.3f} "
           f"| {r['old_ms_min']:.2f} | {r['new_ms_min']:.2f} |" for r in rows]
    md += ["", "Same graphs (node types, attributes, wiring, initializer bytes):", ""]
    md += [f"- {m}: " + ", ".join(f"{p} {'same' if v else 'DIFFERENT'}" for p, v in s.items()) for m, s in same.items()]
    return md


def serve_markdown(a, rows: list[dict]) -> list[str]:
    md = [f"Each side serves {a.serve_requests} requests arriving at once (prompts of {a.serve_prompt} random tokens, "
          f"seed {a.serve_seed}, {a.serve_output} new tokens each ignoring EOS, greedy) through its own fused "
          f"scheduler (`ember.bench.engine_arms.run_fused`, {a.serve_requests} slots, the side's default prefill "
          f"chunk and admit batch), in a worker of its own; one untimed run per side, then {a.rounds} interleaved "
          f"rounds (old/new alternate). Medians over rounds; TTFT = mean over the requests of first token - "
          f"arrival.", "",
          "| model | old wall s | new wall s | old tok/s | new tok/s | new / old tok/s | old TTFT ms | new TTFT ms "
          "| new / old TTFT | tokens identical |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        same = "yes" if r["tokens_identical"] else "NO"
        md.append(f"| {r['model']} | {r['old_total_s_median']:.2f} | {r['new_total_s_median']:.2f} "
                  f"| {r['old_tok_s_median']:.1f} | {r['new_tok_s_median']:.1f} | {r['new_over_old_tok_s']:.3f} "
                  f"| {1e3 * r['old_ttft_mean_s_median']:.0f} | {1e3 * r['new_ttft_mean_s_median']:.0f} "
                  f"| {r['new_over_old_ttft_mean_s']:.3f} | {same} |")
    md += ["", "Per round (old / new), output tokens/s:", ""]
    md += [f"- {r['model']}: " + ", ".join(f"{o:.1f} / {n:.1f}" for o, n in zip(r["old"]["tok_s"], r["new"]["tok_s"]))
           for r in rows]
    md += ["", "Tokens identical: every request's output tokens equal between the sides and across each side's "
           "rounds. " + "; ".join(f"{r['model']}: every request got all its tokens: "
                                  f"{'yes' if r['all_tokens'] else 'NO'}" for r in rows),
           "", "1-minute load average at the start and after each round (other jobs share the host): "
           + ", ".join(map(str, rows[0]["load_avg_1m"])) + "."]
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=False, help="the older commit (any git revision)")
    ap.add_argument("--models", nargs="+", default=["gpt2-124m", "llama-1b"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=128, help="live tokens per sequence")
    ap.add_argument("--reps", type=int, default=30, help="timed steps per side, model, arm and batch")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each section")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--serve", action="store_true", help="add the serving section (see the module docstring)")
    ap.add_argument("--serve-only", action="store_true", help="the serving section without the decode-step one")
    ap.add_argument("--serve-requests", type=int, default=16, help="requests arriving at once (and engine slots)")
    ap.add_argument("--serve-prompt", default="8:64", help="prompt length: N or LO:HI (uniform)")
    ap.add_argument("--serve-output", type=int, default=64, help="new tokens per request (EOS ignored)")
    ap.add_argument("--serve-seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "commit_compare"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        w = json.loads(a.worker)
        return worker(w["root"], w["section"], w["folders"], w["options"])
    if not a.old:
        ap.error("--old REV is required")
    a.serve = a.serve or a.serve_only
    old_rev = subprocess.run(["git", "rev-parse", "--short", a.old], cwd=ROOT, capture_output=True, text=True)
    if old_rev.returncode:
        ap.error(f"--old {a.old!r}: not a revision of this repository ({old_rev.stderr.strip()})")
    new_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    sides = {"old": old_rev.stdout.strip(), "new": new_rev + ("+changes" if dirty else "")}
    from ember.ort.session import default_threads

    threads = a.threads or default_threads()
    info = machine_info()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ember-compare-") as tmp:
        tmp = Path(tmp)
        old_root = tmp / "old-tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_root), sides["old"]], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            roots = {"old": old_root, "new": ROOT}
            folders = {s: {m: tmp / f"{s}-{m}" for m in a.models} for s in roots}
            compile_s, same = {}, {}
            for m in a.models:
                for s, root in roots.items():
                    print(f"compile {m} with {s} ({sides[s]})", file=sys.stderr, flush=True)
                    compile_s[s, m] = compile_side(root, m, folders[s][m])
                same[m] = {part: graph_digest(folders["old"][m] / part) == graph_digest(folders["new"][m] / part)
                           for part in ("step.onnx", "decode.onnx")}
                print(f"  same graphs: {same[m]}", file=sys.stderr, flush=True)
            rows = [] if a.serve_only else run_decode(a, roots, folders, threads)
            serve_rows = run_serve(a, roots, folders, threads) if a.serve else None
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_root)], cwd=ROOT, capture_output=True)
    doc = {"machine": info, "threads": threads, "sides": sides, "context": a.context, "reps": a.reps,
           "rounds": a.rounds, "compile_s": {f"{s}/{m}": round(v, 1) for (s, m), v in compile_s.items()},
           "same_graphs": same, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    if serve_rows is not None:
        doc["serve"] = {"requests": a.serve_requests, "prompt": a.serve_prompt, "output": a.serve_output,
                        "seed": a.serve_seed, "rows": serve_rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    title = "Serving" if a.serve_only else "Decode step and serving" if a.serve else "Decode step"
    md = [f"# {title}: {sides['new']} vs {sides['old']}", "",
          f"Machine: {machine_line(info)}; {threads} threads; whole run {doc['wall_s']:.0f} s.", ""]
    if a.serve_only:
        md += ["Same graphs (node types, attributes, wiring, initializer bytes): " + "; ".join(
            f"{m}: " + ", ".join(f"{p} {'same' if v else 'DIFFERENT'}" for p, v in s.items()) for m, s in same.items())]
    else:
        md += ["## Decode step", ""] + decode_markdown(a, rows, same)
    if serve_rows is not None:
        md += ["", "## Serving", ""] + serve_markdown(a, serve_rows)
    serve_args = (f" --serve{'-only' if a.serve_only else ''} --serve-requests {a.serve_requests} --serve-prompt {a.serve_prompt} "
                  f"--serve-output {a.serve_output} --serve-seed {a.serve_seed}") if a.serve else ""
    decode_args = "" if a.serve_only else f" --batches {' '.join(map(str, a.batches))} --reps {a.reps}"
    md += ["", f"Reproduce: `python benchmarks/commit_compare.py --old {sides['old']} --models {' '.join(a.models)}"
           f"{decode_args} --rounds {a.rounds}{serve_args}`"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
