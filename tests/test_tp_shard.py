"""Tensor-parallel sharding (compile side): layout rules, per-rank weight sizes, and the ranks'
ONNX segments summed in one process against the unsharded torch model. No processes here."""
from __future__ import annotations

from dataclasses import replace

import onnx
import pytest
import torch
from onnx import numpy_helper

from ember.compiler.compile import CompileOptions
from ember.compiler.tp_compile import check_tp_against_torch, compile_tp
from ember.errors import ConfigError
from ember.export.config import BUILTIN
from ember.export.sources import random_init_, resolve_decoder_source, step_model_class
from ember.export.tp import plan_tp, shard_segments
from ember.progress import StageLog


def _source(name: str, **changes):
    src = resolve_decoder_source(name, seed=0)
    if changes:
        cfg = replace(src.config, **changes)
        model = step_model_class(cfg.family)(cfg).eval()
        random_init_(model, 0)
        src = replace(src, config=cfg, model=model)
    return src


def _compile(src, folder, tp: int):
    return compile_tp(src, folder, CompileOptions(tp=tp, quiet=True, validate=False), StageLog(3, quiet=True))


@pytest.fixture(scope="module")
def llama_tp2(tmp_path_factory):
    src = _source("llama-tiny")
    folder = tmp_path_factory.mktemp("llama-tp2")
    return src, folder, _compile(src, folder, 2)


def _rel(parts, tp):
    return [[p.file for p in parts if p.extra["rank"] == r] for r in range(tp)]


def test_layout_rules():
    llama = BUILTIN["llama-tiny"]  # 4 heads, 2 kv heads
    lay = plan_tp(llama, 2)
    assert (lay.heads, lay.kv_heads, lay.kv_replicated, lay.inter, lay.vocab) == (2, 1, False, 88, 256)
    lay4 = plan_tp(llama, 4)  # 2 kv heads over 4 ranks: each kv head replicated on 2 ranks
    assert (lay4.heads, lay4.kv_heads, lay4.kv_replicated) == (1, 1, True)
    assert [lay4.kv_head_start(r, llama) for r in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match=r"--tp 3 does not divide num_attention_heads=4"):
        plan_tp(llama, 3)
    six = replace(llama, hidden_size=96, num_heads=6, num_kv_heads=3)
    with pytest.raises(ConfigError, match=r"num_key_value_heads=3 neither divides nor is divisible by 2"):
        plan_tp(six, 2)
    odd = plan_tp(replace(llama, vocab_size=511, intermediate_size=175), 2)  # padded shards
    assert (odd.vocab, odd.inter) == (256, 88)


def test_sharded_graphs_match_torch(llama_tp2):
    src, folder, parts = llama_tp2
    assert len(parts) == 2 * (2 * src.config.num_layers + 2)
    assert check_tp_against_torch(src.model, src.config, folder, _rel(parts, 2)) < 1e-4


@pytest.mark.parametrize("name,tp,changes", [
    ("llama-tiny", 4, {"num_layers": 1}),  # kv heads replicated on 2 ranks each
    ("gpt2-tiny", 2, {"num_layers": 1}),  # fused c_attn split into q/k/v
    ("llama-tiny", 2, {"num_layers": 1, "vocab_size": 509, "intermediate_size": 170, "qkv_bias": True, "o_bias": True}),
    ("gpt2-tiny", 2, {"num_layers": 1, "vocab_size": 509, "tie_word_embeddings": False}),  # padded shards
])
def test_sharded_variants_match_torch(tmp_path, name, tp, changes):
    src = _source(name, **changes)
    parts = _compile(src, tmp_path, tp)
    assert sorted({p.extra["rank"] for p in parts}) == list(range(tp))
    assert check_tp_against_torch(src.model, src.config, tmp_path, _rel(parts, tp)) < 1e-4


def test_corrupted_shard_is_caught(llama_tp2, tmp_path):
    """The in-process check is sensitive: scaling one rank's MLP weight breaks it."""
    import shutil

    src, folder, parts = llama_tp2
    shutil.copytree(folder, tmp_path / "copy")
    target = next(p for p in parts if p.extra["rank"] == 1 and p.extra["segment_name"] == "mlp.0")
    proto = onnx.load(str(tmp_path / "copy" / target.file))
    init = max(proto.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(proto, str(tmp_path / "copy" / target.file))
    assert check_tp_against_torch(src.model, src.config, tmp_path / "copy", _rel(parts, 2)) > 1e-3


def _weight_bytes(path) -> int:
    proto = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in proto.graph.initializer)


def test_rank_weights_are_one_nth_of_sharded_layers(llama_tp2):
    src, folder, parts = llama_tp2
    sd = src.model.state_dict()
    norms = sum(v.numel() * 4 for k, v in sd.items() if "norm" in k)
    sharded = sum(v.numel() * 4 for k, v in sd.items() if "norm" not in k)
    for r in range(2):
        got = sum(_weight_bytes(folder / p.file) for p in parts if p.extra["rank"] == r)
        # every norm once per rank, every projection/embedding/head split in half; rope tables are small constants
        assert abs(got - (sharded / 2 + norms)) < 4096, (r, got, sharded / 2 + norms)
    # torch-side: each sharded Linear holds exactly 1/N of the rows (column-parallel) or columns (row-parallel)
    segs = shard_segments(src.model, src.config, plan_tp(src.config, 2), 1)
    attn, mlp = segs[1].module, segs[2].module
    blk = src.model.layers[0]
    assert attn.q.weight.shape == (blk.q_proj.weight.shape[0] // 2, blk.q_proj.weight.shape[1])
    assert attn.o.weight.shape == (blk.o_proj.weight.shape[0], blk.o_proj.weight.shape[1] // 2)
    assert mlp.down.weight.shape == (blk.down_proj.weight.shape[0], blk.down_proj.weight.shape[1] // 2)
    torch.testing.assert_close(attn.q.weight, blk.q_proj.weight[32:64])


def test_tp_rejects_unsupported_options(tmp_path):
    src = _source("llama-tiny")
    with pytest.raises(ConfigError, match="--quantize"):
        compile_tp(src, tmp_path, CompileOptions(tp=2, quantize="int8", quiet=True), StageLog(3, quiet=True))
    with pytest.raises(ConfigError, match="does not divide"):
        compile_tp(src, tmp_path, CompileOptions(tp=3, quiet=True), StageLog(3, quiet=True))
