"""Paged KV serving on the GPU (issue 19's "Must show" serving numbers), in one run: the slot engine
(step graph + fused GroupQueryAttention decode part, CUDA graphs) against the paged engine
(``kv_layout="paged"``: the paged step graph alone, PagedAttention over a block pool, prefix
caching), and ONNX Runtime GenAI at batch 1.

Workloads (``--workloads``, default all; sizes and arms: ``ember/bench/paged_workloads.py``):
  burst   requests at once behind a shared system prompt: slots vs paged
  prefix  64 requests behind a 1,024-token system prompt: paged with prefix caching on vs off, and
          slots; TTFT median / p90 and off / on (target >= 5x)
  mixed   prompts U[16, 2048], outputs U[16, 512], all at once, one KV budget in bytes (the slot arm's
          max_batch x longest request x bytes per token = the paged arm's kv_memory): peak running
          sequences (``running_peak``) and output tok/s, paged / slots (targets >= 3x, >= 1.3x);
          ``--mixed-kv-dtype int8,fp8`` adds paged arms with quantized KV pools (a folder compiled
          with ``--kv-dtype`` each: twice the tokens in the same bytes on CUDA; on the CPU the host
          executor keeps FP16 pools, so the smoke run only exercises the harness)
  ttft1   batch-1 requests one after another: TTFT and decode ms/token for slots, paged and ONNX
          Runtime GenAI (skipped with the reason where ``onnxruntime_genai`` is not importable)
Every arm runs in a process of its own (clean device memory; peak device memory as nvidia-smi sees
it: ``torch.cuda.mem_get_info`` polled every 20 ms). One failing arm or workload is reported and
the rest still run; the results are rewritten after every workload.

Weights: a built-in LLaMA config (``--model``) is written as a random-weight Hugging Face folder
(``ember.bench.peers.folder``) with ``max_positions`` raised to what the workloads need (llama-1b:
2,048 -> 2,560 for the mixed workload), compiled once (``--dtype fp16 --paged on``) and, for ttft1,
given to ONNX Runtime GenAI's model builder (``gpu_int4.GenAIBuild``, in the background while Ember
compiles; nothing is timed before it is done). The folders are kept in ``--workdir`` for reruns.

    python benchmarks/gpu_paged_serve.py --out $OUT                      # llama-1b, every workload
    python benchmarks/gpu_paged_serve.py --device cpu --out /tmp/smoke   # llama-tiny, smoke sizes
Writes OUT/NAME.json and OUT/NAME.md (NAME: gpu_paged_serve_<model>_<h100|h200|cpu>).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.bench.paged_workloads import (GENAI, SIZES, WORKLOADS, Arm, LengthDist, Sizes, derived,  # noqa: E402
                                         kv_held_tokens, markdown, memory_ratio, parse_workloads, plan_arms,
                                         run_burst, run_sequential)

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu_paged_serve t={time.perf_counter() - T0:.0f}s] {msg}", flush=True)


# -- one arm, in its own process ------------------------------------------------------------
class DeviceMemory:
    """The whole device's use (nvidia-smi's view: ONNX Runtime's arena is outside torch's count),
    polled every 20 ms from a thread; nothing on the CPU."""

    def __init__(self, device: str):
        self.on_gpu = device.startswith("cuda")
        if self.on_gpu:
            import torch

            self.torch = torch
        self.before = self.used()
        self.peak, self.loaded = self.before, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def used(self) -> int:
        if not self.on_gpu:
            return 0
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.02)

    def report(self) -> dict:
        self._stop.set()
        self._thread.join()
        out = {"device_used_before_load_mib": self.before / 2**20, "device_peak_mib": self.peak / 2**20}
        if self.loaded is not None:
            out["device_used_after_load_mib"] = self.loaded / 2**20
        if self.on_gpu:
            out["gpu"] = self.torch.cuda.get_device_name()
        return out


def arm_process(folder: str, genai_folder: str | None, workload: str, arm: Arm, device: str, q) -> None:
    tag = f"[{workload} / {arm.name}]"
    try:
        t0 = time.perf_counter()
        if arm.engine == GENAI:  # no torch here: its CUDA libraries stay out of GenAI's process
            from ember.bench.peers.runners import OrtGenAIRunner

            runner = OrtGenAIRunner(genai_folder, 1, None)
            print(f"  {tag} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
            res = run_sequential(runner, arm.warm, arm.timed)
        else:
            import ember
            from ember.bench.peers.runners import EmberRunner

            mem = DeviceMemory(device)
            with ember.load(folder, device=device, **arm.load) as eng:
                mem.loaded = mem.used()
                print(f"  {tag} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
                t1 = time.perf_counter()
                res = (run_sequential(EmberRunner.over(eng), arm.warm, arm.timed) if arm.sequential
                       else run_burst(eng, arm.warm, arm.timed))
                res["stats"] = {k: v for k, v in eng.stats().items() if isinstance(v, (int, float))}
                print(f"  {tag} ran in {time.perf_counter() - t1:.1f} s", flush=True)
            res.update(mem.report())
        res["load"] = {k: v for k, v in arm.load.items()}
        q.put(res)
    except Exception as e:  # reported; the other arms still run
        import traceback

        q.put({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})


def run_arm(folder: Path, genai_folder: Path | None, workload: str, arm: Arm, device: str, timeout_s: float) -> dict:
    """``arm_process`` in a spawned process; an error dict if it fails, dies or runs past ``timeout_s``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    genai = str(genai_folder) if genai_folder else None
    p = ctx.Process(target=arm_process, args=(str(folder), genai, workload, arm, device, q))
    p.start()
    deadline = time.monotonic() + timeout_s
    res = None
    while res is None:
        try:
            res = q.get(timeout=2)
        except queue.Empty:
            if not p.is_alive():
                try:
                    res = q.get(timeout=1)
                except queue.Empty:
                    res = {"error": f"the arm's process exited with code {p.exitcode} and no result"}
            elif time.monotonic() > deadline:
                p.kill()
                res = {"error": f"ran past --timeout-s {timeout_s:.0f}"}
    p.join(timeout=60)
    if p.is_alive():
        p.kill()
    return res


# -- the engines ----------------------------------------------------------------------------
def prepare(args, sizes: Sizes, workloads: list[str], cuda: bool) -> dict:
    """The Hugging Face folder, Ember's compiled folder and (for ttft1) ONNX Runtime GenAI's, in
    ``--workdir`` (reused when there); returns their paths, the build times and why GenAI is skipped."""
    from dataclasses import replace

    from ember.bench.peers.folder import save_random_llama_config
    from ember.export.config import BUILTIN
    from ember.export.sources import is_builtin

    out: dict = {"genai_skipped": None, "genai_folder": None}
    if is_builtin(args.model):
        base = BUILTIN[args.model]
        positions = max(base.max_positions, sizes.positions(WORKLOADS))  # every workload's: one folder for any subset
        work = Path(args.workdir or tempfile.gettempdir()) / f"ember_paged_workloads_{args.model}_p{positions}"
        hf = work / "hf"
        if not (hf / "config.json").exists():
            log(f"writing a random-weight Hugging Face folder of {args.model} with {positions} positions")
            save_random_llama_config(replace(base, max_positions=positions), hf)
    else:
        hf = Path(args.model)
        work = Path(args.workdir or tempfile.gettempdir()) / f"ember_paged_workloads_{hf.name}"
    out["hf"], out["work"] = hf, work
    genai = None
    if "ttft1" in workloads:
        if not args.genai:
            out["genai_skipped"] = "--no-genai"
        elif importlib.util.find_spec("onnxruntime_genai") is None:
            out["genai_skipped"] = "onnxruntime_genai is not importable here"
    if "ttft1" in workloads and out["genai_skipped"] is None:
        from gpu_int4 import GenAIBuild

        precision = "fp16" if cuda else "fp32"  # GenAI's CPU provider has no fp16 model
        out["genai_folder"] = work / f"genai-{precision}"
        if not (out["genai_folder"] / "genai_config.json").exists():
            log(f"ONNX Runtime GenAI builder (-p {precision} -e {'cuda' if cuda else 'cpu'}) started in the background")
            genai = GenAIBuild.start(hf, out["genai_folder"], precision, "cuda" if cuda else "cpu", work)
    try:
        compile_folders(args, hf, work, workloads, out)
    except BaseException:  # a failed compile must not leave the builder running
        if genai is not None:
            genai.proc.kill()
        raise
    if genai is not None:
        try:
            out["genai_build_s"] = genai.wait(args.timeout_s)
            log(f"ONNX Runtime GenAI folder ready ({out['genai_build_s']:.0f} s)")
        except RuntimeError as e:
            out["genai_skipped"], out["genai_folder"] = f"its builder failed: {e}", None
            log(f"ONNX Runtime GenAI skipped: {e}")
    return out


def compile_folders(args, hf: Path, work: Path, workloads: list[str], out: dict) -> None:
    """Ember's folder of ``hf`` with FP16 KV pools, and one per ``--mixed-kv-dtype`` (into ``out``)."""
    from ember.compiler.compile import CompileOptions, compile_decoder

    out["folders"], out["compile_s"], out["compile_errors"] = {}, {}, {}
    for kv in ("fp16", *(args.mixed_kv_dtype if "mixed" in workloads else ())):
        folder = work / f"ember-fp16-paged-{kv}-kv"
        t0 = time.perf_counter()
        reused = (folder / "manifest.json").exists()
        try:
            if not reused:
                log(f"compiling {hf} (--dtype fp16 --paged on --kv-dtype {kv})")
                compile_decoder(str(hf), folder, CompileOptions(dtype="fp16", paged="on", kv_dtype=kv, validate=False,
                                                                quiet=True))
        except Exception as e:  # noqa: BLE001 - a quantized-KV compile failing costs its arm only
            if kv == "fp16":
                raise
            out["compile_errors"][kv] = f"{type(e).__name__}: {e}"
            log(f"--kv-dtype {kv} compile failed: {out['compile_errors'][kv]}")
            continue
        out["folders"][kv], out["compile_s"][kv] = folder, time.perf_counter() - t0
        log(f"Ember folder {'reused' if reused else 'compiled'}: {folder} ({out['compile_s'][kv]:.0f} s)")


# -- main -----------------------------------------------------------------------------------
def size_arguments(ap: argparse.ArgumentParser) -> None:
    """One flag per ``Sizes`` field (``--mixed-prompt 16:2048``...); None: the device's ``SIZES``."""
    g = ap.add_argument_group("workload sizes (default: the device run's, or the smoke run's with --device cpu)")
    for f in dataclasses.fields(Sizes):
        kind, metavar = {"LengthDist": (LengthDist.parse, "LO:HI"), "str": (str, "BYTES")}.get(f.type, (int, "N"))
        g.add_argument("--" + f.name.replace("_", "-"), dest=f"size_{f.name}", type=kind, default=None, metavar=metavar,
                       help=f"(cuda {getattr(SIZES['cuda'], f.name)}, cpu {getattr(SIZES['cpu'], f.name)})")


def write(doc: dict, out: Path) -> Path:
    gpu = doc["device_name"]
    slug = ("h200" if "H200" in gpu else "h100" if "H100" in gpu else "gpu") if doc["cuda"] else "cpu"
    name = doc["name"] or f"gpu_paged_serve_{doc['model']}_{slug}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown(doc))
    return out / f"{name}.md"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a LLaMA built-in (default llama-1b; llama-tiny with --device cpu) "
                                                  "or a Hugging Face LLaMA folder")
    ap.add_argument("--device", default="cuda:0", help="cpu: a smoke run of every workload (no device memory figures)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--genai", action=argparse.BooleanOptionalAction, default=True, help="the ttft1 GenAI arm")
    ap.add_argument("--mixed-kv-dtype", default="", type=lambda t: [d.strip() for d in t.split(",") if d.strip()],
                    help="comma list of int8, fp8: mixed adds a paged arm per quantized KV pool (a folder compiled "
                         "with --kv-dtype each; the same KV bytes hold twice the tokens)"),
    ap.add_argument("--timeout-s", type=float, default=900, help="per arm (and for GenAI's builder)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).with_name("results")))
    ap.add_argument("--name", default=None, help="file stem (default gpu_paged_serve_<model>_<h100|h200|cpu>)")
    ap.add_argument("--workdir", default=None, help="where the folders are built and kept, in a subfolder named for "
                                                    "the model and its positions (default: the temp folder)")
    size_arguments(ap)
    args = ap.parse_args(argv)
    workloads = parse_workloads(args.workloads)
    if set(args.mixed_kv_dtype) - {"int8", "fp8"}:
        ap.error(f"--mixed-kv-dtype {','.join(args.mixed_kv_dtype)}: name int8 and/or fp8")
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("llama-1b" if cuda else "llama-tiny")
    sizes = dataclasses.replace(SIZES["cuda" if cuda else "cpu"], **{
        f.name: getattr(args, f"size_{f.name}") for f in dataclasses.fields(Sizes)
        if getattr(args, f"size_{f.name}") is not None})
    from machine import machine_info, machine_line

    from ember.engine_format.decoder_spec import kv_geometry
    from ember.engine_format.manifest import read_manifest
    from ember.engine_format.roles import PAST_KEY
    from ember.runtime.kv_blocks import kv_itemsize

    log(f"{args.model} on {args.device}: workloads {', '.join(workloads)}")
    built = prepare(args, sizes, workloads, cuda)
    m = read_manifest(built["folders"]["fp16"])
    cfg = m.model["config"]
    geometry = kv_geometry(cfg)
    itemsize = kv_itemsize(m.part("step").tensor(PAST_KEY, layer=0).dtype)  # the slot pool's; both FP16 here
    info = machine_info()
    weights = sum(p.size for p in m.parts if p.name == "paged")
    token_bytes = geometry.slot_bytes(1, itemsize)
    doc = {"machine": info, "machine_line": machine_line(info), "cuda": cuda, "device": args.device,
           "device_name": "CPU (smoke run: its numbers say nothing about the GPU targets)" if not cuda else "a GPU",
           "model": Path(args.model).name, "name": args.name, "command": "python benchmarks/gpu_paged_serve.py " +
           " ".join(argv), "model_line": f"random weights, {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
           f"heads {cfg['num_heads']}/{cfg['num_kv_heads']} kv, vocab {cfg['vocab_size']}, {cfg['max_positions']} "
           f"positions; FP16, paged graph {weights / 2**30:.2f} GiB", "weights_bytes": weights,
           "token_bytes": token_bytes, "sizes": sizes.record(),
           "build": {k: str(v) if isinstance(v, Path) else v for k, v in built.items()}, "workloads": {}}
    for workload in workloads:
        log(f"== {workload}")
        w: dict = {"arms": {}}
        doc["workloads"][workload] = w
        try:
            arms = plan_arms(workload, sizes, int(cfg["vocab_size"]), geometry, itemsize, tuple(args.mixed_kv_dtype))
            if workload == "mixed":
                w["budget_bytes"], w["seq_len"] = arms[0].load["kv_memory"], sizes.positions(["mixed"])
            tokens = {}
            for arm in arms:
                if arm.engine == GENAI and built["genai_skipped"]:
                    w["arms"][arm.name] = {"skipped": built["genai_skipped"]}
                    continue
                if arm.kv_dtype in built["compile_errors"]:
                    w["arms"][arm.name] = {"error": f"compile failed: {built['compile_errors'][arm.kv_dtype]}"}
                    continue
                log(f"{workload} / {arm.name}: {json.dumps(arm.load, default=str)}")
                res = run_arm(built["folders"][arm.kv_dtype], built["genai_folder"], workload, arm, args.device,
                              args.timeout_s)
                if "gpu" in res:
                    doc["device_name"] = res["gpu"]
                tokens[arm.name] = res.pop("tokens", None)
                held = kv_held_tokens(workload, arm, sizes)
                if held is not None and cuda and "device_peak_mib" in res:
                    res["kv_held_bytes"] = held * token_bytes
                    res["peak_over_weights_and_kv"] = memory_ratio(res, weights, held * token_bytes)
                w["arms"][arm.name] = res
                shown = {k: v for k, v in res.items() if k not in ("stats", "traceback", "load")}
                log(f"{workload} / {arm.name}: {json.dumps(shown, default=str)}")
            w["derived"] = derived(workload, {k: {**r, "tokens": tokens.get(k)} if tokens.get(k) is not None else r
                                              for k, r in w["arms"].items()})
        except Exception as e:  # noqa: BLE001 - one failing workload is reported, the others still run
            w["error"] = f"{type(e).__name__}: {e}"
            log(f"{workload} failed: {w['error']}")
        path = write(doc, Path(args.out))
        log(f"{workload} done; wrote {path}")
    print(markdown(doc), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
