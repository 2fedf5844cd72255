"""Per-request token sampling: greedy, temperature, top-k, top-p (nucleus), seeded.

Each request owns a ``numpy.random.Generator`` seeded from its own seed, so a request's
samples do not depend on which other requests it was batched with.
"""
from __future__ import annotations

import numpy as np

from ember.runtime.requests import SamplingParams


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """logits [V] float32 -> token id."""
    if params.temperature <= 0.0 or rng is None:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / params.temperature
    v = x.shape[0]
    k = params.top_k if 0 < params.top_k < v else v
    if params.top_p < 1.0:
        # exact nucleus over the smallest sorted prefix: widen the candidate set until it holds top_p mass
        m = x.max()
        z = np.exp(x - m)
        total = z.sum()
        c = min(k, 64)
        while True:
            idx = np.argpartition(-x, c - 1)[:c] if c < v else np.arange(v)
            idx = idx[np.argsort(-x[idx], kind="stable")]
            if c >= k or z[idx].sum() >= params.top_p * total:
                break
            c = min(k, c * 4)
        idx = idx[:k]
        p = z[idx] / z[idx].sum()
        keep = int(np.searchsorted(np.cumsum(p), params.top_p) + 1)
        idx, p = idx[:keep], p[:keep]
    else:
        idx = np.argpartition(-x, k - 1)[:k] if k < v else np.arange(v)
        p = np.exp(x[idx] - x[idx].max())
    p = p / p.sum()
    return int(idx[rng.choice(len(idx), p=p)])
