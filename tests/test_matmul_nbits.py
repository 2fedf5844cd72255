"""Block-wise weight-only engines (``--quantize int4`` / ``int8-weights`` -> com.microsoft.MatMulNBits):
graph form, manifest record, accuracy against the FP32 engine, generation, the fusion invariant,
and the option errors."""
from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest

import ember
from ember.cli import main
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.compiler.inspect import describe
from ember.engine_format.manifest import read_manifest
from ember.errors import ConfigError
from ember.export.sources import resolve_decoder_source
from ember.passes.calibration_data import decoder_step_feeds, default_prompts
from ember.passes.matmul_nbits import NBitsOptions, gptq_compensates, quantize_matmul_nbits
from ember.passes.quant_accuracy import accuracy_report

from _quantize_models import exported_step_graph

WEIGHT_MATMULS = {"gpt2-tiny": 8, "llama-tiny": 14}  # q/k/v (one Gemm in gpt2), o, MLP; LM head not counted
ENGINES = [("gpt2-tiny", "int4", 32), ("llama-tiny", "int4", 64), ("gpt2-tiny", "int8-weights", 128),
           ("llama-tiny", "int8-weights", 32)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """{(model, scheme, block): engine folder} plus the FP32 engines under (model, None, None)."""
    root = tmp_path_factory.mktemp("nbits")
    out = {}
    for model, scheme, block in ENGINES + [(m, None, None) for m in WEIGHT_MATMULS]:
        folder = root / f"{model}-{scheme}-{block}"
        compile_decoder(model, folder, CompileOptions(quantize=scheme, block_size=block, validate=False, quiet=True))
        out[model, scheme, block] = folder
    return out


def _held_out(model: str, graph: onnx.ModelProto) -> list[dict]:
    tok = resolve_decoder_source(model).tokenizer
    ids = [tok.encode(p).ids for p in default_prompts("heldout")[:16]]
    return decoder_step_feeds(graph, ids, 96, batch_size=16, decode_steps=3)


@pytest.mark.parametrize("model,scheme,block", ENGINES)
def test_engine_graph_manifest_and_accuracy(engines, model, scheme, block):
    folder = engines[model, scheme, block]
    step = onnx.load(str(folder / "step.onnx"))
    nbits = [n for n in step.graph.node if n.op_type == "MatMulNBits"]
    bits = 4 if scheme == "int4" else 8
    assert len(nbits) == WEIGHT_MATMULS[model]
    for n in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (bits, block, 4), (n.name, attrs)
    head = next(n for n in step.graph.node if "logits" in n.output)
    assert head.op_type == "Gemm"  # the LM head stays float by default
    m = read_manifest(folder)
    q = m.quantization
    assert (q["scheme"], q["format"], q["bits"], q["block_size"], q["method"]) == (scheme, "MatMulNBits", bits, block, "rtn")
    assert sum(r["bits"] == bits for r in q["matmuls"]) == len(nbits)
    assert [r["site"] for r in q["matmuls"] if r["bits"] is None] == ["lm_head"]
    assert q["weight_compression"] > (5.0 if bits == 4 else 2.0)  # gpt2-tiny: K=64 pads to a 128 block
    assert not m.parts[0].extra.get("ort_disabled_optimizers")
    assert f"int{bits} b{block} rtn: {len(nbits)} MatMuls (attention, mlp); fp32: lm_head" in describe(m, folder)
    json.dumps(q)
    # logits against the FP32 engine, computed here (not read from the manifest)
    ref = onnx.load(str(engines[model, None, None] / "step.onnx"))
    acc = accuracy_report(ref, step, _held_out(model, ref))
    if bits == 8:  # 8 bits per block: close to exact even on random weights
        assert acc["top1_agreement"] >= 0.98 and acc["max_rel_error"] < 0.03, acc
    else:  # random weights: many near-ties flip; every decisive row must hold
        assert acc["top1_agreement"] >= 0.85 and acc["top1_agreement_decisive"] == 1.0, acc
        assert acc["max_rel_error"] < 0.2, acc


def test_int4_engine_generates_and_fused_requests_equal_solo(engines):
    folder = engines["llama-tiny", "int4", 64]
    prompts = [[5, 17, 42], [7] * 20, list(range(1, 40)), [300, 2, 9, 81, 4], [11, 12]]
    with ember.load(folder, max_batch=1, verify="size") as solo:
        alone = [solo.submit(p, max_new_tokens=12, ignore_eos=True).result(timeout=60).token_ids for p in prompts]
    with ember.load(folder, max_batch=4, prefill_chunk=16, verify="size") as eng:
        handles = [eng.submit(p, max_new_tokens=12, ignore_eos=True) for p in prompts]
        fused = [h.result(timeout=60).token_ids for h in handles]
        assert eng.stats()["iterations_total"] < 12 * len(prompts)  # really batched
        text = eng.generate(["The quick brown fox"], max_new_tokens=6)[0]
    assert fused == alone
    assert len(text.token_ids) == 6


@pytest.fixture(scope="module")
def gpt2_graph(tmp_path_factory):
    return exported_step_graph("gpt2-tiny", tmp_path_factory.mktemp("g"))


def test_hqq_and_lm_head_option(gpt2_graph):
    held = _held_out("gpt2-tiny", gpt2_graph)
    q, rep = quantize_matmul_nbits(gpt2_graph, NBitsOptions(method="hqq", block_size=32, quantize_lm_head=True))
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["MatMulNBits"] == WEIGHT_MATMULS["gpt2-tiny"] + 1 and ops["Gemm"] == 0, ops
    head = next(r for r in rep.matmuls if r["site"] == "lm_head")
    assert (head["bits"], head["method"]) == (4, "hqq")
    assert rep.summary() == "int4 b32 hqq: 8 MatMuls (attention, mlp), lm_head"
    assert any(n.op_type == "Gather" for n in q.graph.node)  # the embedding stays a float Gather
    acc = accuracy_report(gpt2_graph, q, held)
    assert acc["top1_agreement_decisive"] == 1.0 and acc["max_rel_error"] < 0.2, acc
    assert len(gpt2_graph.graph.node) != len(q.graph.node)  # the input graph was not modified in place
    assert not any(n.op_type == "MatMulNBits" for n in gpt2_graph.graph.node)


@pytest.mark.parametrize("kwargs,message", [
    ({"quantize": "int4", "block_size": 48}, "--block-size 48 is not one of 32, 64, 128"),
    ({"quantize": "int4", "int4_method": "foo"}, "--int4-method 'foo' is not one of rtn, hqq, gptq"),
    ({"block_size": 64}, "--block-size applies to block-wise --quantize int4 or int8-weights"),
    ({"quantize": "int8", "symmetric": True}, "--symmetric applies to block-wise"),
    ({"quantize": "int8-weights", "int4_method": "hqq"}, "--int4-method hqq needs --quantize int4"),
    ({"quantize": "int8-weights", "backend": "tensorrt-rtx", "block_size": 32}, "is per-channel Q/DQ"),
    ({"quantize": "int4", "backend": "tensorrt-rtx"}, "--quantize int4 needs --backend onnxruntime"),
    ({"quantize": "int4", "dtype": "fp16", "int4_method": "gptq"}, "--int4-method gptq calibrates the FP32 step graph"),
])
def test_bad_options_fail_before_the_export(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CompileOptions(**kwargs)


def test_tensorrt_int8_weights_stays_qdq_and_fused_decode_refuses_qdq():
    assert CompileOptions(quantize="int8-weights").blockwise
    assert not CompileOptions(quantize="int8-weights", backend="tensorrt-rtx").blockwise
    from ember.compiler.compile import wants_fused_decode

    with pytest.raises(ConfigError, match="--fused-decode on does not apply to --quantize int8"):
        wants_fused_decode(CompileOptions(quantize="int8", fused_decode="on"), "llama")
    assert wants_fused_decode(CompileOptions(quantize="int4", fused_decode="on"), "llama")


def test_gptq_is_refused_while_onnxruntime_gptq_equals_rtn(monkeypatch):
    if gptq_compensates():
        CompileOptions(quantize="int4", int4_method="gptq")  # a fixed ONNX Runtime: accepted
    else:
        with pytest.raises(ConfigError, match="returns the round-to-nearest weights"):
            CompileOptions(quantize="int4", int4_method="gptq")
    import onnxruntime.quantization.neural_compressor.weight_only as wo

    real = wo.gptq
    monkeypatch.setattr(wo, "gptq", lambda w, h, **kw: real(w, h, **kw) + (0.0 if (h == 0).sum() else 0.01))
    assert gptq_compensates()  # the probe sees a GPTQ that differs from round-to-nearest


def test_cli_errors_are_one_line(capsys, tmp_path):
    for args in (["--quantize", "int4", "--block-size", "48"], ["--quantize", "int4", "--int4-method", "foo"],
                 ["--block-size", "32"]):
        assert main(["compile", "llama-tiny", "-o", str(tmp_path / "e"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ember: error: --") and "\n" not in err, err
    assert not (tmp_path / "e").exists()
