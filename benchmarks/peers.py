"""Ember vs the tools a user would pick instead, on the same Hugging Face LLaMA weights, in one run.

Arms (each precision in --precisions; each optional peer skipped with the reason where missing):
  Ember                 compile_decoder at fp32 / int8-weights / int4 (a precision Ember's compile
                        options reject is skipped with their message)
  ONNX Runtime GenAI    its model builder (-p fp32|int8|int4 -e cpu), decoded through its Generator
  llama.cpp             GGUF written from the safetensors (ember/bench/peers/gguf_llama.py), quantized
                        to Q8_0 / Q4_K_M through llama_cpp's llama_model_quantize, decoded via its C API
  transformers          torch FP32 greedy generate
Every arm is built in its own process (build s, build RSS from wait4) and run in another (peak RSS),
on the same random prompts (token ids), greedy, no early stop. Metrics: ember/bench/peers/timing.py.

Smoke run (tiny shape, ~2-3 min):   python benchmarks/peers.py --shape smoke --name peers_smoke
Full run (TinyLlama shape, long):   flock /tmp/ember-bench.lock python benchmarks/peers.py --shape tinyllama --plot
Own folder:                         python benchmarks/peers.py --hf PATH/TO/LLAMA_FOLDER --name peers_mymodel
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info, machine_line  # noqa: E402

from ember.bench.peers.arms import ENGINES, PRECISIONS, parse_list, plan_arms, run_arm  # noqa: E402
from ember.bench.peers.folder import SHAPES, save_random_llama  # noqa: E402
from ember.bench.peers.timing import agreement, markdown_table  # noqa: E402

RESULTS = Path(__file__).with_name("results")


def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime-genai", "llama-cpp-python", "gguf", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def plot(rows: list[dict], batch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if not r.get("skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(ran) + 1.5))
    for ax, key, title in ((axes[0], "b1_ms_per_token", "batch 1 ms/token (lower is better)"),
                           (axes[1], "batch_decode_tok_s", f"batch {batch} decode tok/s (higher is better)")):
        ax.barh([r["arm"] for r in ran][::-1], [r[key] for r in ran][::-1],
                color=["C0" if r["engine"] == "ember" else "C7" for r in ran][::-1])
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", help="a local Hugging Face LLaMA folder (default: a random one of --shape)")
    ap.add_argument("--shape", default="smoke", choices=sorted(SHAPES), help="shape of the random folder without --hf")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pp-len", type=int, default=128, help="prompt tokens of the prompt-processing measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="threads for every arm (default: each engine's own)")
    ap.add_argument("--timeout-s", type=float, default=3600, help="per build or run process")
    ap.add_argument("--name", default=None, help="results file stem (default: peers_<shape>)")
    ap.add_argument("--workdir", default=None, help="where engines are built (default: a temporary folder)")
    ap.add_argument("--plot", action="store_true")
    args = ap.parse_args(argv)
    precisions = parse_list(args.precisions, PRECISIONS, "--precisions")
    engines = parse_list(args.engines, ENGINES, "--engines")
    name = args.name or f"peers_{'custom' if args.hf else args.shape}"
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="ember-peers-", dir=args.workdir) as tmp:
        work = Path(tmp)
        hf = Path(args.hf) if args.hf else save_random_llama(args.shape, work / "hf")
        cfg = json.loads((hf / "config.json").read_text())
        workload = {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": args.batch,
                    "pp_len": args.pp_len, "reps": args.reps, "threads": args.threads, "seed": 0,
                    "vocab_size": cfg["vocab_size"]}
        rows = []
        for arm in plan_arms(precisions, engines):
            if arm.skipped:
                print(f"{arm.name}: skipped ({arm.skipped})", flush=True)
                rows.append({"arm": arm.name, "engine": arm.engine, "precision": arm.precision, "skipped": arm.skipped})
                continue
            t0 = time.perf_counter()
            try:
                row = run_arm(arm, hf, work, workload, args.timeout_s)
            except Exception as e:  # noqa: BLE001 - one failing peer is reported, the others still run
                row = {"arm": arm.name, "engine": arm.engine, "precision": arm.precision, "skipped": f"failed: {e}"}
            print(f"{arm.name}: {row.get('skipped') or {k: row[k] for k in ('b1_ms_per_token', 'batch_decode_tok_s', 'prompt_tok_s')}}"
                  f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            rows.append(row)
    ref = next((r.get("b1_tokens") for r in rows if r["engine"] == "transformers" and not r.get("skipped")), None)
    for r in rows:
        if not r.get("skipped"):
            r["agree_vs_hf"] = agreement(r["b1_tokens"], ref)
    model = (f"{args.hf or f'random-weight LLaMA, shape {args.shape!r}'}: {cfg['num_hidden_layers']} layers, hidden "
             f"{cfg['hidden_size']}, heads {cfg['num_attention_heads']}/{cfg.get('num_key_value_heads')} kv, "
             f"vocab {cfg['vocab_size']}")
    doc = {"machine": info, "versions": peer_versions(), "model": model, "workload": workload, "arms": rows}
    smoke = args.shape == "smoke" and not args.hf
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1))
    title = "# Peers: Ember vs ONNX Runtime GenAI, llama.cpp, transformers" + (" (SMOKE RUN, tiny shape)" if smoke else "")
    md = [title, "", f"Machine: {machine_line(info)}", f"Versions: {', '.join(f'{k} {v}' for k, v in doc['versions'].items() if v)}",
          f"Model: {model}",
          f"Workload: prompts of {args.prompt_len} token ids, {args.new_tokens} new tokens, greedy, no early stop; "
          f"prompt processing on {args.pp_len} tokens; median of {args.reps}; threads: {args.threads or 'each engine default'}",
          "", markdown_table(rows, args.batch), "",
          "b1 ms/token and b{0} tok/s are decode only (after each prompt's first token; end-to-end b{0} tok/s with prefill "
          "is `batch_e2e_tok_s` in the JSON). Peak RSS: the run process; build s / build RSS: the build process "
          "(Ember: compile with export validation; llama.cpp: GGUF write + quantize). greedy = HF: batch-1 greedy tokens "
          "equal to transformers' (random weights: a tie-break can differ at low precision).".format(args.batch)]
    if smoke:
        md.insert(1, "\nA smoke run on a tiny random shape: it shows the harness works end to end; its numbers say "
                     "nothing about real-size speed. The TinyLlama-shape run is `--shape tinyllama`.\n")
    (RESULTS / f"{name}.md").write_text("\n".join(md) + "\n")
    if args.plot:
        plot(rows, args.batch, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
