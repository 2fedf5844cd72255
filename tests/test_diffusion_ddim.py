"""The numpy DDIM sampler vs diffusers' DDIMScheduler (timesteps and per-sample updates)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ember.errors import InputError
from ember.export.diffusion.config import SD1_SCHEDULER
from ember.runtime.diffusion.ddim import DDIM


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [7, 50])
def test_ddim_matches_diffusers(spacing: str, steps: int) -> None:
    from diffusers import DDIMScheduler

    cfg = {**SD1_SCHEDULER, "timestep_spacing": spacing}
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    ours = DDIM.from_config(cfg)
    ts = ours.timesteps(steps)
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((len(ts), 4, 3, 3)).astype(np.float32)
    eps = rng.standard_normal(x.shape).astype(np.float32)
    # every sample at a different step, one vectorised call
    got = ours.step(eps, ts, x, np.full(len(ts), steps))
    for i, t in enumerate(ts):
        want = ref.step(torch.from_numpy(eps[i:i + 1]), int(t), torch.from_numpy(x[i:i + 1]), eta=0.0).prev_sample
        np.testing.assert_allclose(got[i], want.numpy()[0], rtol=1e-5, atol=1e-5)


def test_ddim_rejects_bad_steps_and_configs() -> None:
    ddim = DDIM.from_config(SD1_SCHEDULER)
    with pytest.raises(InputError, match="steps=0"):
        ddim.timesteps(0)
    from ember.errors import ArtifactError

    with pytest.raises(ArtifactError, match="v_prediction"):
        DDIM.from_config({**SD1_SCHEDULER, "prediction_type": "v_prediction"})


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_eps_weights_are_how_far_an_eps_error_moves_x0(spacing: str) -> None:
    """With a noise prediction that ignores x, the DDIM loop is affine in each step's eps: an error
    d at step i must move the final latent by exactly eps_weights[i] * d (in the x_0 scale)."""
    cfg = {**SD1_SCHEDULER, "timestep_spacing": spacing}
    ddim, steps = DDIM.from_config(cfg), 20
    ts = ddim.timesteps(steps)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((1, 4, 2, 2)).astype(np.float64), rng.standard_normal((1, 4, 2, 2))

    def final(bump_step: int | None) -> np.ndarray:
        x = x0.astype(np.float32)
        for i, t in enumerate(ts):
            e = eps + (1e-2 if i == bump_step else 0.0)
            x = ddim.step(e.astype(np.float32), np.array([t]), x, np.array([steps]))
        return x.astype(np.float64)

    w = ddim.eps_weights(steps)
    assert w.shape == (steps,) and (w > 0).all() and w[0] > 5 * w[steps // 2]  # early steps weigh most
    plain = final(None)
    for i in (0, 3, steps // 2, steps - 1):
        moved = float(np.mean(np.abs(final(i) - plain))) / 1e-2
        assert moved == pytest.approx(w[i], rel=2e-2), i


def test_measured_propagation_weights_equal_the_samplers_where_the_unet_ignores_its_input() -> None:
    """``diffusion_calib.propagation_weights`` perturbs one step's guided noise per batched copy of a
    calibration run and measures how far the final latent moves: with a noise prediction that
    ignores x (the loop is affine in each eps), that is exactly ``DDIM.eps_weights``, scaled to mean 1."""
    from ember.compiler.diffusion_calib import propagation_weights
    from ember.runtime.diffusion.denoise import DecRows, DenoiseJob, run_loop

    steps, rng = 12, np.random.default_rng(1)
    eps = rng.standard_normal((4, 2, 2)).astype(np.float32)

    class IgnoresInput:
        def run(self, feeds):
            r = len(feeds["sample"])
            return [np.repeat(eps[None], r, 0), np.zeros((r, 1, 1, 1), np.float32)]

    class Pipe:
        sampler = DDIM.from_config(SD1_SCHEDULER)
        full, shallow = IgnoresInput(), None

        def make_jobs(self, prompts, *, steps, seed, guidance_scale, cache):
            ts = self.sampler.timesteps(steps)
            rows = np.zeros((steps, 1), np.float32)
            return [DenoiseJob(text=np.zeros((2, 1, 1), np.float32),
                               latents=np.random.default_rng(s).standard_normal((4, 2, 2)).astype(np.float32),
                               timesteps=ts, full=np.ones(steps, bool), guidance_scale=guidance_scale,
                               dec=DecRows(rows + 1, rows, rows + 1, rows)) for s in seed], []

        def run_jobs(self, jobs, observer=None):
            return run_loop(jobs, self.sampler, self.full, self.shallow)

    pipe = Pipe()
    w = propagation_weights(pipe, ["a", "b"], steps, seed=5, guidance_scale=7.5)
    want = pipe.sampler.eps_weights(steps)
    np.testing.assert_allclose(w, want / want.mean(), rtol=2e-2)
    assert isinstance(pipe.full, IgnoresInput)  # the perturbing wrapper is gone afterwards
