"""Cache schedules for diffusion feature reuse: which denoising steps run the full UNet.

A schedule over T steps is the sorted list of *full* steps (group starts) ``s_1 = 0 < ... < s_K``;
every other step i reuses the cached feature of the last start ``r(i) <= i`` (shallow engine).

- ``uniform_schedule``: DeepCache's fixed interval N (starts 0, N, 2N, ...).
- ``dp_schedule``: CacheQuant's dynamic-programming schedule (docs/design.md §5.2). Given the cached
  feature X_i at every step from calibration runs, choose K starts minimising
  ``J = sum_k sum_{i in [s_k, s_{k+1})} ||X_i - X_{s_k}||_1`` with every group length in
  [lo, hi] (from interval N: [ceil(N/2), 2N]).
  Recurrence: ``L(n,1) = diam(0,n)``, ``L(n,k) = min_j L(j,k-1) + diam(j,n)``; backtrack.
  ``diam(s,e) = sum_{i in [s,e)} D[s,i]`` comes from row prefix sums of the pairwise L1
  matrix D, precomputed once, so the DP itself is O(K * T * (hi - lo)).
- ``step_weighted``: optional per-step weights w_i on the objective,
  ``J_w = sum_k sum_{i in group k} w_i * ||X_i - X_{s_k}||_1`` (D's columns scaled; the DP,
  bounds and prefix sums unchanged; w = 1 is the objective above). The compiler passes the
  sampler's weights (``DDIM.eps_weights``: how far a noise-prediction error at step i moves
  x_0), since a feature error at an early, high-noise step costs far more fidelity than the
  same error late.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ember.errors import ConfigError


@dataclass(frozen=True)
class CacheSchedule:
    """``full_steps``: sorted step indices that run the full engine (always includes 0)."""

    steps: int
    full_steps: tuple[int, ...]
    method: str  # "dp" | "uniform" | "none"
    interval: float

    def __post_init__(self) -> None:
        s = self.full_steps
        if not s or s[0] != 0 or list(s) != sorted(set(s)) or s[-1] >= self.steps:
            raise ConfigError(f"invalid cache schedule {list(s)} for {self.steps} steps: starts must be sorted, unique, begin at 0")

    @property
    def budget(self) -> int:
        return len(self.full_steps)

    def reference(self) -> np.ndarray:
        """[T] int: the full step whose cached feature step i uses (i itself on full steps)."""
        ref = np.zeros(self.steps, dtype=np.int64)
        for k, s in enumerate(self.full_steps):
            end = self.full_steps[k + 1] if k + 1 < len(self.full_steps) else self.steps
            ref[s:end] = s
        return ref

    def is_full(self) -> np.ndarray:
        full = np.zeros(self.steps, dtype=bool)
        full[list(self.full_steps)] = True
        return full

    def to_dict(self) -> dict:
        return {"steps": self.steps, "full_steps": list(self.full_steps), "method": self.method, "interval": self.interval}

    @staticmethod
    def from_dict(d: dict) -> "CacheSchedule":
        return CacheSchedule(int(d["steps"]), tuple(int(x) for x in d["full_steps"]), str(d["method"]), float(d["interval"]))


def budget_for_interval(steps: int, interval: int) -> int:
    """K = ceil(T / N) full steps."""
    if interval < 1:
        raise ConfigError(f"cache interval {interval} must be >= 1 (1 = no caching)")
    return math.ceil(steps / interval)


def budget_for_speedup(steps: int, speedup: float, shallow_cost: float) -> int:
    """Largest K (most full steps, best fidelity) whose cost ``K + (T-K)*f`` (f = shallow/full
    cost) is <= T / speedup."""
    if speedup < 1:
        raise ConfigError(f"cache speedup {speedup} must be >= 1")
    if not 0 <= shallow_cost < 1:
        raise ConfigError(f"shallow/full cost ratio {shallow_cost} must be in [0, 1)")
    k = math.floor(steps * (1 / speedup - shallow_cost) / (1 - shallow_cost) + 1e-9)
    if k < 1:
        best = 1 / (1 / steps + (1 - 1 / steps) * shallow_cost)
        raise ConfigError(f"cache speedup {speedup}x is unreachable with {steps} steps (at most {best:.2f}x); ask for less")
    return min(k, steps)


def group_bounds(steps: int, budget: int) -> tuple[int, int]:
    """[ceil(N/2), 2N] for N = T / K (an integer N when K came from an interval)."""
    n = steps / budget
    return max(1, math.ceil(n / 2 - 1e-9)), max(1, math.floor(2 * n + 1e-9))


def check_budget(steps: int, budget: int) -> None:
    if steps < 1:
        raise ConfigError(f"steps={steps} must be >= 1")
    if not 1 <= budget <= steps:
        raise ConfigError(f"cache budget of {budget} full steps does not fit {steps} steps; use steps >= {budget}")


def uniform_schedule(steps: int, interval: int) -> CacheSchedule:
    """DeepCache: a full step every ``interval`` steps, starting at step 0."""
    check_budget(steps, budget_for_interval(steps, interval))
    return CacheSchedule(steps, tuple(range(0, steps, interval)), "uniform", float(interval))


def pairwise_l1(features: Sequence[np.ndarray]) -> np.ndarray:
    """D[i, j] = sum over calibration runs of ||X_i - X_j||_1; each array is [T, ...] for one run."""
    t = features[0].shape[0]
    d = np.zeros((t, t), dtype=np.float64)
    for f in features:
        if f.shape[0] != t:
            raise ConfigError(f"calibration features have {f.shape[0]} steps, expected {t}")
        flat = f.reshape(t, -1).astype(np.float64)
        for i in range(t):
            d[i] = np.abs(flat - flat[i]).sum(axis=1)
    return d


def step_weighted(distances: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """D'[s, i] = w_i * D[s, i]: the cost of reusing step s's feature at step i, scaled by step i's weight."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (distances.shape[0],) or not np.all(np.isfinite(w)) or (w < 0).any():
        raise ConfigError(f"step weights must be {distances.shape[0]} finite values >= 0, got shape {list(w.shape)}")
    return distances * w[None, :]


def group_costs(distances: np.ndarray) -> np.ndarray:
    """C[s, e] = diam(s, e) = sum_{i in [s, e)} D[s, i] for s < e (row prefix sums)."""
    t = distances.shape[0]
    prefix = np.zeros((t, t + 1), dtype=np.float64)
    prefix[:, 1:] = np.cumsum(distances, axis=1)
    return prefix - prefix[np.arange(t), np.arange(t)][:, None]


def dp_schedule(distances: np.ndarray, budget: int, bounds: tuple[int, int] | None = None, interval: float | None = None) -> CacheSchedule:
    """Optimal K-group partition of [0, T) under J (see module doc); ``bounds`` = (lo, hi) group lengths."""
    t = int(distances.shape[0])
    check_budget(t, budget)
    lo, hi = bounds if bounds is not None else group_bounds(t, budget)
    if budget * lo > t or budget * hi < t:
        raise ConfigError(
            f"no schedule of {budget} groups with lengths in [{lo}, {hi}] covers {t} steps; change the interval or steps"
        )
    cost = group_costs(distances)
    inf = np.inf
    best = np.full((budget + 1, t + 1), inf)
    arg = np.full((budget + 1, t + 1), -1, dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, budget + 1):
        for n in range(k * lo, min(t, k * hi) + 1):
            js = np.arange(max(0, n - hi), n - lo + 1)
            if js.size == 0:
                continue
            cand = best[k - 1, js] + cost[js, n]
            i = int(np.argmin(cand))
            if cand[i] < best[k, n]:
                best[k, n], arg[k, n] = cand[i], js[i]
    if not np.isfinite(best[budget, t]):
        raise ConfigError(f"no feasible cache schedule for T={t}, K={budget}, lengths [{lo}, {hi}]")
    starts, n = [], t
    for k in range(budget, 0, -1):
        j = int(arg[k, n])
        starts.append(j)
        n = j
    return CacheSchedule(t, tuple(reversed(starts)), "dp", float(interval if interval is not None else t / budget))


def schedule_cost(distances: np.ndarray, schedule: CacheSchedule) -> float:
    """J of a schedule (the DP objective), for comparisons and tests."""
    ref = schedule.reference()
    return float(distances[ref, np.arange(schedule.steps)].sum())
