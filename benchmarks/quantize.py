"""INT8/FP8 Q/DQ engines vs FP32 in ONNX Runtime (CPU): speed, file size, accuracy.

Models: gpt2-124m (built-in config, seeded random weights) decode step at batch 32, and a
UNet stand-in with SD-1.x's op mix (Conv/GroupNorm/SiLU/attention MatMuls/time-embedding Gemm).
Arms (quantized forms, see docs/quantization.md):
  fp32          the exported float graph
  int8          Ember's ORT form: W8A8 on weight MatMuls/Gemms (7-bit weights on AVX2 without VNNI),
                one Q/DQ pair per reading edge, session without CommonSubexpressionElimination
  int8-weights  W8 only (DQ on weights, float activations)
  int8-convs    (UNet) int8 plus Q/DQ on every Conv/ConvTranspose input
  int8-convs-qlinear  (UNet) int8-convs plus Q/DQ on single-reader Conv outputs (ORT's QLinearConv form)
  naive-all     Q/DQ on every Conv/ConvTranspose/MatMul/Gemm input + residual Adds + attention
                MatMuls, full-range weights, default ORT session (what a naive pass produces)
Ratios are measured in one run, arms interleaved. Run: flock /tmp/ember-bench.lock python benchmarks/quantize.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ember.export.onnx_export import export_step_graph
from ember.export.sources import resolve_decoder_source
from ember.passes.calibration_data import decoder_step_feeds, default_prompts
from ember.passes.quant_accuracy import accuracy_report
from ember.passes.quant_graph import ort_disabled_optimizers
from ember.passes.quantize import QuantOptions, cpu_int8_needs_reduced_range, quantize_model

RESULTS = Path(__file__).with_name("results")
RR = cpu_int8_needs_reduced_range()
FUSED_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "MatMulNBits", "DynamicQuantizeMatMul",
             "MatMul", "FusedMatMul", "Conv", "FusedConv", "Gemm", "DequantizeLinear", "QuantizeLinear")


def machine() -> str:
    import onnxruntime

    from ember.bench.host import cpu_model

    return (f"{platform.system()} {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, "
            f"onnxruntime {onnxruntime.__version__}")


def arms(scheme_fp8: bool = False) -> dict[str, QuantOptions | None]:
    out: dict[str, QuantOptions | None] = {
        "fp32": None,
        "int8": QuantOptions(reduce_range=RR, include_ops=("MatMul", "Gemm")),
        "int8-weights": QuantOptions(scheme="int8-weights", include_ops=("MatMul", "Gemm")),
        "naive-all": QuantOptions(reduce_range=RR, quantize_residual_add=True, quantize_activation_matmul=True,
                                  include_ops=("Conv", "ConvTranspose", "MatMul", "Gemm")),
    }
    return out


def session(model: onnx.ModelProto, tag: str, naive: bool, workdir: str):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = os.cpu_count() or 1
    so.optimized_model_filepath = os.path.join(workdir, f"{tag}.opt.onnx")
    # arms are interleaved in one process: spinning worker threads of the arm that just ran would
    # steal the cores from the next one (measured: 2 ms vs 14 ms for the same gpt2-tiny session)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    disabled = [] if naive else ort_disabled_optimizers(model)
    path = os.path.join(workdir, f"{tag}.onnx")
    onnx.save_model(model, path)
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    ran = Counter(n.op_type for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)
    return sess, {k: ran[k] for k in FUSED_OPS if ran[k]}, os.path.getsize(path)


def time_arms(sessions: dict, feed: dict, reps: int) -> dict[str, float]:
    """Median seconds per run, arms interleaved so load changes hit every arm alike."""
    for s in sessions.values():
        s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_model(name: str, model: onnx.ModelProto, calib: list, held: list, timing_feed: dict, reps: int,
                workdir: str, logits: str) -> dict:
    rows: dict[str, dict] = {}
    sessions = {}
    for arm, opts in arms().items():
        t0 = time.perf_counter()
        if opts is None:
            q, info = model, {}
        else:
            q, rep = quantize_model(model, calib, opts)
            info = rep.to_dict()
        build_s = time.perf_counter() - t0
        sess, ran, size = session(q, f"{name}-{arm}", arm == "naive-all", workdir)
        acc = accuracy_report(model, q, held, logits_output=logits) if opts is not None else None
        rows[arm] = {"file_bytes": size, "ort_ran": ran, "quantize_s": round(build_s, 2), "quant": info,
                     "accuracy": acc}
        sessions[arm] = sess
        print(f"  {name} {arm}: {size / 1e6:.1f} MB, ORT ran {ran}", flush=True)
    medians = time_arms(sessions, timing_feed, reps)
    for arm, t in medians.items():
        rows[arm]["step_ms"] = t * 1e3
        rows[arm]["speedup_vs_fp32"] = medians["fp32"] / t
        rows[arm]["size_ratio_vs_fp32"] = rows["fp32"]["file_bytes"] / rows[arm]["file_bytes"]
    return rows


# --- gpt2-124m ------------------------------------------------------------------------------

def gpt2(args, workdir: str) -> dict:
    src = resolve_decoder_source(args.decoder)
    model = export_step_graph(src.model, src.config, workdir)
    del src.model
    tok = src.tokenizer
    calib_ids = [tok.encode(p).ids for p in default_prompts("calib")[: args.calib_prompts]]
    held_ids = [tok.encode(p).ids for p in default_prompts("heldout")]
    calib = decoder_step_feeds(model, calib_ids, 96, batch_size=8, decode_steps=2)
    held = decoder_step_feeds(model, held_ids, 64, batch_size=16, decode_steps=args.decode_steps)
    cfg = src.config
    rng = np.random.default_rng(0)
    b, p, live = args.batch, args.past, args.past // 2
    feed = {"input_ids": rng.integers(0, min(cfg.vocab_size, 2000), (b, 1)).astype(np.int64), "positions": np.full((b, 1), live, np.int64),
            "past_lengths": np.full(b, live, np.int64), "new_lengths": np.ones(b, np.int64)}
    for i in range(cfg.num_layers):
        for kv in ("key", "value"):
            feed[f"past_{kv}.{i}"] = rng.standard_normal((b, cfg.num_kv_heads, p, cfg.head_dim)).astype(np.float32)
    rows = bench_model(args.decoder, model, calib, held, feed, args.reps, workdir, "logits")
    return {"model": args.decoder, "timing": f"decode step, batch {b}, pool {p}, {live} live past tokens",
            "accuracy_on": f"{len(held_ids)} held-out prompts: prefill + {args.decode_steps} greedy decode steps",
            "arms": rows}


# --- UNet stand-in -------------------------------------------------------------------------

class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, t):
        h = self.c1(nn.functional.silu(self.n1(x))) + self.t(t)[:, :, None, None]
        return self.skip(x) + self.c2(nn.functional.silu(self.n2(h)))


class Attention(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.out = nn.GroupNorm(8, c), nn.Linear(c, 3 * c), nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        s = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = self.qkv(s).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1) @ v
        return x + self.out(a).transpose(1, 2).reshape(b, c, h, w)


class UNetStandIn(nn.Module):
    """SD-1.x's op mix at small scale: conv_in, 2 down levels (ResBlock+attention), mid, 2 up levels
    with skip Concat, conv_out; time embedding through Linear layers."""

    def __init__(self, ch: int = 64, temb: int = 128):
        super().__init__()
        self.temb = nn.Sequential(nn.Linear(temb, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.d1, self.a1, self.down = ResBlock(ch, ch, temb), Attention(ch), nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.d2, self.a2 = ResBlock(ch, 2 * ch, temb), Attention(2 * ch)
        self.mid = ResBlock(2 * ch, 2 * ch, temb)
        self.u2 = ResBlock(4 * ch, 2 * ch, temb)
        self.up = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2)
        self.u1, self.ua1 = ResBlock(2 * ch, ch, temb), Attention(ch)
        self.norm_out, self.conv_out = nn.GroupNorm(8, ch), nn.Conv2d(ch, 4, 3, padding=1)

    def forward(self, sample, temb):
        t = self.temb(temb)
        h0 = self.conv_in(sample)
        h1 = self.a1(self.d1(h0, t))
        h2 = self.a2(self.d2(self.down(h1), t))
        m = self.mid(h2, t)
        u = self.up(self.u2(torch.cat([m, h2], 1), t))
        u = self.ua1(self.u1(torch.cat([u, h1], 1), t))
        return self.conv_out(nn.functional.silu(self.norm_out(u)))


def unet(args, workdir: str) -> dict:
    torch.manual_seed(0)
    net = UNetStandIn().eval()
    b, hw = 2, args.latent
    path = os.path.join(workdir, "unet.onnx")
    torch.onnx.export(net, (torch.randn(b, 4, hw, hw), torch.randn(b, 128)), path, input_names=["sample", "temb"],
                      output_names=["noise"], opset_version=17, dynamo=False)
    model = onnx.load(path)
    rng = np.random.default_rng(1)

    def feed() -> dict:
        return {"sample": rng.standard_normal((b, 4, hw, hw)).astype(np.float32),
                "temb": rng.standard_normal((b, 128)).astype(np.float32)}

    calib, held = [feed() for _ in range(8)], [feed() for _ in range(4)]
    rows = bench_model("unet", model, calib, held, feed(), args.reps, workdir, logits="")
    # the conv arms: what quantizing convolutions costs or gains in ORT
    extra = {"int8-convs": QuantOptions(reduce_range=RR),
             "int8-convs-qlinear": QuantOptions(reduce_range=RR, quantize_conv_outputs=True)}
    sessions = {"fp32": session(model, "unet-fp32b", False, workdir)[0]}
    for arm, opts in extra.items():
        q, rep = quantize_model(model, calib, opts)
        sess, ran, size = session(q, f"unet-{arm}", False, workdir)
        sessions[arm] = sess
        rows[arm] = {"file_bytes": size, "ort_ran": ran, "quant": rep.to_dict(),
                     "accuracy": accuracy_report(model, q, held, logits_output="")}
    medians = time_arms(sessions, feed(), args.reps)
    for arm in extra:
        rows[arm]["step_ms"] = medians[arm] * 1e3
        rows[arm]["speedup_vs_fp32"] = medians["fp32"] / medians[arm]
        rows[arm]["size_ratio_vs_fp32"] = rows["fp32"]["file_bytes"] / rows[arm]["file_bytes"]
    return {"model": "UNet stand-in (SD-1.x op mix, 64 base channels)", "timing": f"one call, batch {b}, latent {hw}x{hw}",
            "accuracy_on": f"{len(held)} held-out random latents", "arms": rows}


def markdown(result: dict) -> str:
    lines = [f"# Quantization benchmark\n\nMachine: {result['machine']}  \nDate: {result['date']}\n"]
    for part in result["parts"]:
        lines += [f"## {part['model']}\n", f"Timing: {part['timing']}. Accuracy: {part['accuracy_on']}.\n",
                  "| arm | time (ms) | speedup vs fp32 | file (MB) | smaller vs fp32 | max rel error | next-token top-1 agreement | ORT ran |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, r in part["arms"].items():
            acc = r.get("accuracy") or {}
            top1 = f"{acc['top1_agreement']:.2%} of {acc['rows']}" if "top1_agreement" in acc else "-"
            if "top1_agreement_decisive" in acc:
                top1 += f" ({acc['top1_agreement_decisive']:.2%} of {acc['decisive_rows']} decisive)"
            err = f"{acc['max_rel_error']:.2%}" if acc else "-"
            ran = ", ".join(f"{k} {v}" for k, v in r["ort_ran"].items())
            lines.append(f"| {arm} | {r['step_ms']:.1f} | {r['speedup_vs_fp32']:.2f}x | {r['file_bytes'] / 1e6:.1f} | "
                         f"{r['size_ratio_vs_fp32']:.2f}x | {err} | {top1} | {ran} |")
        lines.append("")
    lines.append("Decisive rows: float top-1 leads top-2 by more than 4x the rms logit error of that arm "
                 "(ember.passes.quant_accuracy). Random-weight decoders have many near-ties.")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["parts"]), figsize=(5 * len(result["parts"]), 3.5))
    for ax, part in zip(np.atleast_1d(axes), result["parts"]):
        names = list(part["arms"])
        ax.bar(names, [part["arms"][n]["speedup_vs_fp32"] for n in names], color="tab:blue")
        ax.axhline(1.0, color="gray", lw=1)
        ax.set_title(part["model"][:40], fontsize=9)
        ax.set_ylabel("speedup vs fp32 (ORT CPU)")
        ax.tick_params(axis="x", labelsize=8, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decoder", default="gpt2-124m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--past", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=6)
    ap.add_argument("--calib-prompts", type=int, default=16)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "quantize"))
    args = ap.parse_args(argv)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "reduce_range": RR, "parts": []}
    with tempfile.TemporaryDirectory() as workdir:
        print("gpt2:", flush=True)
        result["parts"].append(gpt2(args, workdir))
        if not args.skip_unet:
            print("unet:", flush=True)
            result["parts"].append(unet(args, workdir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
