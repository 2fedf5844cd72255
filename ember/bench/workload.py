"""Serving workloads: N requests with arrival times and prompt/output lengths, fixed by a seed.

Arrivals are Poisson (exponential gaps) or gamma (gaps with a chosen coefficient of
variation: cv > 1 is burstier than Poisson) at ``rate`` requests/s; ``rate=inf`` means every
request arrives at t=0. Lengths are fixed (``LengthDist(8, 8)``) or uniform over [lo, hi].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ember.errors import InputError


@dataclass(frozen=True)
class LengthDist:
    """Uniform integer lengths in [lo, hi]; lo == hi is a fixed length."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not (1 <= self.lo <= self.hi):
            raise InputError(f"length range {self.lo}:{self.hi} is invalid: need 1 <= lo <= hi")

    @staticmethod
    def parse(text: str) -> "LengthDist":
        """'128' (fixed) or '16:256' (uniform, inclusive)."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise InputError(f"length {text!r} is not understood; write N (fixed) or LO:HI (uniform)") from None
        if len(parts) not in (1, 2):
            raise InputError(f"length {text!r} is not understood; write N (fixed) or LO:HI (uniform)")
        return LengthDist(parts[0], parts[-1])

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.lo, self.hi + 1, size=n)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"U[{self.lo},{self.hi}]"


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    rate: float  # requests/s; math.inf = all at t=0
    prompt_len: LengthDist
    output_len: LengthDist
    arrival: str = "poisson"  # "poisson" | "gamma"
    gamma_cv: float = 2.0  # coefficient of variation of the gaps (gamma only)
    seed: int = 0
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise InputError(f"num_requests={self.num_requests} must be >= 1")
        if not self.rate > 0:
            raise InputError(f"rate={self.rate} must be > 0 requests/s (inf = all at once)")
        if self.arrival not in ("poisson", "gamma"):
            raise InputError(f"arrival={self.arrival!r} must be 'poisson' or 'gamma'")
        if self.arrival == "gamma" and not self.gamma_cv > 0:
            raise InputError(f"gamma_cv={self.gamma_cv} must be > 0")

    def describe(self) -> str:
        rate = "all at once" if math.isinf(self.rate) else f"{self.arrival} {self.rate:g} req/s"
        return f"{self.num_requests} requests, {rate}, prompts {self.prompt_len}, outputs {self.output_len}"


@dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival_s: float  # seconds after the run starts
    prompt_ids: list[int]
    max_new_tokens: int


def make_workload(spec: WorkloadSpec, vocab_size: int, avoid_token: int | None = None) -> list[BenchRequest]:
    """The requests of ``spec``, sorted by arrival. Prompt tokens are uniform random ids in
    [1, vocab_size) other than ``avoid_token`` (the EOS id), so prompts never hold an EOS."""
    rng = np.random.default_rng(spec.seed)
    n = spec.num_requests
    if math.isinf(spec.rate):
        arrivals = np.zeros(n)
    else:
        if spec.arrival == "poisson":
            gaps = rng.exponential(1.0 / spec.rate, size=n)
        else:  # gamma with mean 1/rate and the given cv: shape = 1/cv^2
            shape = 1.0 / spec.gamma_cv ** 2
            gaps = rng.gamma(shape, 1.0 / (spec.rate * shape), size=n)
        gaps[0] = 0.0  # the run starts with the first arrival
        arrivals = np.cumsum(gaps)
    plens = spec.prompt_len.sample(rng, n)
    olens = spec.output_len.sample(rng, n)
    out = []
    for i in range(n):
        ids = rng.integers(1, vocab_size, size=int(plens[i]))
        if avoid_token is not None:
            ids[ids == avoid_token] = 1 if avoid_token != 1 else 2
        out.append(BenchRequest(i, float(arrivals[i]), [int(t) for t in ids], int(olens[i])))
    return out
