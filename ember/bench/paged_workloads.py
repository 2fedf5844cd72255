"""Issue 19's serving workloads (``benchmarks/gpu_paged_serve.py``): each workload's requests and
arms, how an arm runs them on a loaded engine, and the report. No device code: all of it runs on
the CPU (the benchmark's ``--device cpu`` smoke run, and tests/test_paged_workloads.py).

Workloads (greedy, EOS ignored, so every request generates exactly its ``new`` tokens):
  burst   ``requests`` prompts at once, each a shared ``system``-token prompt + ``own`` tokens;
          arms: slots, paged (``kv_memory``)
  prefix  the same shape behind a ``prefix_system``-token (1,024) system prompt; arms: paged with
          prefix caching on and off (the same block pool), slots; issue 19: TTFT median off / on >= 5
  mixed   ``mixed_requests`` prompts of U``mixed_prompt`` tokens and U``mixed_output`` new tokens (seeded),
          all at once, under one KV budget: the slot arm's ``mixed_slots`` rows x (longest prompt +
          longest output) positions, which is also the paged arm's block pool (``kv_memory``, the same
          bytes); issue 19: peak running sequences >= 3x, output tok/s >= 1.3x
  ttft1   ``ttft_requests`` prompts of ``ttft_prompt`` tokens, one at a time (batch 1): time to first
          token and decode ms/token; arms: slots, paged, ONNX Runtime GenAI (``engine``)
Each burst workload first runs a warm-up burst of another seed (another system prompt); ttft1
first runs ``ttft_warm`` requests.
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, fields

import numpy as np

from ember.bench.metrics import percentiles
from ember.bench.workload import LengthDist, WorkloadSpec, make_workload
from ember.engine_format.decoder_spec import KVGeometry
from ember.errors import InputError

WORKLOADS = ("burst", "prefix", "mixed", "ttft1")
GENAI = "onnxruntime-genai"
# issue 19's targets: (workload, the ratio's key, the least it must be)
TARGETS = (("prefix", "ttft_median_off_over_on", 5.0), ("mixed", "running_peak_paged_over_slots", 3.0),
           ("mixed", "tok_per_s_paged_over_slots", 1.3))


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    new: int  # max_new_tokens


@dataclass(frozen=True)
class Arm:
    """One engine configuration on one workload, run in a process of its own."""

    name: str
    load: dict  # ember.load options (the runner adds the device)
    warm: list[Request]
    timed: list[Request]
    sequential: bool = False  # one request at a time (ttft1) instead of every request at once
    engine: str = "ember"  # or GENAI (its folder instead of Ember's; ``load`` unused)
    kv_dtype: str = "fp16"  # the compiled folder it loads: its paged graph's KV pools (``--kv-dtype``)


@dataclass(frozen=True)
class Sizes:
    """Every workload's sizes (``SIZES``: the device run's and the CPU smoke run's)."""

    requests: int = 32  # burst
    system: int = 256
    own: int = 32
    new: int = 64
    kv_memory: str = "1GB"  # the burst's paged arm
    prefix_requests: int = 64
    prefix_system: int = 1024
    prefix_own: int = 16
    prefix_new: int = 16
    mixed_requests: int = 256
    mixed_prompt: LengthDist = LengthDist(16, 2048)
    mixed_output: LengthDist = LengthDist(16, 512)
    mixed_slots: int = 16  # the slot arm's max_batch; the budget follows
    mixed_max_batch: int = 256  # the paged arm's cap on running sequences (blocks should bind first)
    mixed_warm: int = 8
    ttft_requests: int = 20
    ttft_prompt: int = 128
    ttft_new: int = 64
    ttft_warm: int = 3
    ttft_max_batch: int = 16
    seed: int = 0

    def positions(self, workloads: tuple[str, ...] | list[str]) -> int:
        """The most tokens one request of ``workloads`` holds (prompt + new)."""
        need = {"burst": self.system + self.own + self.new,
                "prefix": self.prefix_system + self.prefix_own + self.prefix_new,
                "mixed": self.mixed_prompt.hi + self.mixed_output.hi, "ttft1": self.ttft_prompt + self.ttft_new}
        return max(need[w] for w in workloads)

    def record(self) -> dict:
        """JSON-ready: a length range as 'U[lo,hi]'."""
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), LengthDist) else v for f in fields(self)}


SIZES = {
    "cuda": Sizes(),
    # llama-tiny (256 positions), a couple of minutes on a 2-core host for every workload
    "cpu": Sizes(requests=4, system=32, own=8, new=8, kv_memory="1MB", prefix_requests=8, prefix_system=64,
                 prefix_own=8, prefix_new=4, mixed_requests=24, mixed_prompt=LengthDist(8, 96),
                 mixed_output=LengthDist(4, 32), mixed_slots=4, mixed_max_batch=64, mixed_warm=4, ttft_requests=4,
                 ttft_prompt=32, ttft_new=8, ttft_warm=1, ttft_max_batch=4),
}


# -- requests -------------------------------------------------------------------------------
def shared_prefix(vocab: int, requests: int, system: int, own: int, new: int, seed: int) -> list[Request]:
    """``requests`` prompts of one ``system``-token prefix + ``own`` tokens each (ids >= 3: no special token)."""
    r = np.random.default_rng(seed)
    head = r.integers(3, vocab, system).tolist()
    return [Request(head + r.integers(3, vocab, own).tolist(), new) for _ in range(requests)]


def mixed_lengths(vocab: int, requests: int, prompt: LengthDist, output: LengthDist, seed: int) -> list[Request]:
    """``ember bench serve``'s workload generator, every request at t=0."""
    spec = WorkloadSpec(requests, math.inf, prompt, output, seed=seed)
    return [Request(r.prompt_ids, r.max_new_tokens) for r in make_workload(spec, vocab)]


def slot_budget(geometry: KVGeometry, itemsize: int, slots: int, seq_len: int) -> int:
    """KV bytes of ``slots`` rows of ``seq_len`` positions: the slot layout's whole pool."""
    return slots * geometry.slot_bytes(seq_len, itemsize)


def plan_arms(workload: str, s: Sizes, vocab: int, geometry: KVGeometry, itemsize: int,
              kv_dtypes: tuple[str, ...] = ()) -> list[Arm]:
    """The arms of ``workload`` (``WORKLOADS``) and their requests; the GenAI arm of ttft1 included;
    ``kv_dtypes`` (int8, fp8): mixed adds a paged arm per quantized KV pool, in the same bytes."""
    if workload == "burst":
        warm, timed = (shared_prefix(vocab, s.requests, s.system, s.own, s.new, s.seed + k) for k in (1, 2))
        return [Arm("slots", {"max_batch": s.requests}, warm, timed),
                Arm("paged", {"max_batch": s.requests, "kv_layout": "paged", "kv_memory": s.kv_memory}, warm, timed)]
    if workload == "prefix":
        warm, timed = (shared_prefix(vocab, s.prefix_requests, s.prefix_system, s.prefix_own, s.prefix_new, s.seed + k)
                       for k in (1, 2))
        # the pool holds every request unshared, so turning the cache off costs compute only, never admission
        pool = slot_budget(geometry, itemsize, s.prefix_requests, s.positions(["prefix"]))
        paged = {"max_batch": s.prefix_requests, "kv_layout": "paged", "kv_memory": pool}
        return [Arm("paged cache on", paged, warm, timed),
                Arm("paged cache off", {**paged, "prefix_caching": False}, warm, timed),
                Arm("slots", {"max_batch": s.prefix_requests, "kv_memory": pool}, warm, timed)]
    if workload == "mixed":
        warm = mixed_lengths(vocab, s.mixed_warm, s.mixed_prompt, s.mixed_output, s.seed + 1)
        timed = mixed_lengths(vocab, s.mixed_requests, s.mixed_prompt, s.mixed_output, s.seed + 2)
        budget = slot_budget(geometry, itemsize, s.mixed_slots, s.positions(["mixed"]))
        paged = {"max_batch": s.mixed_max_batch, "kv_layout": "paged", "kv_memory": budget}
        return [Arm("slots", {"max_batch": s.mixed_slots, "kv_memory": budget}, warm, timed),
                Arm("paged", paged, warm, timed),
                *[Arm(f"paged {d} KV", paged, warm, timed, kv_dtype=d) for d in kv_dtypes]]
    if workload == "ttft1":
        warm, timed = (shared_prefix(vocab, n, 0, s.ttft_prompt, s.ttft_new, s.seed + k)
                       for k, n in ((1, s.ttft_warm), (2, s.ttft_requests)))
        return [Arm("slots", {"max_batch": s.ttft_max_batch}, warm, timed, sequential=True),
                Arm("paged", {"max_batch": s.ttft_max_batch, "kv_layout": "paged"}, warm, timed, sequential=True),
                Arm(GENAI, {}, warm, timed, sequential=True, engine=GENAI)]
    raise InputError(f"workload {workload!r} is not one of {', '.join(WORKLOADS)}")


def kv_held_tokens(workload: str, arm: Arm, s: Sizes) -> int | None:
    """The KV tokens a burst of ``workload`` holds at most (every request in, every token generated):
    the system prompt once where ``arm`` shares it (paged with prefix caching), else once per request;
    None for the workloads whose peak depends on the schedule (mixed, ttft1)."""
    if workload == "burst":
        n, system, rest = s.requests, s.system, s.own + s.new
    elif workload == "prefix":
        n, system, rest = s.prefix_requests, s.prefix_system, s.prefix_own + s.prefix_new
    else:
        return None
    shared = arm.load.get("kv_layout") == "paged" and arm.load.get("prefix_caching", True)
    return (system if shared else n * system) + n * rest


def memory_ratio(res: dict, weights_bytes: int, kv_bytes: int) -> float:
    """Device memory the arm's process added at its peak over the weights + the KV it holds."""
    return (res["device_peak_mib"] - res["device_used_before_load_mib"]) * 2**20 / (weights_bytes + kv_bytes)


def parse_workloads(text: str) -> list[str]:
    names = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        raise InputError(f"--workloads {text!r}: name some of {', '.join(WORKLOADS)} (comma-separated)")
    return names


# -- running an arm -------------------------------------------------------------------------
def _ms(seconds: list[float]) -> dict:
    return {k: 1e3 * v for k, v in percentiles(seconds).items()}


def _submit_all(engine, requests: list[Request]) -> tuple[list, float]:
    t0 = time.perf_counter()
    handles = [engine.submit(r.prompt, max_new_tokens=r.new, ignore_eos=True) for r in requests]
    outs = [h.result(timeout=3600) for h in handles]
    return outs, time.perf_counter() - t0


def run_burst(engine, warm: list[Request], timed: list[Request], poll_s: float = 0.01) -> dict:
    """The warm-up burst, then ``timed`` submitted at once: wall time, output tok/s, TTFT (ms, from
    each submit), running sequences (``engine.stats()`` polled every ``poll_s``: mean and max over the
    timed burst), and each request's tokens."""
    _submit_all(engine, warm)
    running: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            running.append(engine.stats()["running"])
            time.sleep(poll_s)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        outs, wall = _submit_all(engine, timed)
    finally:
        stop.set()
        th.join()
    tokens = sum(len(o.token_ids) for o in outs)
    return {"wall_s": wall, "output_tokens": tokens, "tok_per_s": tokens / wall, "ttft_ms": _ms([o.ttft for o in outs]),
            "running_mean_polled": statistics.fmean(running) if running else None,
            "running_max_polled": max(running, default=None), "tokens": [o.token_ids for o in outs]}


def run_sequential(runner, warm: list[Request], timed: list[Request]) -> dict:
    """Each request alone through ``runner.generate([prompt], new)`` (``ember.bench.peers.runners``:
    Ember or ONNX Runtime GenAI, timed the same way): TTFT (ms, from the call) and decode ms/token
    (after the first token; median over requests)."""
    for r in warm:
        runner.generate([r.prompt], r.new)
    runs = [runner.generate([r.prompt], r.new) for r in timed]
    return {"ttft_ms": _ms([t.ttft for t, _ in runs]),
            "decode_ms_per_token": 1e3 * statistics.median(t.decode_s_per_step for t, _ in runs),
            "tokens": [list(tokens) for _, tokens in runs]}


# -- the report -----------------------------------------------------------------------------
def tokens_equal(arms: dict[str, dict], reference: str) -> dict[str, str]:
    """Per arm that ran: how many requests got ``reference``'s greedy tokens ('k/n')."""
    ref = arms.get(reference, {}).get("tokens")
    if ref is None:
        return {}
    return {name: f"{sum(a == b for a, b in zip(r['tokens'], ref))}/{len(ref)}"
            for name, r in arms.items() if name != reference and "tokens" in r}


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def derived(workload: str, arms: dict[str, dict]) -> dict:
    """The workload's comparisons (ratios and token agreement) from its arms' results."""
    ok = {k: v for k, v in arms.items() if "error" not in v and "skipped" not in v}
    get = lambda arm, *keys: _dig(ok.get(arm), keys)  # noqa: E731
    out: dict = {"tokens_equal_to": {}}
    if workload == "prefix":
        out["ttft_median_off_over_on"] = _ratio(get("paged cache off", "ttft_ms", "p50"),
                                                get("paged cache on", "ttft_ms", "p50"))
        out["ttft_p90_off_over_on"] = _ratio(get("paged cache off", "ttft_ms", "p90"),
                                             get("paged cache on", "ttft_ms", "p90"))
        out["tokens_equal_to"]["paged cache on"] = tokens_equal(ok, "paged cache on")
    elif workload == "mixed":
        for arm in [a for a in arms if a.startswith("paged")]:  # "paged", then "paged int8 KV"...
            tag = arm.replace(" KV", "").replace(" ", "_")
            out[f"running_peak_{tag}_over_slots"] = _ratio(get(arm, "stats", "running_peak"),
                                                           get("slots", "stats", "running_peak"))
            out[f"tok_per_s_{tag}_over_slots"] = _ratio(get(arm, "tok_per_s"), get("slots", "tok_per_s"))
        out["tokens_equal_to"]["slots"] = tokens_equal(ok, "slots")
    elif workload == "ttft1":
        out["ttft_median_paged_over_genai"] = _ratio(get("paged", "ttft_ms", "p50"), get(GENAI, "ttft_ms", "p50"))
        out["ttft_median_slots_over_genai"] = _ratio(get("slots", "ttft_ms", "p50"), get(GENAI, "ttft_ms", "p50"))
        out["tokens_equal_to"]["slots"] = tokens_equal(ok, "slots")
    else:
        out["tokens_equal_to"]["slots"] = tokens_equal(ok, "slots")
    return out


def _dig(d: dict | None, keys: tuple) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def verdicts(doc: dict) -> list[str]:
    """One line per issue 19 target whose workload ran: the number, the target, met or not."""
    lines = []
    for workload, key, least in TARGETS:
        w = doc["workloads"].get(workload)
        if w is None:
            continue
        v = w.get("derived", {}).get(key)
        verdict = "not measured (an arm failed)" if v is None else \
            f"{v:.2f} (target >= {least:g}): {'met' if v >= least else 'NOT met'}"
        lines.append(f"- {workload} {key}: {verdict}")
    ttft = doc["workloads"].get("ttft1", {}).get("derived", {}).get("ttft_median_paged_over_genai")
    if ttft is not None:
        lines.append(f"- ttft1 paged TTFT / ONNX Runtime GenAI's: {ttft:.2f} (target <= 1): "
                     f"{'met' if ttft <= 1 else 'NOT met'}")
    return lines


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


COLUMNS = {  # workload -> (header, value of an arm's result)
    "burst": (("burst s", lambda r: _f(r.get("wall_s"), ".2f")), ("tok/s", lambda r: _f(r.get("tok_per_s"), ".0f")),
              ("TTFT median ms", lambda r: _f(_dig(r, ("ttft_ms", "p50")), ".1f")),
              ("TTFT p90 ms", lambda r: _f(_dig(r, ("ttft_ms", "p90")), ".1f")),
              ("prompt tokens computed", lambda r: _f(_dig(r, ("stats", "prefill_tokens_total")), "d"))),
    "prefix": (("TTFT median ms", lambda r: _f(_dig(r, ("ttft_ms", "p50")), ".1f")),
               ("TTFT p90 ms", lambda r: _f(_dig(r, ("ttft_ms", "p90")), ".1f")),
               ("burst s", lambda r: _f(r.get("wall_s"), ".2f")),
               ("prompt tokens computed", lambda r: _f(_dig(r, ("stats", "prefill_tokens_total")), "d")),
               ("prefix cache hits", lambda r: _f(_dig(r, ("stats", "prefix_cache_hits_total")), "d"))),
    "mixed": (("max_batch", lambda r: _f(_dig(r, ("stats", "max_batch")), "d")),
              ("KV positions", lambda r: _f(_dig(r, ("stats", "kv_capacity_tokens")), "d")),
              ("running peak", lambda r: _f(_dig(r, ("stats", "running_peak")), "d")),
              ("running mean", lambda r: _f(r.get("running_mean_polled"), ".1f")),
              ("preemptions", lambda r: _f(_dig(r, ("stats", "preemptions_total")), "d")),
              ("output tok/s", lambda r: _f(r.get("tok_per_s"), ".0f")),
              ("burst s", lambda r: _f(r.get("wall_s"), ".2f")),
              ("TTFT median ms", lambda r: _f(_dig(r, ("ttft_ms", "p50")), ".0f"))),
    "ttft1": (("TTFT median ms", lambda r: _f(_dig(r, ("ttft_ms", "p50")), ".2f")),
              ("TTFT p90 ms", lambda r: _f(_dig(r, ("ttft_ms", "p90")), ".2f")),
              ("decode ms/token", lambda r: _f(r.get("decode_ms_per_token"), ".2f"))),
}
MEMORY = (("device used after load MiB", lambda r: _f(r.get("device_used_after_load_mib"), ".0f")),
          ("device peak MiB", lambda r: _f(r.get("device_peak_mib"), ".0f")),
          ("peak / (weights + KV held)", lambda r: _f(r.get("peak_over_weights_and_kv"), ".2f")))


def workload_table(workload: str, arms: dict[str, dict], memory: bool = True) -> list[str]:
    """The workload's markdown table: one row per arm (a failed or skipped arm says why); ``memory``:
    the device memory columns."""
    cols = COLUMNS[workload] + (MEMORY if memory else ())
    lines = ["| arm | " + " | ".join(h for h, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in arms.items():
        why = r.get("error") or r.get("skipped")
        if why:
            kind = "error" if "error" in r else "skipped"
            lines.append(f"| {name} | {kind}: {str(why)[:200]} |" + " |" * (len(cols) - 1))
        else:
            lines.append(f"| {name} | " + " | ".join(cell(r) for _, cell in cols) + " |")
    return lines


HEADLINES = {
    "burst": "{requests} requests at once, each a shared {system}-token system prompt + {own} own tokens, {new} new "
             "tokens.",
    "prefix": "{prefix_requests} requests at once, each a shared {prefix_system}-token system prompt + {prefix_own} "
              "own tokens, {prefix_new} new tokens; the paged arms share one block pool that holds every request "
              "unshared.",
    "mixed": "{mixed_requests} requests at once, prompts {mixed_prompt} tokens, outputs {mixed_output} tokens "
             "(seed {seed}); one KV budget for both arms (below). Running peak: the engine's `running_peak` (the "
             "most sequences running at once; the {mixed_warm}-request warm-up included); running mean: polled every "
             "10 ms over the timed burst; output tok/s: every output token over the burst's wall time.",
    "ttft1": "{ttft_requests} requests one at a time, prompts of {ttft_prompt} tokens, {ttft_new} new tokens, after "
             "{ttft_warm} warm-up requests; TTFT from the call (ONNX Runtime GenAI: from `append_tokens`, its "
             "`Generator` made before the clock starts), decode ms/token after the first token.",
}


def markdown(doc: dict) -> str:
    """The whole report: a section per workload that ran, then issue 19's targets."""
    s = doc["sizes"]
    md = [f"# Paged KV serving workloads (issue 19) -- {doc['model']} on {doc['device_name']}", "",
          f"Machine: {doc['machine_line']}.", f"Model: {doc['model_line']}.", ""]
    for workload, w in doc["workloads"].items():
        md += [f"## {workload}", "", HEADLINES[workload].format(**s)]
        if workload == "mixed" and "budget_bytes" in w:
            md.append(f"KV budget {w['budget_bytes'] / 2**20:.2f} MiB = {s['mixed_slots']} slot rows x {w['seq_len']} "
                      f"positions x {doc['token_bytes']} bytes per token; the paged arm's block pool has the same "
                      f"bytes.")
        if workload in ("burst", "prefix") and doc.get("cuda", True):
            md.append("Device memory: the whole device's use seen by the arm's process (CUDA context included); "
                      "`peak / (weights + KV held)` divides its growth from before the load by the paged graph's "
                      "weights plus the KV the burst holds at most (the system prompt once where it is shared; the "
                      "slot engine loads the step graph and the fused decode part, two copies of the weights).")
        if "error" in w:
            md.append(f"Workload failed: {w['error'][:300]}")
        md += [""] + workload_table(workload, w.get("arms", {}), memory=doc.get("cuda", True)) + [""]
        d = w.get("derived", {})
        for key, v in d.items():
            if key == "tokens_equal_to":
                for ref, eq in v.items():
                    if eq:
                        md.append(f"Requests whose greedy tokens equal the {ref} arm's: "
                                  + ", ".join(f"{k} {n}" for k, n in eq.items()) + ".")
            elif v is not None:
                md.append(f"{key}: {v:.2f}.")
        md.append("")
    lines = verdicts(doc)
    if lines:
        md += ["## Targets (issue 19)", "", *lines, ""]
    md.append(f"Reproduce: `{doc['command']}`")
    return "\n".join(md) + "\n"
