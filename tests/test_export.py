"""Export-friendly model definitions vs transformers; ONNX step graph vs torch."""
from __future__ import annotations

import pytest
import torch

from ember.export.config import BUILTIN, DecoderConfig, config_from_hf
from ember.export.onnx_export import check_against_torch, export_step_graph, save_onnx
from ember.export.sources import step_model_class

from hf_models import hf_model_for

transformers = pytest.importorskip("transformers")

CASES = {
    "gpt2": BUILTIN["gpt2-tiny"],
    "llama-gqa4-untied": DecoderConfig(family="llama", vocab_size=300, hidden_size=64, num_layers=2, num_heads=8,
                                       num_kv_heads=2, intermediate_size=96, max_positions=128, norm_eps=1e-5,
                                       tie_word_embeddings=False, rope_theta=500000.0),
    "llama-mha-tied-bias": DecoderConfig(family="llama", vocab_size=300, hidden_size=64, num_layers=2, num_heads=4,
                                         num_kv_heads=4, intermediate_size=96, max_positions=128, norm_eps=1e-6,
                                         tie_word_embeddings=True, qkv_bias=True, o_bias=True),
}


def _hf_model(cfg: DecoderConfig):
    torch.manual_seed(0)
    m = hf_model_for(cfg).eval()
    if cfg.qkv_bias:  # HF inits biases to zero: make them matter
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("name", list(CASES))
def test_step_model_matches_transformers_prefill_and_incremental(name):
    cfg = CASES[name]
    hf = _hf_model(cfg)
    m = step_model_class(cfg.family)(cfg).eval()
    m.load_hf_state_dict(hf.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        past = [torch.zeros(2, cfg.num_kv_heads, 8, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
        out = m(ids, torch.arange(7).expand(2, 7), torch.zeros(2, dtype=torch.long), torch.tensor([7, 5]), *past)
        torch.testing.assert_close(out[0][0], ref[0, 6], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[0][1], ref[1, 4], atol=1e-5, rtol=1e-4)
        # incremental: rows have 5 cached tokens; row 0 feeds 2 more, row 1 feeds 1 (padded)
        past2 = []
        for t in out[1:]:
            z = torch.zeros(2, cfg.num_kv_heads, 8, cfg.head_dim)
            z[:, :, :5] = t[:, :, :5]
            past2.append(z)
        out2 = m(ids[:, 5:7], torch.tensor([[5, 6]]).expand(2, 2), torch.tensor([5, 5]), torch.tensor([2, 1]), *past2)
        torch.testing.assert_close(out2[0][0], ref[0, 6], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out2[0][1], ref[1, 5], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa4-untied"])
def test_onnx_matches_torch(name, tmp_path):
    cfg = CASES[name]
    m = step_model_class(cfg.family)(cfg).eval()
    proto = export_step_graph(m, cfg, tmp_path)
    save_onnx(proto, tmp_path / "step.onnx")
    chk = check_against_torch(m, cfg, tmp_path / "step.onnx")
    assert chk.max_rel_error < 1e-4, chk


def test_external_data_round_trip(tmp_path):
    cfg = CASES["gpt2"]
    m = step_model_class(cfg.family)(cfg).eval()
    proto = export_step_graph(m, cfg, tmp_path)
    files = save_onnx(proto, tmp_path / "step.onnx", external=True)
    assert files == ["step.onnx", "step.onnx.data"] and (tmp_path / "step.onnx.data").stat().st_size > 100_000
    assert sum(len(i.raw_data) for i in proto.graph.initializer) > 100_000  # in-memory model kept its weights
    assert check_against_torch(m, cfg, tmp_path / "step.onnx").max_rel_error < 1e-4


def test_hf_config_mapping_and_rejections():
    from ember.errors import ConfigError

    qwen = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 256, "vocab_size": 300,
            "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "hidden_act": "silu",
            "use_sliding_window": False, "sliding_window": 128}
    c = config_from_hf(qwen)
    assert (c.family, c.qkv_bias, c.o_bias, c.num_kv_heads, c.rope_theta) == ("qwen2", True, False, 2, 1e6)
    assert c.layer_windows == ()  # use_sliding_window false: full attention everywhere
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        config_from_hf({"model_type": "bert"})
    with pytest.raises(ConfigError, match="rope_scaling.rope_type='dynamic'"):
        config_from_hf({**qwen, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}})
    with pytest.raises(ConfigError, match="original_max_position_embeddings"):
        config_from_hf({**qwen, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="num_experts"):
        config_from_hf({**qwen, "num_experts": 8})
    windowed = config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 1})
    assert [windowed.window(i) for i in range(2)] == [0, 128]
    with pytest.raises(ConfigError, match="hidden_act"):
        config_from_hf({**qwen, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        config_from_hf({**qwen, "num_key_value_heads": 3})
    with pytest.raises(ConfigError, match="'vocab_size' is missing"):
        config_from_hf({k: v for k, v in qwen.items() if k != "vocab_size"})


def _ort_optimized_ops(model: torch.nn.Module, cfg: DecoderConfig, folder) -> list:
    """The nodes of ``model``'s step graph after ONNX Runtime's CPU graph optimizations."""
    import onnx
    import onnxruntime as ort

    folder.mkdir()
    save_onnx(export_step_graph(model, cfg, folder), folder / "step.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(folder / "opt.onnx")
    ort.InferenceSession(str(folder / "step.onnx"), so, providers=["CPUExecutionProvider"])
    return list(onnx.load(str(folder / "opt.onnx")).graph.node)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa4-untied"])
def test_step_graph_shape_plumbing_does_not_grow_with_depth(name, tmp_path):
    """Reshapes take their shapes from one shared set (step_attention.StepDims): a deeper model
    adds no Shape/Gather/Unsqueeze nodes; GPT-2's linears run as Gemm (bias fused) and its score
    MatMuls carry no scale (the 1/sqrt(D) is folded into the query weights)."""
    from collections import Counter
    from dataclasses import replace

    counts = {}
    for layers in (2, 4):
        cfg = replace(CASES[name], num_layers=layers)
        nodes = _ort_optimized_ops(step_model_class(cfg.family)(cfg).eval(), cfg, tmp_path / str(layers))
        counts[layers] = Counter(n.op_type for n in nodes)
        if cfg.positions == "learned":  # GPT-2
            assert counts[layers]["Gemm"] == 4 * layers, counts[layers]  # the LM head is lm_head_gemm's, at compile
            alphas = [a.f for n in nodes if n.op_type == "FusedMatMul" for a in n.attribute if a.name == "alpha"]
            assert alphas and all(a == 1.0 for a in alphas), alphas
    for op in ("Shape", "Gather", "Unsqueeze"):
        assert counts[4][op] == counts[2][op], (op, counts)


# Input slots ONNX Runtime's CUDA kernels read from host memory (shape-like arguments).
_HOST_SLOTS = {"Reshape": {1}, "Slice": {1, 2, 3, 4}, "Expand": {1}, "Tile": {1}, "Unsqueeze": {1}, "Squeeze": {1},
               "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Split": {1}, "Pad": {1, 2, 3}, "ReduceSum": {1}, "TopK": {1}}


def _step_sizes_used_as_data(graph) -> list[str]:
    """Nodes that read a value computed from tensor shapes (Shape -> Gather -> ...) as data.

    ONNX Runtime's CUDA provider keeps shape arithmetic on the host; a host value read as
    data by a device op needs a host-to-device copy node, and a session with one refuses
    CUDA graphs ("not all nodes partitioned to the CUDAExecutionProvider") -- the GPU decode
    loses ~4x (docs/gpu.md). This mirrors that placement on the CPU tier.
    """
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    host, bad = set(), []
    for n in graph.node:  # topological order
        data_in = [(s, i) for s, i in enumerate(n.input) if i and s not in _HOST_SLOTS.get(n.op_type, ())]
        if n.op_type == "Shape":
            host.update(n.output)
        elif data_in and all(i in host or i in consts for _, i in data_in):
            if any(i in host for _, i in data_in):
                host.update(n.output)
        else:
            bad += [f"{n.op_type} {n.name} input {s} ({i})" for s, i in data_in if i in host]
    return bad


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa4-untied"])
def test_step_graph_reads_no_step_size_as_data(name, tmp_path):
    """Step sizes (batch, tokens, past) feed only shape arguments, never device arithmetic,
    so the graph stays CUDA-graph capturable (checked on an H100 by tests/test_gpu.py)."""
    import onnx

    cfg = CASES[name]
    proto = export_step_graph(step_model_class(cfg.family)(cfg).eval(), cfg, tmp_path)
    assert _step_sizes_used_as_data(proto.graph) == []
    # the check itself: a batch size multiplied into data (what last_valid once did) is caught
    mul = onnx.helper.make_node("Mul", ["logits", "/Gather_output_0"], ["scaled"], name="bad")
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and n.input[0].startswith("/Shape"))
    mul.input[1] = gather.output[0]
    proto.graph.node.append(mul)
    assert _step_sizes_used_as_data(proto.graph) == [f"Mul bad input 1 ({gather.output[0]})"]
