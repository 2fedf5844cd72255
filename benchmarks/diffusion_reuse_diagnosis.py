"""Why a cache schedule or DEC helps or not on the trained reference pipeline: per-step measurements.

On the calibration trajectories (every step full, the DP's calibration prompts and seeds) of an
engine folder compiled from ``artifacts/reference-diffusion``:
- feature drift: ``||X_i - X_{i-1}||_1`` of the cached feature (docs/design.md §5.2's distance);
- noise error of reuse: ``||guided(shallow(step i; X_{i-1})) - guided(full(step i))||_1``, the
  error a one-step reuse puts into what the sampler steps with (``diffusion_calib.reuse_costs``);
- the sampler weight ``w_i`` (``DDIM.eps_weights``: how far an error in step i's noise reaches x_0
  if nothing later reacts to it) and the *measured* propagation: step i alone reuses the feature
  of step i - N, every other step runs full, and ``||x_0 - x_0(uncached)||_1`` is divided by
  ``w_i * ||noise error||_1`` (1 = the sampler's prediction; below 1 = later steps damp it);
- DEC: on held-out prompts, how much the fitted per-channel cache correction (and an oracle fitted
  per run and step on the held-out features themselves) reduces the feature error and the guided
  noise error at the reuse steps of a uniform schedule;
- DEC fit targets (``--dec-target feature|noise``) and calibration runs: each table fitted on the
  calibration prompts at 1 or ``--dec-seeds`` seeds each, checked on the calibration prompts at
  other seeds (5000+; not the evaluation set): the guided-noise MSE of reuse with the table as a
  fraction of without, and the closed loop (uniform schedule, PSNR of the image against the
  uncached one).

    python benchmarks/diffusion_reuse_diagnosis.py [--folder F] [--interval 5]
Writes benchmarks/results/diffusion_reuse_diagnosis.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from diffusion import psnr  # noqa: E402
from diffusion_reference import CALIB, EVAL  # noqa: E402
from machine import machine_info, machine_line  # noqa: E402

import ember  # noqa: E402
from ember.compiler import diffusion_calib as calib  # noqa: E402
from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion  # noqa: E402
from ember.compiler.diffusion_dec import fit_cache_through_tail  # noqa: E402
from ember.export.diffusion.source import load_source  # noqa: E402
from ember.runtime.diffusion.denoise import DecRows  # noqa: E402
from ember.passes.cache_schedule import uniform_schedule  # noqa: E402
from ember.passes.error_correction import fit_cache_correction, fit_channel_affine  # noqa: E402
from ember.reference.diffusion_train import DEFAULT_OUTPUT, ensure_reference_pipeline  # noqa: E402
from ember.runtime.diffusion.pipeline import DiffusionPipeline, to_uint8  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CALIB_SEED = DiffusionCompileOptions().calib_seed


def shallow_noise(pipe, feeds: dict, cached: np.ndarray, cc: int, qc: int, guidance: float,
                  scale: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    rows = cached.shape[0]
    f = {**feeds, "cached": cached, **calib.identity_rows(rows, cc, qc)}
    if scale is not None:
        f["cache_scale"], f["cache_bias"] = np.repeat(scale[None], rows, 0), np.repeat(bias[None], rows, 0)
    return calib.guided(pipe.shallow.run(f)[0], guidance)


def step_profiles(pipe, traj, steps: int, interval: int, guidance: float, cc: int, qc: int) -> dict[str, list[float]]:
    """Per step i >= 1, summed over calibration runs (see the module doc)."""
    w = pipe.sampler.eps_weights(steps)
    ts = pipe.sampler.timesteps(steps)
    drift, noise, predicted, measured = (np.zeros(steps) for _ in range(4))
    for feats, outs, feeds in zip(traj.features, traj.noise, traj.feeds):
        jobs, _ = pipe.make_jobs(["x"] * steps, steps=steps, seed=0, guidance_scale=guidance, cache=False)
        for i in range(1, steps):
            drift[i] += np.abs(feats[i] - feats[i - 1]).sum()
            target = calib.guided(outs[i], guidance)
            noise[i] += np.abs(shallow_noise(pipe, feeds[i], feats[i - 1], cc, qc, guidance) - target).sum()
            e = shallow_noise(pipe, feeds[i], feats[max(0, i - interval)], cc, qc, guidance)
            predicted[i] += w[i] * np.abs(e - target).sum()
            j = jobs[i]
            j.text = feeds[i]["encoder_hidden_states"]
            j.latents = pipe.sampler.step(e[None], ts[i:i + 1], feeds[i]["sample"][:1], np.array([steps]))[0]
            j.step = i + 1
        last = steps - 1
        jobs[0].latents = pipe.sampler.step(calib.guided(outs[last], guidance)[None], ts[last:],
                                            feeds[last]["sample"][:1], np.array([steps]))[0]
        jobs[0].step = steps  # the uncached trajectory's x_0
        pipe.run_jobs([j for j in jobs if not j.done])
        final = jobs[0].latents
        for i in range(1, steps):
            measured[i] += np.abs(jobs[i].latents - final).sum()
    return {"feature_drift": drift.tolist(), "noise_error": noise.tolist(), "sampler_weight": w.tolist(),
            "predicted_x0_error": predicted.tolist(), "measured_x0_error": measured.tolist()}


def dec_check(pipe, fit, held, steps: int, interval: int, guidance: float, cc: int, qc: int) -> dict[str, float]:
    """Held-out error at the reuse steps of a uniform schedule, as a fraction of the uncorrected error."""
    ref = uniform_schedule(steps, interval).reference()
    table = fit_cache_correction(fit.features, ref)
    sums = dict.fromkeys(("feature", "feature_dec", "feature_oracle", "noise", "noise_dec", "noise_oracle"), 0.0)
    for feats, outs, feeds in zip(held.features, held.noise, held.feeds):
        for t in range(steps):
            r = int(ref[t])
            if r == t:
                continue
            a, b = fit_channel_affine(feats[r], feats[t])
            target = calib.guided(outs[t], guidance)
            for key, s, c in (("", None, None), ("_dec", table.scale[t], table.bias[t]), ("_oracle", a, b)):
                x = feats[r] if s is None else feats[r] * s[None, :, None, None] + c[None, :, None, None]
                sums["feature" + key] += np.abs(x - feats[t]).sum()
                sums["noise" + key] += np.abs(shallow_noise(pipe, feeds[t], feats[r], cc, qc, guidance, s, c) - target).sum()
    return {k: float(sums[k] / sums[k.split("_")[0]]) for k in sums if "_" in k}


def dec_targets(pipe, source: Path, fit, check, steps: int, intervals: tuple[int, ...], guidance: float,
                cc: int, qc: int, closed_seeds: int) -> dict:
    """Per interval and table (target x calibration runs): the check runs' guided-noise MSE of reuse
    at the uniform schedule's reuse steps, as a fraction of without the table, and the closed-loop
    PSNR of the calibration prompts at ``closed_seeds`` other seeds each (5000+)."""
    src = load_source(source)
    prompts = list(CALIB) * closed_seeds
    seeds = [5000 + i for i in range(len(prompts))]
    base = pipe.generate(prompts, seed=seeds, steps=steps, cache=False)
    identity_q = (np.ones((steps, qc), np.float32), np.zeros((steps, qc), np.float32))
    out: dict = {}
    for n in intervals:
        ref, full = uniform_schedule(steps, n).reference(), uniform_schedule(steps, n).is_full()
        tables = {"none": (np.ones((steps, cc), np.float32), np.zeros((steps, cc), np.float32))}
        for runs in sorted({len(CALIB), len(fit.features)}):
            sub = calib.Trajectories(fit.features[:runs], fit.feeds[:runs], fit.noise[:runs])
            t = fit_cache_correction(sub.features, ref)
            tables[f"feature, {runs} runs"] = (t.scale, t.bias)
            t, _ = fit_cache_through_tail(src, 0, sub, ref, guidance)
            tables[f"noise, {runs} runs"] = (t.scale, t.bias)
        res: dict = {}
        for name, (scale, bias) in tables.items():
            mse = 0.0
            for feats, outs, feeds in zip(check.features, check.noise, check.feeds):
                for i in np.flatnonzero(ref != np.arange(steps)):
                    e = shallow_noise(pipe, feeds[i], feats[ref[i]], cc, qc, guidance, scale[i], bias[i])
                    mse += float(((e - calib.guided(outs[i], guidance)) ** 2).sum())
            jobs, _ = pipe.make_jobs(prompts, seed=seeds, steps=steps)
            for j in jobs:  # uniform N and this table's rows, whatever the folder was compiled with
                j.full, j.dec = full.copy(), DecRows(scale, bias, *identity_q)
            pipe.run_jobs(jobs)
            imgs = to_uint8(pipe.decode(np.stack([j.latents for j in jobs])))
            res[name] = {"noise_mse": mse, "psnr": [psnr(a, b) for a, b in zip(imgs, base.images)]}
        for r in res.values():
            r["noise_mse_fraction"] = r["noise_mse"] / res["none"]["noise_mse"]
        out[str(n)] = res
    return out


def run(args) -> dict:
    info = machine_info()
    source = ensure_reference_pipeline(Path(args.source))
    folder = Path(args.folder)
    if not (folder / "manifest.json").exists():
        compile_diffusion(str(source), folder, DiffusionCompileOptions(
            steps=args.steps, cache_interval=args.interval, schedule="uniform", quiet=True, guidance_scale=args.guidance),
            open_pipeline=DiffusionPipeline)
    pipe = ember.load(folder)
    spec = pipe.spec
    cc, qc = int(spec["cache_channels"]), int(spec["quant_channels"])
    fit = calib.collect_trajectories(pipe, list(CALIB), args.steps, CALIB_SEED, args.guidance)
    held = calib.collect_trajectories(pipe, list(EVAL), args.steps, 100, args.guidance)
    fit_more = calib.collect_trajectories(pipe, list(CALIB) * args.dec_seeds, args.steps, CALIB_SEED, args.guidance)
    check = calib.collect_trajectories(pipe, list(CALIB) * 3, args.steps, 5000, args.guidance)
    return {"machine": info, "source": str(source), "folder": str(folder), "steps": args.steps, "interval": args.interval,
            "guidance_scale": args.guidance, "calib_prompts": list(CALIB), "calib_seed": CALIB_SEED,
            "held_out_prompts": list(EVAL), "held_out_seed": 100,
            "profiles": step_profiles(pipe, fit, args.steps, args.interval, args.guidance, cc, qc),
            "dec": dec_check(pipe, fit, held, args.steps, args.interval, args.guidance, cc, qc),
            "dec_targets": dec_targets(pipe, source, fit_more, check, args.steps, (5, 10), args.guidance, cc, qc, 6)}


def write(res: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    p = {k: np.array(v) for k, v in res["profiles"].items()}
    steps, n = res["steps"], res["interval"]
    bins = [(a, min(a + 5, steps)) for a in range(1, steps, 5)]

    def rel(x: np.ndarray) -> list[str]:
        m = x[1:].mean()
        return [f"{x[a:b].mean() / m:.2f}" for a, b in bins]

    ratio = p["measured_x0_error"] / np.maximum(p["predicted_x0_error"], 1e-30)
    lines = [
        f"# Why the cache schedule and DEC do what they do — trained reference pipeline, {steps} DDIM steps, "
        f"CFG {res['guidance_scale']}",
        "",
        f"Machine: {machine_line(res['machine'])}. Engines: `{res['folder']}` (FP32). Calibration trajectories: "
        f"{', '.join(res['calib_prompts'])} (seeds {res['calib_seed']}+), every step full. "
        "Reproduce: `python benchmarks/diffusion_reuse_diagnosis.py`.",
        "",
        "Per step i, averaged over 5-step bins and divided by the mean over steps 1..49 (so 1.00 is average):",
        "- feature drift `‖X_i − X_{i−1}‖₁`: docs/design.md §5.2's distance (the `feature` DP objective);",
        "- noise error of a one-step reuse: the L1 error in step i's *guided* noise prediction when it reuses "
        "step i−1's feature (the `noise` DP objective, Ember's default);",
        "- sampler weight `w_i`: how far the DDIM update carries a noise error at step i into x_0, undamped "
        "(the `sampler` weights);",
        f"- measured/predicted: step i alone reuses the feature of step i−{n}, the rest of the trajectory runs full; "
        "the final latent's L1 change divided by `w_i ×` that step's noise error (1 = the sampler's prediction, "
        "< 1 = the trained denoiser damps the error);",
        "- measured x0 effect: that final-latent change itself.",
        "",
        "| steps | " + " | ".join(f"{a}-{b - 1}" for a, b in bins) + " |",
        "|---|" + "---|" * len(bins),
        "| feature drift | " + " | ".join(rel(p["feature_drift"])) + " |",
        "| noise error of reuse | " + " | ".join(rel(p["noise_error"])) + " |",
        "| sampler weight w | " + " | ".join(rel(p["sampler_weight"])) + " |",
        "| measured x0 effect | " + " | ".join(rel(p["measured_x0_error"])) + " |",
        "| measured / predicted | " + " | ".join(f"{ratio[a:b].mean():.3f}" for a, b in bins) + " |",
        "",
        f"DEC at the reuse steps of uniform N={n}, on the held-out prompts ({len(res['held_out_prompts'])}, seed "
        f"{res['held_out_seed']}): remaining error as a fraction of the uncorrected one.",
        "",
        "| correction | cached-feature L1 | guided-noise L1 |",
        "|---|---|---|",
        f"| DEC cache table (fitted on the calibration trajectories) | {res['dec']['feature_dec']:.3f} | "
        f"{res['dec']['noise_dec']:.3f} |",
        f"| oracle per-channel affine (fitted per held-out run and step on its own features) | "
        f"{res['dec']['feature_oracle']:.3f} | {res['dec']['noise_oracle']:.3f} |",
    ]
    if "dec_targets" in res:
        lines += ["", "DEC fit targets (`--dec-target`) and calibration runs: tables fitted on the calibration prompts "
                  "(seeds 1000+), checked on the calibration prompts at other seeds (5000+; not the evaluation set) "
                  "at a uniform schedule's reuse steps. Noise MSE: the guided-noise MSE of reuse on 9 such runs, as a "
                  "fraction of without DEC. PSNR: closed loop, 18 such images against their uncached images.", "",
                  "| N | table | noise MSE | PSNR (dB) | closer than without DEC |", "|---|---|---|---|---|"]
        for n, tabs in res["dec_targets"].items():
            none = np.array(tabs["none"]["psnr"])
            for k, v in tabs.items():
                p = np.array(v["psnr"])
                lines.append(f"| {n} | {k} | {v['noise_mse_fraction']:.3f} | {p.mean():.2f} | "
                             f"{int((p > none).sum())}/{len(p)} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_OUTPUT), help="reference pipeline folder (trained when missing)")
    ap.add_argument("--folder", default="artifacts/bench-diffusion-reference-50/uniform5",
                    help="FP32 engine folder of the source (compiled with a uniform schedule when missing)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--interval", type=int, default=5, help="N: the reuse distance of the propagation runs and DEC")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--dec-seeds", type=int, default=4, help="seeds per calibration prompt of the larger DEC fits")
    ap.add_argument("--name", default="diffusion_reuse_diagnosis", help="results file stem under benchmarks/results")
    ap.add_argument("--rewrite", action="store_true", help="rewrite the .md from the saved JSON (no runs)")
    args = ap.parse_args()
    if args.rewrite:
        write(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name)
    else:
        write(run(args), args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
