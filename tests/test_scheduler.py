"""The fusion scheduler's policy, with no model: compaction plans, admission, prefill budget,
and the whole engine loop over a fake step function (a fake executor, no ONNX Runtime)."""
from __future__ import annotations

import itertools
import random
import threading
import time

import numpy as np
import pytest

from ember.errors import InputError, OverloadedError
from ember.runtime.decoder import DecoderEngine

from ember.runtime.executor import DoneStep, HostGreedy
from ember.runtime.requests import FinishReason, SamplingParams
from ember.runtime.scheduler import ADMIT_WAIT, FusionScheduler, Phase, Sequence, min_move_plan


def seq(n_prompt: int, max_new: int = 4, rid: str = "r") -> Sequence:
    return Sequence(rid, np.arange(1, n_prompt + 1, dtype=np.int64), SamplingParams(max_new_tokens=max_new),
                    reserved=n_prompt + max_new)


def brute_force_min_moves(live: list[bool]) -> int:
    """Fewest moves that make the live slots contiguous: try every target window."""
    n, k = len(live), sum(live)
    if k == 0:
        return 0
    return min(sum(1 for i in range(n) if live[i] and not (w <= i < w + k)) for w in range(n - k + 1))


# -- min-move compaction ------------------------------------------------------------------------
@pytest.mark.parametrize("n", range(1, 11))
def test_min_move_plan_is_optimal_and_compacts(n):
    for bits in itertools.product([False, True], repeat=n):
        live = list(bits)
        moves = min_move_plan(live)
        assert len(moves) == brute_force_min_moves(live), live
        after = list(live)
        for src, dst in moves:
            assert after[src] and not after[dst], (live, moves)  # live -> free only
            after[src], after[dst] = False, True
        idx = [i for i, x in enumerate(after) if x]
        assert sum(after) == sum(live)
        assert not idx or idx == list(range(idx[0], idx[0] + len(idx))), (live, moves)


def test_min_move_plan_leaves_contiguous_slots_alone():
    assert min_move_plan([False, True, True, True, False]) == []
    assert min_move_plan([True, False, False, True, True]) == [(0, 2)]


# -- admission --------------------------------------------------------------------------------
def test_admission_is_fifo_and_bounded_by_slots():
    s = FusionScheduler(max_batch=2, kv_capacity_tokens=2 * 64, max_seq_len=64)
    seqs = [seq(3, rid=f"r{i}") for i in range(4)]
    for q in seqs:
        s.add(q)
    plan = s.schedule()
    assert [q.slot for q in seqs] == [0, 1, None, None]
    assert [q.phase for q in seqs[:2]] == [Phase.PREFILL] * 2
    assert list(s.waiting) == seqs[2:]
    assert [x.seqs for x in plan.prefill] == [[seqs[0], seqs[1]]]
    s.retire(seqs[0])
    s.schedule()
    assert seqs[2].slot is not None and seqs[3].slot is None  # the oldest waiting one goes first


def _decoding(s: FusionScheduler) -> None:
    """Move every admitted sequence to the decode phase (what the engine does after prefill)."""
    for q in s.running:
        q.phase = Phase.DECODE


def test_admission_batching_holds_until_a_batch_or_the_wait_ends():
    s = FusionScheduler(max_batch=8, kv_capacity_tokens=8 * 64, max_seq_len=64, admit_batch=3, admit_wait=2)
    first = [seq(3, rid=f"a{i}") for i in range(8)]
    for q in first:
        s.add(q)
    s.schedule()  # nothing decoding yet: all 8 admitted at once
    assert all(q.slot is not None for q in first)
    _decoding(s)
    late = [seq(3, rid=f"b{i}") for i in range(4)]
    for q in late:
        s.add(q)
    s.retire(first[0])
    s.retire(first[1])  # 2 free slots < admit_batch, 6 of 8 decoding: held
    for _ in range(2):
        plan = s.schedule()
        assert not plan.prefill and all(q.slot is None for q in late)
    s.schedule()  # the hold has lasted admit_wait iterations: admit what fits
    assert [q.slot is not None for q in late] == [True, True, False, False]
    _decoding(s)
    late.append(seq(3, rid="b4"))
    s.add(late[-1])
    for q in first[2:5]:
        s.retire(q)  # 3 free slots, 3 waiting = admit_batch: admitted without waiting
    s.schedule()
    assert all(q.slot is not None for q in late)


def test_admission_batching_admits_at_once_below_half_load():
    s = FusionScheduler(max_batch=8, kv_capacity_tokens=8 * 64, max_seq_len=64, admit_batch=4, admit_wait=100)
    a = [seq(3, rid=f"a{i}") for i in range(3)]
    for q in a:
        s.add(q)
    s.schedule()
    _decoding(s)
    b = seq(3, rid="b")
    s.add(b)
    s.schedule()  # 3 of 8 decoding: a lightly loaded engine never holds a request back
    assert b.slot is not None


def test_bounded_queue_raises_overloaded_and_keeps_queued():
    s = FusionScheduler(max_batch=1, kv_capacity_tokens=64, max_seq_len=64, max_queue=2)
    a, b = seq(2, rid="a"), seq(2, rid="b")
    s.add(a)
    s.add(b)
    with pytest.raises(OverloadedError, match="queue is full"):
        s.add(seq(2, rid="c"))
    assert list(s.waiting) == [a, b]
    s.schedule()  # admitting one frees a queue place
    s.add(seq(2, rid="d"))
    assert [q.request_id for q in s.waiting] == ["b", "d"]


def test_request_longer_than_memory_budget_is_rejected_by_name():
    s = FusionScheduler(max_batch=4, kv_capacity_tokens=4 * 32, max_seq_len=1024)
    assert s.max_seq_len == 32
    with pytest.raises(InputError, match="kv-memory"):
        s.add(seq(30, max_new=8, rid="too-long"))


def test_bad_options_are_rejected():
    with pytest.raises(InputError, match="compaction"):
        FusionScheduler(2, 128, 64, compaction="defrag")
    with pytest.raises(InputError, match="kv-memory"):
        FusionScheduler(max_batch=64, kv_capacity_tokens=64, max_seq_len=64)
    with pytest.raises(InputError, match="admit_batch"):
        FusionScheduler(2, 128, 64, admit_batch=0)


def _loaded_with_defaults(device: str) -> FusionScheduler:
    """A scheduler with ``device``'s default prefill chunk and admission batch, 6 of 8 slots decoding."""
    from ember.runtime.scheduler import default_admit_batch, default_prefill_chunk

    s = FusionScheduler(max_batch=8, kv_capacity_tokens=8 * 2048, max_seq_len=2048,
                        prefill_chunk=default_prefill_chunk(device), admit_batch=default_admit_batch(device))
    for i in range(6):
        s.add(seq(3, rid=f"busy{i}"))
    s.schedule()
    _decoding(s)
    return s


def _prefill_calls(s: FusionScheduler, q: Sequence) -> tuple[int, list[int]]:
    """Schedule until ``q``'s prompt is cached: (iterations it waited to be admitted, tokens of
    each of its prefill calls). Every iteration must keep the decoding rows running."""
    waited, calls = 0, []
    while q.num_cached < len(q.prompt_ids):
        plan = s.schedule()
        assert len(plan.decode_seqs) == 6  # the running decodes are never stalled
        for g in plan.prefill:
            for r, n in zip(g.seqs, g.lengths):
                r.num_cached += n
                if r is q:
                    calls.append(n)
        waited += q.slot is None
        assert waited <= 100
    return waited, calls


def test_device_defaults_decide_admission_and_prefill_slices():
    """What the per-device defaults decide: a CPU step costs per token, so a request arriving
    under load is admitted at once and its long prompt is sliced over several steps; a GPU step
    costs per call, so an arrival waits a bounded while for company and its prompt goes in one call."""
    cpu = _loaded_with_defaults("cpu")
    cpu.add(arrival := seq(1000, rid="long"))
    waited, calls = _prefill_calls(cpu, arrival)
    assert waited == 0 and len(calls) > 1 and max(calls) < 1000

    gpu = _loaded_with_defaults("cuda:0")
    gpu.add(arrival := seq(1000, rid="long"))
    waited, calls = _prefill_calls(gpu, arrival)
    assert 0 < waited <= ADMIT_WAIT and calls == [1000]

    # requests trickling in one per iteration: the CPU prefills each alone as it comes, the GPU
    # gathers them into one iteration's prefill
    for device, want_iterations in (("cpu", 3), ("cuda:1", 1)):
        s = _loaded_with_defaults(device)
        s.retire(s.running[0])  # 3 free slots
        trickle, admissions = [seq(5, rid=f"t{i}") for i in range(3)], []
        for i in range(ADMIT_WAIT + 2):
            if i < len(trickle):
                s.add(trickle[i])
            admitted = [q for g in s.schedule().prefill for q in g.seqs]
            for q in admitted:
                q.num_cached, q.phase = len(q.prompt_ids), Phase.DECODE
            if admitted:
                admissions.append([q.request_id for q in admitted])
        assert len(admissions) == want_iterations and sum(map(len, admissions)) == 3, (device, admissions)


def test_cancelled_waiting_request_is_skipped():
    s = FusionScheduler(max_batch=1, kv_capacity_tokens=64, max_seq_len=64)
    a, b = seq(2, rid="a"), seq(2, rid="b")
    s.add(a)
    s.add(b)
    a.cancelled = True
    s.schedule()
    assert a.slot is None and b.slot == 0


# -- chunked prefill --------------------------------------------------------------------------
def test_prefill_respects_token_budget_and_fifo():
    s = FusionScheduler(max_batch=4, kv_capacity_tokens=4 * 256, max_seq_len=256, prefill_chunk=10)
    long_, short = seq(25, rid="long"), seq(4, rid="short")
    s.add(long_)
    s.add(short)
    chunks = []
    for _ in range(4):
        plan = s.schedule()
        total = sum(sum(g.lengths) for g in plan.prefill)
        assert total <= 10
        for g in plan.prefill:
            assert [q.slot for q in g.seqs] == list(range(g.start, g.start + len(g.seqs)))
            for q, n in zip(g.seqs, g.lengths):
                chunks.append((q.request_id, n))
                q.num_cached += n
                if q.num_cached == len(q.prompt_ids):
                    q.phase = Phase.DECODE
    # the long prompt goes first (FIFO) in chunks of 10, the short one gets what is left
    assert chunks == [("long", 10), ("long", 10), ("long", 5), ("short", 4)]
    assert long_.phase is short.phase is Phase.DECODE


# -- retire / compaction invariants under random traffic -------------------------------------------
@pytest.mark.parametrize("mode", ["min-move", "holes"])
def test_random_traffic_invariants(mode):
    rng = random.Random(0)
    s = FusionScheduler(max_batch=6, kv_capacity_tokens=6 * 64, max_seq_len=64, prefill_chunk=16, compaction=mode)
    made = 0
    for it in range(400):
        for _ in range(rng.choice([0, 0, 1, 2])):
            s.add(seq(rng.randint(1, 20), rng.randint(1, 12), rid=f"r{made}"))
            made += 1
        plan = s.schedule()
        occupied = [i for i, q in enumerate(s.slots) if q is not None]
        for i in occupied:
            assert s.slots[i].slot == i
        if mode == "min-move" and occupied:  # live slots are one contiguous range after compaction
            assert occupied == list(range(occupied[0], occupied[-1] + 1))
        if mode == "holes":
            assert plan.moves == []
        dec = set(map(id, plan.decode_seqs))
        for q in plan.decode_seqs:
            assert plan.decode_start <= q.slot < plan.decode_stop and q.phase is Phase.DECODE
        in_prefill = {id(q) for g in plan.prefill for q in g.seqs}
        assert not dec & in_prefill
        # fake execution: advance, finish some
        for g in plan.prefill:
            for q, n in zip(g.seqs, g.lengths):
                q.num_cached += n
                if q.num_cached == len(q.prompt_ids):
                    q.phase = Phase.DECODE
                    q.generated.append(1)
        for q in plan.decode_seqs:
            q.generated.append(1)
            q.num_cached += 1
        for q in list(s.running):
            if q.phase is Phase.DECODE and (len(q.generated) >= q.params.max_new_tokens or rng.random() < 0.05):
                s.retire(q)
                assert q.slot is None and q.phase is Phase.DONE
    while s.has_work():  # drain
        for q in list(s.running):
            s.retire(q)
        s.schedule()
    assert s.running == [] and not s.waiting


# -- the whole loop over a fake step function ---------------------------------------------------------
VOCAB = 97


def fake_next_token(tokens: list[int]) -> int:
    """The fake model: the next token is a hash of the whole prefix (order-sensitive)."""
    h = 7
    for t in tokens:
        h = (h * 31 + t) % 1000003
    return h % VOCAB


class FakeExecutor(HostGreedy):
    """The executor contract over Python lists: slot i holds the tokens whose 'K/V' it stores.
    ``run`` checks the per-request positions and that no dead row is fed to the model."""

    def __init__(self, slots: int):
        self.kv: list[list[int]] = [[] for _ in range(slots)]
        self.rows_computed = 0
        self.lock = threading.Lock()

    def move(self, moves):
        for src, dst in moves:
            self.kv[dst], self.kv[src] = self.kv[src], []

    def run(self, start, input_ids, positions, new_lengths, rope_long=None):
        b = input_ids.shape[0]
        logits = np.zeros((b, VOCAB), dtype=np.float32)
        self.rows_computed += b
        for r in range(b):
            n = int(new_lengths[r])
            if n == 0:
                continue
            cache = self.kv[start + r]
            assert list(positions[r, :n]) == list(range(len(cache), len(cache) + n)), "positions are per request"
            cache.extend(self.entry(int(t), None if rope_long is None else int(rope_long[r])) for t in input_ids[r, :n])
            logits[r, fake_next_token(cache)] = 1.0
        return logits

    def entry(self, token: int, rope_long: int | None) -> int:
        """What the cache keeps for ``token`` (its 'K/V')."""
        return token

    def release(self, slot):
        self.kv[slot] = []

    def maybe_shrink(self):
        pass

    @property
    def used_tokens(self):
        return sum(len(c) for c in self.kv)

    def close(self):
        pass


def solo(prompt: list[int], n: int) -> list[int]:
    toks, out = list(prompt), []
    for _ in range(n):
        out.append(fake_next_token(toks))
        toks.append(out[-1])
    return out


@pytest.mark.parametrize("mode,admit_batch", [("min-move", 1), ("holes", 1), ("min-move", 3)])
def test_engine_loop_over_fake_step_function(mode, admit_batch):
    slots = 5
    ex = FakeExecutor(slots)
    sched = FusionScheduler(max_batch=slots, kv_capacity_tokens=slots * 128, max_seq_len=128, prefill_chunk=7,
                            compaction=mode, admit_batch=admit_batch, admit_wait=4)
    eng = DecoderEngine(ex, sched, eos_token_id=None, max_positions=128, config={"vocab_size": VOCAB})
    rng = random.Random(1)
    prompts = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(40)]
    lengths = [rng.randint(1, 25) for _ in prompts]
    handles = [eng.submit(p, max_new_tokens=n) for p, n in zip(prompts, lengths)]
    results = [h.result(timeout=30) for h in handles]
    for p, n, c in zip(prompts, lengths, results):
        assert c.finish_reason is FinishReason.LENGTH
        assert c.token_ids == solo(p, n)
    st = eng.stats()
    assert st["kv_used_tokens"] == 0 and st["running"] == 0 and st["queue_depth"] == 0
    assert st["requests_finished_total"] == len(prompts)
    if mode == "min-move":
        assert st["slot_moves_total"] > 0
    eng.close()


class LetterTokenizer:
    """Token t is the letter chr(97 + t % 26); ``decode`` logs its calls to ``log``."""

    def __init__(self, log: list):
        self.log = log

    def decode(self, ids, skip_special_tokens=True):
        self.log.append("detok")
        return "".join(chr(97 + int(t) % 26) for t in ids)


class LaunchingFakeExecutor(FakeExecutor):
    """A FakeExecutor with the GPU executor's ``launch_greedy``: the step is 'queued' at launch
    and its result collected later; launches and collections are logged."""

    def __init__(self, slots: int, log: list):
        super().__init__(slots)
        self.log, self.launches = log, 0

    def launch_greedy(self, start, input_ids, positions, new_lengths, logit_rows=(), chain=None):
        self.launches += 1
        n, log = self.launches, self.log
        log.append(("launch", n))
        logits = self.run(start, input_ids, positions, new_lengths)

        class Pending:
            def result(self):
                log.append(("result", n))
                return logits.argmax(axis=1), logits[np.asarray(logit_rows, dtype=np.int64)]
        return Pending()


def test_engine_streams_the_last_step_while_the_next_runs():
    log: list = []
    ex = LaunchingFakeExecutor(2, log)
    sched = FusionScheduler(max_batch=2, kv_capacity_tokens=256, max_seq_len=128, prefill_chunk=64)
    eng = DecoderEngine(ex, sched, tokenizer=LetterTokenizer(log), eos_token_id=None, max_positions=128,
                        config={"vocab_size": VOCAB})
    prompt, n = [5, 17, 3], 12
    h = eng.submit(prompt, max_new_tokens=n)
    events = list(h)
    c = h.result(timeout=30)
    assert c.token_ids == solo(prompt, n) and [e.token_id for e in events if e.token_id >= 0] == c.token_ids
    # step k's tokens are detokenized after step k+1 is launched and before it is waited on
    overlapped = 0
    for i, entry in enumerate(log):
        if isinstance(entry, tuple) and entry[0] == "launch":
            j = log.index(("result", entry[1]))
            overlapped += "detok" in log[i + 1:j]
    assert ex.launches == n and overlapped == n - 1  # every launch but the first (the prefill) overlaps streaming
    # a stop string found one step late: the extra token is computed and dropped
    text = "".join(chr(97 + t % 26) for t in c.token_ids)
    stop = text[4:6]
    cut = eng.submit(prompt, max_new_tokens=n, stop=(stop,))
    events = list(cut)
    got = cut.result(timeout=30)
    want = text.index(stop) + len(stop)  # tokens up to the one completing the stop string
    assert got.finish_reason is FinishReason.STOP and got.token_ids == c.token_ids[:want]
    assert [e.token_id for e in events if e.token_id >= 0] == got.token_ids
    assert got.text == text[:text.index(stop)] and "".join(e.text for e in events) == got.text
    # the stop string completed by the last token the length allows: a stop, not a length finish
    last = eng.submit(prompt, max_new_tokens=want, stop=(stop,)).result(timeout=30)
    assert last.finish_reason is FinishReason.STOP and last.token_ids == got.token_ids and last.text == got.text
    assert eng.stats()["kv_used_tokens"] == 0
    eng.close()


def test_a_failing_detokenization_fails_its_request_not_the_engine():
    class Broken(LetterTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            if len(self.log) == 6:  # a few tokens in
                raise ValueError("bad bytes")
            return super().decode(ids)

    ex = LaunchingFakeExecutor(2, [])
    sched = FusionScheduler(max_batch=2, kv_capacity_tokens=256, max_seq_len=128, prefill_chunk=64)
    with DecoderEngine(ex, sched, tokenizer=Broken([]), eos_token_id=None, max_positions=128,
                       config={"vocab_size": VOCAB}) as eng:
        bad = eng.submit([5, 17, 3], max_new_tokens=12).result(timeout=30)
        assert bad.finish_reason is FinishReason.ERROR and "bad bytes" in bad.error
        eng.tokenizer = None  # the engine keeps serving
        ok = eng.submit([5, 17, 3], max_new_tokens=12)
        assert ok.result(timeout=30).token_ids == solo([5, 17, 3], 12)
        assert eng.stats()["kv_used_tokens"] == 0


class ChainingFakeExecutor(LaunchingFakeExecutor):
    """``LaunchingFakeExecutor`` that ``supports_chaining``: a decode launched with ``chain=`` takes its
    ids from that pending step's tokens (on a GPU: its argmax, copied on the device)."""

    supports_chaining = True

    def __init__(self, slots: int, log: list):
        super().__init__(slots, log)
        self.chained = 0

    def launch_greedy(self, start, input_ids, positions, new_lengths, logit_rows=(), chain=None):
        if chain is not None:
            self.chained += 1
            input_ids = chain.tokens.reshape(-1, 1)
        pending = super().launch_greedy(start, input_ids, positions, new_lengths, logit_rows)
        pending.tokens = self.run_tokens  # this step's greedy tokens, readable before result()
        return pending

    def run(self, start, input_ids, positions, new_lengths):
        logits = super().run(start, input_ids, positions, new_lengths)
        self.run_tokens = logits.argmax(axis=1)
        return logits


@pytest.mark.parametrize("seed", [0, 1])
def test_chained_steps_give_the_solo_tokens(seed):
    """Steps launched behind the previous one (ids from its tokens, before they are recorded)
    with EOS, stop strings, a cancellation and arrivals mixed in: every request's tokens are its
    solo run's, cut where it ends, and the pool is empty at the end."""
    log: list = []
    ex = ChainingFakeExecutor(4, log)
    eos = 5
    sched = FusionScheduler(max_batch=4, kv_capacity_tokens=4 * 128, max_seq_len=128, prefill_chunk=16)
    eng = DecoderEngine(ex, sched, tokenizer=LetterTokenizer([]), eos_token_id=eos, max_positions=128,
                        config={"vocab_size": VOCAB})
    rng = random.Random(seed)
    jobs = []
    for i in range(30):
        prompt = [rng.randrange(6, VOCAB) for _ in range(rng.randint(1, 12))]
        n = rng.randint(1, 40)
        want = solo(prompt, n)
        if eos in want:
            want = want[:want.index(eos) + 1]
        stop = ()
        if i % 5 == 0 and len(want) > 6:
            text = "".join(chr(97 + t % 26) for t in want)
            stop = (text[3:5],)
            want = want[:text.index(stop[0]) + 2]
        jobs.append((eng.submit(prompt, max_new_tokens=n, stop=stop), want))
        if i % 7 == 0:
            time.sleep(0.002)  # arrivals while steps are chained
    victim = eng.submit([9, 9, 9], max_new_tokens=100)
    victim.cancel()
    for h, want in jobs:
        got = h.result(timeout=30)
        assert got.token_ids == want, (got.finish_reason, got.token_ids, want)
    victim.result(timeout=30)
    assert ex.chained > 0
    # alone (nothing arriving), every decode step after the first one is chained
    before, n = ex.chained, 20
    assert eng.submit([7, 8, 9], max_new_tokens=n, ignore_eos=True).result(timeout=30).token_ids == solo([7, 8, 9], n)
    assert ex.chained - before == n - 2, ex.chained - before
    st = eng.stats()
    assert st["kv_used_tokens"] == 0 and st["running"] == 0
    eng.close()


# -- LongRoPE: the switch to the long factors and the recompute (scheduler step 4) ------------------
def _run_plan(s: FusionScheduler, plan, token: int = 3) -> None:
    """Apply ``plan`` as the engine does, with no model: cache the tokens, record a token for each
    row that finishes a prefill or decodes."""
    for g in plan.prefill:
        for q, n in zip(g.seqs, g.lengths):
            q.num_cached += n
            if q.num_cached == q.total_tokens:
                q.phase = Phase.DECODE
                q.generated.append(token)
    for q in plan.decode_seqs:
        q.num_cached += 1
        q.generated.append(token)


def test_longrope_switch_recomputes_a_sequence_when_it_crosses():
    s = FusionScheduler(max_batch=3, kv_capacity_tokens=3 * 64, max_seq_len=64, prefill_chunk=4, rope_switch=8)
    short, at_switch, long = seq(6, max_new=10, rid="short"), seq(8, max_new=10, rid="at"), seq(10, max_new=10, rid="long")
    for q in (short, at_switch, long):
        s.add(q)
    plan = s.schedule()
    assert long.rope_long and not short.rope_long and not at_switch.rope_long and plan.drop_kv == []
    prefilled: dict[tuple[str, bool], int] = {}  # (request, long) -> tokens prefilled
    drops = []
    for _ in range(40):
        for slot in plan.drop_kv:
            q = s.slots[slot]
            assert q.num_cached == 0 and q.phase is Phase.PREFILL and q.rope_long
            drops.append((q.request_id, q.total_tokens))
        for g in plan.prefill:
            for q, n in zip(g.seqs, g.lengths):
                prefilled[q.request_id, q.rope_long] = prefilled.get((q.request_id, q.rope_long), 0) + n
        _run_plan(s, plan)
        plan = s.schedule()
    # recomputed at the step that would make them 9 tokens long: all 9 again, long, in chunks
    assert sorted(drops) == [("at", 9), ("short", 9)]
    assert prefilled == {("short", False): 6, ("short", True): 9, ("at", False): 8, ("at", True): 9, ("long", True): 10}
    assert s.total_recomputes == 2 and all(q.rope_long for q in (short, at_switch, long))


def test_no_longrope_switch_never_recomputes():
    s = FusionScheduler(max_batch=1, kv_capacity_tokens=64, max_seq_len=64, prefill_chunk=4)
    q = seq(6, max_new=20)
    s.add(q)
    for _ in range(20):
        plan = s.schedule()
        assert plan.drop_kv == [] and not q.rope_long
        _run_plan(s, plan)
    assert s.total_recomputes == 0 and q.num_cached == q.total_tokens - 1


def fake_longrope_token(tokens: list[int], long: bool) -> int:
    """The fake LongRoPE model: a token's 'K/V' depends on the factor set it was rotated with."""
    return fake_next_token([2 * t + int(long) for t in tokens])


def solo_longrope(prompt: list[int], n: int, switch: int) -> list[int]:
    """transformers' ``generate`` semantics: every token of a sequence longer than ``switch`` is
    rotated long (its cache recomputed), of a shorter one short."""
    toks, out = list(prompt), []
    for _ in range(n):
        out.append(fake_longrope_token(toks, len(toks) > switch))
        toks.append(out[-1])
    return out


class LongRopeFakeExecutor(FakeExecutor):
    """``FakeExecutor`` of a LongRoPE model: each cached entry keeps the factor set its step was
    given (``rope_long``), and the next token hashes tokens and factor sets; with ``chains`` it
    ``supports_chaining`` as the GPU executor (a decode launched with ``chain=`` takes that step's tokens as its ids)."""

    def __init__(self, slots: int, chains: bool):
        super().__init__(slots)
        self.supports_chaining, self.chained = chains, 0

    def run(self, start, input_ids, positions, new_lengths, rope_long=None):
        assert rope_long is not None and len(rope_long) == len(new_lengths), "a LongRoPE step needs rope_long per row"
        return super().run(start, input_ids, positions, new_lengths, rope_long)

    def entry(self, token: int, rope_long: int | None) -> int:
        return 2 * token + rope_long  # the factor set the step was given stays in the cache

    def launch_greedy(self, start, input_ids, positions, new_lengths, logit_rows=(), chain=None, rope_long=None):
        if chain is not None:
            self.chained += 1
            input_ids = chain.tokens.reshape(-1, 1)
        logits = self.run(start, input_ids, positions, new_lengths, rope_long)
        pending = DoneStep(logits.argmax(axis=1), logits[np.asarray(logit_rows, dtype=np.int64)])
        pending.tokens = logits.argmax(axis=1)
        return pending


@pytest.mark.parametrize("chains,seed", [(False, 0), (True, 1), (True, 2)])
def test_longrope_engine_recomputes_crossing_sequences_amid_fused_traffic(chains, seed):
    """Requests shorter and longer than the switch, arriving at random, fused, in prefill chunks,
    compacted, one cancelled: each one's tokens are transformers' (``solo_longrope``), each one
    that crosses the switch is recomputed once, and the pool is empty at the end."""
    switch, slots = 12, 4
    ex = LongRopeFakeExecutor(slots, chains)
    sched = FusionScheduler(max_batch=slots, kv_capacity_tokens=slots * 64, max_seq_len=64, prefill_chunk=5,
                            rope_switch=switch)
    eng = DecoderEngine(ex, sched, eos_token_id=None, max_positions=64, config={"vocab_size": VOCAB})
    rng = random.Random(seed)
    jobs = []
    for _ in range(24):
        p = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 20))]
        n = rng.randint(1, 20)
        jobs.append((p, n, eng.submit(p, max_new_tokens=n)))
        if rng.random() < 0.3:
            time.sleep(0.002)
    victim = eng.submit(list(range(1, 12)), max_new_tokens=40)
    victim.cancel()
    for p, n, h in jobs:
        assert h.result(timeout=30).token_ids == solo_longrope(p, n, switch), (p, n)
    victim.result(timeout=30)
    st = eng.stats()
    crossing = sum(len(p) <= switch < len(p) + n - 1 for p, n, _ in jobs)
    assert crossing >= 5 and st["longrope_recomputes_total"] == crossing
    assert st["kv_used_tokens"] == 0 and st["running"] == 0
    assert not chains or ex.chained > 0
    eng.close()
