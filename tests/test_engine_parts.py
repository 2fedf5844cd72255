"""The engine loop's three parts, each alone: the scheduler owns request state and the chaining
policy, the runner returns a typed in-flight step, the output processor records and finishes."""
from __future__ import annotations

import numpy as np

from ember.runtime.executor import HostGreedy
from ember.runtime.output_processor import OutputProcessor, RequestState
from ember.runtime.detokenize import Detokenizer
from ember.runtime.requests import FinishReason, RequestHandle, SamplingParams
from ember.runtime.scheduler import FusionScheduler, Phase, Sequence
from ember.runtime.step_runner import CallOutput, InflightStep, LaunchedCall, StepRunner

VOCAB = 11


class EchoExecutor(HostGreedy):
    """Logits whose argmax is the row's last new token + 1; logs its calls."""

    def __init__(self):
        self.calls, self.moves, self.released = [], [], []

    def run(self, start, input_ids, positions, new_lengths):
        self.calls.append((start, input_ids.copy(), positions.copy(), new_lengths.copy()))
        logits = np.zeros((len(input_ids), VOCAB), np.float32)
        for r, n in enumerate(new_lengths):
            logits[r, (int(input_ids[r, max(int(n), 1) - 1]) + 1) % VOCAB] = 1.0
        return logits

    def move(self, moves):
        self.moves += moves

    def release(self, slot):
        self.released.append(slot)

    def maybe_shrink(self):
        pass

    used_tokens = 0

    def close(self):
        pass


def _seq(rid: str, prompt: list[int], **params) -> Sequence:
    ids = np.asarray(prompt, np.int64)
    p = SamplingParams(**params)
    return Sequence(request_id=rid, prompt_ids=ids, params=p, reserved=len(ids) + p.max_new_tokens)


def _scheduler() -> FusionScheduler:
    return FusionScheduler(max_batch=4, kv_capacity_tokens=4 * 64, max_seq_len=64, prefill_chunk=64)


def _decoding(sched: FusionScheduler, *seqs: Sequence):
    """Admit ``seqs``, prefill them and record one token each: they decode."""
    for s in seqs:
        sched.add(s)
    plan = sched.schedule()
    sched.launched(plan)
    for s in seqs:
        sched.record_token(s, 1)
    return sched.schedule()


def test_the_scheduler_owns_num_cached_phase_and_tokens():
    sched = _scheduler()
    a, b = _seq("a", [1, 2, 3]), _seq("b", [4, 5])
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert a.num_cached == b.num_cached == 0 and a.phase is Phase.PREFILL
    sched.launched(plan)
    assert (a.num_cached, b.num_cached) == (3, 2) and a.phase is Phase.PREFILL
    sched.record_token(a, 7)
    assert a.phase is Phase.DECODE and a.generated == [7]
    plan = sched.schedule()
    sched.launched(plan)
    assert a.num_cached == 4 and b.num_cached == 2  # b is still waiting for its first token
    sched.cancel(b)
    assert b.cancelled


def test_the_continuation_policy_needs_no_engine():
    sched = _scheduler()
    a, b = _seq("a", [1, 2], max_new_tokens=8), _seq("b", [3], max_new_tokens=8)
    plan = _decoding(sched, a, b)
    assert plan.decode_seqs == [a, b] and not plan.prefill
    kw = dict(chaining=True, cancelling=False, length_limit=64)
    nxt = sched.continuation(plan, **kw)
    assert nxt is not None and nxt.decode_seqs == [a, b] and not nxt.moves and not nxt.prefill
    assert sched.continuation(plan, **{**kw, "chaining": False}) is None  # the executor cannot chain
    assert sched.continuation(plan, **{**kw, "cancelling": True}) is None
    assert sched.continuation(plan, **{**kw, "length_limit": a.total_tokens + 1}) is None  # a ends with this token
    sched.add(_seq("c", [5]))
    assert sched.continuation(plan, **kw) is None  # a request waits to be admitted
    s2 = _scheduler()
    hot = _seq("hot", [1], max_new_tokens=8, temperature=0.7, seed=1)
    assert s2.continuation(_decoding(s2, hot), **kw) is None  # it samples: the host picks its token


def test_the_runner_returns_a_typed_inflight_step_and_changes_no_state():
    sched, ex = _scheduler(), EchoExecutor()
    a, b = _seq("a", [1, 2, 3]), _seq("b", [4, 5], temperature=0.5, seed=0)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    step = StepRunner(ex).launch(plan)
    assert isinstance(step, InflightStep) and step.plan is plan
    assert all(isinstance(c, LaunchedCall) for c in step.calls) and len(step.calls) == 1
    assert a.num_cached == 0  # the scheduler counts the K/V (``launched``), not the runner
    call = step.calls[0]
    assert [(s.request_id, r) for s, r in call.rows] == [("a", 0), ("b", 1)] and call.sampled == [1]
    [out] = step.wait()
    assert isinstance(out, CallOutput) and out.greedy.tolist() == [4, 6] and list(out.logits_of) == [1]
    assert step.chain_source is call.pending
    ids = ex.calls[0][1]
    assert ids.tolist() == [[1, 2, 3], [4, 5, 0]]


def test_the_output_processor_records_and_finishes():
    sched, ex = _scheduler(), EchoExecutor()
    counters = {"tokens_generated_total": 0, "requests_finished_total": 0, "requests_failed_total": 0}
    out = OutputProcessor(sched, ex, eos_token_id=9, length_limit=64, counters=counters)
    a, b = _seq("a", [1, 2], max_new_tokens=1), _seq("b", [3], max_new_tokens=5)
    for s in (a, b):
        s.payload = RequestState(RequestHandle(s.request_id, len(s.prompt_ids), lambda h: None), None,
                                 Detokenizer(None, ()), token_times=[])
        sched.add(s)
    plan = sched.schedule()
    step = StepRunner(ex).launch(plan)
    sched.launched(plan)
    unstreamed = out.record(step.wait(), now=0.0)
    assert unstreamed == [b] and b.phase is Phase.DECODE and b.generated == [4]
    assert a.phase is Phase.DONE and a.payload.handle.result(timeout=1).finish_reason is FinishReason.LENGTH
    out.record([CallOutput([(b, 0)], np.array([9]), {})], now=1.0)  # EOS
    assert b.payload.handle.result(timeout=1).finish_reason is FinishReason.EOS
    assert counters == {"tokens_generated_total": 3, "requests_finished_total": 2, "requests_failed_total": 0}
    assert sorted(ex.released) == [0, 1] and not sched.running
