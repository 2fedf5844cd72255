"""DP cache schedule (docs/design.md §5.2): optimal vs brute force, budget and group bounds, uniform, errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ember.errors import ConfigError
from ember.passes import cache_schedule as cs


def _brute_force(d: np.ndarray, budget: int, lo: int, hi: int) -> float:
    t = d.shape[0]
    best = np.inf
    for inner in itertools.combinations(range(1, t), budget - 1):
        starts = (0, *inner)
        lengths = np.diff((*starts, t))
        if lengths.min() < lo or lengths.max() > hi:
            continue
        best = min(best, cs.schedule_cost(d, cs.CacheSchedule(t, starts, "dp", t / budget)))
    return best


def _features(seed: int, t: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # a drifting trajectory with bursts, like denoising features (fast change early and late)
    steps = rng.normal(size=(t, 3, 4)) * rng.uniform(0.1, 3.0, size=(t, 1, 1))
    return [np.cumsum(steps, axis=0), np.cumsum(rng.normal(size=(t, 3, 4)), axis=0)]


@pytest.mark.parametrize("seed,t,interval", [(0, 10, 3), (1, 12, 3), (2, 11, 2), (3, 12, 4), (4, 9, 5)])
def test_dp_matches_brute_force_and_respects_bounds(seed: int, t: int, interval: int) -> None:
    d = cs.pairwise_l1(_features(seed, t))
    budget = cs.budget_for_interval(t, interval)
    lo, hi = cs.group_bounds(t, budget)
    assert (lo, hi) == (max(1, -(-interval // 2)), 2 * interval) or t % interval  # integer N: [ceil(N/2), 2N]
    sched = cs.dp_schedule(d, budget, (lo, hi), interval=interval)
    assert sched.budget == budget and sched.full_steps[0] == 0
    lengths = np.diff((*sched.full_steps, t))
    assert lengths.min() >= lo and lengths.max() <= hi
    assert cs.schedule_cost(d, sched) == pytest.approx(_brute_force(d, budget, lo, hi), rel=1e-12)


def test_dp_never_worse_than_uniform() -> None:
    for seed in range(5):
        d = cs.pairwise_l1(_features(seed, 20))
        uni = cs.uniform_schedule(20, 4)
        dp = cs.dp_schedule(d, uni.budget, cs.group_bounds(20, uni.budget))
        assert cs.schedule_cost(d, dp) <= cs.schedule_cost(d, uni) + 1e-9


def test_group_costs_are_prefix_sums() -> None:
    d = cs.pairwise_l1(_features(7, 8))
    c = cs.group_costs(d)
    for s in range(8):
        for e in range(s + 1, 9):
            assert c[s, e] == pytest.approx(d[s, s:e].sum())


def test_uniform_and_reference() -> None:
    s = cs.uniform_schedule(10, 3)
    assert s.full_steps == (0, 3, 6, 9)
    assert s.reference().tolist() == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
    assert s.is_full().sum() == 4
    assert cs.CacheSchedule.from_dict(s.to_dict()) == s


def test_budget_for_speedup() -> None:
    # shallow costs 10% of full: K + (50-K) * 0.1 <= 50 / 4  ->  K <= 8.33: the largest such K
    k = cs.budget_for_speedup(50, 4.0, 0.1)
    assert k == 8
    assert k + (50 - k) * 0.1 <= 50 / 4 < (k + 1) + (50 - k - 1) * 0.1
    with pytest.raises(ConfigError, match="unreachable"):
        cs.budget_for_speedup(50, 20.0, 0.1)


def test_bad_inputs_give_clear_errors() -> None:
    d = cs.pairwise_l1(_features(0, 6))
    with pytest.raises(ConfigError, match="does not fit 6 steps"):
        cs.dp_schedule(d, 7)
    with pytest.raises(ConfigError, match=r"lengths in \[3, 3\]"):
        cs.dp_schedule(d, 3, (3, 3))
    with pytest.raises(ConfigError, match="interval 0"):
        cs.uniform_schedule(10, 0)
    with pytest.raises(ConfigError, match="begin at 0"):
        cs.CacheSchedule(10, (1, 4), "dp", 3.0)


def test_compile_options_pick_budget_from_interval_or_speedup() -> None:
    from ember.compiler.diffusion import DiffusionCompileOptions, _schedule

    d = cs.pairwise_l1(_features(1, 50))
    macs = {"unet_full": 100, "unet_shallow": 10}
    by_speedup = _schedule(DiffusionCompileOptions(steps=50, cache_speedup=4.0), macs, d)
    assert by_speedup.method == "dp" and by_speedup.budget == 8  # largest K with K + (50-K)*0.1 <= 12.5
    uni = _schedule(DiffusionCompileOptions(steps=50, cache_interval=5, schedule="uniform"), macs, None)
    assert uni.full_steps == tuple(range(0, 50, 5))
    none = _schedule(DiffusionCompileOptions(steps=50), macs, None)
    assert none.method == "none" and none.budget == 50


@pytest.mark.parametrize("seed,t,interval", [(0, 10, 3), (5, 12, 4)])
def test_step_weighted_dp_matches_brute_force(seed: int, t: int, interval: int) -> None:
    d = cs.pairwise_l1(_features(seed, t))
    w = np.random.default_rng(seed).uniform(0.1, 5.0, size=t)
    dw = cs.step_weighted(d, w)
    np.testing.assert_allclose(dw, d * w[None, :])
    budget = cs.budget_for_interval(t, interval)
    lo, hi = cs.group_bounds(t, budget)
    sched = cs.dp_schedule(dw, budget, (lo, hi), interval=interval)
    assert cs.schedule_cost(dw, sched) == pytest.approx(_brute_force(dw, budget, lo, hi), rel=1e-12)


def test_sampler_weights_move_full_steps_to_the_heavy_early_steps() -> None:
    """Features drifting at a constant rate: the unweighted objective ties uniform; the
    sampler-weighted one (DDIM, 50 steps) spends the budget early, where errors cost most."""
    from ember.export.diffusion.config import SD1_SCHEDULER
    from ember.runtime.diffusion.ddim import DDIM

    t, interval = 50, 5
    d = cs.pairwise_l1([np.arange(t, dtype=np.float64)[:, None]])  # D[i, j] = |i - j|
    budget = cs.budget_for_interval(t, interval)
    plain = cs.dp_schedule(d, budget, interval=interval)
    uni = cs.uniform_schedule(t, interval)
    assert cs.schedule_cost(d, plain) == pytest.approx(cs.schedule_cost(d, uni))
    w = DDIM.from_config(SD1_SCHEDULER).eps_weights(t)
    weighted = cs.dp_schedule(cs.step_weighted(d, w), budget, interval=interval)
    lengths = np.diff((*weighted.full_steps, t))
    assert lengths[0] == cs.group_bounds(t, budget)[0] and lengths[0] < lengths[-1]
    dw = cs.step_weighted(d, w)
    assert cs.schedule_cost(dw, weighted) < 0.9 * cs.schedule_cost(dw, uni)
    with pytest.raises(ConfigError, match="step weights"):
        cs.step_weighted(d, w[:-1])
    with pytest.raises(ConfigError, match="schedule_weights"):
        from ember.compiler.diffusion import DiffusionCompileOptions

        DiffusionCompileOptions(schedule_weights="x0")


def test_default_dp_objective_is_the_unweighted_noise_error() -> None:
    """On the trained reference model the sampler's weights overstate the early steps (a trained
    denoiser damps an early error) and made the DP lose to uniform (benchmarks/results/
    diffusion_reference.md): the default is the error reuse puts into the guided noise, unweighted."""
    from ember.compiler.diffusion import DiffusionCompileOptions

    opts = DiffusionCompileOptions(cache_interval=5)
    assert (opts.schedule_distance, opts.schedule_weights) == ("noise", "none")
    with pytest.raises(ConfigError, match="schedule_distance 'eps' must be one of noise, feature"):
        DiffusionCompileOptions(schedule_distance="eps")
