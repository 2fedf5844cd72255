"""Mixed block-wise schemes (``--quantize-sites``): each weight MatMul's site (attention, mlp, lm_head)
recorded in the step graph (matched to the torch Linear it was exported from) and in the fused decode
part (named as it is written); each site quantized at its own width in both graphs; the manifest,
``summarize_matmuls`` and ``ember inspect``; option errors that name the flag."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from ember.cli import main
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.compiler.inspect import describe
from ember.compiler.quantize_sites import parse_sites
from ember.compiler.quantize_step import lm_head_output
from ember.errors import ConfigError
from ember.export.matmul_sites import read_sites, tag_step_graph
from ember.export.sources import resolve_decoder_source
from ember.passes.matmul_nbits import NBitsOptions, quantize_matmul_nbits, summarize_matmuls

from _quantize_models import exported_step_graph

# per layer: (attention, mlp) weight MatMuls in the step graph and in the fused part (packed q/k/v)
STEP_SITES = {"llama-tiny": (4, 3), "gpt2-tiny": (2, 2)}
DECODE_SITES = {"llama-tiny": (2, 3), "gpt2-tiny": (2, 2)}
LAYERS = 2


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    return {m: exported_step_graph(m, tmp_path_factory.mktemp(m)) for m in STEP_SITES}


@pytest.mark.parametrize("model", STEP_SITES)
def test_step_graph_records_every_weight_site(graphs, model):
    g = graphs[model]
    sites = read_sites(g)
    inits = {t.name for t in g.graph.initializer}
    weight_nodes = [n.name for n in g.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    head = next(n.name for n in g.graph.node if "logits" in n.output)
    assert sites[head] == "lm_head" and head.endswith("_gemm")  # the LM-head pass's Gemm keeps the record
    assert all(sites.get(n) in ("attention", "mlp") for n in weight_nodes if n != head), (weight_nodes, sites)
    attention, mlp = STEP_SITES[model]
    assert Counter(sites[n] for n in weight_nodes if n != head) == {"attention": LAYERS * attention, "mlp": LAYERS * mlp}
    # the projections whose exported names carry no module name: llama's q (score scale folded in), GPT-2's c_attn
    assert sites["/layers.0/MatMul" if model == "llama-tiny" else "/blocks.0/Gemm"] == "attention"


def test_site_match_is_by_value_not_by_name(graphs):
    """A weight that matches no Linear of the torch model is left untagged, whatever its node's name."""
    import torch

    src = resolve_decoder_source("llama-tiny")
    with torch.no_grad():
        src.model.layers[0].k_proj.weight.mul_(-1.0)  # a negative multiple: no longer the exported k weight
    g = onnx.ModelProto()
    g.CopyFrom(graphs["llama-tiny"])
    sites = tag_step_graph(g, src.model)
    assert "/layers.0/k_proj/MatMul" not in sites and read_sites(g) == sites
    assert sites["/layers.0/MatMul"] == sites["/layers.1/k_proj/MatMul"] == "attention"


def test_sites_of_weights_in_an_external_file(graphs, tmp_path):
    """Weights kept in an external data file (models past 2 GiB) are matched through a memory map."""
    g = onnx.ModelProto()
    g.CopyFrom(graphs["llama-tiny"])
    onnx.save_model(g, str(tmp_path / "step.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="step.onnx.data", size_threshold=0)
    external = onnx.load(str(tmp_path / "step.onnx"), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in external.graph.initializer if t.dims)
    sites = tag_step_graph(external, resolve_decoder_source("llama-tiny").model, tmp_path)
    assert sites == read_sites(graphs["llama-tiny"]) and len(sites) == 15  # 14 Linears + the LM head


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_mixed_widths_per_site(graphs, dtype):
    g = graphs["llama-tiny"]
    if dtype == "fp16":
        from ember.passes.fp16 import convert_to_fp16

        copy = onnx.ModelProto()
        copy.CopyFrom(g)
        g = convert_to_fp16(copy)
    q, rep = quantize_matmul_nbits(g, NBitsOptions(bits=4, site_bits={"attention": 8}, lm_head_output=lm_head_output(g)))
    sites = read_sites(g)
    widths = {n.name[: -len("_Q4")] if n.name.endswith("_Q4") else n.name[: -len("_Q8")]:
              onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
              for n in q.graph.node if n.op_type == "MatMulNBits"}
    assert widths and all(bits == {"attention": 8, "mlp": 4}[sites[name]] for name, bits in widths.items()), widths
    assert Counter(widths.values()) == {8: 8, 4: 6}
    float_type = "fp16" if dtype == "fp16" else "fp32"
    assert rep.summary() == f"int8 b32 rtn: 8 MatMuls (attention); int4 b32 rtn: 6 MatMuls (mlp); {float_type}: lm_head"
    assert rep.to_dict()["sites"] == {"attention": "int8-weights", "mlp": "int4"}


def test_a_site_kept_float_and_hqq_on_the_int4_site(graphs):
    q, rep = quantize_matmul_nbits(graphs["gpt2-tiny"], NBitsOptions(bits=8, method="hqq", site_bits={"attention": None,
                                                                                                   "mlp": 4}))
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["MatMulNBits"] == 4 and ops["Gemm"] == 5, ops  # c_attn, c_proj x 2 stay float Gemms; LM head
    assert rep.summary() == "fp32: 4 MatMuls (attention), lm_head; int4 b32 hqq: 4 MatMuls (mlp)"
    kept = [m["reason"] for m in rep.matmuls if m["site"] == "attention"]
    assert kept == ["kept float (--quantize-sites attention=float)"] * 4


def test_a_graph_without_site_records_is_refused(graphs):
    g = onnx.ModelProto()
    g.CopyFrom(graphs["llama-tiny"])
    del g.metadata_props[:]
    with pytest.raises(ConfigError, match="--quantize-sites: weight MatMul '/layers.0/MatMul' has no recorded site"):
        quantize_matmul_nbits(g, NBitsOptions(site_bits={"mlp": 8}))
    quantize_matmul_nbits(g, NBitsOptions())  # one width for all: no site needed


def test_summary_of_records_without_sites():
    old = [{"node": "a", "role": None, "bits": 4, "block_size": 32, "method": "rtn"},
           {"node": "b", "role": "lm_head", "bits": None, "reason": "kept"}]
    assert summarize_matmuls(old) == "int4 b32 rtn: 1 MatMul; float: lm_head"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    out = {}
    for model in STEP_SITES:
        for dtype in ("fp32", "fp16"):
            options = CompileOptions(dtype=dtype, quantize="int4", quantize_sites={"attention": "int8-weights"},
                                     fused_decode="on", validate=False, quiet=True)
            out[model, dtype] = (compile_decoder(model, root / f"{model}-{dtype}", options), root / f"{model}-{dtype}")
    return out


def _widths_by_site(path) -> dict[str, set[int]]:
    g = onnx.load(str(path))
    sites = read_sites(g)
    by_site: dict[str, set[int]] = {}
    for n in g.graph.node:
        if n.op_type == "MatMulNBits":
            bits = onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            by_site.setdefault(sites[n.name.rsplit("_Q", 1)[0]], set()).add(bits)
    return by_site


@pytest.mark.parametrize("model", STEP_SITES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_step_graph_and_fused_part_get_the_same_width_per_site(folders, model, dtype):
    m, folder = folders[model, dtype]
    assert [p.name for p in m.parts] == ["step", "decode"]
    for part in ("step.onnx", "decode.onnx"):  # the ONNX files themselves, not only their records
        assert _widths_by_site(folder / part) == {"attention": {8}, "mlp": {4}}, part
    float_type = "fp16" if dtype == "fp16" else "fp32"
    (sa, sm), (da, dm) = STEP_SITES[model], DECODE_SITES[model]
    q, dq = m.quantization, m.part("decode").extra["quantization"]
    assert q["sites"] == dq["sites"] == {"attention": "int8-weights", "mlp": "int4"}
    assert q["summary"] == (f"int8 b32 rtn: {LAYERS * sa} MatMuls (attention); int4 b32 rtn: {LAYERS * sm} MatMuls "
                            f"(mlp); {float_type}: lm_head")
    assert dq["summary"] == (f"int8 b32 rtn: {LAYERS * da} MatMuls (attention); int4 b32 rtn: {LAYERS * dm} MatMuls "
                             f"(mlp); {float_type}: lm_head")
    assert dq["check"]["vs_step_graph_rel_error"] <= dq["check"]["tolerance"]
    text = describe(m, folder)
    assert "quantization    int4 weight-only (by site: attention int8-weights, mlp int4), MatMulNBits block 32" in text
    assert f"weights         {q['summary']}" in text and f"weights {dq['summary']}" in text


@pytest.mark.parametrize("kwargs,message", [
    ({"quantize": "int4", "quantize_sites": {"embedding": "int8-weights"}},
     "--quantize-sites embedding=int8-weights: site 'embedding' is not one of attention, mlp"),
    ({"quantize": "int4", "quantize_sites": {"mlp": "int2"}}, "--quantize-sites mlp=int2: scheme 'int2' is not one of"),
    ({"quantize": "int4", "quantize_sites": {"mlp": "float", "attention": "float"}}, "keeps every weight float"),
    ({"quantize": "int8", "quantize_sites": {"mlp": "int4"}}, "--quantize-sites applies to block-wise --quantize"),
    ({"quantize_sites": {"mlp": "int4"}}, "--quantize-sites applies to block-wise"),
    ({"quantize": "int8-weights", "backend": "tensorrt-rtx", "quantize_sites": {"mlp": "float"}}, "is per-channel Q/DQ"),
    ({"quantize": "int8-weights", "int4_method": "hqq", "quantize_sites": {"attention": "float"}},
     "--int4-method hqq needs --quantize int4 \\(or an int4 site"),
])
def test_bad_site_options_fail_before_the_export(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CompileOptions(**kwargs)


def test_site_options_accepted():
    o = CompileOptions(quantize="int8-weights", int4_method="hqq", quantize_sites={"mlp": "int4"})
    assert o.weight_schemes == {"int8-weights", "int4"}
    assert parse_sites(" mlp=int4, attention=float ") == {"mlp": "int4", "attention": "float"}
    for bad, message in (("mlp", "'mlp' is not SITE=SCHEME"), ("mlp=int4,mlp=int8-weights", "given twice"),
                         (",", "names no site")):
        with pytest.raises(ConfigError, match=message):
            parse_sites(bad)


def test_cli_site_errors_are_one_line(capsys, tmp_path):
    for args in (["--quantize", "int4", "--quantize-sites", "attn=int8"], ["--quantize-sites", "mlp=int4"]):
        assert main(["compile", "llama-tiny", "-o", str(tmp_path / "e"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ember: error: --quantize-sites") and "\n" not in err, err
    assert not (tmp_path / "e").exists()
