"""Diffusion on the GPU (issue 21): an SD-1.5-shaped pipeline (random weights) end to end on ONNX
Runtime CUDA, against diffusers (torch FP16, SDPA attention) on the same weights, in one run.

Arms (50-step DDIM, CFG 7.5, one prompt per image, the same seed and initial latents everywhere):
  Ember FP16, no cache            every step on the full UNet (FP16 engines, fused MultiHeadAttention,
                                  CUDA graphs per engine and batch, latents/text embeddings on the device)
  Ember FP16, no cache, no graphs the same with CUDA graphs off (what the graphs buy)
  Ember FP16, DP N=5              DP cache schedule (10 full + 40 shallow steps), no DEC
  Ember FP16, DP N=5 + DEC        the same with decoupled error correction
  Ember FP16 + ORT UNet fusions   the same three arms on UNets also rewritten by ONNX Runtime's CUDA UNet
                                  fusions (NhwcConv, GroupNorm, BiasSplitGelu; --ort-unet-fusions; CUDA only)
  Ember W8A8 Q/DQ, DP N=5         W8A8 Q/DQ UNets (float32 around the Q/DQ pairs) on the CUDA provider, FP16
                                  text encoder and VAE, DP schedule from float features, no DEC
  diffusers FP16 (SDPA)           StableDiffusionPipeline on the same torch modules (.half(), CUDA), the text
                                  encoder run on the same token ids; skipped with the reason where diffusers
                                  is not importable
Plus: per-call ms of the FP16 full and shallow UNet engines (batch 2 = the CFG rows), the op
counts of the W8A8 UNets after ONNX Runtime's optimizers on the device (what it fuses), and the
staggered-request fusion: R requests (request i joins at step 7i) in one fused loop vs one after
another (throughput) and each request's max abs difference vs its solo run.
Every section runs in its own try/except (an error is recorded, the rest goes on).

Stages: ``--stage compile`` builds the engine folders into --root (reused when present, with their
compile times), ``--stage run`` times them, ``--stage all`` (default) both. Calibration (the DP
schedule's trajectories) runs on --device; W8A8 calibration runs ONNX Runtime on the CPU. The
first compile's FP32 ONNX export is kept in ROOT/export-cache and copied by the others.

Device (the lead's run; needs diffusers importable for the compile -- the built-in's random modules
are diffusers classes -- and for the diffusers arm). The compiles export an 860M-parameter UNet
twice per folder on the CPU, so they run one folder per command; the folders are reused:
    python benchmarks/gpu_diffusion.py --stage compile --folders fp16_dp5 --root artifacts/gpu-diffusion --out $OUT
    python benchmarks/gpu_diffusion.py --stage compile --folders fp16ort_dp5 --root artifacts/gpu-diffusion --out $OUT
    python benchmarks/gpu_diffusion.py --stage compile --folders w8a8_dp5 --root artifacts/gpu-diffusion --out $OUT
    python benchmarks/gpu_diffusion.py --stage run --root artifacts/gpu-diffusion --out $OUT
CPU smoke (any host, < 2 min): python benchmarks/gpu_diffusion.py --device cpu --tiny --out /tmp/gd
Writes NAME.json + NAME.md to --out (default: $OUT, else benchmarks/results), the machine and GPU named.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from diffusion import psnr, rel_err  # noqa: E402
from machine import machine_info, machine_line  # noqa: E402

CALIB = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dawn")
EVAL = ("a red fox in a snowy forest, golden hour", "a futuristic city skyline at night, neon lights",
        "a still life of apples and a jug, oil painting", "a sailing boat on a calm lake, misty morning")
STAGGER = 7
FOLDERS = ("fp16_dp5", "fp16ort_dp5", "w8a8_dp5")
CUDA_ONLY = ("fp16ort_dp5",)  # ORT's CUDA UNet fusions: no CPU kernels


def folder_plan(args, root: Path) -> dict:
    from ember.compiler.diffusion import DiffusionCompileOptions

    calib_device = args.device if args.device.startswith("cuda") else "cpu"
    common = dict(steps=args.steps, calib_prompts=CALIB[: args.calib_prompts], quiet=True, overwrite=True,
                  validate=args.tiny, calib_device=calib_device, image_size=args.image_size,
                  export_cache=str(root / "export-cache"))  # one FP32 export serves every folder
    return {
        "fp16_dp5": DiffusionCompileOptions(cache_interval=5, schedule="dp", dec=True, dtype="fp16", **common),
        "fp16ort_dp5": DiffusionCompileOptions(cache_interval=5, schedule="dp", dec=True, dtype="fp16",
                                               ort_unet_fusions=True, **common),
        "w8a8_dp5": DiffusionCompileOptions(cache_interval=5, schedule="dp", quantize="int8", schedule_features="float",
                                            quant_calib_steps=args.quant_calib_steps, dtype="fp16", **common),
    }


def compile_folders(args, root: Path, want: list[str]) -> tuple[dict[str, Path], dict[str, float], dict[str, str]]:
    """Engine folders (reused when present); compile seconds and errors per folder."""
    from ember.compiler.diffusion import compile_diffusion
    from ember.runtime.diffusion.pipeline import DiffusionPipeline

    plan = folder_plan(args, root)
    times_file = root / "compile_times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    folders, errors = {}, {}
    for name in want:
        folder = root / name
        if name in CUDA_ONLY and not args.device.startswith("cuda"):
            continue  # its arms say why
        if (folder / "manifest.json").exists() and name in times:
            folders[name] = folder
            continue
        if args.stage == "run":  # timing only: a folder not built by an earlier --stage compile is reported
            errors[name] = f"not built: run --stage compile --folders {name} --root {root} first"
            continue
        t0 = time.perf_counter()
        try:  # calibration on the device: a plain pipeline (no per-batch graph sessions for one batch size)
            opener = functools.partial(DiffusionPipeline, cuda_graph=False)
            compile_diffusion(args.model, folder, plan[name], open_pipeline=opener)
        except Exception as e:  # noqa: BLE001 -- a benchmark section records its failure and goes on
            errors[name] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
            continue
        times[name] = time.perf_counter() - t0
        folders[name] = folder
        print(f"compiled {name} in {times[name]:.0f} s", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        times_file.write_text(json.dumps(times))
    return folders, {k: v for k, v in times.items() if k in folders}, errors


def open_pipe(folder: Path, device: str, cuda_graph: bool = True):
    """The device path (IOBinding over torch tensors) on ``device``; on 'cpu' the same code on the CPU
    provider (graph sessions and buffers too, without a capture)."""
    from ember.engine_format.manifest import read_manifest
    from ember.runtime.diffusion.pipeline import DiffusionPipeline

    return DiffusionPipeline(folder, read_manifest(folder), device=device, io_binding=True, cuda_graph=cuda_graph)


def initial_latents(pipe, seed: int) -> np.ndarray:
    """The seed's initial noise [1, C, h, w] (the diffusers arm draws the same from the config's shape)."""
    return np.random.default_rng(seed).standard_normal((1, *pipe.latent_shape)).astype(np.float32)


def time_generate(pipe, prompt: str, lat: np.ndarray, steps: int, repeats: int, **kw) -> dict:
    pipe.generate([prompt], steps=steps, latents=lat, **kw)  # warm-up: sessions, graph captures, algorithms
    runs = [pipe.generate([prompt], steps=steps, latents=lat, **kw) for _ in range(repeats)]
    r = runs[0]
    return {"total_s": float(np.median([x.timings["total_s"] for x in runs])),
            "per_run_s": [x.timings["total_s"] for x in runs], "full_steps": r.loop.full_calls,
            "shallow_steps": r.loop.shallow_calls, "latents": r.latents[0], "image": r.images[0],
            "cuda_graphs": pipe.device_status if pipe.full.use_graphs else {"UNets": "plain launches (use_graphs=False)"},
            "notes": r.notes}


def ember_arms(args, folders: dict[str, Path], prompt: str, seed: int) -> dict:
    arms = {
        "Ember FP16, no cache": ("fp16_dp5", dict(cache=False), True),
        "Ember FP16, no cache, no CUDA graphs": ("fp16_dp5", dict(cache=False), False),
        "Ember FP16, DP N=5": ("fp16_dp5", dict(dec=False), True),
        "Ember FP16, DP N=5 + DEC": ("fp16_dp5", {}, True),
        "Ember FP16 + ORT UNet fusions, no cache": ("fp16ort_dp5", dict(cache=False), True),
        "Ember FP16 + ORT UNet fusions, DP N=5": ("fp16ort_dp5", dict(dec=False), True),
        "Ember FP16 + ORT UNet fusions, DP N=5 + DEC": ("fp16ort_dp5", {}, True),
        "Ember W8A8 Q/DQ, DP N=5": ("w8a8_dp5", dict(dec=False), True),
    }
    out, pipes = {}, {}
    for arm, (key, kw, graphs) in arms.items():
        if key in CUDA_ONLY and not args.device.startswith("cuda"):
            out[arm] = {"skipped": "ORT's CUDA UNet fusions have no CPU kernels (CUDA only)"}
            continue
        try:
            if key not in folders:
                raise RuntimeError(f"engine folder {key} was not built (see compile errors)")
            if key not in pipes:
                pipes[key] = open_pipe(folders[key], args.device)
            pipe = pipes[key]
            for engine in (pipe.full, pipe.shallow):  # the no-graph arm: the same sessions, plain launches
                engine.use_graphs = graphs
            out[arm] = time_generate(pipe, prompt, initial_latents(pipe, seed), args.steps, args.repeats, **kw)
            print(f"{arm}: {out[arm]['total_s']:.3f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            out[arm] = {"error": f"{type(e).__name__}: {e}"[:500]}
            traceback.print_exc()
        finally:
            for p in pipes.values():
                for engine in (p.full, p.shallow):
                    engine.use_graphs = True
    return out, pipes


def engine_call_ms(pipe, rounds: int = 10) -> dict:
    """Median ms of one full and one shallow UNet call at batch 2 (the CFG rows), device-synchronised;
    inputs: a real step a fifth into a trajectory (as benchmarks/diffusion.py)."""
    import torch

    steps = int(pipe.spec["steps"])
    jobs, _ = pipe.make_jobs(["a lighthouse on a cliff"], steps=steps, seed=7, cache=False)
    feeds: dict[str, dict] = {}
    cc, qc = int(pipe.spec["cache_channels"]), int(pipe.spec["quant_channels"])

    def grab(job, kind, f, outs):
        if kind == "full" and job.step == steps // 5:
            feeds["full"] = dict(f)
            feeds["shallow"] = {**f, "cached": outs[1], "cache_scale": np.ones((2, cc), np.float32),
                                "cache_bias": np.zeros((2, cc), np.float32), "quant_scale": np.ones((2, qc), np.float32),
                                "quant_bias": np.zeros((2, qc), np.float32)}

    pipe.run_jobs(jobs, observer=grab)
    dev = pipe.ctx.device
    out = {}
    for kind, eng in (("full", pipe.full), ("shallow", pipe.shallow)):
        f = {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in feeds[kind].items()}
        ts = []
        with pipe.active():
            for i in range(rounds + 2):
                pipe.synchronize()
                t0 = time.perf_counter()
                eng.run(f)
                pipe.synchronize()
                if i >= 2:
                    ts.append(1000 * (time.perf_counter() - t0))
        out[kind] = float(np.median(ts))
    return out


def optimized_ops(folder: Path, device: str) -> dict:
    """What ONNX Runtime makes of the W8A8 Q/DQ UNets on ``device``: op counts of the graph its
    optimizers leave (``optimized_model_filepath``; the part's disabled optimizers as the runtime's)."""
    import collections
    import tempfile

    import onnx
    import onnxruntime as ort

    from ember.engine_format.manifest import read_manifest
    from ember.ort.session import session_options

    manifest = read_manifest(folder)
    out = {}
    for name in ("unet_shallow", "unet_full"):
        part = manifest.part(name)
        with tempfile.TemporaryDirectory() as tmp:
            so = session_options(None, Path(tmp) / "opt.onnx")
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
            providers = ([("CUDAExecutionProvider", {"device_id": str(int(device.split(":")[1]) if ":" in device else 0)}),
                          "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"])
            disabled = list(part.extra.get("ort_disabled_optimizers") or [])
            kw = {"disabled_optimizers": disabled} if disabled else {}
            ort.InferenceSession(str(folder / part.file), so, providers=providers, **kw)
            ops = collections.Counter(n.op_type for n in onnx.load(str(Path(tmp) / "opt.onnx"),
                                                                   load_external_data=False).graph.node)
        out[name] = dict(ops.most_common(16))
    return out


def fused_demo(args, pipe, requests: int) -> dict:
    """Staggered requests in one fused loop vs one after another; per-request max abs diff vs solo."""
    prompts = list(EVAL[:requests])
    lat = np.concatenate([initial_latents(pipe, 100 + i) for i in range(requests)])
    kw = dict(steps=args.steps, dec=False, decode=False)
    pipe.generate(prompts, latents=lat, stagger=args.stagger, **kw)  # warm-up: every fused batch size
    for i, p in enumerate(prompts):
        pipe.generate([p], latents=lat[i:i + 1], **kw)
    t0 = time.perf_counter()
    solo = [pipe.generate([p], latents=lat[i:i + 1], **kw) for i, p in enumerate(prompts)]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused = pipe.generate(prompts, latents=lat, stagger=args.stagger, **kw)
    t_fused = time.perf_counter() - t0
    diffs = [float(np.abs(fused.latents[i] - s.latents[0]).max()) for i, s in enumerate(solo)]
    return {"requests": requests, "stagger_steps": args.stagger, "sequential_s": t_seq, "fused_s": t_fused,
            "throughput_gain": t_seq / t_fused, "images_per_s_sequential": requests / t_seq,
            "images_per_s_fused": requests / t_fused, "max_abs_diff_vs_solo": diffs,
            "max_rel_diff_vs_solo": [rel_err(fused.latents[i], s.latents[0]) for i, s in enumerate(solo)],
            "latent_abs_max": float(np.abs(fused.latents).max()),
            "unet_calls_sequential": sum(s.loop.full_calls + s.loop.shallow_calls for s in solo),
            "unet_calls_fused": fused.loop.full_calls + fused.loop.shallow_calls, "cuda_graphs": pipe.device_status}


def diffusers_arm(args, prompt: str, lat: np.ndarray, repeats: int) -> dict:
    """diffusers' StableDiffusionPipeline (torch, FP16 on CUDA / FP32 on CPU, SDPA attention) on the
    same seeded modules the Ember folders were exported from; the text encoder runs inside the timing."""
    try:
        import diffusers
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0
    except ImportError as e:
        return {"skipped": f"diffusers not importable here ({e}); carry the diffusers wheel to run this arm"}
    from ember.export.diffusion.config import builtin_config
    from ember.export.diffusion.source import build_builtin

    cfg = builtin_config(args.model)
    src = build_builtin(cfg, seed=0)  # the compile's weights (DiffusionCompileOptions.seed = 0)
    cuda = args.device.startswith("cuda")
    dev, dtype = (torch.device(args.device), torch.float16) if cuda else (torch.device("cpu"), torch.float32)
    unet, te, vae = (m.to(dev, dtype) for m in (src.unet, src.text_encoder, src.vae))
    unet.set_attn_processor(AttnProcessor2_0())
    vae.set_attn_processor(AttnProcessor2_0())
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler.from_config(src.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ids = torch.tensor([e.ids for e in src.tokenizer.encode_batch(["", prompt])], dtype=torch.int64)
    latents = torch.from_numpy(lat).to(dev, dtype)

    def once():
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            emb = te(ids.to(dev))[0]
            img = pipe(prompt_embeds=emb[1:], negative_prompt_embeds=emb[:1], num_inference_steps=args.steps,
                       guidance_scale=7.5, latents=latents, output_type="np").images[0]
        sync()
        return time.perf_counter() - t0, img

    once()
    runs = [once() for _ in range(repeats)]
    img = np.round(np.clip(runs[0][1], 0, 1) * 255).astype(np.uint8)
    return {"total_s": float(np.median([r[0] for r in runs])), "per_run_s": [r[0] for r in runs], "image": img,
            "diffusers": diffusers.__version__, "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
            "attention": "SDPA (AttnProcessor2_0)"}


def device_info(device: str) -> dict:
    info = {"device": device}
    try:
        import onnxruntime as ort
        import torch

        info.update(torch=torch.__version__, ort_providers=ort.get_available_providers())
        if device.startswith("cuda"):
            idx = torch.device(device).index or 0
            info["gpu"] = torch.cuda.get_device_name(idx)
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(idx).total_memory / 2**30, 1)
    except Exception as e:  # noqa: BLE001
        info["error"] = str(e)[:300]
    return info


def run(args) -> dict:
    root = Path(args.root or f"artifacts/gpu-diffusion-{args.model}-{args.steps}")
    res: dict = {"machine": machine_info(), "device": device_info(args.device), "model": args.model, "steps": args.steps,
                 "guidance_scale": 7.5, "sampler": "DDIM (eta=0)", "repeats": args.repeats, "errors": {}}
    t_start = time.perf_counter()
    folders, times, errs = compile_folders(args, root, args.folders)
    res["compile_s"], res["errors"] = times, {f"compile {k}": v for k, v in errs.items()}
    if args.stage == "compile":
        res["total_s"] = time.perf_counter() - t_start
        return res
    prompt, seed = EVAL[0], 100
    arms, pipes = ember_arms(args, folders, prompt, seed)
    if "fp16_dp5" in pipes:
        res["schedule"] = pipes["fp16_dp5"].cache["full_steps"]
    try:
        from ember.export.diffusion.config import builtin_config

        cfg = builtin_config(args.model)
        side = args.image_size // cfg.vae_scale if args.image_size else cfg.sample_size
        res["image_size"] = side * cfg.vae_scale
        lat = np.random.default_rng(seed).standard_normal((1, cfg.latent_channels, side, side)).astype(np.float32)
        name = "diffusers FP16 (SDPA)" if args.device.startswith("cuda") else "diffusers FP32 (SDPA, CPU)"
        arms[name] = diffusers_arm(args, prompt, lat, args.repeats)
        print(f"{name}: {arms[name].get('total_s', arms[name].get('skipped'))}", flush=True)
    except Exception as e:  # noqa: BLE001
        arms["diffusers"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        traceback.print_exc()
    res["arms"] = {}
    base = arms.get("Ember FP16, no cache", {})
    ref = next((v for k, v in arms.items() if k.startswith("diffusers") and "total_s" in v), None)
    for arm, r in arms.items():
        row = {k: v for k, v in r.items() if k not in ("latents", "image")}
        if "image" in r and "image" in base:
            row["psnr_vs_ember_fp16_nocache_db"] = psnr(r["image"], base["image"])
        if "latents" in r and "latents" in base:
            row["latent_rel_err_vs_ember_fp16_nocache"] = rel_err(r["latents"], base["latents"])
        if ref is not None and "total_s" in r:
            row["speedup_vs_diffusers"] = ref["total_s"] / r["total_s"]
        if ref is not None and "image" in r:
            row["psnr_vs_diffusers_db"] = psnr(r["image"], ref["image"])
        res["arms"][arm] = row
    fp16 = pipes.get("fp16_dp5")
    for name, fn in (("ms_per_call", lambda: engine_call_ms(fp16)),
                     ("fused", lambda: fused_demo(args, fp16, args.requests)),
                     ("w8a8_optimized_ops", lambda: optimized_ops(folders["w8a8_dp5"], args.device))):
        try:
            if fp16 is None or (name == "w8a8_optimized_ops" and "w8a8_dp5" not in folders):
                raise RuntimeError("the engine folder it needs did not build or load")
            res[name] = fn()
            print(f"{name}: {json.dumps(res[name], default=str)[:400]}", flush=True)
        except Exception as e:  # noqa: BLE001
            res["errors"][name] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
    res["total_s"] = time.perf_counter() - t_start
    return res


def _f(x, fmt="{:.3f}") -> str:
    return "—" if x is None else ("∞" if x == float("inf") else fmt.format(x))


def write(res: dict, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    d, m = res["device"], res["machine"]
    where = d.get("gpu") or f"CPU: {machine_line(m)}"
    lines = [f"# Diffusion on the GPU — {res['model']}, {res['steps']} DDIM steps, CFG 7.5",
             "",
             f"Device: {where} ({d['device']}); host {machine_line(m)}; torch {d.get('torch')}.",
             f"Compile times (s): {json.dumps({k: round(v) for k, v in res.get('compile_s', {}).items()})}; "
             f"whole run {res.get('total_s', 0):.0f} s. Times: median of {res['repeats']} runs after a warm-up, "
             "prompt to decoded image, device-synchronised.",
             ""]
    if res.get("arms"):
        lines += ["| arm | full/shallow steps | end-to-end s | vs diffusers | PSNR vs Ember FP16 no-cache (dB) | "
                  "PSNR vs diffusers (dB) | CUDA graphs |", "|---|---|---|---|---|---|---|"]
        for arm, r in res["arms"].items():
            if "total_s" not in r:
                lines.append(f"| {arm} | — | {r.get('skipped') or r.get('error')} | | | | |")
                continue
            steps = f"{r['full_steps']}/{r['shallow_steps']}" if "full_steps" in r else f"{res['steps']}/0"
            graphs = "; ".join(f"{k}: {v}" for k, v in (r.get("cuda_graphs") or {}).items())
            lines.append(f"| {arm} | {steps} | {r['total_s']:.3f} | {_f(r.get('speedup_vs_diffusers'), '{:.2f}×')} | "
                         f"{_f(r.get('psnr_vs_ember_fp16_nocache_db'), '{:.2f}')} | "
                         f"{_f(r.get('psnr_vs_diffusers_db'), '{:.2f}')} | {graphs} |")
    if "ms_per_call" in res:
        c = res["ms_per_call"]
        lines += ["", f"UNet call, batch 2 (CFG rows), FP16 engines: full {c['full']:.2f} ms, shallow "
                      f"{c['shallow']:.2f} ms (ratio {c['full'] / c['shallow']:.1f}×)."]
    if "fused" in res:
        f = res["fused"]
        lines += ["", f"Staggered fused batch (FP16, DP N=5, no DEC): {f['requests']} requests, request i joins at "
                      f"step {f['stagger_steps']}·i: {f['fused_s']:.2f} s fused vs {f['sequential_s']:.2f} s one after "
                      f"another ({f['throughput_gain']:.2f}× throughput; {f['unet_calls_fused']} vs "
                      f"{f['unet_calls_sequential']} UNet calls). Max abs latent difference vs each request alone: "
                      f"{', '.join(f'{x:.2e}' for x in f['max_abs_diff_vs_solo'])} (latents up to "
                      f"{f['latent_abs_max']:.1f}; FP16 engines at different batch sizes run different kernels)."]
    if "w8a8_optimized_ops" in res:
        lines += ["", "W8A8 Q/DQ UNets as ONNX Runtime optimizes them on this device (op counts of the optimized "
                      "graph; QLinear* = int8 kernels, DequantizeLinear + float op = dequantize-then-float):"]
        for part, ops in res["w8a8_optimized_ops"].items():
            lines.append(f"- {part}: " + ", ".join(f"{k} {v}" for k, v in ops.items()))
    if res.get("schedule"):
        lines += ["", f"DP N=5 full steps: {res['schedule']}"]
    if res.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in res["errors"].items())]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: sd-tiny, 12 steps, 1 repeat, 3 requests")
    ap.add_argument("--model", default=None, help="built-in diffusion config (default sd-15-shape; sd-tiny with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 12 with --tiny)")
    ap.add_argument("--image-size", type=int, default=None, help="image side (default: the model's, 512 for sd-15-shape)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per arm (default 3; 1 with --tiny)")
    ap.add_argument("--requests", type=int, default=3, help="staggered requests in the fusion demo")
    ap.add_argument("--stagger", type=int, default=None, help="steps between request starts (default 7; 2 with --tiny)")
    ap.add_argument("--calib-prompts", type=int, default=2, help="calibration prompts (DP features, W8A8 scales)")
    ap.add_argument("--quant-calib-steps", type=int, default=3, help="trajectory steps per prompt as W8A8 calibration feeds")
    ap.add_argument("--stage", choices=["all", "compile", "run"], default="all")
    ap.add_argument("--folders", default=",".join(FOLDERS),
                    help=f"engine folders to build/use (comma list of {', '.join(FOLDERS)}): compile them one per "
                         "command where a compile would not fit the device's time limit; a missing folder's arms say so")
    ap.add_argument("--root", default=None, help="engine folders (default artifacts/gpu-diffusion-MODEL-STEPS)")
    ap.add_argument("--out", default=None, help="results folder (default $OUT, else benchmarks/results)")
    ap.add_argument("--name", default=None, help="results file stem (default gpu_diffusion_<model>_<device kind>)")
    args = ap.parse_args()
    args.folders = [f for f in args.folders.split(",") if f]
    unknown = sorted(set(args.folders) - set(FOLDERS))
    if unknown:
        ap.error(f"--folders {unknown}: choose from {', '.join(FOLDERS)}")
    args.model = args.model or ("sd-tiny" if args.tiny else "sd-15-shape")
    args.steps = args.steps or (12 if args.tiny else 50)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    args.stagger = args.stagger if args.stagger is not None else (2 if args.tiny else STAGGER)
    res = run(args)
    out = Path(args.out or os.environ.get("OUT") or Path(__file__).parent / "results")
    gpu = (res["device"].get("gpu") or "gpu").split()  # "NVIDIA H100 80GB HBM3" -> h100
    kind = "cpu_smoke" if args.device == "cpu" else next((t for t in gpu if re.fullmatch(r"[A-Z]+\d+\w*", t)), "gpu").lower()
    name = args.name or f"gpu_diffusion_{args.model}_{kind}" + (f"_compile_{'_'.join(args.folders)}"
                                                                 if args.stage == "compile" else "")
    print(write(res, out, name).read_text())


if __name__ == "__main__":
    main()
