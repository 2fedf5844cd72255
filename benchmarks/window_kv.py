"""KV memory and decode-step time of sliding-window models: window layers in rings vs every position.

Two random-weight models of today's window layouts, built with transformers' own config
classes: a Mistral-shaped one (every layer a sliding window) and a Gemma 3-shaped one (five
sliding layers to one full-attention layer). Each is compiled twice:

- ``ring``: as ``ember compile`` builds it -- each window layer keeps its last M positions
  (its window rounded up to 16), position p at index p % M (docs/models.md);
- ``full``: the layout of folders compiled before rings, every layer keeps every position
  and masks the old ones (the same model compiled with ``ring_size`` patched to 0, which is
  what such folders record: no ``kv_rings``).

Per context length, ``batch`` rows are prefilled with a ``context``-token prompt through the
runtime's executor (the engine's pool, chunked like the engine's prefill), then ``steps``
one-token decode steps are timed. KV bytes are the pool's allocated bytes (deterministic);
step times are the median over the timed steps (run on a quiet host for numbers).

    python benchmarks/window_kv.py [--contexts 1024 4096 8000] [--batch 4] [--steps 16] [--tiny]
        [--out benchmarks/results]
Writes window_kv.{json,md} under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# model_type -> transformers config fields (random weights; shapes of a small deployable model)
SHAPES = {
    "mistral": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=2, head_dim=64, intermediate_size=1536, max_position_embeddings=8192,
                    sliding_window=512),
    "gemma3_text": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=64, intermediate_size=1536, max_position_embeddings=8192,
                        sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=64),
}
TINY = dict(vocab_size=300, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, max_position_embeddings=256, sliding_window=16)


def hf_folder(model_type: str, fields: dict, folder: Path, seed: int = 0) -> Path:
    import torch
    import transformers

    from ember.export.tokenizer_builtin import build_builtin_tokenizer

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=0, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    build_builtin_tokenizer(fields["vocab_size"]).save(str(folder / "tokenizer.json"))
    return folder


@contextlib.contextmanager
def rings(on: bool):
    """Compile with window rings (the default) or with the full layout (no ring for any window)."""
    from ember.models import description

    saved = description.ring_size
    if not on:
        description.ring_size = lambda window: 0
    try:
        yield
    finally:
        description.ring_size = saved


def compile_arm(hf: Path, out: Path, ring: bool) -> Path:
    from ember.compiler.compile import CompileOptions, compile_decoder

    with rings(ring):
        compile_decoder(str(hf), out, CompileOptions(quiet=True))
    return out


def run_arm(folder: Path, batch: int, context: int, steps: int, chunk: int, threads: int | None) -> dict:
    """Prefill ``batch`` rows of ``context`` tokens, then time ``steps`` decode steps."""
    from ember.bench.model import BenchModel

    model = BenchModel(folder, threads=threads)
    ex = model.executor(batch)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.vocab_size, (batch, context)).astype(np.int64)
    for s in range(0, context, chunk):
        n = min(chunk, context - s)
        pos = np.broadcast_to(np.arange(s, s + n, dtype=np.int64), (batch, n)).copy()
        logits = ex.run(0, np.ascontiguousarray(ids[:, s:s + n]), pos, np.full(batch, n, np.int64))
    times = []
    for step in range(steps):
        nxt = logits.argmax(axis=1).astype(np.int64).reshape(batch, 1)
        pos = np.full((batch, 1), context + step, np.int64)
        t = time.perf_counter()
        logits = ex.run(0, nxt, pos, np.ones(batch, np.int64))
        times.append(time.perf_counter() - t)
    pool = ex.pool
    return {"kv_bytes": int(pool.nbytes), "capacity": int(pool.capacity),
            "window_layer_capacity": [int(g.capacity) for g in pool.groups if g.ring],
            "step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8000])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512, help="prefill tokens per call")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (checks the script, numbers mean nothing)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    shapes = {t: {**f, **TINY, **({"sliding_window_pattern": 3} if t == "gemma3_text" else {})} if a.tiny else f
              for t, f in SHAPES.items()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="window-kv-") as tmp:
        for model_type, fields in shapes.items():
            hf = hf_folder(model_type, fields, Path(tmp) / model_type)
            folders = {arm: compile_arm(hf, Path(tmp) / f"{model_type}-{arm}", arm == "ring") for arm in ("ring", "full")}
            for context in a.contexts:
                res = {arm: run_arm(f, a.batch, context, a.steps, a.chunk, a.threads) for arm, f in folders.items()}
                rows.append({"model": model_type, "window": fields["sliding_window"], "context": context,
                             "batch": a.batch, **{f"{arm}_{k}": v for arm, r in res.items() for k, v in r.items()},
                             "kv_ratio_full_over_ring": res["full"]["kv_bytes"] / res["ring"]["kv_bytes"],
                             "step_ratio_full_over_ring": res["full"]["step_ms_median"] / res["ring"]["step_ms_median"]})
                print(json.dumps(rows[-1]), flush=True)
    info = machine_info()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "window_kv.json").write_text(json.dumps({"machine": info, "shapes": shapes, "steps": a.steps,
                                                      "rows": rows}, indent=1))
    lines = [f"# Sliding-window KV: rings vs every position ({machine_line(info)})", "",
             f"batch {a.batch}, {a.steps} timed decode steps after a prefill of `context` tokens; KV = the pool's "
             "allocated bytes; window layers keep = positions per slot of a window layer (ring)", "",
             "| model | window | context | KV full (MiB) | KV ring (MiB) | full / ring | window layers keep | "
             "step full (ms) | step ring (ms) | full / ring |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['window']} | {r['context']} | {r['full_kv_bytes'] / 2**20:.3g} | "
                     f"{r['ring_kv_bytes'] / 2**20:.3g} | {r['kv_ratio_full_over_ring']:.2f}x | "
                     f"{r['ring_window_layer_capacity']} | {r['full_step_ms_median']:.2f} | {r['ring_step_ms_median']:.2f} | "
                     f"{r['step_ratio_full_over_ring']:.2f}x |")
    (a.out / "window_kv.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
