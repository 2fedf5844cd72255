"""Issue 19's serving workloads (``ember bench paged``, ``benchmarks/gpu_paged_serve.py``): each
workload's sizes, requests and arms, and how an arm runs them on a loaded engine (the processes
and the run: ``paged_serve.py``; the report: ``paged_report.py``). No device code: all of it runs
on the CPU (the benchmark's ``--device cpu`` smoke run, and tests/test_paged_workloads.py).

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
first runs ``ttft_warm`` requests. Every paged arm uses blocks of ``kv_block_size`` tokens (None: the
engine's default for its device, KV dtype and head size).
"""
from __future__ import annotations

import argparse
import math
import statistics
import threading
import time
from dataclasses import dataclass, fields, replace

import numpy as np

from ember.bench.metrics import percentiles
from ember.bench.workload import LengthDist, WorkloadSpec, make_workload
from ember.engine_format.decoder_spec import KVGeometry
from ember.errors import InputError
from ember.runtime.kv_blocks import default_kv_block_size

WORKLOADS = ("burst", "prefix", "mixed", "ttft1")
GENAI = "onnxruntime-genai"


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
    kv_block_size: int | None = None  # every paged arm's; None: the engine's (kv_blocks.default_kv_block_size)
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


SIZE_HELP = {"kv_memory": "burst's paged arm's block pool, bytes ",
             "kv_block_size": "tokens per block, every paged arm (default: the engine's, 256/128 on CUDA, "
                              "16 elsewhere) ",
             "mixed_slots": "mixed's slot arm's max_batch; the KV budget follows ",
             "mixed_max_batch": "mixed's paged arm's cap on running sequences "}


def size_arguments(ap: argparse.ArgumentParser) -> None:
    """One flag per ``Sizes`` field (``--mixed-prompt 16:2048``...); None: the device's ``SIZES``."""
    g = ap.add_argument_group("workload sizes (default: the CUDA run's, or the smoke run's with --device cpu)")
    for f in fields(Sizes):
        kind, metavar = {"LengthDist": (LengthDist.parse, "LO:HI"), "str": (str, "BYTES")}.get(f.type, (int, "N"))
        g.add_argument("--" + f.name.replace("_", "-"), dest=f"size_{f.name}", type=kind, default=None, metavar=metavar,
                       help=f"{SIZE_HELP.get(f.name, '')}(cuda {getattr(SIZES['cuda'], f.name)}, "
                            f"cpu {getattr(SIZES['cpu'], f.name)})")


def sizes_from_arguments(args: argparse.Namespace, device: str) -> Sizes:
    """``SIZES`` of ``device`` (cuda:N or cpu) with the flags ``size_arguments`` added that were given."""
    base = SIZES["cuda" if device.startswith("cuda") else "cpu"]
    return replace(base, **{f.name: v for f in fields(Sizes) if (v := getattr(args, f"size_{f.name}")) is not None})


def size_flags(args: argparse.Namespace) -> list[str]:
    """The size flags that were given, as they would be typed (for a report's command line)."""
    return [f"--{f.name.replace('_', '-')}={f'{v.lo}:{v.hi}' if isinstance(v, LengthDist) else v}"
            for f in fields(Sizes) if (v := getattr(args, f"size_{f.name}")) is not None]


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


def paged_layout(s: Sizes, device: str, head_dim: int) -> dict:
    """A paged arm's ``ember.load`` options of its layout: ``s.kv_block_size``, else the block size
    the engine would choose on ``device`` (named, so the report shows it)."""
    return {"kv_layout": "paged", "kv_block_size": s.kv_block_size or default_kv_block_size(device, head_dim)}


def plan_arms(workload: str, s: Sizes, vocab: int, geometry: KVGeometry, itemsize: int,
              kv_dtypes: tuple[str, ...] = (), device: str = "cuda:0") -> list[Arm]:
    """The arms of ``workload`` (``WORKLOADS``) and their requests; the GenAI arm of ttft1 included;
    ``kv_dtypes`` (int8, fp8): mixed adds a paged arm per quantized KV pool, in the same bytes;
    ``itemsize``: the float pool's bytes per element (2: FP16)."""
    layout = paged_layout(s, device, geometry.head_dim)
    if workload == "burst":
        warm, timed = (shared_prefix(vocab, s.requests, s.system, s.own, s.new, s.seed + k) for k in (1, 2))
        return [Arm("slots", {"max_batch": s.requests}, warm, timed),
                Arm("paged", {"max_batch": s.requests, **layout, "kv_memory": s.kv_memory}, warm, timed)]
    if workload == "prefix":
        warm, timed = (shared_prefix(vocab, s.prefix_requests, s.prefix_system, s.prefix_own, s.prefix_new, s.seed + k)
                       for k in (1, 2))
        # the pool holds every request unshared (whole blocks each), so turning the cache off costs compute
        # only, never admission
        bs = layout["kv_block_size"]
        blocks = -(-s.positions(["prefix"]) // bs)
        pool = slot_budget(geometry, itemsize, s.prefix_requests, blocks * bs)
        paged = {"max_batch": s.prefix_requests, **layout, "kv_memory": pool}
        return [Arm("paged cache on", paged, warm, timed),
                Arm("paged cache off", {**paged, "prefix_caching": False}, warm, timed),
                Arm("slots", {"max_batch": s.prefix_requests, "kv_memory": pool}, warm, timed)]
    if workload == "mixed":
        warm = mixed_lengths(vocab, s.mixed_warm, s.mixed_prompt, s.mixed_output, s.seed + 1)
        timed = mixed_lengths(vocab, s.mixed_requests, s.mixed_prompt, s.mixed_output, s.seed + 2)
        budget = slot_budget(geometry, itemsize, s.mixed_slots, s.positions(["mixed"]))
        paged = {"max_batch": s.mixed_max_batch, **layout, "kv_memory": budget}
        return [Arm("slots", {"max_batch": s.mixed_slots, "kv_memory": budget}, warm, timed),
                Arm("paged", paged, warm, timed),
                *[Arm(f"paged {d} KV", paged, warm, timed, kv_dtype=d) for d in kv_dtypes]]
    if workload == "ttft1":
        warm, timed = (shared_prefix(vocab, n, 0, s.ttft_prompt, s.ttft_new, s.seed + k)
                       for k, n in ((1, s.ttft_warm), (2, s.ttft_requests)))
        return [Arm("slots", {"max_batch": s.ttft_max_batch}, warm, timed, sequential=True),
                Arm("paged", {"max_batch": s.ttft_max_batch, **layout}, warm, timed, sequential=True),
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
