"""The reference language model: corpus, deterministic training, perplexity helpers (ember/reference/)."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from ember.errors import InputError
from ember.reference.corpus import build_corpus, is_heldout, module_docstrings
from ember.reference.evaluate import (encode_texts, folder_tokenizer, nll_of_logits, perplexity, score_windows,
                                      token_windows, top1_agreement)
from ember.reference.train import TrainConfig, lr_at, train_reference_model

TINY = TrainConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                   max_positions=64, seq_len=32, batch_size=4, max_steps=4, eval_windows=6, threads=2, max_modules=25)


@pytest.fixture(scope="module")
def small_corpus():
    return build_corpus(max_modules=25)


def test_corpus_is_deterministic_and_split_is_disjoint(small_corpus):
    again = build_corpus(max_modules=25)
    assert again == small_corpus and again.sha256 == small_corpus.sha256
    train = {d.name for d in small_corpus.train}
    heldout = {d.name for d in small_corpus.heldout}
    assert train and heldout and not train & heldout
    assert all(is_heldout(n) for n in heldout) and not any(is_heldout(n) for n in train)
    assert any(n.startswith("topic:") for n in train) and any(n.startswith("module:") for n in train | heldout)
    # the split is by name alone: the same document lands on the same side in a larger corpus
    wider = build_corpus(max_modules=40, include_topics=False)
    side = {d.name: "train" for d in wider.train} | {d.name: "heldout" for d in wider.heldout}
    shared = [n for n in train | heldout if n in side]
    assert shared and all(side[n] == ("heldout" if n in heldout else "train") for n in shared)


def test_docstrings_come_in_source_order_without_importing():
    src = b'"""Mod."""\nimport os\nos._exit(3)\nclass A:\n    """Cls."""\n    def f(self):\n        """Fn."""\n'
    assert module_docstrings(src) == ["Mod.", "Cls.", "Fn."]
    assert module_docstrings(b"def broken(:\n") == []


def test_perplexity_is_exp_mean_nll_on_a_hand_checked_case():
    # vocab 4; row logits put probability 1/2 on token 1 and 1/4 on token 2 (log-odds ln 2 apart) at every position
    logits = np.log(np.array([1 / 8, 1 / 2, 1 / 4, 1 / 8], np.float32))
    windows = np.array([[0, 1, 2], [3, 1, 1]], np.int64)  # predictions: 1, 2, 1, 1 -> p = 1/2, 1/4, 1/2, 1/2

    def scorer(w):
        return np.broadcast_to(logits, (*w.shape, 4)).copy()

    nll = nll_of_logits(scorer(windows), windows)
    np.testing.assert_allclose(nll, [[math.log(2), math.log(4)], [math.log(2), math.log(2)]], rtol=1e-6)
    result = perplexity(scorer, windows, batch=1)
    assert result.tokens == 4
    assert result.perplexity == pytest.approx(2 ** (5 / 4), rel=1e-6)  # exp(mean(ln2, ln4, ln2, ln2))
    uniform = perplexity(lambda w: np.zeros((*w.shape, 7), np.float32), windows % 7)
    assert uniform.perplexity == pytest.approx(7.0, rel=1e-9)


def test_top1_agreement_counts_matching_predictions():
    windows = np.arange(12, dtype=np.int64).reshape(2, 6) % 5

    def echo(w):  # predicts the current token
        return np.eye(5, dtype=np.float32)[w]

    def echo_but_zero(w):  # differs wherever the current token is 0
        out = echo(w)
        out[w == 0] = np.eye(5, dtype=np.float32)[1]
        return out

    assert top1_agreement(echo, echo, windows) == 1.0
    scored = windows[:, :-1]
    assert top1_agreement(echo, echo_but_zero, windows) == pytest.approx(1 - (scored == 0).mean())


def test_one_scoring_pass_gives_perplexity_and_top1_for_agreement():
    windows = np.arange(15, dtype=np.int64).reshape(3, 5) % 4

    def echo(w):  # predicts the current token, with a little mass elsewhere
        return np.eye(4, dtype=np.float32)[w] * 2.0

    def echo_but_zero(w):  # differs wherever the current token is 0
        out = echo(w)
        out[w == 0] = np.eye(4, dtype=np.float32)[3] * 2.0
        return out

    scores = score_windows(echo, windows, batch=2)
    assert scores.result == perplexity(echo, windows, batch=3)
    np.testing.assert_array_equal(scores.top1, windows[:, :-1])
    other = score_windows(echo_but_zero, windows)
    assert scores.agreement(other) == pytest.approx(1 - (windows[:, :-1] == 0).mean())
    assert scores.agreement(other) == top1_agreement(echo, echo_but_zero, windows)
    np.testing.assert_allclose(scores.margin, 2.0)
    assert scores.agreement(other, min_margin=2.0) == scores.agreement(other)
    assert np.isnan(scores.agreement(other, min_margin=2.5))  # no prediction leads by that much
    with pytest.raises(InputError, match="same windows"):
        scores.agreement(score_windows(echo, windows[:2]))


def test_token_windows_are_non_overlapping_and_capped():
    ids = np.arange(100)
    w = token_windows(ids, 10)
    assert w.shape == (10, 10) and (w.ravel() == ids).all()
    capped = token_windows(ids, 10, max_windows=4)
    assert [int(r[0]) for r in capped] == [0, 30, 60, 90]
    with pytest.raises(InputError, match="window"):
        token_windows(np.arange(5), 10)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=1e-2)


def test_default_command_trains_the_published_model():
    """`python scripts/train_reference_lm.py` (no flags) must reproduce the model whose figures
    benchmarks/results/quantize_reference.md publishes; change both together."""
    from dataclasses import asdict
    from pathlib import Path

    published = Path(__file__).resolve().parent.parent / "benchmarks/results/quantize_reference.json"
    config = json.loads(published.read_text())["training"]["config"]
    assert config == asdict(TrainConfig())


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_training_is_deterministic_and_compiles_to_a_matching_engine(tmp_path, small_corpus):
    quiet = lambda _: None  # noqa: E731
    first = train_reference_model(TINY, tmp_path / "a", corpus=small_corpus, log=quiet)
    second = train_reference_model(TINY, tmp_path / "b", corpus=small_corpus, log=quiet)
    assert first["steps"] == TINY.max_steps and first["stopped_by"] == "max_steps"
    assert first["final_batch_loss"] == second["final_batch_loss"]
    assert first["heldout"] == second["heldout"]
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["corpus"]["sha256"] == small_corpus.sha256 and record["config"]["seed"] == 0
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind

    from ember.cli import main as ember_main

    engine = tmp_path / "engine"
    assert ember_main(["compile", str(tmp_path / "a"), "-o", str(engine), "--no-validate", "--quiet"]) == 0
    tokenizer, eos = folder_tokenizer(engine)
    assert eos == record["tokens"]["eos_token_id"]
    windows = token_windows(encode_texts(tokenizer, [d.text for d in small_corpus.heldout], eos), 16, 4)
    torch_ppl = perplexity(tmp_path / "a", windows)
    engine_ppl = perplexity(engine, windows, batch=3)
    assert engine_ppl.tokens == torch_ppl.tokens == 4 * 15
    assert engine_ppl.nll == pytest.approx(torch_ppl.nll, rel=1e-4)
    assert top1_agreement(engine, tmp_path / "a", windows) >= 0.98
