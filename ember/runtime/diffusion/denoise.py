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

The loop is written once for two array kinds (``ArrayOps``): numpy on the host (``HOST``, the
CPU ``PartSession`` path) and torch tensors on a device (``torch_ops``, the ``DevicePartSession``
path: latents, text embeddings, cached features and DEC rows stay on the device, the CFG mix and
the DDIM update run there). Observers always see numpy arrays.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ember.runtime.diffusion.ddim import DDIM


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

    text: Any  # numpy array or device tensor (the loop's ArrayOps kind), as latents, cached, dec rows
    latents: Any  # [C, h, w] float32
    timesteps: np.ndarray  # [steps] int64
    full: np.ndarray  # [steps] bool: run the full engine at this step
    guidance_scale: float
    dec: DecRows  # identity rows when the request runs without DEC
    start: int = 0  # iteration at which the job joins the loop
    step: int = 0
    cached: Any = None  # [R, Cc, h', w'] from the last full step
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


@dataclass(frozen=True)
class ArrayOps:
    """The few array operations the loop needs, for one array kind."""

    cat: Callable  # list of arrays -> one, along axis 0
    stack: Callable  # list of arrays -> one, new axis 0
    full: Callable  # (n, value) -> float32 [n] of value
    repeat: Callable  # (row, r) -> row[None] repeated r times along axis 0
    to_host: Callable  # array -> numpy


HOST = ArrayOps(cat=np.concatenate, stack=np.stack, full=lambda n, v: np.full(n, v, np.float32),
                repeat=lambda x, r: np.repeat(x[None], r, 0), to_host=lambda a: a)


def torch_ops(device) -> ArrayOps:
    """``ArrayOps`` over torch tensors on ``device`` (a ``torch.device``, CPU or CUDA)."""
    import torch

    return ArrayOps(cat=lambda xs: torch.cat(xs), stack=lambda xs: torch.stack(xs),
                    full=lambda n, v: torch.full((n,), float(v), dtype=torch.float32, device=device),
                    repeat=lambda x, r: x[None].expand(r, *x.shape), to_host=lambda a: a.float().cpu().numpy())


def _feeds(jobs: list[DenoiseJob], shallow: bool, ops: ArrayOps) -> dict[str, Any]:
    feeds = {
        "sample": ops.cat([ops.repeat(j.latents, j.rows) for j in jobs]),
        "timestep": ops.cat([ops.full(j.rows, j.timesteps[j.step]) for j in jobs]),
        "encoder_hidden_states": ops.cat([j.text for j in jobs]),
    }
    if shallow:
        feeds["cached"] = ops.cat([j.cached for j in jobs])
        for name in ("cache_scale", "cache_bias", "quant_scale", "quant_bias"):
            feeds[name] = ops.cat([ops.repeat(getattr(j.dec, name)[j.step], j.rows) for j in jobs])
    return feeds


def _execute(engine, jobs: list[DenoiseJob], kind: str, observer: Observer | None, ops: ArrayOps) -> list[list[Any]]:
    """One engine call over ``jobs``' rows; ``engine.run(feeds)`` returns fresh arrays the loop owns."""
    feeds = _feeds(jobs, kind == "shallow", ops)
    outs = engine.run(feeds)
    split, at = [], 0
    for j in jobs:
        mine = [o[at:at + j.rows] for o in outs]
        if observer is not None:
            observer(j, kind, {k: ops.to_host(v[at:at + j.rows]) for k, v in feeds.items()}, [ops.to_host(o) for o in mine])
        split.append(mine)
        at += j.rows
    return split


def _update(sampler: DDIM, jobs: list[DenoiseJob], outs: list[list[Any]], kind: str, ops: ArrayOps) -> None:
    eps = []
    for j, o in zip(jobs, outs):
        e = o[0].astype(np.float32, copy=False) if ops is HOST else o[0].float()  # FP16 engines: mix in float32
        eps.append(e[0] + j.guidance_scale * (e[1] - e[0]) if j.rows == 2 else e[0])
        if kind == "full":
            j.cached = o[1]
        j.stats[kind] += 1
    t = np.array([j.timesteps[j.step] for j in jobs])
    steps = np.array([j.steps for j in jobs])
    new = sampler.step(ops.stack(eps), t, ops.stack([j.latents for j in jobs]), steps)
    for j, x in zip(jobs, new):
        j.latents = x
        j.step += 1


def run_loop(jobs: list[DenoiseJob], sampler: DDIM, full, shallow, observer: Observer | None = None,
             ops: ArrayOps = HOST) -> LoopStats:
    """Denoise every job to completion (in place: each job's ``latents`` ends as x_0).

    ``full``/``shallow``: engines with ``run(feeds) -> [outputs]`` over ``ops``' arrays
    (``PartSession`` with ``HOST``, ``DevicePartSession`` with ``torch_ops``)."""
    stats = LoopStats()
    it = 0
    while any(not j.done for j in jobs):
        live = [j for j in jobs if j.start <= it and not j.done]
        fulls = [j for j in live if j.wants_full() or shallow is None]
        shallows = [j for j in live if j not in fulls]
        stats.group_sizes.append((len(fulls), len(shallows)))
        t0 = time.perf_counter()
        outs_full = _execute(full, fulls, "full", observer, ops) if fulls else []
        outs_shallow = _execute(shallow, shallows, "shallow", observer, ops) if shallows else []
        stats.unet_seconds += time.perf_counter() - t0
        stats.full_calls += bool(fulls)
        stats.shallow_calls += bool(shallows)
        if fulls:
            _update(sampler, fulls, outs_full, "full", ops)
        if shallows:
            _update(sampler, shallows, outs_shallow, "shallow", ops)
        it += 1
    stats.iterations = it
    return stats
