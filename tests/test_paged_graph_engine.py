"""The paged step graph as an engine (``runtime/cuda_paged.PagedGraphExecutor`` under the
``PagedScheduler``), on the CPU through the numpy reference of PagedAttention: the same
executor code the GPU runs, with only the session swapped. Every request of a fused paged
batch -- shared prefixes served from the prefix cache, a pool small enough to preempt -- gets
the tokens the FP16 slot engine of the same folder gives it alone; so do the decode-only calls
replayed as CUDA graphs (``runtime/paged_graphs.PagedSession``: rows padded to buckets, inputs
copied into static buffers) over a runner that replays what it captured, as ONNX Runtime does."""
from __future__ import annotations

import time

import numpy as np
import onnx
import pytest

import ember
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.engine_format.decoder_spec import kv_geometry
from ember.engine_format.manifest import read_manifest
from ember.engine_format.paged_feeds import HOST_BOUNDS, cache_bindings, pack_rows
from ember.engine_format.roles import KEY_CACHE
from ember.errors import InputError
from ember.export.paged_reference import ReplayingReferenceRunner, reference_session
from ember.runtime.cuda_paged import PagedGraphExecutor
from ember.runtime.engine_builder import SchedulerOptions, make_engine, make_scheduler
from ember.runtime.paged_graphs import PagedSession, decode_bucket, pad_feeds, prefill_bucket

torch = pytest.importorskip("torch")


class ReferencePagedSession:
    """``PagedGraphSession`` over ``onnx.reference`` (CPU): pools are torch CPU tensors, updated in place."""

    host_bounds = True
    scratch_blocks = 0

    def __init__(self, path, num_layers: int):
        self.sess = reference_session(onnx.load(str(path)))
        self.bindings = cache_bindings(num_layers)
        self.calls = []
        self.chained = 0

    def run(self, feeds, pools, device_ids=None):
        self.calls.append(len(feeds["input_ids"]))
        if device_ids is not None:
            feeds = {**feeds, "input_ids": device_ids.numpy().astype(np.int64)}
            self.chained += 1
        outs = dict(zip(self.sess.output_names,
                        self.sess.run(None, {**feeds, **{k: v.numpy() for k, v in pools.items()}})))
        for cache_in, cache_out in self.bindings:
            pools[cache_in].copy_(torch.from_numpy(outs[cache_out]))
        return torch.from_numpy(outs["logits"])

    def stats(self):
        return {}

    def forget_graphs(self):
        pass


@pytest.fixture(scope="module")
def paged_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("paged") / "llama"
    compile_decoder("llama-tiny", out, CompileOptions(dtype="fp16", paged="on", quiet=True))
    return out


def paged_engine(folder, num_blocks_memory: int | None, max_batch: int = 4, session_of=None):
    """A paged engine over the reference session (``session_of(path, num_layers, scheduler)``: another)."""
    m = read_manifest(folder)
    cfg = m.model["config"]
    geometry = kv_geometry(cfg)
    options = SchedulerOptions(max_batch=max_batch, kv_memory=num_blocks_memory, prefill_chunk=16, kv_layout="paged",
                               kv_block_size=4)
    kv_dtype = m.part("paged").tensor(KEY_CACHE, layer=0).dtype  # as the loader reads it
    sched = make_scheduler(options, max_positions=int(cfg["max_positions"]), geometry=geometry, kv_dtype=kv_dtype,
                           device="cpu")
    path = folder / m.part("paged").file
    session = (session_of or (lambda p, n, _: ReferencePagedSession(p, n)))(path, geometry.num_layers, sched)
    ex = PagedGraphExecutor(session, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim,
                            sched.blocks.num_blocks, 4, device="cpu", kv_dtype=kv_dtype)
    return make_engine(m, sched, ex), session


def test_fused_paged_graph_requests_get_their_solo_tokens(paged_folder):
    rng = np.random.default_rng(0)
    system = rng.integers(3, 200, 9).tolist()
    prompts = [system + rng.integers(3, 200, n).tolist() for n in (2, 5, 1)] + [rng.integers(3, 200, 6).tolist()]
    with ember.load(paged_folder, device="cpu", max_batch=1, fused_decode=False) as solo:
        want = [solo.generate([p], max_new_tokens=10, ignore_eos=True)[0].token_ids for p in prompts]
    block_bytes = 2 * 2 * 2 * 16 * 2 * 4  # K+V x layers x kv heads x head_dim x fp16 x block of 4
    eng, session = paged_engine(paged_folder, num_blocks_memory=None)
    with eng:
        first = eng.generate(prompts[:1], max_new_tokens=10, ignore_eos=True)[0].token_ids
        rest = [h.result(timeout=120).token_ids for h in [eng.submit(p, max_new_tokens=10, ignore_eos=True)
                                                          for p in prompts[1:]]]
        stats = eng.stats()
    assert [first] + rest == want
    assert session.chained > 0  # greedy decodes with nobody waiting ran behind the last step, ids on the device
    assert stats["prefix_cache_hits_total"] >= 2 * 8  # two requests found the system prompt's two full blocks
    assert max(session.calls) < sum(map(len, prompts))  # packed: no call computes padding
    small, _ = paged_engine(paged_folder, num_blocks_memory=7 * block_bytes)  # 28 positions: forces preemption
    with small:
        handles = [small.submit(p, max_new_tokens=10, ignore_eos=True) for p in prompts]
        assert [h.result(timeout=120).token_ids for h in handles] == want
        assert small.stats()["preemptions_total"] > 0


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("paged_int8") / "llama"
    compile_decoder("llama-tiny", out, CompileOptions(dtype="fp16", paged="on", kv_dtype="int8", quiet=True))
    return out


def test_int8_pools_hold_twice_the_blocks_and_serve_a_fused_batch(paged_folder, int8_folder):
    """``--kv-dtype int8``: one-byte pools, so a KV budget holds twice the FP16 blocks; requests of
    a fused batch (shared prefix, prefix cache) get the tokens the same folder gives each alone."""
    rng = np.random.default_rng(4)
    system = rng.integers(3, 200, 9).tolist()
    prompts = [system + rng.integers(3, 200, n).tolist() for n in (2, 5)] + [rng.integers(3, 200, 6).tolist()]
    budget = 40 * 2 * 2 * 2 * 16 * 2 * 4  # 40 FP16 blocks of 4 tokens
    fp16, _ = paged_engine(paged_folder, num_blocks_memory=budget)
    solo, _ = paged_engine(int8_folder, num_blocks_memory=budget, max_batch=1)
    assert solo.executor.pools["key_cache.0"].dtype == torch.int8
    assert solo.executor.num_blocks == 2 * fp16.executor.num_blocks == 80
    assert solo.executor.pool_bytes == fp16.executor.pool_bytes
    with fp16, solo:
        want16 = [fp16.generate([p], max_new_tokens=8, ignore_eos=True)[0].token_ids for p in prompts]
        want = [solo.generate([p], max_new_tokens=8, ignore_eos=True)[0].token_ids for p in prompts]
    eng, session = paged_engine(int8_folder, num_blocks_memory=budget)
    with eng:
        handles = [eng.submit(p, max_new_tokens=8, ignore_eos=True) for p in prompts]
        got = [h.result(timeout=120).token_ids for h in handles]
        hits = eng.stats()["prefix_cache_hits_total"]
    assert got == want
    assert hits >= 8  # the second request found the system prompt's two full blocks
    agree = np.mean([a == b for g, w in zip(got, want16) for a, b in zip(g, w)])
    print(f"int8 KV vs FP16 KV greedy tokens (llama-tiny, not teacher-forced): {agree:.1%} equal")


def test_paged_graph_executor_refuses_positions_it_would_not_use(paged_folder):
    eng, _ = paged_engine(paged_folder, num_blocks_memory=None)
    ex = eng.executor
    with pytest.raises(InputError, match="positions"):
        ex.launch_paged(np.array([[5, 6]]), np.array([[3, 4]]), np.array([0]), np.array([2]), np.array([[0]], np.int32))
    eng.close()


def test_paged_layout_on_a_gpu_needs_the_paged_part(tmp_path):
    out = tmp_path / "e"
    compile_decoder("llama-tiny", out, CompileOptions(dtype="fp16", quiet=True))
    with pytest.raises(InputError, match="--paged on"):
        ember.load(out, device="cuda:0", kv_layout="paged")


def graphed_session(refuse: bool = False):
    def make(path, num_layers, sched):
        runner = ReplayingReferenceRunner(onnx.load(str(path)), num_layers, refuse=refuse)
        vocab = int(read_manifest(path.parent).model["config"]["vocab_size"])
        return PagedSession(runner, vocab=vocab, device="cpu",
                            max_rows=sched.max_batch, max_blocks=-(-sched.max_seq_len // 4), host_bounds=True,
                            cuda_graph_status="on", min_kv_bound=8)
    return make


def test_decode_buckets_pad_rows_to_a_scratch_block_under_replay_wide_bounds():
    b = decode_bucket(3, 300, 16, max_blocks=128)
    assert (b.rows, b.kv_bound, b.table_width) == (4, 512, 32)
    assert decode_bucket(1, 5, 16, max_blocks=128).kv_bound == 256  # short contexts share the smallest bucket
    assert decode_bucket(5, 100, 16, max_blocks=8).kv_bound == 128  # capped at the block tables' width
    assert decode_bucket(1, 129, 16, max_blocks=8) is None  # longer than a table: a plain launch
    feeds = pack_rows([np.array([7]), np.array([9]), np.array([4])], np.array([20, 3, 40]),
                      np.array([[5, 6, -1], [2, -1, -1], [1, 3, 8]], np.int32), 16, host_bounds=True)
    padded = pad_feeds(feeds, b, scratch_block=99)
    assert padded["input_ids"].tolist() == [7, 9, 4, 0]
    assert padded["cumulative_sequence_length"].tolist() == [0, 1, 2, 3, 4]
    assert padded["past_seqlens"].tolist() == [20, 3, 40, 0]
    assert padded["block_table"].shape == (4, 32)
    assert padded["block_table"][:3, :3].tolist() == [[5, 6, -1], [2, -1, -1], [1, 3, 8]]
    assert padded["block_table"][3, 0] == 99 and (padded["block_table"][:, 3:] == -1).all()
    assert padded[HOST_BOUNDS].tolist() == [1, 512]
    with pytest.raises(ValueError, match="does not fit"):
        pad_feeds(feeds, decode_bucket(2, 41, 16, max_blocks=128), scratch_block=99)


def test_prefill_buckets_add_a_padding_row_that_takes_the_spare_tokens():
    b = prefill_bucket(1, 100, 100, 16, max_blocks=128)
    assert (b.rows, b.tokens, b.kv_bound) == (2, 128, 256)  # one padding row; 101 tokens -> the 128 bucket
    assert prefill_bucket(1, 127, 127, 16, max_blocks=128).tokens == 128
    assert prefill_bucket(1, 128, 128, 16, max_blocks=128).tokens == 192  # the padding row needs a token
    assert prefill_bucket(3, 40, 900, 16, max_blocks=128).kv_bound == 1024  # a suffix behind a cached prefix
    assert prefill_bucket(4, 40, 40, 16, max_blocks=128) is None  # past PREFILL_GRAPH_MAX_ROWS: a plain launch
    assert prefill_bucket(1, 300, 300, 16, max_blocks=128) is None  # past PREFILL_GRAPH_MAX_TOKENS
    feeds = pack_rows([np.arange(1, 11), np.array([42])], np.array([0, 20]),
                      np.array([[5, -1, -1], [2, 3, -1]], np.int32), 16, host_bounds=True)
    b = prefill_bucket(2, 11, 21, 16, max_blocks=128)
    assert (b.rows, b.tokens) == (4, 16)
    padded = pad_feeds(feeds, b, scratch_block=99)
    assert padded["input_ids"].tolist() == list(range(1, 11)) + [42] + [0] * 5
    assert padded["cumulative_sequence_length"].tolist() == [0, 10, 11, 15, 16]  # padding rows: 4 tokens, then 1
    assert padded["past_seqlens"].tolist() == [0, 20, 0, 0]
    assert padded["block_table"][:2, :3].tolist() == [[5, -1, -1], [2, 3, -1]]
    assert (padded["block_table"][2:, 0] == 99).all() and (padded["block_table"][2:, 1:] == -1).all()
    assert padded[HOST_BOUNDS].tolist() == [16, 256]
    with pytest.raises(ValueError, match="does not fit"):
        pad_feeds(feeds, decode_bucket(2, 21, 16, max_blocks=128), scratch_block=99)


def test_decode_graphs_replay_padded_buckets_with_the_solo_tokens(paged_folder):
    """Decode-only calls of 3 rows run as 4-row graphs (a padding row on the scratch block),
    captured once per (rows, KV bound) and replayed from static buffers as the sequences grow
    through several KV buckets; every request still gets its solo tokens."""
    rng = np.random.default_rng(2)
    system = rng.integers(3, 200, 9).tolist()
    prompts = [system + rng.integers(3, 200, n).tolist() for n in (2, 5)] + [rng.integers(3, 200, 6).tolist()]
    with ember.load(paged_folder, device="cpu", max_batch=1, fused_decode=False) as solo:
        want = [solo.generate([p], max_new_tokens=12, ignore_eos=True)[0].token_ids for p in prompts]
    eng, session = paged_engine(paged_folder, num_blocks_memory=None, session_of=graphed_session())
    assert eng.executor.pools["key_cache.0"].shape[0] == eng.executor.num_blocks + 1  # the scratch block
    with eng:
        got = [h.result(timeout=120).token_ids for h in [eng.submit(p, max_new_tokens=12, ignore_eos=True)
                                                         for p in prompts]]
        st = eng.stats()
    assert got == want
    assert st["cuda_graph_status"] == "on"
    assert st["cuda_graph_captures_total"] >= 3, st  # the load-time probe, then 8- and 16-token KV buckets at least
    assert st["cuda_graph_replays_total"] > st["cuda_graph_captures_total"], st
    assert st["cuda_graph_padding_rows_total"] > 0, st
    assert session.runner.replays == st["cuda_graph_replays_total"]
    # the prefills are small: captured too (a padding row each), no plain launch
    assert st["cuda_graph_prefill_calls_total"] >= 2 and st["paged_plain_calls_total"] == 0, st
    assert st["paged_chained_calls_total"] > 0, st  # decodes chained behind the last, ids copied in on the device


def test_decode_graphs_fall_back_to_plain_launches_when_capture_is_refused(paged_folder):
    prompts = [[5, 6, 7, 8], [9, 10]]
    with ember.load(paged_folder, device="cpu", max_batch=1, fused_decode=False) as solo:
        want = [solo.generate([p], max_new_tokens=6, ignore_eos=True)[0].token_ids for p in prompts]
    eng, session = paged_engine(paged_folder, num_blocks_memory=None, session_of=graphed_session(refuse=True))
    with eng:
        got = [h.result(timeout=120).token_ids for h in [eng.submit(p, max_new_tokens=6, ignore_eos=True)
                                                         for p in prompts]]
        st = eng.stats()
    assert got == want
    assert st["cuda_graph_status"].startswith("unavailable: capturing decode bucket 1 x 8 failed"), st
    assert st["cuda_graph_captures_total"] == 0 and st["paged_plain_calls_total"] > 0, st
    assert not session.runner.graphs
    # plain launches bind the pools once, then rebind only the feeds and logits
    assert st["paged_plain_calls_total"] >= 2 and session.runner.rebinds == st["paged_plain_calls_total"] - 1, st


def test_graphs_of_closed_pools_are_never_replayed(paged_folder):
    """A session outlives an executor's pools: after ``close`` the next executor's first decode
    call captures a new graph under a new id (ONNX Runtime would replay an id it captured before,
    over the old pools' addresses)."""
    eng, session = paged_engine(paged_folder, num_blocks_memory=None, session_of=graphed_session())
    eng.close()
    m = read_manifest(paged_folder)
    geometry = kv_geometry(m.model["config"])
    again = PagedGraphExecutor(session, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim,
                               eng.executor.num_blocks, 4, device="cpu")
    assert session.runner.replays == 0 and len(session.runner.captured) == 2
    assert again.stats()["cuda_graph_captures_total"] == 2


def test_memory_plan_counts_one_copy_of_the_weights_and_the_largest_calls_workspace(paged_folder):
    from ember.runtime.paged_memory import activation_bytes, memory_plan, weight_bytes

    path = paged_folder / read_manifest(paged_folder).part("paged").file
    full = onnx.load(str(path))
    want = sum(onnx.numpy_helper.to_array(t).nbytes for t in full.graph.initializer)
    assert weight_bytes(path) == want
    llama_1b = {"hidden_size": 2048, "intermediate_size": 5632, "vocab_size": 32000, "num_heads": 32,
                "num_kv_heads": 4, "head_dim": 64}
    act = activation_bytes(llama_1b, max_tokens=1024 + 64, max_rows=64, max_seq_len=2048)
    assert act["attention_gather"] == 2**30 + 1088 * 32 * 64 * 4  # 64 rows x 2048 tokens of dense FP16 K and V
    assert act["total"] == act["dense"] + act["attention_gather"] + act["lm_head"]  # attention outweighs the MLP
    plan = memory_plan(llama_1b, want, 10, 20, 1088, 64, 2048)
    assert plan["planned"] == want + 10 + 20 + act["total"]


def test_chained_paged_decodes_cancel_and_sample_without_leaking_blocks(paged_folder):
    """Chained greedy decodes next to a cancelled request, a short one and a sampled one (which
    never chains): the greedy requests keep their solo tokens and every block is free at the end
    (the chained token's block included)."""
    from ember.runtime.requests import FinishReason

    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24]]
    with ember.load(paged_folder, device="cpu", max_batch=1, fused_decode=False) as solo:
        want = [solo.generate([p], max_new_tokens=n, ignore_eos=True)[0].token_ids for p, n in zip(prompts, (14, 1, 5))]
    eng, session = paged_engine(paged_folder, num_blocks_memory=None, session_of=graphed_session())
    with eng:
        greedy = eng.submit(prompts[0], max_new_tokens=14, ignore_eos=True)
        victim = eng.submit(prompts[1], max_new_tokens=200, ignore_eos=True)
        short = eng.submit(prompts[2], max_new_tokens=5, ignore_eos=True)
        sampled = eng.submit(prompts[0], max_new_tokens=6, ignore_eos=True, temperature=0.8, seed=3)
        for i, _ in enumerate(victim):
            if i == 3:
                victim.cancel()
        done = victim.result(timeout=60)
        assert done.finish_reason is FinishReason.CANCELLED and done.token_ids[:1] == want[1]
        assert greedy.result(timeout=60).token_ids == want[0]
        assert short.result(timeout=60).token_ids == want[2]
        assert len(sampled.result(timeout=60).token_ids) == 6
        deadline = time.time() + 10
        while eng.stats()["running"] and time.time() < deadline:
            time.sleep(0.01)
        st = eng.stats()
    assert st["paged_chained_calls_total"] > 0, st
    assert st["running"] == 0 and st["kv_blocks_used"] == 0 and st["kv_blocks_free"] == st["kv_blocks_total"], st
