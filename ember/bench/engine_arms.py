"""Arms served by DecoderEngines: the fused scheduler, sequential, concurrent instances.

- fused: one engine with ``max_batch`` slots; every request is submitted at its arrival time.
- sequential: one engine with one slot: requests run one after another, FIFO.
- concurrent: one engine with one slot *per request*, each with its own loop thread, all on
  the shared ONNX Runtime session (ORT allows concurrent ``Run`` calls; they share its
  intra-op thread pool). This is "one instance per request" without 32 copies of the
  weights, which would not fit this machine's memory.
"""
from __future__ import annotations

import time
from typing import Callable

from ember.bench.metrics import ArmResult, RequestRecord, RssSampler
from ember.bench.model import BenchModel
from ember.bench.workload import BenchRequest
from ember.runtime.decoder import DecoderEngine
from ember.runtime.requests import FinishReason, RequestHandle, SamplingParams
from ember.runtime.scheduler import default_admit_batch, default_prefill_chunk

POLL_S = 0.05


def drive_engines(arm: str, requests: list[BenchRequest], engine_for: Callable[[int], DecoderEngine],
                  ignore_eos: bool, cap_s: float | None = None, progress=None) -> ArmResult:
    """Submit each request at its arrival time to ``engine_for(i)``; wait for all (or the cap).

    A cap cancels what is still running and marks the result extrapolated.
    """
    handles: list[RequestHandle | None] = [None] * len(requests)
    records = [RequestRecord(r.index, 0.0, len(r.prompt_ids), r.max_new_tokens) for r in requests]
    finished_seen = 0
    with RssSampler() as rss:
        start = time.perf_counter()
        deadline = start + cap_s if cap_s else float("inf")
        pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
        capped = False
        while pending or any(h is not None and not h.done for h in handles):
            now = time.perf_counter()
            if now >= deadline:
                capped = True
                break
            while pending and start + requests[pending[0]].arrival_s <= now:
                i = pending.pop(0)
                r = requests[i]
                params = SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=ignore_eos)
                handles[i] = engine_for(i).submit(r.prompt_ids, params)
                records[i].arrival = handles[i].submitted_at
            done = sum(1 for h in handles if h is not None and h.done)
            if progress is not None and done > finished_seen:
                progress.update(done - finished_seen)
                finished_seen = done
            wake = start + requests[pending[0]].arrival_s if pending else now + POLL_S
            time.sleep(max(0.0, min(wake, now + POLL_S, deadline) - time.perf_counter()))
        end = time.perf_counter()
        for h in handles:
            if h is not None and not h.done:
                h.cancel()
        for i, h in enumerate(handles):
            if h is None:
                records[i].arrival = end
                continue
            c = h.result(timeout=60)
            rec = records[i]
            rec.token_times, rec.token_ids = list(c.token_times), list(c.token_ids)
            if c.finish_reason not in (FinishReason.CANCELLED, FinishReason.ERROR):
                rec.finished = c.token_times[-1] if c.token_times else c.finished_at
            elif c.finish_reason is FinishReason.ERROR:
                raise RuntimeError(f"{arm}: request {i} failed: {c.error}")
    if progress is not None and len(requests) > finished_seen:
        progress.update(len(requests) - finished_seen)
    if not capped:
        end = max(r.finished for r in records)
    return ArmResult(arm, records, start, end, rss.peak, extrapolated=capped)


def run_fused(model: BenchModel, requests: list[BenchRequest], max_batch: int, ignore_eos: bool = True,
              compaction: str = "min-move", prefill_chunk: int | None = None, cap_s: float | None = None,
              progress=None, arm: str | None = None, admit_batch: int | None = None) -> ArmResult:
    prefill_chunk = prefill_chunk or default_prefill_chunk(model.device)
    admit_batch = admit_batch or default_admit_batch(model.device)
    with model.engine(max_batch, compaction=compaction, prefill_chunk=prefill_chunk, admit_batch=admit_batch) as eng:
        res = drive_engines(arm or "ember-fused", requests, lambda i: eng, ignore_eos, cap_s, progress)
        st = eng.stats()
    res.notes = f"max_batch={max_batch}, compaction={compaction}, prefill_chunk={prefill_chunk}, " \
                f"admit_batch={admit_batch}, iterations={st['iterations_total']}, slot_moves={st['slot_moves_total']}"
    return res


def run_sequential(model: BenchModel, requests: list[BenchRequest], ignore_eos: bool = True,
                   cap_s: float | None = None, progress=None) -> ArmResult:
    with model.engine(1) as eng:
        res = drive_engines("sequential", requests, lambda i: eng, ignore_eos, cap_s, progress)
    res.notes = "one engine, one slot: FIFO, one request at a time"
    return res


def run_concurrent(model: BenchModel, requests: list[BenchRequest], ignore_eos: bool = True,
                   cap_s: float | None = None, progress=None) -> ArmResult:
    engines = [model.engine(1) for _ in requests]
    try:
        res = drive_engines("concurrent", requests, lambda i: engines[i], ignore_eos, cap_s, progress)
    finally:
        for e in engines:
            e.close()
    res.notes = f"{len(engines)} one-slot engines on their own threads, one shared ORT session"
    return res
