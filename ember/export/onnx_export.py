"""torch -> ONNX export of the decoder step graph, and its check against the torch model.

The exported graph follows the step-graph contract of DESIGN §3 (see ``step_io_names``).
Dynamic dims: ``batch``, ``tokens`` (new tokens per row), ``past`` (KV pool capacity).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ember.export.config import DecoderConfig

OPSET = 17
# ONNX protobufs are capped at 2 GiB: past this many bytes of weights (half the cap, leaving
# room for the graph) ``save_onnx`` writes them to one external data file, ``<name>.data``.
EXTERNAL_DATA_THRESHOLD = 1 << 30


def step_io_names(cfg: DecoderConfig) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "positions", "past_lengths", "new_lengths"]
    outputs = ["logits"]
    for i in range(cfg.num_layers):
        inputs += [f"past_key.{i}", f"past_value.{i}"]
        outputs += [f"new_key.{i}", f"new_value.{i}"]
    return inputs, outputs


def example_step_inputs(cfg: DecoderConfig, batch: int, tokens: int, past: int, past_len: list[int] | None = None,
                        seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
    """Random step inputs: rows with live pasts of ``past_len`` and full ``tokens`` new tokens."""
    g = torch.Generator().manual_seed(seed)
    past_len = past_len if past_len is not None else [min(past, 3 + b) for b in range(batch)]
    pl = torch.tensor(past_len, dtype=torch.int64)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g)
    pos = pl.unsqueeze(1) + torch.arange(tokens).unsqueeze(0)
    nl = torch.full((batch,), tokens, dtype=torch.int64)
    kv = [torch.randn(batch, cfg.num_kv_heads, past, cfg.head_dim, generator=g, dtype=torch.float32).to(dtype)
          for _ in range(2 * cfg.num_layers)]
    return (ids, pos, pl, nl, *kv)


def export_step_graph(model: torch.nn.Module, cfg: DecoderConfig, workdir: str | os.PathLike):
    """Export ``model`` (a *Step module); returns the in-memory ``onnx.ModelProto``.

    ``workdir`` holds the exporter's scratch folder (removed before returning, see ``torch_export``).
    """
    inputs, outputs = step_io_names(cfg)
    dyn = {"input_ids": {0: "batch", 1: "tokens"}, "positions": {0: "batch", 1: "tokens"},
           "past_lengths": {0: "batch"}, "new_lengths": {0: "batch"}, "logits": {0: "batch"}}
    for n in inputs[4:]:
        dyn[n] = {0: "batch", 2: "past"}
    for n in outputs[1:]:
        dyn[n] = {0: "batch", 2: "tokens"}
    args = example_step_inputs(cfg, batch=2, tokens=3, past=5)
    proto = torch_export(model, args, workdir, input_names=inputs, output_names=outputs, dynamic_axes=dyn)
    _name_output_dims(proto, cfg)
    return proto


def torch_export(module: torch.nn.Module, args: tuple, workdir: str | os.PathLike, **export_kw):
    """``torch.onnx.export`` (TorchScript exporter, opset ``OPSET``) into a scratch folder under
    ``workdir``; returns the loaded ``onnx.ModelProto`` with its weights in memory.

    Past 2 GB the exporter writes one external file per tensor (``onnx__MatMul_3349``,
    ``embed_tokens.weight``, ...) beside the graph: they stay in the scratch folder, which is
    removed before returning, so only what ``save_onnx`` writes reaches an engine folder.
    """
    import onnx

    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=workdir))
    try:
        path = scratch / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), opset_version=OPSET, dynamo=False, do_constant_folding=True,
                              **export_kw)
        return onnx.load(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


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


def save_onnx(proto, path: str | os.PathLike, external: bool | None = None) -> list[str]:
    """Save a model; with external data (one ``<name>.data`` file) when asked or past
    ``EXTERNAL_DATA_THRESHOLD``. A ``<name>.data`` left by an earlier save is removed first (onnx
    appends to an existing data file, and a graph saved inline would leave it stray).

    Returns the files written, relative to ``path``'s folder.
    """
    import onnx

    path = Path(path)
    if external is None:
        external = sum(len(i.raw_data) for i in proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data = path.name + ".data"
    (path.parent / data).unlink(missing_ok=True)
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        # saving moved the weights out of ``proto``: read them back so the caller's model stays whole
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(proto, str(path.parent))
        return [path.name, data]
    onnx.save_model(proto, str(path))
    return [path.name]


@dataclass(frozen=True)
class ExportCheck:
    max_abs_error: float
    max_rel_error: float  # max |a-b| / max |b| per output, worst output
    worst_output: str

    def to_dict(self) -> dict:
        return {"max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error, "worst_output": self.worst_output}


def check_against_torch(model: torch.nn.Module, cfg: DecoderConfig, onnx_path: str | os.PathLike) -> ExportCheck:
    """Run the ONNX graph in ONNX Runtime and the torch model on one mixed prefill+past input."""
    import onnxruntime as ort

    inputs, outputs = step_io_names(cfg)
    args = example_step_inputs(cfg, batch=3, tokens=4, past=6, past_len=[0, 6, 2], seed=1)
    args[3][2] = 2  # one row with padding in T
    with torch.no_grad():
        ref = [t.float().numpy() for t in model(*args)]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    got = sess.run(outputs, {n: a.numpy() for n, a in zip(inputs, args)})
    worst = ("", 0.0, 0.0)
    for name, r, g in zip(outputs, ref, got):
        if name.startswith("new_"):  # compare only the valid new tokens of the padded row
            r, g = r[..., :2, :], g[..., :2, :]
        err = float(np.max(np.abs(r - g))) if r.size else 0.0
        rel = err / max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-12)
        if rel >= worst[2]:
            worst = (name, err, rel)
    return ExportCheck(max_abs_error=worst[1], max_rel_error=worst[2], worst_output=worst[0])
