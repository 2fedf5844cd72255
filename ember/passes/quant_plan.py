"""Which tensors of a graph get quantized, and how: the plan of the Q/DQ pass (no graph edits).

Rules (docs/design.md §6), each referred to below by its number:
  R1 weights: constant input of Conv (axis 0), ConvTranspose (axis 1; per-tensor when grouped),
     MatMul with a constant 2-D B (axis 1; per-tensor for higher ranks), Gemm B (axis 0 when
     transB=1, else 1). A constant behind Transpose nodes counts (it is folded).
  R2 activations: the data input of each planned op, per tensor. A Q/DQ pair never sits on a
     Concat/Softmax/Reshape/Transpose output: the site moves above single-consumer
     Reshape/Transpose/Squeeze/Unsqueeze/Flatten chains; a Concat output is quantized on every
     Concat input with one shared scale; a Softmax output is not quantized (the op is skipped).
  R3 MatMul with two run-time inputs (attention) only when asked; both inputs per tensor.
  R4 residual Add (two run-time inputs) only when asked; each input its own scale.
  R5 embeddings: Gather from a constant 2-D table (axis 0) when asked; stored int8 per row.
  R6 conv outputs, when asked: a per-tensor Q/DQ on the output of a planned Conv/ConvTranspose
     read by exactly one op (ONNX Runtime then runs DQ->Conv->Q as QLinearConv; with two readers
     it keeps a float Conv that dequantizes its weight every call).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from ember.passes.quant_graph import NO_QDQ_OUTPUT_OPS, ConstantSpec, GraphIndex, unique_name

WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
QUANTIZABLE_OPS = (*WEIGHT_OPS, "Add", "Gather")
_MIN_EMBEDDING_ELEMENTS = 4096


class _ReadOnDemand:
    """A constant of the plan whose value is read when asked (``value``, via its ``read``), not
    held by the plan: a graph whose weights lie in an external file is never in memory all at once."""

    read: Callable[[], np.ndarray]
    shape: tuple[int, ...]

    @property
    def value(self) -> np.ndarray:
        return self.read()

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class WeightSite(_ReadOnDemand):
    """A constant weight to quantize (read on demand)."""

    node: str  # node name
    input_index: int
    tensor: str  # the input's current name (initializer, Constant or Transpose output)
    read: Callable[[], np.ndarray]  # the float32 weight, Transposes folded
    shape: tuple[int, ...]
    axis: int | None  # per-channel axis; None = per tensor


@dataclass
class ActSite:
    """A per-tensor Q/DQ pair on ``tensor``; each (node, input_index) edge reads its own DQ."""

    tensor: str
    edges: list[tuple[str, int]] = field(default_factory=list)
    scale_group: str = ""  # sites with the same group share one scale (Concat inputs); "" = own
    stats_tensor: str = ""  # the tensor whose calibration stats give the scale (default: tensor)

    @property
    def calib_tensor(self) -> str:
        return self.stats_tensor or self.tensor


@dataclass
class EmbeddingSite(_ReadOnDemand):
    node: str
    table: str
    read: Callable[[], np.ndarray]  # the float32 table [V, C]
    shape: tuple[int, ...]


def _reader(idx: GraphIndex, name: str) -> Callable[[], np.ndarray]:
    """Reads constant ``name`` (Transposes folded) as float32 each time it is called."""
    return lambda: idx.constant_weight(name)[0].astype(np.float32)


@dataclass
class QuantPlan:
    weights: list[WeightSite] = field(default_factory=list)
    activations: list[ActSite] = field(default_factory=list)
    embeddings: list[EmbeddingSite] = field(default_factory=list)
    quantized_nodes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why it stays float

    def activation_tensors(self) -> list[str]:
        return sorted({s.calib_tensor for s in self.activations})


@dataclass(frozen=True)
class PlanRules:
    include_ops: tuple[str, ...]
    exclude_ops: tuple[str, ...]
    exclude_names: tuple[str, ...]
    activations: bool  # False: weights only
    activation_matmul: bool
    residual_add: bool
    embeddings: bool
    conv_outputs: bool = False


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _weight_axis(node: onnx.NodeProto, value: ConstantSpec) -> int | None:
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1 if _attr(node, "group", 1) == 1 else None
    if op == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return 1 if value.ndim == 2 else None  # MatMul


def _selected(node: onnx.NodeProto, rules: PlanRules) -> str | None:
    """None when the node may be quantized, else the reason it is left alone."""
    if node.op_type not in rules.include_ops or node.op_type in rules.exclude_ops:
        return f"op type {node.op_type} not selected"
    for pattern in rules.exclude_names:
        if re.search(pattern, node.name):
            return f"name matches exclude pattern {pattern!r}"
    return None


def _act_site(idx: GraphIndex, tensor: str, edge: tuple[str, int], sites: dict[str, ActSite],
              group: str = "", stats: str = "") -> str | None:
    """Plan the Q/DQ for one activation edge (R2). Returns a reason when it cannot be quantized.

    ``group``/``stats``: set for the inputs of a quantized Concat (one scale from its output).
    """
    top = idx.source_through_movement(tensor)
    if top != tensor:  # the pair sits above the movement chain; the chain's first op reads the DQ
        chain = idx.producer[tensor]
        while chain.input[0] != top:
            chain = idx.producer[chain.input[0]]
        edge = (chain.name, 0)
    producer = idx.producer.get(top)
    if idx.is_constant(top):
        return "its input is a constant"
    if producer is not None and producer.op_type in NO_QDQ_OUTPUT_OPS - {"Concat", "Softmax"}:
        return f"its input is a {producer.op_type} output shared with other readers or a graph output"
    if producer is not None and producer.op_type == "Softmax":
        return "its input comes from a Softmax (no Q/DQ on Softmax outputs)"
    if producer is not None and producer.op_type == "Concat":
        if group:
            return "its input is a Concat of a Concat"
        for j, inp in enumerate(producer.input):
            why = _act_site(idx, inp, (producer.name, j), sites, group=f"concat:{top}", stats=top)
            if why:
                return f"{why} (through a Concat)"
        return None
    site = sites.setdefault(f"{top}@{group}" if group else top, ActSite(top, scale_group=group, stats_tensor=stats))
    if edge not in site.edges:
        site.edges.append(edge)
    return None


def plan_quantization(model: onnx.ModelProto, rules: PlanRules, base_dir=None) -> QuantPlan:
    """Walk the graph once and decide every Q/DQ site (see the module docstring). Weights kept in
    external files are read from ``base_dir``, one at a time."""
    taken = {n.name for n in model.graph.node}
    for node in model.graph.node:  # edges are addressed by node name: every node needs one
        if not node.name:
            node.name = unique_name(taken, f"{node.op_type}_{node.output[0]}")
    idx = GraphIndex.build(model.graph, base_dir)
    plan = QuantPlan()
    sites: dict[str, ActSite] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        why = _selected(node, rules)
        if why:
            plan.skipped[node.name] = why
            continue
        weight_ins: list[tuple[int, ConstantSpec]] = []  # (input index, its shape and dtype; read when applied)
        act_ins: list[int] = []
        if node.op_type == "Gather":
            found = idx.constant_weight_spec(node.input[0]) if rules.embeddings else None
            if found is None or found.ndim != 2 or _attr(node, "axis", 0) != 0 or found.size < _MIN_EMBEDDING_ELEMENTS:
                continue  # an index/shape Gather, not an embedding table (R5)
            plan.embeddings.append(EmbeddingSite(node.name, node.input[0], _reader(idx, node.input[0]), found.shape))
            plan.quantized_nodes.append(node.name)
            continue
        if node.op_type == "Add":
            if not (rules.residual_add and rules.activations):
                continue
            if any(idx.is_constant(i) for i in node.input):
                continue  # a bias add, not a residual (R4)
            act_ins = [0, 1]
        else:
            w_idx = 0 if node.op_type == "Gemm" and idx.is_constant(node.input[0]) and not idx.is_constant(node.input[1]) else 1
            if node.op_type == "Gemm" and w_idx == 0:
                plan.skipped[node.name] = "Gemm with a constant A and run-time B is not planned"
                continue
            found = idx.constant_weight_spec(node.input[1])
            if found is not None and found.dtype.kind == "f":
                weight_ins.append((1, found))
                act_ins = [0] if not idx.is_constant(node.input[0]) else []
            elif node.op_type == "MatMul" and not idx.is_constant(node.input[0]) and found is None:
                if not (rules.activation_matmul and rules.activations):
                    plan.skipped[node.name] = "MatMul of two run-time tensors (enable activation_matmul to quantize)"
                    continue
                act_ins = [0, 1]  # R3
            else:
                plan.skipped[node.name] = "its weight is not a float constant"
                continue
        trial = {k: ActSite(v.tensor, list(v.edges), v.scale_group, v.stats_tensor) for k, v in sites.items()}
        reason = None
        if rules.activations:
            for i in act_ins:
                reason = _act_site(idx, node.input[i], (node.name, i), trial)
                if reason:
                    break
        if reason:
            plan.skipped[node.name] = reason
            continue
        if rules.activations and rules.conv_outputs and node.op_type in ("Conv", "ConvTranspose"):  # R6
            out = node.output[0]
            readers = idx.consumers[out]
            if len(readers) == 1 and out not in idx.graph_outputs:
                reader = readers[0]
                _act_site(idx, out, (reader.name, list(reader.input).index(out)), trial)
        sites = trial
        for i, value in weight_ins:
            plan.weights.append(WeightSite(node.name, i, node.input[i], _reader(idx, node.input[i]), value.shape,
                                           _weight_axis(node, value)))
        plan.quantized_nodes.append(node.name)
    plan.activations = list(sites.values())
    return plan
