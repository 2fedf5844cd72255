"""Activation calibration: run the float graph in ONNX Runtime on calibration feeds, collect
ranges of chosen tensors, and turn them into thresholds (max, percentile, entropy).

Everything is symmetric (zero point 0): a threshold ``t`` (same unit as the tensor) becomes
the scale ``t / qmax`` (qmax 127 for INT8, 448 for FP8 E4M3).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ember.errors import ConfigError
from ember.passes.quant_graph import ort_session

CALIB_METHODS = ("max", "percentile", "entropy")
_OUTPUTS_PER_RUN = 64  # intermediate tensors fetched per run: bounds calibration memory


@dataclass
class TensorStats:
    """Ranges of one tensor over all calibration feeds."""

    amax: float  # max |x|
    hist: np.ndarray | None = None  # counts of |x| in num_bins equal bins over [0, amax]
    channel_amax: np.ndarray | None = None  # max |x| per last-axis channel (SmoothQuant), [C]


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs also include the tensors ``names`` (weights shared by
    reference where external: the copy holds the same external references)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for n in names:
        if n not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=n))
    return probe


class StatsCollector:
    """Accumulates ``TensorStats`` (max |x|, and per-channel maxima of ``channel_tensors``) of the
    tensors ``names`` from values seen one at a time: by ``collect_stats``' own runs, or by the runs
    that make calibration feeds (``calibration_data.decoder_step_feeds(observe=)``), so that those
    runs need not be repeated to calibrate."""

    def __init__(self, tensors: Sequence[str], channel_tensors: Sequence[str] = ()):
        self.names = sorted(set(tensors) | set(channel_tensors))
        self.channel = set(channel_tensors)
        self.stats = {n: TensorStats(0.0) for n in self.names}

    def add(self, name: str, value: np.ndarray) -> None:
        if value.dtype.kind != "f":
            raise ConfigError(f"tensor {name!r} is {value.dtype}, not float: it cannot be quantized; exclude its consumer")
        st = self.stats[name]
        if value.size:
            a = np.abs(value)
            st.amax = max(st.amax, float(a.max()))
            if name in self.channel:
                cmax = a.reshape(-1, a.shape[-1]).max(axis=0)
                st.channel_amax = cmax if st.channel_amax is None else np.maximum(st.channel_amax, cmax)


def _runs(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], names: list[str], threads: int,
          base_dir=None):
    """Yield (name, value) for every requested tensor of every feed, a chunk of names at a time."""
    sess = ort_session(with_outputs(model, names), threads=threads, base_dir=base_dir)
    for start in range(0, len(names), _OUTPUTS_PER_RUN):
        chunk = names[start:start + _OUTPUTS_PER_RUN]
        for feed in feeds:
            for name, value in zip(chunk, sess.run(chunk, feed)):
                yield name, value


def collect_stats(
    model: onnx.ModelProto,
    feeds: Sequence[dict[str, np.ndarray]],
    tensors: Sequence[str],
    histogram_bins: int = 0,
    channel_tensors: Sequence[str] = (),
    threads: int = 0,
    base_dir=None,
    observed: dict[str, TensorStats] | None = None,
) -> dict[str, TensorStats]:
    """Stats of ``tensors`` (+ per-channel maxima of ``channel_tensors``) over ``feeds`` (weights
    ``model`` keeps in external files are read from ``base_dir``).

    ``observed``: stats of some of ``tensors`` already gathered over these same ``feeds``
    (``StatsCollector``); their max |x| is taken from it instead of running the graph again.
    ``histogram_bins`` > 0 adds a second pass that fills |x| histograms over [0, amax].
    """
    wanted, per_channel = set(tensors), set(channel_tensors)
    observed = {n: st for n, st in (observed or {}).items() if n in wanted and n not in per_channel}
    collector = StatsCollector([n for n in tensors if n not in observed], channel_tensors)
    if collector.names:
        for name, value in _runs(model, feeds, collector.names, threads, base_dir):
            collector.add(name, value)
    stats = {**{n: TensorStats(st.amax) for n, st in observed.items()}, **collector.stats}
    stats = {n: stats[n] for n in sorted(stats)}
    if not stats:
        return {}
    if histogram_bins > 0:
        for st in stats.values():
            st.hist = np.zeros(histogram_bins, dtype=np.int64)
        for name, value in _runs(model, feeds, [n for n in tensors], threads, base_dir):
            st = stats[name]
            if value.size and st.amax > 0:
                h, _ = np.histogram(np.abs(value), bins=histogram_bins, range=(0.0, st.amax))
                st.hist += h
    return stats


def percentile_threshold(hist: np.ndarray, amax: float, percentile: float) -> float:
    """The |x| below which ``percentile`` % of the calibration values fall (bin upper edge)."""
    total = hist.sum()
    if total == 0:
        return amax
    cdf = np.cumsum(hist) / total
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return amax * min(i + 1, len(hist)) / len(hist)


def entropy_threshold(hist: np.ndarray, amax: float, levels: int = 128, stride: int = 16) -> float:
    """TensorRT-style KL-divergence calibration: the clip threshold whose ``levels``-level
    quantization of the |x| histogram loses the least information (KL(P || Q))."""
    nbins = len(hist)
    if hist.sum() == 0 or nbins <= levels:
        return amax
    hist = hist.astype(np.float64)
    best_kl, best_i = np.inf, nbins
    for i in range(levels, nbins + 1, stride):
        ref = hist[:i].copy()
        ref[-1] += hist[i:].sum()  # clipped values pile up in the last bin
        group = np.arange(i) * levels // i
        nonzero = hist[:i] != 0
        sums = np.bincount(group, weights=hist[:i], minlength=levels)
        counts = np.bincount(group, weights=nonzero, minlength=levels)
        expanded = np.where(nonzero, sums[group] / np.maximum(counts[group], 1), 0.0)
        p = ref / ref.sum()
        q = expanded / max(expanded.sum(), 1e-30)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return amax * best_i / nbins


def threshold(stats: TensorStats, method: str, percentile: float = 99.99) -> float:
    """The clip threshold of one tensor (same unit as the tensor); > 0."""
    if method not in CALIB_METHODS:
        raise ConfigError(f"calibration method {method!r} is not one of {', '.join(CALIB_METHODS)}")
    if stats.amax <= 0:
        return 1.0  # an all-zero tensor: any scale represents it exactly
    if method == "max":
        return stats.amax
    assert stats.hist is not None, "histogram method needs collect_stats(histogram_bins>0)"
    t = percentile_threshold(stats.hist, stats.amax, percentile) if method == "percentile" else \
        entropy_threshold(stats.hist, stats.amax)
    return max(t, stats.amax * 1e-4)
