"""Graphs whose weights stay in one page-aligned data file (ember/export/external_data.py): writing,
reading a tensor at a time, rewriting over the file being read, sessions over such graphs, block-wise
quantization one weight at a time (equal to ONNX Runtime's whole-graph quantizer), and compiles that
take the external path end to end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import ember
from ember.compiler.compile import CompileOptions, compile_decoder
from ember.export.external_data import (ALIGN_BYTES, PAGE, TensorFileWriter, external_info, is_external, load_all,
                                        read_tensor, weight_bytes, write_model)
from ember.passes.matmul_nbits import NBitsOptions, quantize_matmul_nbits
from ember.passes.quant_graph import ort_session

from _quantize_models import exported_step_graph


def _two_matmuls() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = {"big": rng.standard_normal((512, 640)).astype(np.float32),  # 1.3 MB: page-aligned
         "mid": rng.standard_normal((640, 96)).astype(np.float32),
         "tiny": np.arange(4, dtype=np.float32)}  # stays inline
    nodes = [helper.make_node("MatMul", ["x", "big"], ["h"], name="mm0"),
             helper.make_node("MatMul", ["h", "mid"], ["y0"], name="mm1"),
             helper.make_node("Add", ["y0", "tiny_b"], ["y"], name="add")]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.zeros(96, np.float32), "tiny_b"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 96])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def test_tensors_written_in_place_are_not_copied_again(tmp_path):
    """A graph whose weights ``TensorFileWriter`` wrote as they were made (``FusedGraph``): ``write_model``
    leaves its data file as it is (the same file, not a rewritten copy), the bytes a save from memory
    writes; a tensor out of that layout makes it write the file anew."""
    (tmp_path / "memory").mkdir()
    write_model(_two_matmuls()[0], tmp_path / "memory" / "m.onnx")
    model, _ = _two_matmuls()
    with TensorFileWriter(tmp_path / "m.onnx.data") as data:
        for t in model.graph.initializer:
            if t.name in ("big", "mid"):
                data.add(t)
    inode = (tmp_path / "m.onnx.data").stat().st_ino
    write_model(model, tmp_path / "m.onnx", base_dir=tmp_path)
    assert (tmp_path / "m.onnx.data").stat().st_ino == inode
    for name in ("m.onnx", "m.onnx.data"):
        assert (tmp_path / name).read_bytes() == (tmp_path / "memory" / name).read_bytes(), name
    inits = {t.name: t for t in model.graph.initializer}
    model.graph.initializer.remove(inits["big"])  # "mid" first: neither is where write_model puts it now
    model.graph.initializer.append(inits["big"])
    write_model(model, tmp_path / "m.onnx", base_dir=tmp_path)
    assert (tmp_path / "m.onnx.data").stat().st_ino != inode
    again = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for t in again.graph.initializer:
        np.testing.assert_array_equal(read_tensor(t, tmp_path), _two_matmuls()[1].get(t.name, np.zeros(96, np.float32)))


def test_write_read_and_rewrite_over_the_same_file(tmp_path):
    model, w = _two_matmuls()
    nbytes = weight_bytes(model)
    assert write_model(model, tmp_path / "m.onnx") == ["m.onnx", "m.onnx.data"]
    inits = {t.name: t for t in model.graph.initializer}
    assert is_external(inits["big"]) and is_external(inits["mid"]) and not is_external(inits["tiny"])
    assert not inits["big"].raw_data  # the caller's graph no longer holds the weights
    assert external_info(inits["big"])[1] % PAGE == 0 and inits["big"].ByteSize() < 200
    assert weight_bytes(model) == nbytes
    for name, value in w.items():
        np.testing.assert_array_equal(read_tensor(inits[name], tmp_path), value)
    # rewrite the graph over the data file it reads from, after dropping one weight
    model.graph.initializer.remove(inits["mid"])
    model.graph.initializer.append(numpy_helper.from_array(w["mid"] * 2, "mid"))
    write_model(model, tmp_path / "m.onnx", base_dir=tmp_path)
    again = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    got = {t.name: read_tensor(t, tmp_path) for t in again.graph.initializer}
    np.testing.assert_array_equal(got["big"], w["big"])
    np.testing.assert_array_equal(got["mid"], w["mid"] * 2)
    assert (tmp_path / "m.onnx.data").stat().st_size < 2 * (w["big"].nbytes + w["mid"].nbytes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temp file left
    # inline save: everything back in the graph, the stale data file removed
    write_model(again, tmp_path / "m.onnx", base_dir=tmp_path, external=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(tmp_path / "m.onnx")).graph.initializer[0]),
                                  w["big"])
    assert ALIGN_BYTES <= w["big"].nbytes


def test_session_over_external_graph_needs_its_folder(tmp_path):
    model, w = _two_matmuls()
    x = np.ones((2, 512), np.float32)
    want = ort_session(model).run(None, {"x": x})[0]
    write_model(model, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="base_dir"):
        ort_session(model)
    np.testing.assert_allclose(ort_session(model, base_dir=tmp_path).run(None, {"x": x})[0], want, rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="mid"):
        read_tensor(next(t for t in model.graph.initializer if t.name == "mid"), tmp_path / "elsewhere")


@pytest.fixture(scope="module")
def llama_graph(tmp_path_factory):
    return exported_step_graph("llama-tiny", tmp_path_factory.mktemp("g"))


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False)])
def test_one_weight_at_a_time_equals_onnxruntime_whole_graph(llama_graph, bits, symmetric, tmp_path):
    """The per-weight quantizer gives ONNX Runtime's whole-graph result bit for bit, from a graph
    whose weights are only in its data file."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    head = next(n.name for n in llama_graph.graph.node if "logits" in n.output)
    whole_in = onnx.ModelProto()
    whole_in.CopyFrom(llama_graph)
    whole = mnq.MatMulNBitsQuantizer(whole_in, bits=bits, block_size=32, is_symmetric=symmetric,
                                     nodes_to_exclude=[head],
                                     algo_config=mnq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric,
                                                                                  bits=bits))
    whole.process()
    want = {t.name: numpy_helper.to_array(t) for t in whole.model.model.graph.initializer}

    external = onnx.ModelProto()
    external.CopyFrom(llama_graph)
    write_model(external, tmp_path / "step.onnx")
    q, report = quantize_matmul_nbits(external, NBitsOptions(bits=bits, block_size=32, symmetric=symmetric),
                                      base_dir=tmp_path)
    got = {t.name: t for t in q.graph.initializer}
    packed = [n for n in want if n.endswith(f"_Q{bits}")]
    assert len(packed) == 14
    for name in packed + [n for n in want if n.endswith(("_scales", "_zero_points"))]:
        np.testing.assert_array_equal(read_tensor(got[name], tmp_path), want[name], err_msg=name)
    assert sum(m["bits"] == bits for m in report.matmuls) == 14
    assert [n.op_type for n in q.graph.node] == [n.op_type for n in whole.model.model.graph.node]
    # the float weights that were quantized are gone; the kept ones are still references into the file
    quantized = {n.input[1] for n in llama_graph.graph.node if n.op_type == "MatMul" and n.name != head
                 and any(t.name == n.input[1] for t in llama_graph.graph.initializer)}
    assert len(quantized) == 14 and not quantized & {t.name for t in q.graph.initializer}
    assert any(is_external(t) for t in q.graph.initializer)


@pytest.fixture
def external_always(monkeypatch):
    """Every compile takes the large-model path: weights in step.onnx.data from the export on."""
    import ember.export.onnx_export as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 1024)


@pytest.mark.parametrize("quantize", [None, "int4", "int8"])
def test_compile_through_the_data_file_equals_in_memory(tmp_path, quantize, external_always, monkeypatch):
    opts = CompileOptions(quantize=quantize, validate=True, quiet=True)
    compile_decoder("llama-tiny", tmp_path / "ext", opts)
    files = sorted(p.name for p in (tmp_path / "ext").iterdir())
    assert "step.onnx.data" in files, files
    step = onnx.load(str(tmp_path / "ext" / "step.onnx"), load_external_data=False)
    data = tmp_path / "ext" / "step.onnx.data"
    assert data.stat().st_size <= sum(external_info(t)[2] + PAGE for t in step.graph.initializer if is_external(t))
    import ember.export.onnx_export as ox

    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 1 << 30)
    compile_decoder("llama-tiny", tmp_path / "mem", opts)
    assert not (tmp_path / "mem" / "step.onnx.data").exists()
    mem = onnx.load(str(tmp_path / "mem" / "step.onnx"))
    ext = load_all(step, tmp_path / "ext")
    assert {t.name for t in mem.graph.initializer} == {t.name for t in ext.graph.initializer}
    for t in mem.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), read_tensor(t, None), err_msg=t.name)
    prompts = ["The quick brown fox", "hello"]
    with ember.load(tmp_path / "ext") as a, ember.load(tmp_path / "mem") as b:
        assert ([r.token_ids for r in a.generate(prompts, max_new_tokens=6, ignore_eos=True)]
                == [r.token_ids for r in b.generate(prompts, max_new_tokens=6, ignore_eos=True)])


def test_small_tensors_come_back_inline_from_per_tensor_files(tmp_path):
    """Past 2 GB torch's exporter writes every tensor to its own file, small ones included: the
    rewritten graph keeps small tensors inline and references only its own data file."""
    model, w = _two_matmuls()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    onnx.save_model(model, str(scratch / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0)
    saved = onnx.load(str(scratch / "m.onnx"), load_external_data=False)
    assert all(is_external(t) for t in saved.graph.initializer)
    write_model(saved, tmp_path / "m.onnx", base_dir=scratch)
    inits = {t.name: t for t in saved.graph.initializer}
    assert not is_external(inits["tiny"]) and not is_external(inits["tiny_b"])
    assert {external_info(t)[0] for t in saved.graph.initializer if is_external(t)} == {"m.onnx.data"}
    np.testing.assert_array_equal(numpy_helper.to_array(inits["tiny"]), w["tiny"])


def test_accuracy_report_reuses_the_feeds_float_run(llama_graph):
    """decoder_step_feeds(outputs=) returns the float run it made the feeds with; the report built on
    it equals the one that runs the float graph again."""
    from ember.passes.calibration_data import decoder_step_feeds
    from ember.passes.quant_accuracy import accuracy_report

    ids = [[5, 9, 30, 2], [7, 7, 1], [100, 3, 4, 8, 9, 11]]
    outputs: list = []
    feeds = decoder_step_feeds(llama_graph, ids, 32, decode_steps=2, outputs=outputs)
    assert len(outputs) == len(feeds) == 3
    q, _ = quantize_matmul_nbits(llama_graph, NBitsOptions(bits=4, block_size=32))
    again = accuracy_report(llama_graph, q, feeds)
    reused = accuracy_report(llama_graph, q, feeds, float_outputs=outputs)
    assert reused == again and 0 < reused["max_rel_error"] < 1
    with pytest.raises(Exception, match="float_outputs has 2 entries for 3 feeds"):
        accuracy_report(llama_graph, q, feeds, float_outputs=outputs[:2])


def test_session_past_the_inline_limit_goes_through_a_folder(tmp_path, monkeypatch):
    """A model too big to serialize (ByteSize raises past 2 GiB) is never measured by protobuf: its
    inline weights are counted, and past the limit the session reads a temporary folder."""
    import ember.passes.quant_graph as qg

    model, w = _two_matmuls()
    x = np.ones((2, 512), np.float32)
    want = ort_session(model).run(None, {"x": x})[0]
    write_model(model, tmp_path / "m.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    inits["mid"].CopyFrom(numpy_helper.from_array(w["mid"], "mid"))  # one weight back inline, one external
    monkeypatch.setattr(qg, "_INLINE_LIMIT", 1024)
    monkeypatch.setattr(onnx.ModelProto, "ByteSize", lambda self: 1 / 0, raising=False)
    np.testing.assert_allclose(ort_session(model, base_dir=tmp_path).run(None, {"x": x})[0], want, rtol=1e-6)
    assert is_external(inits["big"]) and not is_external(inits["mid"])  # the caller's model is untouched


def test_quantized_lm_head_leaves_no_dead_float_table(llama_graph):
    """--quantize-lm-head: the LM head's float table goes once its quantized copy replaces it."""
    q, report = quantize_matmul_nbits(llama_graph, NBitsOptions(bits=4, block_size=32, quantize_lm_head=True))
    read = {i for n in q.graph.node for i in n.input}
    dead = [t.name for t in q.graph.initializer if t.name not in read]
    assert dead == [] and any(m["site"] == "lm_head" and m["bits"] == 4 for m in report.matmuls)


def test_w8a8_reads_weights_from_the_data_file(tmp_path, external_always, monkeypatch):
    """--quantize int8 (Q/DQ): calibration, the pass and the accuracy report read the step graph's
    weights from its data file, one at a time; the graph is never loaded whole (peak compile memory)."""
    import ember.export.external_data as ed

    def load_all(*args, **kwargs):
        raise AssertionError("the Q/DQ pass loaded every weight into memory")

    monkeypatch.setattr(ed, "load_all", load_all)
    compile_decoder("llama-tiny", tmp_path / "e", CompileOptions(quantize="int8", quiet=True))
    assert (tmp_path / "e" / "step.onnx.data").exists()


def test_w8a8_spills_its_weights_and_the_folder_keeps_only_manifest_files(tmp_path, external_always, monkeypatch):
    """--quantize int8 of a large graph: the Q/DQ weights leave memory for a spill file before the quantized
    graph's session opens for the accuracy report, the session maps it, and the save copies it into
    step.onnx.data; the spill file is not left in the engine folder."""
    import ember.compiler.quantize_step as qs
    from ember.engine_format import manifest as mf

    spilled = []
    real = qs.spill_weights

    def spy(model, folder):
        spilled.append(real(model, folder))
        assert (folder / (qs.SPILL_FILE + ".data")).stat().st_size > 0
        assert all(is_external(t) for t in model.graph.initializer if t.name.endswith("_quantized"))
        return spilled[-1]

    monkeypatch.setattr(qs, "spill_weights", spy)
    m = compile_decoder("llama-tiny", tmp_path / "e", CompileOptions(quantize="int8", quiet=True))
    assert spilled == [True]
    listed = {"manifest.json"} | {p.file for p in m.parts} | {r["file"] for p in m.parts for r in p.external_data} \
        | {t["file"] for t in m.tables} | {f"{mf.TOKENIZER_DIR}/tokenizer.json"}
    assert {p.relative_to(tmp_path / "e").as_posix() for p in (tmp_path / "e").rglob("*") if p.is_file()} == listed


def test_quantization_plan_reads_no_weight_bytes(llama_graph, tmp_path, monkeypatch):
    """Issue 18: planning needs each weight's shape and dtype only; reading llama-1b's 4.4 GB for them
    cost seconds per plan. The plan equals one made from the values."""
    from ember.export import external_data
    from ember.passes.quant_graph import GraphIndex
    from ember.passes.quant_plan import plan_quantization
    from ember.passes.quantize import QuantOptions, _rules

    model = onnx.ModelProto()
    model.CopyFrom(llama_graph)
    write_model(model, tmp_path / "step.onnx", external=True)
    reads = []
    real_read = external_data.read_tensor
    monkeypatch.setattr(external_data, "read_tensor", lambda t, base: reads.append(t.name) or real_read(t, base))
    plan = plan_quantization(model, _rules(QuantOptions()), tmp_path)
    assert plan.weights and reads == [], f"planning read {reads[:5]}"
    idx = GraphIndex.build(model.graph, tmp_path)
    for site in plan.weights + plan.embeddings:
        name = site.tensor if hasattr(site, "tensor") else site.table
        value = idx.constant_weight(name)[0]
        spec = idx.constant_weight_spec(name)
        assert (spec.shape, spec.dtype) == (value.shape, value.dtype) == (tuple(site.shape), value.dtype), name


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.int64])
def test_read_tensor_reads_external_bytes_straight_into_the_array(tmp_path, monkeypatch, dtype):
    """Issue 18: an external tensor is read into its array directly, not copied through a TensorProto
    (three copies of every weight); same values, a writable array."""
    from ember.export import external_data

    value = (np.arange(300 * 700) % 251 - 125).astype(dtype).reshape(300, 700)
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(value, "w")]))
    write_model(model, tmp_path / "m.onnx", external=True)
    t = model.graph.initializer[0]
    assert is_external(t)
    monkeypatch.setattr(external_data, "load_tensor", lambda *a: pytest.fail("read through a TensorProto copy"))
    got = read_tensor(t, tmp_path)
    assert got.dtype == value.dtype and got.shape == value.shape and np.array_equal(got, value)
    assert got.flags.writeable


def test_w8a8_compile_opens_one_float_session(tmp_path, monkeypatch):
    """Issue 18: --quantize int8 runs the float graph in one ONNX Runtime session, for the calibration
    prompts (which also give the activation ranges) and the held-out ones; then the quantized graph's
    for the accuracy report. It opened four: feeds, two calibration passes' worth, held-out feeds."""
    from ember.passes import calibration, calibration_data, quant_accuracy

    opened = []
    for module in (calibration, calibration_data, quant_accuracy):
        def counting(model, *args, _real=module.ort_session, **kwargs):
            opened.append(any(n.op_type == "QuantizeLinear" for n in model.graph.node))
            return _real(model, *args, **kwargs)
        monkeypatch.setattr(module, "ort_session", counting)
    compile_decoder("llama-tiny", tmp_path / "e", CompileOptions(quantize="int8", quiet=True))
    assert opened == [False, True], f"sessions opened (quantized graph or not): {opened}"
