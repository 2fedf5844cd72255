"""The fusion issue's serving harness (ember/bench) on a GPU engine (issue 6, docs/gpu.md).

Every arm runs on one ONNX Runtime CUDA session (one copy of the weights on the card) with
device-resident KV pools: ``GpuBenchModel`` gives ``ember.bench`` the same two things the
CPU ``BenchModel`` does -- a step session whose ``run`` returns host logits, and pools --
so the fused scheduler, static/dynamic batching, concurrent instances and sequential arms
are the harness's own code. Hugging Face ``generate`` runs the same weights in torch FP16
on the same GPU (static batches).

Experiments (sizes fit one device call; ``--small`` for a smoke run):
1. flover: 32 requests at once, 8-token prompts, 512 tokens (ignore EOS): fused vs
   concurrent instances, static batching, HF generate; sequential capped + extrapolated.
2. poisson: Poisson arrivals light -> saturating, prompts U[8,128], outputs U[16,256]:
   fused vs dynamic batching (window 0.25 s) and static batching. The fused scheduler runs
   with the runtime's CUDA defaults: up to 1024 prompt tokens per iteration, admission
   batching of 8 (ember/runtime/scheduler.py).
3. admit1: the saturating Poisson point again, fused only, admitting each request at once
   (admit_batch=1, the CPU's policy): the admission batching's effect.
4. overlap: the flover workload: the fused arm with asynchronous launches (the default: the
   engine streams step k's tokens while the device runs step k+1, and chains pure-decode
   steps on the device), the fused arm with every run waiting for the device
   (``EMBER_ASYNC_LAUNCH=0``), and static batching, interleaved over rounds.

    python benchmarks/serve_gpu.py artifacts/llama-1b-fp16 --out benchmarks/results

Every arm here runs on the slot KV layout. Issue 19's serving workloads (slots against the paged
layout: prefix caching on/off, mixed lengths under one KV budget, batch-1 TTFT against ONNX Runtime
GenAI, a burst) are ``benchmarks/gpu_paged_serve.py`` (random-weight folders it builds) and
``ember bench paged FOLDER`` (a folder compiled with ``--paged on``), one implementation:
``ember/bench/paged_serve.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ember.bench.model import BenchModel  # noqa: E402
from ember.engine_format.decoder_spec import kv_geometry  # noqa: E402
from ember.engine_format.manifest import read_manifest, verify_files  # noqa: E402
from ember.runtime.cuda_session import (CudaDecodeSession, CudaStepSession, DeviceExecutor,  # noqa: E402
                                       device_pool, logits_to_host)
from ember.runtime.device_kv_pool import DeviceKVPool  # noqa: E402


class HostLogitsSession:
    """A device step session seen as the CPU ``StepSession`` (logits come back as host arrays),
    for the harness's batch runners, which drive ``LocalExecutor`` directly."""

    def __init__(self, device_session: CudaStepSession):
        self.dev = device_session

    def run(self, input_ids, positions, past_lengths, new_lengths, kv):
        with self.dev.lock:
            logits, new = self.dev.run(input_ids, positions, past_lengths, new_lengths, kv)
            return logits_to_host(logits), new


class GpuBenchModel(BenchModel):
    """``BenchModel`` over one CUDA session and device KV pools (no CPU session is built)."""

    device = "cuda"

    def __init__(self, folder, cuda_graph: bool = True, async_launch: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        verify_files(self.folder, self.manifest, check_hashes=False)
        cfg = self.config = self.manifest.model["config"]
        part = self.manifest.part("step")
        self.geometry = kv_geometry(cfg)
        self.num_layers, self.num_kv_heads, self.head_dim = self.geometry[:3]
        self.kv_dtype = next(t.dtype for t in part.inputs if t.name == "past_key.0")
        self.max_positions, self.vocab_size = int(cfg["max_positions"]), int(cfg["vocab_size"])
        self.eos_token_id, self.threads = cfg.get("eos_token_id"), None
        self.device_session = CudaStepSession(self.folder / part.file, self.num_layers, cuda_graph=cuda_graph,
                                              async_launch=async_launch)
        self.session = HostLogitsSession(self.device_session)
        decode = self.manifest.find_part("decode")  # the fused decode part, as ember.load(device=) uses it
        self.decode = None
        if decode is not None:
            self.decode = CudaDecodeSession(self.folder / decode.file, self.num_layers, cuda_graph=cuda_graph,
                                            async_launch=async_launch)
            self.decode.lock = self.device_session.lock

    def pool(self, slots: int) -> DeviceKVPool:
        return device_pool(self.num_layers, self.num_kv_heads, self.head_dim, slots, self.max_positions,
                           self.kv_dtype, fused_decode=self.decode is not None,
                           layer_rings=self.geometry.layer_rings)

    def executor(self, max_batch: int) -> DeviceExecutor:
        """The runtime's GPU executor (what ``ember.load(device=)`` builds) over a device KV pool."""
        return DeviceExecutor(self.device_session, self.pool(max_batch), decode=self.decode)


class _OnDevice:
    """Wraps a CUDA transformers model so the harness's CPU-built batches run on the GPU."""

    def __init__(self, model):
        self.model = model

    def generate(self, input_ids, attention_mask, stopping_criteria=None, **kw):
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class OnDevice(StoppingCriteria):
            def __init__(self, inner):
                self.inner = inner

            def __call__(self, ids, scores, **k):
                return self.inner(ids, scores, **k).to(ids.device)

        dev = next(self.model.parameters()).device
        crit = StoppingCriteriaList([OnDevice(c) for c in (stopping_criteria or [])])
        with torch.inference_mode():
            return self.model.generate(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                                       stopping_criteria=crit, **kw)


def _install_hf_fp16_builder() -> None:
    """The harness builds its HF arm through ``hf_arm.build_hf_model`` (float32, CPU); on the
    GPU the same weights run in FP16 on the card."""
    from ember.bench import hf_arm

    cpu_build = hf_arm.build_hf_model
    if getattr(cpu_build, "on_gpu", False):
        return

    def build(model: BenchModel):
        return _OnDevice(cpu_build(model).half().cuda())

    build.on_gpu = True
    hf_arm.build_hf_model = build


EXPERIMENTS = ("flover", "poisson", "admit1", "overlap")


def overlap(model: GpuBenchModel, spec, rounds: int = 3) -> dict:
    """Fused arm on ``spec`` with asynchronous launches (``model``) and with synchronous ones
    (a second model over the same folder), interleaved ``rounds`` times; total seconds each."""
    from ember.bench.runner import ServeOptions, run_serve

    sync = GpuBenchModel(model.folder, async_launch=False)
    runs: dict[str, list] = {"async": [], "sync": [], "static": []}
    for _ in range(rounds):
        for key, m, arm in (("async", model, "fused"), ("sync", sync, "fused"), ("static", model, "static")):
            doc = run_serve(m, spec, [arm], ServeOptions(max_batch=32), name=f"overlap-{key}", show_progress=False)
            runs[key].append(doc["runs"][0])
    med = {k: sorted(r["total_s"] for r in v)[len(v) // 2] for k, v in runs.items()}
    return {"name": "gpu_serve_overlap", "workload": spec.describe(), "rounds": rounds,
            "total_s": {k: [r["total_s"] for r in v] for k, v in runs.items()},
            "tpot_p50_s": {k: [r["tpot"]["p50"] for r in v] for k, v in runs.items()},
            "median_total_s": med, "sync_over_async": med["sync"] / med["async"],
            "static_over_async": med["static"] / med["async"]}


def overlap_markdown(doc: dict, device: str) -> str:
    t = doc["total_s"]
    rows = "\n".join(f"| {k} | {' / '.join(f'{x:.3f}' for x in t[k])} | {doc['median_total_s'][k]:.3f} |" for k in t)
    return (f"# Launch overlap: {device}\n\nWorkload: {doc['workload']}; the fused arm with asynchronous, chained "
            f"launches (async), with every run waiting for the device (sync, `EMBER_ASYNC_LAUNCH=0`), and static "
            f"batching, {doc['rounds']} interleaved rounds.\n\n| arm | total s per round | median s |\n|---|---|---:|\n"
            f"{rows}\n\nSynchronous / asynchronous: **{doc['sync_over_async']:.3f}x**; static / asynchronous fused: "
            f"**{doc['static_over_async']:.3f}x**.\n")


def run(folder, model_name: str, out: Path, small: bool = False, only: tuple[str, ...] = EXPERIMENTS) -> dict:
    """Run the experiments in ``only``; writes gpu_serve_*.{json,md} (+ the Poisson plot) under ``out``."""
    import torch

    from ember.bench import runner
    from ember.bench.report import markdown, plot
    from ember.bench.runner import ServeOptions, run_serve
    from ember.bench.workload import LengthDist, WorkloadSpec

    _install_hf_fp16_builder()
    model = GpuBenchModel(folder)
    gpu = torch.cuda.get_device_name(0)
    base = runner.machine_info

    def machine_info() -> dict:
        m = base()
        fused = "fused decode part (GroupQueryAttention)" if model.decode is not None else "step graph only"
        m["cpu"] = (f"{gpu} GPU (onnxruntime-gpu CUDA EP, CUDA graphs {model.device_session.cuda_graph_status}, "
                    f"{fused}); host {m['cpu']}")
        return m

    runner.machine_info = machine_info
    out = Path(out)
    docs = {}
    n_tok = 64 if small else 512
    spec = WorkloadSpec(32, math.inf, LengthDist(8, 8), LengthDist(n_tok, n_tok), seed=0)
    if "flover" in only:
        docs["flover"] = run_serve(model, spec, ["fused", "static", "concurrent", "sequential", "hf"],
                                   ServeOptions(max_batch=32, cap_s=20.0 if not small else 5.0),
                                   name="gpu_serve_flover")
    spec = WorkloadSpec(32, 1.0, LengthDist(8, 128), LengthDist(16, 64 if small else 256), seed=0)
    rates, sizes = ([4.0, 16.0, 64.0], [32, 64, 128]) if not small else ([8.0, 64.0], [8, 16])
    if "poisson" in only:
        docs["poisson"] = run_serve(model, spec, ["fused", "dynamic", "static"],
                                    ServeOptions(max_batch=32, window_s=0.25), rates=rates, sizes=sizes,
                                    name="gpu_serve_poisson")
    if "admit1" in only:
        docs["admit1"] = run_serve(model, spec, ["fused"], ServeOptions(max_batch=32, admit_batch=1),
                                   rates=rates[-1:], sizes=sizes[-1:], name="gpu_serve_admit1")
    if "overlap" in only:
        spec = WorkloadSpec(32, math.inf, LengthDist(8, 8), LengthDist(n_tok, n_tok), seed=0)
        docs["overlap"] = overlap(model, spec, rounds=2 if small else 5)
    md = []
    for key, doc in docs.items():
        (out / f"{doc['name']}.json").write_text(json.dumps(doc, indent=1, default=str))
        text = overlap_markdown(doc, gpu) if key == "overlap" else markdown(doc)
        (out / f"{doc['name']}.md").write_text(text)
        md.append(text)
    if "poisson" in docs:
        plot(docs["poisson"], out / "gpu_serve_poisson.png")
    return {"markdown": "\n".join(md), "summary": {k: [(r["arm"], r["rate"], round(r["total_s"], 2),
                                                        round(r["output_tok_s"], 1), r["extrapolated"])
                                                       for r in d["runs"]] for k, d in docs.items() if k != "overlap"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--only", default=",".join(EXPERIMENTS), help="comma list of: " + ", ".join(EXPERIMENTS))
    a = ap.parse_args()
    res = run(Path(a.folder), Path(a.folder).name, Path(a.out), a.small, tuple(a.only.split(",")))
    print(res["markdown"])


if __name__ == "__main__":
    main()
