"""torch -> ONNX export of the decoder step graph, and its check against the torch model.

The exported graph follows the step-graph contract of docs/design.md §3.1 (see ``step_io_names``).
Dynamic dims: ``batch``, ``tokens`` (new tokens per row), ``past`` (KV pool capacity).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ember.export.config import DecoderConfig
from ember.export.external_data import load_all, weight_bytes, write_model
from ember.export.matmul_sites import tag_step_graph

OPSET = 17
# ONNX protobufs are capped at 2 GiB: past this many bytes of weights (half the cap, leaving
# room for the graph) ``save_onnx`` writes them to one external data file, ``<name>.data``.
EXTERNAL_DATA_THRESHOLD = 1 << 30
# The exporter's whole-graph shape inference (``weightless_shape_inference``) is handed only
# parameters up to this many elements, or not floating point: shape arithmetic reads small
# integer tensors (Reshape/Slice/Expand operands), never a weight matrix's values.
SHAPE_INFERENCE_MAX_VALUE_ELEMENTS = 1 << 16


def step_io_names(cfg: DecoderConfig) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "positions", "past_lengths", "new_lengths"]
    if cfg.longrope_switch is not None:  # int64 [B]: 1 = the row's tokens take LongRoPE's long factors
        inputs.append("rope_long")
    outputs = ["logits"]
    for i in range(cfg.num_layers):
        inputs += [f"past_key.{i}", f"past_value.{i}"]
        outputs += [f"new_key.{i}", f"new_value.{i}"]
    return inputs, outputs


def example_step_inputs(cfg: DecoderConfig, batch: int, tokens: int, past: int, past_len: list[int] | None = None,
                        seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """Random step inputs: rows with live pasts of ``past_len`` and full ``tokens`` new tokens
    (LongRoPE models: odd rows take the long factors, ``rope_long``)."""
    g = torch.Generator().manual_seed(seed)
    past_len = past_len if past_len is not None else [min(past, 3 + b) for b in range(batch)]
    pl = torch.tensor(past_len, dtype=torch.int64)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g)
    pos = pl.unsqueeze(1) + torch.arange(tokens).unsqueeze(0)
    nl = torch.full((batch,), tokens, dtype=torch.int64)
    kv = [torch.randn(batch, cfg.num_kv_heads, past, cfg.head_dim, generator=g, dtype=torch.float32).to(dtype)
          for _ in range(2 * cfg.num_layers)]
    extra = (torch.arange(batch, dtype=torch.int64) % 2,) if cfg.longrope_switch is not None else ()
    return (ids, pos, pl, nl, *extra, *kv)


def _step_export_args(cfg: DecoderConfig) -> tuple[tuple, dict]:
    inputs, outputs = step_io_names(cfg)
    dyn = {"input_ids": {0: "batch", 1: "tokens"}, "positions": {0: "batch", 1: "tokens"},
           "past_lengths": {0: "batch"}, "new_lengths": {0: "batch"}, "logits": {0: "batch"}}
    for n in inputs[4:]:
        dyn[n] = {0: "batch", 2: "past"} if n.startswith("past_") else {0: "batch"}  # rope_long: [B]
    for n in outputs[1:]:
        dyn[n] = {0: "batch", 2: "tokens"}
    args = example_step_inputs(cfg, batch=2, tokens=3, past=5)
    return args, {"input_names": inputs, "output_names": outputs, "dynamic_axes": dyn}


def export_step_graph(model: torch.nn.Module, cfg: DecoderConfig, workdir: str | os.PathLike):
    """Export ``model`` (a *Step module); returns the in-memory ``onnx.ModelProto``, weights included.

    ``workdir`` holds the exporter's scratch folder (removed before returning, see ``torch_export``).
    For models that must not be held in memory, ``export_step_graph_file``.
    """
    args, kw = _step_export_args(cfg)
    proto = torch_export(model, args, workdir, **kw)
    _name_output_dims(proto, cfg)
    tag_step_graph(proto, model)
    return proto


def export_step_graph_file(model: torch.nn.Module, cfg: DecoderConfig, path: str | os.PathLike,
                           rewrite: Callable | None = None):
    """Export ``model`` to ``path`` (plus ``<name>.data`` past ``EXTERNAL_DATA_THRESHOLD``) without
    loading the exported weights into memory; returns the graph, whose big weights stay external
    references into that file (``ember.export.external_data``). ``rewrite(proto, base_dir)`` runs on
    the graph before it is written (e.g. the LM-head pass), reading weights from ``base_dir``."""
    path = Path(path)
    args, kw = _step_export_args(cfg)
    with exported(model, args, path.parent, **kw) as (proto, scratch):
        _name_output_dims(proto, cfg)
        tag_step_graph(proto, model, scratch)  # each weight MatMul's site, for --quantize-sites
        if rewrite is not None:
            rewrite(proto, scratch)
        save_onnx(proto, path, base_dir=scratch, keep_in_memory=False)
    return proto


@contextmanager
def exported(module: torch.nn.Module, args: tuple, workdir: str | os.PathLike, **export_kw):
    """``torch.onnx.export`` (TorchScript exporter, opset ``OPSET``) into a scratch folder under
    ``workdir``; yields ``(graph, scratch)``: the graph *without* its weights loaded where the exporter
    wrote them to files (past 2 GB: one file per tensor, ``onnx__MatMul_3349``, ...). The scratch folder
    is removed on exit, so only what ``save_onnx`` writes reaches an engine folder."""
    import onnx

    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=workdir))
    try:
        path = scratch / "model.onnx"
        with warnings.catch_warnings(), weightless_shape_inference():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), opset_version=OPSET, dynamo=False, do_constant_folding=True,
                              **export_kw)
        yield onnx.load(str(path), load_external_data=False), scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def weightless_shape_inference():
    """For the duration, the TorchScript exporter's whole-graph ONNX shape inference
    (``torch._C._jit_pass_onnx_graph_shape_type_inference``, run twice per export) sees the graph's
    weights by type and shape only, not by value.

    Given a parameter's value, that pass copies it into a one-node ONNX model for every node that
    reads it, so a model's weights are serialized again per reader: 36 of llama-1b's 68 s of export
    on the 2-core host (issue 18). Weights are graph inputs of known dtype and shape, so shape
    inference gets the same answer from their types; the parameters it still receives are the
    non-float ones and those of at most ``SHAPE_INFERENCE_MAX_VALUE_ELEMENTS`` elements (the shape
    operands constant folding leaves as initializers). The exported graph is unchanged
    (tests/test_export_shape_inference.py compares it with an export without this)."""
    original = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    if original is None:  # a torch without this pass: nothing to narrow
        yield
        return

    def without_weight_values(graph, params_dict, opset_version):
        small = {name: value for name, value in params_dict.items() if not _is_weight_value(value)}
        return original(graph, small, opset_version)

    torch._C._jit_pass_onnx_graph_shape_type_inference = without_weight_values
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_graph_shape_type_inference = original


def _is_weight_value(value) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.numel() > SHAPE_INFERENCE_MAX_VALUE_ELEMENTS)


def torch_export(module: torch.nn.Module, args: tuple, workdir: str | os.PathLike, **export_kw):
    """As ``exported``, returning the ``onnx.ModelProto`` with its weights in memory."""
    with exported(module, args, workdir, **export_kw) as (proto, scratch):
        return load_all(proto, scratch)


def _name_output_dims(proto, cfg: DecoderConfig) -> None:
    """Give outputs the contract's shapes (the exporter invents dim names for them)."""
    shapes = {"logits": ["batch", cfg.vocab_size]}
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            shapes[f"new_{kind}.{i}"] = ["batch", cfg.num_kv_heads, "tokens", cfg.head_dim]
    for out in proto.graph.output:
        dims = out.type.tensor_type.shape.dim
        for d, want in zip(dims, shapes.get(out.name, [])):
            d.Clear()
            if isinstance(want, str):
                d.dim_param = want
            else:
                d.dim_value = want


def saves_external(proto) -> bool:
    """Whether ``save_onnx`` (unasked) writes ``proto``'s weights to a ``.data`` file: past ``EXTERNAL_DATA_THRESHOLD``."""
    return weight_bytes(proto) > EXTERNAL_DATA_THRESHOLD


def save_onnx(proto, path: str | os.PathLike, external: bool | None = None, base_dir: str | os.PathLike | None = None,
              keep_in_memory: bool = True) -> list[str]:
    """Save a model; its weights to one page-aligned ``<name>.data`` file (``external_data.write_model``)
    when asked or past ``EXTERNAL_DATA_THRESHOLD``, else inline (a stale ``<name>.data`` is removed).
    Weights ``proto`` holds as external references are read from ``base_dir``. After an external save,
    ``keep_in_memory`` reads the weights back so the caller's model stays whole; without it ``proto``
    refers to the new file (read tensors with ``external_data.read_tensor(t, path.parent)``).

    Returns the files written, relative to ``path``'s folder.
    """
    path = Path(path)
    if external is None:
        external = saves_external(proto)
    files = write_model(proto, path, base_dir, external=external)
    if external and keep_in_memory:
        load_all(proto, path.parent)
    return files


@dataclass(frozen=True)
class ExportCheck:
    max_abs_error: float
    max_rel_error: float  # max |a-b| / max |b| per output, worst output
    worst_output: str

    def to_dict(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error, "worst_output": self.worst_output}


@dataclass
class StepReference:
    """The torch model's outputs on one mixed prefill+past input (``torch_step_reference``)."""

    inputs: tuple[np.ndarray, ...]
    outputs: list[np.ndarray]


def torch_step_reference(model: torch.nn.Module, cfg: DecoderConfig) -> StepReference:
    """Run the torch step model on one mixed prefill+past input: three rows, past lengths 0/6/2,
    one row padded in T."""
    args = example_step_inputs(cfg, batch=3, tokens=4, past=6, past_len=[0, 6, 2], seed=1)
    args[3][2] = 2  # one row with padding in T
    with torch.no_grad():
        ref = [t.float().numpy() for t in model(*args)]
    return StepReference(tuple(a.numpy() for a in args), ref)


def check_against_reference(cfg: DecoderConfig, onnx_path: str | os.PathLike, ref: StepReference) -> ExportCheck:
    """Run the ONNX graph in ONNX Runtime on ``ref``'s input and compare with the torch outputs.

    The session does not prepack weights and maps page-aligned external data, so checking a
    multi-GiB graph costs little memory beyond its file."""
    import onnxruntime as ort

    inputs, outputs = step_io_names(cfg)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_prepacking", "1")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    got = sess.run(outputs, dict(zip(inputs, ref.inputs)))
    worst = ("", 0.0, 0.0)
    for name, r, g in zip(outputs, ref.outputs, got):
        if name.startswith("new_"):  # compare only the valid new tokens of the padded row
            r, g = r[..., :2, :], g[..., :2, :]
        err = float(np.max(np.abs(r - g))) if r.size else 0.0
        rel = err / max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-12)
        if rel >= worst[2]:
            worst = (name, err, rel)
    return ExportCheck(max_abs_error=worst[1], max_rel_error=worst[2], worst_output=worst[0])


def check_against_torch(model: torch.nn.Module, cfg: DecoderConfig, onnx_path: str | os.PathLike) -> ExportCheck:
    """Run the ONNX graph in ONNX Runtime and the torch model on one mixed prefill+past input."""
    return check_against_reference(cfg, onnx_path, torch_step_reference(model, cfg))
