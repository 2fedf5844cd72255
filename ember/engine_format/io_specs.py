"""Read an ONNX graph's I/O signature into manifest TensorSpecs."""
from __future__ import annotations

import onnx
from onnx import helper

from ember.engine_format.manifest import TensorSpec


def _spec(v: onnx.ValueInfoProto) -> TensorSpec:
    t = v.type.tensor_type
    dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
    return TensorSpec(name=v.name, dtype=dtype, shape=dims)


def io_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in inits]
    return inputs, [_spec(v) for v in model.graph.output]
