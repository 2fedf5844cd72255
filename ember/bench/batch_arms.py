"""Arms that run whole batches to completion: static batching, dynamic batching, HF generate.

A batch is prefilled in one padded call, then decoded one step at a time over *all* its rows
until its longest request is done -- rows that are already done are still computed, as in a
classic static-batching server (FasterTransformer, ``transformers.generate``). A request's
latency ends at its own last token (as if streamed), which is generous to these arms.

Policies (when does a batch start?):
- static: fixed batches of ``batch_size`` in arrival order; a batch starts once all its
  requests have arrived and the previous batch is done (the last batch may be smaller).
- dynamic: when the runner is free, collect arrivals for ``window_s`` counted from the oldest
  waiting request (or until ``max_batch`` are waiting), then run what was collected.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ember.bench.metrics import ArmResult, RequestRecord, RssSampler
from ember.bench.model import BenchModel
from ember.bench.workload import BenchRequest
from ember.runtime.executor import run_greedy

# run_batch(requests, records, deadline) -> False when the deadline cut it short
BatchFn = Callable[[list[BenchRequest], list[RequestRecord], float], bool]


class OrtBatchRunner:
    """Runs one batch to completion on the shared sessions (greedy)."""

    def __init__(self, model: BenchModel, max_batch: int, ignore_eos: bool = True):
        self.model, self.ignore_eos = model, ignore_eos
        self.executor = model.executor(max_batch)  # the engine's own executor: fused decode part included

    def __call__(self, reqs: list[BenchRequest], recs: list[RequestRecord], deadline: float) -> bool:
        ex, b = self.executor, len(reqs)
        pool = ex.pool
        pool.lengths[:] = 0
        plens = np.array([len(r.prompt_ids) for r in reqs], dtype=np.int64)
        ids = np.zeros((b, int(plens.max())), dtype=np.int64)
        pos = np.zeros_like(ids)
        for i, r in enumerate(reqs):
            ids[i, :plens[i]] = r.prompt_ids
            pos[i, :plens[i]] = np.arange(plens[i])
        tok, _ = run_greedy(ex, 0, ids, pos, plens)  # as the engine: argmax on the device for a GPU executor
        steps = max(r.max_new_tokens for r in reqs)
        done = np.zeros(b, dtype=bool)
        for step in range(steps):
            now = time.perf_counter()
            for i, r in enumerate(reqs):
                if not done[i]:
                    recs[i].token_times.append(now)
                    recs[i].token_ids.append(int(tok[i]))
                    eos = not self.ignore_eos and tok[i] == self.model.eos_token_id
                    if eos or len(recs[i].token_ids) >= r.max_new_tokens:
                        done[i], recs[i].finished = True, now
            if done.all() or step == steps - 1:
                break
            if now >= deadline:
                return False
            cur = pool.lengths[:b].copy()
            tok, _ = run_greedy(ex, 0, tok.reshape(b, 1).astype(np.int64), cur.reshape(b, 1),
                                np.ones(b, dtype=np.int64))
        pool.lengths[:] = 0
        pool.maybe_shrink()
        return True


def drive_batches(arm: str, requests: list[BenchRequest], run_batch: BatchFn, policy: str, batch_size: int,
                  window_s: float = 1.0, cap_s: float | None = None, progress=None) -> ArmResult:
    """Replay arrivals in real time and run batches per ``policy`` ('static' | 'dynamic')."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    records = [RequestRecord(r.index, 0.0, len(r.prompt_ids), r.max_new_tokens) for r in requests]
    with RssSampler() as rss:
        start = time.perf_counter()
        deadline = start + cap_s if cap_s else float("inf")
        for i in order:
            records[i].arrival = start + requests[i].arrival_s
        nxt, capped = 0, False
        while nxt < len(order) and not capped:
            if policy == "static":
                batch = order[nxt:nxt + batch_size]
                ready_at = records[batch[-1]].arrival
            else:
                first = records[order[nxt]].arrival
                ready_at = max(first + window_s, time.perf_counter())
                full = order[nxt:nxt + batch_size]
                ready_at = min(ready_at, max(records[full[-1]].arrival, time.perf_counter())) \
                    if len(full) == batch_size else ready_at
                batch = [i for i in full if records[i].arrival <= ready_at]
            _sleep_until(min(ready_at, deadline))
            if time.perf_counter() >= deadline:
                capped = True
                break
            capped = not run_batch([requests[i] for i in batch], [records[i] for i in batch], deadline)
            nxt += len(batch)
            if progress is not None:
                progress.update(len(batch))
        end = time.perf_counter()
    if not capped:
        end = max(r.finished for r in records)
    return ArmResult(arm, records, start, end, rss.peak, extrapolated=capped)


def _sleep_until(t: float) -> None:
    dt = t - time.perf_counter()
    if dt > 0:
        time.sleep(dt)


def run_static(model: BenchModel, requests: list[BenchRequest], batch_size: int, ignore_eos: bool = True,
               cap_s: float | None = None, progress=None) -> ArmResult:
    runner = OrtBatchRunner(model, batch_size, ignore_eos)
    res = drive_batches("static", requests, runner, "static", batch_size, cap_s=cap_s, progress=progress)
    res.notes = f"batches of {batch_size} in arrival order, each run to completion"
    return res


def run_dynamic(model: BenchModel, requests: list[BenchRequest], max_batch: int, window_s: float = 1.0,
                ignore_eos: bool = True, cap_s: float | None = None, progress=None) -> ArmResult:
    runner = OrtBatchRunner(model, max_batch, ignore_eos)
    res = drive_batches("dynamic", requests, runner, "dynamic", max_batch, window_s, cap_s, progress)
    res.notes = f"collect for {window_s:g} s (up to {max_batch}), run the batch to completion"
    return res
