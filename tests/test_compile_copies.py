"""The large-model compile's cheaper paths give the bytes the plain ones gave (issue 18: llama-1b
compiles within 2 min): built-in weights drawn in place without the constructors' dead init,
data files copied file to file, and the per-weight quantizer's one-MatMul graph built without
extra copies of the weight."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ember.export.config import BUILTIN
from ember.export.external_data import inline_tensor, is_external, read_tensor, write_model
from ember.export.sources import resolve_decoder_source, step_model_class, uninitialized_weights
from ember.passes.matmul_nbits import one_matmul_model


@pytest.mark.parametrize("source", ["llama-tiny", "gpt2-tiny"])
def test_builtin_weights_equal_the_plain_draws(source):
    """Every parameter equals ``torch.randn(shape, generator) * 0.02`` drawn in order (norms 1, biases 0)
    after a default-initialized construction: the values engines of earlier releases were built from."""
    cfg = resolve_decoder_source(source).config
    plain = step_model_class(cfg.family)(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if ("ln" in name or "norm" in name) and name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    got = dict(resolve_decoder_source(source).model.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(got[name], p), name


def test_uninitialized_weights_draws_nothing_and_restores_the_constructors():
    cfg = BUILTIN["llama-tiny"]
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with uninitialized_weights():
        step_model_class(cfg.family)(cfg)
    assert torch.equal(torch.get_rng_state(), state)  # no kaiming / normal draw was made
    step_model_class(cfg.family)(cfg)
    assert not torch.equal(torch.get_rng_state(), state)  # outside it, the constructors draw again
    with pytest.raises(RuntimeError, match="inside"):
        with uninitialized_weights():
            raise RuntimeError("inside")
    linear = torch.nn.Linear(4, 4)
    assert linear.weight.abs().sum() > 0


def _weight() -> tuple[onnx.TensorProto, np.ndarray]:
    value = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    return numpy_helper.from_array(value, "w"), value


def test_one_matmul_model_is_the_graph_make_graph_built(tmp_path):
    """The same protobuf bytes as ``make_graph(..., initializer=[weight])`` + ``make_model``, from an
    inline weight and from one kept in a data file."""
    t, value = _weight()
    node = helper.make_node("MatMul", ["a", "w"], ["b"], name="mm")

    def built(weight):
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "one_matmul",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 48])],
                                  initializer=[weight])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()

    assert one_matmul_model(node, t).SerializeToString() == built(t)
    model = helper.make_model(helper.make_graph([node], "g", [], [], initializer=[t]))
    write_model(model, tmp_path / "m.onnx", external=True)
    stub = model.graph.initializer[0]
    assert is_external(stub) and not stub.raw_data
    old_copy = onnx.TensorProto()  # how the weight was brought inline before: a copy, data_location DEFAULT
    old_copy.CopyFrom(stub)
    del old_copy.external_data[:]
    old_copy.data_location = TensorProto.DEFAULT
    old_copy.raw_data = t.raw_data
    assert one_matmul_model(node, stub, tmp_path).SerializeToString() == built(old_copy)
    assert is_external(stub)  # the caller's graph still refers to the file
    np.testing.assert_array_equal(read_tensor(inline_tensor(stub, tmp_path), None), value)
    assert not is_external(stub)


def test_data_file_copied_file_to_file_equals_the_written_one(tmp_path):
    """Rewriting a graph whose weights lie in per-tensor files (the exporter's) and in a data file gives
    the data file a write from memory gives, byte for byte, holes read as zeros included."""
    rng = np.random.default_rng(1)
    values = {f"w{i}": rng.standard_normal(shape).astype(np.float32)
              for i, shape in enumerate([(700, 600), (300,), (512, 513), (1024, 300)])}  # 1.7 MB, 1.2 KB, ...

    def model():
        inits = [numpy_helper.from_array(v, k) for k, v in values.items()]
        return helper.make_model(helper.make_graph([], "g", [], [], initializer=inits))
    (tmp_path / "mem").mkdir()
    write_model(model(), tmp_path / "mem" / "m.onnx")
    per_tensor = model()
    (tmp_path / "export").mkdir()
    for t in per_tensor.graph.initializer:  # one file per tensor, offset 0, no length: as torch writes them
        (tmp_path / "export" / t.name).write_bytes(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        e = t.external_data.add()
        e.key, e.value = "location", t.name
    (tmp_path / "out").mkdir()
    write_model(per_tensor, tmp_path / "out" / "m.onnx", base_dir=tmp_path / "export")
    want = (tmp_path / "mem" / "m.onnx.data").read_bytes()
    assert (tmp_path / "out" / "m.onnx.data").read_bytes() == want
    assert (tmp_path / "out" / "m.onnx").read_bytes() == (tmp_path / "mem" / "m.onnx").read_bytes()
    # and over the data file it reads from
    write_model(per_tensor, tmp_path / "out" / "m.onnx", base_dir=tmp_path / "out")
    assert (tmp_path / "out" / "m.onnx.data").read_bytes() == want
