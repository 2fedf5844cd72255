"""Paged KV end to end on the CPU (kv_layout="paged": HostPagedExecutor + PagedScheduler) on the
tiny engines: fused paged requests give their solo slot-layout tokens, with shared prefixes and
with preemption; a shared system prompt is prefilled once; cancellation frees the blocks."""
from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest

import ember
from ember.engine_format.decoder_spec import kv_geometry
from ember.engine_format.manifest import read_manifest
from ember.errors import InputError
from ember.runtime.paged_executor import HostPagedExecutor
from ember.runtime.requests import FinishReason, SamplingParams

SYSTEM = [random.Random(1).randrange(1, 200) for _ in range(37)]  # a shared prefix, not block-aligned


def make_requests(n: int, seed: int) -> list[tuple[list[int], SamplingParams, float]]:
    """(prompt, params, arrival delay s): random lengths, half behind the shared SYSTEM prefix,
    a quarter sampled (seeded), the rest greedy."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        own = [rng.randrange(1, 200) for _ in range(rng.randint(1, 30))]
        prompt = SYSTEM + own if i % 2 else own
        temp = 0.8 if i % 4 == 3 else 0.0
        out.append((prompt, SamplingParams(max_new_tokens=rng.randint(1, 20), temperature=temp, seed=i,
                                           ignore_eos=True), rng.expovariate(400)))
    return out


def block_bytes(folder, block_size: int) -> int:
    geo = kv_geometry(read_manifest(folder).model["config"])
    return 2 * geo.num_layers * geo.num_kv_heads * geo.head_dim * 4 * block_size


@pytest.mark.parametrize("model,blocks,mixed", [("gpt2_tiny", None, False), ("gpt2_tiny", 24, False),
                                                ("llama_tiny", None, False), ("gpt2_tiny", 24, True)])
def test_fused_paged_tokens_equal_solo_slot_tokens(request, model, blocks, mixed):
    """Every request of a fused paged run (shared prefixes; with ``blocks`` a pool so small that
    decodes preempt; ``mixed``: an executor that takes prefill and decode rows in one call) gets
    exactly the tokens it gets alone with the slot layout."""
    folder = request.getfixturevalue(model)
    reqs = make_requests(48, seed=5)
    with ember.load(folder, max_batch=1, verify="size") as solo:
        expected = [solo.submit(p, params).result(timeout=60).token_ids for p, params, _ in reqs]
    kv_memory = None if blocks is None else blocks * block_bytes(folder, 4)
    with ember.load(folder, max_batch=6, prefill_chunk=24, kv_layout="paged", kv_block_size=4, kv_memory=kv_memory,
                    verify="size") as eng:
        eng.executor.mixed_steps = mixed  # the runner reads the executor's declaration at every launch
        calls, launch = [], eng.executor.launch_paged
        eng.executor.launch_paged = lambda *a, **k: calls.append(1) or launch(*a, **k)
        handles = []
        for prompt, params, delay in reqs:
            time.sleep(delay)
            handles.append(eng.submit(prompt, params))
        results = [h.result(timeout=120) for h in handles]
        st = eng.stats()
    mismatched = [i for i, (c, e) in enumerate(zip(results, expected)) if c.token_ids != e]
    assert not mismatched, f"{len(mismatched)} of {len(reqs)} requests differ from their solo run: {mismatched[:5]}"
    assert all(c.finish_reason is FinishReason.LENGTH for c in results)
    assert st["kv_used_tokens"] == 0 and st["running"] == 0 and st["kv_blocks_used"] == 0
    assert st["iterations_total"] < sum(p.max_new_tokens for _, p, _ in reqs)  # really fused
    assert st["prefill_tokens_total"] < sum(len(p) for p, _, _ in reqs)  # cached prefixes were not computed
    assert (len(calls) == st["iterations_total"]) if mixed else (len(calls) > st["iterations_total"])
    assert st["prefix_cache_hits_total"] > 0
    if blocks is not None:
        assert st["kv_blocks_total"] == blocks and st["preemptions_total"] > 0
    else:
        assert st["preemptions_total"] == 0


def test_shared_system_prompt_is_prefilled_once(gpt2_tiny):
    with ember.load(gpt2_tiny, kv_layout="paged", kv_block_size=8, verify="size") as eng:
        first = eng.submit(SYSTEM + [5, 6], max_new_tokens=3, ignore_eos=True).result(timeout=30)
        after_first = eng.stats()["prefill_tokens_total"]
        others = [eng.submit(SYSTEM + [7 + i] * (i + 1), max_new_tokens=3, ignore_eos=True) for i in range(4)]
        outs = [h.result(timeout=30) for h in others]
        st = eng.stats()
    with ember.load(gpt2_tiny, max_batch=1, verify="size") as solo:
        assert first.token_ids == solo.submit(SYSTEM + [5, 6], max_new_tokens=3, ignore_eos=True).result().token_ids
        for i, c in enumerate(outs):
            assert c.token_ids == solo.submit(SYSTEM + [7 + i] * (i + 1), max_new_tokens=3,
                                              ignore_eos=True).result().token_ids
    pytest.importorskip("fastapi")
    from ember.server.metrics import ServerMetrics

    exposition = ServerMetrics().render(st, "ready")
    assert f"ember_engine_prefix_cache_hits_total {st['prefix_cache_hits_total']}" in exposition
    assert "# TYPE ember_engine_prefix_cache_hits_total counter" in exposition
    cached = len(SYSTEM) // 8 * 8  # the system prompt's full blocks
    assert after_first == len(SYSTEM) + 2
    assert st["prefix_cache_hits_total"] == 4 * cached
    # only the suffixes were computed: the 4 prompts' tokens less the cached system blocks
    assert st["prefill_tokens_total"] - after_first == sum(len(SYSTEM) + i + 1 for i in range(4)) - 4 * cached
    assert 0 < st["prefix_cache_hit_rate"] < 1


def test_prefix_caching_off_computes_every_prompt_and_gives_the_same_tokens(gpt2_tiny):
    prompts = [SYSTEM + [7 + i] * (i + 1) for i in range(4)]

    def serve(**opts) -> tuple[list[list[int]], dict]:
        with ember.load(gpt2_tiny, kv_layout="paged", kv_block_size=8, verify="size", **opts) as eng:
            first = eng.submit(prompts[0], max_new_tokens=4, ignore_eos=True).result(timeout=30).token_ids
            rest = [eng.submit(p, max_new_tokens=4, ignore_eos=True) for p in prompts[1:]]
            return [first] + [h.result(timeout=30).token_ids for h in rest], eng.stats()

    cached_tokens, cached = serve()
    tokens, st = serve(prefix_caching=False)
    assert tokens == cached_tokens
    assert cached["prefix_cache_hits_total"] > 0
    assert st["prefix_cache_hits_total"] == 0 and st["kv_blocks_cached"] == 0 and st["prefix_waits_total"] == 0
    assert st["prefill_tokens_total"] == sum(len(p) for p in prompts)  # every prompt computed whole


def test_running_peak_counts_the_most_sequences_at_once(gpt2_tiny):
    for layout in ("slots", "paged"):
        with ember.load(gpt2_tiny, max_batch=3, kv_layout=layout, verify="size") as eng:
            eng.submit([5, 6], max_new_tokens=2, ignore_eos=True).result(timeout=30)
            assert eng.stats()["running_peak"] == 1
            handles = [eng.submit([5 + i, 6], max_new_tokens=8, ignore_eos=True) for i in range(5)]
            [h.result(timeout=30) for h in handles]
            st = eng.stats()
        assert st["running_peak"] == 3 and st["running"] == 0, layout  # max_batch caps it; it is a high-water mark


def test_a_block_aligned_prompt_seen_before_computes_its_last_block(gpt2_tiny):
    aligned = SYSTEM[:32]  # 4 full blocks of 8
    with ember.load(gpt2_tiny, max_batch=1, verify="size") as solo:
        expected = solo.submit(aligned, max_new_tokens=4, ignore_eos=True).result(timeout=30).token_ids
    with ember.load(gpt2_tiny, kv_layout="paged", kv_block_size=8, verify="size") as eng:
        for _ in range(2):
            assert eng.submit(aligned, max_new_tokens=4, ignore_eos=True).result(timeout=30).token_ids == expected
        st = eng.stats()
    assert st["prefix_cache_hits_total"] == 24 and st["prefill_tokens_total"] == 32 + 8


def test_cancel_frees_blocks(gpt2_tiny):
    with ember.load(gpt2_tiny, max_batch=4, kv_layout="paged", kv_block_size=4, verify="size") as eng:
        other = eng.submit([5, 6, 7, 8], max_new_tokens=20, ignore_eos=True)
        victim = eng.submit([1, 2, 3], max_new_tokens=200, ignore_eos=True)
        for i, _ in enumerate(victim):
            if i == 4:
                victim.cancel()
        assert victim.result(timeout=30).finish_reason is FinishReason.CANCELLED
        assert other.result(timeout=30).finish_reason is FinishReason.LENGTH
        deadline = time.time() + 10
        while eng.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        st = eng.stats()
    assert st["running"] == 0 and st["kv_blocks_used"] == 0 and st["kv_used_tokens"] == 0
    assert st["kv_blocks_free"] == st["kv_blocks_total"]


def test_stop_strings_work_paged(gpt2_tiny):
    with ember.load(gpt2_tiny, verify="size") as eng:
        full = eng.generate(["Hello world"], max_new_tokens=12, ignore_eos=True)[0]
    stop = full.text[2:4]
    with ember.load(gpt2_tiny, kv_layout="paged", verify="size") as eng:
        assert eng.generate(["Hello world"], max_new_tokens=12, ignore_eos=True)[0].text == full.text
        cut = eng.generate(["Hello world"], max_new_tokens=12, stop=[stop])[0]
    assert cut.finish_reason is FinishReason.STOP and cut.text == full.text[: full.text.index(stop)]


def test_paged_layout_refusals(gpt2_tiny):
    with pytest.raises(InputError, match="--paged on"):
        ember.load(gpt2_tiny, kv_layout="paged", device="cuda:0", verify="size")
    with pytest.raises(InputError, match="kv_block_size"):
        ember.load(gpt2_tiny, kv_layout="paged", kv_block_size=0, verify="size")


def test_host_paged_executor_scatters_into_the_tables_blocks():
    """The new tokens' K/V land in the row's blocks at position % block_size; the gather reads them back."""
    from ember.engine_format.decoder_spec import KVGeometry

    class Echo:  # the step graph's contract: new K/V [B, Hkv, T, D] per layer; here K = the token id
        def run(self, input_ids, positions, past_lengths, new_lengths, kv):
            self.past = kv
            new = np.broadcast_to(input_ids[:, None, :, None], (len(input_ids), 1, input_ids.shape[1], 2))
            return np.zeros((len(input_ids), 3), np.float32), [new.astype(np.float32)] * 2

    ex = HostPagedExecutor(Echo(), KVGeometry(1, 1, 2), num_blocks=6, block_size=2, dtype="float32")
    tables = np.asarray([[4, 1, 0], [2, 5, 3]], dtype=np.int32)
    ex.run_paged(np.asarray([[10, 11, 12], [20, 21, 0]]), np.asarray([[0, 1, 2], [0, 1, 0]]), np.asarray([0, 0]),
                 np.asarray([3, 2]), tables)
    assert ex.k[0][4, 0, :, 0].tolist() == [10, 11] and ex.k[0][1, 0, 0, 0] == 12  # [block, head, offset, d]
    assert ex.k[0][2, 0, :, 0].tolist() == [20, 21]
    assert not ex.k[0][5].any()  # row 1 wrote only 2 tokens
    ex.run_paged(np.asarray([[13], [22]]), np.asarray([[3], [2]]), np.asarray([3, 2]), np.asarray([1, 1]), tables)
    assert ex.k[0][1, 0, 1, 0] == 13 and ex.k[0][5, 0, 0, 0] == 22
    past = ex.session.past[0]  # [B, Hkv, P, D], P = 2 blocks
    assert past[0, 0, :3, 0].tolist() == [10, 11, 12] and past[1, 0, :2, 0].tolist() == [20, 21]


def test_cli_generate_takes_the_paged_layout(gpt2_tiny, capsys):
    from ember.cli import main

    def tokens(*extra: str) -> list[list[int]]:
        assert main(["generate", str(gpt2_tiny), "Hello world", "the quick brown fox", "--max-new-tokens", "6",
                     "--ignore-eos", "--json", *extra]) == 0
        return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.strip().splitlines()]

    assert tokens("--kv-layout", "paged", "--kv-block-size", "4") == tokens()
    assert tokens("--kv-layout", "paged", "--prefix-cache", "off") == tokens()
    with pytest.raises(SystemExit):
        main(["generate", str(gpt2_tiny), "hi", "--kv-layout", "pages"])
    with pytest.raises(SystemExit):
        main(["generate", str(gpt2_tiny), "hi", "--kv-layout", "paged", "--prefix-cache", "no"])
