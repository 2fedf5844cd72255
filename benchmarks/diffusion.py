"""Diffusion cache reuse + W8A8 + DEC on CPU (sd-small, DDIM, CFG on): speed and fidelity vs FP32.

Arms, measured in one run on the same prompts and seeds (prompt-major, arms interleaved so
machine-load drift hits all arms alike):
  FP32 uncached (baseline) | uniform N=3 | uniform N=5 | DP N=5 (docs/design.md §5.2's unweighted J) |
  DP N=5 (sampler-weighted feature J) | DP N=5 + DEC | W8A8 uncached | DP N=5 + W8A8 |
  DP N=5 + W8A8 + DEC
The DP arms pin the feature objective they were published with (``schedule_distance="feature"``);
the compiler's default is now the unweighted noise objective (docs/diffusion.md, "Cache schedule").
Columns: UNet-loop and end-to-end wall-clock speedup vs baseline, UNet-loop MACs ratio,
UNet weight-size ratio, PSNR of the decoded uint8 image and relative L2 error of the final
latent vs the baseline's. Plus: per-call times of each UNet engine in FP32 and W8A8 (interleaved
calls, median), the non-UNet costs per image, and a fused-batch demo: the eval prompts as
staggered requests through one loop vs one after another.

    python benchmarks/diffusion.py --compile-only        # builds the 5 engine folders (no timing)
    flock /tmp/ember-bench.lock python benchmarks/diffusion.py [--steps 50] [--prompts 3]
Engine folders live in --root (default artifacts/bench-diffusion-<model>-<steps>) and are reused
when present, so the timed run holds the benchmark lock only for the measurements.
Writes benchmarks/results/diffusion.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line  # noqa: E402


def int8_kernels(isa: str) -> str:
    """How ONNX Runtime's int8 kernels run on a CPU with these ISA flags (machine.machine_info)."""
    if "vnni" in isa or "amx_int8" in isa:
        return f"{isa}: 8-bit weights, VNNI dot-product kernels"
    return f"{isa}, no VNNI: 7-bit weights, u8s8 kernels with int16 pair sums"

import ember  # noqa: E402
from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion  # noqa: E402
from ember.runtime.diffusion.pipeline import DiffusionPipeline  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CALIB = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dawn")
EVAL = ("a red fox in a snowy forest, golden hour", "a futuristic city skyline at night, neon lights",
        "a still life of apples and a jug, oil painting", "a sailing boat on a calm lake, misty morning")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def db_cell(db: float) -> str:
    """A PSNR table cell: two decimals, or ∞ for identical images."""
    return "∞" if db == float("inf") else f"{db:.2f}"


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def compile_all(root: Path, steps: int, model: str) -> tuple[dict[str, Path], float]:
    common = dict(steps=steps, calib_prompts=CALIB, quiet=True, overwrite=True)  # recompiles its own folders
    feature_j = dict(schedule_distance="feature", schedule_weights="sampler")
    plan = {
        "float_dp5": DiffusionCompileOptions(cache_interval=5, schedule="dp", dec=True, **feature_j, **common),
        "float_dp5_unweighted": DiffusionCompileOptions(cache_interval=5, schedule="dp", schedule_distance="feature",
                                                        schedule_weights="none", **common),
        "uniform3": DiffusionCompileOptions(cache_interval=3, schedule="uniform", **common),
        "uniform5": DiffusionCompileOptions(cache_interval=5, schedule="uniform", **common),
        "w8a8_dp5": DiffusionCompileOptions(cache_interval=5, schedule="dp", quantize="int8", dec=True, **feature_j,
                                            **common),
    }
    out, times_file = {}, root / "compile_times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    for name, opts in plan.items():
        out[name] = root / name
        if (root / name / "manifest.json").exists() and name in times:
            continue
        t0 = time.perf_counter()
        compile_diffusion(model, root / name, opts, open_pipeline=DiffusionPipeline)
        times[name] = time.perf_counter() - t0
        print(f"compiled {name} in {times[name]:.1f} s", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        times_file.write_text(json.dumps(times))
    return out, sum(times.values())


# arm -> (engine folder key, generate kwargs)
ARMS = {
    "FP32 uncached (baseline)": ("float_dp5", dict(cache=False)),
    "uniform N=3": ("uniform3", {}),
    "uniform N=5": ("uniform5", {}),
    "DP N=5, unweighted J": ("float_dp5_unweighted", {}),
    "DP N=5": ("float_dp5", dict(dec=False)),
    "DP N=5 + DEC": ("float_dp5", {}),
    "W8A8 uncached": ("w8a8_dp5", dict(cache=False)),
    "DP N=5 + W8A8": ("w8a8_dp5", dict(dec=False)),
    "DP N=5 + W8A8 + DEC": ("w8a8_dp5", {}),
}


def unet_bytes(folder: Path, cached: bool) -> int:
    m = json.loads((folder / "manifest.json").read_text())
    sizes = {p["name"]: p["size"] for p in m["parts"]}
    return sizes["unet_full"] + (sizes["unet_shallow"] if cached else 0)


def loop_macs(folder: Path, full_steps: int, shallow_steps: int) -> int:
    macs = json.loads((folder / "manifest.json").read_text())["extra"]["diffusion"]["macs_per_sample"]
    return full_steps * macs["unet_full"] + shallow_steps * macs["unet_shallow"]


def run(args) -> dict:
    info = machine_info()
    root = Path(args.root or f"artifacts/bench-diffusion-{args.model}-{args.steps}")
    folders, compile_s = compile_all(root, args.steps, args.model)
    t_start = time.perf_counter()
    pipes = {k: ember.load(v) for k, v in folders.items()}
    for p in pipes.values():  # warm-up: first ORT runs allocate; one full + one shallow step
        jobs, _ = p.make_jobs(["warm up"], steps=2, cache=False)
        jobs[0].full[1] = False
        p.run_jobs(jobs)
        p.decode(jobs[0].latents[None])
    prompts = EVAL[: args.prompts]
    rec: dict[str, list[dict]] = {a: [] for a in ARMS}
    for i, prompt in enumerate(prompts):
        seed = 100 + i
        for arm, (key, kw) in ARMS.items():
            r = pipes[key].generate(prompt, steps=args.steps, seed=seed, **kw)
            rec[arm].append({"unet_s": r.timings["unet_s"], "total_s": r.timings["total_s"], "timings": r.timings,
                             "image": r.images[0],
                             "latents": r.latents[0], "full": r.loop.full_calls, "shallow": r.loop.shallow_calls})
        print(f"prompt {i + 1}/{len(prompts)} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    base = rec["FP32 uncached (baseline)"]
    base_unet, base_total = sum(r["unet_s"] for r in base), sum(r["total_s"] for r in base)
    base_macs = loop_macs(folders["float_dp5"], args.steps, 0)
    base_bytes = unet_bytes(folders["float_dp5"], cached=False)
    rows = []
    for arm, (key, kw) in ARMS.items():
        rs = rec[arm]
        cached = kw.get("cache", True)
        rows.append({
            "arm": arm,
            "full_steps": rs[0]["full"], "shallow_steps": rs[0]["shallow"],
            "unet_s": sum(r["unet_s"] for r in rs), "total_s": sum(r["total_s"] for r in rs),
            "per_prompt_unet_s": [r["unet_s"] for r in rs], "per_prompt_total_s": [r["total_s"] for r in rs],
            # median over prompts of the per-prompt ratio: robust to bursts of load from other processes
            "unet_speedup": float(np.median([b["unet_s"] / r["unet_s"] for r, b in zip(rs, base)])),
            "e2e_speedup": float(np.median([b["total_s"] / r["total_s"] for r, b in zip(rs, base)])),
            "unet_speedup_of_totals": base_unet / sum(r["unet_s"] for r in rs),
            "e2e_speedup_of_totals": base_total / sum(r["total_s"] for r in rs),
            "macs_ratio": base_macs / loop_macs(folders[key], rs[0]["full"], rs[0]["shallow"]),
            "weight_ratio": base_bytes / unet_bytes(folders[key], cached),
            "psnr_db": float(np.mean([psnr(r["image"], b["image"]) for r, b in zip(rs, base)])),
            "latent_rel_err": float(np.mean([rel_err(r["latents"], b["latents"]) for r, b in zip(rs, base)])),
        })
    fused = fused_demo(pipes["float_dp5"], prompts, args.steps)
    calls = engine_call_ms(pipes["float_dp5"], pipes["w8a8_dp5"])
    macs = json.loads((folders["float_dp5"] / "manifest.json").read_text())["extra"]["diffusion"]["macs_per_sample"]
    schedules = {k: json.loads((v / "manifest.json").read_text())["extra"]["diffusion"]["cache"] for k, v in folders.items()}
    non_unet = {k: float(np.median([r["timings"][k] for r in base])) for k in ("text_s", "vae_s")}
    non_unet["loop_other_s"] = float(np.median([r["timings"]["loop_s"] - r["timings"]["unet_s"] for r in base]))
    return {"machine": info, "model": args.model, "steps": args.steps, "guidance_scale": 7.5, "sampler": "DDIM (eta=0)",
            "eval_prompts": list(prompts), "calib_prompts": list(CALIB), "compile_s": compile_s, "rows": rows,
            "fused": fused, "ms_per_call": calls, "macs_full_over_shallow": macs["unet_full"] / macs["unet_shallow"],
            "non_unet_s_per_image": float(np.mean([r["total_s"] - r["unet_s"] for r in base])),
            "non_unet_parts_s": non_unet, "schedules": {k: v["full_steps"] for k, v in schedules.items()},
            "total_s": time.perf_counter() - t_start}


def engine_call_ms(fp32, w8a8, rounds: int = 12) -> dict[str, dict[str, float]]:
    """Median (and min) ms of one UNet call at batch 2 (the CFG rows), the four engines'
    calls interleaved round by round so load from other processes hits them alike."""
    steps = int(fp32.spec["steps"])
    jobs, _ = fp32.make_jobs(["a lighthouse on a cliff"], steps=steps, seed=7, cache=False)
    feeds: dict[str, dict] = {}

    def grab(job, kind, f, outs):  # real inputs from one step a fifth into the trajectory
        if kind == "full" and job.step == steps // 5:
            feeds["full"] = dict(f)
            feeds["shallow"] = {**f, "cached": outs[1], "cache_scale": np.ones((2, outs[1].shape[1]), np.float32),
                                "cache_bias": np.zeros((2, outs[1].shape[1]), np.float32)}

    fp32.run_jobs(jobs, observer=grab)
    qc = int(fp32.spec["quant_channels"])
    feeds["shallow"].update(quant_scale=np.ones((2, qc), np.float32), quant_bias=np.zeros((2, qc), np.float32))
    engines = {("fp32", "full"): fp32.full, ("fp32", "shallow"): fp32.shallow,
               ("w8a8", "full"): w8a8.full, ("w8a8", "shallow"): w8a8.shallow}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for (prec, kind), eng in engines.items():
            t0 = time.perf_counter()
            eng.run(feeds[kind])
            times[(prec, kind)].append(1000 * (time.perf_counter() - t0))
    out: dict[str, dict[str, float]] = {"fp32": {}, "w8a8": {}}
    for (prec, kind), ts in times.items():
        out[prec][kind] = float(np.median(ts))
        out[prec][f"{kind}_min"] = float(np.min(ts))
    return out



def fused_demo(pipe, prompts, steps: int) -> dict:
    """Staggered requests (request i joins at step 7i) in one fused loop vs one after another."""
    t0 = time.perf_counter()
    seq = [pipe.generate(p, steps=steps, seed=100 + i, dec=False, decode=False) for i, p in enumerate(prompts)]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused = pipe.generate(list(prompts), steps=steps, seed=100, dec=False, stagger=7, decode=False)
    t_fused = time.perf_counter() - t0
    diff = max(rel_err(fused.latents[i], s.latents[0]) for i, s in enumerate(seq))
    return {"requests": len(prompts), "stagger_steps": 7, "sequential_s": t_seq, "fused_s": t_fused,
            "speedup": t_seq / t_fused, "unet_calls_sequential": sum(s.loop.full_calls + s.loop.shallow_calls for s in seq),
            "unet_calls_fused": fused.loop.full_calls + fused.loop.shallow_calls, "max_latent_rel_diff": diff}


def write(res: dict, name: str = "diffusion") -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    m = res["machine"]
    lines = [
        f"# Diffusion: cache reuse, DP schedule, W8A8, DEC — {res['model']}, {res['steps']} DDIM steps, CFG 7.5",
        "",
        f"Machine: {machine_line(m)}; load average at start {m['load_avg_1m_at_start']}.",
        f"{len(res['eval_prompts'])} held-out prompts (one seed each; {len(res['calib_prompts'])} other prompts calibrate); "
        f"speedups are the median over prompts of (baseline time / arm time) for the same prompt in the same run (arms "
        f"interleaved per prompt); fidelity is the mean over prompts. Compile of the {len(res['schedules'])} engine "
        f"folders (calibration, quantization and DEC fits included): {res['compile_s']:.0f} s; the timed part "
        f"{res['total_s']:.0f} s. \"DP\" is the DP schedule with the sampler-weighted feature objective; "
        "\"unweighted J\" is docs/design.md §5.2's objective as written.",
        "",
        "| arm | full/shallow steps | UNet-loop speedup | end-to-end speedup | UNet MACs ratio | UNet weight-size ratio | PSNR vs baseline (dB) | final-latent rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ps = db_cell(r["psnr_db"])
        lines.append(f"| {r['arm']} | {r['full_steps']}/{r['shallow_steps']} | {r['unet_speedup']:.2f}× | "
                     f"{r['e2e_speedup']:.2f}× | {r['macs_ratio']:.2f}× | {r['weight_ratio']:.2f}× | {ps} | "
                     f"{r['latent_rel_err']:.4f} |")
    f, c, by = res["fused"], res["ms_per_call"], {r["arm"]: r for r in res["rows"]}
    got = by["DP N=5 + W8A8 + DEC"]["e2e_speedup"]
    same = [by[a]["unet_speedup"] for a in ("uniform N=5", "DP N=5, unweighted J", "DP N=5", "DP N=5 + DEC")]
    verdict = "met" if got >= 5 else f"short by {5 - got:.2f}× ({got / 5:.0%} of the target)"
    t, k = res["steps"], by["DP N=5 + W8A8 + DEC"]["full_steps"]
    o = res["non_unet_s_per_image"] * 1000
    model = (t * c["fp32"]["full"] + o) / (k * c["w8a8"]["full"] + (t - k) * c["w8a8"]["shallow"] + o)
    n = res["non_unet_parts_s"]

    def fid(arm: str) -> str:
        return f"{by[arm]['psnr_db']:.2f} dB / {by[arm]['latent_rel_err']:.4f}"

    lines += [
        "",
        f"**Target ≥ 5× end-to-end** for DP N=5 + W8A8 + DEC: measured {got:.2f}× — {verdict}. From the per-call "
        f"medians below, {k} W8A8 full + {t - k} W8A8 shallow calls + the non-UNet work against {t} FP32 full calls "
        f"predict {model:.2f}×. Why not 5×: (1) W8A8 buys only {c['fp32']['full'] / c['w8a8']['full']:.2f}× per full "
        f"call on this CPU ({int8_kernels(m['isa'])}; the attention softmax and score matmuls stay "
        f"float); (2) the shallow engine is {1 / res['macs_full_over_shallow']:.0%} of the full one's MACs but "
        f"{c['w8a8']['shallow'] / c['w8a8']['full']:.0%} of its time — its one self-attention over the 32×32 latent "
        "is memory-bound; (3) text encoder + VAE decode + sampler are a fixed cost per image.",
        "",
        f"**DP vs uniform** (N=5, 10 full steps each): uniform {fid('uniform N=5')}; DP with docs/design.md §5.2's unweighted J "
        f"{fid('DP N=5, unweighted J')}; DP with the sampler-weighted J {fid('DP N=5')} (PSNR / final-latent error).",
        "",
        f"**DEC**: FP32 DP {fid('DP N=5')} → + DEC {fid('DP N=5 + DEC')}; W8A8 DP {fid('DP N=5 + W8A8')} → + DEC "
        f"{fid('DP N=5 + W8A8 + DEC')}.",
        "",
        f"Timing noise: the arms doing identical work (uniform N=5, both DP N=5, DP N=5 + DEC) measured "
        f"{min(same):.2f}×–{max(same):.2f}× UNet-loop speedup (machine shared with other jobs); "
        "fidelity columns are deterministic.",
        "",
        "Per UNet call, batch 2 (CFG rows), median (min) of interleaved calls:",
        "",
        "| engine | FP32 ms | W8A8 ms | FP32 / W8A8 |",
        "|---|---|---|---|",
        *[f"| {e} | {c['fp32'][e]:.1f} ({c['fp32'][e + '_min']:.1f}) | {c['w8a8'][e]:.1f} ({c['w8a8'][e + '_min']:.1f}) | "
          f"{c['fp32'][e] / c['w8a8'][e]:.2f}× |" for e in ("full", "shallow")],
        "",
        f"Time ratio full/shallow {c['fp32']['full'] / c['fp32']['shallow']:.1f}× (FP32), "
        f"{c['w8a8']['full'] / c['w8a8']['shallow']:.1f}× (W8A8) vs MACs ratio {res['macs_full_over_shallow']:.1f}×. "
        f"Non-UNet work per image (baseline arm, median): text encoder {1000 * n['text_s']:.0f} ms, VAE decode "
        f"{1000 * n['vae_s']:.0f} ms, DDIM updates + feeds {1000 * n['loop_other_s']:.0f} ms.",
        "",
        f"Fused staggered batch (DP N=5): {f['requests']} requests, request i joins at step {f['stagger_steps']}·i: "
        f"{f['fused_s']:.1f} s fused vs {f['sequential_s']:.1f} s one after another ({f['speedup']:.2f}×; "
        f"{f['unet_calls_fused']} vs {f['unet_calls_sequential']} UNet calls; max latent difference "
        f"{f['max_latent_rel_diff']:.1e}).",
        "",
        "Schedules (full steps): " + "; ".join(f"{k}: {v}" for k, v in res["schedules"].items()),
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in res["rows"][1:]:
            ax.scatter(r["e2e_speedup"], r["psnr_db"])
            ax.annotate(r["arm"], (r["e2e_speedup"], r["psnr_db"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel("end-to-end speedup vs FP32 uncached (×)")
        ax.set_ylabel("PSNR vs FP32 uncached image (dB)")
        ax.set_title(f"{res['model']}, {res['steps']} DDIM steps, CFG on ({m['cores']} CPU cores)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / f"{name}.png", dpi=110)
    except ImportError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd-small")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--root", default=None, help="engine folders (default artifacts/bench-diffusion-MODEL-STEPS)")
    ap.add_argument("--compile-only", action="store_true", help="build the engine folders and stop")
    ap.add_argument("--rewrite", action="store_true", help="rewrite the .md/.png from the saved JSON (no runs)")
    ap.add_argument("--name", default="diffusion", help="results file stem under benchmarks/results")
    args = ap.parse_args()
    if args.rewrite:
        write(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name)
        return
    if args.compile_only:
        compile_all(Path(args.root or f"artifacts/bench-diffusion-{args.model}-{args.steps}"), args.steps, args.model)
        return
    res = run(args)
    write(res, args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
