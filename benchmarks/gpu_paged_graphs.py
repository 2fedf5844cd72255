"""The ``graphs`` and ``memory`` sections of ``benchmarks/gpu_paged.py`` (issue 19), through the
runtime's own paged session (``runtime/cuda_paged.cuda_paged_session``), not the benchmark's
hand-made one.

graphs  decode ms per step at each ``--graph-batches`` batch (``--live`` cached tokens per
        sequence, blocks of a shuffled pool): the paged session without CUDA graphs, with them
        (``runtime/paged_graphs``: rows padded to power-of-two buckets, one capture per (rows, KV
        bound)), and the fused GroupQueryAttention decode part with CUDA graphs (``CudaDecodeSession``,
        the slot engine's decode, its pool laid out for max_positions as the engine does). Each
        step packs the rows on the host, runs, and brings the argmax back (``PendingGreedy``).
        --dry-run: the same decode loop through the numpy reference under ``PagedSession``
        (``ReplayingReferenceRunner``), graphs on vs off: the tokens must be equal.
memory  each arm in a process of its own: ``old`` (the session options before issue 19's memory
        work: ONNX Runtime's defaults), ``new`` (``OrtPagedRunner``: exact-size initializers,
        kSameAsRequested arena, no memory pattern), ``new_graphs`` (the same with decode graphs
        captured). Each runs a mixed call (one ``--mem-prefill``-token prompt + ``--mem-rows`` - 1
        decodes at ``--live``), a prefill-only call and decode steps; it reports nvidia-smi's
        device-wide used memory minus what was used before it started (the parent idles meanwhile),
        at each stage, next to ``paged_memory.memory_plan`` for that workload. --dry-run: the plan only.

The child of the memory section: ``python benchmarks/gpu_paged_graphs.py child '<json>'``.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ember.engine_format.paged_feeds import cache_bindings, pack_rows  # noqa: E402

ARMS = ("old", "new", "new_graphs")


def decode_feeds(rng, vocab: int, table: np.ndarray, past: int, block_size: int, host_bounds: bool) -> dict:
    """One decode call: a random token per row at ``past`` cached tokens, over ``table``'s blocks."""
    rows = len(table)
    tokens = [np.array([t]) for t in rng.integers(0, vocab, rows)]
    return pack_rows(tokens, np.full(rows, past), table, block_size, host_bounds=host_bounds)


def shuffled_tables(rows: int, per_seq: int, seed: int) -> np.ndarray:
    """[rows, per_seq] block ids of a shuffled pool of rows x per_seq blocks: no row's blocks are contiguous."""
    return np.random.default_rng(seed).permutation(rows * per_seq).reshape(rows, per_seq).astype(np.int32)


def session_decode(session, pools, vocab: int, batch: int, live: int, steps: int, block_size: int,
                   per_seq: int, warmup: int = 5, sync=None) -> tuple[dict, list[list[int]]]:
    """ms per decode step of a ``PagedGraphSession`` (median after ``warmup``) and each step's tokens."""
    from ember.runtime.cuda_session import PendingGreedy

    rng = np.random.default_rng(batch)
    table = shuffled_tables(batch, per_seq, batch)
    times, tokens = [], []
    for i in range(warmup + steps):
        if sync:
            sync()
        t0 = time.perf_counter()
        feeds = decode_feeds(rng, vocab, table, live + i, block_size, session.host_bounds)
        got, _ = PendingGreedy(session.run(feeds, pools)).result()
        if sync:
            sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        tokens.append(got.tolist())
    ms = statistics.median(times)
    row = {"batch": batch, "live": live, "ms_per_step": ms, "ms_min": min(times), "tok_per_s": batch / ms * 1e3}
    return row, tokens


def graphs_section(path: Path, gqa_path: Path, cfg, block_size: int, batches: list[int], live: int, steps: int) -> dict:
    """The paged session with and without CUDA graphs, then the fused GQA part with them (see the module doc)."""
    import torch

    from ember.runtime.cuda_paged import PagedGraphExecutor, cuda_paged_session

    per_seq = -(-(live + steps + 6) // block_size)
    max_blocks = -(-cfg.max_positions // block_size)
    out: dict = {}
    for arm, on in (("paged", False), ("paged_graphs", True)):
        session = cuda_paged_session(path, cfg.vocab_size, max(batches), max_blocks, cuda_graph=on)
        rows = []
        for b in batches:
            ex = PagedGraphExecutor(session, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, per_seq * b, block_size)
            for t in ex.pools.values():  # never time on zeros
                t.copy_(torch.randn(t.shape, device=t.device))
            row, _ = session_decode(session, ex.pools, cfg.vocab_size, b, live, steps, block_size, per_seq,
                                    sync=torch.cuda.synchronize)
            rows.append(row)
            print(f"  {arm} batch {b}: {row['ms_per_step']:.2f} ms/step", flush=True)
            ex.close()
            del ex
            torch.cuda.empty_cache()
        out[arm] = {**session.stats(), "decode": rows}
        del session
        torch.cuda.empty_cache()
    out["gqa_graphs"] = gqa_graph_decode(gqa_path, cfg, batches, live, steps)
    return out


def gqa_graph_decode(gqa_path: Path, cfg, batches: list[int], live: int, steps: int, warmup: int = 5) -> dict:
    """The fused GQA decode part under the slot engine's ``CudaDecodeSession`` with CUDA graphs."""
    import torch

    from ember.runtime.cuda_session import CudaDecodeSession, PendingGreedy

    sess = CudaDecodeSession(gqa_path, cfg.num_layers, device_index=0, cuda_graph=True)
    rows = []
    for b in batches:
        kv = [torch.empty((b, cfg.num_kv_heads, cfg.max_positions, cfg.head_dim), dtype=torch.float16,
                          device="cuda").normal_() for _ in range(2 * cfg.num_layers)]
        rng = np.random.default_rng(b)
        times = []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ids = rng.integers(0, cfg.vocab_size, (b, 1)).astype(np.int64)
            PendingGreedy(sess.run(ids, np.full(b, live + i, np.int64), kv)).result()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times)
        rows.append({"batch": b, "live": live, "ms_per_step": ms, "ms_min": min(times), "tok_per_s": b / ms * 1e3})
        print(f"  gqa_graphs batch {b}: {ms:.2f} ms/step", flush=True)
        del kv
        sess.forget_graphs()
        torch.cuda.empty_cache()
    return {"cuda_graph_status": sess.cuda_graph_status, "decode": rows}


def dry_graphs(proto, cfg, block_size: int, batches=(1, 3, 4), live: int = 9, steps: int = 6) -> dict:
    """--dry-run: the decode loop through the numpy reference under ``PagedSession``, graphs off
    and on (3 rows padded to a 4-row bucket); the tokens of the two must be equal."""
    from ember.export.paged_reference import ReplayingReferenceRunner
    from ember.runtime.cuda_paged import PagedGraphExecutor
    from ember.runtime.paged_graphs import PagedSession

    per_seq = -(-(live + steps + 2) // block_size)
    max_blocks = -(-cfg.max_positions // block_size)
    out: dict = {}
    for arm, status in (("paged", "off"), ("paged_graphs", "on")):
        session = PagedSession(ReplayingReferenceRunner(proto, cfg.num_layers, graphs=status == "on"), cfg.vocab_size,
                               "cpu", max(batches), max_blocks, host_bounds=True, cuda_graph_status=status,
                               min_kv_bound=8)
        rows, tokens = [], []
        for b in batches:
            ex = PagedGraphExecutor(session, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, per_seq * b, block_size,
                                    device="cpu")
            row, got = session_decode(session, ex.pools, cfg.vocab_size, b, live, steps, block_size, per_seq, warmup=0)
            rows.append(row)
            tokens.append(got)
            ex.close()
        out[arm] = {**session.stats(), "decode": rows, "_tokens": tokens}
    out["tokens_equal"] = out["paged"].pop("_tokens") == out["paged_graphs"].pop("_tokens")
    if not out["tokens_equal"]:
        raise AssertionError(f"decode graphs changed the tokens: {out}")
    return out


# -- memory ------------------------------------------------------------------------------------------

def nvidia_smi_used_mib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
        return float(out.split()[0])
    except Exception:  # noqa: BLE001 -- reported as missing, not fatal
        return None


def memory_section(path: Path, cfg, block_size: int, rows: int, prefill: int, live: int, dry_run: bool) -> dict:
    """Each arm in a child process (see the module doc); --dry-run: the plan alone."""
    from ember.runtime.paged_memory import memory_plan, weight_bytes

    per_seq = -(-(live + prefill + 16) // block_size)
    spec = {"path": str(path), "block_size": block_size, "rows": rows, "prefill": prefill, "live": live,
            "per_seq": per_seq, "cfg": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                      "num_layers", "num_heads", "num_kv_heads",
                                                                      "head_dim", "max_positions")}}
    pools = rows * per_seq * block_size * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    plan = memory_plan(spec["cfg"], weight_bytes(path), pools, rows * cfg.vocab_size * 4, max_tokens=prefill + rows - 1,
                       max_rows=rows, max_seq_len=live + prefill)
    out: dict = {"workload": {k: spec[k] for k in ("rows", "prefill", "live", "block_size")}, "plan": plan, "arms": {}}
    if dry_run:
        return out
    for arm in ARMS:
        baseline = nvidia_smi_used_mib()  # the parent's own use, constant while it waits
        child = json.dumps({**spec, "arm": arm, "baseline": baseline})
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "child", child],
                           capture_output=True, text=True, timeout=240)
        lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
        out["arms"][arm] = json.loads(lines[-1]) if r.returncode == 0 and lines else {
            "error": (r.stderr or r.stdout)[-2000:], "returncode": r.returncode}
        print(f"  memory {arm}: {json.dumps(out['arms'][arm])[:400]}", flush=True)
    return out


def _old_run(sess, feeds: dict, pools: dict, logits) -> None:
    """One call through ONNX Runtime's defaults, bound as the runtime did before issue 19's memory work."""
    import torch

    from ember.runtime.cuda_paged import POOL_DTYPES

    io, keep = sess.io_binding(), []
    for name, a in feeds.items():
        if name == "attention_metadata":
            io.bind_cpu_input(name, a)
            continue
        t = torch.from_numpy(a).cuda()
        keep.append(t)
        io.bind_input(name, "cuda", 0, a.dtype.type, tuple(t.shape), t.data_ptr())
    for cache_in, cache_out in cache_bindings(len(pools) // 2):
        t = pools[cache_in]
        kind = POOL_DTYPES[str(t.dtype).removeprefix("torch.")]
        io.bind_input(cache_in, "cuda", 0, kind, tuple(t.shape), t.data_ptr())
        io.bind_output(cache_out, "cuda", 0, kind, tuple(t.shape), t.data_ptr())
    out = logits[:len(feeds["past_seqlens"])]
    io.bind_output("logits", "cuda", 0, np.float32, tuple(out.shape), out.data_ptr())
    sess.run_with_iobinding(io)


def memory_child(spec: dict) -> dict:
    """One arm of the memory section in this process: used memory (MiB above the parent's
    baseline) after CUDA starts, after the session loads, after each call of the workload."""
    import onnxruntime as ort
    import torch

    from ember.runtime.cuda_paged import PagedGraphExecutor, cuda_paged_session
    from ember.runtime.cuda_session import PendingGreedy

    c, bs, rows, arm = spec["cfg"], spec["block_size"], spec["rows"], spec["arm"]
    used: dict[str, float | None] = {}

    def mark(stage: str) -> None:
        torch.cuda.synchronize()
        now = nvidia_smi_used_mib()
        used[stage] = None if now is None or spec["baseline"] is None else now - spec["baseline"]

    torch.zeros(1, device="cuda")
    mark("cuda_context")
    num_blocks = rows * spec["per_seq"]
    max_blocks = -(-c["max_positions"] // bs)
    status, session = "off", None
    if arm == "old":
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(spec["path"], so, providers=[("CUDAExecutionProvider", {"device_id": 0})])
        pools = {name: torch.zeros((num_blocks, bs, c["num_kv_heads"], c["head_dim"]), dtype=torch.float16,
                                   device="cuda") for name, _ in cache_bindings(c["num_layers"])}
        logits = torch.empty((rows, c["vocab_size"]), dtype=torch.float32, device="cuda")

        def run(feeds):
            _old_run(sess, feeds, pools, logits)
            return logits[:len(feeds["past_seqlens"])]
        host_bounds = "attention_metadata" in [i.name for i in sess.get_inputs()]
    else:
        session = cuda_paged_session(spec["path"], c["vocab_size"], rows, max_blocks, cuda_graph=arm == "new_graphs")
        ex = PagedGraphExecutor(session, c["num_layers"], c["num_kv_heads"], c["head_dim"], num_blocks, bs)
        pools, host_bounds, status = ex.pools, session.host_bounds, session.cuda_graph_status

        def run(feeds):
            return session.run(feeds, pools)
    mark("loaded")
    rng = np.random.default_rng(0)
    table = shuffled_tables(rows, spec["per_seq"], 0)
    prefill, live = spec["prefill"], spec["live"]
    tokens = [rng.integers(0, c["vocab_size"], n) for n in [prefill] + [1] * (rows - 1)]
    past = np.array([0] + [live] * (rows - 1))
    PendingGreedy(run(pack_rows(tokens, past, table, bs, host_bounds=host_bounds))).result()
    mark("mixed_call")
    PendingGreedy(run(pack_rows(tokens[:1], past[:1], table[:1], bs, host_bounds=host_bounds))).result()
    mark("prefill_call")
    for i in range(8):
        PendingGreedy(run(decode_feeds(rng, c["vocab_size"], table, live + 1 + i, bs, host_bounds))).result()
    mark("decode_steps")
    peak = max((v for v in used.values() if v is not None), default=None)
    return {"arm": arm, "used_mib": used, "peak_mib": peak, "cuda_graph_status": status,
            "torch_max_reserved": torch.cuda.max_memory_reserved(),
            "session_stats": session.stats() if session is not None else None}


def markdown_lines(doc: dict) -> list[str]:
    """The two sections' tables for gpu_paged.py's summary."""
    lines: list[str] = []
    g = doc.get("graphs")
    if g:
        lines += ["", "Decode with CUDA graphs (runtime sessions; ms/step, median; each step packs, runs and brings "
                  "the argmax back):", "", "| batch | paged | paged + graphs | GQA fused + graphs |",
                  "|---|---|---|---|"]
        by = {arm: {r["batch"]: r["ms_per_step"] for r in g.get(arm, {}).get("decode", [])}
              for arm in ("paged", "paged_graphs", "gqa_graphs")}
        for b in sorted(by["paged"] or by["paged_graphs"]):
            lines.append("| " + " | ".join([str(b)] + [f"{by[k].get(b, float('nan')):.2f}" for k in by]) + " |")
        pg = g.get("paged_graphs", {})
        lines += ["", f"paged graphs: {pg.get('cuda_graph_status')}, {pg.get('cuda_graph_captures_total')} captured, "
                  f"{pg.get('cuda_graph_replays_total')} replays, "
                  f"{pg.get('cuda_graph_padding_rows_total')} padding rows; "
                  f"GQA graphs: {g.get('gqa_graphs', {}).get('cuda_graph_status')}"
                  + (f"; tokens equal with and without graphs: {g['tokens_equal']}" if "tokens_equal" in g else "")]
    m = doc.get("memory")
    if m and "plan" in m:
        p, mib = m["plan"], 2**20
        terms = ", ".join(f"{k} {v / mib:.0f}" for k, v in p["activation_terms"].items())
        w = m["workload"]
        lines += ["", f"Device memory (one process per arm; nvidia-smi used above the idle parent, MiB; workload: "
                  f"a {w['prefill']}-token prompt + {w['rows'] - 1} decodes at {w['live']} tokens in one call, then a "
                  f"prefill call, then decodes):", "",
                  f"Plan: weights {p['weights'] / mib:.0f} + pools {p['pools'] / mib:.0f} "
                  f"+ buffers {p['buffers'] / mib:.0f} "
                  f"+ activations {p['activations'] / mib:.0f} = {p['planned'] / mib:.0f} MiB, CUDA context aside "
                  f"(activation terms: {terms})", ""]
        if m.get("arms"):
            stages = ("cuda_context", "loaded", "mixed_call", "prefill_call", "decode_steps")
            lines += ["| arm | " + " | ".join(stages) + " | peak | peak - context | graphs |",
                      "|---|" + "---|" * (len(stages) + 3)]
            for arm, r in m["arms"].items():
                if "error" in r:
                    why = r["error"].strip().splitlines()[-1][:150] if r["error"].strip() else r["returncode"]
                    lines.append(f"| {arm} | failed: {why} |")
                    continue
                u = r["used_mib"]
                ctx = u.get("cuda_context") or 0
                peak = r.get("peak_mib")
                lines.append(f"| {arm} | " + " | ".join(f"{u.get(s)}" for s in stages)
                             + f" | {peak} | {None if peak is None else peak - ctx} | {r.get('cuda_graph_status')} |")
    return lines


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "child":
    print(json.dumps(memory_child(json.loads(sys.argv[2])), default=str))
