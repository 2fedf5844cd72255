"""The paged engine on the GPU (``kv_layout="paged"``: the paged step graph over ONNX Runtime
CUDA's PagedAttention): a fused burst behind a shared system prompt, served from the prefix
cache, in a pool small enough to preempt, gives every request the tokens the slot engine of
the same folder gives it."""
from __future__ import annotations

import numpy as np
import pytest

import ember
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.engine_format.manifest import read_manifest

from gpu_env import cuda_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(cuda_reason() is not None, reason=str(cuda_reason()))]


@pytest.mark.parametrize("source", ["llama-tiny", "gpt2-tiny"])
def test_paged_engine_on_cuda_gives_the_slot_engines_tokens(source, tmp_path):
    out = tmp_path / "e"
    compile_decoder(source, out, CompileOptions(dtype="fp16", paged="on", quiet=True))
    rng = np.random.default_rng(0)
    system = rng.integers(3, 200, 37).tolist()
    prompts = [system + rng.integers(3, 200, n).tolist() for n in (3, 9, 1, 20, 5, 12)] + [[7, 8, 9]]
    with ember.load(out, device="cuda:0", max_batch=8) as slots:
        want = [h.result(timeout=120).token_ids for h in [slots.submit(p, max_new_tokens=24, ignore_eos=True)
                                                          for p in prompts]]
    cfg = read_manifest(out).model["config"]
    block_bytes = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * 2 * 16  # K+V, FP16, 16 tokens
    for kv_memory in (None, 14 * block_bytes):  # ample; 14 blocks of 16 tokens: the burst must preempt
        with ember.load(out, device="cuda:0", max_batch=8, kv_layout="paged", kv_memory=kv_memory) as paged:
            first = paged.generate(prompts[:1], max_new_tokens=24, ignore_eos=True)[0].token_ids
            rest = [h.result(timeout=120).token_ids for h in [paged.submit(p, max_new_tokens=24, ignore_eos=True)
                                                              for p in prompts[1:]]]
            st = paged.stats()
        assert [first] + rest == want, kv_memory
        assert st["prefix_cache_hits_total"] >= 5 * 32, st  # five requests found the system prompt's two full blocks
        assert kv_memory is None or st["preemptions_total"] > 0, st
