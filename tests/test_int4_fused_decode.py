"""``--dtype fp16 --quantize int4|int8-weights`` and the block-wise quantized fused decode part: graph form
(MatMulNBits with FP16 scales in both graphs), the manifest and ``ember inspect`` record, the compile-time
check of the part against the quantized step graph, and greedy tokens against the step-graph engine.

ONNX Runtime's CPU provider runs FP16 GroupQueryAttention and FP16 MatMulNBits (accuracy_level 4), so
the FP16 folders are tested here; the CUDA run of the same folder is marked ``gpu``."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import ember
from ember.compiler.compile import CompileOptions, compile_decoder, wants_fused_decode
from ember.compiler.fused_decode import QUANT_DECODE_TOLERANCE
from ember.compiler.inspect import describe
from ember.compiler.quantize_step import float32_feeds
from ember.engine_format.manifest import read_manifest
from ember.errors import ConfigError, EmberError
from ember.export.config import BUILTIN
from ember.export.gqa_decode import check_decode_graph, step_graph_reference
from ember.export.sources import resolve_decoder_source
from gpu_env import cuda_reason

LLAMA_TINY_LINEARS = 2 * 5  # per layer: packed q/k/v, o, gate, up, down
PROMPTS = np.random.default_rng(0).integers(1, 512, (12, 30))
PROMPTS = [p[:n].tolist() for p, n in zip(PROMPTS, np.random.default_rng(1).integers(2, 30, 12))]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("int4-fused")
    specs = {  # name -> (model, options)
        "fp16-int4": ("llama-tiny", CompileOptions(dtype="fp16", quantize="int4", quiet=True)),  # --fused-decode auto
        "fp32-int4": ("llama-tiny", CompileOptions(quantize="int4", block_size=64, fused_decode="on", validate=False,
                                                   quiet=True)),
        # GPT-2's Linears and a quantized LM head go through quant_gemm's float32 weights: FP16 scales all the same
        "gpt2-fp16-int8-head": ("gpt2-tiny", CompileOptions(dtype="fp16", quantize="int8-weights", symmetric=True,
                                                            quantize_lm_head=True, validate=False, quiet=True)),
    }
    return {name: (compile_decoder(model, root / name, options), root / name) for name, (model, options) in specs.items()}


def _nbits(path) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]


def _scale_types(path) -> set[int]:
    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    return {inits[n.input[2]].data_type for n in g.node if n.op_type == "MatMulNBits"}


def _greedy(folder, fused: bool, device: str = "cpu") -> list[list[int]]:
    # 5 slots for 12 requests: admission, chunked prefill and compaction mixed with decodes
    with ember.load(folder, max_batch=5, prefill_chunk=16, fused_decode=fused, device=device) as eng:
        assert (eng.executor.decode is not None) == fused
        return [o.token_ids for o in eng.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)]


def test_fp16_int4_folder_has_a_quantized_fused_decode_part(folders):
    m, folder = folders["fp16-int4"]
    assert [p.name for p in m.parts] == ["step", "decode"]
    decode = onnx.load(str(folder / "decode.onnx"))
    ops = [n.op_type for n in decode.graph.node]
    assert ops.count("GroupQueryAttention") == 2
    assert [n.name for n in decode.graph.node if n.op_type in ("Gemm", "MatMul")] == ["lm_head"]  # kept float
    nbits = _nbits(folder / "decode.onnx")
    assert len(nbits) == LLAMA_TINY_LINEARS
    for n in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 4), (n.name, attrs)
        assert len(n.input) >= 4 and n.input[3]  # zero points: the step graph's scheme (no --symmetric)
    assert _scale_types(folder / "decode.onnx") == _scale_types(folder / "step.onnx") == {TensorProto.FLOAT16}
    assert m.quantization["scheme"] == "int4" and m.extra["dtype"] == "fp16"
    q = m.part("decode").extra["quantization"]
    assert (q["bits"], q["block_size"], q["method"], q["symmetric"]) == (4, 32, "rtn", False)
    assert q["summary"] == f"int4 b32 rtn: {LLAMA_TINY_LINEARS} MatMuls (attention, mlp); fp16: lm_head"
    assert q["weight_compression"] > 3
    check = q["check"]
    assert check["vs_step_graph_rel_error"] <= check["tolerance"] == QUANT_DECODE_TOLERANCE["float16"]
    assert 0 < check["vs_torch_rel_error"] < 0.3  # the int4 error itself (validate is on)
    text = describe(m, folder)
    assert f"weights int4 b32 rtn: {LLAMA_TINY_LINEARS} MatMuls (attention, mlp); fp16: lm_head (MatMulNBits, zero points" in text
    assert "vs the step graph: max rel error" in text


def test_fp16_int4_fused_decode_follows_the_step_graph_engine(folders):
    _, folder = folders["fp16-int4"]
    step, fused = _greedy(folder, False), _greedy(folder, True)
    # FP16 kernels differ between the two graphs: a near-tie may flip late in a random-weight model
    agree = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(step, fused)])
    assert sum(a == b for a, b in zip(step, fused)) >= 9 and agree >= 0.9, (agree, step, fused)


def test_quantized_decode_part_past_the_external_data_threshold(folders, tmp_path, monkeypatch):
    """llama-1b's FP16 part is 2.2 GB: its float weights go to a .data file, are quantized a weight
    at a time from there, and the quantized part is saved with external data too (1 GiB lowered here)."""
    import ember.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1000)
    m = compile_decoder("llama-tiny", tmp_path / "big", CompileOptions(dtype="fp16", quantize="int4", validate=False,
                                                                       quiet=True))
    assert [e["file"] for e in m.part("decode").external_data] == ["decode.onnx.data"]
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == ["decode.onnx", "decode.onnx.data", "manifest.json",
                                                                    "step.onnx", "step.onnx.data", "tokenizer"]
    assert len(_nbits(tmp_path / "big" / "decode.onnx")) == LLAMA_TINY_LINEARS
    assert _greedy(tmp_path / "big", True) == _greedy(folders["fp16-int4"][1], True)  # the same graphs, stored apart


def test_fp32_int4_fused_decode_tokens_equal_the_step_graph_engine(folders):
    m, folder = folders["fp32-int4"]
    assert len(_nbits(folder / "decode.onnx")) == LLAMA_TINY_LINEARS
    assert _scale_types(folder / "decode.onnx") == {TensorProto.FLOAT}
    assert "vs_torch_rel_error" not in m.part("decode").extra["quantization"]["check"]  # validate=False
    assert _greedy(folder, True) == _greedy(folder, False)


def test_fp16_gemm_linears_and_quantized_lm_head(folders):
    m, folder = folders["gpt2-fp16-int8-head"]
    for part in ("step.onnx", "decode.onnx"):
        nbits = _nbits(folder / part)
        assert any(n.output[0] == "logits/pre_cast" or n.name.startswith("lm_head") for n in nbits), part
        assert _scale_types(folder / part) == {TensorProto.FLOAT16}, part
    q = m.part("decode").extra["quantization"]
    assert q["summary"] == "int8 b32 rtn sym: 8 MatMuls (attention, mlp), lm_head"  # 2 layers x (qkv, proj, fc, mlp proj)
    step, fused = _greedy(folder, False), _greedy(folder, True)
    assert np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(step, fused)]) >= 0.9


def test_decode_check_catches_a_wrong_quantized_weight(folders, tmp_path):
    _, folder = folders["fp16-int4"]
    cfg = BUILTIN["llama-tiny"]
    proto = onnx.load(str(folder / "decode.onnx"))
    scales = next(i for i in proto.graph.initializer if i.name == _nbits(folder / "decode.onnx")[3].input[2])
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * np.float16(1.5), scales.name))
    onnx.save(proto, str(tmp_path / "decode.onnx"))
    model = resolve_decoder_source("llama-tiny").model
    reference = step_graph_reference(folder / "step.onnx", cfg.num_layers)
    assert check_decode_graph(model, cfg, folder / "decode.onnx", reference=reference, kv_tol=np.inf) < 3e-2
    with pytest.raises(EmberError, match="layer 1 .* differs from the reference"):  # layer 0's MLP feeds layer 1's K/V
        check_decode_graph(model, cfg, tmp_path / "decode.onnx", reference=reference, kv_tol=3e-2)


def test_compile_refuses_a_decode_part_that_differs_from_the_step_graph(tmp_path, monkeypatch):
    import ember.compiler.quantize_step as qs

    real = qs.quantize_decode_part

    def doubled_scales(proto, options, base_dir=None, cache=None):  # a quantizer bug: layer 0's up_proj scales doubled
        quant, info = real(proto, options, base_dir, cache)
        up = next(n for n in quant.graph.node if n.op_type == "MatMulNBits" and "layers.0.up_proj" in n.name)
        scales = next(i for i in quant.graph.initializer if i.name == up.input[2])
        scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales) * np.float16(2), scales.name))
        return quant, info

    monkeypatch.setattr(qs, "quantize_decode_part", doubled_scales)
    with pytest.raises(EmberError, match="quantized fused decode graph differs from the quantized step graph"):
        compile_decoder("llama-tiny", tmp_path / "bad", CompileOptions(dtype="fp16", quantize="int4", validate=False,
                                                                       quiet=True))
    assert not (tmp_path / "bad").exists()


def test_float32_feeds_view_runs_an_fp16_graph_and_restores_it(folders):
    import onnxruntime as ort

    _, folder = folders["fp16-int4"]
    proto = onnx.load(str(folder / "step.onnx"))
    before = proto.SerializeToString()
    feeds = {"input_ids": np.array([[5, 6, 7]], np.int64), "positions": np.array([[0, 1, 2]], np.int64),
             "past_lengths": np.zeros(1, np.int64), "new_lengths": np.array([3], np.int64)}
    feeds.update({f"past_{kv}.{i}": np.zeros((1, 2, 4, 16), np.float32) for i in range(2) for kv in ("key", "value")})
    with float32_feeds(proto):
        assert all(i.type.tensor_type.elem_type != TensorProto.FLOAT16 for i in proto.graph.input)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        logits = sess.run(["logits"], feeds)[0]
    assert logits.shape == (1, 512) and np.isfinite(logits).all()
    assert proto.SerializeToString() == before


def test_fused_decode_options():
    int4 = CompileOptions(dtype="fp16", quantize="int4")
    assert int4.blockwise and wants_fused_decode(int4, "llama") and wants_fused_decode(int4, "gpt2")
    assert wants_fused_decode(CompileOptions(dtype="fp16", quantize="int8-weights"), "llama")
    assert not wants_fused_decode(CompileOptions(quantize="int4"), "llama")  # FP32: the CPU path, no part by default
    assert not wants_fused_decode(CompileOptions(dtype="fp16", quantize="int8"), "llama")
    for scheme in ("int8", "fp8"):
        with pytest.raises(ConfigError, match=f"--quantize {scheme} .*a Q/DQ graph's int8 kernels have no fused form"):
            wants_fused_decode(CompileOptions(quantize=scheme, fused_decode="on"), "llama")
    with pytest.raises(ConfigError, match="--backend tensorrt-rtx"):  # int8-weights there is per-channel Q/DQ
        wants_fused_decode(CompileOptions(quantize="int8-weights", backend="tensorrt-rtx", fused_decode="on"), "llama")
    with pytest.raises(ConfigError, match="--int4-method gptq calibrates the FP32 step graph"):
        CompileOptions(dtype="fp16", quantize="int4", int4_method="gptq")


@pytest.mark.gpu
@pytest.mark.skipif(cuda_reason() is not None, reason=str(cuda_reason()))
def test_fp16_int4_fused_decode_on_cuda(folders):
    _, folder = folders["fp16-int4"]
    with ember.load(folder, device="cuda:0", max_batch=5) as eng:
        assert eng.executor.decode is not None and eng.executor.decode.cuda_graph_status == "on"
    cpu, gpu = _greedy(folder, True), _greedy(folder, True, device="cuda:0")
    agree = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(cpu, gpu)])
    assert agree >= 0.9, (agree, cpu, gpu)



@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_fused_int4_compile_quantizes_each_distinct_float_weight_once(tmp_path, monkeypatch, external):
    """The step graph and the part share their o, gate, up and down weights (the part's packed q/k/v carry the
    folded attention scale): ONNX Runtime's quantizer runs once per distinct float weight (``NBitsCache``), the
    part reading the step graph's results back from step.onnx(.data), and the engine's files are the bytes that
    quantizing every weight again gives."""
    import ember.export.onnx_export as onnx_export
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    from ember.passes import matmul_nbits

    if external:
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 1000)
    runs, keys = [], []
    process, key = mnq.MatMulNBitsQuantizer.process, matmul_nbits.NBitsCache.key
    monkeypatch.setattr(mnq.MatMulNBitsQuantizer, "process", lambda self: runs.append(1) or process(self))
    monkeypatch.setattr(matmul_nbits.NBitsCache, "key", staticmethod(lambda *a: keys.append(key(*a)) or keys[-1]))
    options = CompileOptions(dtype="fp16", quantize="int4", fused_decode="on", validate=False, quiet=True)
    compile_decoder("llama-tiny", tmp_path / "reuse", options)
    weights = len(_nbits(tmp_path / "reuse" / "step.onnx")) + len(_nbits(tmp_path / "reuse" / "decode.onnx"))
    assert len(keys) == weights  # each graph's weights, looked up
    assert len(set(keys)) == weights - 2 * 4  # o, gate, up and down of both layers are the step graph's
    assert len(runs) == len(set(keys))

    class NoReuse(matmul_nbits.NBitsCache):
        def get(self, key, weight_name):
            return None

    monkeypatch.setattr(matmul_nbits, "NBitsCache", NoReuse)
    runs.clear()
    compile_decoder("llama-tiny", tmp_path / "each", options)
    assert len(runs) == weights
    files = sorted(p.name for p in (tmp_path / "reuse").iterdir() if p.name.endswith((".onnx", ".data")))
    assert files == (["decode.onnx", "decode.onnx.data", "step.onnx", "step.onnx.data"] if external
                     else ["decode.onnx", "step.onnx"])
    for name in files:
        assert (tmp_path / "reuse" / name).read_bytes() == (tmp_path / "each" / name).read_bytes(), name
