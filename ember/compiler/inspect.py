"""Human-readable view of a manifest (``ember inspect``)."""
from __future__ import annotations

from pathlib import Path

from ember.compiler.manifest import Manifest


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def describe(m: Manifest, folder: Path) -> str:
    lines = [f"Ember engine folder {folder}", f"  kind            {m.kind} (manifest schema {m.schema_version})"]
    model = m.model
    lines.append(f"  model           {model.get('name')} ({model.get('family')}, from {model.get('origin')})")
    cfg = model.get("config") or {}
    if m.kind == "decoder" and cfg:
        lines.append(f"  shape           {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, heads "
                     f"{cfg['num_heads']} ({cfg['num_kv_heads']} kv), vocab {cfg['vocab_size']}, "
                     f"max positions {cfg['max_positions']}")
    if m.extra.get("dtype"):
        lines.append(f"  dtype           {m.extra['dtype']}")
    if m.quantization:
        q = m.quantization
        lines.append(f"  quantization    {q.get('scheme')} ({q.get('calib_method', '')})")
        if q.get("accuracy"):
            lines.append(f"                  accuracy: {q['accuracy']}")
    if m.extra.get("export_check"):
        c = m.extra["export_check"]
        lines.append(f"  export check    max abs err {c['max_abs_error']:.2e}, max rel err {c['max_rel_error']:.2e}")
    lines.append("  engine parts")
    for p in m.parts:
        size = p.size + sum(e["size"] for e in p.external_data)
        lines.append(f"    {p.name:<14}{p.backend:<13}{p.file:<22}{_mb(size):>10}  sha256 {p.sha256[:12]}")
        ins = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in p.inputs[:5])
        more = f" (+{len(p.inputs) - 5} more)" if len(p.inputs) > 5 else ""
        lines.append(f"      inputs  {ins}{more}")
        outs = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in p.outputs[:3])
        more = f" (+{len(p.outputs) - 3} more)" if len(p.outputs) > 3 else ""
        lines.append(f"      outputs {outs}{more}")
    for t in m.tables:
        lines.append(f"    table         {t['file']} ({_mb(t['size'])})")
    if m.tokenizer:
        lines.append(f"  tokenizer       {m.tokenizer.get('file')}")
    b = m.build
    env = ", ".join(f"{k} {b[k]}" for k in ("ember", "onnx", "onnxruntime", "torch", "tensorrt", "cuda") if k in b)
    lines.append(f"  built with      {env}")
    return "\n".join(lines)
