"""Temporal fusion on a real tiny engine (gpt2-tiny through ONNX Runtime): fused requests
produce the tokens they produce alone; cancellation, overload, async and threads."""
from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

import ember
from ember.errors import OverloadedError
from ember.runtime.requests import FinishReason, SamplingParams


def make_requests(n: int, seed: int, vocab: int = 200) -> list[tuple[list[int], int, float]]:
    """(prompt ids, max_new_tokens, arrival delay s): random lengths and arrival gaps."""
    rng = random.Random(seed)
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(1, 40))], rng.randint(1, 24), rng.expovariate(400))
            for _ in range(n)]


@pytest.fixture(scope="module")
def solo_engine(gpt2_tiny):
    with ember.load(gpt2_tiny, max_batch=1, verify="size") as eng:
        yield eng


@pytest.fixture(scope="module")
def solo_cache():
    return {}


def alone(eng, cache, prompt: list[int], n: int) -> list[int]:
    """The request's greedy tokens when it runs by itself (memoised)."""
    key = (tuple(prompt), n)
    if key not in cache:
        cache[key] = eng.submit(prompt, max_new_tokens=n, ignore_eos=True).result(timeout=60).token_ids
    return cache[key]


@pytest.mark.parametrize("model,compaction,admit_batch", [("gpt2_tiny", "min-move", None), ("gpt2_tiny", "holes", None),
                                                           ("llama_tiny", "min-move", None), ("gpt2_tiny", "min-move", 3)])
def test_fused_tokens_equal_solo_tokens(request, model, compaction, admit_batch):
    """>= 100 requests, random arrivals and lengths, greedy: each equals its solo run."""
    folder = request.getfixturevalue(model)
    reqs = make_requests(120 if model == "gpt2_tiny" else 100, seed=3)
    solo_cache: dict = {}
    with ember.load(folder, max_batch=1, verify="size") as solo_engine:
        for p, n, _ in reqs:
            alone(solo_engine, solo_cache, p, n)
    with ember.load(folder, max_batch=6, prefill_chunk=24, compaction=compaction, verify="size",
                    admit_batch=admit_batch) as eng:
        assert eng.scheduler.admit_batch == (admit_batch or 1)  # the CPU default admits at once
        handles = []
        for prompt, n, delay in reqs:  # random arrivals while others are mid-prefill / mid-decode
            time.sleep(delay)
            handles.append(eng.submit(prompt, max_new_tokens=n, ignore_eos=True))
        results = [h.result(timeout=120) for h in handles]
        st = eng.stats()
    assert st["kv_used_tokens"] == 0 and st["running"] == 0
    assert st["iterations_total"] < sum(n for _, n, _ in reqs)  # work was really fused
    if compaction == "min-move":
        assert st["slot_moves_total"] > 0
    mismatched = [i for i, ((p, n, _), c) in enumerate(zip(reqs, results)) if c.token_ids != solo_cache[(tuple(p), n)]]
    assert not mismatched, f"{len(mismatched)} of {len(reqs)} requests differ from their solo run: {mismatched[:5]}"
    assert all(c.finish_reason is FinishReason.LENGTH for c in results)


def test_cancel_mid_stream_frees_memory(gpt2_tiny, solo_engine, solo_cache):
    with ember.load(gpt2_tiny, max_batch=4, verify="size") as eng:
        other_prompt = [5, 6, 7, 8]
        other = eng.submit(other_prompt, max_new_tokens=40, ignore_eos=True)
        victim = eng.submit([1, 2, 3], max_new_tokens=400, ignore_eos=True)
        seen = []
        for ev in victim:
            seen.append(ev.token_id)
            if len(seen) == 5:
                victim.cancel()
        c = victim.result(timeout=30)
        assert c.finish_reason is FinishReason.CANCELLED
        assert 5 <= len(c.token_ids) < 400 and c.token_ids[:5] == seen[:5]
        assert other.result(timeout=60).token_ids == alone(solo_engine, solo_cache, other_prompt, 40)
        deadline = time.time() + 10
        while eng.stats()["kv_used_tokens"] and time.time() < deadline:
            time.sleep(0.01)
        st = eng.stats()
        assert st["kv_used_tokens"] == 0 and st["running"] == 0


def test_cancel_while_waiting(gpt2_tiny):
    with ember.load(gpt2_tiny, max_batch=1, verify="size") as eng:
        first = eng.submit([1, 2], max_new_tokens=60, ignore_eos=True)
        queued = eng.submit([3, 4], max_new_tokens=60, ignore_eos=True)
        queued.cancel()
        assert queued.result(timeout=30).finish_reason is FinishReason.CANCELLED
        assert queued.result().token_ids == []
        assert first.result(timeout=30).finish_reason is FinishReason.LENGTH
        assert eng.stats()["kv_used_tokens"] == 0


def test_overload_raises_and_keeps_admitted_requests(gpt2_tiny, solo_engine, solo_cache):
    with ember.load(gpt2_tiny, max_batch=1, max_queue=2, verify="size") as eng:
        accepted = []
        with pytest.raises(OverloadedError, match="queue is full"):
            for i in range(10):
                p = [10 + i, 11 + i, 12 + i]
                accepted.append((p, eng.submit(p, max_new_tokens=30, ignore_eos=True)))
        assert 2 <= len(accepted) <= 3
        for p, h in accepted:
            c = h.result(timeout=60)
            assert c.finish_reason is FinishReason.LENGTH
            assert c.token_ids == alone(solo_engine, solo_cache, p, 30)
        # the queue drained: the engine takes requests again
        assert eng.submit([1], max_new_tokens=2).result(timeout=30).finish_reason in (FinishReason.LENGTH, FinishReason.EOS)


def test_async_iteration_streams_every_token(gpt2_tiny, solo_engine, solo_cache):
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5, 3]]

    async def collect(eng):
        async def one(p):
            h = eng.submit(p, max_new_tokens=12, ignore_eos=True)
            toks = [ev.token_id async for ev in h if ev.token_id >= 0]
            return toks, h.result()

        return await asyncio.gather(*(one(p) for p in prompts))

    with ember.load(gpt2_tiny, max_batch=4, verify="size") as eng:
        out = asyncio.run(collect(eng))
    for p, (toks, c) in zip(prompts, out):
        assert toks == c.token_ids == alone(solo_engine, solo_cache, p, 12)
        assert len(toks) == 12


def test_submission_from_many_threads(gpt2_tiny, solo_engine, solo_cache):
    reqs = make_requests(32, seed=9)
    results: dict[int, object] = {}
    errors = []
    with ember.load(gpt2_tiny, max_batch=8, verify="size") as eng:
        def worker(k: int) -> None:
            try:
                hs = [(i, eng.submit(reqs[i][0], SamplingParams(max_new_tokens=reqs[i][1], ignore_eos=True)))
                      for i in range(k, len(reqs), 8)]
                for i, h in hs:
                    results[i] = h.result(timeout=120)
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert eng.stats()["requests_finished_total"] == len(reqs)
    assert not errors
    assert len({c.request_id for c in results.values()}) == len(reqs)
    for i, (p, n, _) in enumerate(reqs):
        assert results[i].token_ids == alone(solo_engine, solo_cache, p, n)
