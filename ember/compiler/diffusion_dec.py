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
- Quantization correction (with ``--quantize``): ``Y_fp ≈ α_t ⊙ Y_q + β_t`` at the first tail
  conv, float vs quantized shallow graph, both fed the cache-corrected input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ember.compiler import diffusion_calib as calib
from ember.passes.error_correction import AffineTable, fit_cache_correction, fit_output_affine, fit_quant_correction

DEC_TARGETS = ("noise", "feature")


def fit_dec(tmp: Path, src: Any, traj: calib.Trajectories, sched: Any, float_shallow: onnx.ModelProto, opts: Any,
            cc: int, qc: int) -> dict[str, Any]:
    """Fit both tables from the calibration trajectories ``traj``, write ``tmp/dec.npz``; -> the
    manifest's ``dec`` record. ``opts``: the compile's ``DiffusionCompileOptions``."""
    ref = sched.reference()
    if opts.dec_target == "noise":
        cache_t, fit = fit_cache_through_tail(src, opts.branch, traj, ref, opts.guidance_scale, opts.calib_device)
    else:
        cache_t, fit = fit_cache_correction(traj.features, ref), None
    quant_t = AffineTable.identity(opts.steps, qc)
    if opts.quantize:
        quant_t = _fit_quant(tmp, traj, ref, cache_t, float_shallow, opts, cc, qc)
    np.savez(tmp / "dec.npz", cache_scale=cache_t.scale, cache_bias=cache_t.bias,
             quant_scale=quant_t.scale, quant_bias=quant_t.bias)
    record: dict[str, Any] = {"file": "dec.npz", "cache": True, "quant": bool(opts.quantize),
                              "fitted_on": sched.method, "target": opts.dec_target, "runs": len(traj.features)}
    if fit is not None:
        record["calibration_noise_mse"] = fit
    return record


def fit_cache_through_tail(src: Any, branch: int, traj: calib.Trajectories, ref: np.ndarray, guidance_scale: float,
                           device: str = "cpu") -> tuple[AffineTable, dict[str, float]]:
    """The noise-target cache table (module doc) -> (table, the calibration runs' guided-noise MSE
    summed over cached steps without and with the correction)."""
    import torch

    from ember.export.diffusion.unet_split import UNetShallow

    steps, rows = traj.features[0].shape[0], traj.features[0].shape[1]
    shallow = UNetShallow(src.unet, branch).to(device).eval()
    for p in shallow.parameters():
        p.requires_grad_(False)
    cc, qc = shallow.cache_channels, shallow.quant_channels
    table = AffineTable.identity(steps, cc)
    before = after = 0.0
    dev = torch.device(device)
    for t in range(steps):
        r = int(ref[t])
        if r == t:
            continue

        def stack(name: str) -> Any:
            return torch.from_numpy(np.concatenate([f[t][name] for f in traj.feeds])).to(dev)

        sample, timestep, text = stack("sample"), stack("timestep"), stack("encoder_hidden_states")
        cached = torch.from_numpy(np.concatenate([f[r] for f in traj.features])).to(dev)
        target = torch.from_numpy(np.stack([calib.guided(n[t], guidance_scale) for n in traj.noise])).to(dev)
        n = cached.shape[0]
        ones, zeros = torch.ones(n, qc, device=dev), torch.zeros(n, qc, device=dev)

        def tail(a: Any, b: Any, sample=sample, timestep=timestep, text=text, cached=cached, ones=ones, zeros=zeros,
                 n=n) -> Any:
            out = shallow(sample, timestep, text, cached, a.expand(n, -1), b.expand(n, -1), ones, zeros)
            return calib.guided(out.reshape(n // rows, rows, *out.shape[1:]).transpose(0, 1), guidance_scale)

        table.scale[t], table.bias[t], start, end = fit_output_affine(tail, target, table.scale[t], table.bias[t])
        before, after = before + start, after + end
    return table, {"uncorrected": before, "corrected": after}


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
