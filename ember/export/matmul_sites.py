"""Which part of the decoder each weight MatMul belongs to: its *site* (attention, mlp, lm_head).

Mixed quantization (``--quantize-sites``, passes/matmul_nbits.py) gives each site its own bits, so
every weight MatMul of the step graph and of the fused decode part must carry its site. The graphs
record it in ``metadata_props["ember.matmul_sites"]``: a JSON map from node name to site, read by
``read_sites`` (nodes keep their names through the FP16 and LM-head passes and ``gemm_to_matmul``).

Where the site comes from:

* the torch step modules' Linear attribute names, Ember's own (``LINEAR_SITES``, the one table);
* the fused decode part (``export/fused_graph.linear``) names its nodes after them, so it tags each
  node as it writes it;
* the exported step graph does not keep them: the TorchScript exporter names a constant-folded weight
  ``onnx::MatMul_429`` and a projection called through a function (``scaled_linear``) ``/layers.0/MatMul``.
  ``tag_step_graph`` matches each weight MatMul/Gemm's initializer to the torch Linear weight it was
  folded from, by value: the exporter transposes it and may scale each output feature by a positive
  constant (the attention score scale ``scaled_linear`` folds into the query rows), so two weights
  match when every sampled output feature's row of one is a positive multiple of the other's.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

SITES = ("attention", "mlp", "lm_head")
METADATA_KEY = "ember.matmul_sites"

# The step modules' Linear attribute names (ember/models/layers.py, gpt2.py) and the fused part's packed
# projection (fused_graph: ``qkv``) -> site. A Linear missing here is left untagged (``tag_step_graph``).
LINEAR_SITES = {
    "q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention", "qkv": "attention",
    "c_attn": "attention", "c_proj": "attention",  # GPT-2
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
    "c_fc": "mlp", "mlp_proj": "mlp",  # GPT-2
    "lm_head": "lm_head",
}
_SAMPLE_ROWS, _SAMPLE_COLS, _RTOL = 32, 16, 1e-3


def linear_site(name: str) -> str | None:
    """The site of a Linear named ``name`` (a module path or a fused-part node name, e.g.
    ``layers.0.q_proj``): looked up by its last component."""
    return LINEAR_SITES.get(name.rsplit(".", 1)[-1])


def write_sites(model: onnx.ModelProto, sites: dict[str, str]) -> None:
    """Record ``sites`` (node name -> site) in ``model``'s metadata, replacing an earlier record."""
    for p in list(model.metadata_props):
        if p.key == METADATA_KEY:
            model.metadata_props.remove(p)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(sites, sort_keys=True))


def read_sites(model: onnx.ModelProto) -> dict[str, str]:
    """The node name -> site map ``write_sites`` recorded (empty for graphs without one)."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    return {}


def tag_step_graph(proto: onnx.ModelProto, model, base_dir=None) -> dict[str, str]:
    """Find and record (``write_sites``) the site of each constant-weight MatMul/Gemm of the exported
    step graph ``proto`` of the torch ``model``; weights kept in external files are read from
    ``base_dir``. A node whose weight matches no Linear, or Linears of two sites, is left untagged.
    ``model``: the torch step module (``torch.nn.Module``) the graph was exported from."""
    from torch import nn

    candidates: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = defaultdict(list)  # [out, in] -> (site, rows)
    for path, module in model.named_modules():
        site = linear_site(path)
        if isinstance(module, nn.Linear) and site is not None:
            w = module.weight.detach().float().numpy()
            candidates[w.shape].append((site, _sample(w)))
    inits = {t.name: t for t in proto.graph.initializer}
    sites = {}
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        t = inits[node.input[1]]
        if len(t.dims) != 2 or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        w = _weight_view(t, base_dir)
        w = w if trans_b else w.T  # torch's [out, in]
        found = {site for site, rows in candidates.get(w.shape, []) if _same_up_to_row_scale(_sample(w), rows)}
        if len(found) == 1:
            sites[node.name] = found.pop()
    write_sites(proto, sites)
    return sites


def _weight_view(t: onnx.TensorProto, base_dir) -> np.ndarray:
    """The weight without reading it whole (only ``_sample``'s entries are): a memory map of its
    external file, or a view of its raw bytes."""
    from ember.export.external_data import external_info, is_external, read_tensor

    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    if is_external(t) and base_dir is not None:
        location, offset, _ = external_info(t)
        return np.memmap(Path(base_dir) / location, dtype=dtype, mode="r", offset=offset, shape=tuple(t.dims))
    if t.raw_data:
        return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
    return read_tensor(t, base_dir)


def _sample(w: np.ndarray) -> np.ndarray:
    """Up to ``_SAMPLE_ROWS`` x ``_SAMPLE_COLS`` entries of an [out, in] weight, spread over it."""
    rows = np.unique(np.linspace(0, w.shape[0] - 1, min(w.shape[0], _SAMPLE_ROWS)).astype(int))
    cols = np.unique(np.linspace(0, w.shape[1] - 1, min(w.shape[1], _SAMPLE_COLS)).astype(int))
    return np.ascontiguousarray(w[np.ix_(rows, cols)], dtype=np.float64)


def _same_up_to_row_scale(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether each row of ``a`` is a positive multiple of the same row of ``b`` (within ``_RTOL``)."""
    dot, bb = (a * b).sum(1), (b * b).sum(1)
    scale = np.divide(dot, bb, out=np.zeros_like(dot), where=bb > 0)
    if np.any((bb > 0) & (scale <= 0)):
        return False
    err = np.abs(a - scale[:, None] * b).max(1)
    return bool(np.all(err <= _RTOL * np.maximum(np.abs(a).max(1), 1e-30)))
