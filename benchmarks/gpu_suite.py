"""Everything the GPU issue must show, in one run on one machine (docs/design.md §8, docs/gpu.md).

Sections (each guarded: a failure is recorded and the next section still runs):
  env          GPU, driver, torch / onnxruntime versions and providers
  bandwidth    device-to-device copy rate (read + write), the roofline's denominator
  compile      MODEL compiled with seeded random weights, FP32 and FP16 (ONNX Runtime)
  correctness  greedy tokens: CUDA FP32 engine vs CPU FP32 engine, same prompts
  fp16         next-token top-1 agreement FP16 vs FP32 on CUDA (teacher-forced on FP32's tokens)
  fusions      which fused kernels ONNX Runtime's CUDA optimizer made of the FP16 graph
  roofline     FP16 decode step at batches 1/16/64/128 vs (weights + live KV) / bandwidth,
               with CUDA graphs where ONNX Runtime accepts them
  serving      the fusion issue's serving harness on the GPU engine (benchmarks/serve.py)

Writes ``OUT/gpu_suite.json`` after every section, and ``gpu_suite.md`` (+ ``gpu_roofline.png``)
at the end; prints the markdown last. ``--small`` swaps in tiny models (a smoke run).
Usage: python benchmarks/gpu_suite.py --out DIR [--model llama-1b] [--sections a,b,...] [--small]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_roofline  # noqa: E402

SECTIONS = ["env", "bandwidth", "compile", "correctness", "fp16", "fusions", "roofline", "serving"]
# FP16 variants measured side by side: ONNX Runtime's default (RMSNorm left to its fused
# kernel) and TensorRT's (RMSNorm statistics kept in an FP32 island).
VARIANTS = {"fp16": ("rope",), "fp16-normfp32": ("norm", "rope")}
FUSED = "fp16-fused"  # the fp16 folder with its fused decode part (GroupQueryAttention) running decode steps


def derive_fp16(src: Path, dst: Path, keep: tuple[str, ...], fused: bool = False) -> None:
    """Write engine folder ``dst``: ``src``'s FP32 step graph through the FP16 pass (plus, with
    ``fused``, the fused decode part built from the same seeded weights, as ``ember compile
    --dtype fp16`` writes it)."""
    import shutil

    import onnx

    from ember.engine_format import manifest as mf
    from ember.engine_format.writer import atomic_folder, write_manifest
    from ember.engine_format.io_specs import io_specs
    from ember.export.onnx_export import save_onnx
    from ember.passes.fp16 import convert_to_fp16

    m = mf.read_manifest(src)
    proto = convert_to_fp16(onnx.load(str(src / "step.onnx")), keep_fp32=keep)
    with atomic_folder(dst) as tmp:
        files = save_onnx(proto, tmp / "step.onnx")
        if (src / "tokenizer").exists():
            shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        ins, outs = io_specs(proto)
        rec = mf.file_record(tmp, "step.onnx")
        m.parts = [mf.EnginePart(name="step", backend="onnxruntime", file="step.onnx", sha256=rec["sha256"],
                                 size=rec["size"], inputs=ins, outputs=outs,
                                 external_data=[mf.file_record(tmp, f) for f in files if f != "step.onnx"],
                                 extra={"dtype": "fp16", "keep_fp32": list(keep)})]
        if fused:
            from ember.compiler.compile import CompileOptions
            from ember.compiler.fused_decode import export_float_decode, fused_decode_part
            from ember.export.sources import resolve_decoder_source
            from ember.progress import StageLog

            source = resolve_decoder_source(m.model["name"], seed=m.model["seed"])
            log = StageLog(total=1)
            options = CompileOptions(dtype="fp16")
            decode = export_float_decode(source, tmp, options)
            part, _ = fused_decode_part(decode, source.config, tmp, options, log)
            m.parts.append(part)
            del source
        m.extra = {**m.extra, "dtype": "fp16", "derived_from": str(src)}
        write_manifest(tmp, m)


class Suite:
    def __init__(self, args):
        self.a = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.art = Path(args.artifacts)
        self.res: dict = {"model": args.model, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                          "sections": {}}
        prior = self.out / "gpu_suite.json"
        if args.resume and prior.exists():  # sections run by earlier calls (one device call may not fit them all)
            self.res["sections"] = json.loads(prior.read_text()).get("sections", {})
        self.t0 = time.perf_counter()

    def save(self) -> None:
        (self.out / "gpu_suite.json").write_text(json.dumps(self.res, indent=2, default=str))

    def run(self, name: str, fn) -> None:
        t = time.perf_counter()
        print(f"== {name} (t={t - self.t0:.0f} s)", flush=True)
        try:
            self.res["sections"][name] = {"ok": True, **(fn() or {})}
        except Exception as e:
            traceback.print_exc()
            self.res["sections"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
        self.res["sections"][name]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"   {name}: {json.dumps(self.res['sections'][name], default=str)[:600]}", flush=True)
        self.save()

    # -- sections --------------------------------------------------------------------------
    def env(self) -> dict:
        import onnxruntime as ort
        import torch

        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
        return {"gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "nvidia_smi": smi, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                "python": platform.python_version(), "cpu_count": os.cpu_count(), "host": platform.platform()}

    def bandwidth(self) -> dict:
        r = gpu_roofline.copy_bandwidth()
        self.bw = r["bytes_per_s"]
        return r

    def compile(self) -> dict:
        """FP32 through ``compile_decoder``; the FP16 variants from its graph (same pass as
        ``ember compile --dtype fp16``, without exporting the model again)."""
        from ember.compiler.compile import CompileOptions, compile_decoder

        out = {}
        for model in (self.a.model, "llama-tiny"):
            t = time.perf_counter()
            f32 = self.art / f"{model}-fp32"
            if not (f32 / "manifest.json").exists():
                compile_decoder(model, f32, CompileOptions(dtype="fp32", seed=0, quiet=True))
            out[f"{model}-fp32"] = round(time.perf_counter() - t, 1)
            for variant, keep in VARIANTS.items():
                t = time.perf_counter()
                dst = self.art / f"{model}-{variant}"
                if not (dst / "manifest.json").exists():
                    derive_fp16(f32, dst, keep, fused=variant == "fp16")
                out[f"{model}-{variant}"] = round(time.perf_counter() - t, 1)
        return {"seconds_per_folder": out, "variants": {k: list(v) for k, v in VARIANTS.items()}}

    def _folder(self, dtype: str) -> Path:
        return self.art / f"{self.a.model}-{dtype}"

    def correctness(self) -> dict:
        import ember

        rng = np.random.default_rng(1)
        vocab = json.loads((self._folder("fp32") / "manifest.json").read_text())["model"]["config"]["vocab_size"]
        prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(3, 40, self.a.correct_prompts)]
        toks = {}
        for device in ("cpu", "cuda:0"):
            t = time.perf_counter()
            with ember.load(self._folder("fp32"), device=device, max_batch=len(prompts)) as eng:
                outs = eng.generate(prompts, max_new_tokens=self.a.correct_tokens, ignore_eos=True)
            toks[device] = [c.token_ids for c in outs]
            print(f"   {device}: {time.perf_counter() - t:.1f} s", flush=True)
        same = [a == b for a, b in zip(toks["cpu"], toks["cuda:0"])]
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                      for a, b in zip(toks["cpu"], toks["cuda:0"])]
        return {"prompts": len(prompts), "new_tokens": self.a.correct_tokens, "identical_sequences": int(sum(same)),
                "first_divergence": first_diff, "all_identical": all(same)}

    def fp16(self) -> dict:
        """Top-1 agreement of each FP16 variant with FP32, teacher-forced on FP32's greedy tokens."""
        from ember.engine_format.manifest import read_manifest
        from ember.runtime.cuda_session import make_cuda_executor

        rows, plen, steps = self.a.fp16_rows, 16, self.a.fp16_steps
        exs = {}
        for name in ("fp32", *VARIANTS):
            f = self._folder(name)
            m = read_manifest(f)
            exs[name] = make_cuda_executor(f, m, m.part("step"), "cuda:0", rows, plen + steps + 1, cuda_graph=False)
        m16 = read_manifest(self._folder("fp16"))
        if m16.find_part("decode"):  # decode steps through the fused (GroupQueryAttention) part
            exs[FUSED] = make_cuda_executor(self._folder("fp16"), m16, m16.part("step"), "cuda:0", rows,
                                            plen + steps + 1, cuda_graph=False, decode_part=m16.find_part("decode"))
        variants = [v for v in exs if v != "fp32"]
        cfg = m.model["config"]
        rng = np.random.default_rng(2)
        ids = rng.integers(0, cfg["vocab_size"], (rows, plen)).astype(np.int64)
        pos = np.tile(np.arange(plen, dtype=np.int64), (rows, 1))
        new = np.full(rows, plen, np.int64)
        stats = {v: {"agree": 0, "ties": 0, "rel": []} for v in variants}
        total = 0
        for step in range(steps + 1):
            l32 = exs["fp32"].run(0, ids, pos, new)
            a32 = l32.argmax(-1)
            srt = np.sort(l32, axis=-1)
            gap = srt[:, -1] - srt[:, -2]
            for v in variants:
                l16 = exs[v].run(0, ids, pos, new)
                a16 = l16.argmax(-1)
                stats[v]["agree"] += int((a32 == a16).sum())
                stats[v]["ties"] += int(((a32 != a16) & (gap < 2e-2 * np.abs(l32).max(-1))).sum())
                stats[v]["rel"].append(float(np.abs(l16 - l32).max() / np.abs(l32).max()))
            total += rows
            ids = a32.reshape(rows, 1).astype(np.int64)  # teacher-forced on FP32's greedy tokens
            pos = (pos[:, -1:] + 1).astype(np.int64)
            new = np.ones(rows, np.int64)
        del exs
        return {"rows": rows, "prompt_tokens": plen, "decode_steps": steps, "compared": total,
                "variants": {v: {"top1_agreement": st["agree"] / total,
                                 "disagreements_within_2pct_of_max_logit_gap": st["ties"],
                                 "logits_rel_error_median": float(np.median(st["rel"])),
                                 "logits_rel_error_max": float(np.max(st["rel"]))} for v, st in stats.items()}}

    def fusions(self) -> dict:
        """Node histogram of each FP16 variant after ONNX Runtime's CUDA optimizer (llama-tiny)."""
        import collections

        import onnx

        from ember.runtime.cuda_session import CudaStepSession

        out = {}
        for v in VARIANTS:
            f = self.art / f"llama-tiny-{v}"
            opt = str(self.out / f"llama-tiny-{v}.opt.onnx")
            s = CudaStepSession(f / "step.onnx", 2, optimized_model_path=opt)
            out[v] = dict(collections.Counter(n.op_type for n in onnx.load(opt).graph.node).most_common())
            del s
            os.remove(opt)
        return out

    def roofline(self) -> dict:
        import torch

        from ember.engine_format.manifest import read_manifest
        from ember.runtime.cuda_session import CudaStepSession, DeviceExecutor, make_cuda_executor

        f = self._folder("fp16")
        m = read_manifest(f)
        bw = getattr(self, "bw", None) or gpu_roofline.copy_bandwidth()["bytes_per_s"]
        batches = self.a.batches
        ex = make_cuda_executor(f, m, m.part("step"), "cuda:0", max(batches), m.model["config"]["max_positions"],
                                cuda_graph=False)
        rows = gpu_roofline.roofline(ex, m, f, batches, self.a.live, bw, steps=self.a.steps)
        res = {"bandwidth": bw, "device": torch.cuda.get_device_name(0), "rows": rows}
        # CUDA graphs: a second session over the same pool, decode replayed from captured graphs.
        g = CudaStepSession(f / m.part("step").file, m.model["config"]["num_layers"], cuda_graph=True)
        res["cuda_graph_status"] = g.cuda_graph_status
        if g.cuda_graph_status == "on":
            gex = DeviceExecutor(g, ex.pool)
            res["rows_cuda_graph"] = gpu_roofline.roofline(gex, m, f, batches, self.a.live, bw, steps=self.a.steps)
        del g
        # the FP32-norm variant, same pool, CUDA graphs when available: the cost of the island
        fv = self._folder("fp16-normfp32")
        gv = CudaStepSession(fv / "step.onnx", m.model["config"]["num_layers"], cuda_graph=True)
        res["normfp32_rows"] = gpu_roofline.roofline(DeviceExecutor(gv, ex.pool), m, f, [1, max(batches)], self.a.live, bw,
                                                     steps=self.a.steps)
        res["normfp32_cuda_graph_status"] = gv.cuda_graph_status
        del gv
        if m.find_part("decode"):  # the fused decode part, same pool: plain launches, then CUDA graphs
            from ember.runtime.cuda_session import CudaDecodeSession

            for graphs in (False, True):
                d = CudaDecodeSession(f / m.part("decode").file, m.model["config"]["num_layers"], cuda_graph=graphs)
                key = "fused_rows_cuda_graph" if graphs else "fused_rows"
                res[key] = gpu_roofline.roofline(DeviceExecutor(ex.session, ex.pool, decode=d), m, f, batches,
                                                 self.a.live, bw, steps=self.a.steps)
                res[key + "_status"] = d.cuda_graph_status
                del d
            self.roof_fused = res["fused_rows_cuda_graph"]
        self.roof = res
        return res

    def serving(self) -> dict:
        try:
            import serve_gpu  # benchmarks/serve_gpu.py: the GPU arms of the fusion issue's harness
        except ImportError as e:
            return {"skipped": f"no serving harness importable ({e})"}
        return serve_gpu.run(self._folder("fp16"), self.a.model, self.out, small=self.a.small)

    # -- report ----------------------------------------------------------------------------
    def report(self) -> str:
        s = self.res["sections"]
        env = s.get("env", {})
        lines = [f"# GPU results: {self.a.model} on {env.get('gpu', '?')} ({env.get('nvidia_smi', '')})", "",
                 f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), onnxruntime-gpu {env.get('onnxruntime')}, "
                 f"{env.get('cpu_count')} CPU cores; run {self.res['started']}", ""]
        if "bandwidth" in s and s["bandwidth"].get("ok"):
            lines.append(f"Device-to-device copy: {s['bandwidth']['bytes_per_s'] / 1e12:.2f} TB/s (read + write)\n")
        c = s.get("correctness", {})
        if c.get("ok"):
            lines.append(f"Correctness: CUDA FP32 vs CPU FP32 greedy, {c['prompts']} prompts x {c['new_tokens']} tokens: "
                         f"{c['identical_sequences']}/{c['prompts']} identical (first divergence per prompt: "
                         f"{c['first_divergence']})\n")
        p = s.get("fp16", {})
        if p.get("ok"):
            for v, st in p["variants"].items():
                regions = list(VARIANTS.get(v, VARIANTS["fp16"]))
                lines.append(f"FP16 ({v}: FP32 regions {regions}) vs FP32 next-token top-1 agreement: "
                             f"{st['top1_agreement']:.4f} over {p['compared']} predictions "
                             f"({st['disagreements_within_2pct_of_max_logit_gap']} of the disagreements were near-ties); "
                             f"logits rel. error median {st['logits_rel_error_median']:.2e}, "
                             f"max {st['logits_rel_error_max']:.2e}\n")
        r = s.get("roofline", {})
        if r.get("ok"):
            lines += [gpu_roofline.markdown(r["rows"], r["bandwidth"], r["device"]), "",
                      f"CUDA graphs: {r['cuda_graph_status']}", ""]
            if r.get("rows_cuda_graph"):
                lines += ["With CUDA graphs:", "", gpu_roofline.markdown(r["rows_cuda_graph"], r["bandwidth"], r["device"]), ""]
            for key, what in (("fused_rows", "plain launches"), ("fused_rows_cuda_graph", "CUDA graphs")):
                if r.get(key):
                    lines += [f"Fused decode part (GroupQueryAttention, K/V in place), {what} "
                              f"({r.get(key + '_status')}):", "",
                              gpu_roofline.markdown(r[key], r["bandwidth"], r["device"]), ""]
            if r.get("normfp32_rows"):
                lines += [f"FP16 variant with the RMSNorm FP32 island (CUDA graphs {r['normfp32_cuda_graph_status']}):", "",
                          gpu_roofline.markdown(r["normfp32_rows"], r["bandwidth"], r["device"]), ""]
        fu = s.get("fusions", {})
        if fu.get("ok"):
            lines.append("ONNX Runtime CUDA-optimized llama-tiny FP16 graphs, node counts: " + "; ".join(
                f"{v}: {sum(c for k, c in h.items())} nodes ({', '.join(f'{k} {c}' for k, c in list(h.items())[:8])})"
                for v, h in fu.items() if isinstance(h, dict)) + "\n")
        if s.get("serving", {}).get("markdown"):
            lines += [s["serving"]["markdown"], ""]
        for name, sec in s.items():
            if not sec.get("ok"):
                lines.append(f"- section {name} FAILED: {sec.get('error')}")
        return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="Ember GPU suite")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--artifacts", default="/tmp/ember-artifacts")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--small", action="store_true", help="smoke run: tiny model, few steps")
    ap.add_argument("--resume", action="store_true", help="keep the sections already in OUT/gpu_suite.json")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 128])
    ap.add_argument("--live", type=int, default=480)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--correct-prompts", type=int, default=8)
    ap.add_argument("--correct-tokens", type=int, default=32)
    ap.add_argument("--fp16-rows", type=int, default=16)
    ap.add_argument("--fp16-steps", type=int, default=64)
    a = ap.parse_args()
    if a.small:
        a.model, a.live, a.steps, a.correct_tokens, a.fp16_steps = "llama-tiny", 100, 10, 16, 16
    suite = Suite(a)
    for name in a.sections.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; choose from {SECTIONS}")
        suite.run(name, getattr(suite, name))
    md = suite.report()
    (suite.out / "gpu_suite.md").write_text(md + "\n")
    if getattr(suite, "roof", None):
        try:
            rows = suite.roof.get("fused_rows_cuda_graph") or suite.roof.get("rows_cuda_graph") or suite.roof["rows"]
            gpu_roofline.plot(rows, suite.out / "gpu_roofline.png", f"{a.model} FP16 decode, {suite.roof['device']}")
        except Exception:
            traceback.print_exc()
    print(md)


if __name__ == "__main__":
    main()
