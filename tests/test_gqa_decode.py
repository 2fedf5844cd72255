"""The fused decode part (export/gqa_decode.py): ONNX Runtime GroupQueryAttention with the
K/V updated in place, checked against the torch model and the portable step graph (CPU), for
the LLaMA and GPT-2 families."""
from __future__ import annotations

import numpy as np
import pytest

import ember
from ember.compiler.compile import CompileOptions, compile_decoder, wants_fused_decode
from ember.errors import ConfigError, EmberError
from ember.export.config import BUILTIN, DecoderConfig
from ember.export.gqa_decode import build_decode_graph, check_decode_graph
from ember.export.onnx_export import save_onnx
from ember.export.sources import random_init_, step_model_class

QWEN_LIKE = DecoderConfig(family="llama", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=1,
                          intermediate_size=96, max_positions=128, norm_eps=1e-6, tie_word_embeddings=True,
                          rope_theta=1e6, qkv_bias=True, o_bias=True)
GPT2_UNTIED = DecoderConfig(family="gpt2", vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=4,
                            intermediate_size=256, max_positions=96, norm_eps=1e-5, tie_word_embeddings=False)


def _model(cfg):
    import torch

    m = step_model_class(cfg.family)(cfg)
    random_init_(m, seed=3)
    with torch.no_grad():  # non-trivial norms and biases (the init sets them to 1 and 0)
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("cfg", [BUILTIN["llama-tiny"], QWEN_LIKE, BUILTIN["gpt2-tiny"], GPT2_UNTIED],
                         ids=["llama-tiny", "qwen-like-tied-bias-gqa4", "gpt2-tiny", "gpt2-untied"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 3e-2)])
def test_decode_graph_matches_torch(tmp_path, cfg, dtype, tol):
    model = _model(cfg)
    path = tmp_path / "decode.onnx"
    save_onnx(build_decode_graph(model, cfg, dtype), path)
    # rows at different past lengths, one at the buffer's last position; raises if the K/V
    # written in place differ or any other position changed
    assert check_decode_graph(model, cfg, path, batch=4, capacity=40) < tol


@pytest.mark.parametrize("name,weight", [("llama-tiny", "layers.1.o_proj.weight"), ("gpt2-tiny", "blocks.1.c_proj.weight")])
def test_decode_graph_check_catches_wrong_weights(tmp_path, name, weight):
    cfg = BUILTIN[name]
    model = _model(cfg)
    proto = build_decode_graph(model, cfg, "float32")
    w = next(i for i in proto.graph.initializer if i.name == weight)
    from onnx import numpy_helper

    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.5, w.name))
    save_onnx(proto, tmp_path / "decode.onnx")
    assert check_decode_graph(model, cfg, tmp_path / "decode.onnx") > 1e-2


@pytest.fixture(scope="module", params=["llama-tiny", "gpt2-tiny"])
def fused_folder(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("fused") / f"{request.param}-fused"
    m = compile_decoder(request.param, out, CompileOptions(fused_decode="on", quiet=True))
    assert [p.name for p in m.parts] == ["step", "decode"]
    return out


def test_fused_decode_generate_equals_step_graph(fused_folder):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 512, int(n)).tolist() for n in rng.integers(2, 30, 12)]
    tokens = {}
    for fused in (False, True):
        # 5 slots for 12 requests: admission, chunked prefill and compaction mixed with decodes
        with ember.load(fused_folder, max_batch=5, prefill_chunk=16, fused_decode=fused) as eng:
            assert (eng.executor.decode is not None) == fused
            outs = eng.generate(prompts, max_new_tokens=24, ignore_eos=True)
            tokens[fused] = [o.token_ids for o in outs]
            assert eng.executor.used_tokens == 0
    assert tokens[True] == tokens[False]


def test_fused_decode_env_switch(fused_folder, monkeypatch):
    monkeypatch.setenv("EMBER_FUSED_DECODE", "0")
    with ember.load(fused_folder) as eng:
        assert eng.executor.decode is None


def test_fused_decode_policy():
    assert wants_fused_decode(CompileOptions(dtype="fp16"), "llama")
    assert not wants_fused_decode(CompileOptions(dtype="fp32"), "llama")
    assert wants_fused_decode(CompileOptions(dtype="fp16"), "gpt2")  # auto: timed on a GPU (H200)
    assert not wants_fused_decode(CompileOptions(dtype="fp32"), "gpt2")
    assert wants_fused_decode(CompileOptions(fused_decode="on"), "gpt2")
    assert not wants_fused_decode(CompileOptions(dtype="fp16", fused_decode="off"), "llama")
    assert not wants_fused_decode(CompileOptions(dtype="fp16", quantize="int8"), "llama")
    with pytest.raises(ConfigError, match="falcon family"):
        wants_fused_decode(CompileOptions(fused_decode="on"), "falcon")
    with pytest.raises(ConfigError, match="--backend tensorrt"):
        wants_fused_decode(CompileOptions(fused_decode="on", backend="tensorrt"), "llama")
    assert not wants_fused_decode(CompileOptions(dtype="fp16"), "llama", head_dim=40)  # auto: skipped
    with pytest.raises(ConfigError, match="--fused-decode 'yes'"):
        CompileOptions(fused_decode="yes")


def test_fused_decode_unsupported_head_dim_leaves_no_folder(tmp_path, monkeypatch):
    odd = DecoderConfig(family="gpt2", model_type="gpt2", vocab_size=300, hidden_size=40, num_layers=1, num_heads=5,
                        num_kv_heads=5, intermediate_size=80, max_positions=64, norm_eps=1e-5, tie_word_embeddings=True)
    monkeypatch.setitem(BUILTIN, "gpt2-odd-head", odd)
    with pytest.raises(EmberError, match="head_dim 8"):
        compile_decoder("gpt2-odd-head", tmp_path / "out", CompileOptions(fused_decode="on", quiet=True))
    assert not (tmp_path / "out").exists()


def test_cli_fused_decode_flag(tmp_path, capsys):
    from ember.cli import main

    out = tmp_path / "f16"
    assert main(["compile", "llama-tiny", "-o", str(out), "--dtype", "fp16", "--quiet"]) == 0
    assert (out / "decode.onnx").exists()
    assert main(["inspect", str(out)]) == 0
    assert "decode" in capsys.readouterr().out
