"""Read an ONNX graph's I/O signature into manifest TensorSpecs, each with its role (``roles``)."""
from __future__ import annotations

import onnx
from onnx import helper

from ember.engine_format.manifest import TensorSpec
from ember.engine_format.roles import role_from_name


def _spec(v: onnx.ValueInfoProto) -> TensorSpec:
    t = v.type.tensor_type
    dims: list[int | str] = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
    dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
    role, layer = role_from_name(v.name)  # Ember's exporters name tensors by their role
    return TensorSpec(name=v.name, dtype=dtype, shape=dims, role=role, layer=layer)


def io_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [_spec(v) for v in model.graph.input if v.name not in inits]
    return inputs, [_spec(v) for v in model.graph.output]
