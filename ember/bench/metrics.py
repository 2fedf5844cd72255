"""Serving metrics: per-request timing records -> total time, throughput, latency percentiles.

All times are seconds from ``time.perf_counter()``. Per request: TTFT = first token - arrival,
TPOT = (last token - first token) / (tokens - 1), e2e = last token - arrival; ITL pools every
gap between consecutive tokens of a request. Peak memory is the process RSS, sampled.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    index: int
    arrival: float  # absolute perf_counter time the request arrived (was submitted)
    prompt_tokens: int
    target_tokens: int  # max_new_tokens it asked for
    token_times: list[float] = field(default_factory=list)  # absolute time of each output token
    finished: float | None = None  # absolute time it completed (None: not completed, e.g. capped)
    token_ids: list[int] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n >= 2 else None

    @property
    def e2e(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}


@dataclass
class ArmResult:
    """One arm on one workload. ``extrapolated``: the arm hit its time cap and its total time
    is estimated from its measured token rate (see ``summarize``)."""

    arm: str
    records: list[RequestRecord]
    start: float  # absolute time the run started (first arrival)
    end: float  # absolute time the last request completed (or the cap fired)
    peak_rss_bytes: int
    extrapolated: bool = False
    notes: str = ""

    def summary(self) -> dict:
        return summarize(self)


def summarize(r: ArmResult) -> dict:
    """Metrics of one arm. For a capped arm, total time = elapsed x planned tokens / produced
    tokens (valid for workloads whose requests all arrive at once and are alike); latency
    percentiles then cover only the requests that completed."""
    done = [x for x in r.records if x.finished is not None]
    produced = sum(len(x.token_times) for x in r.records)
    planned = sum(x.target_tokens for x in r.records)
    elapsed = max(r.end - r.start, 1e-9)
    total = elapsed * planned / max(produced, 1) if r.extrapolated else elapsed
    out_tokens = planned if r.extrapolated else sum(len(x.token_times) for x in done)
    itl = [b - a for x in r.records for a, b in zip(x.token_times, x.token_times[1:])]
    return {
        "arm": r.arm,
        "requests": len(r.records),
        "completed": len(done),
        "extrapolated": r.extrapolated,
        "measured_s": elapsed,
        "total_s": total,
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / total,
        "req_s": len(r.records) / total,
        "ttft": percentiles([x.ttft for x in r.records if x.ttft is not None]),
        "tpot": percentiles([x.tpot for x in done if x.tpot is not None]),
        "itl": percentiles(itl),
        "e2e": percentiles([x.e2e for x in done]),
        "peak_rss_mib": r.peak_rss_bytes / 2**20,
        "notes": r.notes,
    }


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except (OSError, ValueError, IndexError):
        return 0


class RssSampler:
    """Samples this process's RSS every ``interval`` s while in a ``with`` block; ``.peak``."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())
