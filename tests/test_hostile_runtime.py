"""Hostile inputs to the runtime (issue 16): sampling is safe for every accepted parameter, a
failure in one request's step (sampling, NaN logits, detokenization, stop-string flush, handle
events) fails that request only, and bad Python-API prompts raise InputError naming the prompt."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import ember
import ember.runtime.output_processor as output_processor_mod
from ember.errors import InputError
from ember.runtime.detokenize import Detokenizer
from ember.runtime.executor import LocalExecutor
from ember.runtime.requests import FinishReason, RequestHandle, SamplingParams
from ember.runtime.sampling import sample_token

F32 = np.finfo(np.float32)
TINY_TEMPERATURES = [5e-324, 1e-320, np.finfo(np.float64).tiny, 1e-300, 1e-100, 1e-45, 1e-30]


def _random_logits(rng: np.random.Generator, v: int) -> np.ndarray:
    """Random float32 logits, some rows at float32's extremes (huge, subnormal, -inf)."""
    kind = rng.integers(4)
    if kind == 0:
        x = rng.normal(size=v)
    elif kind == 1:
        x = rng.uniform(-F32.max, F32.max, size=v)
    elif kind == 2:
        x = rng.normal(size=v) * F32.smallest_subnormal * 50
    else:
        x = rng.normal(size=v) * 1e30
        x[rng.integers(v, size=v // 3)] = -np.inf
    x = x.astype(np.float32)
    top = np.flatnonzero(x == x.max())
    x[top[1:]] = np.nextafter(x[top[1:]], np.float32(-np.inf))  # a unique argmax: greedy is well defined
    return x


# -- 1. sampling: every accepted parameter is numerically safe --------------------------------------
def test_tiny_temperatures_are_greedy_and_never_raise():
    """A temperature below gap/746 (gap: the top logit minus the runner-up) leaves every other
    token a probability under exp(-746), 0 in float64: the draw must be the argmax."""
    rng = np.random.default_rng(0)
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings either
        for trial in range(150):
            logits = _random_logits(rng, int(rng.integers(2, 3000)))
            top2 = np.sort(logits.astype(np.float64))[-2:]
            gap = top2[1] - top2[0]
            for t in TINY_TEMPERATURES + [gap / 1e3, gap / 10 ** rng.uniform(3, 300)]:
                if not 0 < t < np.inf:
                    continue
                params = SamplingParams(temperature=t, top_k=int(rng.integers(0, 5)),
                                        top_p=float(rng.choice([1.0, 0.5])))
                tok = sample_token(logits, params, np.random.default_rng(trial))
                if gap >= 746 * t:
                    assert tok == int(np.argmax(logits)), (trial, t, gap)
                    checked += 1
    assert checked > 1000


def test_every_accepted_parameter_samples_a_valid_token():
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for trial in range(300):
            v = int(rng.integers(1, 500))
            logits = _random_logits(rng, v) if v > 1 else np.array([rng.normal()], dtype=np.float32)
            t = float(rng.choice([0.0, 10.0 ** rng.uniform(-323, 300)]))
            params = SamplingParams(temperature=t, top_k=int(rng.integers(0, v + 3)),
                                    top_p=float(rng.choice([1.0, 1e-300, rng.uniform(1e-9, 1.0)])),
                                    seed=int(rng.integers(0, 2**63)))
            tok = sample_token(logits, params, np.random.default_rng(params.seed))
            assert 0 <= tok < v and (logits[tok] > -np.inf or logits.max() == -np.inf), (trial, params)
            if 0 < t < 1e-300:
                assert tok == int(np.argmax(logits)), (trial, params)


def test_infinite_and_nan_logits():
    x = np.array([0.0, np.inf, 3.0, np.inf, -np.inf], dtype=np.float32)
    assert sample_token(x, SamplingParams(temperature=1.0), np.random.default_rng(0)) == 1  # +inf wins, first one
    x = np.array([-np.inf, 2.0, -np.inf, 1.0], dtype=np.float32)
    seen = {sample_token(x, SamplingParams(temperature=1.0), np.random.default_rng(i)) for i in range(100)}
    assert seen == {1, 3}  # -inf tokens are never drawn
    with pytest.raises(ValueError, match="NaN at token id 2"):
        sample_token(np.array([0.0, 1.0, np.nan], dtype=np.float32), SamplingParams(temperature=0.7),
                     np.random.default_rng(0))


def test_sampling_params_accept_only_their_ranges():
    bad = [
        ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -1e-9), ("temperature", True),
        ("temperature", "0.5"), ("temperature", 10**400), ("top_p", 0.0), ("top_p", 1.5), ("top_p", float("nan")),
        ("top_k", -1), ("top_k", 1.5), ("top_k", True), ("max_new_tokens", 0), ("max_new_tokens", 2.0),
        ("max_new_tokens", True), ("seed", -1), ("seed", 1.5), ("seed", "7"), ("stop", [1]), ("stop", [""]),
        ("stop", 5), ("stop", ["ok", "a\ud800"]), ("ignore_eos", "yes"),
    ]
    for name, value in bad:
        with pytest.raises(InputError, match=name):
            SamplingParams(**{name: value})
    p = SamplingParams(max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_k=np.int32(2), seed=np.uint64(9),
                       stop=None, top_p=1)
    assert (p.max_new_tokens, p.top_k, p.seed, p.stop) == (3, 2, 9, ())
    assert type(p.max_new_tokens) is int and type(p.temperature) is float and type(p.seed) is int
    assert SamplingParams(stop="ab").stop == ("ab",) and SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_tiny_temperature_batch_equals_greedy(gpt2_tiny):
    prompts = ["Hello world", "The quick brown fox", "abc", "Once upon a time"]
    with ember.load(gpt2_tiny) as eng:
        tiny = eng.generate(prompts, max_new_tokens=10, temperature=1e-320, seed=5, ignore_eos=True)
        greedy = eng.generate(prompts, max_new_tokens=10, ignore_eos=True)
        assert [c.finish_reason for c in tiny] == [FinishReason.LENGTH] * len(prompts)
        assert [c.token_ids for c in tiny] == [c.token_ids for c in greedy]
        assert eng.stats()["kv_used_tokens"] == 0


# -- 2. one request's failure stays with that request ----------------------------------------------
JOBS = [  # (prompt, sampling kwargs); the job at POISON is the one made to fail
    ("Hello world", dict(temperature=0.8, seed=11)),
    ("The quick brown fox", dict()),
    ("abc def ghi", dict(temperature=0.8, seed=13)),  # POISON: a unique seed and prompt length
    ("Once upon a time", dict(temperature=1.3, top_k=20, seed=14)),
    ("x", dict()),
]
POISON, N_NEW = 2, 10
STOP_MARK = "\x00never"  # a stop string the output never holds; marks the poisoned job's detokenizer


def _run_batch(folder, stop_on_poison: bool = False):
    """Submit JOBS as one batch (under the engine's lock, so the loop admits them together);
    returns their completions and the engine's stats afterwards."""
    with ember.load(folder) as eng:
        with eng._cv:
            handles = [eng.submit(p, max_new_tokens=N_NEW, ignore_eos=True,
                                  stop=(STOP_MARK,) if stop_on_poison and i == POISON else (), **kw)
                       for i, (p, kw) in enumerate(JOBS)]
        done = [h.result(timeout=30) for h in handles]
        return done, eng.stats(), [len(eng.encode(p)) for p, _ in JOBS]


@pytest.fixture(scope="module")
def reference(gpt2_tiny):
    done, stats, lengths = _run_batch(gpt2_tiny)
    assert all(c.finish_reason is FinishReason.LENGTH and len(c.token_ids) == N_NEW for c in done)
    assert len(set(lengths)) == len(lengths)  # the poisoned job is the only one of its prompt length
    return done, lengths


def _check_isolated(done, stats, reference, message: str):
    want, _ = reference
    bad = done[POISON]
    assert bad.finish_reason is FinishReason.ERROR and message in bad.error, (bad.finish_reason, bad.error)
    for i, (got, ref) in enumerate(zip(done, want)):
        if i != POISON:
            assert got.finish_reason is FinishReason.LENGTH, (i, got.finish_reason, got.error)
            assert got.token_ids == ref.token_ids and got.text == ref.text, i
    assert stats["kv_used_tokens"] == 0 and stats["running"] == 0
    assert stats["requests_failed_total"] == 1


def test_a_sampling_failure_fails_only_its_request(gpt2_tiny, reference, monkeypatch):
    real, calls = sample_token, []

    def poisoned(logits, params, rng):
        if params.seed == JOBS[POISON][1]["seed"]:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("poisoned sample")
        return real(logits, params, rng)

    monkeypatch.setattr(output_processor_mod, "sample_token", poisoned)
    done, stats, _ = _run_batch(gpt2_tiny)
    _check_isolated(done, stats, reference, "poisoned sample")
    assert done[POISON].token_ids == reference[0][POISON].token_ids[:2]  # the tokens before the failure


def test_nan_logits_fail_only_the_sampling_request(gpt2_tiny, reference, monkeypatch):
    """The model returns NaN logits for the rows that sample; only one job samples here."""
    real_launch = LocalExecutor.launch_greedy

    def nan_launch(self, *args, **kwargs):
        pending = real_launch(self, *args, **kwargs)

        class WithNaN:
            def result(self):
                greedy, logits = pending.result()
                return greedy, np.full_like(logits, np.nan)
        return WithNaN()

    monkeypatch.setattr(LocalExecutor, "launch_greedy", nan_launch)
    with ember.load(gpt2_tiny) as eng:
        with eng._cv:
            handles = [eng.submit(p, max_new_tokens=N_NEW, ignore_eos=True, **(kw if i == POISON else {}))
                       for i, (p, kw) in enumerate(JOBS)]
        done = [h.result(timeout=30) for h in handles]
        stats = eng.stats()
    want = reference[0]
    assert done[POISON].finish_reason is FinishReason.ERROR and "NaN" in done[POISON].error
    for i, c in enumerate(done):
        if i != POISON and not JOBS[i][1]:  # the greedy jobs: their reference tokens
            assert c.finish_reason is FinishReason.LENGTH and c.token_ids == want[i].token_ids
        elif i != POISON:
            assert c.finish_reason is FinishReason.LENGTH and len(c.token_ids) == N_NEW
    assert stats["kv_used_tokens"] == 0 and stats["requests_failed_total"] == 1


def test_a_detokenizer_failure_at_the_last_token_fails_only_its_request(gpt2_tiny, reference, monkeypatch):
    real_add = Detokenizer.add

    def add(self, token_ids):
        if STOP_MARK in self.stop and len(token_ids) == N_NEW:  # while the request finishes (length)
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "poisoned detokenizer")
        return real_add(self, token_ids)

    monkeypatch.setattr(Detokenizer, "add", add)
    done, stats, _ = _run_batch(gpt2_tiny, stop_on_poison=True)
    _check_isolated(done, stats, reference, "poisoned detokenizer")


def test_a_failing_stop_string_flush_fails_only_its_request(gpt2_tiny, reference, monkeypatch):
    real_flush = Detokenizer.flush

    def flush(self):
        if STOP_MARK in self.stop:
            raise RuntimeError("poisoned flush")
        return real_flush(self)

    monkeypatch.setattr(Detokenizer, "flush", flush)
    done, stats, _ = _run_batch(gpt2_tiny, stop_on_poison=True)
    _check_isolated(done, stats, reference, "poisoned flush")


def test_a_failing_handle_push_fails_only_its_request(gpt2_tiny, reference, monkeypatch):
    real_push = RequestHandle._push
    poisoned_length = reference[1][POISON]

    def push(self, ev):
        if self.prompt_tokens == poisoned_length and ev.index == N_NEW - 1:  # while the request finishes
            raise BrokenPipeError("poisoned reader")
        return real_push(self, ev)

    monkeypatch.setattr(RequestHandle, "_push", push)
    done, stats, _ = _run_batch(gpt2_tiny)
    _check_isolated(done, stats, reference, "poisoned reader")


# -- 3. Python API prompts ----------------------------------------------------------------------------
def test_bad_prompts_raise_input_error_naming_the_prompt(gpt2_tiny):
    with ember.load(gpt2_tiny) as eng:
        for bad, where in [(None, "prompt must be"), (5, "prompt must be"), (b"abc", "prompt must be"),
                           ([None], r"prompt\[0\]"), (["a"], r"prompt\[0\]"), ([1.5], r"prompt\[0\]"),
                           ([3, True], r"prompt\[1\]"), ([1, -2], r"prompt\[1\]"), ("a\ud800", "prompt contains")]:
            with pytest.raises(InputError, match=where):
                eng.submit(bad)
        for bad, where in [(None, "prompts must be"), (5, "prompts must be"), ([None], r"prompts\[0\]"),
                           (["fine", "a\ud800b"], r"prompts\[1\] contains a lone surrogate")]:
            with pytest.raises(InputError, match=where):
                eng.generate(bad, max_new_tokens=2)
        with pytest.raises(InputError, match=r"stop\[0\]"):
            eng.generate(["fine"], max_new_tokens=2, stop=["\udfff"])
        st = eng.stats()
        assert st["prompt_tokens_total"] == 0 and st["requests_finished_total"] == 0  # nothing was queued
        assert eng.submit(np.array([5, 6, 7]), max_new_tokens=2).result(timeout=30).token_ids  # numpy ids are fine


def test_check_text_rejects_lone_surrogates_only():
    from ember.runtime.text_input import check_text

    check_text("plain, émigré, 😀, \U0010ffff", "prompt")
    for bad in ["a\ud800", "\udc00", "x" * 10 + "\udbff"]:
        with pytest.raises(InputError, match="messages\\[0\\].content contains a lone surrogate"):
            check_text(bad, "messages[0].content")
    with pytest.raises(InputError, match="prompt must be a string"):
        check_text(None, "prompt")


def test_diffusion_prompts_are_checked_before_the_model_runs():
    from ember.runtime.diffusion.pipeline import DiffusionPipeline

    pipe = DiffusionPipeline.__new__(DiffusionPipeline)  # no model: the checks come before any part runs
    for kwargs, where in [(dict(prompts=[None]), r"prompts\[0\]"), (dict(prompts=["a\ud800"]), r"prompts\[0\]"),
                          (dict(prompts=["ok"], negative_prompt=["\udfff"]), r"negative_prompt\[0\]")]:
        with pytest.raises(InputError, match=where):
            pipe.make_jobs(**kwargs)
    for bad in [None, 5, b"a"]:
        with pytest.raises(InputError, match="prompts must be"):
            pipe.generate(bad)
