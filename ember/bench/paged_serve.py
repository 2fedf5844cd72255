"""Issue 19's serving workloads on compiled folders (``ember bench paged``,
``benchmarks/gpu_paged_serve.py``): every arm of ``paged_workloads.plan_arms``, each in a process
of its own, gathered into one document (``paged_report.markdown`` renders it).

An arm's process is spawned, so it starts with clean device memory; peak device memory is the
whole device's use as nvidia-smi sees it (``torch.cuda.mem_get_info`` polled every 20 ms; nothing
on the CPU). One failing arm or workload is reported and the rest still run. The paged arms need
the folder's paged step graph on CUDA (``ember compile ... --dtype fp16 --paged on``); without it
they are skipped with that reason (on the CPU they run the step graph over gathered blocks).
"""
from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ember.bench.paged_report import derived, markdown
from ember.bench.paged_workloads import GENAI, Arm, Sizes, kv_held_tokens, memory_ratio, plan_arms, run_burst, \
    run_sequential
from ember.errors import InputError


def make_log(tag: str) -> Callable[[str], None]:
    """``log(msg)`` printing ``[tag t=Ns] msg`` (seconds since now), flushed."""
    t0 = time.perf_counter()
    return lambda msg: print(f"[{tag} t={time.perf_counter() - t0:.0f}s] {msg}", flush=True)


@dataclass(frozen=True)
class PagedRun:
    """What ``run_workloads`` runs. ``folder``: Ember's compiled folder, every arm's but mixed's
    quantized-KV arms, whose folders are ``kv_folders`` (kv dtype -> folder; ``kv_errors``: why one
    has none). ``genai_folder``: ONNX Runtime GenAI's, for ttft1's GenAI arm, which is skipped
    with ``genai_skipped`` (the reason) where that is set. ``timeout_s``: per arm."""

    folder: Path
    workloads: tuple[str, ...]
    sizes: Sizes
    device: str = "cpu"
    genai_folder: Path | None = None
    genai_skipped: str | None = None
    kv_folders: dict[str, Path] = field(default_factory=dict)
    kv_errors: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 900.0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def genai_missing() -> str | None:
    """Why ONNX Runtime GenAI's arm cannot run here (None: it can)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime_genai is not importable here"
    return None


def paged_graph_missing(folder: Path, manifest, device: str) -> str | None:
    """Why ``folder``'s paged arms cannot run on ``device`` (None: they can): on CUDA,
    ``kv_layout='paged'`` runs the folder's paged step graph."""
    if device.startswith("cuda") and manifest.find_part("paged") is None:
        return (f"{folder} has no paged step graph, which the paged arms run on {device}; recompile it with "
                f"`ember compile SOURCE --dtype fp16 --paged on`")
    return None


def check_positions(folder: Path, cfg: dict, sizes: Sizes, workloads: tuple[str, ...]) -> None:
    need, have = sizes.positions(workloads), int(cfg["max_positions"])
    if need > have:
        raise InputError(f"{folder} holds {have} positions, but the workloads {', '.join(workloads)} need {need} "
                         f"(prompt + new tokens of their longest request); shrink them with the size flags "
                         f"(e.g. --mixed-prompt, --mixed-output, --prefix-system) or use a folder with more positions")


# -- one arm, in its own process ------------------------------------------------------------
class DeviceMemory:
    """The whole device's use (nvidia-smi's view: ONNX Runtime's arena is outside torch's count),
    polled every 20 ms from a thread; nothing on the CPU."""

    def __init__(self, device: str):
        self.on_gpu = device.startswith("cuda")
        if self.on_gpu:
            import torch

            self.torch = torch
        self.before = self.used()
        self.peak, self.loaded = self.before, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def used(self) -> int:
        if not self.on_gpu:
            return 0
        free, total = self.torch.cuda.mem_get_info()
        return total - free

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.02)

    def report(self) -> dict:
        self._stop.set()
        self._thread.join()
        out = {"device_used_before_load_mib": self.before / 2**20, "device_peak_mib": self.peak / 2**20}
        if self.loaded is not None:
            out["device_used_after_load_mib"] = self.loaded / 2**20
        if self.on_gpu:
            out["gpu"] = self.torch.cuda.get_device_name()
        return out


def arm_process(folder: str, genai_folder: str | None, workload: str, arm: Arm, device: str, q) -> None:
    tag = f"[{workload} / {arm.name}]"
    try:
        t0 = time.perf_counter()
        if arm.engine == GENAI:  # no torch here: its CUDA libraries stay out of GenAI's process
            from ember.bench.peers.runners import OrtGenAIRunner

            runner = OrtGenAIRunner(genai_folder, 1, None)
            print(f"  {tag} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
            res = run_sequential(runner, arm.warm, arm.timed)
        else:
            import ember
            from ember.bench.peers.runners import EmberRunner

            mem = DeviceMemory(device)
            with ember.load(folder, device=device, **arm.load) as eng:
                mem.loaded = mem.used()
                print(f"  {tag} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
                t1 = time.perf_counter()
                res = (run_sequential(EmberRunner.over(eng), arm.warm, arm.timed) if arm.sequential
                       else run_burst(eng, arm.warm, arm.timed))
                res["stats"] = {k: v for k, v in eng.stats().items() if isinstance(v, (int, float))}
                print(f"  {tag} ran in {time.perf_counter() - t1:.1f} s", flush=True)
            res.update(mem.report())
        res["load"] = {k: v for k, v in arm.load.items()}
        q.put(res)
    except Exception as e:  # reported; the other arms still run
        import traceback

        q.put({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})


def run_arm(folder: Path, genai_folder: Path | None, workload: str, arm: Arm, device: str, timeout_s: float) -> dict:
    """``arm_process`` in a spawned process; an error dict if it fails, dies or runs past ``timeout_s``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    genai = str(genai_folder) if genai_folder else None
    p = ctx.Process(target=arm_process, args=(str(folder), genai, workload, arm, device, q))
    p.start()
    deadline = time.monotonic() + timeout_s
    res = None
    while res is None:
        try:
            res = q.get(timeout=2)
        except queue.Empty:
            if not p.is_alive():
                try:
                    res = q.get(timeout=1)
                except queue.Empty:
                    res = {"error": f"the arm's process exited with code {p.exitcode} and no result"}
            elif time.monotonic() > deadline:
                p.kill()
                res = {"error": f"ran past the per-arm timeout of {timeout_s:.0f} s (--timeout-s)"}
    p.join(timeout=60)
    if p.is_alive():
        p.kill()
    return res


# -- the run --------------------------------------------------------------------------------
def run_workloads(run: PagedRun, header: dict, log: Callable[[str], None] = print,
                  on_workload: Callable[[dict], None] | None = None) -> dict:
    """Every arm of ``run.workloads`` on ``run.folder``'s own KV geometry; returns the document.
    ``header``: ``model``, ``command`` and ``model_note`` (what the weights are) for the report,
    and any other keys to keep in the document (``name``, ``build``, ``device_name``...).
    ``on_workload(doc)`` runs after each workload."""
    from ember.bench.host import machine_info, machine_line
    from ember.engine_format.decoder_spec import kv_geometry
    from ember.engine_format.manifest import read_manifest
    from ember.engine_format.roles import PAST_KEY
    from ember.runtime.kv_blocks import kv_itemsize

    m = read_manifest(run.folder)
    cfg = m.model["config"]
    check_positions(run.folder, cfg, run.sizes, run.workloads)
    geometry = kv_geometry(cfg)
    step_kv = m.part("step").tensor(PAST_KEY, layer=0).dtype
    itemsize = kv_itemsize(step_kv)  # the slot pool's: the budgets are in its bytes
    paged_part = m.find_part("paged")
    weights = (paged_part or m.part("step")).total_bytes  # the graph and its external weights
    token_bytes = geometry.slot_bytes(1, itemsize)
    no_paged = paged_graph_missing(run.folder, m, run.device)
    info = machine_info()
    graphs = f"paged graph {weights / 2**20:.1f} MiB" if paged_part else "no paged graph"
    doc = {"machine": info, "machine_line": machine_line(info), "cuda": run.cuda, "device": run.device,
           "device_name": "a GPU" if run.cuda else "CPU", "folder": str(run.folder),
           "model": m.model.get("name") or run.folder.name,
           **{k: v for k, v in header.items() if k != "model_note"},
           "model_line": f"{header.get('model_note', '')}{cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
                         f"heads {cfg['num_heads']}/{cfg['num_kv_heads']} kv, vocab {cfg['vocab_size']}, "
                         f"{cfg['max_positions']} positions; slot KV {step_kv}, {graphs}",
           "weights_bytes": weights, "token_bytes": token_bytes, "sizes": run.sizes.record(), "workloads": {}}
    kv_dtypes = tuple(dict.fromkeys([*run.kv_folders, *run.kv_errors]))
    for workload in run.workloads:
        log(f"== {workload}")
        w: dict = {"arms": {}}
        doc["workloads"][workload] = w
        try:
            arms = plan_arms(workload, run.sizes, int(cfg["vocab_size"]), geometry, itemsize, kv_dtypes, run.device)
            if workload == "mixed":
                w["budget_bytes"], w["seq_len"] = arms[0].load["kv_memory"], run.sizes.positions(["mixed"])
            tokens = {}
            for arm in arms:
                why = skip_reason(run, arm, no_paged)
                if why is not None:
                    w["arms"][arm.name] = why
                    log(f"{workload} / {arm.name}: {json.dumps(why)}")
                    continue
                log(f"{workload} / {arm.name}: {json.dumps(arm.load, default=str)}")
                folder = run.kv_folders[arm.kv_dtype] if arm.kv_dtype in run.kv_folders else run.folder
                res = run_arm(folder, run.genai_folder, workload, arm, run.device, run.timeout_s)
                if "gpu" in res:
                    doc["device_name"] = res["gpu"]
                tokens[arm.name] = res.pop("tokens", None)
                held = kv_held_tokens(workload, arm, run.sizes)
                if held is not None and run.cuda and "device_peak_mib" in res:
                    res["kv_held_bytes"] = held * token_bytes
                    res["peak_over_weights_and_kv"] = memory_ratio(res, weights, held * token_bytes)
                w["arms"][arm.name] = res
                shown = {k: v for k, v in res.items() if k not in ("stats", "traceback", "load")}
                log(f"{workload} / {arm.name}: {json.dumps(shown, default=str)}")
            w["derived"] = derived(workload, {k: {**r, "tokens": tokens.get(k)} if tokens.get(k) is not None else r
                                              for k, r in w["arms"].items()})
        except Exception as e:  # noqa: BLE001 - one failing workload is reported, the others still run
            w["error"] = f"{type(e).__name__}: {e}"
            log(f"{workload} failed: {w['error']}")
        if on_workload is not None:
            on_workload(doc)
    return doc


def skip_reason(run: PagedRun, arm: Arm, no_paged: str | None) -> dict | None:
    """``{"skipped": why}`` or ``{"error": why}`` where ``arm`` cannot run; None where it can."""
    if arm.engine == GENAI and run.genai_skipped:
        return {"skipped": run.genai_skipped}
    if arm.kv_dtype in run.kv_errors:
        return {"error": f"compile failed: {run.kv_errors[arm.kv_dtype]}"}
    if arm.load.get("kv_layout") == "paged" and no_paged and arm.kv_dtype not in run.kv_folders:
        return {"skipped": no_paged}
    return None


def write_report(doc: dict, stem: Path) -> list[Path]:
    """``STEM.json`` (the document) and ``STEM.md`` (``paged_report.markdown``)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")]
    paths[0].write_text(json.dumps(doc, indent=1, default=str))
    paths[1].write_text(markdown(doc))
    return paths
