"""Per-request token sampling: greedy, temperature, top-k, top-p (nucleus), seeded.

Each request owns a ``numpy.random.Generator`` seeded from its own seed, so a request's
samples do not depend on which other requests it was batched with.

Numerics: the softmax is taken in float64 over ``(logits - max) / temperature`` (every
exponent <= 0, so nothing overflows, whatever the temperature). A temperature so small that
every token below the top logit gets probability 0 (e.g. ``1e-320``, or ``1e-30`` unless two
logits are within ~1e-28 of each other) is greedy: the first argmax, with no draw, exactly
what ``temperature=0`` gives. A ``+inf`` logit is likewise greedy (the first one wins).
NaN logits (a broken model) raise ``ValueError``, which fails that request only.
"""
from __future__ import annotations

import numpy as np

from ember.runtime.requests import SamplingParams


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """logits [V] float32 -> token id."""
    if params.temperature <= 0.0 or rng is None:
        return int(np.argmax(logits))
    x = np.asarray(logits, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError(f"the model's logits contain NaN at token id {int(np.flatnonzero(np.isnan(x))[0])}: "
                         "the engine folder or its inputs are broken; check it with `ember check`")
    top = int(np.argmax(x))
    if not np.isfinite(x[top]):  # +inf wins outright; all -inf: nothing to sample but the argmax
        return top
    ties = np.count_nonzero(x == x[top])
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        x = (x - x[top]) / params.temperature  # <= 0 everywhere: exp cannot overflow
        z = np.exp(x)
    if np.count_nonzero(z) == ties:  # the softmax has collapsed onto the top logit: greedy
        return top
    return _draw(x, z, params, rng)


def _draw(x: np.ndarray, z: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Draw from softmax(x) (``z = exp(x)``, max(x) = 0) restricted by top-k and top-p."""
    v = x.shape[0]
    k = params.top_k if 0 < params.top_k < v else v
    if params.top_p < 1.0:
        # exact nucleus over the smallest sorted prefix: widen the candidate set until it holds top_p mass
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
        p = z[idx]
    p = p / p.sum()
    return int(idx[rng.choice(len(idx), p=p)])
