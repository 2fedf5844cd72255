"""The diffusion compile plan: pipeline source -> four ONNX parts -> (W8A8) -> cache schedule
(DP or uniform) -> DEC tables -> engine folder (docs/design.md §5).

``compile_diffusion`` is the API behind ``ember compile sd-... --cache-interval N ...``; every
CLI option is a field of ``DiffusionCompileOptions``. Calibration runs (features for the DP
schedule, quantization feeds, DEC fits) go through the runtime's own denoising loop: the caller
passes it as ``open_pipeline`` (``ember.runtime.diffusion.pipeline.DiffusionPipeline``; ``ember compile``
does), since the compiler does not import the runtime.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ember.compiler import diffusion_calib as calib
from ember.compiler.backends.tensorrt import check_plan_options
from ember.compiler.diffusion_calib import PipelineOpener
from ember.compiler.diffusion_dec import DEC_SHRINK, DEC_TARGETS, fit_dec
from ember.engine_format import manifest as mf
from ember.engine_format.io_specs import io_specs
from ember.engine_format.tensorrt_part import PLAN_BACKENDS
from ember.engine_format.writer import atomic_folder, prepare_output, write_manifest
from ember.errors import ConfigError, EmberError
from ember.progress import StageLog

PART_NAMES = ("text_encoder", "unet_full", "unet_shallow", "vae_decoder")
SCHEDULES = ("dp", "uniform")
SCHEDULE_WEIGHTS = ("sampler", "measured", "none")
SCHEDULE_DISTANCES = ("noise", "feature")
# docs/design.md §5.4: keep the input/output convs, the time embedding and shortcut convs in float.
KEEP_FLOAT = (r"conv_in/", r"conv_out/", r"time_embedding", r"conv_shortcut")
BACKENDS = ("onnxruntime", *PLAN_BACKENDS)
DTYPES = ("fp32", "fp16")
PLAN_MAX_BATCH = 16  # TensorRT parts: batch 1..16 (prompts x 2 with guidance) unless --trt-max-batch says otherwise


@dataclass(frozen=True)
class DiffusionCompileOptions:
    steps: int = 50  # denoising steps the schedule and DEC tables are fitted for (the runtime default)
    cache_interval: int | None = None  # N; None with cache_speedup None = no caching
    cache_speedup: float | None = None  # target UNet-loop speedup (MACs) instead of N
    schedule: str = "dp"  # dp | uniform
    branch: int = 0  # cache branch (0 = shallowest)
    image_size: int | None = None  # pixels per side (default: the source's sample_size * VAE scale)
    quantize: str | None = None  # "int8" (W8A8) | "int8-weights"
    calib_method: str = "max"
    quant_calib_steps: int = 6  # trajectory steps per calibration prompt used as quantization feeds
    dec: bool = False  # fit decoupled error correction tables
    # DEC's cache table: feature (least-squares regression of the cached feature, docs/design.md §5.3's
    # formula; the default: it never cost more than 0.4 dB) | noise (per-channel affine minimising the shallow
    # tail's guided-noise error: up to +1.7 dB where calibration covers what is generated, -0.7 dB on the
    # reference model's default 3 prompts; docs/diffusion.md); diffusion_dec.py
    dec_target: str = "feature"
    # keep, per cached step, the share of DEC's cache correction (0, 1/4 ... 1) that lowers the guided-noise error
    # most on calibration runs the fit left out (leave one run out; needs >= 2 runs): cv | off; diffusion_dec.py
    dec_shrink: str = "cv"
    schedule_features: str = "auto"  # float | quantized | auto (quantized when --quantize)
    # DP reuse cost D[s, i]: noise (L1 error of step i's guided noise prediction when it reuses step s's
    # cached feature, through the shallow engine) | feature (docs/design.md §5.2's ||X_i - X_s||_1)
    schedule_distance: str = "noise"
    # per-step weights on D: none | sampler (DDIM's eps -> x_0 gain; overstates early steps on a trained
    # model, docs/diffusion.md "Cache schedule") | measured (how far a perturbation of each step's noise
    # prediction moves the final latent on the calibration runs: diffusion_calib.propagation_weights)
    schedule_weights: str = "none"
    calib_prompts: tuple[str, ...] = calib.DEFAULT_CALIB_PROMPTS
    calib_seed: int = 1000
    calib_seeds: int = 1  # trajectories per calibration prompt (seeds calib_seed, calib_seed + 1, ...)
    # DEC's fit also sees this many runs of the empty prompt (unconditional samples: the CFG branch every
    # request computes), after the calibration runs' seeds; the cache schedule does not (docs/diffusion.md)
    dec_uncond_runs: int = 0
    guidance_scale: float = 7.5
    seed: int = 0  # built-in configs' weight seed
    validate: bool = True
    max_validation_error: float = 1e-3  # relative error of each ONNX part vs torch
    threads: int | None = None
    overwrite: bool = False  # replace an existing engine folder at the output path (--overwrite)
    quiet: bool = False
    backend: str = "onnxruntime"  # onnxruntime | tensorrt | tensorrt-rtx (every part a plan built from its ONNX)
    backend_extra: dict = field(default_factory=dict)  # TensorRT options (targets, max_batch, ...)
    dtype: str = "fp32"  # fp32 | fp16 (the GPU build: every float part but a Q/DQ UNet, FP32 islands per passes/fp16.py)
    fused_attention: bool | None = None  # UNet attention -> com.microsoft.MultiHeadAttention (None: on with fp16)
    calib_device: str = "cpu"  # where calibration runs the pipeline (cuda:N for SD-1.5-sized models)
    ort_unet_fusions: bool = False  # fp16 UNets through ORT's CUDA UNet fusions (NhwcConv, GroupNorm...): CUDA only
    export_cache: str | None = None  # folder of this source's FP32 ONNX parts, reused across compiles (see _export)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        check_plan_options(self.backend, self.backend_extra)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.cache_interval is not None and self.cache_speedup is not None:
            raise ConfigError("give --cache-interval or --cache-speedup, not both")
        if self.cache_interval is not None and self.cache_interval < 1:
            raise ConfigError(f"--cache-interval {self.cache_interval} must be >= 1 (1 = no caching)")
        if self.quantize not in (None, "int8", "int8-weights"):
            raise ConfigError(f"--quantize {self.quantize!r}: diffusion engines support int8 (W8A8) and int8-weights")
        if self.schedule_weights not in SCHEDULE_WEIGHTS:
            raise ConfigError(f"schedule_weights {self.schedule_weights!r} must be one of {', '.join(SCHEDULE_WEIGHTS)}")
        if self.schedule_distance not in SCHEDULE_DISTANCES:
            raise ConfigError(f"schedule_distance {self.schedule_distance!r} must be one of {', '.join(SCHEDULE_DISTANCES)}")
        if self.dec_target not in DEC_TARGETS:
            raise ConfigError(f"dec_target {self.dec_target!r} must be one of {', '.join(DEC_TARGETS)}")
        if self.dec_shrink not in DEC_SHRINK:
            raise ConfigError(f"dec_shrink {self.dec_shrink!r} must be one of {', '.join(DEC_SHRINK)}")
        if self.calib_seeds < 1:
            raise ConfigError(f"--calib-seeds {self.calib_seeds} must be >= 1 (trajectories per calibration prompt)")
        if self.dec_uncond_runs < 0:
            raise ConfigError(f"--dec-uncond-runs {self.dec_uncond_runs} must be >= 0")
        if self.schedule_features not in ("float", "quantized", "auto"):
            raise ConfigError(f"schedule_features {self.schedule_features!r} must be float, quantized or auto")
        if self.steps < 1:
            raise ConfigError(f"--steps {self.steps} must be >= 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)} for diffusion engines")
        if self.ort_unet_fusions and (self.dtype != "fp16" or self.quantize or self.fused_attention is False):
            raise ConfigError("--ort-unet-fusions rewrites float FP16 UNets with fused attention: use it with "
                              "--dtype fp16, without --quantize and without --fused-attention off")
        if self.dtype == "fp16" and self.backend != "onnxruntime":
            raise ConfigError(f"--dtype fp16 diffusion engines are built for ONNX Runtime; {self.backend} plans take "
                              "their precision from --trt-options, so leave --dtype at fp32")
        if not self.calib_prompts and (self.needs_calibration):
            raise ConfigError("DP schedules, DEC and quantization need calibration prompts; give at least one")

    @property
    def fuse_attention(self) -> bool:
        return self.dtype == "fp16" if self.fused_attention is None else bool(self.fused_attention)

    @property
    def caching(self) -> bool:
        return self.cache_speedup is not None or (self.cache_interval or 1) > 1

    @property
    def needs_calibration(self) -> bool:
        return (self.caching and self.schedule == "dp") or self.dec or self.quantize is not None


def _budget(opts: DiffusionCompileOptions, macs: dict[str, int]) -> tuple[int, float]:
    """(K full steps, mean interval N) of a caching compile."""
    from ember.passes import cache_schedule as cs

    if opts.cache_speedup is not None:
        budget = cs.budget_for_speedup(opts.steps, opts.cache_speedup, macs["unet_shallow"] / macs["unet_full"])
        return budget, opts.steps / budget
    return cs.budget_for_interval(opts.steps, opts.cache_interval), float(opts.cache_interval)


def _schedule(opts: DiffusionCompileOptions, macs: dict[str, int], distances: np.ndarray | None,
              step_weights: np.ndarray | None = None):
    """The cache schedule; ``distances`` (DP only) is the reuse cost D[s, i] of the calibration
    trajectories (``schedule_distance``) and ``step_weights`` the per-step weights of the DP
    objective (None: unweighted)."""
    from ember.passes import cache_schedule as cs

    t = opts.steps
    if not opts.caching:
        return cs.CacheSchedule(t, tuple(range(t)), "none", 1.0)
    budget, interval = _budget(opts, macs)
    if opts.schedule == "uniform":
        return cs.uniform_schedule(t, max(1, int(interval)))
    if step_weights is not None:
        distances = cs.step_weighted(distances, step_weights)
    return cs.dp_schedule(distances, budget, cs.group_bounds(t, budget), interval=interval)


def _part(folder: Path, name: str, dtype: str) -> mf.EnginePart:
    from ember.passes.quant_graph import ort_disabled_optimizers

    rel = f"{name}.onnx"
    proto = onnx.load(str(folder / rel), load_external_data=False)
    ins, outs = io_specs(proto)
    rec = mf.file_record(folder, rel)
    ext = [mf.file_record(folder, rel + ".data")] if (folder / (rel + ".data")).exists() else []
    extra: dict[str, Any] = {"dtype": dtype}
    disabled = ort_disabled_optimizers(proto)
    if disabled:  # Q/DQ graphs: keep ORT from undoing the int8 fusions (see quant_graph)
        extra["ort_disabled_optimizers"] = disabled
    return mf.EnginePart(name=name, backend="onnxruntime", file=rel, sha256=rec["sha256"], size=rec["size"],
                         inputs=ins, outputs=outs, external_data=ext, extra=extra)


def _validate(src, folder: Path, branch: int, tol: float) -> dict[str, float]:
    import onnxruntime as ort
    import torch

    from ember.export.diffusion.onnx_export import PART_IO, example_inputs, part_modules

    errs = {}
    with torch.no_grad():
        ex, mods = example_inputs(src, branch), part_modules(src, branch)
        for name in PART_NAMES:
            ref = mods[name](*ex[name])
            ref = (ref if isinstance(ref, tuple) else (ref,))[0].numpy()
            sess = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
            got = sess.run(None, {n: t.numpy() for n, t in zip(PART_IO[name][0], ex[name])})[0]
            errs[name] = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
            if errs[name] > tol:
                raise EmberError(f"exported {name} differs from torch by {errs[name]:.2e} (relative) > {tol}; export is broken")
    return errs


def _plan_parts(folder: Path, opts: DiffusionCompileOptions) -> dict[str, mf.EnginePart]:
    """A TensorRT plan of every part, built from its ONNX (kept as the part's ``source_onnx``);
    one optimization profile: batch 1..max_batch."""
    from types import SimpleNamespace

    from ember.compiler.backends.tensorrt import build_plan_part
    from ember.engine_format.profiles import DimRange, ProfileSpec

    extra = {**opts.backend_extra}
    extra["max_batch"] = top = extra.get("max_batch", PLAN_MAX_BATCH)
    extra.setdefault("profiles", [ProfileSpec("batch", {"batch": DimRange(1, min(2, top), top)}).to_dict()])
    parts = {}
    for name in PART_NAMES:
        path = folder / f"{name}.onnx"
        ins, outs = io_specs(onnx.load(str(path), load_external_data=False))
        build = SimpleNamespace(backend=opts.backend, dtype="fp32", extra=extra,
                                quantize=opts.quantize if name.startswith("unet") else None)
        part = build_plan_part(folder, name, path, ins, outs, build)
        data = path.name + ".data"
        part.external_data = [mf.file_record(folder, data)] if (folder / data).exists() else []
        parts[name] = part
    return parts


def _manifest(folder: Path, source: str, src, opts: DiffusionCompileOptions, spec: dict[str, Any], quant: dict | None,
              tables: list[str], dtype: str, plans: dict[str, mf.EnginePart] | None = None,
              finished: dict[str, dict[str, Any]] | None = None) -> mf.Manifest:
    """The folder's manifest; its parts are ``plans`` where given, else the ONNX graphs (ONNX Runtime).
    ``dtype`` is the UNets' before ``_finish_graphs``; ``finished`` its per-part record after."""
    parts = []
    for n in PART_NAMES:
        done = (finished or {}).get(n, {})
        part = (plans or {}).get(n) or _part(folder, n, done.get("dtype") or (dtype if n.startswith("unet") else "fp32"))
        part.extra.update({k: v for k, v in done.items() if k != "dtype"})
        parts.append(part)
    return mf.Manifest(
        kind="diffusion",
        model={"family": "stable-diffusion-1", "name": src.name, "source": str(source), "config": src.config},
        parts=parts,
        tokenizer={**mf.file_record(folder, "tokenizer/tokenizer.json"), "max_length": src.max_text_length,
                   "pad_token_id": src.pad_token_id},
        quantization=quant,
        build={**mf.build_environment(),
               "options": {k: v for k, v in asdict(opts).items() if k not in ("calib_prompts", "overwrite")}},
        tables=[{"name": Path(t).stem, **mf.file_record(folder, t)} for t in tables],
        extra={"diffusion": spec},
    )


def compile_diffusion(source: str | os.PathLike, out_dir: str | os.PathLike,
                      options: DiffusionCompileOptions = DiffusionCompileOptions(),
                      open_pipeline: PipelineOpener | None = None) -> mf.Manifest:
    """Compile a diffusion SOURCE (diffusers SD-1.x folder or ``sd-tiny``/``sd-small``) into ``out_dir``.

    ``open_pipeline`` runs the half-built folder for calibration
    (``ember.runtime.diffusion.pipeline.DiffusionPipeline``); needed when ``options.needs_calibration``."""
    from ember.export.diffusion.onnx_export import count_macs
    from ember.export.diffusion.source import load_source
    from ember.export.diffusion.unet_split import UNetShallow

    opts = options
    if opts.needs_calibration and open_pipeline is None:
        raise ConfigError("this diffusion compile calibrates (DP schedule, DEC or quantization), which runs the engine: "
                          "pass open_pipeline=ember.runtime.diffusion.pipeline.DiffusionPipeline (ember compile does), or "
                          "choose a uniform schedule without --quantize/--dec")
    prepare_output(out_dir, overwrite=opts.overwrite, source=source)  # fail before the long export
    plans_wanted = opts.backend in PLAN_BACKENDS
    log = StageLog(total=4 + bool(opts.needs_calibration) + bool(opts.quantize) + bool(opts.dec) + plans_wanted,
                   quiet=opts.quiet)
    with log.stage(f"load {source}"):
        src = load_source(source, seed=opts.seed)
        _set_image_size(src, opts.image_size)
        shallow_mod = UNetShallow(src.unet, opts.branch)
        cc, qc = shallow_mod.cache_channels, shallow_mod.quant_channels
    with atomic_folder(out_dir, overwrite=opts.overwrite, source=source) as tmp:
        with log.stage("export text encoder, UNet full/shallow, VAE decoder to ONNX"):
            _export(src, str(source), tmp, opts)
            (tmp / "tokenizer").mkdir()
            src.tokenizer.save(str(tmp / "tokenizer" / "tokenizer.json"))
            macs = count_macs(src, opts.branch)
            errors = _validate(src, tmp, opts.branch, opts.max_validation_error) if opts.validate else {}
        spec: dict[str, Any] = {
            "image_size": src.image_size, "latent_size": src.sample_size, "latent_channels": src.latent_channels,
            "max_text_length": src.max_text_length, "scheduler": src.scheduler_config, "steps": opts.steps,
            "guidance_scale": opts.guidance_scale, "branch": opts.branch, "cache_channels": cc, "quant_channels": qc,
            "macs_per_sample": macs, "validation_error": errors, "dec": None,
        }
        spec["cache"] = {**_schedule_stub(opts.steps), "steps": opts.steps}
        draft = _manifest(tmp, str(source), src, opts, spec, None, [], "fp32")
        traj = traj_q = None
        calib_runs = list(opts.calib_prompts) * opts.calib_seeds  # run i: seed calib_seed + i
        if opts.needs_calibration:
            with log.stage(f"calibrate: {len(opts.calib_prompts)} prompts x {opts.calib_seeds} seeds x {opts.steps} full steps"):
                pipe = _open(open_pipeline, tmp, draft, opts)
                traj = calib.collect_trajectories(pipe, calib_runs, opts.steps, opts.calib_seed, opts.guidance_scale)
        quant = None
        float_shallow = onnx.load(str(tmp / "unet_shallow.onnx"))
        if opts.quantize:
            with log.stage(f"quantize UNet ({opts.quantize}) on trajectory samples"):
                quant = _quantize(tmp, opts, traj, cc, qc)
                draft = _manifest(tmp, str(source), src, opts, spec, quant, [], "int8")
                use_q = opts.schedule_features in ("quantized", "auto") and (opts.dec or opts.schedule == "dp") and opts.caching
                if use_q:
                    pipe = _open(open_pipeline, tmp, draft, opts)
                    traj_q = calib.collect_trajectories(pipe, calib_runs, opts.steps, opts.calib_seed, opts.guidance_scale)
        feats = traj_q if traj_q is not None else traj
        with log.stage(f"cache schedule ({opts.schedule if opts.caching else 'none'})"):
            need_d = opts.caching and opts.schedule == "dp"
            weights = distances = None
            if need_d:
                distances = _reuse_distances(pipe, feats, opts, macs, cc, qc)
                if opts.schedule_weights == "sampler":
                    weights = pipe.sampler.eps_weights(opts.steps)  # the sampler of the folder's scheduler config
                elif opts.schedule_weights == "measured":
                    weights = calib.propagation_weights(pipe, calib_runs, opts.steps, opts.calib_seed,
                                                        opts.guidance_scale)
            sched = _schedule(opts, macs, distances, weights)
            spec["cache"] = {**sched.to_dict(), "budget": sched.budget,
                             "features": "quantized" if feats is traj_q and traj_q is not None else "float",
                             "weights": opts.schedule_weights if need_d else None,
                             **({"step_weights": [round(float(w), 5) for w in weights]}
                                if need_d and weights is not None else {}),
                             "distance": opts.schedule_distance if need_d else None}
            log.note(f"full steps ({sched.budget}/{opts.steps}): {list(sched.full_steps)}")
        tables = list(quant["tables"]) if quant else []
        if opts.dec:
            dec_feats = feats
            if opts.dec_uncond_runs:
                with log.stage(f"calibrate DEC: {opts.dec_uncond_runs} runs of the empty prompt x {opts.steps} full steps"):
                    extra = calib.collect_trajectories(pipe, [""] * opts.dec_uncond_runs, opts.steps,
                                                       opts.calib_seed + len(calib_runs), opts.guidance_scale)
                    dec_feats = calib.Trajectories(feats.features + extra.features, feats.feeds + extra.feeds,
                                                   feats.noise + extra.noise)
            with log.stage("fit decoupled error correction"):
                spec["dec"] = fit_dec(tmp, src, dec_feats, sched, float_shallow, opts, cc, qc)
                spec["dec"]["fit_runs"] = {"calibration": len(feats.features), "empty_prompt": opts.dec_uncond_runs}
                tables.append("dec.npz")
        finished = None
        if opts.dtype == "fp16" or opts.fuse_attention:
            with log.stage(f"GPU graphs: {opts.dtype}" + (", fused attention" if opts.fuse_attention else "")):
                finished = _finish_graphs(tmp, opts)
                spec["graphs"] = finished
        plans = None
        if plans_wanted:
            with log.stage(f"build {opts.backend} plans of {', '.join(PART_NAMES)}"):
                plans = _plan_parts(tmp, opts)
        m = _manifest(tmp, str(source), src, opts, spec, quant, tables, "int8" if opts.quantize else "fp32", plans,
                      finished)
        write_manifest(tmp, m)
    return m


def _open(open_pipeline: PipelineOpener, folder: Path, draft: mf.Manifest, opts: DiffusionCompileOptions):
    """The half-built folder's pipeline for calibration, on ``opts.calib_device``."""
    if opts.calib_device == "cpu":
        return open_pipeline(folder, draft, threads=opts.threads)
    return open_pipeline(folder, draft, threads=opts.threads, device=opts.calib_device)


def _finish_graphs(folder: Path, opts: DiffusionCompileOptions) -> dict[str, dict[str, Any]]:
    """The last rewrites, after calibration and the DEC fits ran on the FP32 graphs: FP16 (every
    part but a quantized UNet, whose Q/DQ graph stays as quantized) with passes/fp16.py's FP32
    islands for ONNX Runtime (the timestep embedding's Sin/Cos inputs), then the UNets' attention
    fused into MultiHeadAttention; with ``ort_unet_fusions`` the UNets instead go through
    passes/ort_unet_fusions.py (CUDA-only contrib ops, ORT's FP16 converter). Returns per part what
    was done (recorded in the manifest)."""
    from ember.export.onnx_export import save_onnx
    from ember.passes.fp16 import convert_to_fp16, default_keep_fp32, fp16_report
    from ember.passes.mha_fusion import fuse_attention

    done: dict[str, dict[str, Any]] = {}
    for name in PART_NAMES:
        unet = name.startswith("unet")
        to_fp16 = opts.dtype == "fp16" and not (unet and opts.quantize)
        fuse = unet and opts.fuse_attention
        if not (to_fp16 or fuse):
            continue
        path = folder / f"{name}.onnx"
        model = onnx.load(str(path))
        rec: dict[str, Any] = {}
        if unet and opts.ort_unet_fusions:  # attention first: ORT's own attention fusion fails on this export
            from ember.passes.ort_unet_fusions import ort_unet_fusions_fp16

            rec["fused_attention"] = fuse_attention(model)
            model, rec["ort_unet_fusions"] = ort_unet_fusions_fp16(model)
            rec.update(dtype="fp16", cuda_only=True)
        else:
            if to_fp16:
                convert_to_fp16(model, keep_fp32=default_keep_fp32("onnxruntime"), fp32_outputs=())
                rec["dtype"] = "fp16"
                rec["fp16"] = fp16_report(model)
            if fuse:
                rec["fused_attention"] = fuse_attention(model)
        for f in folder.glob(f"{name}.onnx*"):
            f.unlink()
        save_onnx(model, path)
        done[name] = rec
    return done


def _export(src, source: str, folder: Path, opts: DiffusionCompileOptions) -> None:
    """Write the FP32 ``<part>.onnx`` files into ``folder``: exported, or copied from
    ``opts.export_cache`` when it holds an export of the same source name, config, seed, branch,
    image size and opset (``export.json``; a local folder whose weights changed under the same
    config needs a fresh cache). A fresh export is copied into the cache. Exporting an
    SD-1.5-sized UNet twice takes minutes, and a benchmark compiles several folders of one source."""
    import json

    from ember.export.diffusion.onnx_export import OPSET

    if opts.export_cache is None:
        _export_parts(src, folder, opts.branch)
        return
    cache = Path(opts.export_cache)
    key = json.loads(json.dumps({"source": source, "config": src.config, "seed": opts.seed, "branch": opts.branch,
                                 "image_size": src.image_size, "opset": OPSET}, sort_keys=True, default=str))
    record = cache / "export.json"
    if record.exists() and json.loads(record.read_text()) == key:
        for f in _part_files(cache):
            shutil.copyfile(f, folder / f.name)
        return
    _export_parts(src, folder, opts.branch)
    cache.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)
    for f in _part_files(cache):
        f.unlink()
    for f in _part_files(folder):
        shutil.copyfile(f, cache / f.name)
    record.write_text(json.dumps(key))  # last: a cache is complete when it has its record


def _part_files(folder: Path) -> list[Path]:
    return [f for n in PART_NAMES for f in (folder / f"{n}.onnx", folder / f"{n}.onnx.data") if f.exists()]


def _reuse_distances(pipe, traj, opts: DiffusionCompileOptions, macs: dict[str, int], cc: int, qc: int) -> np.ndarray:
    """D[s, i] of the DP objective from the calibration trajectories (``opts.schedule_distance``)."""
    from ember.passes import cache_schedule as cs

    if opts.schedule_distance == "feature":
        return cs.pairwise_l1(traj.features)
    budget, _ = _budget(opts, macs)
    span = cs.group_bounds(opts.steps, budget)[1]  # the longest group the DP may form
    return calib.reuse_costs(pipe, traj, span, opts.guidance_scale, cc, qc)


def _export_parts(src, folder: Path, branch: int) -> None:
    """Write ``<part>.onnx`` of every part into ``folder``. torch exports into a scratch folder
    (past 2 GB it writes one external file per tensor beside the graph), removed afterwards;
    ``save_onnx`` writes the part (one ``<part>.onnx.data`` past its threshold)."""
    from ember.export.diffusion.onnx_export import export_parts
    from ember.export.onnx_export import save_onnx

    scratch = Path(tempfile.mkdtemp(prefix=".export-", dir=folder))
    try:
        for name, path in export_parts(src, scratch, branch).items():
            save_onnx(onnx.load(str(path)), folder / f"{name}.onnx")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _set_image_size(src, size: int | None) -> None:
    """Latent side = size / VAE scale; the UNet halves it once per down block but the last."""
    if size is None:
        return
    unit = src.vae_scale * 2 ** (len(src.unet.down_blocks) - 1)
    if size <= 0 or size % unit:
        raise ConfigError(f"--image-size {size} must be a positive multiple of {unit} for this pipeline "
                          f"(VAE scale {src.vae_scale} x UNet down-sampling {unit // src.vae_scale})")
    src.sample_size = size // src.vae_scale


def _schedule_stub(steps: int) -> dict[str, Any]:
    return {"method": "none", "full_steps": list(range(steps)), "interval": 1.0, "budget": steps}


def _quantize(tmp: Path, opts: DiffusionCompileOptions, traj, cc: int, qc: int) -> dict[str, Any]:
    from ember.export.onnx_export import save_onnx
    from ember.passes.quantize import QuantOptions, quantize_model

    # Conv outputs get their own Q/DQ so ONNX Runtime runs QLinearConv (int8 in, int8 out); without
    # it a W8A8 conv stays a float Conv that dequantizes its weight every call (measured on sd-small:
    # slower than FP32). See docs/diffusion.md, "Quantization".
    qopts = QuantOptions(scheme=opts.quantize, calib_method=opts.calib_method, exclude_names=KEEP_FLOAT,
                         quantize_conv_outputs=True, threads=opts.threads or 0)
    interval = opts.cache_interval or 5
    summary: dict[str, Any] = {"scheme": opts.quantize, "parts": {}}
    for name, feeds in (("unet_full", calib.full_feeds(traj, opts.quant_calib_steps)),
                        ("unet_shallow", calib.shallow_feeds(traj, opts.quant_calib_steps, interval, cc, qc))):
        path = tmp / f"{name}.onnx"
        model, report = quantize_model(onnx.load(str(path)), feeds if not qopts.weights_only else [], qopts)
        save_onnx(model, path)
        summary["parts"][name] = report.to_dict()
        np.savez(tmp / f"{name}.scales.npz", **report.scale_tables())
    summary["tables"] = [f"{n}.scales.npz" for n in summary["parts"]]
    return summary
