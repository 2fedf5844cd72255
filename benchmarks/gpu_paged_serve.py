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
the rest still run; the results are rewritten after every workload. The run itself is
``ember/bench/paged_serve.py``'s, which ``ember bench paged FOLDER`` also runs on a folder you
compiled; this script adds the folders it builds.

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
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.bench.paged_serve import PagedRun, genai_missing, make_log, run_workloads, write_report  # noqa: E402
from ember.bench.paged_report import markdown  # noqa: E402
from ember.bench.paged_workloads import (WORKLOADS, Sizes, parse_workloads, size_arguments,  # noqa: E402
                                         sizes_from_arguments)

log = make_log("gpu_paged_serve")


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
        else:
            out["genai_skipped"] = genai_missing()
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
    sizes = sizes_from_arguments(args, args.device)
    log(f"{args.model} on {args.device}: workloads {', '.join(workloads)}")
    built = prepare(args, sizes, workloads, cuda)
    folders = built["folders"]
    run = PagedRun(folders["fp16"], tuple(workloads), sizes, args.device, built["genai_folder"],
                   built["genai_skipped"], {k: v for k, v in folders.items() if k != "fp16"}, built["compile_errors"],
                   args.timeout_s)
    header = {"model": Path(args.model).name, "name": args.name, "model_note": "random weights, ",
              "command": "python benchmarks/gpu_paged_serve.py " + " ".join(argv),
              "build": {k: str(v) if isinstance(v, Path) else v for k, v in built.items()}}
    if not cuda:
        header["device_name"] = "CPU (smoke run: its numbers say nothing about the GPU targets)"

    def write(doc: dict) -> None:
        gpu = doc["device_name"]
        slug = ("h200" if "H200" in gpu else "h100" if "H100" in gpu else "gpu") if cuda else "cpu"
        stem = Path(args.out) / (args.name or f"gpu_paged_serve_{doc['model']}_{slug}")
        log(f"wrote {write_report(doc, stem)[1]}")

    doc = run_workloads(run, header, log, on_workload=write)
    print(markdown(doc), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
