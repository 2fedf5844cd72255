"""Pure metric aggregation and the report table of the peers benchmark (no engine imports).

Every arm generates in lockstep: one timestamp per generated token step, batch-wide (the time
the last row of the batch received that step's token), plus the time the call started.
  batch 1 ms/token   (t[-1] - t[0]) / (n - 1): decode only, after the prompt's first token
  batch B tok/s      B * (n - 1) / (t[-1] - t[0]): decode only; ``e2e_tok_s`` adds the prefill
  prompt tok/s       prompt tokens / (t[0] - start): prefill of one long prompt to its first token
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass
class GenTiming:
    start: float  # perf_counter when the generate call began
    step_times: list[float]  # one per generated token step
    batch: int
    prompt_tokens: int  # per row

    @property
    def ttft(self) -> float:
        return self.step_times[0] - self.start

    @property
    def decode_s_per_step(self) -> float:
        n = len(self.step_times)
        if n < 2:
            raise ValueError(f"decode timing needs >= 2 generated tokens, got {n}")
        return (self.step_times[-1] - self.step_times[0]) / (n - 1)


def b1_ms_per_token(runs: list[GenTiming]) -> float:
    """Median over runs of the decode-only time per token, milliseconds."""
    return statistics.median(r.decode_s_per_step for r in runs) * 1e3


def batch_tok_s(runs: list[GenTiming]) -> tuple[float, float]:
    """(decode-only tok/s, end-to-end tok/s incl. prefill), medians over runs."""
    decode = statistics.median(r.batch / r.decode_s_per_step for r in runs)
    e2e = statistics.median(r.batch * len(r.step_times) / (r.step_times[-1] - r.start) for r in runs)
    return decode, e2e


def prompt_tok_s(runs: list[GenTiming]) -> float:
    """Median prompt-processing rate: prompt tokens x batch / time to the first token."""
    return statistics.median(r.batch * r.prompt_tokens / r.ttft for r in runs)


def agreement(tokens: list[int], reference: list[int] | None) -> float | None:
    """Fraction of positions where the greedy tokens equal the reference's (None: no reference)."""
    if not reference or not tokens:
        return None
    n = min(len(tokens), len(reference))
    return sum(a == b for a, b in zip(tokens[:n], reference[:n])) / n


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = (("b1 ms/token", "b1_ms_per_token", ".1f"), ("b{batch} tok/s", "batch_decode_tok_s", ".1f"),
           ("prompt tok/s", "prompt_tok_s", ".0f"), ("peak RSS MiB", "peak_rss_mib", ".0f"),
           ("engine MB", "engine_mb", ".1f"), ("build s", "build_s", ".1f"), ("build RSS MiB", "build_rss_mib", ".0f"),
           ("greedy = HF", "agree_vs_hf", ".0%"))


def markdown_table(rows: list[dict], batch: int) -> str:
    """One line per arm that ran; skipped arms below with their reasons."""
    head = ["arm"] + [c[0].format(batch=batch) for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("skipped"):
            continue
        lines.append("| " + " | ".join([r["arm"]] + [_fmt(r.get(key), spec) for _, key, spec in COLUMNS]) + " |")
    skipped = [r for r in rows if r.get("skipped")]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {r['arm']}: {r['skipped']}" for r in skipped]
    return "\n".join(lines)
