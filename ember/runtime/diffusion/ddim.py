"""DDIM sampler (eta = 0), vectorised over samples that may sit at different steps: numpy arrays
or torch tensors (the device path), with the same float32 arithmetic.

Follows diffusers' DDIMScheduler for the options SD-1.x uses (``beta_schedule`` linear or
scaled_linear, ``timestep_spacing`` leading/trailing/linspace, ``steps_offset``,
``set_alpha_to_one``, epsilon prediction, optional ``clip_sample``). torch only for torch inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.errors import ArtifactError, InputError


@dataclass(frozen=True)
class DDIM:
    alphas_cumprod: np.ndarray  # [num_train_timesteps] float64
    final_alpha_cumprod: float
    num_train_timesteps: int
    steps_offset: int
    spacing: str
    clip_sample: bool
    clip_sample_range: float

    @staticmethod
    def from_config(cfg: dict[str, Any]) -> "DDIM":
        n = int(cfg.get("num_train_timesteps", 1000))
        start, end = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
        kind = cfg.get("beta_schedule", "linear")
        if kind == "linear":
            betas = np.linspace(start, end, n, dtype=np.float32)
        elif kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
        else:
            raise ArtifactError(f"scheduler beta_schedule {kind!r} is not supported (linear, scaled_linear)")
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ArtifactError(f"scheduler prediction_type {cfg.get('prediction_type')!r} is not supported (epsilon)")
        spacing = cfg.get("timestep_spacing", "leading")
        if spacing not in ("leading", "trailing", "linspace"):
            raise ArtifactError(f"scheduler timestep_spacing {spacing!r} is not supported")
        # diffusers keeps alphas_cumprod in float32 (torch.cumprod of float32 betas).
        ac = np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32)
        return DDIM(
            alphas_cumprod=ac,
            final_alpha_cumprod=1.0 if cfg.get("set_alpha_to_one", True) else float(ac[0]),
            num_train_timesteps=n,
            steps_offset=int(cfg.get("steps_offset", 0)),
            spacing=spacing,
            clip_sample=bool(cfg.get("clip_sample", False)),
            clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
        )

    def timesteps(self, steps: int) -> np.ndarray:
        """[steps] int64, descending: the UNet timestep of each denoising step."""
        n = self.num_train_timesteps
        if not 1 <= steps <= n:
            raise InputError(f"steps={steps} must be in [1, {n}]")
        if self.spacing == "linspace":
            ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        elif self.spacing == "leading":
            ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + self.steps_offset
        else:
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        return ts

    def step(self, eps, t: np.ndarray, x, steps: np.ndarray):
        """One DDIM update per sample. eps, x [B,C,h,w] float32 (numpy arrays, or torch tensors on
        any device: the update then runs there); t [B] int timesteps; steps [B] the number of
        inference steps of each sample's request (sets its previous timestep). The per-sample
        coefficients are computed on the host in float32 either way."""
        prev = t - self.num_train_timesteps // steps
        a_t = self.alphas_cumprod[t]
        a_prev = np.where(prev >= 0, self.alphas_cumprod[np.maximum(prev, 0)], self.final_alpha_cumprod).astype(np.float32)
        shape = (-1,) + (1,) * (x.ndim - 1)
        a_t, a_prev = a_t.reshape(shape), a_prev.reshape(shape)
        like = _coefficients_like(x)
        sq_t, s_t = like(np.sqrt(1 - a_t)), like(np.sqrt(a_t))
        x0 = (x - sq_t * eps) / s_t
        if self.clip_sample:
            x0 = x0.clip(-self.clip_sample_range, self.clip_sample_range)
            eps = (x - s_t * x0) / sq_t
        out = like(np.sqrt(a_prev)) * x0 + like(np.sqrt(1 - a_prev)) * eps
        return out.astype(np.float32) if isinstance(out, np.ndarray) else out.float()

    def eps_weights(self, steps: int) -> np.ndarray:
        """[steps] float64: how far an error in step i's noise prediction moves the final x_0.

        With eta = 0 the update is linear in eps in the variable y = x / sqrt(a):
        ``y_{i+1} = y_i + (s_{i+1} - s_i) * eps_i`` with ``s = sqrt((1 - a) / a)``, so an eps error
        at step i reaches x_0 scaled by ``(s_i - s_{i+1}) * sqrt(a_final)`` (the later steps' own
        response to it ignored). Early, high-noise steps weigh most.
        """
        t = self.timesteps(steps)
        prev = t - self.num_train_timesteps // steps
        a_t = self.alphas_cumprod[t].astype(np.float64)
        a_prev = np.where(prev >= 0, self.alphas_cumprod[np.maximum(prev, 0)], self.final_alpha_cumprod).astype(np.float64)
        s_t, s_prev = np.sqrt((1 - a_t) / a_t), np.sqrt((1 - a_prev) / a_prev)
        return np.abs(s_t - s_prev) * np.sqrt(a_prev[-1])


def _coefficients_like(x):
    """float32 host coefficients -> the array type of ``x``: numpy as is; torch on x's device (to a
    GPU through pinned memory without blocking: a pageable copy would wait for the device's queue)."""
    if isinstance(x, np.ndarray):
        return lambda a: a
    import torch  # x is a torch tensor: torch is loaded

    def move(a):
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return t.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else t

    return move
