"""The exporter's whole-graph shape inference sees weights by type only (issue 18: it copied every
weight per reader, half of llama-1b's export time) and exports the same graph as with their values."""
from __future__ import annotations

import contextlib

import pytest
import torch

from ember.export import onnx_export
from ember.export.config import BUILTIN
from ember.export.sources import step_model_class


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_shape_inference_gets_no_weight_values_and_the_graph_is_unchanged(name, tmp_path, monkeypatch):
    cfg = BUILTIN[name]
    torch.manual_seed(0)
    model = step_model_class(cfg.family)(cfg).eval()
    # the tiny models' weights are small: count every float tensor over 16 elements as a weight
    monkeypatch.setattr(onnx_export, "SHAPE_INFERENCE_MAX_VALUE_ELEMENTS", 16)
    seen: list[dict] = []
    real_pass = torch._C._jit_pass_onnx_graph_shape_type_inference

    def recording(graph, params_dict, opset):
        seen.append(dict(params_dict))
        return real_pass(graph, params_dict, opset)

    monkeypatch.setattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", recording)
    lean = onnx_export.export_step_graph(model, cfg, tmp_path)
    assert len(seen) == 2  # once after the ONNX conversion, once after constant folding
    big = [n for params in seen for n, v in params.items() if v.is_floating_point() and v.numel() > 16]
    assert not big, f"shape inference was handed weight values: {big[:5]}"

    monkeypatch.setattr(onnx_export, "weightless_shape_inference", contextlib.nullcontext)
    seen.clear()
    full = onnx_export.export_step_graph(model, cfg, tmp_path)
    assert any(v.is_floating_point() and v.numel() > 16 for params in seen for v in params.values())
    assert lean.SerializeToString() == full.SerializeToString()
