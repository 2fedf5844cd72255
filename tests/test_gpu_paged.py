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
        with ember.load(out, device="cuda:0", max_batch=8, kv_layout="paged", kv_block_size=16,
                        kv_memory=kv_memory) as paged:  # 16-token blocks: the prompt shares two, the burst preempts
            first = paged.generate(prompts[:1], max_new_tokens=24, ignore_eos=True)[0].token_ids
            rest = [h.result(timeout=120).token_ids for h in [paged.submit(p, max_new_tokens=24, ignore_eos=True)
                                                              for p in prompts[1:]]]
            st = paged.stats()
        assert [first] + rest == want, kv_memory
        assert st["prefix_cache_hits_total"] >= 5 * 32, st  # five requests found the system prompt's two full blocks
        assert kv_memory is None or st["preemptions_total"] > 0, st


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantized_pools_on_cuda_serve_a_fused_batch(kv_dtype, tmp_path):
    """``--kv-dtype int8|fp8``: the loader builds one-byte pools bound with their ONNX element type;
    the CUDA kernel runs them, and a fused batch gives each request the tokens it gets alone."""
    out = tmp_path / "e"
    compile_decoder("llama-tiny", out, CompileOptions(dtype="fp16", paged="on", kv_dtype=kv_dtype, quiet=True))
    rng = np.random.default_rng(1)
    system = rng.integers(3, 200, 37).tolist()
    prompts = [system + rng.integers(3, 200, n).tolist() for n in (3, 9, 1)] + [[7, 8, 9]]
    with ember.load(out, device="cuda:0", max_batch=1, kv_layout="paged") as solo:
        want = [solo.generate([p], max_new_tokens=16, ignore_eos=True)[0].token_ids for p in prompts]
        pool = next(iter(solo.executor.pools.values()))
        assert pool.element_size() == 1 and str(pool.dtype).endswith({"int8": "int8", "fp8": "float8_e4m3fn"}[kv_dtype])
    with ember.load(out, device="cuda:0", max_batch=4, kv_layout="paged") as fused:
        got = [h.result(timeout=120).token_ids for h in [fused.submit(p, max_new_tokens=16, ignore_eos=True)
                                                         for p in prompts]]
    assert got == want


def test_paged_decode_graphs_on_cuda_give_the_plain_launches_tokens(tmp_path, monkeypatch):
    """Decode-only calls replay CUDA graphs (3 rows padded to a 4-row bucket on the scratch
    block) and give the tokens of plain launches (``EMBER_CUDA_GRAPH=0``); the engine's stats
    carry the graphs' counters and the memory plan."""
    out = tmp_path / "e"
    compile_decoder("llama-tiny", out, CompileOptions(dtype="fp16", paged="on", quiet=True))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 200, n).tolist() for n in (5, 30, 11)]

    def serve() -> tuple[list, dict]:
        with ember.load(out, device="cuda:0", max_batch=4, kv_layout="paged") as eng:
            got = [h.result(timeout=120).token_ids for h in [eng.submit(p, max_new_tokens=40, ignore_eos=True)
                                                             for p in prompts]]
            return got, eng.stats()

    monkeypatch.setenv("EMBER_CUDA_GRAPH", "0")
    want, plain = serve()
    monkeypatch.setenv("EMBER_CUDA_GRAPH", "1")
    got, st = serve()
    assert plain["cuda_graph_status"] == "off" and plain["cuda_graph_captures_total"] == 0, plain
    assert st["cuda_graph_status"] == "on", st
    assert st["cuda_graph_replays_total"] > 0 and st["cuda_graph_padding_rows_total"] > 0, st
    assert st["cuda_graph_prefill_calls_total"] > 0, st  # the prompts (<= 256 tokens) are captured too
    assert st["paged_chained_calls_total"] > 0, st  # greedy decodes chained on the device
    assert got == want
    plan = st["memory_plan"]
    assert plan["weights"] > 0 and plan["planned"] >= plan["weights"] + plan["pools"] + plan["activations"], plan
