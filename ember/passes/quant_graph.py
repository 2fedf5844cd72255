"""Graph plumbing shared by the quantization pass: an index of producers/consumers/constants,
opset handling, and an ONNX Runtime session over an in-memory model.

Nothing here decides *what* to quantize (that is ``quant_plan``) or *how* (``quant_insert``).
"""
from __future__ import annotations

import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ember.errors import ConfigError

# Ops that only move or view data: per-tensor quantization commutes with them, so a Q/DQ pair
# belongs *before* them (TensorRT propagates Q/DQ across them; ONNX Runtime's QDQ propagation
# moves the DQ back down to the consumer).
DATA_MOVEMENT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
# Ops whose outputs never get a Q/DQ pair (docs/design.md §6).
NO_QDQ_OUTPUT_OPS = frozenset({"Concat", "Softmax", "Reshape", "Transpose"})
# ONNX Runtime 1.32's ReluQuantRewrite drops a Relu before an FP8 QuantizeLinear as if FP8 could
# not hold negatives (measured: 94% output error on a Relu->Q(FP8) graph); sessions running FP8
# Q/DQ graphs must disable it.
ORT_FP8_DISABLED_OPTIMIZERS = ("ReluQuantRewrite",)
# ONNX protobufs are capped at 2 GiB; above this, sessions load from a temporary folder.
_INLINE_LIMIT = 1800 << 20


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ("" / "ai.onnx") domain the model imports."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ConfigError("the model imports no default-domain opset; re-export it with torch.onnx.export(opset_version=17)")


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert ``model`` to default-domain opset ``target`` (new model) with onnx's version converter."""
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, target)
    except Exception as e:  # the converter raises plain RuntimeErrors with adapter names
        raise ConfigError(
            f"could not convert the model from opset {default_opset(model)} to {target} ({e}); "
            f"re-export it with torch.onnx.export(opset_version={target})"
        ) from e


@dataclass(frozen=True)
class ConstantSpec:
    """A constant's shape and dtype (``GraphIndex.constant_weight_spec``)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class GraphIndex:
    """Producers, consumers and constant values of one graph (a snapshot: rebuild after edits)."""

    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    graph_outputs: set[str] = field(default_factory=set)
    base_dir: str | os.PathLike | None = None  # where initializers kept in external files lie

    @staticmethod
    def build(graph: onnx.GraphProto, base_dir: str | os.PathLike | None = None) -> "GraphIndex":
        idx = GraphIndex(graph, base_dir=base_dir)
        idx.initializers = {t.name: t for t in graph.initializer}
        idx.graph_outputs = {o.name for o in graph.output}
        for node in graph.node:
            for o in node.output:
                idx.producer[o] = node
            for i in node.input:
                if i:
                    idx.consumers[i].append(node)
        return idx

    def _through_identity(self, name: str) -> str:
        node = self.producer.get(name)
        while node is not None and node.op_type == "Identity":  # exporters alias shared weights so
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is an initializer or a Constant node's output (through
        Identity nodes), else None."""
        name = self._through_identity(name)
        if name in self.initializers:
            from ember.export.external_data import read_tensor

            return read_tensor(self.initializers[name], self.base_dir)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def is_constant(self, name: str) -> bool:
        name = self._through_identity(name)
        return name in self.initializers or (name in self.producer and self.producer[name].op_type == "Constant")

    def _behind_transposes(self, name: str) -> tuple[str, list[list[int] | None], list[onnx.NodeProto]] | None:
        """(the constant, the perms, the Transpose nodes) that ``name`` is a chain of Transposes of;
        None when ``name`` is computed at run time."""
        folded: list[onnx.NodeProto] = []
        perms: list[list[int] | None] = []
        cur = name
        while not self.is_constant(cur):
            node = self.producer.get(cur)
            if node is None or node.op_type != "Transpose":
                return None
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            folded.append(node)
            perms.append(perm)
            cur = node.input[0]
        return cur, perms, folded

    def constant_weight(self, name: str) -> tuple[np.ndarray, list[onnx.NodeProto]] | None:
        """A constant weight, possibly behind Transpose nodes of a constant (folded here).

        Returns (value, the Transpose nodes folded) or None when ``name`` is computed at run time.
        """
        found = self._behind_transposes(name)
        if found is None:
            return None
        cur, perms, folded = found
        value = self.constant(cur)
        assert value is not None
        for perm in reversed(perms):
            value = np.transpose(value, perm)
        return np.ascontiguousarray(value), folded

    def constant_weight_spec(self, name: str) -> ConstantSpec | None:
        """The shape and dtype ``constant_weight(name)``'s value has, without reading an initializer's
        bytes (a planner that needs only these need not read a multi-GiB model's weights); None when
        ``name`` is computed at run time."""
        found = self._behind_transposes(name)
        if found is None:
            return None
        cur, perms, _ = found
        t = self.initializers.get(self._through_identity(cur))
        if t is not None:
            spec = ConstantSpec(tuple(int(d) for d in t.dims), np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)))
        else:
            value = self.constant(cur)
            spec = ConstantSpec(value.shape, value.dtype)
        shape = spec.shape
        for perm in reversed(perms):
            shape = tuple(shape[p] for p in perm) if perm else shape[::-1]
        return ConstantSpec(shape, spec.dtype)

    def source_through_movement(self, name: str) -> str:
        """Walk up data-movement ops from ``name`` while each tensor passed is read only by the
        chain and is no graph output; the highest tensor reached.

        A Q/DQ pair placed there sits above the Reshape/Transpose chain instead of on a
        Reshape/Transpose output; the chain's first op is then the reader to rewire (its
        producer's output is read by the chain only, so nothing else sees the rewiring).
        """
        cur = name
        while True:
            node = self.producer.get(cur)
            if node is None or node.op_type not in DATA_MOVEMENT_OPS:
                return cur
            if len(self.consumers[cur]) != 1 or cur in self.graph_outputs or self.is_constant(node.input[0]):
                return cur
            cur = node.input[0]


def topological_order(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` sorted so every input is produced before use; ties keep the given order (Kahn)."""
    import heapq

    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in n.input if x and x not in available and x in producer}
        waiting[i] = len(deps)
        for d in deps:
            readers[d].append(i)
    heap = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        i = heapq.heappop(heap)
        out.append(nodes[i])
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(heap, r)
    if len(out) != len(nodes):
        raise ValueError("the rewritten graph has a cycle")
    return out


def unique_name(taken: set[str], base: str) -> str:
    """``base`` or ``base_N``, not in ``taken``; adds the result to ``taken``."""
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def all_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {t.name for t in g.initializer} | {v.name for v in g.input} | {n.name for n in g.node}
    for node in g.node:
        names.update(node.output)
    return names


def has_fp8(model: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)


def ort_disabled_optimizers(model: onnx.ModelProto) -> list[str]:
    """ONNX Runtime graph optimizers to disable for a Q/DQ graph (``disabled_optimizers=``).

    CommonSubexpressionElimination merges the per-edge Q/DQ pairs of a tensor read by several
    MatMuls (q/k/v, gate/up) back into one shared DQ, which ORT then cannot fuse into
    MatMulIntegerToFloat (measured on llama-tiny: 5 of 15 fused with it, 15 of 15 without).
    MatMulAddFusion turns a 2-D DQ->MatMul + bias Add back into a float Gemm that dequantizes
    its weight every call (see quant_gemm).
    """
    if not any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return []
    return ["CommonSubexpressionElimination", "MatMulAddFusion"] + (list(ORT_FP8_DISABLED_OPTIMIZERS) if has_fp8(model) else [])


def ort_session(model: onnx.ModelProto, threads: int = 0, optimized_path: str | None = None,
                base_dir: str | os.PathLike | None = None):
    """An ONNX Runtime CPU session over ``model``. Weights the model keeps in external files are read
    from ``base_dir`` (mapped, not copied, where page-aligned: ``ember.export.external_data``); a model
    whose in-memory part is too big for one protobuf goes through a temporary folder.

    Q/DQ graphs run with ``ort_disabled_optimizers(model)`` disabled.
    """
    import onnxruntime as ort

    from ember.export.external_data import has_external, is_external, tensor_nbytes, write_model

    disabled = ort_disabled_optimizers(model)
    kwargs = {"disabled_optimizers": disabled} if disabled else {}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    external = has_external(model)
    if external and base_dir is None:
        raise ValueError("the model keeps weights in external files: pass base_dir, the folder they lie in")
    # protobuf cannot even measure a message past 2 GiB (ByteSize raises): count the inline weights instead
    inline = sum(tensor_nbytes(t) for t in model.graph.initializer if not is_external(t))
    if inline < _INLINE_LIMIT:
        if external:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base_dir))
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"], **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # write_model points the tensors it writes at the temporary file
        write_model(copy, os.path.join(tmp, "model.onnx"), base_dir)
        del copy
        return ort.InferenceSession(os.path.join(tmp, "model.onnx"), so, providers=["CPUExecutionProvider"], **kwargs)
