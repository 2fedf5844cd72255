"""End to end: HF folder -> ember compile -> ember.load -> generate, against transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ember
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.export.config import BUILTIN, DecoderConfig

from hf_models import save_hf_model

pytest.importorskip("transformers")

FAMILIES = {
    "gpt2": BUILTIN["gpt2-tiny"],
    "llama-gqa": DecoderConfig(family="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=8,
                               num_kv_heads=2, intermediate_size=96, max_positions=128, norm_eps=1e-5,
                               tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_and_engine(request, tmp_path_factory):
    cfg = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(cfg, d / "hf", seed=3)
    compile_decoder(str(d / "hf"), d / "engine", CompileOptions(quiet=True))
    return model, d / "engine"


def test_greedy_tokens_equal_transformers_generate(hf_and_engine):
    model, folder = hf_and_engine
    prompts = [[5, 6, 7], list(range(20, 41)), [1], [300, 301, 302, 303, 304, 305, 306, 307, 308]]
    with ember.load(folder, prefill_chunk=8) as eng:  # small chunks: prompts span several prefill iterations
        res = eng.generate(prompts, max_new_tokens=12, ignore_eos=True)
    for p, r in zip(prompts, res):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].tolist()
        assert r.token_ids == ref, (p, r.token_ids, ref)


def test_left_padded_hf_batch_agrees(hf_and_engine):
    """HF batched with left padding (its way) gives the same greedy tokens as Ember's per-row lengths."""
    model, folder = hf_and_engine
    prompts = [[7, 8, 9, 10, 11, 12], [42, 43]]
    n = max(map(len, prompts))
    ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[:, n:].tolist()
    with ember.load(folder) as eng:
        got = [c.token_ids for c in eng.generate(prompts, max_new_tokens=8, ignore_eos=True)]
    assert got == ref


def test_text_prompts_and_streaming(gpt2_tiny):
    events: dict[int, list] = {}
    with ember.load(gpt2_tiny) as eng:
        res = eng.generate(["Hello world", "The quick brown fox"], max_new_tokens=10,
                           stream=lambda i, ev: events.setdefault(i, []).append(ev))
        for i, c in enumerate(res):
            assert len(c.token_ids) == 10 and c.finish_reason.value == "length"
            assert "".join(ev.text for ev in events[i]) == c.text
            assert c.text == eng.tokenizer.decode(c.token_ids)
            assert c.ttft is not None and c.ttft > 0


def test_seeded_sampling_is_reproducible(llama_tiny):
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=123)
    with ember.load(llama_tiny) as eng:
        a = [c.token_ids for c in eng.generate(["abc", "Once upon a time"], **kw)]
        b = [c.token_ids for c in eng.generate(["abc", "Once upon a time"], **kw)]
        c = [c.token_ids for c in eng.generate(["abc", "Once upon a time"], **{**kw, "seed": 124})]
        greedy = eng.generate(["abc"], max_new_tokens=16)[0].token_ids
    assert a == b
    assert a != c
    assert a[0] != greedy  # sampling really samples


def test_stop_strings_and_eos(gpt2_tiny):
    with ember.load(gpt2_tiny) as eng:
        full = eng.generate(["Hello world"], max_new_tokens=12)[0]
        assert len(full.text) > 3
        stop = full.text[2:4]
        cut = eng.generate(["Hello world"], max_new_tokens=12, stop=[stop])[0]
        assert cut.finish_reason.value == "stop" and cut.text == full.text[: full.text.index(stop)]
        # EOS: make the first greedy token the EOS id and check the request ends there
        eng.eos_token_id = full.token_ids[0]
        e = eng.generate(["Hello world"], max_new_tokens=12)[0]
        assert e.finish_reason.value == "eos" and e.token_ids == [full.token_ids[0]] and e.text == ""
        assert eng.generate(["Hello world"], max_new_tokens=12, ignore_eos=True)[0].token_ids == full.token_ids


def test_sampler_top_k_top_p_support():
    from ember.runtime.requests import SamplingParams
    from ember.runtime.sampling import sample_token

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rng = np.random.default_rng(0)
    seen = {sample_token(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert seen == {0, 1}
    seen = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.8), rng) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.8
    seen = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.81), rng) for _ in range(300)}
    assert seen == {0, 1, 2}
    # a large vocabulary (the sampler widens its candidate set in steps): every draw is in the
    # nucleus computed another way (a full sort of the softmax), and the nucleus is a real cut
    big = np.random.default_rng(1).normal(size=50000).astype(np.float32)
    p = np.exp((big.astype(np.float64) - big.max()) / 0.5)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    nucleus = set(order[:int(np.searchsorted(np.cumsum(p[order]), 0.8)) + 1].tolist())
    assert len(nucleus) < 0.5 * len(big)
    params = SamplingParams(temperature=0.5, top_p=0.8)
    draw_rng = np.random.default_rng(2)
    draws = [sample_token(big, params, draw_rng) for _ in range(100)]
    assert set(draws) <= nucleus  # ignoring top_p, 100 draws stay inside it with probability 0.8**100
    assert len(set(draws)) > 50  # it samples rather than taking the argmax


def test_runtime_does_not_import_torch(gpt2_tiny):
    import subprocess
    import sys

    code = ("import sys, ember; e = ember.load(sys.argv[1]); e.generate(['hi'], max_new_tokens=2); e.close(); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code, str(gpt2_tiny)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_chat_template_is_recorded(tmp_path):
    import json

    from ember.engine_format.manifest import read_manifest

    save_hf_model(BUILTIN["gpt2-tiny"], tmp_path / "hf")
    tpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": tpl}))
    compile_decoder(str(tmp_path / "hf"), tmp_path / "eng", CompileOptions(quiet=True, validate=False))
    from ember.server.chat_template import find_chat_template

    assert find_chat_template(tmp_path / "eng", read_manifest(tmp_path / "eng")) == tpl


def test_builtin_tokenizer_fills_the_vocabulary():
    from ember.export.tokenizer_builtin import build_builtin_tokenizer

    tok = build_builtin_tokenizer(4096)
    assert tok.get_vocab_size() == 4096
    assert tok.decode(tok.encode("Hello, world! 42").ids) == "Hello, world! 42"
    rng = np.random.default_rng(0)
    assert all(tok.decode([int(i)]) for i in rng.integers(1, 4096, 50))  # every id has text
