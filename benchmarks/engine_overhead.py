"""The engine loop's own cost per iteration: ``DecoderEngine`` over an executor that costs
nothing (it returns preallocated logits), so what is timed is scheduling, compaction, the
greedy argmax, per-request token bookkeeping and streaming -- the host work a GPU step of a
few milliseconds must also pay (docs/scheduler.md).

    python benchmarks/engine_overhead.py [--batch 32] [--vocab 32000] [--tokens 512]
Writes benchmarks/results/engine_overhead.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine_info, machine_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def instant_executor(batch: int, vocab: int):
    """The ``Executor`` protocol at zero cost: every step returns the same preallocated logits
    (host steps, ``executor.HostGreedy``: the argmax runs on the host, no chaining)."""
    from ember.runtime.executor import HostGreedy

    class InstantExecutor(HostGreedy):
        used_tokens = 0

        def __init__(self):
            self.logits = np.random.default_rng(0).standard_normal((batch, vocab)).astype(np.float32)

        def run(self, start, input_ids, positions, new_lengths):
            return self.logits[:input_ids.shape[0]]

        def move(self, moves):
            pass

        def release(self, slot):
            pass

        def maybe_shrink(self):
            pass

        def close(self):
            pass

    return InstantExecutor()


def measure(batch: int, vocab: int, tokens: int, repeats: int) -> dict:
    from ember.runtime.decoder import DecoderEngine
    from ember.runtime.scheduler import FusionScheduler

    ex = instant_executor(batch, vocab)
    sched = FusionScheduler(max_batch=batch, kv_capacity_tokens=batch * (tokens + 16), max_seq_len=tokens + 16,
                            prefill_chunk=1024)
    runs = []
    with DecoderEngine(ex, sched, eos_token_id=None, max_positions=tokens + 16, config={"vocab_size": vocab}) as eng:
        for _ in range(repeats + 1):
            t = time.perf_counter()
            hs = [eng.submit(list(range(1, 9)), max_new_tokens=tokens, ignore_eos=True) for _ in range(batch)]
            for h in hs:
                h.result(timeout=600)
            runs.append((time.perf_counter() - t) / tokens)
    ids = np.zeros((batch, 1), np.int64)
    t = time.perf_counter()
    for _ in range(tokens):
        ex.run(0, ids, None, None).argmax(axis=1)
    bare = (time.perf_counter() - t) / tokens
    return {"batch": batch, "vocab": vocab, "tokens": tokens, "engine_ms_per_iteration": [1e3 * r for r in runs[1:]],
            "engine_ms_median": 1e3 * float(np.median(runs[1:])), "argmax_only_ms": 1e3 * bare}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_overhead"))
    a = ap.parse_args()
    info = machine_info()
    r = measure(a.batch, a.vocab, a.tokens, a.repeats)
    r["machine"] = info
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    md = [f"# Engine loop cost per iteration ({a.batch} requests, vocabulary {a.vocab})", "",
          f"Machine: {machine_line(info)}; load average at start {info['load_avg_1m_at_start']}.", "",
          f"{a.batch} requests of 8 prompt tokens and {a.tokens} new tokens each, all at once, through "
          "`DecoderEngine` over an executor that costs nothing; median of "
          f"{a.repeats} runs (after one warm-up run).", "",
          "| what | ms per iteration |", "|---|---:|",
          f"| engine loop (schedule, compaction, argmax, bookkeeping, streaming) | {r['engine_ms_median']:.3f} |",
          f"| of which the host argmax over [{a.batch}, {a.vocab}] logits alone | {r['argmax_only_ms']:.3f} |",
          "", "Reproduce: `python benchmarks/engine_overhead.py`"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
