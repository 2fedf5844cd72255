"""FP32 -> FP16 conversion of an exported graph, keeping precision-sensitive regions in FP32.

Contract: rewrites ``model`` **in place** and returns it. Every float32 tensor becomes float16
(initializers, Constant values, graph inputs/outputs, node outputs) except:

1. ``norm``: normalisation statistics -- each ReduceMean/ReduceSum/ReduceSumSquare/ReduceL2,
   the square (``Pow(x, 2)`` / ``Mul(x, x)``) feeding it, the scalar chain after it
   (``Add eps``, ``Sqrt``, ``Reciprocal``, ``Div(c, .)``), and, when the square's input x is
   known, the ``x * rstd`` that applies it and a following ``* weight``. ``x*x`` overflows
   FP16 once |x| > 256. On for TensorRT, off for ONNX Runtime (``default_keep_fp32``).
   ONNX ``LayerNormalization`` computes its statistics in float (``stash_type=1``), so it
   needs nothing.
2. ``rope``: every float computation feeding a ``Cos``/``Sin`` (the rotary angles
   ``position * inv_freq``): FP16 spacing is 2.0 at 2048, so angles would be garbage.
   Always on.
3. ``softmax``: ``Softmax`` nodes (off by default: ONNX Runtime's and TensorRT's FP16
   softmax accumulate in float; measured in docs/gpu.md).
4. ``lm_head``: the MatMul/Gemm producing an output named in ``fp32_outputs`` (off by
   default; logits are cast to float32 at the output either way).

Graph outputs named in ``fp32_outputs`` stay float32 (a Cast is appended). A float32
constant read by both FP16 and FP32 nodes keeps its FP32 value and gains an FP16 copy.
Casts are inserted on edges between regions, one per (tensor, type). Value-info is cleared
(ONNX Runtime re-infers it). The kept regions are recorded in ``metadata_props`` under
``ember.fp16``. Graphs with subgraphs (If/Loop) are rejected.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ember.errors import ConfigError
from ember.passes.quant_graph import GraphIndex, all_names, unique_name

REGIONS = ("norm", "rope", "softmax", "lm_head")
# ONNX Runtime fuses the decomposed RMSNorm into SimplifiedLayerNormalization, which
# accumulates in float whatever its I/O type; an FP32 island around it only adds two Casts
# per norm and blocks the residual-add fusion (SkipSimplifiedLayerNormalization). TensorRT's
# strongly typed networks run the graph's types as written, so plans keep the island.
DEFAULT_KEEP_FP32 = ("rope",)
KEEP_FP32_BY_BACKEND = {"onnxruntime": ("rope",), "tensorrt": ("norm", "rope"), "tensorrt-rtx": ("norm", "rope")}


def default_keep_fp32(backend: str) -> tuple[str, ...]:
    """The FP32 regions the FP16 pass keeps for ``backend`` (see KEEP_FP32_BY_BACKEND)."""
    return KEEP_FP32_BY_BACKEND.get(backend, ("norm", "rope"))
FP16_MAX = float(np.finfo(np.float16).max)

_REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"})
_STAT_CHAIN = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Max", "Clip"})
# (op_type, input index) whose input must stay float32 whatever the node's precision.
_FLOAT32_ONLY_INPUTS = {("Resize", 2)}


def convert_to_fp16(model: onnx.ModelProto, keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32,
                    fp32_outputs: tuple[str, ...] = ("logits",)) -> onnx.ModelProto:
    """Convert ``model`` to FP16 in place (see the module docstring); returns ``model``."""
    bad = [r for r in keep_fp32 if r not in REGIONS]
    if bad:
        raise ConfigError(f"keep_fp32 region(s) {bad} unknown; choose from {', '.join(REGIONS)}")
    g = model.graph
    for node in g.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ConfigError(f"node {node.name or node.op_type} has a subgraph ({node.op_type}); the FP16 pass "
                              f"handles flat graphs only: export without control flow")
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            raise ConfigError(f"initializer {t.name} is still in external data; load the model with "
                              f"onnx.load(path) (load_external_data=True) before the FP16 pass")
    dtypes = _value_dtypes(model)
    idx = GraphIndex.build(g)
    kept = _fp32_nodes(idx, dtypes, set(keep_fp32) | {"rope"}, fp32_outputs)
    casts = _rewrite(model, idx, dtypes, kept, set(fp32_outputs))
    by_region: dict[str, int] = defaultdict(int)
    for region in kept.values():
        by_region[region] += 1
    meta = {"keep_fp32": sorted(set(keep_fp32) | {"rope"}), "fp32_nodes": dict(by_region), "casts_inserted": casts,
            "fp32_outputs": list(fp32_outputs)}
    _set_meta(model, "ember.fp16", json.dumps(meta))
    return model


# -- analysis ------------------------------------------------------------------------------

def _value_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value, by shape inference over a weight-free copy (no 2 GiB cap)."""
    g = model.graph
    skel = onnx.ModelProto()
    skel.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import))
    sg = skel.graph
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    inputs = {v.name for v in g.input}
    for t in g.initializer:
        if t.name not in inputs:
            sg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inferred = onnx.shape_inference.infer_shapes(skel, strict_mode=False, data_prop=False)
    out: dict[str, int] = {}
    for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            out[v.name] = v.type.tensor_type.elem_type
    for node in g.node:  # Constant outputs are sometimes left out of value_info
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = a.t.data_type
    return out


def _is_float(dtypes: dict[str, int], name: str) -> bool:
    return dtypes.get(name) == TensorProto.FLOAT


def _fp32_nodes(idx: GraphIndex, dtypes: dict[str, int], regions: set[str],
                fp32_outputs: tuple[str, ...]) -> dict[int, str]:
    """id(node) -> region name, for every node kept in FP32 (see the module docstring)."""
    kept: dict[int, str] = {}
    nodes = list(idx.graph.node)

    def runtime_inputs(node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i and not idx.is_constant(i)]

    if "norm" in regions:  # case 1
        for node in nodes:
            if node.op_type not in _REDUCTIONS or not _is_float(dtypes, node.output[0]):
                continue
            kept[id(node)] = "norm"
            src = idx.producer.get(node.input[0])
            root = None
            if src is not None and len(idx.consumers[src.output[0]]) == 1 and _is_square(idx, src):
                kept[id(src)] = "norm"
                root = src.input[0]
            frontier = [node.output[0]]
            while frontier:
                value = frontier.pop()
                for c in idx.consumers.get(value, []):
                    if id(c) in kept or c.op_type not in _STAT_CHAIN:
                        continue
                    others = [i for i in runtime_inputs(c) if i != value]
                    if all(idx.producer.get(o) is not None and id(idx.producer[o]) in kept for o in others):
                        kept[id(c)] = "norm"
                        frontier.extend(c.output)
                    elif root is not None and c.op_type in ("Mul", "Div") and others == [root]:
                        _keep_normalize(idx, c, kept)
    if "rope" in regions:  # case 2: walk up from Cos/Sin through float-producing nodes
        stack = [n for n in nodes if n.op_type in ("Cos", "Sin") and _is_float(dtypes, n.output[0])]
        while stack:
            node = stack.pop()
            if id(node) in kept and kept[id(node)] == "rope":
                continue
            kept[id(node)] = "rope"
            for i in node.input:
                p = idx.producer.get(i)
                if p is not None and p.op_type != "Constant" and _is_float(dtypes, i):
                    stack.append(p)
    if "softmax" in regions:  # case 3
        for node in nodes:
            if node.op_type in ("Softmax", "LogSoftmax"):
                kept[id(node)] = "softmax"
    if "lm_head" in regions:  # case 4: walk up from the output through views to the matmul
        for name in fp32_outputs:
            cur = idx.producer.get(name)
            while cur is not None and cur.op_type in ("Cast", "Identity", "Reshape", "Squeeze", "Flatten"):
                cur = idx.producer.get(cur.input[0])
            if cur is not None and cur.op_type in ("MatMul", "Gemm"):
                kept[id(cur)] = "lm_head"
    return kept


def _keep_normalize(idx: GraphIndex, node: onnx.NodeProto, kept: dict[int, str]) -> None:
    """Keep ``x * rstd`` (or ``x / std``) and a following ``* weight`` in FP32: the whole
    RMSNorm is then one FP32 island between two Casts, the mixed-precision form that
    ONNX Runtime's SimplifiedLayerNormalization fusion recognises."""
    kept[id(node)] = "norm"
    readers = idx.consumers.get(node.output[0], [])
    if len(readers) == 1 and readers[0].op_type == "Mul":
        other = [i for i in readers[0].input if i != node.output[0]]
        if len(other) == 1 and idx.is_constant(other[0]):
            kept[id(readers[0])] = "norm"


def _is_square(idx: GraphIndex, node: onnx.NodeProto) -> bool:
    if node.op_type == "Pow":
        e = idx.constant(node.input[1])
        return e is not None and e.size == 1 and float(e.reshape(-1)[0]) == 2.0
    return node.op_type == "Mul" and node.input[0] == node.input[1]


# -- rewrite -------------------------------------------------------------------------------

def _to_fp16(a: np.ndarray) -> np.ndarray:
    finite = np.isfinite(a)
    return np.where(finite, np.clip(a, -FP16_MAX, FP16_MAX), a).astype(np.float16)


def _rewrite(model: onnx.ModelProto, idx: GraphIndex, dtypes: dict[str, int], kept: dict[int, str],
             fp32_outputs: set[str]) -> int:
    g = model.graph
    taken = all_names(model)
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    actual: dict[str, int] = {}  # the type each float value has after the rewrite

    def want(node: onnx.NodeProto) -> int:
        return F32 if id(node) in kept else F16

    # Float constants (initializers, Constant nodes): FP16 if any FP16 node reads them; an FP16
    # copy beside the FP32 value when FP32 nodes read them too.
    fp16_copy: dict[str, str] = {}
    inits = {t.name: t for t in g.initializer}
    new_inits: list[onnx.TensorProto] = []
    for name, t in inits.items():
        if t.data_type != F32:
            continue
        readers = {want(c) for c in idx.consumers.get(name, [])}
        if readers == {F16} or not readers:
            arr = _to_fp16(numpy_helper.to_array(t))
            t.CopyFrom(numpy_helper.from_array(arr, name))
            actual[name] = F16
        else:
            actual[name] = F32
            if F16 in readers:
                copy = unique_name(taken, f"{name}/fp16")
                new_inits.append(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(t)), copy))
                fp16_copy[name] = copy
    g.initializer.extend(new_inits)
    for node in g.node:
        if node.op_type == "Constant" and _is_float(dtypes, node.output[0]):
            readers = {want(c) for c in idx.consumers.get(node.output[0], [])}
            if F16 in readers:
                kept.pop(id(node), None)
                _constant_to_fp16(node)
                actual[node.output[0]] = F16
            else:
                actual[node.output[0]] = F32

    for v in g.input:
        if v.type.tensor_type.elem_type == F32 and v.name not in inits:
            if v.name not in fp32_outputs:
                v.type.tensor_type.elem_type = F16
            actual[v.name] = v.type.tensor_type.elem_type

    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def cast_of(value: str, to: int) -> str:
        if to == F16 and value in fp16_copy:
            return fp16_copy[value]
        key = (value, to)
        if key not in casts:
            out = unique_name(taken, f"{value}/to_{'fp16' if to == F16 else 'fp32'}")
            new_nodes.append(helper.make_node("Cast", [value], [out], to=to,
                                              name=unique_name(taken, f"{value}/Cast_{to}")))
            casts[key] = out
        return casts[key]

    for node in list(g.node):
        if node.op_type == "Constant":
            new_nodes.append(node)
            continue
        target = want(node)
        if node.op_type != "Cast":  # Cast reads any type
            for k, name in enumerate(node.input):
                have = actual.get(name)
                if have not in (F32, F16):
                    continue
                need = F32 if (node.op_type, k) in _FLOAT32_ONLY_INPUTS else target
                if have != need:
                    node.input[k] = cast_of(name, need)
        if target == F16:
            _retype_attrs(node)
        for o in node.output:
            if _is_float(dtypes, o):
                actual[o] = target
        new_nodes.append(node)

    for out in g.output:
        if out.type.tensor_type.elem_type != F32:
            continue
        final = F32 if out.name in fp32_outputs else F16
        if actual.get(out.name, F32) != final:
            inner = unique_name(taken, f"{out.name}/pre_cast")
            for n in new_nodes:
                n.output[:] = [inner if o == out.name else o for o in n.output]
                n.input[:] = [inner if i == out.name else i for i in n.input]
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], to=final,
                                              name=unique_name(taken, f"{out.name}/Cast")))
        out.type.tensor_type.elem_type = final

    from ember.passes.quant_graph import topological_order

    available = {v.name for v in g.input} | {t.name for t in g.initializer}
    ordered = topological_order(new_nodes, available)
    del g.node[:]
    g.node.extend(ordered)
    del g.value_info[:]
    return len(casts) + sum(1 for o in g.output if o.name in fp32_outputs)


def _constant_to_fp16(node: onnx.NodeProto) -> None:
    for a in node.attribute:
        if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(a.t)), a.t.name))


def _retype_attrs(node: onnx.NodeProto) -> None:
    """Float32 type attributes of an FP16 node: Cast(to), ConstantOfShape(value), dtype attrs."""
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
            a.i = TensorProto.FLOAT16
        elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
            a.t.CopyFrom(numpy_helper.from_array(_to_fp16(numpy_helper.to_array(a.t)), a.t.name))
        elif a.name == "dtype" and a.i == TensorProto.FLOAT:
            a.i = TensorProto.FLOAT16


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def fp16_report(model: onnx.ModelProto) -> dict | None:
    """What ``convert_to_fp16`` recorded in ``model`` (None if it was not converted)."""
    for p in model.metadata_props:
        if p.key == "ember.fp16":
            return json.loads(p.value)
    return None
