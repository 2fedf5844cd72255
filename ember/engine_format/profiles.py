"""Optimization profiles for engines with dynamic shapes (TensorRT), derived from the step graph.

Pure Python, no TensorRT: a profile maps each *symbolic dim name* of the graph (``batch``,
``tokens``, ``past``) to a ``DimRange`` (min <= opt <= max), and ``profile_shapes`` expands it
to per-input ``(min, opt, max)`` shapes. Because every input that names a dim gets the range of
that name, shapes derived here are consistent by construction; ``check_profile`` verifies
shapes from anywhere else (a user's JSON, an older manifest) before a build, since TensorRT
fails late and obscurely when two inputs sharing a dim disagree.

The decoder step graph gets two profiles (docs/design.md §3.1):
- ``decode``: T = 1, batch 1..max_batch (optimised at ``decode_batch_opt``);
- ``prefill``: T = 2..prefill_tokens, batch 1..prefill_batch (optimised for one row).
Both cover past = 1..max_past (the KV pool's capacity ``S_cap``, never 0: the pool keeps at
least 16 positions). A call with T == 1 runs on ``decode``, otherwise on ``prefill``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from ember.engine_format.manifest import TensorSpec
from ember.errors import ConfigError, InputError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class DimRange:
    """The range one symbolic dim may take in a profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ConfigError(f"dim range min={self.min} opt={self.opt} max={self.max} must satisfy 1 <= min <= opt <= max")

    def contains(self, n: int) -> bool:
        return self.min <= n <= self.max


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile: a name and the range of every symbolic dim."""

    name: str
    dims: dict[str, DimRange]

    def to_dict(self) -> dict:
        return {"name": self.name, "dims": {k: [r.min, r.opt, r.max] for k, r in self.dims.items()}}

    @staticmethod
    def from_dict(d: dict) -> "ProfileSpec":
        try:
            return ProfileSpec(d["name"], {k: DimRange(*map(int, v)) for k, v in d["dims"].items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed profile {d!r} ({e}); expected {{'name': str, 'dims': {{dim: [min, opt, max]}}}}") from e

    def accepts(self, dims: dict[str, int]) -> bool:
        """True when every named dim value lies in this profile's range."""
        return all(n in self.dims and self.dims[n].contains(v) for n, v in dims.items())


def symbolic_dims(inputs: Iterable[TensorSpec]) -> list[str]:
    """The symbolic dim names used by ``inputs``, in first-use order."""
    seen: list[str] = []
    for t in inputs:
        for d in t.shape:
            if isinstance(d, str) and d not in seen:
                seen.append(d)
    return seen


def step_profiles(inputs: Sequence[TensorSpec], max_batch: int = 128, max_past: int = 2048,
                  prefill_tokens: int = 512, prefill_batch: int = 8, decode_batch_opt: int | None = None,
                  past_opt: int | None = None) -> list[ProfileSpec]:
    """The decode and prefill profiles of a decoder step graph (see the module docstring)."""
    dims = symbolic_dims(inputs)
    missing = {"batch", "tokens", "past"} - set(dims)
    if missing:
        raise ConfigError(
            f"the step graph has no symbolic dim(s) {sorted(missing)} (it has {dims}); it was not exported by "
            f"Ember's step-graph exporter, so decode/prefill profiles cannot be derived: pass explicit profiles"
        )
    if prefill_tokens < 2:
        raise ConfigError(f"prefill_tokens={prefill_tokens} must be >= 2 (T = 1 is the decode profile)")
    past_opt = past_opt or min(max_past, 512)
    decode = ProfileSpec("decode", {
        "batch": DimRange(1, decode_batch_opt or max(1, max_batch // 2), max_batch),
        "tokens": DimRange(1, 1, 1),
        "past": DimRange(1, past_opt, max_past),
    })
    prefill = ProfileSpec("prefill", {
        "batch": DimRange(1, 1, min(prefill_batch, max_batch)),
        "tokens": DimRange(2, max(2, prefill_tokens // 4), prefill_tokens),
        "past": DimRange(1, past_opt, max_past),
    })
    extra = [d for d in dims if d not in ("batch", "tokens", "past")]
    if extra:
        raise ConfigError(f"the step graph has unexpected symbolic dims {extra}; pass explicit profiles for them")
    return [decode, prefill]


def profile_shapes(inputs: Sequence[TensorSpec], profile: ProfileSpec) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per-input (min, opt, max) shapes of ``profile``; every symbolic dim must have a range."""
    out: dict[str, tuple[Shape, Shape, Shape]] = {}
    for t in inputs:
        lo, mid, hi = [], [], []
        for d in t.shape:
            if isinstance(d, str):
                if d not in profile.dims:
                    raise ConfigError(f"profile {profile.name!r} gives no range for dim {d!r} of input {t.name!r}; "
                                      f"add it (profile dims: {sorted(profile.dims)})")
                r = profile.dims[d]
                lo.append(r.min), mid.append(r.opt), hi.append(r.max)
            else:
                lo.append(int(d)), mid.append(int(d)), hi.append(int(d))
        out[t.name] = (tuple(lo), tuple(mid), tuple(hi))
    return out


def check_profile(inputs: Sequence[TensorSpec], shapes: dict[str, tuple[Shape, Shape, Shape]],
                  profile_name: str = "profile") -> None:
    """Raise ConfigError unless ``shapes`` is a valid, consistent profile for ``inputs``.

    Checks: every input present with its rank; static dims fixed at their size;
    min <= opt <= max per axis; and every input that shares a symbolic dim name gives that
    dim the same (min, opt, max) -- the first disagreeing pair is named.
    """
    by_name = {t.name: t for t in inputs}
    unknown = sorted(set(shapes) - set(by_name))
    if unknown:
        raise ConfigError(f"{profile_name}: shapes given for {unknown}, which are not inputs of the graph")
    seen: dict[str, tuple[tuple[int, int, int], str]] = {}
    for t in inputs:
        if t.name not in shapes:
            raise ConfigError(f"{profile_name}: no shapes for input {t.name!r}; every dynamic input needs min/opt/max")
        lo, mid, hi = shapes[t.name]
        if not (len(lo) == len(mid) == len(hi) == len(t.shape)):
            raise ConfigError(f"{profile_name}: input {t.name!r} has rank {len(t.shape)} {t.shape} but its profile "
                              f"shapes are {lo}/{mid}/{hi}")
        for axis, d in enumerate(t.shape):
            rng = (lo[axis], mid[axis], hi[axis])
            if not (1 <= rng[0] <= rng[1] <= rng[2]):
                raise ConfigError(f"{profile_name}: input {t.name!r} axis {axis}: min/opt/max {rng} must satisfy "
                                  f"1 <= min <= opt <= max")
            if isinstance(d, int):
                if rng != (d, d, d):
                    raise ConfigError(f"{profile_name}: input {t.name!r} axis {axis} is static ({d}) but the profile "
                                      f"gives {rng}; use ({d}, {d}, {d})")
                continue
            if d in seen and seen[d][0] != rng:
                other_range, other = seen[d]
                raise ConfigError(
                    f"{profile_name}: inputs {other!r} and {t.name!r} share dim {d!r} but give it different ranges "
                    f"{other_range} vs {rng}; give every input the same range for {d!r}"
                )
            seen.setdefault(d, (rng, t.name))


def select_profile(profiles: Sequence[ProfileSpec], dims: dict[str, int]) -> int:
    """Index of the first profile accepting ``dims`` (e.g. {'batch': 4, 'tokens': 1, 'past': 64})."""
    for i, p in enumerate(profiles):
        if p.accepts(dims):
            return i
    ranges = "; ".join(f"{p.name}: " + ", ".join(f"{k} {r.min}..{r.max}" for k, r in p.dims.items()) for p in profiles)
    raise InputError(f"shape {dims} is outside every optimization profile of the engine ({ranges}); "
                     f"lower the batch / prompt chunk, or recompile with larger --max-batch / profile limits")
