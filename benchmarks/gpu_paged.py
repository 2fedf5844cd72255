"""The paged step graph (ember/export/paged_step.py) on ONNX Runtime's CUDA provider: tokens
against Ember's CPU engine, decode ms per step at several batch sizes, peak device memory.

The graph's K/V pools are torch tensors [num_blocks, block_size, Hkv, D] per layer, bound
through IOBinding as both ``key_cache.i`` and ``key_cache_out.i`` (PagedAttention updates them
in place and requires one buffer). Blocks are handed out from a shuffled free list, so no
sequence's blocks are contiguous.

Sections (each in its own try/except: one failure still reports the rest):
  env       versions, device, the installed PagedAttention schema's inputs
  tokens    greedy generations of a few prompts (one packed prefill call, then packed decodes)
            vs the CPU step-graph engine (``ember.load`` of a compiled folder), and the prefill
            logits vs the torch model
  decode    median ms per decode step at each batch (``--live`` cached tokens per sequence), the
            same for the fused GroupQueryAttention decode part over a slot pool (today's arm)
  prefill   ms for one packed call of 1 x 512 and 16 x 128 prompt tokens
  memory_inline  torch.cuda.max_memory_allocated (pools, logits) and nvidia-smi's used memory, in this process
  graphs    decode ms/step of the runtime's paged session without / with CUDA graphs vs the fused GQA part
            with them, --graph-batches (gpu_paged_graphs.py); in --dry-run graphs on vs off on the reference
  memory    nvidia-smi's used memory of the old vs new session options, one process per arm, vs the
            runtime's memory plan (gpu_paged_graphs.py); in --dry-run the plan alone
  kv_quant  --kv-dtypes int8 / fp8 pools (scales from the compile's calibration, ``compile.paged_kv_scales``):
            top-1 agreement with FP16 KV per position, teacher-forced (the FP16 run's greedy tokens fed
            to both), and decode ms/step at each batch; in --dry-run on the numpy reference

Device: ``python benchmarks/gpu_paged.py --model llama-tiny --out $OUT`` (then ``--model llama-1b``); the CUDA
graphs and memory work alone: ``--model llama-1b --skip tokens decode prefill gqa kv_quant``.
Here (no GPU): ``python benchmarks/gpu_paged.py --dry-run`` builds the graphs and runs the token
check through the numpy reference of the operator (ember/export/paged_reference.py).
Writes OUT/gpu_paged[_MODEL].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.export.paged_step import (HOST_BOUNDS, PAGED_FILE, PackedSequence, build_paged_graph,  # noqa: E402
                                     cache_bindings, packed_inputs)
from gpu_paged_graphs import (dry_graphs, graphs_section, markdown_lines, memory_section,  # noqa: E402
                              nvidia_smi_used_mib)


class BlockPool:
    """Blocks handed out from a shuffled free list as sequences grow."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0):
        self.block_size = block_size
        self.free = [int(b) for b in np.random.default_rng(seed).permutation(num_blocks)]
        self.owned: dict[int, list[int]] = {}

    def share(self, seq: int, past: int, tokens: list[int]) -> PackedSequence:
        blocks = self.owned.setdefault(seq, [])
        while len(blocks) * self.block_size < past + len(tokens):
            if not self.free:
                raise RuntimeError("block pool exhausted: raise --num-blocks")
            blocks.append(self.free.pop())
        return PackedSequence(tuple(tokens), past, tuple(blocks))


class ReferenceRunner:
    """The graph on the numpy reference (CPU): pools are numpy arrays, replaced after each call."""

    def __init__(self, proto, cfg, num_blocks: int, block_size: int, host_bounds: bool):
        from ember.export.paged_reference import reference_session
        from ember.export.paged_step import cache_np_dtype

        self.sess, self.cfg, self.block_size, self.host_bounds = reference_session(proto), cfg, block_size, host_bounds
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.pools = {name: np.zeros(shape, cache_np_dtype(proto)) for name, _ in cache_bindings(cfg.num_layers)}

    def step(self, shares: list[PackedSequence], max_blocks: int | None = None) -> np.ndarray:
        outs = dict(zip(self.sess.output_names,
                        self.sess.run(None, {**packed_inputs(shares, self.block_size, max_blocks,
                                                             host_bounds=self.host_bounds), **self.pools})))
        for cache_in, cache_out in cache_bindings(self.cfg.num_layers):
            self.pools[cache_in] = outs[cache_out]
        return outs["logits"]


def cuda_session(path: Path):
    """An ONNX Runtime session on the CUDA provider, or RuntimeError where it fell back to the CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=[("CUDAExecutionProvider", {"device_id": 0})])
    if "CUDAExecutionProvider" not in sess.get_providers():
        raise RuntimeError(f"{path.name}: ONNX Runtime did not take the CUDA provider ({sess.get_providers()})")
    return sess


class CudaRunner:
    """The graph on ONNX Runtime CUDA (``sess``, shared), pools in torch memory bound in place
    (input and output names on one buffer)."""

    def __init__(self, sess, cfg, num_blocks: int, block_size: int, host_bounds: bool, kv_dtype: str = "float16"):
        import torch

        from ember.runtime.cuda_paged import POOL_DTYPES

        self.sess, self.cfg, self.block_size, self.host_bounds = sess, cfg, block_size, host_bounds
        self.kv_type = POOL_DTYPES[kv_dtype]  # the runtime's own mapping (ONNX element type)
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.pools = {name: torch.zeros(shape, dtype=getattr(torch, kv_dtype), device="cuda")
                      for name, _ in cache_bindings(cfg.num_layers)}

    def fill_random(self) -> None:
        import torch

        for t in self.pools.values():  # never time on zeros
            if t.dtype == torch.int8:
                t.random_(-127, 128)
            else:
                t.copy_(torch.randn(t.shape, device=t.device))

    def step(self, shares: list[PackedSequence], max_blocks: int | None = None) -> np.ndarray:
        import torch

        io = self.sess.io_binding()
        feeds = packed_inputs(shares, self.block_size, max_blocks, host_bounds=self.host_bounds)
        keep = []
        for name, a in feeds.items():
            if name == HOST_BOUNDS:
                io.bind_cpu_input(name, a)  # host memory by the kernel's contract
                continue
            t = torch.from_numpy(a).cuda()
            keep.append(t)
            io.bind_input(name, "cuda", 0, a.dtype.type, tuple(t.shape), t.data_ptr())
        for cache_in, cache_out in cache_bindings(self.cfg.num_layers):
            t = self.pools[cache_in]
            io.bind_input(cache_in, "cuda", 0, self.kv_type, tuple(t.shape), t.data_ptr())
            io.bind_output(cache_out, "cuda", 0, self.kv_type, tuple(t.shape), t.data_ptr())
        logits = torch.empty((len(shares), self.cfg.vocab_size), dtype=torch.float32, device="cuda")
        io.bind_output("logits", "cuda", 0, np.float32, tuple(logits.shape), logits.data_ptr())
        self.sess.run_with_iobinding(io)
        return logits.cpu().numpy()


def greedy(runner, prompts: list[list[int]], max_new: int, pool: BlockPool) -> list[list[int]]:
    """One packed prefill call for every prompt, then packed decodes of every sequence."""
    history = [list(p) for p in prompts]
    logits = runner.step([pool.share(s, 0, p) for s, p in enumerate(prompts)])
    out = [[int(x)] for x in logits.argmax(-1)]
    for _ in range(max_new - 1):
        shares = [pool.share(s, len(history[s]), [out[s][-1]]) for s in range(len(prompts))]
        for s in range(len(prompts)):
            history[s].append(out[s][-1])
        logits = runner.step(shares)
        for s, x in enumerate(logits.argmax(-1)):
            out[s].append(int(x))
    return out


def teacher_forced(runner, prompts: list[list[int]], steps: int, pool: BlockPool,
                   forced: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One packed prefill of ``prompts``, then ``steps - 1`` packed decodes feeding ``forced[s]``
    (None: each sequence's own argmax, i.e. greedy). Returns (argmax [B, steps], logits [B, steps, V])."""
    logits = [runner.step([pool.share(s, 0, p) for s, p in enumerate(prompts)])]
    feed = forced if forced is not None else [[int(x)] for x in logits[0].argmax(-1)]
    for i in range(steps - 1):
        if forced is None and i > 0:
            for s, x in enumerate(logits[-1].argmax(-1)):
                feed[s].append(int(x))
        logits.append(runner.step([pool.share(s, len(p) + i, [feed[s][i]]) for s, p in enumerate(prompts)]))
    stacked = np.stack(logits, axis=1)
    return stacked.argmax(-1), stacked


def agreement(mine: tuple[np.ndarray, np.ndarray], fp16: tuple[np.ndarray, np.ndarray]) -> dict:
    """Top-1 agreement of a quantized-KV run with the FP16-KV run fed the same tokens, per position."""
    same = mine[0] == fp16[0]
    err = np.abs(mine[1] - fp16[1]).max(-1) / np.abs(fp16[1]).max(-1)
    return {"top1_agreement": float(same.mean()), "positions": int(same.size),
            "first_disagreement_step": [int(np.argmin(r)) if not r.all() else None for r in same],
            "max_rel_logits_err": float(err.max()), "median_rel_logits_err": float(np.median(err))}


def quantized_graph(src, kv_dtype: str, host_bounds: bool, calib: str | None, granularity: str = "per-channel"):
    """The paged graph with ``--kv-dtype`` pools, its scales from the compile's own calibration
    (``compile.paged_kv_scales``: ``--calib`` text, else the built-in prompts or random tokens);
    ``granularity`` "per-tensor": each layer's largest scale (``kv_quant.per_tensor``)."""
    from ember.compiler.compile import CompileOptions, paged_kv_scales
    from ember.export.kv_quant import per_tensor
    from ember.progress import StageLog

    options = CompileOptions(dtype="fp16", paged="on", kv_dtype=kv_dtype, calib=calib)
    scales, record = paged_kv_scales(src, options, StageLog(1, quiet=True))
    if granularity == "per-tensor":
        scales = per_tensor(scales)
    proto = build_paged_graph(src.model, src.config, host_bounds=host_bounds, kv_scales=scales, kv_dtype=kv_dtype)
    return proto, {**record, "granularity": granularity}


def cpu_engine_tokens(name: str, prompts: list[list[int]], max_new: int, work: Path) -> list[list[int]]:
    """Greedy tokens of Ember's CPU step-graph engine (a float32 folder compiled here)."""
    import ember
    from ember.compiler.compile import CompileOptions, compile_decoder

    folder = work / f"{name}-cpu"
    compile_decoder(name, folder, CompileOptions(fused_decode="off", validate=False, quiet=True))
    with ember.load(folder, max_batch=len(prompts), device="cpu") as eng:
        return [o.token_ids for o in eng.generate(prompts, max_new_tokens=max_new, ignore_eos=True)]


def torch_prefill_logits(model, cfg, prompt: list[int]) -> np.ndarray:
    import torch

    t = len(prompt)
    kv = [torch.zeros(1, cfg.num_kv_heads, 1, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    with torch.no_grad():
        return model(torch.tensor([prompt]), torch.arange(t).reshape(1, t), torch.zeros(1, dtype=torch.int64),
                     torch.tensor([t]), *kv)[0][0].numpy()


def token_report(mine: list[list[int]], want: list[list[int]]) -> dict:
    if len(want) != len(mine):  # the cpu_engine section failed: the paged tokens alone, compared with nothing
        return {"paged": mine, "cpu_engine": None, "matching_prefix": None, "all_equal": None}
    same = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(mine, want)]
    return {"paged": mine, "cpu_engine": want, "matching_prefix": same,
            "all_equal": all(x == y for x, y in zip(mine, want))}


def time_paged_decode(runner, cfg, batch: int, live: int, steps: int, warmup: int = 5) -> dict:
    import torch

    rng = np.random.default_rng(batch)
    per_seq = -(-(live + warmup + steps + 1) // runner.block_size)
    pool = BlockPool(per_seq * batch, runner.block_size, seed=batch)
    past = [live] * batch
    times = []
    for i in range(warmup + steps):
        shares = [pool.share(s, past[s], [int(rng.integers(0, cfg.vocab_size))]) for s in range(batch)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runner.step(shares, max_blocks=per_seq)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        past = [p + 1 for p in past]
    return {"batch": batch, "live": live, "ms_per_step": statistics.median(times), "ms_min": min(times),
            "tok_per_s": batch / statistics.median(times) * 1e3}


def time_gqa_decode(sess, cfg, batch: int, live: int, steps: int, warmup: int = 5) -> dict:
    """Today's arm: the fused GroupQueryAttention decode part (``sess``) over a [B, Hkv, S, D]
    slot pool, K/V bound in place."""
    import torch

    cap = live + warmup + steps + 1
    kv = [torch.empty((batch, cfg.num_kv_heads, cap, cfg.head_dim), dtype=torch.float16, device="cuda").normal_()
          for _ in range(2 * cfg.num_layers)]
    logits = torch.empty((batch, cfg.vocab_size), dtype=torch.float32, device="cuda")
    rng = np.random.default_rng(batch)
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()  # the step's inputs to the device count, as in the paged arm
        io = sess.io_binding()
        ids = torch.from_numpy(rng.integers(0, cfg.vocab_size, (batch, 1)).astype(np.int64)).cuda()
        seqlens = torch.full((batch,), live + i, dtype=torch.int32, device="cuda")
        io.bind_input("input_ids", "cuda", 0, np.int64, tuple(ids.shape), ids.data_ptr())
        io.bind_input("seqlens_k", "cuda", 0, np.int32, tuple(seqlens.shape), seqlens.data_ptr())
        io.bind_cpu_input("total_sequence_length", np.array(cap, np.int32))
        for j in range(cfg.num_layers):
            for kind, t in (("key", kv[2 * j]), ("value", kv[2 * j + 1])):
                io.bind_input(f"past_{kind}.{j}", "cuda", 0, np.float16, tuple(t.shape), t.data_ptr())
                io.bind_output(f"present_{kind}.{j}", "cuda", 0, np.float16, tuple(t.shape), t.data_ptr())
        io.bind_output("logits", "cuda", 0, np.float32, tuple(logits.shape), logits.data_ptr())
        sess.run_with_iobinding(io)
        logits.cpu()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    del kv
    torch.cuda.empty_cache()
    return {"batch": batch, "live": live, "ms_per_step": statistics.median(times), "ms_min": min(times),
            "tok_per_s": batch / statistics.median(times) * 1e3}


def time_prefill(runner, cfg, shapes: list[tuple[int, int]], reps: int = 5) -> list[dict]:
    import torch

    rows = []
    for batch, length in shapes:
        times = []
        for r in range(reps + 2):
            rng = np.random.default_rng(r)
            pool = BlockPool(batch * -(-length // runner.block_size), runner.block_size, seed=r)
            shares = [pool.share(s, 0, rng.integers(0, cfg.vocab_size, length).tolist()) for s in range(batch)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.step(shares)
            torch.cuda.synchronize()
            if r >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
        rows.append({"batch": batch, "prompt": length, "ms": statistics.median(times)})
    return rows


def schema_inputs() -> list[str]:
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    s = next(x for x in C.get_all_operator_schema() if x.name == "PagedAttention")
    return [i.name for i in s.inputs]


def section(doc: dict, name: str, fn) -> None:
    t0 = time.time()
    try:
        doc[name] = fn()
        print(f"[{name}] ok in {time.time() - t0:.1f}s: {json.dumps(doc[name], default=str)[:1500]}", flush=True)
    except Exception:  # noqa: BLE001 -- every section reports, whatever fails
        doc.setdefault("errors", {})[name] = traceback.format_exc()
        print(f"[{name}] FAILED\n{doc['errors'][name]}", flush=True)


def markdown(doc: dict, a) -> str:
    lines = [f"# Paged step graph (PagedAttention) -- {a.model} on {doc.get('env', {}).get('device', '?')}", ""]
    env = doc.get("env", {})
    bs = doc.get("block_size", {}).get("block_size", a.block_size) if isinstance(doc.get("block_size"), dict) else a.block_size
    lines += [f"onnxruntime {env.get('onnxruntime')}, torch {env.get('torch')}, block size {bs}, "
              f"host bounds (attention_metadata): {doc.get('host_bounds')}", ""]
    if "tokens" in doc:
        t = doc["tokens"]
        lines += [f"Tokens vs the CPU engine: all equal = {t.get('all_equal')}, matching prefix per prompt "
                  f"{t.get('matching_prefix')} of {a.new_tokens}; prefill logits vs torch (fp32), max relative error "
                  f"{t.get('prefill_rel_err')}", ""]
    if "decode" in doc or "gqa_decode" in doc:
        lines += ["| batch | live | paged ms/step | paged tok/s | GQA fused ms/step | GQA tok/s |", "|---|---|---|---|---|---|"]
        gqa = {r["batch"]: r for r in doc.get("gqa_decode", [])}
        for r in doc.get("decode", []):
            g = gqa.get(r["batch"], {})
            lines.append(f"| {r['batch']} | {r['live']} | {r['ms_per_step']:.2f} | {r['tok_per_s']:.0f} | "
                         f"{g.get('ms_per_step', float('nan')):.2f} | {g.get('tok_per_s', float('nan')):.0f} |")
        lines.append("")
    for r in doc.get("prefill", []):
        lines.append(f"- prefill {r['batch']} x {r['prompt']} tokens, one packed call: {r['ms']:.2f} ms")
    if "memory_inline" in doc:
        m = doc["memory_inline"]
        gib = {k: (m.get(k) or 0) / 2**30 for k in ("weight_bytes", "pool_bytes", "torch_max_allocated")}
        lines += ["", f"Memory: weights {gib['weight_bytes']:.2f} GiB, pools {gib['pool_bytes']:.2f} GiB, "
                  f"torch max allocated {gib['torch_max_allocated']:.2f} GiB, nvidia-smi used "
                  f"{m.get('nvidia_smi_used_mib')} MiB (ONNX Runtime's arena is outside torch's count)"]
    if "kv_quant" in doc:
        fp16_ms = {r["batch"]: r["ms_per_step"] for r in doc.get("decode", [])}
        lines += ["", "Quantized KV vs FP16 KV (teacher-forced: the FP16 run's greedy tokens fed to both, argmax "
                  "compared per position; scales from the compile's calibration):", "",
                  "| KV | top-1 agreement | positions | max rel. logits err | decode ms/step by batch (FP16 KV) |",
                  "|---|---|---|---|---|"]
        for kv, r in doc["kv_quant"].items():
            if "error" in r:
                lines.append(f"| {kv} | failed: {r['error'].strip().splitlines()[-1][:200]} | | | |")
                continue
            ms = ", ".join(f"{d['batch']}: {d['ms_per_step']:.2f} ({fp16_ms.get(d['batch'], float('nan')):.2f})"
                           for d in r.get("decode", [])) or "-"
            lines.append(f"| {kv} | {r['top1_agreement']:.2%} | {r['positions']} | {r['max_rel_logits_err']:.2e} | {ms} |")
    lines += markdown_lines(doc)
    for name, tb in doc.get("errors", {}).items():
        lines += ["", f"## {name} failed", "```", tb.strip()[-3000:], "```"]
    lines += ["", f"Reproduce: `python benchmarks/gpu_paged.py {' '.join(sys.argv[1:])}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-tiny", help="built-in config (llama-tiny | llama-1b) or a model folder")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--live", type=int, default=256, help="cached tokens per sequence when timing decodes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--host-bounds", choices=["auto", "on", "off"], default="auto",
                    help="feed attention_metadata (auto: where the installed schema has it)")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="sections to leave out (tokens, decode, gqa, prefill, kv_quant, graphs, memory)")
    ap.add_argument("--graph-batches", type=int, nargs="+", default=[1, 16, 64, 128],
                    help="batches of the graphs section")
    ap.add_argument("--mem-rows", type=int, default=64, help="rows of the memory section's mixed call")
    ap.add_argument("--mem-prefill", type=int, default=1024, help="prompt tokens of the memory section's calls")
    ap.add_argument("--kv-dtypes", nargs="*", default=["int8", "fp8"],
                    help="quantized KV arms (--kv-dtype of `ember compile`): top-1 agreement with FP16 KV, teacher-forced, "
                         "and decode ms/step")
    ap.add_argument("--kv-per-tensor", action="store_true",
                    help="also run PER_TENSOR scales (they run anyway where a PER_CHANNEL arm fails)")
    ap.add_argument("--kv-steps", type=int, default=64, help="positions per sequence of the agreement check")
    ap.add_argument("--calib", default=None, help="calibration prompts of the KV scales (as `ember compile --calib`)")
    ap.add_argument("--dry-run", action="store_true", help="CPU only: build and check through the numpy reference")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_paged_"))
    doc: dict = {"model": a.model, "block_size_asked": a.block_size}
    rng = np.random.default_rng(0)

    from ember.export.sources import resolve_decoder_source

    src = resolve_decoder_source(a.model)
    cfg, model = src.config, src.model
    prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (5, 17, 40, 9)]

    def env() -> dict:
        import onnxruntime as ort

        info = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                "paged_attention_inputs": schema_inputs()}
        try:
            import torch

            info["torch"] = torch.__version__
            info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        except Exception as e:  # noqa: BLE001
            info["device"] = f"cpu ({e})"
        return info

    section(doc, "env", env)
    has_bounds = HOST_BOUNDS in doc.get("env", {}).get("paged_attention_inputs", [])
    doc["host_bounds"] = host_bounds = {"on": True, "off": False, "auto": has_bounds and not a.dry_run}[a.host_bounds]

    path = work / PAGED_FILE

    def build() -> dict:
        from ember.export.onnx_export import save_onnx

        t0 = time.time()
        proto = build_paged_graph(model, cfg, host_bounds=host_bounds)
        weights = sum(int(np.prod(t.dims)) * (2 if t.data_type == 10 else 8 if t.data_type == 7 else 4)
                      for t in proto.graph.initializer)
        save_onnx(proto, path)
        doc["_proto"] = proto if a.dry_run else None
        return {"seconds": time.time() - t0, "weight_bytes": weights, "nodes": len(proto.graph.node)}

    section(doc, "build", build)
    want: list = []
    if "tokens" not in a.skip:
        section(doc, "cpu_engine", lambda: want.extend(cpu_engine_tokens(a.model, prompts, a.new_tokens, work)) or len(want))
    num_blocks = 4 * len(prompts) * -(-(max(map(len, prompts)) + a.new_tokens) // a.block_size)

    if a.dry_run:
        def dry() -> dict:
            runner = ReferenceRunner(doc["_proto"], cfg, num_blocks, a.block_size, host_bounds)
            mine = greedy(runner, prompts, a.new_tokens, BlockPool(num_blocks, a.block_size))
            return token_report(mine, want)

        section(doc, "tokens", dry)

        def kv_quant_dry() -> dict:
            steps = min(a.kv_steps, a.new_tokens)
            nb = len(prompts) * -(-(max(map(len, prompts)) + steps) // a.block_size)
            fp16 = teacher_forced(ReferenceRunner(doc["_proto"], cfg, nb, a.block_size, host_bounds), prompts, steps,
                                  BlockPool(nb, a.block_size))
            rows = {}
            for kv in a.kv_dtypes:
                for granularity in ("per-channel", "per-tensor")[:2 if a.kv_per_tensor else 1]:
                    proto, record = quantized_graph(src, kv, host_bounds, a.calib, granularity)
                    mine = teacher_forced(ReferenceRunner(proto, cfg, nb, a.block_size, host_bounds), prompts, steps,
                                          BlockPool(nb, a.block_size), forced=fp16[0].tolist())
                    rows[kv if granularity == "per-channel" else f"{kv}/per-tensor"] = {
                        **agreement(mine, fp16), "granularity": granularity, "calibration": record["calibration"]}
            return rows

        if "kv_quant" not in a.skip:
            section(doc, "kv_quant", kv_quant_dry)
        if "graphs" not in a.skip:  # decode graphs need attention_metadata: a graph built with it
            section(doc, "graphs", lambda: dry_graphs(build_paged_graph(model, cfg, host_bounds=True), cfg, a.block_size))
        if "memory" not in a.skip:
            section(doc, "memory", lambda: memory_section(path, cfg, a.block_size, a.mem_rows,
                                                          min(a.mem_prefill, cfg.max_positions // 2), a.live, True))
        doc.pop("_proto", None)
    else:
        import torch

        state: dict = {}
        live = min(a.live, cfg.max_positions - a.steps - 8)  # rotary tables end at max_positions
        doc["live"] = live

        def session() -> dict:
            state["sess"] = cuda_session(path)
            return {"providers": state["sess"].get_providers()}

        def block_size() -> dict:
            """The first block size the kernel takes (older builds wanted multiples of 256)."""
            tried = {}
            for bs in dict.fromkeys([a.block_size, 64, 256]):
                try:
                    r = CudaRunner(state["sess"], cfg, 4, bs, host_bounds)
                    r.step([BlockPool(4, bs).share(0, 0, [1, 2, 3])])
                    state["block_size"] = bs
                    return {"block_size": bs, "failed": tried}
                except Exception as e:  # noqa: BLE001 -- the next size is tried
                    tried[bs] = repr(e)[:500]
            raise RuntimeError(f"no block size worked: {tried}")

        def tokens() -> dict:
            bs = state["block_size"]
            nb = 4 * len(prompts) * -(-(max(map(len, prompts)) + a.new_tokens) // bs)
            runner = CudaRunner(state["sess"], cfg, nb, bs, host_bounds)
            first = runner.step([BlockPool(nb, bs, seed=7).share(s, 0, p) for s, p in enumerate(prompts)])
            errs = []
            for s, p in enumerate(prompts):
                ref = torch_prefill_logits(model, cfg, p)
                errs.append(float(np.abs(first[s] - ref).max() / np.abs(ref).max()))
            mine = greedy(CudaRunner(state["sess"], cfg, nb, bs, host_bounds), prompts, a.new_tokens, BlockPool(nb, bs))
            return {**token_report(mine, want), "prefill_rel_err": max(errs)}

        def decode() -> list:
            rows, bs = [], state["block_size"]
            for b in a.batches:
                per_seq = -(-(live + a.steps + 6) // bs)
                r = CudaRunner(state["sess"], cfg, per_seq * b, bs, host_bounds)
                r.fill_random()
                rows.append(time_paged_decode(r, cfg, b, live, a.steps))
                print(f"  paged batch {b}: {rows[-1]['ms_per_step']:.2f} ms/step", flush=True)
                doc["pool_bytes_max"] = max(doc.get("pool_bytes_max", 0), sum(t.numel() * 2 for t in r.pools.values()))
                del r
                torch.cuda.empty_cache()
            return rows

        def prefill() -> list:
            bs = state["block_size"]
            shapes = [(1, min(512, cfg.max_positions)), (16, min(128, cfg.max_positions))]
            r = CudaRunner(state["sess"], cfg, sum(b * -(-n // bs) for b, n in shapes), bs, host_bounds)
            return time_prefill(r, cfg, shapes)

        def gqa_path() -> Path:
            """The fused GQA decode part of the model (built once)."""
            from ember.export.gqa_decode import build_decode_graph
            from ember.export.onnx_export import save_onnx

            if "gqa_path" not in state:
                state["gqa_path"] = work / "decode.onnx"
                save_onnx(build_decode_graph(model, cfg, "float16"), state["gqa_path"])
            return state["gqa_path"]

        def gqa() -> list:
            sess = cuda_session(gqa_path())
            return [time_gqa_decode(sess, cfg, b, live, a.steps) for b in a.batches]

        section(doc, "session", session)
        section(doc, "block_size", block_size)
        for name, fn in (("tokens", tokens), ("decode", decode), ("prefill", prefill)):
            if name not in a.skip:
                section(doc, name, fn)
        # peak of the paged arm alone: before the GQA graph's second copy of the weights is loaded
        section(doc, "memory_inline", lambda: {"weight_bytes": doc.get("build", {}).get("weight_bytes"),
                                        "pool_bytes": doc.get("pool_bytes_max"),
                                        "torch_max_allocated": torch.cuda.max_memory_allocated(),
                                        "nvidia_smi_used_mib": nvidia_smi_used_mib()})
        if "gqa" not in a.skip:
            section(doc, "gqa_decode", gqa)
        if "graphs" not in a.skip:
            section(doc, "graphs", lambda: graphs_section(path, gqa_path(), cfg, state["block_size"], a.graph_batches,
                                                          live, a.steps))
        if "memory" not in a.skip:
            section(doc, "memory", lambda: memory_section(path, cfg, state["block_size"], a.mem_rows,
                                                          min(a.mem_prefill, cfg.max_positions // 2), live, False))

        def kv_quant() -> dict:
            """Each --kv-dtypes arm against FP16 KV: the same prompts and the FP16 run's greedy tokens fed
            to both (teacher-forced), argmax compared per position; then decode ms/step as ``decode``."""
            bs = state["block_size"]
            lengths = [min(n, cfg.max_positions // 2) for n in (32, 64, 96, 128, 160, 200, 256, 48)]
            kv_prompts = [rng.integers(1, cfg.vocab_size, n).tolist() for n in lengths]
            steps = min(a.kv_steps, cfg.max_positions - max(lengths) - 1)
            nb = len(kv_prompts) * -(-(max(lengths) + steps) // bs)
            fp16 = teacher_forced(CudaRunner(state["sess"], cfg, nb, bs, host_bounds), kv_prompts, steps,
                                  BlockPool(nb, bs, seed=3))
            rows = {}
            for kv in a.kv_dtypes:
                for granularity in ("per-channel", "per-tensor"):  # per-tensor: where per-channel fails, or asked
                    name = kv if granularity == "per-channel" else f"{kv}/per-tensor"
                    try:
                        rows[name] = kv_arm(kv, granularity, kv_prompts, steps, nb, fp16)
                    except Exception:  # noqa: BLE001 -- one arm failing (a kernel refusing a layout) keeps the others
                        rows[name] = {"error": traceback.format_exc()[-3000:]}
                        print(f"  {name} FAILED\n{rows[name]['error']}", flush=True)
                    if "error" not in rows[name] and not a.kv_per_tensor:
                        break
            return rows

        def kv_arm(kv: str, granularity: str, kv_prompts, steps: int, nb: int, fp16) -> dict:
            from ember.export.onnx_export import save_onnx

            bs = state["block_size"]
            proto, record = quantized_graph(src, kv, host_bounds, a.calib, granularity)
            qpath = work / f"paged_{kv}_{granularity}.onnx"
            save_onnx(proto, qpath)
            del proto
            sess = cuda_session(qpath)
            dtype = record["dtype"]
            mine = teacher_forced(CudaRunner(sess, cfg, nb, bs, host_bounds, dtype), kv_prompts, steps,
                                  BlockPool(nb, bs, seed=3), forced=fp16[0].tolist())
            row = {**agreement(mine, fp16), "granularity": granularity, "calibration": record["calibration"], "decode": []}
            print(f"  {kv}: top-1 agreement {row['top1_agreement']:.2%} over {row['positions']} positions", flush=True)
            for b in a.batches:
                per_seq = -(-(live + a.steps + 6) // bs)
                r = CudaRunner(sess, cfg, per_seq * b, bs, host_bounds, dtype)
                r.fill_random()
                row["decode"].append(time_paged_decode(r, cfg, b, live, a.steps))
                print(f"  {kv} batch {b}: {row['decode'][-1]['ms_per_step']:.2f} ms/step", flush=True)
                del r
                torch.cuda.empty_cache()
            return row

        if "kv_quant" not in a.skip:
            section(doc, "kv_quant", kv_quant)
        doc.pop("_proto", None)
    stem = "gpu_paged" if a.model == "llama-tiny" else f"gpu_paged_{Path(a.model).name}"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str))
    try:
        md = markdown(doc, a)
    except Exception:  # noqa: BLE001 -- the JSON above holds everything
        md = f"# gpu_paged: the summary failed, see {stem}.json\n```\n{traceback.format_exc()}```\n"
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
