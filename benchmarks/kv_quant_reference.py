"""Quantized KV pools (``--kv-dtype int8|fp8``, issue 19) on the trained reference language model,
through the paged step graph on the CPU (ONNX Runtime's PagedAttention is CUDA-only, so the graph
runs in ``export/paged_reference.reference_session``: the operator's schema in numpy, quantized
caches stored and read as the schema says).

What it measures: the paged graph of the reference model (FP16, as ``ember compile --dtype fp16
--paged on`` builds it) with an FP16 pool, an int8 pool and an fp8 pool, the quantized pools with the
scales the compile computes (``export/kv_quant``: per-channel bounds from the built-in calibration
prompts through the torch model), teacher-forced over held-out text the model did not train on:
each sequence's first ``--prefill`` tokens in one packed prefill call (prefill path), then one token
per call for every sequence at once (decode path, ``--positions`` per sequence). Per quantized pool,
against the FP16 pool at every scored position: top-1 agreement, the same over decisive rows (the
FP16 top-1/top-2 logit gap above 4x the rms logits error), relative logits error, and held-out
perplexity of each pool (from the next-token logits).

Random-weight models (issue 19's llama-1b) have near-flat logits whose top-1 flips under any
perturbation; this model's logits mean something (docs/reference_model.md).

    python benchmarks/kv_quant_reference.py [--model artifacts/reference-lm] [--sequences 16] [--positions 48]
Writes benchmarks/results/kv_quant_reference.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from machine import machine_info, machine_line  # noqa: E402

RESULTS = Path(__file__).with_name("results")
BLOCK = 16
KV_DTYPES = ("int8", "fp8")


def held_out_sequences(tokenizer, eos_id: int | None, n: int, length: int, offset: float = 0.0) -> list[list[int]]:
    """``n`` windows of ``length`` tokens of the reference corpus's held-out documents, evenly spaced,
    the first ``offset`` (a fraction of the spacing) in."""
    from ember.reference.corpus import build_corpus
    from ember.reference.evaluate import encode_texts

    ids = [int(i) for i in encode_texts(tokenizer, [d.text for d in build_corpus().heldout], eos_id)]
    if len(ids) < n * length:
        raise SystemExit(f"held-out text has {len(ids)} tokens, fewer than {n} x {length}")
    step = len(ids) // n
    first = int(offset * (step - length))
    return [ids[first + i * step:first + i * step + length] for i in range(n)]


def teacher_forced(proto, cfg, kv_dtype: str, seqs: list[list[int]], prefill: int) -> np.ndarray:
    """Next-token logits [positions, sequences, V] (float32) through ``proto`` with pools of
    ``kv_dtype``: one packed prefill call of every sequence's first ``prefill`` tokens, then one
    token per sequence per call."""
    import ml_dtypes

    from ember.export.paged_reference import reference_session
    from ember.export.paged_step import PackedSequence, cache_bindings, packed_inputs

    sess = reference_session(proto)
    np_dtype = {"fp16": np.float16, "int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn}[kv_dtype]
    length = len(seqs[0])
    per_seq = -(-length // BLOCK)
    pools = {name: np.zeros((len(seqs) * per_seq, BLOCK, cfg.num_kv_heads, cfg.head_dim), np_dtype)
             for name, _ in cache_bindings(cfg.num_layers)}
    blocks = [tuple(range(s * per_seq, (s + 1) * per_seq)) for s in range(len(seqs))]
    out = []
    calls = [(0, prefill)] + [(p, p + 1) for p in range(prefill, length - 1)]
    for start, end in calls:
        shares = [PackedSequence(tuple(s[start:end]), start, blocks[i]) for i, s in enumerate(seqs)]
        res = dict(zip(sess.output_names, sess.run(None, {**packed_inputs(shares, BLOCK, max_blocks=per_seq), **pools})))
        for cache_in, cache_out in cache_bindings(cfg.num_layers):
            pools[cache_in] = res[cache_out]
        out.append(res["logits"].astype(np.float32))  # each sequence's last new token's logits
    return np.stack(out)


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare(want: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict:
    """``want``/``got`` [P, S, V] logits; ``targets`` [P, S] the next tokens."""
    err = got - want
    rms_err = float(np.sqrt((err ** 2).mean()))
    top2 = np.sort(want, -1)[..., -2:]
    decisive = (top2[..., 1] - top2[..., 0]) > 4 * rms_err
    agree = got.argmax(-1) == want.argmax(-1)
    rel = np.linalg.norm(err, axis=-1) / np.linalg.norm(want, axis=-1)
    nll = -np.take_along_axis(log_softmax(got), targets[..., None], -1).mean()
    return {"top1_agreement": float(agree.mean()), "rows": int(agree.size),
            "top1_agreement_decisive": float(agree[decisive].mean()) if decisive.any() else None,
            "decisive_rows": int(decisive.sum()), "rel_logits_err_median": float(np.median(rel)),
            "rel_logits_err_max": float(rel.max()), "perplexity": float(np.exp(nll))}


def run(args) -> dict:
    import torch

    from ember.export.kv_quant import calibration_prompts, kv_bounds, kv_cache_dtype, kv_scales
    from ember.export.paged_step import build_paged_graph
    from ember.export.sources import resolve_decoder_source

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    src = resolve_decoder_source(args.model)
    cfg, model = src.config, src.model
    seqs = held_out_sequences(src.tokenizer, cfg.eos_token_id, args.sequences, args.prefill + args.positions + 1,
                              args.window_offset)
    targets = np.array([s[args.prefill:] for s in seqs]).T  # [P, S]: the token after each scored position
    prompts, where = calibration_prompts(src, None, seed=0)
    bounds = [tuple(b * args.bound_margin for b in kv) for kv in kv_bounds(model, cfg, prompts)]
    res = {"machine": machine_info(), "model": args.model, "config": {k: getattr(cfg, k) for k in (
        "num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size")},
        "calibration": {"source": where, "prompts": len(prompts), "tokens": sum(map(len, prompts))},
        "sequences": args.sequences, "prefill": args.prefill, "positions": args.positions, "block_size": BLOCK,
        "granularity": "per-channel", "bound_margin": args.bound_margin, "window_offset": args.window_offset,
        "pools": {}}
    want = teacher_forced(build_paged_graph(model, cfg), cfg, "fp16", seqs, args.prefill)
    nll = -np.take_along_axis(log_softmax(want), targets[..., None], -1).mean()
    res["pools"]["fp16"] = {"perplexity": float(np.exp(nll))}
    for kv in KV_DTYPES:
        proto = build_paged_graph(model, cfg, kv_scales=kv_scales(bounds, kv_cache_dtype(kv)), kv_dtype=kv)
        res["pools"][kv] = compare(want, teacher_forced(proto, cfg, kv, seqs, args.prefill), targets)
        print(f"{kv}: {json.dumps(res['pools'][kv])}", flush=True)
    res["wall_s"] = time.perf_counter() - t0
    return res


def write(res: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    c, p = res["config"], res["pools"]
    lines = [f"# Quantized KV pools on the trained reference model — `{res['model']}`", "",
             f"Machine: {machine_line(res['machine'])}. Model: {c['num_layers']} layers, hidden {c['hidden_size']}, "
             f"heads {c['num_heads']}/{c['num_kv_heads']} kv, head size {c['head_dim']}, vocab {c['vocab_size']}. "
             f"The paged step graph (FP16) run by the numpy PagedAttention reference (`export/paged_reference.py`); "
             f"{res['sequences']} held-out windows, a {res['prefill']}-token packed prefill each, then "
             f"{res['positions']} teacher-forced decode calls of every window at once ({p['int8']['rows']} "
             f"scored rows: the prefill's last token and every decode); blocks of {res['block_size']}; {res['granularity']} scales from "
             f"{res['calibration']['prompts']} calibration prompts ({res['calibration']['source']}, "
             f"{res['calibration']['tokens']} tokens), as `ember compile --kv-dtype` computes them. "
             f"Whole run {res['wall_s']:.0f} s.", "",
             "| KV pool | top-1 agreement vs FP16 pool | decisive rows: agreement (rows) | rel. logits error median / max | "
             "held-out perplexity |", "|---|---|---|---|---|",
             f"| fp16 (reference) | — | — | — | {p['fp16']['perplexity']:.3f} |"]
    for kv in KV_DTYPES:
        r = p[kv]
        dec = "—" if r["top1_agreement_decisive"] is None else f"{r['top1_agreement_decisive']:.2%} ({r['decisive_rows']})"
        lines.append(f"| {kv} | {r['top1_agreement']:.2%} ({r['rows']} rows) | {dec} | {r['rel_logits_err_median']:.2e} / "
                     f"{r['rel_logits_err_max']:.2e} | {r['perplexity']:.3f} "
                     f"({r['perplexity'] / p['fp16']['perplexity'] - 1:+.2%}) |")
    lines += ["", "Issue 19's target: top-1 agreement >= 99 % vs FP16 KV (on llama-1b; its random weights give "
              "85.2 % / 73.0 % on the H100, docs/kv.md).", "",
              "Reproduce: `python scripts/train_reference_lm.py && python benchmarks/kv_quant_reference.py`."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="artifacts/reference-lm", help="the reference model's folder "
                    "(scripts/train_reference_lm.py writes it)")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=16)
    ap.add_argument("--positions", type=int, default=48)
    ap.add_argument("--window-offset", type=float, default=0.0,
                    help="where the windows start, as a fraction of their spacing (another set of held-out windows)")
    ap.add_argument("--bound-margin", type=float, default=1.0,
                    help="multiply the calibration bounds (1 = the compile's scales) before the scales are taken")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="kv_quant_reference")
    args = ap.parse_args()
    from ember.export.sources import is_builtin

    if not is_builtin(args.model) and not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"{args.model}: no model folder; train it with `python scripts/train_reference_lm.py`")
    res = run(args)
    write(res, args.name)
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
