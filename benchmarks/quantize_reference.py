"""Each precision of the trained reference model against its FP32 engine: held-out perplexity and
top-1 agreement (ONNX Runtime, CPU).

The model is the reference LM of docs/reference_model.md (``scripts/train_reference_lm.py`` into
artifacts/reference-lm). Every arm is compiled from that folder with ``compile_decoder`` (what
``ember compile`` runs) and scored on the same held-out token windows through its step graph,
one token per call with the K/V cache carried (``ember.reference.evaluate``): perplexity, its
change against the Ember FP32 engine, and the fraction of predictions whose top-1 token equals
FP32's. Rows the compiler refuses (``--int4-method gptq`` while ONNX Runtime's GPTQ equals RTN)
or that ONNX Runtime cannot run on this machine are recorded with the error, not dropped.

Issue 18's targets: int8-weights >= 99 % top-1 agreement and perplexity within 1 % of FP32;
int4 (best method) >= 95 % and within 5 %.

The mixed rows (``--quantize-sites``: int4 MLP + int8 attention, and the reverse; ``--no-mixed`` skips
them) carry no target.

``--peers`` adds ONNX Runtime GenAI's builder (fp32 and int4, CPU) on the same folder, scored by
one prefill pass per window on its ONNX model (the same windows), as a check of Ember's int4.

Run: nice -n 5 python benchmarks/quantize_reference.py [--model artifacts/reference-lm] [--peers]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_info, machine_line  # noqa: E402
from ember.compiler.compile import CompileOptions, compile_decoder  # noqa: E402
from ember.engine_format.manifest import read_manifest  # noqa: E402
from ember.errors import ConfigError  # noqa: E402
from ember.reference.corpus import build_corpus  # noqa: E402
from ember.reference.evaluate import (WindowScores, encode_texts, engine_scorer, folder_tokenizer,  # noqa: E402
                                      score_windows, token_windows)

RESULTS = Path(__file__).with_name("results")
DEFAULT_MODEL = Path("artifacts/reference-lm")
# scheme -> (minimum top-1 agreement with FP32, maximum |perplexity change|), issue 18
TARGETS = {"int8-weights": (0.99, 0.01), "int4": (0.95, 0.05)}


@dataclass(frozen=True)
class Arm:
    name: str
    options: dict = field(default_factory=dict)  # CompileOptions fields
    target: str | None = None  # key of TARGETS
    note: str = ""
    peer: str | None = None  # ONNX Runtime GenAI builder precision instead of an Ember compile


def ember_arms(block128: bool, variants: bool, mixed: bool = True) -> list[Arm]:
    i4 = {"quantize": "int4"}
    arms = [
        Arm("fp32", {"validate": True}),
        Arm("fp16", {"dtype": "fp16"}),
        Arm("W8A8 (int8)", {"quantize": "int8"}, note="Q/DQ, per-channel weights, calibrated activations"),
        Arm("int8-weights b32", {"quantize": "int8-weights"}, "int8-weights", "MatMulNBits, zero points, LM head FP32"),
    ]
    if block128:
        arms.append(Arm("int8-weights b128", {"quantize": "int8-weights", "block_size": 128}, "int8-weights"))
    arms += [
        Arm("int4 rtn b32", i4, "int4", "MatMulNBits, zero points, LM head FP32"),
        Arm("int4 hqq b32", {**i4, "int4_method": "hqq"}, "int4"),
    ]
    if block128:
        arms += [Arm("int4 rtn b128", {**i4, "block_size": 128}, "int4"),
                 Arm("int4 hqq b128", {**i4, "int4_method": "hqq", "block_size": 128}, "int4")]
    arms.append(Arm("int4 gptq b32", {**i4, "int4_method": "gptq"}, "int4"))
    if variants:
        arms += [
            Arm("int4 rtn b32 symmetric", {**i4, "symmetric": True}, "int4", "no zero points"),
            Arm("int4 rtn b32 + LM head", {**i4, "quantize_lm_head": True}, "int4", "LM head int4 too"),
            Arm("int4 rtn b32 symmetric + LM head", {**i4, "symmetric": True, "quantize_lm_head": True}, "int4",
                "the form ONNX Runtime GenAI's builder writes"),
            Arm("int4 hqq b32 + LM head", {**i4, "int4_method": "hqq", "quantize_lm_head": True}, "int4"),
        ]
    if mixed:  # --quantize-sites: a width per site (docs/quantization.md, "Mixed schemes"); no issue target
        int8_attention = {"attention": "int8-weights"}
        arms += [
            Arm("int4 MLP + int8 attention (rtn b32)", {**i4, "quantize_sites": int8_attention}, note="mixed"),
            Arm("int4 MLP + int8 attention (hqq b32)", {**i4, "int4_method": "hqq", "quantize_sites": int8_attention},
                note="mixed; hqq on the int4 weights, rtn on the int8 ones"),
            Arm("int8 MLP + int4 attention (rtn b32)", {"quantize": "int8-weights", "quantize_sites": {"attention": "int4"}},
                note="mixed"),
        ]
    arms.append(Arm("fp8 (E4M3 W8A8)", {"quantize": "fp8"}, note="Q/DQ FLOAT8E4M3FN"))
    return arms


def peer_arms() -> list[Arm]:
    return [Arm("ONNX Runtime GenAI fp32", peer="fp32"),
            Arm("ONNX Runtime GenAI int4", target="int4", peer="int4",
                note="builder defaults: symmetric RTN b32, accuracy_level 4, LM head int4")]


def heldout_windows(model: Path, window: int, count: int | None) -> np.ndarray:
    tokenizer, eos = folder_tokenizer(model)
    texts = [d.text for d in build_corpus().heldout]
    return token_windows(encode_texts(tokenizer, texts, eos), window, count)


def engine_megabytes(folder: Path) -> float:
    manifest = read_manifest(folder)
    return sum(p.size + sum(e["size"] for e in p.external_data) for p in manifest.parts) / 1e6


def weights_summary(folder: Path) -> str:
    q = read_manifest(folder).quantization or {}
    if q.get("matmuls"):
        from ember.passes.matmul_nbits import summarize_matmuls

        return summarize_matmuls(q["matmuls"])
    return ""


def compile_arm(model: Path, arm: Arm, out: Path) -> dict:
    """Compile one arm; the row's status, compile time, size, or the refusal/failure message."""
    opts = {"validate": False, **arm.options}
    t0 = time.perf_counter()
    try:
        compile_decoder(str(model), out, CompileOptions(quiet=True, **opts))
    except ConfigError as e:  # the compiler's own refusal (e.g. gptq), before any export
        return {"status": "refused", "error": str(e)}
    except Exception as e:  # noqa: BLE001 - one failing arm is reported, the others still run
        return {"status": "failed", "error": f"{type(e).__name__}: {e}", "stage": "compile"}
    return {"status": "ok", "compile_s": round(time.perf_counter() - t0, 1), "engine_mb": round(engine_megabytes(out), 2),
            "weights": weights_summary(out)}


def build_peer(model: Path, arm: Arm, out: Path, work: Path) -> dict:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return {"status": "skipped", "error": "onnxruntime-genai is not installed (pip install onnxruntime-genai)"}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(model), "-i", str(model), "-o", str(out),
           "-p", arm.peer, "-e", "cpu", "-c", str(work / f"cache-{arm.peer}")]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return {"status": "failed", "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                f"exit {done.returncode}", "stage": "build"}
    size = sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6
    return {"status": "ok", "compile_s": round(time.perf_counter() - t0, 1), "engine_mb": round(size, 2)}


def genai_scorer(folder: Path):
    """ONNX Runtime GenAI's decoder ONNX model, one prefill pass per window (empty past)."""
    import onnxruntime as ort

    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / cfg["filename"]), so, providers=["CPUExecutionProvider"])
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]

    def score(windows: np.ndarray) -> np.ndarray:
        b, t = windows.shape
        feed = {"input_ids": windows, "attention_mask": np.ones((b, t), np.int64)}
        for p in pasts:
            feed[p.name] = np.zeros((b, cfg["num_key_value_heads"], 0, cfg["head_size"]),
                                    np.float16 if "float16" in p.type else np.float32)
        return sess.run(["logits"], feed)[0]
    return score


def largest_flipped_margin(fp32: WindowScores, other: WindowScores) -> float | None:
    """The largest FP32 top-1 lead (nats) among the predictions where ``other`` picked another token."""
    flipped = fp32.margin[fp32.top1 != other.top1]
    return round(float(flipped.max()), 4) if flipped.size else None


def verdict(row: dict, fp32: WindowScores) -> str:
    if row["status"] != "ok" or row.get("target") is None:
        return "-"
    min_agree, max_delta = TARGETS[row["target"]]
    ok = row["top1_vs_fp32"] >= min_agree and abs(row["ppl_delta_pct"]) <= 100 * max_delta
    return "PASS" if ok else "FAIL"


def run(args) -> dict:
    model = Path(args.model)
    training = json.loads((model / "training.json").read_text())
    windows = heldout_windows(model, args.window, args.windows)
    print(f"{len(windows)} held-out windows of {args.window} tokens ({windows[:, 1:].size} predictions)", flush=True)
    arms = ember_arms(args.block128, args.variants, args.mixed) + (peer_arms() if args.peers else [])
    if args.only:
        arms = [a for a in arms if a.name == "fp32" or any(s in a.name for s in args.only.split(","))]
    rows: list[dict] = []
    fp32: WindowScores | None = None
    torch_scores = score_windows(model, windows, args.batch)
    with tempfile.TemporaryDirectory(prefix="ember-qref-", dir=args.workdir) as tmp:
        work = Path(tmp)
        for i, arm in enumerate(arms):
            out = work / f"arm{i}"
            row = {"arm": arm.name, "options": arm.options, "target": arm.target, "note": arm.note,
                   "engine": "onnxruntime-genai" if arm.peer else "ember"}
            row.update(build_peer(model, arm, out, work) if arm.peer else compile_arm(model, arm, out))
            if row["status"] == "ok":
                t0 = time.perf_counter()
                try:
                    target = genai_scorer(out) if arm.peer else engine_scorer(out)
                    scores = score_windows(target, windows, args.batch)
                except Exception as e:  # noqa: BLE001 - e.g. an operator this ONNX Runtime cannot run on CPU
                    row.update(status="skipped", error=f"{type(e).__name__}: {e}", stage="run")
                else:
                    fp32 = fp32 or scores
                    r = scores.result
                    row.update(perplexity=round(r.perplexity, 4), nll=r.nll, predictions=r.tokens,
                               ppl_delta_pct=round(100 * (r.perplexity / fp32.result.perplexity - 1), 3),
                               top1_vs_fp32=round(scores.agreement(fp32), 5),
                               top1_vs_fp32_decisive=round(fp32.agreement(scores, args.decisive_margin), 5),
                               largest_flipped_margin=largest_flipped_margin(fp32, scores),
                               top1_vs_torch=round(scores.agreement(torch_scores), 5), score_s=round(time.perf_counter() - t0, 1))
            if fp32 is None:
                raise SystemExit(f"the FP32 engine, every row's reference, did not score: {row['error']}")
            row["verdict"] = verdict(row, fp32)
            shown = (f"ppl {row['perplexity']:.3f} ({row['ppl_delta_pct']:+.2f} %), top-1 {100 * row['top1_vs_fp32']:.2f} % "
                     f"{row['verdict']}" if "perplexity" in row else f"{row['status']}: {row['error'][:200]}")
            print(f"{arm.name}: {shown}", flush=True)
            rows.append(row)
    best = best_int4(rows)
    return {"machine": machine_info(), "model": str(model), "training": training_summary(training),
            "windows": {"count": int(len(windows)), "tokens": args.window, "predictions": int(windows[:, 1:].size),
                        "source": "held-out split of the reference corpus (docs/reference_model.md)"},
            "torch_fp32": {"perplexity": torch_scores.result.perplexity, "nll": torch_scores.result.nll},
            "decisive": {"min_margin_nats": args.decisive_margin,
                         "share_of_predictions": float((fp32.margin >= args.decisive_margin).mean())},
            "targets": {k: {"min_top1": a, "max_ppl_change": d} for k, (a, d) in TARGETS.items()},
            "best_int4": best, "arms": rows, "command": " ".join(["python", "benchmarks/quantize_reference.py"] + sys.argv[1:])}


def best_int4(rows: list[dict]) -> str | None:
    """The Ember int4 row with the highest top-1 agreement (ties: smaller perplexity change)."""
    scored = [r for r in rows if r["target"] == "int4" and r["engine"] == "ember" and "perplexity" in r]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["top1_vs_fp32"], -abs(r["ppl_delta_pct"])))["arm"]


def training_summary(t: dict) -> dict:
    c = t["config"]
    return {"steps": t["steps"], "stopped_by": t["stopped_by"], "train_seconds": t["train_seconds"],
            "parameters": t["parameters"], "heldout_perplexity": t["heldout"]["perplexity"],
            "train_perplexity": t["train"]["perplexity"], "unigram_heldout_perplexity": t["unigram_heldout"]["perplexity"],
            "tokens_seen": t["steps"] * c["batch_size"] * c["seq_len"], "corpus_sha256": t["corpus"]["sha256"],
            "python": t["corpus"]["python_version"], "torch": t["torch"],
            "shape": f"{c['num_layers']} layers, hidden {c['hidden_size']}, heads {c['num_heads']}/{c['num_kv_heads']} kv, "
                     f"MLP {c['intermediate_size']}, vocab {t['tokens']['vocab']}",
            "settings": f"lr {c['lr']}, batch {c['batch_size']} x {c['seq_len']}, seed {c['seed']}", "config": c}


def markdown(doc: dict) -> str:
    t, w = doc["training"], doc["windows"]
    lines = [
        "# Quantization accuracy on the trained reference model (ONNX Runtime, CPU)", "",
        f"Machine: {machine_line(doc['machine'])} (load average {doc['machine']['load_avg_1m_at_start']:.1f} at start)",
        f"Command: `{doc['command']}`", "",
        f"Model: `{doc['model']}` (docs/reference_model.md): {t['shape']}; {t['parameters']:,} parameters; "
        f"{t['steps']} steps ({t['settings']}; {t['tokens_seen']:,} tokens seen, stopped by {t['stopped_by']}) in "
        f"{t['train_seconds']:.0f} s; held-out perplexity {t['heldout_perplexity']:.2f} (train {t['train_perplexity']:.2f}, "
        f"unigram baseline {t['unigram_heldout_perplexity']:.2f}); corpus sha256 {t['corpus_sha256'][:12]} on Python "
        f"{t['python']}, torch {t['torch']}.", "",
        f"Scored on {w['count']} held-out windows of {w['tokens']} tokens ({w['predictions']:,} predictions), every engine "
        f"through its step graph one token per call with the K/V cache carried (ONNX Runtime GenAI rows: one prefill "
        f"pass per window). torch FP32 on the same windows: perplexity {doc['torch_fp32']['perplexity']:.4f}.", "",
        "Targets (issue 18): int8-weights top-1 agreement with FP32 >= 99 % and perplexity within 1 %; int4 >= 95 % "
        "and within 5 %.", "",
        f"| precision | held-out ppl | ppl vs FP32 | top-1 = FP32 | top-1 = FP32, decisive | largest flipped lead | "
        f"top-1 = torch | engine MB | compile s | target | verdict | weights / notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["arms"]:
        tgt = TARGETS.get(r["target"] or "")
        tgt_s = f">= {100 * tgt[0]:.0f} %, <= {100 * tgt[1]:.0f} %" if tgt else "-"
        notes = "; ".join(x for x in (r.get("weights"), r.get("note")) if x)
        if "perplexity" in r:
            flipped = "-" if r["largest_flipped_margin"] is None else f"{r['largest_flipped_margin']:.2f} nats"
            lines.append(f"| {r['arm']} | {r['perplexity']:.3f} | {r['ppl_delta_pct']:+.2f} % | {100 * r['top1_vs_fp32']:.2f} % | "
                         f"{100 * r['top1_vs_fp32_decisive']:.2f} % | {flipped} | {100 * r['top1_vs_torch']:.2f} % | {r['engine_mb']:.1f} | {r['compile_s']:.1f} | {tgt_s} | "
                         f"{r['verdict']} | {notes} |")
        else:
            lines.append(f"| {r['arm']} | {r['status']} | | | | | | | | {tgt_s} | - | {notes} |")
    problems = [r for r in doc["arms"] if "perplexity" not in r]
    if problems:
        lines += ["", "Rows without figures:"]
        lines += [f"- **{r['arm']}** ({r['status']}{', at ' + r['stage'] if r.get('stage') else ''}): {r['error']}"
                  for r in problems]
    lines += ["", f"Best Ember int4 row: {doc['best_int4'] or 'none'}.", "",
              "ppl vs FP32: change of held-out perplexity against the Ember FP32 engine. top-1 = FP32: fraction of "
              "predictions whose top-1 token equals the FP32 engine's; *decisive*: only over the "
              f"{100 * doc['decisive']['share_of_predictions']:.0f} % of predictions where FP32's top-1 logit leads its "
              f"top-2 by >= {doc['decisive']['min_margin_nats']:g} nats (the rest are near-ties, which any "
              "perturbation can flip). Largest flipped lead: the largest FP32 top-1 minus top-2 logit among the "
              "predictions the row changed. Engine MB: the step graph and its weights "
              "(the FP32 embedding, 4.2 MB, included, and the FP32 LM head, 4.2 MB, unless quantized). W8A8 and FP8 carry no issue target."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help=f"reference model folder (default {DEFAULT_MODEL})")
    ap.add_argument("--windows", type=int, help="held-out windows scored (default: all of the held-out split)")
    ap.add_argument("--decisive-margin", type=float, default=1.0,
                    help="FP32 top-1 minus top-2 logit (nats) from which a prediction counts as decisive (default 1)")
    ap.add_argument("--window", type=int, default=128, help="tokens per window (default 128)")
    ap.add_argument("--batch", type=int, default=16, help="windows per scoring call")
    ap.add_argument("--no-block128", dest="block128", action="store_false", help="skip the block-128 rows")
    ap.add_argument("--no-variants", dest="variants", action="store_false",
                    help="skip the int4 variants (symmetric, LM head quantized)")
    ap.add_argument("--no-mixed", dest="mixed", action="store_false",
                    help="skip the mixed rows (--quantize-sites: int4 MLP + int8 attention, and the reverse)")
    ap.add_argument("--peers", action="store_true", help="add ONNX Runtime GenAI's builder (fp32, int4) on the same folder")
    ap.add_argument("--only", help="comma-separated substrings of arm names to run (fp32 always runs)")
    ap.add_argument("--name", default="quantize_reference", help="results file stem")
    ap.add_argument("--workdir", help="where engines are compiled (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not (Path(args.model) / "training.json").is_file():
        print(f"error: {args.model} has no training.json; train it first: python scripts/train_reference_lm.py",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    doc = run(args)
    doc["wall_s"] = round(time.perf_counter() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(doc))
    print(f"wrote {RESULTS / args.name}.json/.md ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
