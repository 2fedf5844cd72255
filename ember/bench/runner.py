"""``run_serve``: every chosen arm on one workload (or a sweep of arrival rates), one model.

Arms: ``fused`` (Ember's scheduler), ``holes`` (the same engine without compaction),
``static``, ``dynamic``, ``concurrent``, ``sequential``, ``hf`` (transformers generate).
Arms run one after another in the same process on the same ONNX Runtime session, so their
ratios are measured within one run on one machine.
"""
from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace

from ember.bench.batch_arms import run_dynamic, run_static
from ember.bench.engine_arms import run_concurrent, run_fused, run_sequential
from ember.bench.host import cpu_model
from ember.bench.metrics import ArmResult, current_rss
from ember.bench.model import BenchModel
from ember.bench.workload import WorkloadSpec, make_workload
from ember.errors import InputError

ARMS = ("fused", "holes", "static", "dynamic", "concurrent", "sequential", "hf")


@dataclass(frozen=True)
class ServeOptions:
    max_batch: int = 32  # slots of the fused engine; batch size of static/dynamic/hf
    prefill_chunk: int | None = None  # None: the engine's default for the model's device
    admit_batch: int | None = None  # None: the engine's default for the model's device
    window_s: float = 1.0  # dynamic batching's collection window
    cap_s: float | None = None  # per-arm time cap (extrapolates total time past it)
    cap_arms: tuple[str, ...] = ("sequential", "concurrent", "hf")  # arms the cap applies to


def machine_info() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__}


def run_arm(arm: str, model: BenchModel, requests, spec: WorkloadSpec, opts: ServeOptions, progress=None,
            hf_model=None) -> ArmResult:
    cap = opts.cap_s if arm in opts.cap_arms else None
    eos = spec.ignore_eos
    if arm == "fused":
        return run_fused(model, requests, opts.max_batch, eos, "min-move", opts.prefill_chunk, cap, progress,
                         admit_batch=opts.admit_batch)
    if arm == "holes":
        return run_fused(model, requests, opts.max_batch, eos, "holes", opts.prefill_chunk, cap, progress,
                         arm="ember-holes", admit_batch=opts.admit_batch)
    if arm == "static":
        return run_static(model, requests, opts.max_batch, eos, cap, progress)
    if arm == "dynamic":
        return run_dynamic(model, requests, opts.max_batch, opts.window_s, eos, cap, progress)
    if arm == "concurrent":
        return run_concurrent(model, requests, eos, cap, progress)
    if arm == "sequential":
        return run_sequential(model, requests, eos, cap, progress)
    if arm == "hf":
        from ember.bench.hf_arm import run_hf

        return run_hf(model, requests, opts.max_batch, eos, cap, progress, hf_model=hf_model)
    raise InputError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")


def warm_up(model: BenchModel, opts: ServeOptions, requests: list | None = None) -> None:
    """Short untimed runs so first-call costs land in no arm's timing: ONNX Runtime's first
    run of a shape (on a GPU: kernel selection, workspaces). Runs four small requests, then
    the workload's first ``max_batch`` prompts at once with 4 new tokens each (the prefill
    shapes the arms start with)."""
    from ember.bench.workload import BenchRequest, LengthDist

    spec = WorkloadSpec(num_requests=min(4, opts.max_batch), rate=math.inf, prompt_len=LengthDist(8, 64),
                        output_len=LengthDist(4, 4), seed=12345)
    run_fused(model, make_workload(spec, model.vocab_size, model.eos_token_id), opts.max_batch,
              prefill_chunk=opts.prefill_chunk)
    if requests:
        first = [BenchRequest(i, 0.0, r.prompt_ids, 4) for i, r in enumerate(requests[:opts.max_batch])]
        run_fused(model, first, opts.max_batch, prefill_chunk=opts.prefill_chunk)


def run_serve(model: BenchModel, spec: WorkloadSpec, arms: list[str], opts: ServeOptions,
              rates: list[float] | None = None, sizes: list[int] | None = None, name: str = "serve",
              show_progress: bool = True) -> dict:
    """Run ``arms`` on ``spec`` at each rate of ``rates`` (default: spec.rate). ``sizes`` gives
    the number of requests per rate (default: spec.num_requests). Returns the result document."""
    from tqdm import tqdm

    for a in arms:
        if a not in ARMS:
            raise InputError(f"unknown arm {a!r}; choose from {', '.join(ARMS)}")
    rates = rates or [spec.rate]
    sizes = sizes or [spec.num_requests] * len(rates)
    if len(sizes) != len(rates):
        raise InputError(f"{len(sizes)} request counts for {len(rates)} rates: give one per rate")
    hf_model = None
    warm_up(model, opts, make_workload(replace(spec, rate=rates[0], num_requests=sizes[0]), model.vocab_size,
                                       avoid_token=model.eos_token_id))
    runs = []
    t0 = time.perf_counter()
    total = sum(sizes) * len(arms)
    with tqdm(total=total, desc=name, unit="req", disable=not show_progress, dynamic_ncols=True) as bar:
        for rate, n in zip(rates, sizes):
            s = replace(spec, rate=rate, num_requests=n)
            requests = make_workload(s, model.vocab_size, avoid_token=model.eos_token_id)
            for arm in arms:
                bar.set_postfix_str(f"rate={'inf' if math.isinf(rate) else rate} arm={arm}")
                if arm == "hf" and hf_model is None:  # built when first needed: other arms' RSS excludes it
                    from ember.bench.hf_arm import build_hf_model

                    hf_model = build_hf_model(model)
                rss_before = current_rss()
                res = run_arm(arm, model, requests, s, opts, bar, hf_model)
                summary = res.summary()
                summary["rss_at_start_mib"] = rss_before / 2**20
                summary["rate"] = None if math.isinf(rate) else rate
                summary["workload"] = s.describe()
                runs.append(summary)
    wl = asdict(spec)
    wl["prompt_len"], wl["output_len"] = str(spec.prompt_len), str(spec.output_len)
    wl["rate"] = None if math.isinf(spec.rate) else spec.rate
    return {
        "name": name, "model": model.manifest.model.get("name"), "folder": str(model.folder),
        "machine": machine_info(), "workload": wl, "rates": [None if math.isinf(r) else r for r in rates],
        "sizes": sizes, "options": asdict(opts), "arms": arms, "runs": runs,
        "wall_s": time.perf_counter() - t0,
    }
