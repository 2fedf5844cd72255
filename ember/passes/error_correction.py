"""Decoupled error correction (DEC, docs/design.md §5.3): per-step, per-channel affine fits.

- Cache error: on a cached step t that reuses the feature of full step r, a per-channel
  ``h <- a_t ⊙ X_r + b_t`` on the cached feature. Two fits:
  ``fit_output_affine`` (the compiler's ``--dec-target noise``) chooses (a_t, b_t) to minimise the squared error
  of what the correction feeds: the shallow tail's guided noise prediction against the full
  step's, by L-BFGS from the identity; ``fit_cache_correction`` (the default target) regresses the feature itself,
  ``X_t ≈ a_t ⊙ X_r + b_t`` with ``a = Cov(X_r, X_t) / Var(X_r)``, ``b = E[X_t] − a·E[X_r]``,
  pooled over calibration runs × batch × H × W. The feature fit lowers the feature error but
  not the noise error (the tail's GroupNorm undoes a shared scale and shift; measured on the
  reference pipeline it *raised* the noise MSE of reuse, docs/diffusion.md).
- Quantization error: on the conv that consumes the cached channels, fit
  ``Y_fp ≈ α_t ⊙ Y_q + β_t`` per output channel (same estimator), where both outputs are
  computed from the cache-corrected input.

Tables are [T, C] float32, one row per step; full steps (and unfitted ones) hold the
identity (scale 1, bias 0). The runtime feeds row t to the shallow engine as an input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ember.errors import ConfigError

_MIN_VAR = 1e-12


@dataclass
class AffineTable:
    """scale/bias [T, C] float32: ``y <- scale[t] * y + bias[t]`` per channel at step t."""

    scale: np.ndarray
    bias: np.ndarray

    @staticmethod
    def identity(steps: int, channels: int) -> "AffineTable":
        return AffineTable(np.ones((steps, channels), np.float32), np.zeros((steps, channels), np.float32))

    def apply(self, step: int, x: np.ndarray) -> np.ndarray:
        """x [B, C, ...] -> corrected x (channel axis 1)."""
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.scale[step].reshape(shape) + self.bias[step].reshape(shape)


def fit_channel_affine(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares y ≈ a·x + b per channel (axis 1), pooled over every other axis. -> a, b [C]."""
    if x.shape != y.shape:
        raise ConfigError(f"affine fit needs equal shapes, got {x.shape} and {y.shape}")
    c = x.shape[1]
    xs = np.moveaxis(x, 1, 0).reshape(c, -1).astype(np.float64)
    ys = np.moveaxis(y, 1, 0).reshape(c, -1).astype(np.float64)
    mx, my = xs.mean(1), ys.mean(1)
    var = ((xs - mx[:, None]) ** 2).mean(1)
    cov = ((xs - mx[:, None]) * (ys - my[:, None])).mean(1)
    a = np.where(var > _MIN_VAR, cov / np.maximum(var, _MIN_VAR), 1.0)
    b = my - a * mx
    return a.astype(np.float32), b.astype(np.float32)


def fit_cached_steps(reference: np.ndarray, channels: int,
                     fit_step: Callable[[int, int], tuple[np.ndarray, np.ndarray]]) -> AffineTable:
    """The table [T, C] whose cached steps t (``reference[t] != t``) hold ``fit_step(t, reference[t])``
    -> (a_t, b_t); full steps keep the identity."""
    table = AffineTable.identity(len(reference), channels)
    for t in range(len(reference)):
        r = int(reference[t])
        if r != t:
            table.scale[t], table.bias[t] = fit_step(t, r)
    return table


def fit_feature_step(features: Sequence[np.ndarray], t: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """``X_t ≈ a ⊙ X_r + b`` per channel over the runs ``features`` (one [T, B, C, H, W] array each)."""
    return fit_channel_affine(np.concatenate([f[r] for f in features]), np.concatenate([f[t] for f in features]))


def fit_cache_correction(features: Sequence[np.ndarray], reference: np.ndarray) -> AffineTable:
    """features: one [T, B, C, H, W] array per calibration run (the true cached feature at each
    step); reference [T]: the full step each step reuses. -> (a_t, b_t) table [T, C]."""
    return fit_cached_steps(reference, features[0].shape[2], lambda t, r: fit_feature_step(features, t, r))


def fit_output_affine(tail: Callable[[Any, Any], Any], target: Any, scale: np.ndarray, bias: np.ndarray,
                      iterations: int = 40) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-channel (a, b) [C] minimising ``mean((tail(a, b) - target)**2)`` by L-BFGS (strong Wolfe
    line search) from (scale, bias). ``tail(a, b)`` maps float32 torch tensors [C] to a tensor
    shaped like ``target`` and must be differentiable in them. -> (a, b, loss at the start, loss
    at the end); the start is returned when the search does not lower the loss."""
    import torch

    a = torch.tensor(scale, dtype=torch.float32, device=target.device, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float32, device=target.device, requires_grad=True)

    def loss() -> Any:
        return ((tail(a, b) - target) ** 2).mean()

    with torch.no_grad():
        start = float(loss())
    opt = torch.optim.LBFGS([a, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        end = float(loss())
    if not end < start:
        return np.asarray(scale, np.float32), np.asarray(bias, np.float32), start, start
    return a.detach().cpu().numpy().astype(np.float32), b.detach().cpu().numpy().astype(np.float32), start, end


def fit_quant_correction(y_fp: dict[int, np.ndarray], y_q: dict[int, np.ndarray], steps: int, channels: int) -> AffineTable:
    """y_fp / y_q: step -> [N, C, H, W] conv outputs (float graph vs quantized graph, same
    cache-corrected inputs). Steps absent from the dicts keep the identity. -> (α_t, β_t)."""
    table = AffineTable.identity(steps, channels)
    for t, ref in y_fp.items():
        table.scale[t], table.bias[t] = fit_channel_affine(y_q[t], ref)
    return table


def relative_l2(pred: np.ndarray, target: np.ndarray) -> float:
    """||pred - target||_2 / ||target||_2."""
    return float(np.linalg.norm((pred - target).ravel()) / max(np.linalg.norm(target.ravel()), 1e-30))
