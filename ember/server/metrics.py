"""Server metrics in the Prometheus text exposition format (version 0.0.4).

Counters and histograms are updated on the server's event loop only (no locks needed);
engine gauges (queue depth, running sequences, KV usage) are read from
``engine.stats()`` at scrape time. Output tokens/s is the rate of the engine's
``tokens_generated_total`` over a sliding window of recent samples.
"""
from __future__ import annotations

import bisect
import math
import time
from collections import Counter, deque
from typing import Any, Callable

from ember.runtime.requests import Completion

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# engine.stats() key -> (metric name, type, help)
ENGINE_GAUGES = {
    "queue_depth": ("ember_queue_depth", "gauge", "Requests waiting for a slot"),
    "running": ("ember_running_sequences", "gauge", "Sequences being generated"),
    "running_peak": ("ember_running_sequences_peak", "gauge", "The most sequences generated at once so far"),
    "kv_used_tokens": ("ember_kv_used_tokens", "gauge", "KV-cache positions held by live sequences"),
    "kv_capacity_tokens": ("ember_kv_capacity_tokens", "gauge", "KV-cache positions allocated"),
    "tokens_generated_total": ("ember_generation_tokens_total", "counter", "Output tokens generated"),
    "requests_finished_total": ("ember_engine_requests_finished_total", "counter", "Requests the engine retired"),
    "iterations_total": ("ember_engine_iterations_total", "counter", "Scheduler iterations run"),
}


class Histogram:
    """Cumulative-bucket histogram (upper bounds in seconds, +Inf implied)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for bound, n in zip(self.bounds + (math.inf,), self.counts):
            acc += n
            le = "+Inf" if math.isinf(bound) else repr(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
        lab = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{lab} {self.sum!r}", f"{name}_count{lab} {acc}"]
        return out


class ServerMetrics:
    """What the HTTP layer counts: responses by endpoint and status, finishes by reason,
    latency histograms from each finished ``Completion``, and the engine's gauges."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.responses: Counter[tuple[str, int]] = Counter()
        self.finishes: Counter[str] = Counter()
        self.disconnects = 0
        self.ttft = Histogram(TTFT_BUCKETS_S)
        self.tpot = Histogram(TPOT_BUCKETS_S)
        self.e2e = Histogram(E2E_BUCKETS_S)
        self.image_latency = Histogram(E2E_BUCKETS_S)
        self._window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float, float]] = deque()  # (t, tokens_total, finished_total)

    def count_response(self, endpoint: str, status: int) -> None:
        self.responses[(endpoint, status)] += 1

    def observe_completion(self, c: Completion) -> None:
        self.finishes[c.finish_reason.value] += 1
        if c.ttft is not None:
            self.ttft.observe(c.ttft)
        if c.tpot is not None:
            self.tpot.observe(c.tpot)
        self.e2e.observe(c.e2e)

    def sample(self, stats: dict[str, Any]) -> None:
        """Record the engine counters now (called periodically and at scrape time)."""
        now = self._clock()
        self._samples.append((now, float(stats.get("tokens_generated_total", 0)),
                              float(stats.get("requests_finished_total", 0))))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window_s:
            self._samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(output tokens/s, finished requests/s) over the sliding window; 0 with < 2 samples."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, k0, r0), (t1, k1, r1) = self._samples[0], self._samples[-1]
        dt = t1 - t0
        return ((k1 - k0) / dt, (r1 - r0) / dt) if dt > 0 else (0.0, 0.0)

    def seconds_per_finish(self) -> float | None:
        """Mean seconds between finished requests over the sliding window. When none finished,
        the window's span (a lower bound: fewer than one finish in that time); None before
        two samples."""
        if len(self._samples) < 2:
            return None
        (t0, _, r0), (t1, _, r1) = self._samples[0], self._samples[-1]
        return (t1 - t0) / max(r1 - r0, 1.0) if t1 > t0 else None

    def render(self, stats: dict[str, Any] | None, state: str) -> str:
        """The whole exposition text. ``stats`` is ``engine.stats()`` (None while loading)."""
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])

        head("ember_up", "gauge", "1 when the engine is loaded and accepting requests")
        out.append(f"ember_up {int(state == 'ready')}")
        if stats is not None:
            self.sample(stats)
            for key, value in stats.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                kind = "counter" if key.endswith("_total") else "gauge"
                name, kind, text = ENGINE_GAUGES.get(key, (f"ember_engine_{key}", kind, f"engine.stats()['{key}']"))
                head(name, kind, text)
                out.append(f"{name} {value}")
            cap = stats.get("kv_capacity_tokens") or 0
            head("ember_kv_usage_ratio", "gauge", "kv_used_tokens / kv_capacity_tokens")
            out.append(f"ember_kv_usage_ratio {(stats.get('kv_used_tokens', 0) / cap) if cap else 0.0}")
        tok_s, req_s = self.rates()
        head("ember_generation_tokens_per_second", "gauge", f"Output tokens/s over the last {self._window_s:g} s")
        out.append(f"ember_generation_tokens_per_second {tok_s}")
        head("ember_requests_finished_per_second", "gauge", f"Finished requests/s over the last {self._window_s:g} s")
        out.append(f"ember_requests_finished_per_second {req_s}")
        head("ember_http_responses_total", "counter", "HTTP responses by endpoint and status code")
        for (endpoint, status), n in sorted(self.responses.items()):
            out.append(f'ember_http_responses_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        head("ember_request_finish_total", "counter", "Finished generation requests by finish reason")
        for reason, n in sorted(self.finishes.items()):
            out.append(f'ember_request_finish_total{{reason="{reason}"}} {n}')
        head("ember_client_disconnects_total", "counter", "Requests cancelled because the client went away")
        out.append(f"ember_client_disconnects_total {self.disconnects}")
        for name, h, text in [("ember_time_to_first_token_seconds", self.ttft, "Time to first token"),
                              ("ember_time_per_output_token_seconds", self.tpot, "Mean time between output tokens"),
                              ("ember_request_latency_seconds", self.e2e, "Submit to finish"),
                              ("ember_image_request_latency_seconds", self.image_latency, "Image request to answer")]:
            head(name, "histogram", text)
            out.extend(h.lines(name))
        return "\n".join(out) + "\n"


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample name (with labels, as written) -> value; for tests and the load benchmark."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
