"""The fused decode part compiles without a second copy of the weights in memory (issue 18: a
llama-1b ``--fused-decode on`` compile peaked at 18.5 GB, 4.2x its FP32 weights, with the torch model
alive through ONNX Runtime's checks and the decode graph's weights held in a ModelProto).

- ``write_decode_graph`` puts no weight into an in-memory TensorProto: each goes to the data file as it
  is made, and the files are the bytes the in-memory build + ``save_onnx`` wrote;
- the compile frees the torch model before any ONNX Runtime session or the block-wise quantizer runs.
"""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import onnxruntime
import pytest

import ember.export.fused_graph as fused_graph
import ember.export.onnx_export as onnx_export
import ember.export.sources as sources
import ember.passes.matmul_nbits as matmul_nbits
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.export.external_data import INLINE_BYTES
from ember.export.gqa_decode import build_decode_graph, write_decode_graph
from ember.export.onnx_export import save_onnx


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("external", [True, False])
@pytest.mark.parametrize("source,dtype,linears", [("llama-tiny", "float32", "gemm"), ("llama-tiny", "float16", "matmul"),
                                                  ("gpt2-tiny", "float32", "matmul")])
def test_write_decode_graph_streams_weights_and_writes_the_same_bytes(tmp_path, monkeypatch, source, dtype, linears,
                                                                      external):
    src = sources.resolve_decoder_source(source)
    if external:  # the llama-1b case: every weight in decode.onnx.data
        monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    (tmp_path / "memory").mkdir()
    save_onnx(build_decode_graph(src.model, src.config, dtype, linears), tmp_path / "memory" / "decode.onnx")

    made = []  # bytes of every TensorProto made in memory
    from_array = fused_graph.numpy_helper.from_array
    monkeypatch.setattr(fused_graph.numpy_helper, "from_array", lambda a, name=None: made.append(a.nbytes) or from_array(a, name))
    (tmp_path / "streamed").mkdir()
    proto = write_decode_graph(src.model, src.config, tmp_path / "streamed" / "decode.onnx", dtype, linears)
    if external:  # (a graph under EXTERNAL_DATA_THRESHOLD is read back inline at the end, as save_onnx keeps it)
        assert made and max(made) < INLINE_BYTES  # no weight was held as a TensorProto
    assert sorted(_files(tmp_path / "streamed")) == (["decode.onnx", "decode.onnx.data"] if external else ["decode.onnx"])
    assert _files(tmp_path / "streamed") == _files(tmp_path / "memory")
    assert any(t.external_data for t in proto.graph.initializer) == external


@pytest.mark.parametrize("options", [dict(fused_decode="on"), dict(fused_decode="on", quantize="int4"),
                                     dict(dtype="fp16", quantize="int8-weights")])
def test_compile_frees_the_torch_model_before_onnxruntime_and_the_quantizer(tmp_path, monkeypatch, options):
    models = []
    resolve = sources.resolve_decoder_source

    def resolve_and_watch(*args, **kw):
        src = resolve(*args, **kw)
        models.append(weakref.ref(src.model))
        return src

    alive_at = []  # (what ran, whether the torch model was alive)

    def watch(what, fn):
        def run(*args, **kw):
            gc.collect()
            alive_at.append((what, models[0]() is not None))
            return fn(*args, **kw)
        return run

    monkeypatch.setattr(sources, "resolve_decoder_source", resolve_and_watch)
    monkeypatch.setattr(onnxruntime, "InferenceSession", watch("an ONNX Runtime session", onnxruntime.InferenceSession))
    monkeypatch.setattr(matmul_nbits, "quantize_matmul_nbits", watch("the quantizer", matmul_nbits.quantize_matmul_nbits))
    m = compile_decoder("llama-tiny", tmp_path / "out", CompileOptions(quiet=True, **options))
    assert [p.name for p in m.parts] == ["step", "decode"]
    assert {what for what, _ in alive_at} >= {"an ONNX Runtime session"} | ({"the quantizer"} if "quantize" in options else set())
    assert [what for what, alive in alive_at if alive] == []
    assert not any(p.name.startswith(".decode-float") for p in (tmp_path / "out").iterdir())
