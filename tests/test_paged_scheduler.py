"""The paged scheduler's policy (ember/runtime/paged_scheduler.py) on a fake block budget, no model:
admission by free blocks, cached prefixes skip their prefill, recompute preemption of the youngest."""
from __future__ import annotations

import numpy as np
import pytest

from ember.engine_format.decoder_spec import KVGeometry
from ember.errors import InputError
from ember.runtime.engine_builder import SchedulerOptions, make_scheduler
from ember.runtime.kv_blocks import BlockManager
from ember.runtime.paged_scheduler import PagedScheduler
from ember.runtime.requests import SamplingParams
from ember.runtime.scheduler import Phase, Sequence


def seq(rid: str, prompt, max_new: int = 8) -> Sequence:
    ids = np.asarray(prompt, dtype=np.int64)
    return Sequence(rid, ids, SamplingParams(max_new_tokens=max_new), reserved=len(ids) + max_new)


def run_step(sch: PagedScheduler, token: int = 7):
    """Plan, 'launch' and record a token for every row that gets one (a prompt's last chunk, a decode)."""
    plan = sch.schedule()
    ending = [s for g in plan.prefill for s, n in zip(g.seqs, g.lengths) if s.num_cached + n == s.total_tokens]
    sch.launched(plan)
    for s in ending + plan.decode_seqs:
        sch.record_token(s, token)
    return plan


def test_admission_waits_for_free_blocks_and_cached_prefix_skips_prefill():
    sch = PagedScheduler(BlockManager(num_blocks=6, block_size=4), max_batch=4, max_seq_len=64, prefill_chunk=64)
    a = seq("a", range(10))  # 3 blocks
    sch.add(a)
    run_step(sch)  # a prefilled: blocks [0..4) and [4..8) hashed
    assert a.phase is Phase.DECODE and sch.blocks.num_used == 3
    b = seq("b", list(range(8)) + [50, 51, 52, 53, 54])  # shares 2 blocks, needs 2 more
    c = seq("c", range(100, 113))  # 4 blocks: does not fit after b
    sch.add(b)
    sch.add(c)
    plan = sch.schedule()
    assert b.num_cached == 8 and [s.request_id for s in sch.running] == ["a", "b"] and list(sch.waiting) == [c]
    assert plan.prefill[0].seqs == [b] and plan.prefill[0].lengths == [5]  # only b's suffix is computed
    assert plan.decode_seqs == [a]
    st = sch.kv_stats()
    assert st["prefix_cache_hits_total"] == 8 and st["kv_blocks_used"] == 5


def test_decode_out_of_blocks_preempts_the_youngest_and_recomputes_it():
    sch = PagedScheduler(BlockManager(num_blocks=4, block_size=2), max_batch=4, max_seq_len=64, prefill_chunk=64)
    old, young = seq("old", [1, 2, 3], max_new=5), seq("young", [4, 5, 6], max_new=5)
    sch.add(old)
    sch.add(young)
    run_step(sch)  # both prefilled: 2 blocks each, pool full
    assert sch.blocks.num_free == 0 and old.phase is young.phase is Phase.DECODE
    plan = run_step(sch)  # positions 3 fit their second block
    assert plan.decode_seqs == [old, young]
    plan = sch.schedule()  # position 4 needs a third block each: young is preempted for old
    assert plan.decode_seqs == [old] and sch.kv_stats()["preemptions_total"] == 1
    assert young.phase is Phase.WAITING and young.num_cached == 0 and list(sch.waiting) == [young]
    assert young.generated == [7, 7] and young.token_ids().tolist() == [4, 5, 6, 7, 7]
    assert young not in sch.blocks.seqs
    sch.launched(plan)
    sch.record_token(old, 7)
    sch.retire(old)  # old ends: young comes back; of its blocks freed tail first, [6, 7] was evicted for old
    plan = sch.schedule()  # and [4, 5] is still cached
    assert young.num_cached == 2 and plan.prefill[0].seqs == [young] and plan.prefill[0].lengths == [3]
    assert young.phase is Phase.PREFILL and sch.kv_stats()["prefix_cache_hits_total"] == 2
    run_step(sch)
    assert young.phase is Phase.DECODE and young.generated == [7, 7, 7]  # the recompute's last chunk yields a token


def test_a_burst_behind_one_new_prefix_computes_it_once():
    sch = PagedScheduler(BlockManager(num_blocks=32, block_size=4), max_batch=8, max_seq_len=64, prefill_chunk=8)
    system = list(range(100, 112))  # 3 blocks
    burst = [seq(f"r{i}", system + [i, i]) for i in range(3)]
    for s in burst:
        sch.add(s)
    plan = sch.schedule()
    assert sch.running == [burst[0]] and plan.prefill[0].lengths == [8]  # the others wait for its blocks
    sch.launched(plan)
    run_step(sch)  # r0's last 6 tokens: every system block computed
    plan = sch.schedule()
    assert sch.running == burst and [s.num_cached for s in burst[1:]] == [12, 12]
    assert plan.prefill[0].seqs == burst[1:] and plan.prefill[0].lengths == [2, 2]
    st = sch.kv_stats()
    assert st["prefix_waits_total"] == 2 and st["prefix_cache_hits_total"] == 24


def test_a_request_larger_than_the_pool_is_refused_at_submission():
    sch = PagedScheduler(BlockManager(num_blocks=2, block_size=2), max_batch=2, max_seq_len=64)
    with pytest.raises(InputError, match="per-sequence limit of 4"):
        sch.add(seq("s", [1, 2, 3], max_new=2))


def test_retire_and_cancel_free_blocks():
    sch = PagedScheduler(BlockManager(num_blocks=8, block_size=2), max_batch=4, max_seq_len=64)
    a, b = seq("a", [1, 2, 3]), seq("b", [4, 5, 6])
    sch.add(a)
    sch.add(b)
    run_step(sch)
    sch.retire(a)
    sch.retire(b)
    assert sch.blocks.num_used == 0 and not sch.has_work() and sch.kv_stats()["kv_used_tokens"] == 0


def test_paged_layout_options_and_refusals():
    geo = KVGeometry(2, 2, 8)
    opts = SchedulerOptions(max_batch=4, kv_layout="paged", kv_block_size=16, kv_memory=2 * 2 * 2 * 8 * 4 * 16 * 10)
    sch = make_scheduler(opts, max_positions=512, geometry=geo, kv_dtype="float32", device="cpu")
    assert isinstance(sch, PagedScheduler) and sch.blocks.num_blocks == 10 and sch.max_seq_len == 160
    with pytest.raises(InputError, match="kv_layout='bogus'"):
        SchedulerOptions(kv_layout="bogus")
    with pytest.raises(InputError, match="kv_rings"):
        make_scheduler(SchedulerOptions(kv_layout="paged"), max_positions=512, geometry=KVGeometry(2, 2, 8, (32, 0)),
                       kv_dtype="float32", device="cpu")
    with pytest.raises(InputError, match="LongRoPE"):
        make_scheduler(SchedulerOptions(kv_layout="paged"), max_positions=512, geometry=geo, kv_dtype="float32",
                       device="cpu", rope_switch=64)
