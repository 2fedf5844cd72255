"""Decode-step time of a compiled decoder vs its memory-bandwidth floor (issue: decoder foundation).

floor(B) = (weight bytes + live KV bytes at batch B) / read bandwidth, where the bandwidth is
the fastest of several ONNX Runtime ReduceSum reads over 1 GiB with the same thread count,
measured in the same run (multi-threaded reads, as the step uses). The step is timed through the runtime's executor
(session run + KV write), i.e. what one decode iteration of the engine costs.

Arms, timed in one run in interleaved rounds (``time_rounds``): the default engine (the portable step graph), the same
model compiled with ``--fused-decode on`` (GroupQueryAttention decode part, K/V written in
place), and a reference that is not a model: the decode part's weight GEMMs alone, chained
with the same shapes and layout (no attention, no KV, no norms) -- the batch scaling this
machine's GEMM library gives the weights by themselves.

    python benchmarks/decode_roofline.py [--model gpt2-124m] [--batches 1 8 32] [--context 128]
Writes benchmarks/results/decode_roofline.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _best_seconds(model, x: np.ndarray, threads: int, reps: int) -> float:
    """Fastest of ``reps`` runs (after one warm-up) of a one-input ONNX model on ``x``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    s.run(None, {"x": x})
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, {"x": x})
        best = min(best, time.perf_counter() - t)
    return best


def _reduce_bandwidth(shape: list[int], axes: list[int] | None, threads: int, reps: int) -> float:
    from onnx import TensorProto, helper

    inputs, inits = ["x"], []
    if axes is not None:
        inits = [helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)]
        inputs.append("axes")
    g = helper.make_graph([helper.make_node("ReduceSum", inputs, ["y"], keepdims=0)], "bw",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    x = np.ones(shape, np.float32)
    return x.nbytes / _best_seconds(m, x, threads, reps)


def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 5) -> dict[str, float]:
    """Bytes/s of multi-threaded reads of ``gib`` GiB by ONNX Runtime ReduceSum, best of ``reps``.

    Several layouts are probed because ONNX Runtime parallelises them differently (a flat
    reduction runs mostly on one thread here; a row-wise one splits rows across threads);
    the floor uses the fastest, so it never flatters the step time.
    """
    n = int(gib * (1 << 30)) // 4
    probes = {"flat": ([n], None), "rows_8192": ([8192, n // 8192], [1]), "rows_64": ([64, n // 64], [1])}
    return {k: _reduce_bandwidth(shape, axes, threads, reps) for k, (shape, axes) in probes.items()}


def gemm_flops(threads: int, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of an ONNX Runtime fp32 MatMul [n,n] x [n,n] (best of ``reps``): the compute roof."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return 2 * n**3 / _best_seconds(m, np.ones((n, n), np.float32), threads, reps)


def step_flops(cfg: dict, wbytes: int, batch: int, context: int) -> float:
    """FLOPs of one decode step: 2 x (matrix weights) x batch + attention over the context.

    Embedding tables that only a Gather reads (one row per token) are not matrix work: GPT-2's
    position table, and the token table of an untied model (its LM head is a separate matrix)."""
    c, layers = cfg["hidden_size"], cfg["num_layers"]
    gather_only = 0 if cfg["tie_word_embeddings"] else cfg["vocab_size"] * c
    if cfg.get("positions") == "learned":  # a learned position table (GPT-2)
        gather_only += cfg["max_positions"] * c
    matrix_params = wbytes / 4 - gather_only
    attn = 4 * layers * c * context  # q.K and p.V per token
    return batch * (2 * matrix_params + attn)


def weight_bytes(onnx_path: Path) -> int:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for i in m.graph.initializer:
        from onnx import helper

        total += math.prod(i.dims) * helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
    return total


def gemm_chain(decode_onnx: Path):
    """The decode part's weight GEMMs (``Gemm(transB)`` nodes, in graph order, with their
    weights and biases) chained through ``Slice`` to the next GEMM's input width: the weights'
    matrix work with nothing else."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(decode_onnx))
    inits = {i.name: i for i in m.graph.initializer}
    gemms = [n for n in m.graph.node if n.op_type == "Gemm"]
    width = lambda n: inits[n.input[1]].dims  # noqa: E731  [out, in]
    nodes, used, x = [], [], "x"
    for j, n in enumerate(gemms):
        used += [inits[i] for i in n.input[1:] if i]
        nodes.append(helper.make_node("Gemm", [x, *n.input[1:]], [f"y{j}"], transB=1))
        x = f"y{j}"
        if j + 1 < len(gemms) and width(n)[0] != width(gemms[j + 1])[1]:
            k = width(gemms[j + 1])[1]
            used += [helper.make_tensor(f"s{j}.{t}", TensorProto.INT64, [1], [v])
                     for t, v in (("a", 0), ("b", k), ("x", 1))]
            nodes.append(helper.make_node("Slice", [x, f"s{j}.a", f"s{j}.b", f"s{j}.x"], [f"z{j}"]))
            x = f"z{j}"
    c_in = width(gemms[0])[1]
    g = helper.make_graph(nodes, "gemm_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", c_in])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], used)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), c_in


class ChainTimer:
    """Times ``gemm_chain``'s graph at a batch size."""

    def __init__(self, model, c_in: int, threads: int):
        import onnxruntime as ort

        from ember.ort.session import session_options

        self.sess = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                         providers=["CPUExecutionProvider"])
        self.c_in = c_in

    def __call__(self, batch: int, steps: int) -> list[float]:
        x = np.random.default_rng(batch).standard_normal((batch, self.c_in)).astype(np.float32)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            self.sess.run(None, {"x": x})
            times.append(time.perf_counter() - t)
        return times


class DecodeTimer:
    """Times one decode step of an engine folder through the runtime's executor (session run +
    KV bookkeeping), one KV pool per batch size; every call starts from ``context`` live tokens
    per row and takes at most ``max_steps`` steps, so the pool's capacity stays what the runtime
    would give that context (the step graph's attention covers the capacity); with ``fused``
    the folder's fused decode part runs the step."""

    def __init__(self, folder: Path, context: int, threads: int, max_steps: int, fused: bool = False):
        from ember.engine_format.manifest import read_manifest
        from ember.ort.decode_session import DecodeSession
        from ember.ort.session import StepSession

        m = read_manifest(folder)
        self.cfg = c = m.model["config"]
        self.layers, self.hkv, self.d = c["num_layers"], c["num_kv_heads"], c["hidden_size"] // c["num_heads"]
        self.sess = StepSession(folder / m.part("step").file, self.layers, threads=threads)
        self.decode = DecodeSession(folder / m.part("decode").file, self.layers, threads=threads) if fused else None
        self.context, self.max_steps = context, max_steps
        self.executors: dict[int, object] = {}

    def executor(self, batch: int):
        from ember.runtime.executor import LocalExecutor
        from ember.runtime.kv_pool import KVPool

        if batch not in self.executors:
            pool = KVPool(self.layers, self.hkv, self.d, slots=batch, max_capacity=self.cfg["max_positions"],
                          capacity=self.context + self.max_steps)
            self.executors[batch] = LocalExecutor(self.sess, pool, decode=self.decode)
        return self.executors[batch]

    def live_kv_bytes(self, batch: int) -> int:
        """Mean live K/V bytes of the timed steps (the context grows by one per step of a call)."""
        pool = self.executor(batch).pool
        return int(batch * pool.slot_bytes(self.context + self.max_steps // 2))

    def __call__(self, batch: int, steps: int) -> list[float]:
        ex = self.executor(batch)
        assert steps <= self.max_steps
        ex.pool.lengths[:batch] = self.context
        ids, new = np.ones((batch, 1), np.int64), np.ones(batch, np.int64)
        times = []
        for _ in range(steps):
            pos = ex.pool.lengths[:batch].reshape(batch, 1).copy()
            t = time.perf_counter()
            ex.run(0, ids, pos, new)
            times.append(time.perf_counter() - t)
        return times


def time_rounds(timers: dict, batches: list[int], reps: int, rounds: int, warmup: int = 3) -> dict:
    """``reps`` timed steps per (arm, batch), taken in ``rounds`` rounds that each visit every
    batch and arm in turn, so a slow drift of the machine's load lands on all of them alike
    rather than on whichever batch was timed during it."""
    for b in batches:
        for timer in timers.values():
            timer(b, warmup)
    times = {(arm, b): [] for arm in timers for b in batches}
    per_round = -(-reps // rounds)
    for _ in range(rounds):
        for b in batches:
            for arm, timer in timers.items():
                times[arm, b] += timer(b, per_round)
    return {k: {"step_ms_median": 1e3 * float(np.median(v)), "step_ms_min": 1e3 * float(np.min(v)),
                "timed_steps": len(v)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-124m")
    ap.add_argument("--engine", default=None, help="existing engine folder (default: compile into artifacts/)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--context", type=int, default=128, help="live tokens per sequence")
    ap.add_argument("--reps", type=int, default=30, help="timed steps per arm and batch")
    ap.add_argument("--rounds", type=int, default=5, help="rounds the timed steps are spread over")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_roofline"))
    a = ap.parse_args()
    from ember.compiler.compile import CompileOptions, compile_decoder
    from ember.ort.session import default_threads

    threads = a.threads or default_threads()
    info = machine_info()
    folder = Path(a.engine) if a.engine else ROOT / "artifacts" / f"bench-{a.model}"
    fused_folder = folder.with_name(folder.name + "-fused")
    t0 = time.perf_counter()
    compile_decoder(a.model, folder, CompileOptions(quiet=True, overwrite=True))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compile_decoder(a.model, fused_folder, CompileOptions(quiet=True, fused_decode="on", overwrite=True))
    compile_fused_s = time.perf_counter() - t0
    step_file = folder / "step.onnx"
    wbytes = weight_bytes(step_file)
    probes = read_bandwidth(threads)
    bw = max(probes.values())
    peak = gemm_flops(threads)
    chain, c_in = gemm_chain(fused_folder / "decode.onnx")
    from ember.engine_format.manifest import read_manifest

    cfg = read_manifest(folder).model["config"]
    steps = max(3, -(-a.reps // a.rounds))  # per call: the warm-up or one round
    timers = {"step": DecodeTimer(folder, a.context, threads, steps),
              "fused": DecodeTimer(fused_folder, a.context, threads, steps, fused=True),
              "gemms": ChainTimer(chain, c_in, threads)}
    timed = time_rounds(timers, a.batches, a.reps, a.rounds)
    arms = {arm: [] for arm in timers}
    for b in a.batches:
        for arm, rows in arms.items():
            r = dict(timed[arm, b], batch=b, context=a.context)
            kv = 0 if arm == "gemms" else timers[arm].live_kv_bytes(b)
            if kv:
                r["live_kv_bytes"] = kv
            floor_ms = 1e3 * (wbytes + kv) / bw
            compute_ms = 1e3 * step_flops(cfg, wbytes, b, a.context if kv else 0) / peak
            roof_ms = max(floor_ms, compute_ms)
            r.update(floor_ms=floor_ms, ratio_to_floor=r["step_ms_median"] / floor_ms, compute_floor_ms=compute_ms,
                     roofline_ms=roof_ms, ratio_to_roofline=r["step_ms_median"] / roof_ms)
            rows.append(r)
            print(f"batch {b:>3} {arm:>5}: {r['step_ms_median']:.1f} ms (floor {floor_ms:.1f} ms, "
                  f"x{r['ratio_to_floor']:.2f})", file=sys.stderr)
    for rows in arms.values():
        for r in rows:
            r["ratio_to_batch1"] = r["step_ms_median"] / rows[0]["step_ms_median"]
    rows = arms["step"]

    def b32(arm):
        return next((r["ratio_to_batch1"] for r in arms[arm] if r["batch"] == 32), None)

    res = {"model": a.model, "machine": info, "threads": threads, "compile_s": round(compile_s, 1),
           "compile_fused_s": round(compile_fused_s, 1),
           "weight_bytes": wbytes, "read_bandwidth_gbs": bw / 1e9,
           "read_probes_gbs": {k: round(v / 1e9, 2) for k, v in probes.items()},
           "gemm_gflops": peak / 1e9, "context": a.context, "rows": rows, "rows_fused_decode": arms["fused"],
           "rows_weight_gemms_alone": arms["gemms"],
           "targets": {"batch1_within_1.3x_floor": rows[0]["ratio_to_floor"] <= 1.3,
                       "batch1_within_1.3x_floor_fused": arms["fused"][0]["ratio_to_floor"] <= 1.3,
                       "batch32_within_3x_batch1": None if b32("step") is None else b32("step") <= 3,
                       "batch32_within_3x_batch1_fused": None if b32("fused") is None else b32("fused") <= 3,
                       "weight_gemms_alone_batch32_over_batch1": b32("gemms"),
                       "compile_under_60s": compile_s < 60}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    md = [f"# Decode step vs bandwidth floor — {a.model}", "",
          f"Machine: {machine_line(info)}; {threads} threads; load average at start {info['load_avg_1m_at_start']}.",
          f"Weights {wbytes / 1e6:.0f} MB; read bandwidth {bw / 1e9:.1f} GB/s (fastest of ONNX Runtime ReduceSum "
          f"over 1 GiB: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in probes.items()) + " GB/s); "
          f"{a.context} live tokens per sequence; compile {compile_s:.1f} s; {a.reps} timed steps per arm and "
          f"batch, spread over {a.rounds} rounds that each visit every batch and arm.", "",
          f"Compute roof: ONNX Runtime fp32 MatMul 2048^3 at {peak / 1e9:.0f} GFLOP/s (same run); compute floor = "
          "step FLOPs / that rate; roofline = max(bandwidth floor, compute floor).", "",
          "Arms: **step graph** = the default engine (`ember compile`); **fused decode** = `--fused-decode on` "
          "(GroupQueryAttention decode part, K/V in place; compile "
          f"{compile_fused_s:.1f} s); **weight GEMMs alone** = the decode part's GEMMs chained with the same shapes, "
          "no attention, no KV, no norms (a reference, not a model: the batch scaling this machine's GEMMs allow the "
          "weights by themselves; its floors count the weights only).", "",
          "| arm | batch | step ms (median) | step ms (min) | bandwidth floor ms | step / bw floor | compute floor ms | "
          "step / roofline | step / batch-1 |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"step": "step graph", "fused": "fused decode", "gemms": "weight GEMMs alone"}
    for arm, arm_rows in arms.items():
        for r in arm_rows:
            md.append(f"| {names[arm]} | {r['batch']} | {r['step_ms_median']:.1f} | {r['step_ms_min']:.1f} | "
                      f"{r['floor_ms']:.1f} | {r['ratio_to_floor']:.2f} | {r['compute_floor_ms']:.1f} | "
                      f"{r['ratio_to_roofline']:.2f} | {r['ratio_to_batch1']:.2f} |")
    t = res["targets"]
    md += ["", f"Targets: batch 1 within 1.3x of the floor: {t['batch1_within_1.3x_floor']} "
           f"(fused decode: {t['batch1_within_1.3x_floor_fused']}); batch 32 within 3x of batch 1: "
           f"{t['batch32_within_3x_batch1']} (fused decode: {t['batch32_within_3x_batch1_fused']}; the weight GEMMs "
           f"alone scale {t['weight_gemms_alone_batch32_over_batch1']:.2f}x on this machine); "
           f"compile under 60 s: {t['compile_under_60s']}.",
           "", "Reproduce: `python benchmarks/decode_roofline.py`"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        bs = [r["batch"] for r in rows]
        ax.plot(bs, [r["step_ms_median"] for r in rows], "o-", label="Ember decode step (step graph)")
        ax.plot(bs, [r["step_ms_median"] for r in arms["fused"]], "D-", label="Ember decode step (fused decode)")
        ax.plot(bs, [r["step_ms_median"] for r in arms["gemms"]], "x-.", label="weight GEMMs alone (reference)")
        ax.plot(bs, [r["floor_ms"] for r in rows], "s--", label="bandwidth floor")
        ax.plot(bs, [r["compute_floor_ms"] for r in rows], "^:", label="compute floor")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per step")
        ax.set_title(f"{a.model} decode, {info['cores']}-core CPU")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
