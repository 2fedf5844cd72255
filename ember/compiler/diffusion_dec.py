"""The DEC fits of a diffusion compile (docs/design.md §5.3): the cache table through the shallow
tail, the quantization table at the conv that reads the cached channels.

- Cache correction (``dec_target="noise"``): for each cached step t reusing full step
  r, the per-channel (a_t, b_t) on the cached feature that minimise the squared error of the
  shallow UNet's *guided* noise prediction (the tail fed ``a_t ⊙ X_r + b_t``) against the full
  step's own, over every calibration run: the error reuse puts into what the sampler consumes,
  the DP schedule's default objective too. Fitted in torch on the source's float UNet
  (``UNetShallow``, the module the shallow graph is exported from) on ``calib_device``.
  ``dec_target="feature"`` (the default) is the least-squares regression of the feature itself
  (§5.3's formula), which on the reference pipeline does not lower the noise error but never cost
  more than 0.4 dB, where the noise target gains up to 1.7 dB with calibration that covers what
  is generated and loses 0.7 dB without (docs/diffusion.md).
- Held-out shrinkage (``dec_shrink="cv"``, the default): either cache table is shrunk toward the
  identity per step by the share that lowers the guided-noise error most on calibration runs the
  fit left out (``shrink_by_cv``).
- Quantization correction (with ``--quantize``): ``Y_fp ≈ α_t ⊙ Y_q + β_t`` at the first tail
  conv, float vs quantized shallow graph, both fed the cache-corrected input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from ember.compiler import diffusion_calib as calib
from ember.passes.error_correction import (AffineTable, fit_cached_steps, fit_feature_step, fit_output_affine,
                                          fit_quant_correction)

DEC_TARGETS = ("noise", "feature")
DEC_SHRINK = ("cv", "off")
SHRINK_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # gamma: the share of the fitted correction kept (0 = identity)
CV_FOLDS = 3  # at most: 1 + CV_FOLDS fits per step whatever the number of calibration runs


def fit_dec(tmp: Path, src: Any, traj: calib.Trajectories, sched: Any, float_shallow: onnx.ModelProto, opts: Any,
            cc: int, qc: int) -> dict[str, Any]:
    """Fit both tables from the calibration trajectories ``traj``, write ``tmp/dec.npz``; -> the
    manifest's ``dec`` record. ``opts``: the compile's ``DiffusionCompileOptions``."""
    ref = sched.reference()
    runs = list(range(len(traj.features)))
    shrink = opts.dec_shrink == "cv" and len(runs) >= 2
    tail = GuidedTail(src, opts.branch, traj, opts.guidance_scale, opts.calib_device) \
        if opts.dec_target == "noise" or shrink else None
    if opts.dec_target == "noise":
        def fit_runs(t: int, chosen: list[int]) -> tuple[np.ndarray, np.ndarray]:
            return tail.fit(t, int(ref[t]), chosen)
    else:
        def fit_runs(t: int, chosen: list[int]) -> tuple[np.ndarray, np.ndarray]:
            return fit_feature_step([traj.features[k] for k in chosen], t, int(ref[t]))
    cache_t = fit_cached_steps(ref, traj.features[0].shape[2], lambda t, r: fit_runs(t, runs))
    record: dict[str, Any] = {"file": "dec.npz", "cache": True, "quant": bool(opts.quantize),
                              "fitted_on": sched.method, "target": opts.dec_target, "runs": len(runs),
                              "shrink": "cv" if shrink else "off"}
    if shrink:
        cache_t, record["cv"] = shrink_by_cv(tail, ref, cache_t, fit_runs, runs)
    if tail is not None:
        record["calibration_noise_mse"] = tail.total_loss(ref, cache_t, runs)
    quant_t = AffineTable.identity(opts.steps, qc)
    if opts.quantize:
        quant_t = _fit_quant(tmp, traj, ref, cache_t, float_shallow, opts, cc, qc)
    np.savez(tmp / "dec.npz", cache_scale=cache_t.scale, cache_bias=cache_t.bias,
             quant_scale=quant_t.scale, quant_bias=quant_t.bias)
    return record


def shrink_by_cv(tail: "GuidedTail", ref: np.ndarray, table: AffineTable,
                 fit_runs: Callable[[int, list[int]], tuple[np.ndarray, np.ndarray]],
                 runs: list[int]) -> tuple[AffineTable, dict[str, Any]]:
    """Per cached step t, keep the share gamma_t in ``SHRINK_GRID`` of the fitted correction,
    ``a <- 1 + gamma (a - 1)``, ``b <- gamma b``, that gives the lowest guided-noise error on
    calibration runs the fit did not see: the runs in ``min(len(runs), CV_FOLDS)`` folds (run i in
    fold i mod folds: with up to 3 runs, leave one run out), each fold left out in turn, the
    correction fitted on the others with ``fit_runs``, every gamma scored on the fold left out, summed
    over runs. gamma 0 (no correction) wins where the fit does not carry to unseen runs, so the table
    never costs more than it gains on held-out calibration runs. -> (shrunk table, record: gamma per
    step and held-out MSE at gamma 0 / chosen)."""
    out = AffineTable(table.scale.copy(), table.bias.copy())
    folds = [runs[i::min(len(runs), CV_FOLDS)] for i in range(min(len(runs), CV_FOLDS))]
    gammas: dict[int, float] = {}
    held_none = held_chosen = 0.0
    for t in range(table.scale.shape[0]):
        r = int(ref[t])
        if r == t:
            continue
        held = np.zeros(len(SHRINK_GRID))
        for fold in folds:
            a, b = fit_runs(t, [j for j in runs if j not in fold])
            for i, g in enumerate(SHRINK_GRID):
                held[i] += len(fold) * tail.loss(t, r, fold, 1 + g * (a - 1), g * b)
        best = int(np.argmin(held))
        g = SHRINK_GRID[best]
        gammas[t] = g
        held_none, held_chosen = held_none + held[0], held_chosen + held[best]
        out.scale[t] = (1 + g * (table.scale[t] - 1)).astype(np.float32)
        out.bias[t] = (g * table.bias[t]).astype(np.float32)
    mean_gamma = float(np.mean(list(gammas.values()))) if gammas else 0.0
    return out, {"gamma": {str(t): g for t, g in gammas.items()}, "mean_gamma": mean_gamma,
                 "heldout_noise_mse_uncorrected": held_none, "heldout_noise_mse_chosen": held_chosen}


def fit_cache_through_tail(src: Any, branch: int, traj: calib.Trajectories, ref: np.ndarray, guidance_scale: float,
                           device: str = "cpu") -> tuple[AffineTable, dict[str, float]]:
    """The noise-target cache table over every calibration run, unshrunk -> (table, the runs'
    guided-noise MSE summed over cached steps without and with it)."""
    tail = GuidedTail(src, branch, traj, guidance_scale, device)
    runs = list(range(len(traj.features)))
    table = fit_cached_steps(ref, traj.features[0].shape[2], lambda t, r: tail.fit(t, r, runs))
    return table, tail.total_loss(ref, table, runs)


class GuidedTail:
    """The source's float shallow UNet (``UNetShallow``, the module the shallow graph is exported
    from) on ``device``, fed a cached step's calibration inputs with a per-channel correction of the
    cached feature: the guided noise it predicts, its squared error against the full step's, and the
    noise-target fit (module doc)."""

    def __init__(self, src: Any, branch: int, traj: calib.Trajectories, guidance_scale: float, device: str = "cpu"):
        import torch

        from ember.export.diffusion.unet_split import UNetShallow

        self.traj, self.guidance_scale, self.dev = traj, guidance_scale, torch.device(device)
        self.rows = traj.features[0].shape[1]
        self.shallow = UNetShallow(src.unet, branch).to(device).eval()
        for p in self.shallow.parameters():
            p.requires_grad_(False)
        self.qc = self.shallow.quant_channels

    def _tail(self, t: int, r: int, runs: list[int]) -> tuple[Callable[[Any, Any], Any], Any]:
        """(tail(a, b) -> guided noise [len(runs), ...], target) for step t reusing step r."""
        import torch

        def stack(name: str) -> Any:
            return torch.from_numpy(np.concatenate([self.traj.feeds[k][t][name] for k in runs])).to(self.dev)

        sample, timestep, text = stack("sample"), stack("timestep"), stack("encoder_hidden_states")
        cached = torch.from_numpy(np.concatenate([self.traj.features[k][r] for k in runs])).to(self.dev)
        target = torch.from_numpy(np.stack([calib.guided(self.traj.noise[k][t], self.guidance_scale)
                                            for k in runs])).to(self.dev)
        n, rows, gs = cached.shape[0], self.rows, self.guidance_scale
        ones, zeros = torch.ones(n, self.qc, device=self.dev), torch.zeros(n, self.qc, device=self.dev)

        def tail(a: Any, b: Any) -> Any:
            out = self.shallow(sample, timestep, text, cached, a.expand(n, -1), b.expand(n, -1), ones, zeros)
            return calib.guided(out.reshape(n // rows, rows, *out.shape[1:]).transpose(0, 1), gs)

        return tail, target

    def loss(self, t: int, r: int, runs: list[int], a: np.ndarray, b: np.ndarray) -> float:
        """Mean squared guided-noise error over ``runs`` with the correction (a, b) [C]."""
        import torch

        tail, target = self._tail(t, r, runs)
        with torch.no_grad():
            out = tail(torch.as_tensor(np.asarray(a, np.float32), device=self.dev),
                       torch.as_tensor(np.asarray(b, np.float32), device=self.dev))
            return float(((out - target) ** 2).mean())

    def fit(self, t: int, r: int, runs: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The noise-target (a, b) over ``runs``, by L-BFGS from the identity."""
        tail, target = self._tail(t, r, runs)
        c = self.traj.features[0].shape[2]
        a, b, _, _ = fit_output_affine(tail, target, np.ones(c, np.float32), np.zeros(c, np.float32))
        return a, b

    def total_loss(self, ref: np.ndarray, table: AffineTable, runs: list[int]) -> dict[str, float]:
        """The calibration runs' guided-noise MSE summed over cached steps, without and with ``table``."""
        c = table.scale.shape[1]
        before = after = 0.0
        for t in range(table.scale.shape[0]):
            r = int(ref[t])
            if r != t:
                before += self.loss(t, r, runs, np.ones(c, np.float32), np.zeros(c, np.float32))
                after += self.loss(t, r, runs, table.scale[t], table.bias[t])
        return {"uncorrected": before, "corrected": after}


def _fit_quant(tmp: Path, traj: calib.Trajectories, ref: np.ndarray, cache_t: AffineTable,
               float_shallow: onnx.ModelProto, opts: Any, cc: int, qc: int) -> AffineTable:
    """α, β at the conv reading the cached channels: float vs quantized shallow graph, both fed the
    cache-corrected input of every cached step."""
    from ember.passes.quant_graph import ort_session

    q_model = onnx.load(str(tmp / "unet_shallow.onnx"))
    probe_fp, probe_q = calib.quant_probe_tensor(float_shallow), calib.quant_probe_tensor(q_model)
    s_fp = ort_session(calib.with_outputs(float_shallow, [probe_fp]), opts.threads or 0)
    s_q = ort_session(calib.with_outputs(q_model, [probe_q]), opts.threads or 0)
    y_fp: dict[int, np.ndarray] = {}
    y_q: dict[int, np.ndarray] = {}
    for t in range(opts.steps):
        if ref[t] == t:
            continue
        fp_rows, q_rows = [], []
        for feeds, feats in zip(traj.feeds, traj.features):
            rows = feats.shape[1]
            f = {**feeds[t], "cached": feats[ref[t]], **calib.identity_rows(rows, cc, qc)}
            f["cache_scale"] = np.repeat(cache_t.scale[t][None], rows, 0)
            f["cache_bias"] = np.repeat(cache_t.bias[t][None], rows, 0)
            fp_rows.append(s_fp.run([probe_fp], f)[0])
            q_rows.append(s_q.run([probe_q], f)[0])
        y_fp[t], y_q[t] = np.concatenate(fp_rows), np.concatenate(q_rows)
    return fit_quant_correction(y_fp, y_q, opts.steps, qc)
