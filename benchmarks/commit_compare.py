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

    python benchmarks/commit_compare.py --old 21b657f [--models gpt2-124m llama-1b] [--batches 1 8 32]
Writes benchmarks/results/commit_compare.{json,md} (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
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
def worker(root: str, folders: dict[str, str], context: int, threads: int, max_steps: int) -> None:
    """Serve timing requests on stdin (one JSON line each: model, arm, batch, steps), answer
    one JSON line of step seconds on stdout, with ``root``'s code on the path."""
    sys.path[:0] = [root, str(Path(root) / "benchmarks")]
    import ember
    from decode_roofline import DecodeTimer

    assert Path(ember.__file__).resolve().is_relative_to(Path(root).resolve()), ember.__file__
    timers = {}
    for m, f in folders.items():  # one set of sessions per model: the step arm is the fused arm without its part
        fused = DecodeTimer(Path(f), context, threads, max_steps, fused=True)
        step = copy.copy(fused)
        step.decode, step.executors = None, {}
        timers[m, "fused"], timers[m, "step"] = fused, step
    print(json.dumps({"ready": True, "ember": ember.__file__}), flush=True)
    for line in sys.stdin:
        q = json.loads(line)
        times = timers[q["model"], q["arm"]](q["batch"], q["steps"])
        print(json.dumps({"times": times}), flush=True)


class Worker:
    def __init__(self, root: Path, folders: dict[str, Path], context: int, threads: int, max_steps: int):
        self.root = root
        env = dict(os.environ, PYTHONPATH=str(root))
        args = json.dumps({"root": str(root), "folders": {m: str(f) for m, f in folders.items()},
                           "context": context, "threads": threads, "max_steps": max_steps})
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(root))
        hello = self._read()
        self.ember_file = hello["ember"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            raise RuntimeError(f"the worker timing {self.root} exited with {rc}"
                               + (" (killed: out of memory?)" if rc == -9 else ""))
        return json.loads(line)

    def time(self, model: str, arm: str, batch: int, steps: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"model": model, "arm": arm, "batch": batch, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=False, help="the older commit (any git revision)")
    ap.add_argument("--models", nargs="+", default=["gpt2-124m", "llama-1b"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=128, help="live tokens per sequence")
    ap.add_argument("--reps", type=int, default=30, help="timed steps per side, model, arm and batch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "commit_compare"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        w = json.loads(a.worker)
        return worker(w["root"], w["folders"], w["context"], w["threads"], w["max_steps"])
    if not a.old:
        ap.error("--old REV is required")
    old_rev = subprocess.run(["git", "rev-parse", "--short", a.old], cwd=ROOT, capture_output=True, text=True)
    if old_rev.returncode:
        ap.error(f"--old {a.old!r}: not a revision of this repository ({old_rev.stderr.strip()})")
    new_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    sides = {"old": old_rev.stdout.strip(), "new": new_rev + ("+changes" if dirty else "")}
    from ember.ort.session import default_threads

    threads = a.threads or default_threads()
    steps = max(3, -(-a.reps // a.rounds))
    info = machine_info()
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
            workers = {s: Worker(root, folders[s], a.context, threads, steps) for s, root in roots.items()}
            times = {(s, m, arm, b): [] for s in roots for m in a.models for arm in ARMS for b in a.batches}
            try:
                for key in times:  # warm-up
                    workers[key[0]].time(*key[1:], 3)
                for r in range(a.rounds):
                    print(f"round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
                    for m in a.models:
                        for arm in ARMS:
                            for b in a.batches:
                                for s in (("old", "new") if r % 2 == 0 else ("new", "old")):
                                    times[s, m, arm, b] += workers[s].time(m, arm, b, steps)
            finally:
                for w in workers.values():
                    w.close()
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_root)], cwd=ROOT, capture_output=True)
    rows = []
    for m in a.models:
        for arm in ARMS:
            for b in a.batches:
                old, new = (1e3 * float(np.median(times[s, m, arm, b])) for s in ("old", "new"))
                rows.append({"model": m, "arm": arm, "batch": b, "old_ms": old, "new_ms": new, "new_over_old": new / old,
                             "old_ms_min": 1e3 * min(times["old", m, arm, b]),
                             "new_ms_min": 1e3 * min(times["new", m, arm, b])})
    doc = {"machine": info, "threads": threads, "sides": sides, "context": a.context, "reps": a.reps,
           "rounds": a.rounds, "compile_s": {f"{s}/{m}": round(v, 1) for (s, m), v in compile_s.items()},
           "same_graphs": same, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    md = [f"# Decode step: {sides['new']} vs {sides['old']}", "",
          f"Machine: {machine_line(info)}; {threads} threads.",
          f"Each side compiled the model with its own code (`ember compile MODEL --fused-decode on`) and times its "
          f"engine with its own runtime (`decode_roofline.DecodeTimer`: session run + KV write, {a.context} live "
          f"tokens per row), {a.reps} steps per cell in {a.rounds} interleaved rounds (old/new alternate).", "",
          "| model | arm | batch | old ms (median) | new ms (median) | new / old | old min | new min |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['arm']} | {r['batch']} | {r['old_ms']:.2f} | {r['new_ms']:.2f} | {r['new_over_old']:.3f} "
           f"| {r['old_ms_min']:.2f} | {r['new_ms_min']:.2f} |" for r in rows]
    md += ["", "Same graphs (node types, attributes, wiring, initializer bytes):", ""]
    md += [f"- {m}: " + ", ".join(f"{p} {'same' if v else 'DIFFERENT'}" for p, v in s.items()) for m, s in same.items()]
    md += ["", f"Reproduce: `python benchmarks/commit_compare.py --old {sides['old']} --models {' '.join(a.models)} "
           f"--batches {' '.join(map(str, a.batches))}`"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
