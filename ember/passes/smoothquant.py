"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights of MatMuls.

For an activation X [..., K] read by MatMuls with constant 2-D weights W [K, N] (one or several,
e.g. q/k/v), per input channel k:
    s_k = max|X_k| ** alpha / max|W_k,:| ** (1 - alpha)       (over every W of the group)
    X' = X / s   (folded into the producer),   W' = diag(s) W
so X' W' = X W exactly, and X' has flatter channels, which per-tensor activation scales need.

Folding cases (the division never costs a run-time op):
  F1 X is a LayerNormalization output with constant scale (and bias): both divided by s.
  F2 X is a Mul output with one constant operand of shape [K] (RMSNorm's weight): divided by s.
Activations without a foldable producer, or read by anything besides the group's MatMuls,
are left as they are (reported as not smoothed).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ember.passes.quant_graph import GraphIndex, all_names, unique_name
from ember.passes.quant_plan import QuantPlan


@dataclass
class SmoothGroup:
    activation: str
    matmuls: list[str] = field(default_factory=list)


@dataclass
class SmoothResult:
    smoothed: list[str] = field(default_factory=list)  # activation tensors smoothed
    not_smoothed: dict[str, str] = field(default_factory=dict)  # activation -> why not
    scales: dict[str, np.ndarray] = field(default_factory=dict)  # activation -> s [K]


def smooth_groups(model: onnx.ModelProto, plan: QuantPlan) -> list[SmoothGroup]:
    """Planned MatMuls with a per-channel 2-D weight, grouped by the activation they read."""
    nodes = {n.name: n for n in model.graph.node}
    groups: dict[str, SmoothGroup] = {}
    for w in plan.weights:
        node = nodes[w.node]
        if node.op_type == "MatMul" and w.input_index == 1 and w.axis == 1:
            groups.setdefault(node.input[0], SmoothGroup(node.input[0])).matmuls.append(node.name)
    return list(groups.values())


def _fold_target(idx: GraphIndex, x: str, k: int) -> tuple[onnx.NodeProto, list[int]] | str:
    """(producer, indices of its constant inputs to divide by s) or the reason X cannot be folded."""
    node = idx.producer.get(x)
    if node is None:
        return "a graph input"
    if node.op_type == "LayerNormalization":  # F1
        ins = [i for i in (1, 2) if i < len(node.input) and node.input[i]]
        if all(idx.is_constant(node.input[i]) and idx.constant(node.input[i]).shape == (k,) for i in ins):
            return node, ins
        return "a LayerNormalization without constant per-channel scale/bias"
    if node.op_type == "Mul":  # F2
        const = [i for i in (0, 1) if idx.is_constant(node.input[i])]
        if len(const) == 1 and idx.constant(node.input[const[0]]).shape == (k,):
            return node, const
    return f"the output of {node.op_type} (only LayerNormalization/Mul-by-weight producers are folded)"


def apply_smoothquant(model: onnx.ModelProto, groups: list[SmoothGroup], channel_amax: dict[str, np.ndarray],
                      alpha: float) -> SmoothResult:
    """Smooth every foldable group in place; ``channel_amax[x]`` is max|X| per channel [K]."""
    idx = GraphIndex.build(model.graph)
    taken = all_names(model)
    result = SmoothResult()
    new_inits: list[onnx.TensorProto] = []
    nodes = {n.name: n for n in model.graph.node}
    for grp in groups:
        readers = {n.name for n in idx.consumers[grp.activation]}
        if readers != set(grp.matmuls) or grp.activation in idx.graph_outputs:
            result.not_smoothed[grp.activation] = "it is also read by ops other than the quantized MatMuls"
            continue
        weights = {m: idx.constant_weight(nodes[m].input[1])[0] for m in grp.matmuls}
        k = next(iter(weights.values())).shape[0]
        target = _fold_target(idx, grp.activation, k)
        if isinstance(target, str):
            result.not_smoothed[grp.activation] = f"it is {target}"
            continue
        x_max = channel_amax[grp.activation].astype(np.float64)
        w_max = np.max(np.concatenate([np.abs(w) for w in weights.values()], axis=1), axis=1).astype(np.float64)
        s = np.power(np.maximum(x_max, 1e-8), alpha) / np.power(np.maximum(w_max, 1e-8), 1.0 - alpha)
        s = np.where((x_max > 0) & (w_max > 0), np.clip(s, 1e-4, 1e4), 1.0).astype(np.float32)
        producer, const_inputs = target
        for i in const_inputs:  # X' = X / s, folded into the producer's constants
            name = unique_name(taken, f"{producer.input[i]}_smoothed")
            new_inits.append(numpy_helper.from_array((idx.constant(producer.input[i]) / s).astype(np.float32), name))
            producer.input[i] = name
        for m, w in weights.items():  # W' = diag(s) W
            name = unique_name(taken, f"{m}.weight_smoothed")
            new_inits.append(numpy_helper.from_array((w * s[:, None]).astype(np.float32), name))
            nodes[m].input[1] = name
        result.smoothed.append(grp.activation)
        result.scales[grp.activation] = s
    model.graph.initializer.extend(new_inits)
    return result


def group_reasons(result: SmoothResult) -> dict[str, int]:
    """How many activations were left unsmoothed, per reason (for the report)."""
    counts: dict[str, int] = defaultdict(int)
    for why in result.not_smoothed.values():
        counts[why] += 1
    return dict(counts)
