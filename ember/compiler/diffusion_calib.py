"""Calibration runs for diffusion compiles: trajectories of the full engine, quantization feeds,
and the probe of the conv that DEC's quantization correction targets.

All runs go through the same runtime loop users get (``DiffusionPipeline.run_jobs``), so the
features the DP schedule and DEC see are those the engines will produce. The compiler does not
import the runtime: the caller hands it a ``PipelineOpener`` (``CalibrationPipeline`` is what is
used of the pipeline).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx

from ember.errors import ConfigError

DEFAULT_CALIB_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table, studio light",
)


class CalibrationPipeline(Protocol):
    """What calibration uses of a loaded diffusion folder (``ember.runtime.diffusion.pipeline.DiffusionPipeline``)."""

    sampler: Any  # the folder's DDIM sampler: ``eps_weights(steps)``
    shallow: Any  # the shallow UNet engine: ``run_host(numpy feeds) -> [numpy noise]``

    def make_jobs(self, prompts: list[str], **kw: Any) -> tuple[list, Any]: ...

    def run_jobs(self, jobs: list, observer: Callable | None = None) -> Any: ...


# (folder, manifest, threads=) -> a pipeline over that folder
PipelineOpener = Callable[..., CalibrationPipeline]


@dataclass
class Trajectories:
    """Per calibration prompt: cached feature per step [T, R, Cc, h, w], the full engine's noise
    prediction per step [T, R, C, h, w], and full-engine feeds per step."""

    features: list[np.ndarray] = field(default_factory=list)
    feeds: list[list[dict[str, np.ndarray]]] = field(default_factory=list)
    noise: list[np.ndarray] = field(default_factory=list)


def collect_trajectories(pipe: CalibrationPipeline, prompts: list[str], steps: int, seed: int, guidance_scale: float) -> Trajectories:
    """Run every step full (no cache) and record each step's cached feature and UNet inputs."""
    out = Trajectories()
    for i, prompt in enumerate(prompts):
        jobs, _ = pipe.make_jobs([prompt], steps=steps, seed=seed + i, guidance_scale=guidance_scale, cache=False)
        feats: list[np.ndarray] = []
        noise: list[np.ndarray] = []
        feeds: list[dict[str, np.ndarray]] = []

        def observe(job, kind, f, outs, feats=feats, noise=noise, feeds=feeds):
            noise.append(outs[0].copy())
            feats.append(outs[1].copy())
            feeds.append({k: v.copy() for k, v in f.items()})

        pipe.run_jobs(jobs, observer=observe)
        out.features.append(np.stack(feats))
        out.noise.append(np.stack(noise))
        out.feeds.append(feeds)
    return out


def propagation_weights(pipe: CalibrationPipeline, prompts: list[str], steps: int, seed: int, guidance_scale: float,
                        relative: float = 1e-2) -> np.ndarray:
    """w[t]: how far a perturbation of step t's guided noise prediction moves the final latent, per
    unit of perturbation (||x_0' - x_0|| / ||delta||), measured on the calibration runs through the
    full engine and the sampler, mean over runs, scaled to mean 1: the DP's per-step weights
    (``--schedule-weights measured``). Per run, ``steps + 1`` copies of it denoise in one batch:
    copy 0 as is, copy 1 + t with ``delta`` (a fixed Gaussian direction, ``relative`` x the RMS of
    that step's prediction, on every CFG row, so the guided noise moves by exactly ``delta``) added
    to its prediction at step t only. Costs ``steps + 1`` times a calibration run's UNet rows."""
    total = np.zeros(steps, dtype=np.float64)
    for i, prompt in enumerate(prompts):
        n = steps + 1
        jobs, _ = pipe.make_jobs([prompt] * n, steps=steps, seed=[seed + i] * n, guidance_scale=guidance_scale,
                                 cache=False)
        full, norms, rng = pipe.full, np.zeros(steps), np.random.default_rng(seed + i)
        starts = np.cumsum([0] + [j.rows for j in jobs])

        class Perturbed:
            """The full engine, adding delta to copy 1 + t's rows at iteration t."""

            calls = 0

            def run(self, feeds):
                outs = full.run(feeds)
                t, self.calls = self.calls, self.calls + 1
                if t < steps:
                    e = outs[0][starts[1 + t]:starts[2 + t]]
                    delta = relative * float(np.sqrt(np.mean(np.square(e, dtype=np.float64)))) * rng.standard_normal(e.shape[1:])
                    e += delta.astype(e.dtype)  # a view: every CFG row of the copy
                    norms[t] = np.linalg.norm(delta)
                return outs

            def __getattr__(self, name):
                return getattr(full, name)

        pipe.full = Perturbed()
        try:
            pipe.run_jobs(jobs)
        finally:
            pipe.full = full
        base = np.asarray(jobs[0].latents, dtype=np.float64)
        for t in range(steps):
            total[t] += np.linalg.norm(np.asarray(jobs[1 + t].latents, dtype=np.float64) - base) / max(norms[t], 1e-30)
    w = total / len(prompts)
    return w / w.mean()


def guided(noise: np.ndarray, guidance_scale: float) -> np.ndarray:
    """[R, ...] CFG rows (uncond, cond) -> the noise the sampler steps with (as the runtime's loop)."""
    return noise[0] + guidance_scale * (noise[1] - noise[0]) if noise.shape[0] == 2 else noise[0]


def reuse_costs(pipe: CalibrationPipeline, traj: Trajectories, span: int, guidance_scale: float, cc: int, qc: int) -> np.ndarray:
    """E[s, i] = sum over runs of ||guided(shallow(step i; X_s)) - guided(full(step i))||_1 for
    s <= i < s + span: the error reusing step s's cached feature puts into step i's guided noise
    prediction, measured through the shallow engine on the (uncached) calibration trajectory.
    Zero elsewhere (pairs no schedule with groups of at most ``span`` steps uses)."""
    steps = traj.features[0].shape[0]
    cost = np.zeros((steps, steps), dtype=np.float64)
    for feats, noise, feeds in zip(traj.features, traj.noise, traj.feeds):
        rows = feats.shape[1]
        for i in range(steps):
            refs = list(range(max(0, i - span + 1), i + 1))
            batch = {k: np.concatenate([v] * len(refs)) for k, v in feeds[i].items()}
            batch["cached"] = np.concatenate([feats[s] for s in refs])
            batch.update(identity_rows(rows * len(refs), cc, qc))
            out = pipe.shallow.run_host(batch)[0]
            target = guided(noise[i], guidance_scale)
            for k, s in enumerate(refs):
                cost[s, i] += np.abs(guided(out[k * rows:(k + 1) * rows], guidance_scale) - target).sum()
    return cost


def spread_steps(steps: int, count: int) -> list[int]:
    """``count`` step indices spread evenly over [0, steps) (the trajectory, not just its start)."""
    return sorted({int(round(x)) for x in np.linspace(0, steps - 1, max(1, min(count, steps)))})


def full_feeds(traj: Trajectories, count: int) -> list[dict[str, np.ndarray]]:
    return [f[t] for f in traj.feeds for t in spread_steps(len(f), count)]


def shallow_feeds(traj: Trajectories, count: int, interval: int, cc: int, qc: int) -> list[dict[str, np.ndarray]]:
    """Shallow-engine feeds: step t's inputs with the cached feature of step t - t % interval."""
    feeds = []
    for run_feeds, feats in zip(traj.feeds, traj.features):
        for t in spread_steps(len(run_feeds), count):
            r = t - t % max(1, interval)
            rows = feats.shape[1]
            feeds.append({**run_feeds[t], "cached": feats[r], **identity_rows(rows, cc, qc)})
    return feeds


def identity_rows(rows: int, cc: int, qc: int) -> dict[str, np.ndarray]:
    return {"cache_scale": np.ones((rows, cc), np.float32), "cache_bias": np.zeros((rows, cc), np.float32),
            "quant_scale": np.ones((rows, qc), np.float32), "quant_bias": np.zeros((rows, qc), np.float32)}


def quant_probe_tensor(model: onnx.ModelProto) -> str:
    """Name of the conv output that ``quant_scale`` multiplies (the DEC quantization-correction site)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    frontier, seen = ["quant_scale"], set()
    while frontier:
        name = frontier.pop()
        for n in consumers.get(name, []):
            if n.op_type == "Mul":
                return next(i for i in n.input if i != name)
            if n.name not in seen and n.op_type in ("Unsqueeze", "Reshape", "Cast", "Identity"):
                seen.add(n.name)
                frontier.extend(n.output)
    raise ConfigError("the shallow graph has no Mul fed by 'quant_scale'; the DEC quantization site is missing (re-export)")


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for n in names:
        probe.graph.output.append(onnx.ValueInfoProto(name=n))
    return probe
