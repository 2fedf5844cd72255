"""The fused denoising loop: many requests, each at its own step, one UNet call per engine per iteration.

Every iteration (schedule -> execute -> update):
1. schedule: each live job is due a *full* step (its schedule says so, or it has no cached
   feature yet) or a *shallow* step; jobs waiting for their start iteration sit out.
2. execute: the full group runs the full engine, the shallow group the shallow engine; each
   job contributes its CFG rows (uncond, cond), its own timestep and its own DEC rows.
3. update: classifier-free guidance per job, DDIM step per job, cache the full group's
   features, retire finished jobs.

A job's result does not depend on which other jobs share its calls (per-sample timesteps,
per-sample correction rows; the engines have no cross-batch ops).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ember.runtime.diffusion.ddim import DDIM
from ember.runtime.diffusion.engines import PartSession


@dataclass
class DecRows:
    """Per-step correction rows, each [T, C] float32 (docs/design.md §5.3); ones/zeros = no correction."""

    cache_scale: np.ndarray
    cache_bias: np.ndarray
    quant_scale: np.ndarray
    quant_bias: np.ndarray


@dataclass(eq=False)
class DenoiseJob:
    """One request's denoising state. ``text`` [R, S, D] with R = 2 (uncond, cond) under CFG, else 1."""

    text: np.ndarray
    latents: np.ndarray  # [C, h, w]
    timesteps: np.ndarray  # [steps] int64
    full: np.ndarray  # [steps] bool: run the full engine at this step
    guidance_scale: float
    dec: DecRows  # identity rows when the request runs without DEC
    start: int = 0  # iteration at which the job joins the loop
    step: int = 0
    cached: np.ndarray | None = None  # [R, Cc, h', w'] from the last full step
    stats: dict[str, int] = field(default_factory=lambda: {"full": 0, "shallow": 0})

    def __post_init__(self) -> None:
        assert self.full.shape == self.timesteps.shape and self.full[0], "step 0 must be a full step"
        assert self.text.ndim == 3 and self.latents.ndim == 3

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def rows(self) -> int:
        return self.text.shape[0]

    def wants_full(self) -> bool:
        return bool(self.full[self.step]) or self.cached is None


# observer(job, kind, feeds_of_this_job, outputs_of_this_job) — compile-time calibration hook.
Observer = Callable[[DenoiseJob, str, dict, list], None]


@dataclass
class LoopStats:
    iterations: int = 0
    full_calls: int = 0
    shallow_calls: int = 0
    unet_seconds: float = 0.0
    group_sizes: list[tuple[int, int]] = field(default_factory=list)  # (full jobs, shallow jobs) per iteration


def _feeds(jobs: list[DenoiseJob], shallow: bool) -> dict[str, np.ndarray]:
    feeds = {
        "sample": np.concatenate([np.repeat(j.latents[None], j.rows, 0) for j in jobs]),
        "timestep": np.concatenate([np.full(j.rows, j.timesteps[j.step], np.float32) for j in jobs]),
        "encoder_hidden_states": np.concatenate([j.text for j in jobs]),
    }
    if shallow:
        feeds["cached"] = np.concatenate([j.cached for j in jobs])
        for name in ("cache_scale", "cache_bias", "quant_scale", "quant_bias"):
            feeds[name] = np.concatenate([np.repeat(getattr(j.dec, name)[j.step][None], j.rows, 0) for j in jobs])
    return feeds


def _execute(engine: PartSession, jobs: list[DenoiseJob], kind: str, observer: Observer | None) -> list[list[np.ndarray]]:
    feeds = _feeds(jobs, kind == "shallow")
    outs = engine.run(feeds)
    split, at = [], 0
    for j in jobs:
        mine = [o[at:at + j.rows] for o in outs]
        if observer is not None:
            observer(j, kind, {k: v[at:at + j.rows] for k, v in feeds.items()}, mine)
        split.append(mine)
        at += j.rows
    return split


def _update(sampler: DDIM, jobs: list[DenoiseJob], outs: list[list[np.ndarray]], kind: str) -> None:
    eps = []
    for j, o in zip(jobs, outs):
        e = o[0]
        eps.append(e[0] + j.guidance_scale * (e[1] - e[0]) if j.rows == 2 else e[0])
        if kind == "full":
            j.cached = o[1]
        j.stats[kind] += 1
    t = np.array([j.timesteps[j.step] for j in jobs])
    steps = np.array([j.steps for j in jobs])
    new = sampler.step(np.stack(eps), t, np.stack([j.latents for j in jobs]), steps)
    for j, x in zip(jobs, new):
        j.latents = x
        j.step += 1


def run_loop(jobs: list[DenoiseJob], sampler: DDIM, full: PartSession, shallow: PartSession | None,
             observer: Observer | None = None) -> LoopStats:
    """Denoise every job to completion (in place: each job's ``latents`` ends as x_0)."""
    stats = LoopStats()
    it = 0
    while any(not j.done for j in jobs):
        live = [j for j in jobs if j.start <= it and not j.done]
        fulls = [j for j in live if j.wants_full() or shallow is None]
        shallows = [j for j in live if j not in fulls]
        stats.group_sizes.append((len(fulls), len(shallows)))
        t0 = time.perf_counter()
        outs_full = _execute(full, fulls, "full", observer) if fulls else []
        outs_shallow = _execute(shallow, shallows, "shallow", observer) if shallows else []
        stats.unet_seconds += time.perf_counter() - t0
        stats.full_calls += bool(fulls)
        stats.shallow_calls += bool(shallows)
        if fulls:
            _update(sampler, fulls, outs_full, "full")
        if shallows:
            _update(sampler, shallows, outs_shallow, "shallow")
        it += 1
    stats.iterations = it
    return stats
