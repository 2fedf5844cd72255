"""Compiled diffusion folders (sd-tiny): runtime vs diffusers, fused staggered requests, DEC,
quantized + DEC compile, CLI, and input errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

import ember
from ember.compiler import diffusion_calib as calib
from ember.compiler.diffusion import DiffusionCompileOptions, compile_diffusion
from ember.errors import ConfigError, InputError
from ember.passes.cache_schedule import CacheSchedule, uniform_schedule
from ember.passes.error_correction import fit_cache_correction, fit_channel_affine, relative_l2
from ember.runtime.diffusion.pipeline import DiffusionPipeline

STEPS = 12
PROMPTS = ["a red cube on a table", "a much longer prompt that the tokenizer will have to truncate somewhere"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """sd-tiny saved as a diffusers StableDiffusionPipeline folder (the local-folder source path)."""
    from ember.export.diffusion.config import builtin_config
    from ember.export.diffusion.source import build_builtin, save_pipeline_folder

    return save_pipeline_folder(build_builtin(builtin_config("sd-tiny")), tmp_path_factory.mktemp("src") / "sd-tiny-pipe")


@pytest.fixture(scope="module")
def dp_engine(tiny_folder, tmp_path_factory):
    """Float engines from the folder, DP schedule N=3 over 12 steps, DEC tables."""
    out = tmp_path_factory.mktemp("eng") / "tiny-dp"
    opts = DiffusionCompileOptions(steps=STEPS, cache_interval=3, schedule="dp", dec=True, quiet=True,
                                   calib_prompts=("a cat", "a dog", "a house"), dec_target="noise")
    compile_diffusion(str(tiny_folder), out, opts, open_pipeline=DiffusionPipeline)
    return out


def test_uncached_float_pipeline_reproduces_diffusers(tiny_folder, dp_engine) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = ember.load(dp_engine)
    lat = np.random.default_rng(0).standard_normal((2, *pipe.latent_shape)).astype(np.float32)
    ours = pipe.generate(PROMPTS, steps=STEPS, latents=lat, cache=False)
    assert ours.loop.shallow_calls == 0 and ours.loop.full_calls == STEPS
    ref_pipe = StableDiffusionPipeline.from_pretrained(str(tiny_folder))
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5, latents=torch.from_numpy(lat),
                       output_type="latent").images.numpy()
    assert relative_l2(ours.latents, ref) < 1e-5
    np.testing.assert_allclose(ours.latents, ref, atol=1e-5 * np.abs(ref).max())
    assert ours.images[0].dtype == np.uint8 and ours.images[0].shape == (pipe.image_size, pipe.image_size, 3)


def test_manifest_records_schedule_branch_and_tables(dp_engine) -> None:
    m = json.loads((dp_engine / "manifest.json").read_text())
    d = m["extra"]["diffusion"]
    assert m["kind"] == "diffusion" and d["branch"] == 0
    c = d["cache"]
    assert c["method"] == "dp" and c["budget"] == 4 and c["full_steps"][0] == 0 and len(c["full_steps"]) == 4
    lengths = np.diff(c["full_steps"] + [STEPS])
    assert lengths.min() >= 2 and lengths.max() <= 6
    assert d["dec"]["file"] == "dec.npz" and [t["file"] for t in m["tables"]] == ["dec.npz"]
    assert {p["name"] for p in m["parts"]} == {"text_encoder", "unet_full", "unet_shallow", "vae_decoder"}


def test_cached_run_follows_schedule_and_fused_staggered_batch_matches_solo(dp_engine) -> None:
    pipe = ember.load(dp_engine)
    prompts = ["a cat", "a dog", "a boat"]
    fused = pipe.generate(prompts, steps=STEPS, seed=5, stagger=2)
    assert fused.loop.full_calls + fused.loop.shallow_calls < 3 * STEPS  # calls are shared
    assert any(f and s for f, s in fused.loop.group_sizes)  # some iteration ran both engines
    assert any(f + s == 3 for f, s in fused.loop.group_sizes)
    for i, p in enumerate(prompts):
        solo = pipe.generate([p], steps=STEPS, seed=5 + i)
        assert solo.loop.full_calls == 4 and solo.loop.shallow_calls == STEPS - 4
        np.testing.assert_allclose(fused.latents[i], solo.latents[0], rtol=1e-4, atol=1e-4 * np.abs(solo.latents).max())


def _run_and_record(pipe, **kw) -> list[tuple[int, str, dict]]:
    """(step, engine, feeds) of every UNet call of one request, as the loop ran them."""
    calls: list[tuple[int, str, dict]] = []
    jobs, _ = pipe.make_jobs(["a cat"], steps=STEPS, seed=1, **kw)
    pipe.run_jobs(jobs, observer=lambda job, kind, feeds, outs: calls.append((job.step, kind, feeds)))
    return calls


def test_loop_runs_exactly_the_manifest_schedule_and_feeds_the_dec_rows(dp_engine, tmp_path) -> None:
    """Each arm must run its own schedule: the full steps the loop ran are the manifest's, a uniform
    engine runs the uniform ones, and shallow steps get the DEC table's rows (identity with dec=False)."""
    pipe = ember.load(dp_engine)
    cache = pipe.manifest.extra["diffusion"]["cache"]
    assert cache["weights"] == "none" and cache["distance"] == "noise"
    calls = _run_and_record(pipe)
    assert [s for s, kind, _ in calls if kind == "full"] == cache["full_steps"]
    with np.load(dp_engine / "dec.npz") as z:
        tables = {k: z[k] for k in z.files}
    shallow = [(s, f) for s, kind, f in calls if kind == "shallow"]
    assert len(shallow) == STEPS - len(cache["full_steps"])
    for s, f in shallow:
        for name in ("cache_scale", "cache_bias", "quant_scale", "quant_bias"):
            np.testing.assert_array_equal(f[name], np.repeat(tables[name][s][None], 2, 0))
    assert any(not np.allclose(tables["cache_scale"][s], 1.0) for s, _ in shallow)
    for s, f in [(s, f) for s, kind, f in _run_and_record(pipe, dec=False) if kind == "shallow"]:
        assert (f["cache_scale"] == 1).all() and (f["cache_bias"] == 0).all()
    uni = tmp_path / "tiny-uniform"
    compile_diffusion("sd-tiny", uni, DiffusionCompileOptions(steps=STEPS, cache_interval=3, schedule="uniform", quiet=True), open_pipeline=DiffusionPipeline)
    assert [s for s, kind, _ in _run_and_record(ember.load(uni)) if kind == "full"] == [0, 3, 6, 9]
    assert all(k == "full" for _, k, _ in _run_and_record(pipe, cache=False))


def test_dp_schedule_minimises_the_guided_noise_error_of_reuse(dp_engine) -> None:
    """The default DP objective: D[s, i] = the L1 error reusing step s's feature puts into step i's
    guided noise prediction (shallow engine vs the full engine's own output on the calibration
    trajectory); the manifest's schedule is the DP optimum of exactly that matrix."""
    from ember.passes import cache_schedule as cs

    pipe = ember.load(dp_engine)
    spec = pipe.manifest.extra["diffusion"]
    cc, qc = spec["cache_channels"], spec["quant_channels"]
    traj = calib.collect_trajectories(pipe, ["a cat", "a dog", "a house"], STEPS, seed=1000, guidance_scale=7.5)
    span = cs.group_bounds(STEPS, 4)[1]
    cost = calib.reuse_costs(pipe, traj, span, 7.5, cc, qc)
    off = np.array([cost[s, i] for i in range(STEPS) for s in range(max(0, i - span + 1), i)])
    assert (off > 0).all()
    # reusing a step's own feature is the full step: the split graphs agree
    assert np.diag(cost).max() < 1e-4 * off.mean()
    assert all(cost[s, i] == 0 for s in range(STEPS) for i in range(STEPS) if i < s or i - s >= span)
    feeds, feats = traj.feeds[1][7], traj.features[1]
    shallow = pipe.shallow.run({**feeds, "cached": feats[4], **calib.identity_rows(2, cc, qc)})[0]
    one = np.abs(calib.guided(shallow, 7.5) - calib.guided(traj.noise[1][7], 7.5)).sum()
    others = sum(np.abs(calib.guided(pipe.shallow.run({**t[7], "cached": f[4], **calib.identity_rows(2, cc, qc)})[0], 7.5)
                        - calib.guided(n[7], 7.5)).sum()
                 for t, f, n in zip(traj.feeds[::2], traj.features[::2], traj.noise[::2]))
    assert cost[4, 7] == pytest.approx(one + others, rel=1e-5)
    assert list(cs.dp_schedule(cost, 4, cs.group_bounds(STEPS, 4)).full_steps) == spec["cache"]["full_steps"]


def test_dec_reduces_cached_feature_error_on_held_out_prompts(dp_engine) -> None:
    pipe = ember.load(dp_engine)
    fit = calib.collect_trajectories(pipe, ["a cat", "a dog", "a house", "a tree"], STEPS, seed=0, guidance_scale=7.5)
    held = calib.collect_trajectories(pipe, ["a red boat at sea", "an old castle"], STEPS, seed=100, guidance_scale=7.5)
    ref = uniform_schedule(STEPS, 3).reference()
    table = fit_cache_correction(fit.features, ref)
    before = after = 0.0
    for feats in held.features:
        for t in range(STEPS):
            if ref[t] != t:
                before += relative_l2(feats[ref[t]], feats[t])
                after += relative_l2(table.apply(t, feats[ref[t]]), feats[t])
    assert after < 0.9 * before, (before, after)


def test_dec_cache_table_lowers_the_guided_noise_error_of_reuse_on_the_calibration_runs(dp_engine) -> None:
    """The compiled cache table (noise target) must lower, through the exported shallow engine, the
    error reuse puts into the guided noise prediction on the compile's own calibration runs, at
    every cached step (L-BFGS starts at the identity and keeps it when it cannot do better)."""
    pipe = ember.load(dp_engine)
    spec = pipe.manifest.extra["diffusion"]
    cc, qc = spec["cache_channels"], spec["quant_channels"]
    assert spec["dec"]["target"] == "noise" and spec["dec"]["runs"] == 3 and spec["dec"]["shrink"] == "cv"
    cached_steps = {str(t) for t in np.flatnonzero(CacheSchedule.from_dict(spec["cache"]).reference() != np.arange(STEPS))}
    assert set(spec["dec"]["cv"]["gamma"]) == cached_steps  # one share per cached step, chosen on held-out runs
    mse = spec["dec"]["calibration_noise_mse"]
    assert mse["corrected"] < 0.9 * mse["uncorrected"], mse
    traj = calib.collect_trajectories(pipe, ["a cat", "a dog", "a house"], STEPS, seed=1000, guidance_scale=7.5)
    ref = CacheSchedule.from_dict(spec["cache"]).reference()
    with np.load(dp_engine / "dec.npz") as z:
        scale, bias = z["cache_scale"], z["cache_bias"]
    before = after = 0.0
    for t in np.flatnonzero(ref != np.arange(STEPS)):
        step_before = step_after = 0.0
        for feeds, feats, noise in zip(traj.feeds, traj.features, traj.noise):
            f = {**feeds[t], "cached": feats[ref[t]], **calib.identity_rows(2, cc, qc)}
            target = calib.guided(noise[t], 7.5)
            step_before += float(((calib.guided(pipe.shallow.run(f)[0], 7.5) - target) ** 2).sum())
            f["cache_scale"], f["cache_bias"] = np.repeat(scale[t][None], 2, 0), np.repeat(bias[t][None], 2, 0)
            step_after += float(((calib.guided(pipe.shallow.run(f)[0], 7.5) - target) ** 2).sum())
        assert step_after <= step_before * (1 + 1e-3), (t, step_before, step_after)
        before, after = before + step_before, after + step_after
    assert after < 0.9 * before, (before, after)


def test_affine_fit_recovers_known_channels() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5, 5))
    a, b = np.array([0.5, 2.0, -1.0]), np.array([0.1, -3.0, 0.0])
    fa, fb = fit_channel_affine(x, x * a[None, :, None, None] + b[None, :, None, None])
    np.testing.assert_allclose(fa, a, atol=1e-5)
    np.testing.assert_allclose(fb, b, atol=1e-5)


def test_output_affine_fit_recovers_the_correction_through_a_channel_mixing_tail() -> None:
    """fit_output_affine sees only the tail's output: it must find the per-channel (a, b) on the
    tail's input that reproduce the target, and keep its start when that is already optimal."""
    import torch

    from ember.passes.error_correction import fit_output_affine

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 3, generator=g), torch.randn(3, 5, generator=g)
    a, b = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([0.1, -3.0, 0.0])

    def tail(sa, sb):
        return torch.tanh((x * sa + sb) @ w)

    target = tail(a, b)
    fa, fb, start, end = fit_output_affine(tail, target, np.ones(3, np.float32), np.zeros(3, np.float32), iterations=200)
    np.testing.assert_allclose(fa, a.numpy(), atol=1e-3)
    np.testing.assert_allclose(fb, b.numpy(), atol=1e-3)
    assert end < 1e-6 * start
    same = fit_output_affine(tail, target, a.numpy(), b.numpy())
    np.testing.assert_array_equal(same[0], a.numpy())
    assert same[2] == same[3] == 0.0


def test_quantized_dec_compile_and_generate(tiny_folder, tmp_path) -> None:
    out = tmp_path / "tiny-q"
    m = compile_diffusion(str(tiny_folder), out, DiffusionCompileOptions(
        steps=8, cache_interval=2, quantize="int8", dec=True, quiet=True, calib_prompts=("a cat", "a dog")), open_pipeline=DiffusionPipeline)
    assert m.quantization["parts"]["unet_full"]["quantized_nodes"] > 0
    assert m.extra["diffusion"]["cache"]["features"] == "quantized"
    with np.load(out / "dec.npz") as z:
        assert not np.allclose(z["quant_scale"], 1.0) and not np.allclose(z["cache_scale"], 1.0)
    pipe = ember.load(out)
    res = pipe.generate("a cat", steps=8)
    assert res.loop.shallow_calls == 4 and np.isfinite(res.latents).all()


def test_quantized_engines_run_fused_int8_kernels(tiny_folder, tmp_path) -> None:
    """The runtime must load Q/DQ parts with the ORT optimizers the compiler disabled: with
    CommonSubexpressionElimination on, q/k/v projections and Gemms ran as float ops that
    dequantize their weights every call (measured on sd-small: W8A8 slower than FP32)."""
    import onnx

    from ember.runtime.diffusion.engines import PartSession

    out = tmp_path / "tiny-q"
    m = compile_diffusion(str(tiny_folder), out, DiffusionCompileOptions(
        steps=4, quantize="int8", quiet=True, calib_prompts=("a cat",)), open_pipeline=DiffusionPipeline)
    for name in ("unet_full", "unet_shallow"):
        part = m.part(name)
        assert "CommonSubexpressionElimination" in part.extra["ort_disabled_optimizers"]
        PartSession(out, part, optimized_path=tmp_path / f"{name}.opt.onnx")
        g = onnx.load(str(tmp_path / f"{name}.opt.onnx"), load_external_data=False).graph
        made_by = {o: n.op_type for n in g.node for o in n.output}
        float_reading_dq = [n.name for n in g.node if n.op_type in ("MatMul", "Gemm")
                            and any(made_by.get(i) == "DequantizeLinear" for i in n.input)]
        ops = {n.op_type for n in g.node}
        assert not float_reading_dq and "MatMulIntegerToFloat" in ops, (name, float_reading_dq)
    assert "QLinearConv" in {n.op_type for n in g.node}  # conv outputs are quantized: int8 convs


def test_bad_inputs_give_clear_errors(dp_engine, tmp_path) -> None:
    pipe = ember.load(dp_engine)
    with pytest.raises(InputError, match="fewer than the cache budget of 4"):
        pipe.generate("a cat", steps=3)
    with pytest.raises(InputError, match=f"compiled for {pipe.image_size}x{pipe.image_size}"):
        pipe.generate("a cat", height=pipe.image_size * 2)
    with pytest.raises(InputError, match="latents have shape"):
        pipe.generate("a cat", latents=np.zeros((1, 4, 3, 3), np.float32))
    with pytest.raises(InputError, match="no prompts"):
        pipe.generate([])
    other = pipe.generate("a cat", steps=STEPS + 3)
    assert other.notes and "uniform interval of 3" in other.notes[0]
    with pytest.raises(ConfigError, match="multiple of"):
        compile_diffusion("sd-tiny", tmp_path / "x", DiffusionCompileOptions(image_size=18, quiet=True), open_pipeline=DiffusionPipeline)
    with pytest.raises(ConfigError, match="not both"):
        DiffusionCompileOptions(cache_interval=3, cache_speedup=2.0)


def test_cli_generate_image_writes_png(dp_engine, tmp_path) -> None:
    from PIL import Image

    from ember.cli import main

    out = tmp_path / "img.png"
    assert main(["generate-image", str(dp_engine), "a cat", "-o", str(out), "--steps", str(STEPS), "--seed", "3"]) == 0
    img = Image.open(out)
    assert img.format == "PNG" and img.size == (16, 16)
    assert main(["generate-image", str(dp_engine), "a cat", "-o", str(out), "--steps", "2"]) == 2  # EmberError -> exit 2


def test_a_calibrating_compile_needs_the_pipeline_from_the_caller(tmp_path):
    """The compiler does not import the runtime: a compile that calibrates is handed the pipeline."""
    opts = DiffusionCompileOptions(steps=4, cache_interval=2, schedule="dp", quiet=True)
    with pytest.raises(ConfigError, match="open_pipeline=ember.runtime.diffusion.pipeline.DiffusionPipeline"):
        compile_diffusion("sd-tiny", tmp_path / "x", opts)
    assert not (tmp_path / "x").exists()



class _QuadraticTail:
    """A stand-in for GuidedTail: run k's loss is ||a - a_k||^2 + ||b - b_k||^2 (one channel)."""

    def __init__(self, a_runs, b_runs):
        self.a, self.b = np.asarray(a_runs, np.float64), np.asarray(b_runs, np.float64)

    def loss(self, t, r, runs, a, b):
        return float(np.mean([(a[0] - self.a[k]) ** 2 + (b[0] - self.b[k]) ** 2 for k in runs]))

    def fit(self, t, chosen):
        return np.array([self.a[chosen].mean()], np.float32), np.array([self.b[chosen].mean()], np.float32)


@pytest.mark.parametrize("a_runs, b_runs, gamma", [((2.0, 2.0, 2.0), (0.5, 0.5, 0.5), 1.0),   # every run agrees
                                                   ((3.0, -1.0, 1.0), (2.0, -2.0, 0.0), 0.0),  # no run predicts another
                                                   ((2.0,) * 6, (0.5,) * 6, 1.0),  # 6 runs: 3 folds of 2
                                                   ((3.0, -1.0, 1.0) * 2, (2.0, -2.0, 0.0) * 2, 0.0)])
def test_dec_shrinkage_keeps_the_correction_only_where_it_carries_to_held_out_runs(a_runs, b_runs, gamma) -> None:
    from ember.compiler.diffusion_dec import shrink_by_cv
    from ember.passes.error_correction import AffineTable

    tail = _QuadraticTail(a_runs, b_runs)
    ref = np.array([0, 0, 2])  # step 1 reuses step 0's feature
    full = AffineTable.identity(3, 1)
    runs = list(range(len(a_runs)))
    full.scale[1], full.bias[1] = tail.fit(1, runs)
    fitted_on = []

    def fit_runs(t, chosen):
        fitted_on.append(tuple(chosen))
        return tail.fit(t, chosen)

    shrunk, record = shrink_by_cv(tail, ref, full, fit_runs, runs)
    assert len(fitted_on) == min(len(runs), 3)  # one fit per fold, at most 3 folds
    assert all(len(c) == len(runs) - len(runs) // min(len(runs), 3) for c in fitted_on)
    assert record["gamma"] == {"1": gamma}
    np.testing.assert_allclose(shrunk.scale[1], 1 + gamma * (full.scale[1] - 1))
    np.testing.assert_allclose(shrunk.bias[1], gamma * full.bias[1])
    assert shrunk.scale[0] == 1 and shrunk.scale[2] == 1  # full steps keep the identity
    assert record["heldout_noise_mse_chosen"] <= record["heldout_noise_mse_uncorrected"]
    if gamma == 1.0:
        assert record["heldout_noise_mse_chosen"] < 1e-9 < record["heldout_noise_mse_uncorrected"]


def test_dec_uncond_runs_feed_the_dec_fit_and_leave_the_schedule(tiny_folder, dp_engine, tmp_path) -> None:
    """``dec_uncond_runs``: DEC's fit also sees runs of the empty prompt; the cache schedule comes from
    the calibration runs alone, so it is the plain compile's."""
    out = tmp_path / "u"
    opts = DiffusionCompileOptions(steps=STEPS, cache_interval=3, schedule="dp", dec=True, quiet=True,
                                   calib_prompts=("a cat", "a dog", "a house"), dec_target="noise", dec_uncond_runs=2)
    compile_diffusion(str(tiny_folder), out, opts, open_pipeline=DiffusionPipeline)
    got = json.loads((out / "manifest.json").read_text())["extra"]["diffusion"]
    plain = json.loads((dp_engine / "manifest.json").read_text())["extra"]["diffusion"]
    assert got["dec"]["fit_runs"] == {"calibration": 3, "empty_prompt": 2}
    assert got["cache"]["full_steps"] == plain["cache"]["full_steps"]
    with ember.load(out) as pipe:
        assert pipe.generate(["a cat"], steps=STEPS, seed=0).loop.shallow_calls > 0
    with pytest.raises(ConfigError, match="dec-uncond-runs"):
        DiffusionCompileOptions(steps=STEPS, dec=True, dec_uncond_runs=-1)
