"""Block-wise int4 on the GPU, in one run: Ember FP16 vs Ember int4 (MatMulNBits, fused decode part)
vs ONNX Runtime GenAI int4 and fp16, same random-weight TinyLlama-shape folder (issue 18).

Arms:
  Ember FP16            ``compile_decoder(--dtype fp16)``: step graph + fused decode part (GroupQueryAttention)
  Ember int4 / int8     each ``--variants`` entry (``int4-b32``, ``int4-b32-sym``, ``int4-b128``, ``int8-b32``...):
                        the FP16 folder's step graph through the same quantization stage as
                        ``ember compile --dtype fp16 --quantize ...`` (``quantize_step_graph``, accuracy report
                        included) and the fused decode part rebuilt by ``fused_decode_part`` (MatMulNBits,
                        checked against the quantized step graph), without exporting the model again (one
                        process per variant); each timed with ONNX Runtime's fpA_intB (CUTLASS weight-only)
                        kernels off and on (``ORT_FPA_INTB_GEMM`` at session creation, ``--fpa``)
  ONNX Runtime GenAI    its model builder (``-p int4|fp16 -e cuda``; ``int4|fp32 -e cpu`` with ``--provider cpu``),
                        built while Ember compiles, decoded through its Generator in a process of its own
                        (``ember.bench.peers.worker``); skipped with the reason where ``onnxruntime_genai`` is
                        not importable
Builds overlap one another; timing starts once every build is done, one arm at a time, so no arm shares
the host with a build.
Metrics, per arm:
  engine b1 ms/token, b16 / b64 decode tok/s: ``ember.load(..., device)`` + ``submit``, timed per token step as
      the peers benchmark times every engine (``ember.bench.peers.timing``; GenAI the same way)
  step ms at batch 1/16/64 (CUDA): the runtime's decode step (``gpu_roofline.time_decode``: the fused part +
      argmax + tokens to the host, CUDA graphs) and the session alone (CUDA events), ``--live`` tokens per row
  top-1 vs FP16: teacher-forced on Ember FP16's greedy tokens (16 rows, prefill + 32 decode steps through the
      fused part); ``decisive`` = rows whose FP16 top-1 leads by > 4x the rms logit difference
Writes ``NAME.json`` + ``NAME.md`` to ``--out`` (default: $OUT, else benchmarks/results), the device named.

H200 (the lead's run):  python benchmarks/gpu_int4.py
CPU smoke (any host):   python benchmarks/gpu_int4.py --provider cpu --shape smoke
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import machine_info, machine_line  # noqa: E402

from ember.bench.peers.runners import EmberRunner  # noqa: E402

VARIANTS = {  # name -> CompileOptions fields on top of --dtype fp16
    "int4-b32": {"quantize": "int4", "block_size": 32},
    "int4-b32-sym": {"quantize": "int4", "block_size": 32, "symmetric": True},
    "int4-b64": {"quantize": "int4", "block_size": 64},
    "int4-b128": {"quantize": "int4", "block_size": 128},
    "int4-b128-sym": {"quantize": "int4", "block_size": 128, "symmetric": True},
    # the LM head quantized too, as ONNX Runtime GenAI's int4 builder does (like-for-like with its int4 arm)
    "int4-b32-head": {"quantize": "int4", "block_size": 32, "quantize_lm_head": True},
    "int4-b32-sym-head": {"quantize": "int4", "block_size": 32, "symmetric": True, "quantize_lm_head": True},
    "int8-b32": {"quantize": "int8-weights", "block_size": 32},
    "int8-b32-sym": {"quantize": "int8-weights", "block_size": 32, "symmetric": True},
}
GENAI_PRECISIONS = {"cuda": ("int4", "fp16"), "cpu": ("int4", "fp32")}
FPA_ENV = "ORT_FPA_INTB_GEMM"  # ONNX Runtime's switch for its CUTLASS fpA_intB MatMulNBits kernels (CUDA, FP16)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- compile ------------------------------------------------------------------------------
def derive_quantized(fp16: Path, src, dst: Path, fields: dict, validate: bool) -> dict:
    """Engine folder ``dst``: ``fp16``'s step graph (exported from ``src``) through the quantization
    stage of ``compile_decoder`` and a fused decode part built by ``fused_decode_part``, both with
    ``CompileOptions(dtype='fp16', **fields)``; the rest of the manifest is ``fp16``'s."""
    import onnx

    from ember.compiler import compile as cc
    from ember.engine_format import manifest as mf
    from ember.engine_format.writer import atomic_folder, write_manifest
    from ember.compiler.quantize_step import quantize_step_graph
    from ember.export.onnx_export import save_onnx
    from ember.progress import StageLog

    options = cc.CompileOptions(dtype="fp16", validate=validate, **fields)
    m = mf.read_manifest(fp16)
    t0 = time.perf_counter()
    with atomic_folder(dst) as tmp:
        stages = StageLog(total=1, quiet=False, stream=sys.stdout)
        proto = onnx.load(str(fp16 / cc.STEP_FILE))  # the FP16 step graph, weights loaded
        proto, quant_info = quantize_step_graph(proto, src, options, tmp, stages)
        files = save_onnx(proto, tmp / cc.STEP_FILE)
        del proto
        parts = [cc._build_part(tmp, "step", tmp / cc.STEP_FILE, files, options, max_past=src.config.max_positions)]
        part, _ = cc.fused_decode_part(src, tmp, options, stages)
        parts.append(part)
        shutil.copytree(fp16 / mf.TOKENIZER_DIR, tmp / mf.TOKENIZER_DIR)
        m.parts, m.quantization = parts, quant_info
        m.extra = {**m.extra, "options": cc.options_record(options), "derived_from": str(fp16)}
        write_manifest(tmp, m)
    return {"seconds": round(time.perf_counter() - t0, 1), "summary": quant_info["summary"],
            "accuracy": quant_info["accuracy"], "decode": part.extra["quantization"]["summary"],
            "decode_check": part.extra["quantization"]["check"]}


_SOURCE: dict = {}  # the deriving process's torch model, loaded once


def derive_job(fp16: str, hf: str, dst: str, fields: dict, validate: bool) -> dict:
    """``derive_quantized`` in the deriving process (spawned: no CUDA state inherited)."""
    from ember.export.sources import resolve_decoder_source

    if hf not in _SOURCE:
        _SOURCE[hf] = resolve_decoder_source(hf)
    return derive_quantized(Path(fp16), _SOURCE[hf], Path(dst), fields, validate)


# -- ONNX Runtime GenAI ---------------------------------------------------------------------
@dataclass
class GenAIBuild:
    """ONNX Runtime GenAI's model builder running in the background (it loads the HF model in torch
    and quantizes on the CPU)."""

    precision: str
    proc: subprocess.Popen
    log: Path
    started: float

    @staticmethod
    def start(hf: Path, out: Path, precision: str, ep: str, work: Path) -> "GenAIBuild":
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf), "-o", str(out),
               "-p", precision, "-e", ep, "-c", str(work / f"genai-{precision}.cache")]
        log_path = work / f"genai-{precision}.build.log"
        with open(log_path, "w") as logf:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return GenAIBuild(precision, proc, log_path, time.perf_counter())

    def wait(self, timeout_s: float) -> float:
        """Seconds the build took; RuntimeError with the log's last line if it failed."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise RuntimeError(f"the GenAI builder ran past {timeout_s:.0f} s (log: {self.log})") from None
        if rc != 0:
            tail = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            raise RuntimeError(f"the GenAI builder exited {rc}: {tail[0][:300] if tail else ''} (log: {self.log})")
        return time.perf_counter() - self.started


def genai_run(path: Path, work: Path, slug: str, workload: dict, timeout_s: float) -> dict:
    """One ``ember.bench.peers.worker run`` of the GenAI folder at ``workload['batch']``."""
    from ember.bench.peers.arms import run_child

    job = {"engine": "onnxruntime-genai", "hf": "", "out": str(path), "peer_precision": "", "options": {},
           "workload": workload, "result": str(work / f"{slug}.result.json")}
    (work / f"{slug}.job.json").write_text(json.dumps(job))
    run_child([sys.executable, "-m", "ember.bench.peers.worker", "run", str(work / f"{slug}.job.json")],
              work / f"{slug}.run.log", timeout_s)
    return json.loads(Path(job["result"]).read_text())


# -- Ember timing ---------------------------------------------------------------------------
def workload_prompts(w: dict) -> tuple[list[int], list[list[int]], list[int]]:
    """The prompts ``ember.bench.peers.worker.run`` draws for ``w``: every arm decodes the same ids."""
    rng = np.random.default_rng(w["seed"])
    ids = lambda n: rng.integers(1, w["vocab_size"], n).tolist()  # noqa: E731 - 0 is the eos id
    return ids(w["prompt_len"]), [ids(w["prompt_len"]) for _ in range(w["batch"])], ids(w["pp_len"])


def engine_timings(eng, workloads: list[dict]) -> dict:
    """b1 ms/token and decode tok/s per workload batch, timed as the peers benchmark times every engine."""
    from ember.bench.peers import timing as tm

    runner = EmberRunner.over(eng)
    out: dict = {}
    for w in workloads:
        p1, pb, _ = workload_prompts(w)
        runner.generate([p1], 4), runner.generate(pb, 2)  # warm-up: first-call allocations, CUDA graph captures
        if "b1_ms_per_token" not in out:
            b1 = [runner.generate([p1], w["new_tokens"]) for _ in range(w["reps"])]
            out["b1_ms_per_token"] = tm.b1_ms_per_token([t for t, _ in b1])
            out["b1_tokens"] = b1[-1][1]
        bb = [runner.generate(pb, w["new_tokens"])[0] for _ in range(w["reps"])]
        out[f"b{w['batch']}_tok_s"] = tm.batch_tok_s(bb)[0]
    return out


def teacher_forced(executor, prompts: np.ndarray, steps: int, forced: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Prefill ``prompts`` [R, P] then ``steps`` one-token steps through ``executor`` (the fused
    decode part where the folder has one), feeding ``forced`` [R, steps] (or its own argmax).
    Returns (tokens fed [R, steps], logits [steps + 1, R, V])."""
    pool = executor.pool
    pool.lengths[:] = 0
    rows, plen = prompts.shape
    ids, pos, new = prompts, np.tile(np.arange(plen, dtype=np.int64), (rows, 1)), np.full(rows, plen, np.int64)
    fed, logits = [], []
    for s in range(steps + 1):
        out = np.asarray(executor.run(0, ids, pos, new), np.float32)
        logits.append(out)
        if s == steps:
            break
        nxt = forced[:, s] if forced is not None else out.argmax(-1)
        fed.append(nxt)
        ids, pos, new = nxt.reshape(rows, 1).astype(np.int64), (pos[:, -1:] + 1).astype(np.int64), np.ones(rows, np.int64)
    for r in range(rows):
        executor.release(r)
    return np.stack(fed, 1), np.stack(logits)


def agreement_vs(ref_logits: np.ndarray, got: np.ndarray) -> dict:
    """Top-1 agreement of ``got`` with ``ref_logits`` (same teacher-forced inputs), overall and on
    the decisive rows (reference top-1 lead > 4x the rms logit difference: random weights have
    many near-ties, which any perturbation flips)."""
    ref, got = ref_logits.reshape(-1, ref_logits.shape[-1]), got.reshape(-1, got.shape[-1])
    hit = ref.argmax(-1) == got.argmax(-1)
    top2 = np.sort(ref, -1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    rms = float(np.sqrt(np.mean((ref - got) ** 2)))
    decisive = gap > 4 * rms
    return {"top1": float(hit.mean()), "rows": int(hit.size), "decisive_rows": int(decisive.sum()),
            "top1_decisive": float(hit[decisive].mean()) if decisive.any() else None,
            "logits_rel_error_max": float(np.abs(ref - got).max() / np.abs(ref).max())}


def time_ember_arm(folder: Path, device: str, workloads: list[dict], vocab: int, args, ref: dict | None) -> dict:
    """One Ember folder on ``device``: engine timings, teacher-forced logits, step timings (CUDA)."""
    import ember

    row: dict = {}
    with ember.load(folder, device=device, max_batch=max(*args.batches, args.agree_rows)) as eng:
        ex = eng.executor
        decode = getattr(ex, "decode", None)
        row["fused_decode"] = decode is not None
        row["cuda_graph"] = getattr(decode, "cuda_graph_status", None)
        # the executor driven directly while the engine has had no request (its thread never touches it)
        rng = np.random.default_rng(2)
        prompts = rng.integers(1, vocab, (args.agree_rows, 16)).astype(np.int64)
        fed, logits = teacher_forced(ex, prompts, args.agree_steps, None if ref is None else ref["fed"])
        row["_teacher"] = {"fed": fed, "logits": logits}
        row.update(engine_timings(eng, workloads))
        if device.startswith("cuda"):  # the pool is laid out once (fused decode part): nothing moves it meanwhile
            import gpu_roofline

            cfg = json.loads((folder / "manifest.json").read_text())["model"]["config"]
            row["steps"] = [gpu_roofline.time_decode(ex, cfg, b, args.live, steps=args.steps) for b in args.batches]
    if ref is not None:
        row["agreement_vs_fp16"] = agreement_vs(ref["logits"], row["_teacher"]["logits"])
    return row


def _timed_arm(arm: str, folder: Path, fpa: str | None, device: str, workloads: list[dict], vocab: int, args,
               ref: dict | None) -> dict:
    """``time_ember_arm`` with ``ORT_FPA_INTB_GEMM`` set to ``fpa`` for the sessions' creation (None: as found)."""
    before = os.environ.get(FPA_ENV)
    try:
        if fpa is not None:
            os.environ[FPA_ENV] = fpa
        return {"arm": arm, "engine": "ember", **time_ember_arm(folder, device, workloads, vocab, args, ref)}
    except Exception as e:  # noqa: BLE001 - one failing arm is reported, the others still run
        return {"arm": arm, "engine": "ember", "skipped": f"failed: {type(e).__name__}: {e}"[:500]}
    finally:
        if before is None:
            os.environ.pop(FPA_ENV, None)
        else:
            os.environ[FPA_ENV] = before
        free_device()


def free_device() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def save_partial(out: str, name: str, rows: list[dict]) -> None:
    """The rows so far as ``NAME.partial.json`` (a run cut short by its time limit keeps its timed arms);
    removed once the full report is written."""
    path = Path(out) / f"{name}.partial.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1, default=str))
    tmp.replace(path)


# -- report ---------------------------------------------------------------------------------
def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(doc: dict) -> str:
    a = doc["args"]
    batches = [b for b in a["batches"] if b != 1]
    head = (["arm", "b1 ms/token"] + [f"b{b} tok/s" for b in batches]
            + [f"step ms b{b}" for b in a["batches"]] + ["top-1 vs FP16 (decisive)", "engine MB", "build s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["arms"]:
        if r.get("skipped"):
            continue
        steps = {s["batch"]: s for s in r.get("steps") or []}
        agree = r.get("agreement_vs_fp16")
        cells = [r["arm"], _f(r.get("b1_ms_per_token"), ".2f")] + [_f(r.get(f"b{b}_tok_s"), ",.0f") for b in batches]
        cells += [(f"{steps[b]['step_s_median'] * 1e3:.2f} ({steps[b]['session_s_median'] * 1e3:.2f})"
                   if b in steps else "-") for b in a["batches"]]
        cells.append("-" if not agree else f"{agree['top1']:.3f} ({_f(agree['top1_decisive'], '.3f')})")
        cells += [_f(r.get("engine_mb"), ".0f"), _f(r.get("build_s"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [r for r in doc["arms"] if r.get("skipped")]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {r['arm']}: {r['skipped']}" for r in skipped]
    partial = [f"- {r['arm']} {k[:-len('_failed')]}: {v}" for r in doc["arms"] for k, v in r.items() if k.endswith("_failed")]
    if partial:
        lines += ["", "Not measured:"] + partial
    return "\n".join(lines)


def verdicts(doc: dict) -> list[str]:
    """The issue's GPU targets, from this run's rows (engine timings; step timings where the row has them)."""
    arms = {r["arm"]: r for r in doc["arms"] if not r.get("skipped")}
    fp16 = arms.get("Ember FP16")
    int4 = [r for r in arms.values() if r["engine"] == "ember" and r.get("quantize") == "int4"]
    genai = next((r for r in arms.values() if r["engine"] == "onnxruntime-genai" and r["precision"] == "int4"), None)
    if not fp16 or not int4:
        return ["(no verdict: the Ember FP16 or int4 arm did not run)"]
    best = min(int4, key=lambda r: r["b1_ms_per_token"])
    top = max(doc["args"]["batches"])
    best_tp = max(int4, key=lambda r: r.get(f"b{top}_tok_s") or 0)
    out = [f"- int4 b1 (best: {best['arm']}): {best['b1_ms_per_token']:.2f} ms/token = "
           f"{best['b1_ms_per_token'] / fp16['b1_ms_per_token']:.2f}x Ember FP16's {fp16['b1_ms_per_token']:.2f} "
           f"(target <= 0.70x): {'met' if best['b1_ms_per_token'] <= 0.7 * fp16['b1_ms_per_token'] else 'NOT met'}"]
    s16, s4 = {s["batch"]: s for s in fp16.get("steps") or []}, {s["batch"]: s for s in best.get("steps") or []}
    if 1 in s16 and 1 in s4:
        out.append(f"- same, runtime decode step: {s4[1]['step_s_median'] * 1e3:.3f} vs {s16[1]['step_s_median'] * 1e3:.3f} ms "
                   f"({s4[1]['step_s_median'] / s16[1]['step_s_median']:.2f}x); session alone "
                   f"{s4[1]['session_s_median'] / s16[1]['session_s_median']:.2f}x")
    if genai:
        out.append(f"- vs ONNX Runtime GenAI int4's {genai['b1_ms_per_token']:.2f} ms/token: "
                   f"{'met' if best['b1_ms_per_token'] <= genai['b1_ms_per_token'] else 'NOT met'}")
    else:
        out.append("- vs ONNX Runtime GenAI int4: not measured (arm skipped)")
    tp16, tp4 = fp16.get(f"b{top}_tok_s"), best_tp.get(f"b{top}_tok_s")
    if tp16 and tp4:
        out.append(f"- b{top} throughput (best: {best_tp['arm']}): {tp4:,.0f} vs FP16 {tp16:,.0f} tok/s "
                   f"({tp4 / tp16:.2f}x, target >= 1.00x): {'met' if tp4 >= tp16 else 'NOT met'}")
    return out


# -- main -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--shape", default="tinyllama", help="random-weight folder shape (ember.bench.peers.folder.SHAPES)")
    ap.add_argument("--variants", default="int4-b32,int4-b32-sym,int4-b128",
                    help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--fpa", choices=("off", "on", "both"), default="both",
                    help=f"time quantized arms with {FPA_ENV}=0, =1 or both (CUDA only)")
    ap.add_argument("--genai", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--live", type=int, default=128, help="live tokens per row of the step timings")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per batch of the step timings")
    ap.add_argument("--agree-rows", type=int, default=16)
    ap.add_argument("--agree-steps", type=int, default=32)
    ap.add_argument("--validate", action="store_true", help="also check the exports against torch (slower)")
    ap.add_argument("--derive-jobs", type=int, default=3, help="quantized variants derived at once (processes)")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).with_name("results")))
    ap.add_argument("--name", default=None, help="file stem (default: gpu_int4_<device>, gpu_int4_cpu_<shape> on CPU)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants: {bad} not among {', '.join(VARIANTS)}")
    cuda = args.provider == "cuda"
    device = "cuda:0" if cuda else "cpu"
    fpa_modes = {"off": ["0"], "on": ["1"], "both": ["0", "1"]}[args.fpa] if cuda else [None]
    t_start = time.perf_counter()

    from ember.bench.peers.arms import dir_bytes
    from ember.bench.peers.folder import SHAPES, save_random_llama

    if args.shape not in SHAPES:
        ap.error(f"--shape {args.shape!r} is not one of {', '.join(SHAPES)}")
    info = machine_info()
    gpu = None
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--provider cuda: torch sees no CUDA device (use --provider cpu for a smoke run)")
        gpu = torch.cuda.get_device_name(0)
        info.update(gpu=gpu, torch=torch.__version__, torch_cuda=torch.version.cuda)
    slug = ("h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.split()[-1].lower()) if gpu else f"cpu_{args.shape}"
    name = args.name or f"gpu_int4_{slug}"
    genai_reason = None if importlib.util.find_spec("onnxruntime_genai") else "onnxruntime_genai is not importable here"
    if genai_reason is None:
        from importlib.metadata import version

        info["onnxruntime_genai"] = version("onnxruntime-genai-cuda" if cuda and _has_dist("onnxruntime-genai-cuda")
                                            else "onnxruntime-genai")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ember-gpu-int4-", dir=args.workdir) as tmp:
        work = Path(tmp)
        hf = save_random_llama(args.shape, work / "hf")
        cfg = json.loads((hf / "config.json").read_text())
        workloads = [{"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": b, "pp_len": 64,
                      "reps": args.reps, "threads": None, "seed": 0, "vocab_size": cfg["vocab_size"]}
                     for b in args.batches if b != 1]
        genai_builds = {}
        if args.genai and genai_reason is None:  # in the background, while Ember compiles
            for p in GENAI_PRECISIONS[args.provider]:
                genai_builds[p] = GenAIBuild.start(hf, work / f"genai-{p}", p, args.provider, work)

        try:
            # Ember FP16; then the quantized variants from its exported graph, each derived in a process of its own
            # (beside the GenAI builds); nothing is timed until every build is done, so no arm shares the host
            from ember.compiler.compile import CompileOptions, compile_decoder

            fp16 = work / "ember-fp16"
            t0 = time.perf_counter()
            compile_decoder(str(hf), fp16, CompileOptions(dtype="fp16", validate=args.validate))
            arms: list[tuple[str, Path, dict | None, dict]] = [("Ember FP16", fp16, None,
                                                               {"quantize": None, "build_s": time.perf_counter() - t0})]
            with ProcessPoolExecutor(max_workers=max(1, min(len(variants), args.derive_jobs)),
                                     mp_context=multiprocessing.get_context("spawn")) as deriver:
                jobs = {v: deriver.submit(derive_job, str(fp16), str(hf), str(work / f"ember-{v}"), VARIANTS[v],
                                          args.validate) for v in variants}
                for v, job in jobs.items():
                    try:
                        compiled = job.result()
                    except Exception as e:  # noqa: BLE001 - one failing variant is reported, the others still run
                        rows.append({"arm": f"Ember {v}", "engine": "ember", "skipped": f"failed: {type(e).__name__}: {e}"[:500]})
                        continue
                    arms.append((f"Ember {v}", work / f"ember-{v}", VARIANTS[v],
                                 {"quantize": VARIANTS[v]["quantize"], "build_s": compiled.pop("seconds"), "compile": compiled}))
            genai_built = {}
            for p, build in genai_builds.items():
                try:
                    genai_built[p] = build.wait(args.timeout_s)
                except RuntimeError as e:
                    genai_built[p] = e
            log(f"== builds done (t={time.perf_counter() - t_start:.0f} s)")

            ref = None
            for label, folder, fields, meta in arms:
                for fpa in ([None] if fields is None else fpa_modes):
                    arm = label + ("" if fpa is None else f" (fpA_intB {'on' if fpa == '1' else 'off'})")
                    log(f"== {arm} (t={time.perf_counter() - t_start:.0f} s)")
                    row = _timed_arm(arm, folder, fpa, device, workloads, cfg["vocab_size"], args, ref)
                    if row.get("skipped"):
                        rows.append(row)
                        continue
                    teacher = row.pop("_teacher")
                    if fields is None:  # Ember FP16: the reference of every other arm
                        ref = teacher
                    row.update(precision=(fields or {}).get("quantize") or "fp16", fpa_intb=fpa,
                               engine_mb=dir_bytes(folder) / 1e6, **meta)
                    rows.append(row)
                    log(f"   {json.dumps({k: v for k, v in row.items() if k not in ('steps', 'b1_tokens', 'compile')}, default=str)[:400]}")
                    save_partial(args.out, name, rows)

            for p in GENAI_PRECISIONS[args.provider]:
                arm = f"ONNX Runtime GenAI {p}"
                if genai_reason or not args.genai:
                    rows.append({"arm": arm, "engine": "onnxruntime-genai", "precision": p,
                                 "skipped": genai_reason or "--no-genai"})
                    continue
                log(f"== {arm} (t={time.perf_counter() - t_start:.0f} s)")
                try:
                    if isinstance(genai_built[p], Exception):
                        raise genai_built[p]
                    row = {"arm": arm, "engine": "onnxruntime-genai", "precision": p, "build_s": genai_built[p]}
                    row["engine_mb"] = dir_bytes(work / f"genai-{p}") / 1e6
                    for w in workloads:
                        try:
                            res = genai_run(work / f"genai-{p}", work, f"genai-{p}-b{w['batch']}", w, args.timeout_s)
                        except RuntimeError as e:  # e.g. its Generator caps batch_size (0.18: 32)
                            row[f"b{w['batch']}_failed"] = str(e)[:300]
                            continue
                        row.setdefault("b1_ms_per_token", res["b1_ms_per_token"])
                        row.setdefault("b1_tokens", res["b1_tokens"])
                        row[f"b{w['batch']}_tok_s"] = res["batch_decode_tok_s"]
                    if "b1_ms_per_token" not in row:
                        raise RuntimeError("; ".join(v for k, v in row.items() if k.endswith("_failed")))
                except Exception as e:  # noqa: BLE001
                    row = {"arm": arm, "engine": "onnxruntime-genai", "precision": p, "skipped": f"failed: {e}"[:500]}
                rows.append(row)
                log(f"   {json.dumps({k: v for k, v in row.items() if k != 'b1_tokens'}, default=str)[:400]}")
                save_partial(args.out, name, rows)
        finally:  # a build left running (a failure above) must not outlive its folder
            for build in genai_builds.values():
                if build.proc.poll() is None:
                    build.proc.kill()

    from ember.bench.peers.timing import agreement

    fp16_row = next((r for r in rows if r["arm"] == "Ember FP16" and not r.get("skipped")), None)
    for r in rows:
        if not r.get("skipped") and fp16_row:
            r["greedy_b1_vs_ember_fp16"] = agreement(r.get("b1_tokens") or [], fp16_row["b1_tokens"])
    doc = {"machine": info, "device": gpu or f"CPU: {info['cpu']}", "model": f"random-weight LLaMA, shape {args.shape!r}: "
           f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, heads {cfg['num_attention_heads']}/"
           f"{cfg.get('num_key_value_heads')} kv, vocab {cfg['vocab_size']}", "args": vars(args), "arms": rows,
           "total_s": round(time.perf_counter() - t_start, 1)}
    doc["verdicts"] = verdicts(doc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / f"{name}.partial.json").unlink(missing_ok=True)
    smoke = "" if cuda and args.shape == "tinyllama" else " (SMOKE RUN: its numbers say nothing about the GPU targets)"
    md = [f"# Block-wise int4 on {doc['device']}{smoke}", "",
          f"Machine: {machine_line(info)}" + (f"; GPU {gpu}, torch {info.get('torch')}" if gpu else ""),
          f"Model: {doc['model']}",
          f"Engine timings: prompts of {args.prompt_len} random ids, {args.new_tokens} new tokens, greedy, median of "
          f"{args.reps}; decode only (after each prompt's first token). Step ms: the runtime's decode step with "
          f"{args.live} live tokens per row, CUDA graphs (in brackets: the session alone). top-1 vs FP16: teacher-forced "
          f"on Ember FP16's greedy tokens, {args.agree_rows} rows x {args.agree_steps + 1} predictions.", "",
          markdown(doc), "", "Targets (issue 18):", *doc["verdicts"], "",
          f"Total run {doc['total_s']:.0f} s. Reproduce: `python benchmarks/gpu_int4.py "
          f"{' '.join(a for a in (argv or sys.argv[1:]))}`"]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _has_dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
