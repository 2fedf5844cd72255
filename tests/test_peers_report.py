"""The peers benchmark's pure parts: metric aggregation, arm planning, the GGUF RoPE permutation, the table."""
from __future__ import annotations

import numpy as np
import pytest

from ember.bench.peers import timing as tm
from ember.bench.peers.arms import parse_list, plan_arms
from ember.errors import ConfigError


def run(start, steps, batch=1, prompt=16):
    return tm.GenTiming(start, steps, batch, prompt)


def test_decode_metrics_exclude_the_prefill():
    # prefill 1.0 s, then 4 decode steps of 0.1 s (0.2 s in the second run): median of 100 and 200 ms = 150
    runs = [run(0.0, [1.0, 1.1, 1.2, 1.3, 1.4]), run(10.0, [11.0, 11.2, 11.4, 11.6, 11.8])]
    assert tm.b1_ms_per_token(runs) == pytest.approx(150.0)
    decode, e2e = tm.batch_tok_s([run(0.0, [1.0, 1.1, 1.2, 1.3, 1.4], batch=16)])
    assert decode == pytest.approx(160.0)  # 16 rows / 0.1 s per step
    assert e2e == pytest.approx(16 * 5 / 1.4)


def test_prompt_rate_and_single_token_decode():
    assert tm.prompt_tok_s([run(2.0, [2.5], prompt=128), run(0.0, [1.0], prompt=128)]) == pytest.approx(192.0)
    with pytest.raises(ValueError, match=">= 2 generated tokens"):
        run(0.0, [1.0]).decode_s_per_step


def test_agreement():
    assert tm.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert tm.agreement([1, 2], [1, 2, 3]) == 1.0
    assert tm.agreement([1, 2], None) is None


def test_table_lists_ran_arms_and_skip_reasons():
    rows = [{"arm": "Ember fp32", "b1_ms_per_token": 12.345, "batch_decode_tok_s": 99.0, "agree_vs_hf": 1.0},
            {"arm": "llama.cpp Q8_0", "skipped": "llama_cpp not installed"}]
    md = tm.markdown_table(rows, batch=16).splitlines()
    assert md[0].startswith("| arm | b1 ms/token | b16 tok/s |")
    assert md[2].startswith("| Ember fp32 | 12.3 | 99.0 | - |") and md[2].endswith("| 100% |")
    assert md[-1] == "- llama.cpp Q8_0: llama_cpp not installed"
    assert not any(ln.startswith("| llama.cpp") for ln in md)


def test_plan_arms_maps_precisions_and_rejects_unknown():
    arms = plan_arms(["fp32", "int8-weights"], ["ember", "llama.cpp", "transformers"])
    assert [(a.engine, a.peer_precision) for a in arms] == [
        ("ember", "fp32"), ("llama.cpp", "F32"), ("transformers", "fp32"), ("ember", "int8-weights"), ("llama.cpp", "Q8_0")]
    assert arms[0].skipped is None  # Ember compiles fp32
    with pytest.raises(ConfigError, match="--precisions 'fp32,int3'"):
        parse_list("fp32,int3", ("fp32", "int4"), "--precisions")


def test_rope_permutation_interleaves_each_head_halves():
    from ember.bench.peers.gguf_llama import permute_rope_rows

    head_dim, heads = 4, 2
    w = np.arange(heads * head_dim)[:, None] * np.ones((1, 3))
    rows = permute_rope_rows(w, heads)[:, 0].tolist()
    assert rows == [0, 2, 1, 3, 4, 6, 5, 7]  # per head: first half and second half interleaved
