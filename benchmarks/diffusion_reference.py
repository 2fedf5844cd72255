"""Fidelity of cache reuse, the DP schedule, DEC and W8A8 on the trained reference pipeline.

The reference pipeline (``ember/reference/diffusion_train.py``: coloured shapes, 32 px images,
8x8x4 latents; trained when artifacts/reference-diffusion is missing) is compiled into engine
folders, every arm generates the same prompts and seeds, and each arm's images are compared with
the FP32 uncached engine's images of the same prompt and seed:
  PSNR (dB, uint8 images), SSIM (7x7 uniform window, per channel, mean), relative L2 of the final
  latent. "different seed" compares the baseline with itself at another seed: the distance of an
  unrelated image of the same prompt (the floor of every column).
Arms per cache interval N (5, 10, 20; K = ceil(steps / N) full UNet calls each): uniform, DP with
the default objective (guided-noise reuse error) with and without DEC, DP with §5.2's feature
distance, DP with the feature distance weighted by the sampler (the previous default), and DP with
the default objective weighted by each step's measured propagation (``--schedule-weights measured``); DEC
with the noise target and with the feature target (the compiler's default) at N=5 and 10, each
with the held-out shrinkage (``--dec-shrink cv``, the default) and without it (``off``);
plus W8A8 uncached and W8A8 + DP N=5 without DEC and with DEC of either target. Every compile calibrates on the same
runs: the 3 calibration prompts x --calib-seeds seeds each (1 = the compiler's default), plus
--uncond-runs runs of the empty prompt (unconditional samples: every colour and shape the model
draws, yellow included, which no calibration prompt names).
Speed is not measured here (benchmarks/diffusion.py does that on sd-small).

    python benchmarks/diffusion_reference.py [--steps 50] [--seeds 6] [--calib-seeds 1]
Engine folders live in --root (default artifacts/bench-diffusion-reference-<steps>, with -calib<S>
for S > 1 calibration seeds) and are reused when present. Writes benchmarks/results/diffusion_reference.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from diffusion import db_cell, psnr, rel_err  # noqa: E402
from machine import machine_info, machine_line  # noqa: E402

import ember  # noqa: E402
from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion  # noqa: E402
from ember.compiler.diffusion_dec import DEC_TARGETS  # noqa: E402
from ember.reference import shapes  # noqa: E402
from ember.reference.diffusion_train import DEFAULT_OUTPUT, ensure_reference_pipeline  # noqa: E402
from ember.runtime.diffusion.pipeline import DiffusionPipeline  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CALIB = ("a red circle", "a green square", "a blue triangle")
EVAL = tuple(p for p in shapes.PROMPTS if p not in CALIB)  # the other 9 prompts
FLOOR = "different seed (unrelated image)"


def ssim(a: np.ndarray, b: np.ndarray, win: int = 7) -> float:
    """Mean SSIM of two uint8 [H, W, C] images: uniform win x win windows (valid positions only),
    sample covariances, K1 = 0.01, K2 = 0.03, range 255 (scikit-image's defaults)."""
    from numpy.lib.stride_tricks import sliding_window_view

    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    n = win * win
    cov_norm = n / (n - 1)

    def local_mean(img: np.ndarray) -> np.ndarray:
        return sliding_window_view(img, (win, win), axis=(0, 1)).mean(axis=(-2, -1))

    mx, my = local_mean(x), local_mean(y)
    vx = cov_norm * (local_mean(x * x) - mx * mx)
    vy = cov_norm * (local_mean(y * y) - my * my)
    vxy = cov_norm * (local_mean(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def compile_all(source: Path, root: Path, steps: int, guidance: float, calib_seeds: int,
                uncond_runs: int = 0, only: set[str] | None = None) -> dict[str, Path]:
    common = dict(steps=steps, calib_prompts=CALIB + ("",) * uncond_runs, calib_seeds=calib_seeds, guidance_scale=guidance, quiet=True,
                  overwrite=True)
    plan = {}
    for n in INTERVALS:
        # the default DP: guided-noise reuse error through the shallow engine, unweighted
        plan[f"dp{n}"] = DiffusionCompileOptions(cache_interval=n, schedule="dp", dec=n in DEC_INTERVALS,
                                                 dec_target="noise", **common)
        plan[f"dp{n}_feature"] = DiffusionCompileOptions(cache_interval=n, schedule="dp", schedule_distance="feature",
                                                         **common)  # docs/design.md §5.2's J
        plan[f"dp{n}_feature_sampler"] = DiffusionCompileOptions(  # the previous default
            cache_interval=n, schedule="dp", schedule_distance="feature", schedule_weights="sampler", **common)
        plan[f"dp{n}_measured"] = DiffusionCompileOptions(  # each step's cost weighted by its measured propagation
            cache_interval=n, schedule="dp", schedule_weights="measured", **common)
        plan[f"uniform{n}"] = DiffusionCompileOptions(cache_interval=n, schedule="uniform", **common)
        if n in DEC_INTERVALS:  # the same DP schedule (same calibration runs), the compiler's default DEC target
            plan[f"dp{n}_decfeature"] = DiffusionCompileOptions(cache_interval=n, schedule="dp", dec=True,
                                                                dec_target="feature", **common)
            for target, key in (("noise", ""), ("feature", "feature")):  # DEC also fitted on 6 empty-prompt runs
                plan[f"dp{n}_dec{key}u6"] = DiffusionCompileOptions(cache_interval=n, schedule="dp", dec=True,
                                                                    dec_target=target, dec_uncond_runs=6, **common)
            for target in DEC_TARGETS:  # the tables as fitted, without the held-out shrinkage (--dec-shrink off)
                plan[f"dp{n}_dec{target}_raw"] = DiffusionCompileOptions(
                    cache_interval=n, schedule="dp", dec=True, dec_target=target, dec_shrink="off", **common)
    plan["w8a8_dp5"] = DiffusionCompileOptions(cache_interval=5, schedule="dp", quantize="int8", dec=True,
                                               dec_target="noise", **common)
    plan["w8a8_dp5_decfeature"] = DiffusionCompileOptions(cache_interval=5, schedule="dp", quantize="int8", dec=True,
                                                          dec_target="feature", **common)  # the compiler's default DEC
    plan["w8a8_dp5_decu6"] = DiffusionCompileOptions(cache_interval=5, schedule="dp", quantize="int8", dec=True,
                                                     dec_target="noise", dec_uncond_runs=6, **common)
    out = {}
    for name, opts in plan.items():
        if only is not None and name not in only:
            continue
        out[name] = root / name
        if (root / name / "manifest.json").exists():
            continue
        t0 = time.perf_counter()
        compile_diffusion(str(source), root / name, opts, open_pipeline=DiffusionPipeline)
        print(f"compiled {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return out


INTERVALS = (5, 10, 20)  # N: K = ceil(50 / N) = 10, 5, 3 full steps
DEC_INTERVALS = (5, 10)


def _arms() -> dict[str, tuple[str, dict]]:
    """arm -> (engine folder key, generate kwargs)."""
    arms = {"FP32 uncached (baseline)": ("dp5", dict(cache=False))}
    for n in INTERVALS:
        arms[f"uniform N={n}"] = (f"uniform{n}", {})
        arms[f"DP N={n}"] = (f"dp{n}", dict(dec=False))
        arms[f"DP N={n}, feature J"] = (f"dp{n}_feature", {})
        arms[f"DP N={n}, feature J sampler-weighted"] = (f"dp{n}_feature_sampler", {})
        arms[f"DP N={n}, propagation-weighted"] = (f"dp{n}_measured", {})
        if n in DEC_INTERVALS:
            arms[f"DP N={n} + DEC"] = (f"dp{n}", {})
            arms[f"DP N={n} + DEC, feature target"] = (f"dp{n}_decfeature", {})
            arms[f"DP N={n} + DEC, no shrinkage"] = (f"dp{n}_decnoise_raw", {})
            arms[f"DP N={n} + DEC, feature target, no shrinkage"] = (f"dp{n}_decfeature_raw", {})
            arms[f"DP N={n} + DEC, uncond DEC runs"] = (f"dp{n}_decu6", {})
            arms[f"DP N={n} + DEC, feature target, uncond DEC runs"] = (f"dp{n}_decfeatureu6", {})
    arms["W8A8 uncached"] = ("w8a8_dp5", dict(cache=False))
    arms["DP N=5 + W8A8"] = ("w8a8_dp5", dict(dec=False))
    arms["DP N=5 + W8A8 + DEC"] = ("w8a8_dp5", {})
    arms["DP N=5 + W8A8 + DEC, feature target"] = ("w8a8_dp5_decfeature", {})
    arms["DP N=5 + W8A8 + DEC, uncond DEC runs"] = ("w8a8_dp5_decu6", {})
    return arms


ARMS = _arms()

# (first arm, second arm) compared image by image in the results
PAIRS = tuple((f"DP N={n}{v}", f"uniform N={n}") for n in INTERVALS
              for v in ("", ", feature J", ", feature J sampler-weighted", ", propagation-weighted")) + tuple(
    (f"DP N={n}", f"DP N={n}, feature J") for n in INTERVALS) + tuple(
    (f"DP N={n}, propagation-weighted", f"DP N={n}") for n in INTERVALS) + tuple(
    (f"DP N={n} + DEC", f"DP N={n}") for n in DEC_INTERVALS) + tuple(
    (f"DP N={n} + DEC, feature target", f"DP N={n}") for n in DEC_INTERVALS) + tuple(
    (f"DP N={n} + DEC{v}, no shrinkage", f"DP N={n}") for n in DEC_INTERVALS for v in ("", ", feature target")) + tuple(
    (f"DP N={n} + DEC", f"DP N={n} + DEC, feature target") for n in DEC_INTERVALS) + (
    ("DP N=5 + W8A8 + DEC", "DP N=5 + W8A8"), ("DP N=5 + W8A8 + DEC, feature target", "DP N=5 + W8A8"),
    ("DP N=5 + W8A8 + DEC, uncond DEC runs", "DP N=5 + W8A8")) + tuple(
    (f"DP N={n} + DEC{v}, uncond DEC runs", f"DP N={n}") for n in DEC_INTERVALS for v in ("", ", feature target"))


def run(args) -> dict:
    info = machine_info()
    source = ensure_reference_pipeline(Path(args.source))
    training = json.loads((source / "training.json").read_text())
    suffix = (f"-calib{args.calib_seeds}" if args.calib_seeds > 1 else "") + (
        f"-uncond{args.uncond_runs}" if args.uncond_runs else "")
    root = Path(args.root or f"artifacts/bench-diffusion-reference-{args.steps}{suffix}")
    arms = selected_arms(args.arms)
    folders = compile_all(source, root, args.steps, args.guidance, args.calib_seeds, args.uncond_runs,
                          only={key for key, _ in arms.values()} | {"dp5"})
    pipes = {k: ember.load(v) for k, v in folders.items()}
    seeds = [100 + s for s in range(args.seeds)]
    cases = [(p, s) for s in seeds for p in EVAL]
    prompts, case_seeds = [p for p, _ in cases], [s for _, s in cases]
    outs = {arm: pipes[key].generate(prompts, seed=case_seeds, steps=args.steps, **kw) for arm, (key, kw) in arms.items()}
    # the floor: the same prompt at the next seed (last seed wraps to the first)
    shifted = [s + 1 if s + 1 in seeds else seeds[0] for s in case_seeds]
    outs[FLOOR] = pipes["dp5"].generate(prompts, seed=shifted, steps=args.steps, cache=False)
    base = outs["FP32 uncached (baseline)"]
    schedules = {k: json.loads((v / "manifest.json").read_text())["extra"]["diffusion"]["cache"]["full_steps"]
                 for k, v in folders.items()}
    decs = {k: json.loads((v / "manifest.json").read_text())["extra"]["diffusion"]["dec"] for k, v in folders.items()}
    rows = []
    for arm, r in outs.items():
        # UNet calls the loop made (its requests share every call: all sit at the same step)
        full, shallow = r.loop.full_calls, r.loop.shallow_calls
        if full + shallow != args.steps:
            raise RuntimeError(f"{arm}: {full} full + {shallow} shallow calls for {args.steps} steps")
        p = [psnr(a, b) for a, b in zip(r.images, base.images)]
        rows.append({
            "arm": arm, "full_steps": full, "shallow_steps": shallow,
            "psnr_db": float(np.mean(p)) if arm != "FP32 uncached (baseline)" else float("inf"),
            "psnr_db_min": float(np.min(p)) if arm != "FP32 uncached (baseline)" else float("inf"),
            "ssim": float(np.mean([ssim(a, b) for a, b in zip(r.images, base.images)])),
            "latent_rel_err": float(np.mean([rel_err(x, y) for x, y in zip(r.latents, base.latents)])),
            "psnr_per_image": [float(v) for v in p],
        })
    write_grid(outs, RESULTS / f"{args.name}.png", columns=len(EVAL))
    return {"machine": info, "source": str(source), "training": {k: training[k] for k in (
            "wall_seconds", "stopped_by", "vae", "denoiser", "parameters", "data", "config", "torch", "diffusers")},
            "steps": args.steps, "guidance_scale": args.guidance, "sampler": "DDIM (eta=0)", "calib_prompts": list(CALIB),
            "calib_seeds": args.calib_seeds, "uncond_runs": args.uncond_runs, "dec": {k: v for k, v in decs.items() if v},
            "eval_prompts": list(EVAL), "seeds": seeds, "intervals": list(INTERVALS), "images_per_arm": len(cases), "rows": rows,
            "schedules": schedules, "arms_filter": args.arms or None}


def selected_arms(spec: str | None) -> dict[str, tuple[str, dict]]:
    """``ARMS`` whose name contains one of ``spec``'s comma-separated parts (all of them when empty),
    the FP32 baseline always."""
    parts = [p.strip() for p in (spec or "").split(",") if p.strip()]
    return {arm: v for arm, v in ARMS.items()
            if not parts or arm == "FP32 uncached (baseline)"
            or any(arm == p[1:] if p.startswith("=") else p in arm for p in parts)}


def write_grid(outs: dict, path: Path, columns: int, scale: int = 3) -> None:
    """One row per arm (first ``columns`` images), upscaled ``scale``x, for looking at."""
    from PIL import Image

    rows = [np.concatenate(r.images[:columns], axis=1) for r in outs.values()]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST).save(path)


def bootstrap_interval(d: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of paired differences ``d``."""
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def write(res: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    m, t = res["machine"], res["training"]
    lines = [
        f"# Diffusion fidelity on the trained reference pipeline — {res['steps']} DDIM steps, CFG {res['guidance_scale']}",
        "",
        f"Machine: {machine_line(m)}; load average at start {m['load_avg_1m_at_start']}.",
        f"Model: `{res['source']}` (coloured shapes, {t['data']['image_size']} px; UNet {t['parameters']['unet']:,} / "
        f"text encoder {t['parameters']['text_encoder']:,} / VAE {t['parameters']['vae']:,} parameters; "
        f"{t['denoiser']['steps']} UNet steps, VAE reconstruction {t['vae']['recon_psnr_db']:.1f} dB; trained in "
        f"{t['wall_seconds']:.0f} s, torch {t['torch']}).",
        f"{res['images_per_arm']} images per arm: the {len(res['eval_prompts'])} prompts not used for calibration x "
        f"seeds {res['seeds']}; calibration prompts {', '.join(res['calib_prompts'])} x {res.get('calib_seeds', 1)} seeds "
        f"each{' and the empty prompt x ' + str(res['uncond_runs']) if res.get('uncond_runs') else ''} "
        "(seeds 1000+, every compile the same runs). Every column compares an arm's "
        "image with the FP32 uncached engine's image of the same prompt and seed (mean over images; PSNR also the "
        "worst image). The last row is the baseline at another seed: an unrelated image of the same prompt.",
        "N is the cache interval: every schedule of an N makes the same K = ceil(steps / N) full UNet calls. "
        "\"DP\" is the default objective (the L1 error reuse puts into the guided noise prediction, measured through "
        "the shallow engine on the calibration trajectories, unweighted); \"feature J\" is docs/design.md §5.2's "
        "cached-feature distance; \"sampler-weighted\" adds the DDIM per-step weights (the previous default); "
        "\"propagation-weighted\" weights the default objective by each step's measured response (`--schedule-weights "
        "measured`: how far a small perturbation of that step's noise prediction moves the final latent). "
        "Why they differ: `diffusion_reuse_diagnosis.md`.",
        "",
        "| arm | full/shallow UNet calls | PSNR (dB) | worst PSNR (dB) | SSIM | final-latent rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ps, pm = db_cell(r["psnr_db"]), db_cell(r["psnr_db_min"])
        lines.append(f"| {r['arm']} | {r['full_steps']}/{r['shallow_steps']} | {ps} | {pm} | {r['ssim']:.4f} | "
                     f"{r['latent_rel_err']:.4f} |")
    by = {r["arm"]: r for r in res["rows"]}
    lines += ["", "Paired per image (same prompt and seed): how often the first arm is closer to the baseline than "
              "the second, the median PSNR difference, and the mean difference with its 95 % bootstrap interval "
              "(2000 resamples of the images, seed 0).", "",
              "| first arm | second arm | first closer | median PSNR difference (dB) | mean difference [95 % CI] (dB) |",
              "|---|---|---|---|---|"]
    for a, b in [(a, b) for a, b in PAIRS if a in by and b in by]:
        pa, pb = np.array(by[a]["psnr_per_image"]), np.array(by[b]["psnr_per_image"])
        lo, hi = bootstrap_interval(pa - pb)
        lines.append(f"| {a} | {b} | {int((pa > pb).sum())}/{len(pa)} | {float(np.median(pa - pb)):+.2f} | "
                     f"{float(np.mean(pa - pb)):+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    dec_pairs = [(a, b) for a, b in PAIRS if "DEC" in a and "DEC" not in b and a in by and b in by]
    prompts = res["eval_prompts"]
    lines += ["", "DEC minus no DEC per evaluation prompt (mean PSNR difference over its seeds, dB); the calibration "
              "prompts name red, green and blue, never yellow.", "",
              "| first arm | second arm | " + " | ".join(p.removeprefix("a ") for p in prompts) + " |",
              "|---|---|" + "---|" * len(prompts)]
    for a, b in dec_pairs:
        d = (np.array(by[a]["psnr_per_image"]) - np.array(by[b]["psnr_per_image"])).reshape(-1, len(prompts))
        lines.append(f"| {a} | {b} | " + " | ".join(f"{v:+.2f}" for v in d.mean(axis=0)) + " |")

    def gap(a: str, b: str) -> str:
        return f"{by[a]['psnr_db'] - by[b]['psnr_db']:+.2f} dB mean PSNR"

    def verdict(title: str, pairs: list[tuple[str, str, str]]) -> list[str]:
        """``- title: label gap, ...`` over the (label, a, b) pairs this run has both arms of."""
        have = [f"{label} {gap(a, b)}" for label, a, b in pairs if a in by and b in by]
        return [f"- {title}: " + ", ".join(have) + "."] if have else []

    intervals = res.get("intervals", INTERVALS)
    lines += ["", "Verdicts (mean over images; the paired table says how consistent each is):"]
    lines += verdict("DP (default objective) minus uniform at equal budget",
                     [(f"N={n}", f"DP N={n}", f"uniform N={n}") for n in intervals])
    lines += verdict("the previous default (feature J, sampler-weighted) minus uniform",
                     [(f"N={n}", f"DP N={n}, feature J sampler-weighted", f"uniform N={n}") for n in intervals])
    lines += verdict("DP weighted by measured propagation minus uniform",
                     [(f"N={n}", f"DP N={n}, propagation-weighted", f"uniform N={n}") for n in intervals])
    lines += verdict("DEC (noise target) minus no DEC",
                     [(f"DP N={n}", f"DP N={n} + DEC", f"DP N={n}") for n in DEC_INTERVALS]
                     + [("DP N=5 + W8A8", "DP N=5 + W8A8 + DEC", "DP N=5 + W8A8")])
    lines += verdict("DEC with the feature target (the compiler's default) minus no DEC",
                     [(f"DP N={n}", f"DP N={n} + DEC, feature target", f"DP N={n}") for n in DEC_INTERVALS]
                     + [("DP N=5 + W8A8", "DP N=5 + W8A8 + DEC, feature target", "DP N=5 + W8A8")])
    lines += verdict("DEC fitted with 6 empty-prompt runs too (`--dec-uncond-runs 6`) minus no DEC",
                     [(f"DP N={n}{v}", f"DP N={n} + DEC{v}, uncond DEC runs", f"DP N={n}")
                      for n in DEC_INTERVALS for v in ("", ", feature target")]
                     + [("DP N=5 + W8A8", "DP N=5 + W8A8 + DEC, uncond DEC runs", "DP N=5 + W8A8")])
    lines += verdict("the same tables without the held-out shrinkage (`--dec-shrink off`) minus no DEC",
                     [(f"DP N={n}{v}", f"DP N={n} + DEC{v}, no shrinkage", f"DP N={n}")
                      for n in DEC_INTERVALS for v in ("", ", feature target")])
    if "W8A8 uncached" in by:
        lines.append(f"- W8A8 distance to FP32 (uncached): {by['W8A8 uncached']['psnr_db']:.2f} dB PSNR, SSIM "
                     f"{by['W8A8 uncached']['ssim']:.4f}.")
    lines += [
              "", "Reproduce: `python scripts/train_reference_diffusion.py && python benchmarks/diffusion_reference.py"
              + (f" --calib-seeds {res['calib_seeds']}" if res.get("calib_seeds", 1) > 1 else "")
              + (f" --uncond-runs {res['uncond_runs']}" if res.get("uncond_runs") else "")
              + (f" --seeds {len(res['seeds'])}" if len(res.get("seeds", [])) != 6 else "")
              + (f" --arms '{res['arms_filter']}'" if res.get("arms_filter") else "")
              + (f" --name {name}" if name != "diffusion_reference" else "") + "`."]
    fits = [f"{k}: {v['calibration_noise_mse']['corrected'] / v['calibration_noise_mse']['uncorrected']:.3f}"
            for k, v in res.get("dec", {}).items() if v.get("calibration_noise_mse")]
    if fits:
        lines += ["", "DEC cache tables, guided-noise MSE of reuse on the calibration runs with the table, "
                  "as a fraction of without (summed over cached steps): " + "; ".join(fits) + "."]
    cvs = [f"{k}: mean share {v['cv']['mean_gamma']:.2f}, held-out MSE "
           f"{v['cv']['heldout_noise_mse_chosen'] / v['cv']['heldout_noise_mse_uncorrected']:.3f} of uncorrected"
           for k, v in res.get("dec", {}).items() if v.get("cv")]
    if cvs:
        lines += ["", "Held-out shrinkage (`--dec-shrink cv`): the share of each cached step's correction kept, chosen by "
                  "leaving one calibration run out: " + "; ".join(cvs) + "."]
    lines += ["", "Schedules (full steps): " + "; ".join(f"{k}: {v}" for k, v in res["schedules"].items()),
              "", f"Images (`{name}.png`): one row per arm in table order, the first seed's {len(res['eval_prompts'])} prompts."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_OUTPUT), help="reference pipeline folder (trained when missing)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=6, help="seeds per evaluation prompt (100, 101, ...)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--calib-seeds", type=int, default=1, help="seeds per calibration prompt of every compile")
    ap.add_argument("--uncond-runs", type=int, default=0, help="extra calibration runs of the empty prompt")
    ap.add_argument("--root", default=None, help="engine folders (default artifacts/bench-diffusion-reference-STEPS)")
    ap.add_argument("--rewrite", action="store_true", help="rewrite the .md from the saved JSON (no runs)")
    ap.add_argument("--name", default="diffusion_reference", help="results file stem under benchmarks/results")
    ap.add_argument("--arms", default="", help="comma-separated parts of arm names: run only the arms naming one "
                                               "(and the FP32 baseline), e.g. 'W8A8,DP N=5'; '=NAME' matches one arm "
                                               "exactly (default: every arm)")
    args = ap.parse_args()
    if args.rewrite:
        write(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name)
        return
    write(run(args), args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
