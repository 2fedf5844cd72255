"""``ember compile SOURCE --tp N``: per-rank segment engines of a tensor-parallel decoder.

``compile_tp`` shards the torch step model (``ember.export.tp``), exports every rank's
segments to ``rank{r}/{segment}.onnx``, checks that the ranks' graphs, summed the way the
runtime's all-reduce sums them, reproduce the unsharded torch model, and returns one
``EnginePart`` per (rank, segment) with ``extra = {"rank", "segment", "segment_name", "tp"}``.
The caller (``compile_decoder``) writes them into the manifest with the tokenizer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from ember.compiler.decoder_passes import segment_passes
from ember.engine_format import manifest as mf
from ember.engine_format.io_specs import io_specs
from ember.errors import ConfigError, EmberError
from ember.passes.contract import PassContext, run_passes
from ember.export.config import DecoderConfig
from ember.export.onnx_export import example_step_inputs, save_onnx, torch_export
from ember.export.tp import Segment, TPLayout, plan_tp, shard_segments
from ember.progress import StageLog

_DYN = {
    "input_ids": {0: "batch", 1: "tokens"}, "positions": {0: "batch", 1: "tokens"}, "hidden": {0: "batch", 1: "tokens"},
    "past_lengths": {0: "batch"}, "new_lengths": {0: "batch"}, "partial": {0: "batch", 1: "tokens"},
    "logits_shard": {0: "batch"},
}


def _dyn(name: str) -> dict[int, str]:
    if name.startswith(("past_key.", "past_value.")):
        return {0: "batch", 2: "past"}
    if name.startswith(("new_key.", "new_value.")):
        return {0: "batch", 2: "tokens"}
    return _DYN[name]


def _example(seg: Segment, cfg: DecoderConfig, layout: TPLayout) -> tuple[torch.Tensor, ...]:
    ids, pos, pl, nl, *_ = example_step_inputs(cfg, batch=2, tokens=3, past=5)
    g = torch.Generator().manual_seed(0)
    named = {"input_ids": ids, "positions": pos, "past_lengths": pl, "new_lengths": nl,
             "hidden": torch.randn(2, 3, cfg.hidden_size, generator=g)}
    kv = torch.randn(2, layout.kv_heads, 5, cfg.head_dim, generator=g)
    return tuple(named.get(n, kv) for n in seg.inputs)


def export_segment(seg: Segment, cfg: DecoderConfig, layout: TPLayout, path: Path) -> None:
    """torch.onnx export of one segment with the dynamic dims batch/tokens/past."""
    proto = torch_export(seg.module, _example(seg, cfg, layout), path.parent, input_names=seg.inputs,
                         output_names=seg.outputs, dynamic_axes={n: _dyn(n) for n in seg.inputs + seg.outputs})
    for out in proto.graph.output:  # the exporter names RoPE'd K's last dim after a node: it is head_dim
        if out.name.startswith(("new_key.", "new_value.")):
            dims = out.type.tensor_type.shape.dim
            dims[1].dim_value, dims[3].dim_value = layout.kv_heads, cfg.head_dim
    save_onnx(proto, path)


def compile_tp(src, tmp_folder: Path, options, log: StageLog) -> list[mf.EnginePart]:
    """Shard ``src`` (a DecoderSource) over ``options.tp`` ranks into ``tmp_folder/rank{r}/``.

    Returns the engine parts in (rank, segment) order. Raises ConfigError for configs that do
    not shard (see ``plan_tp``) and for options TP does not support yet.
    """
    cfg: DecoderConfig = src.config
    layout = plan_tp(cfg, options.tp)
    if options.backend != "onnxruntime":
        raise ConfigError(f"--tp {options.tp} with --backend {options.backend}: tensor-parallel engines are built for "
                          f"onnxruntime only (its CUDA provider runs them on GPUs); use --backend onnxruntime")
    if options.quantize:
        raise ConfigError(f"--tp {options.tp} with --quantize {options.quantize} is not supported; compile the sharded "
                          f"engine unquantized, or quantize a --tp 1 engine")
    rel_paths: list[list[str]] = []
    with log.stage(f"sharding into {options.tp} ranks and exporting segments"):
        log.note(f"per rank: {layout.heads} query heads, {layout.kv_heads} kv heads"
                 f"{' (replicated)' if layout.kv_replicated else ''}, MLP width {layout.inter}, vocab rows {layout.vocab}")
        per_rank: list[list[Segment]] = []
        for r in range(options.tp):
            segs = shard_segments(src.model, cfg, layout, r)
            per_rank.append(segs)
            (tmp_folder / f"rank{r}").mkdir()
            names = []
            for seg in segs:
                path = tmp_folder / f"rank{r}" / f"{seg.name}.onnx"
                export_segment(seg, cfg, layout, path)
                passes = segment_passes(options)
                if passes:
                    graph, _ = run_passes(passes, onnx.load(str(path)), PassContext(options=options))
                    save_onnx(graph, path)
                names.append(path.relative_to(tmp_folder).as_posix())
            rel_paths.append(names)
    if options.validate:
        with log.stage("validating the sharded graphs against torch"):
            err = check_tp_against_torch(src.model, cfg, tmp_folder, rel_paths)
            log.note(f"max relative error {err:.2e} over logits and K/V")
            if err > options.max_validation_error * (10 if options.dtype == "fp16" else 1):
                raise EmberError(f"the --tp {options.tp} graphs differ from the torch model (relative error {err:.2e}); "
                                 f"this is an Ember sharding bug: please report it with the source")
    parts = []
    with log.stage("recording the per-rank engine parts"):
        from ember.compiler.backends.onnxruntime import check_loads

        for r, names in enumerate(rel_paths):
            for i, rel in enumerate(names):
                check_loads(tmp_folder / rel)
                proto = onnx.load(str(tmp_folder / rel), load_external_data=False)
                inputs, outputs = io_specs(proto)
                rec = mf.file_record(tmp_folder, rel)
                ext = [mf.file_record(tmp_folder, f.relative_to(tmp_folder).as_posix())
                       for f in (tmp_folder / rel).parent.glob(Path(rel).name + ".data")]
                seg_name = per_rank[r][i].name
                parts.append(mf.EnginePart(
                    name=f"rank{r}.{seg_name}", backend="onnxruntime", file=rec["file"], sha256=rec["sha256"],
                    size=rec["size"], inputs=inputs, outputs=outputs, external_data=ext,
                    extra={"rank": r, "segment": i, "segment_name": seg_name, "dtype": options.dtype,
                           "tp": layout.to_dict()}))
    return parts


def compile_tp_folder(src, out, options, log: StageLog, source: str | None = None) -> mf.Manifest:
    """The whole ``--tp N`` compile after the source is loaded: parts, tokenizer, manifest,
    written atomically to ``out`` (called by ``compile_decoder`` when ``options.tp > 1``;
    ``source`` is the model source, which ``out`` may not be or contain)."""
    from ember.engine_format.writer import atomic_folder
    from ember.compiler.compile import options_record, write_decoder_manifest

    log.total = log.i + 3 + int(options.validate)
    with atomic_folder(out, overwrite=options.overwrite, source=source) as tmp:
        parts = compile_tp(src, tmp, options, log)
        m = write_decoder_manifest(src, tmp, parts, log,
                                   extra={"dtype": options.dtype, "tp": parts[0].extra["tp"],
                                          "passes": [{"name": p.name, "on": "every segment"} for p in segment_passes(options)],
                                          "options": options_record(options)})
    size = sum(p.total_bytes for p in parts) / options.tp
    log.note(f"wrote {out} ({options.tp} ranks x {len(parts) // options.tp} segments, {size / 1e6:.1f} MB per rank)")
    return m


def _sessions(folder: Path, rel_paths: list[list[str]]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return [[ort.InferenceSession(str(folder / p), so, providers=["CPUExecutionProvider"]) for p in names]
            for names in rel_paths]


def check_tp_against_torch(model: torch.nn.Module, cfg: DecoderConfig, folder: Path, rel_paths: list[list[str]]) -> float:
    """Run every rank's segments in ONNX Runtime in this process, summing partials as the
    all-reduce does, on a mixed prefill+past input; return the worst relative error of the
    logits and the (re-assembled) K/V against the unsharded torch model."""
    layout = plan_tp(cfg, len(rel_paths))
    args = example_step_inputs(cfg, batch=3, tokens=4, past=6, past_len=[0, 6, 2], seed=1)
    args[3][2] = 2  # one row padded in T
    with torch.no_grad():
        ref = [t.float().numpy() for t in model(*args)]
    feeds = {"input_ids": args[0].numpy(), "positions": args[1].numpy(), "past_lengths": args[2].numpy(),
             "new_lengths": args[3].numpy()}
    full_kv = [a.numpy() for a in args[4:]]
    sess = _sessions(folder, rel_paths)
    hidden = None
    got_kv: list[list[np.ndarray]] = [[None] * len(rel_paths) for _ in full_kv]  # type: ignore[list-item]
    logits = None
    for i in range(len(rel_paths[0])):
        outs = []
        for r in range(layout.tp):
            s = sess[r][i]
            kvh = layout.kv_head_start(r, cfg)
            f = {}
            for inp in s.get_inputs():
                if inp.name.startswith(("past_key.", "past_value.")):
                    layer = int(inp.name.split(".")[1]) * 2 + (inp.name.startswith("past_value"))
                    f[inp.name] = np.ascontiguousarray(full_kv[layer][:, kvh:kvh + layout.kv_heads])
                else:
                    f[inp.name] = hidden if inp.name == "hidden" else feeds[inp.name]
                if inp.type == "tensor(float16)":  # --dtype fp16 segments
                    f[inp.name] = f[inp.name].astype(np.float16)
            res = s.run(None, f)
            names = [o.name for o in s.get_outputs()]
            for n, a in zip(names, res):
                if n.startswith(("new_key.", "new_value.")):
                    layer = int(n.split(".")[1]) * 2 + n.startswith("new_value")
                    got_kv[layer][r] = a.astype(np.float32)
            outs.append(res[0].astype(np.float32))
        if names[0] == "logits_shard":
            logits = np.concatenate(outs, axis=-1)[:, : cfg.vocab_size]
        else:
            hidden = np.sum(outs, axis=0, dtype=np.float32)
    worst = 0.0
    pairs = [(ref[0], logits)]
    for layer, shards in enumerate(got_kv):  # rank r holds kv heads [start, start + kv_heads)
        heads = {}
        for r, a in enumerate(shards):
            for j in range(layout.kv_heads):
                heads.setdefault(layout.kv_head_start(r, cfg) + j, a[:, j])
        pairs.append((ref[1 + layer][..., :2, :], np.stack([heads[h] for h in sorted(heads)], axis=1)[..., :2, :]))
    for r_, g_ in pairs:
        worst = max(worst, float(np.max(np.abs(r_ - g_))) / max(float(np.max(np.abs(r_))), 1e-12))
    return worst

