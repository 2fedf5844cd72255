"""Human-readable view of a manifest (``ember inspect``)."""
from __future__ import annotations

from pathlib import Path

from ember.engine_format.manifest import MANIFEST_NAME, Manifest, manifest_members, tokenizer_members
from ember.passes.matmul_nbits import summarize_matmuls


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _windows(cfg: dict) -> str:
    windows = cfg.get("layer_windows") or []
    if not any(windows):
        return "full attention"
    sliding = [w for w in windows if w]
    rings = [r for r in cfg.get("kv_rings") or [] if r]
    kv = f" (KV ring of {max(rings)} positions)" if rings else " (KV keeps every position)"
    return f"sliding window {max(sliding)} on {len(sliding)} of {len(windows)} layers{kv}"


def _rope(cfg: dict) -> str:
    if cfg.get("positions") == "learned":
        return "none (learned positions)"
    s = cfg.get("rope_scaling") or {}
    text = f"theta {cfg.get('rope_theta')}" + (f", {s.get('type')} x{s.get('factor')}" if s else "")
    if cfg.get("local_rope_theta"):
        text += f", local theta {cfg['local_rope_theta']}"
    return text


def describe(m: Manifest, folder: Path) -> str:
    lines = [f"Ember engine folder {folder}", f"  kind            {m.kind} (manifest schema {m.schema_version})"]
    model = m.model
    lines.append(f"  model           {model.get('name')} ({model.get('family')}, from {model.get('origin')})")
    cfg = model.get("config") or {}
    if m.kind == "decoder" and isinstance(cfg, dict) and cfg:  # shown as recorded; ember.load checks it
        lines.append(f"  shape           {cfg.get('num_layers')} layers, hidden {cfg.get('hidden_size')}, heads "
                     f"{cfg.get('num_heads')} ({cfg.get('num_kv_heads')} kv), vocab {cfg.get('vocab_size')}, "
                     f"max positions {cfg.get('max_positions')}")
        lines.append(f"  attention       head_dim {cfg.get('head_dim') or '-'}, {_windows(cfg)}, rope {_rope(cfg)}")
        if model.get("fused_decode_refusal") and not m.find_part("decode"):
            lines.append(f"  fused decode    not built: {model['fused_decode_refusal']} (decode runs on the step graph)")
    if m.extra.get("dtype"):
        lines.append(f"  dtype           {m.extra['dtype']}")
    if m.quantization:
        q = m.quantization
        if q.get("format") == "MatMulNBits":  # block-wise weight-only (passes/matmul_nbits.py)
            by_site = ", ".join(f"{site} {scheme}" for site, scheme in (q.get("sites") or {}).items())
            scheme = f"{q.get('scheme')} weight-only" + (f" (by site: {by_site})" if by_site else "")
            lines.append(f"  quantization    {scheme}, MatMulNBits block {q.get('block_size')}, "
                         f"{q.get('method')}, {'symmetric' if q.get('symmetric') else 'zero points'}, "
                         f"accuracy_level {q.get('accuracy_level')}")
            lines.append(f"  weights         {summarize_matmuls(q.get('matmuls') or [])}")
        else:
            lines.append(f"  quantization    {q.get('scheme')} ({q.get('calib_method', '')})")
        if q.get("accuracy"):
            lines.append(f"                  accuracy: {q['accuracy']}")
    if m.extra.get("export_check"):
        c = m.extra["export_check"]
        lines.append(f"  export check    max abs err {c['max_abs_error']:.2e}, max rel err {c['max_rel_error']:.2e}")
    lines.append("  engine parts")
    manifest_members(m, str(folder / MANIFEST_NAME))  # every file record well-formed, or an ArtifactError naming it
    for p in m.parts:
        lines.append(f"    {p.name:<14}{p.backend:<13}{p.file:<22}{_mb(p.total_bytes):>10}  sha256 {p.sha256[:12]}")
        ins = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in p.inputs[:5])
        more = f" (+{len(p.inputs) - 5} more)" if len(p.inputs) > 5 else ""
        lines.append(f"      inputs  {ins}{more}")
        outs = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in p.outputs[:3])
        more = f" (+{len(p.outputs) - 3} more)" if len(p.outputs) > 3 else ""
        lines.append(f"      outputs {outs}{more}")
        pq = p.extra.get("quantization")
        if isinstance(pq, dict):  # a part quantized on its own (the fused decode part: quantize_step.quantize_decode_part)
            lines.append(f"      weights {summarize_matmuls(pq.get('matmuls') or [])} (MatMulNBits, "
                         f"{'symmetric' if pq.get('symmetric') else 'zero points'}, accuracy_level {pq.get('accuracy_level')})")
            chk = pq.get("check") or {}
            if "vs_step_graph_rel_error" in chk:
                vs_torch = f", vs torch {chk['vs_torch_rel_error']:.2e}" if "vs_torch_rel_error" in chk else ""
                lines.append(f"      check   vs the step graph: max rel error {chk['vs_step_graph_rel_error']:.2e} "
                             f"(tolerance {chk.get('tolerance')}){vs_torch}")
        if p.backend == "tensorrt-rtx":  # where the plan runs
            targets = ", ".join("sm" + str(t).replace(".", "") for t in p.extra.get("targets") or []) or "none recorded"
            lines.append(f"      plan    TensorRT-RTX {p.extra.get('tensorrt_rtx')}, runs on {targets} "
                         f"(elsewhere: --backend onnxruntime)")
    for t in m.tables:
        lines.append(f"    table         {t['file']} ({_mb(t['size'])})")
    tokenizer, template = tokenizer_members(m, str(folder / MANIFEST_NAME))
    for label, member in (("tokenizer", tokenizer), ("chat template", template)):
        if member is not None:
            digest = (f"sha256 {member.sha256[:12]}" if member.sha256 else
                      "no sha256 (compiled by an older Ember: recompile for a full check)")
            lines.append(f"  {label:<16}{member.file}  {digest}")
    if isinstance(m.tokenizer, dict) and isinstance(m.tokenizer.get("chat_template"), str):
        lines.append("  chat template   recorded in the manifest")
    b = m.build
    env = ", ".join(f"{k} {b[k]}" for k in ("ember", "onnx", "onnxruntime", "torch", "tensorrt", "cuda") if k in b)
    lines.append(f"  built with      {env}")
    return "\n".join(lines)
